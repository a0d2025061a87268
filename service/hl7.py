"""HL7 v2 over MLLP: the client that carries ORU^R01 results to the RIS/EHR.

Framing below meaning, as in python-hl7's ``hl7.mllp``: :class:`MllpClient` only moves
bytes (``<VT> message <FS><CR>`` out, one framed answer back, within the connect and
answer timeouts) and :func:`parse_ack` only reads an answer. :class:`Hl7Deliverer` joins
them into a :class:`~service.delivery.Deliverer` that tells the outbox what happened:

========================  ======================  =====================================
answer                    outcome                 why
========================  ======================  =====================================
``AA`` (or ``CA``)        DELIVERED               the receiver took the message
``AE`` (or ``CE``)        RETRY(error text)       application error, may be transient
``AR`` (or ``CR``)        REJECTED(error text)    refused; the same message would be too
no answer, timeout,       RETRY(reason)           the receiver or the network is down
refused, garbled answer,
answer to another message
========================  ======================  =====================================

Each message gets a connection of its own (connect, send, read the ACK, close): simple to
reason about, and what most interface engines accept; one stuck connection never holds
up later messages. Error text is MSA-3 plus ERR-3 (text) and ERR-8 (user message) of
the answer; it comes from the receiver, not from our message, and is logged clipped.

``Hl7DestinationSettings`` is the configuration of one ``type = "hl7"`` destination.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass
from typing import Literal

import hl7 as python_hl7
from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.delivery import Delivery, DeliveryOutcome, RetryPolicy
from service.errors import RadnodeError
from service.observability import QUOTED_VALUE

#: MLLP frame: start block, end block, carriage return (HL7 v2 Appendix C).
START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\x0d"

#: An answer larger than this is not an ACK; stop reading rather than fill memory.
MAX_ANSWER_BYTES = 1_048_576

#: Python codecs of the MSH-18 character sets radnode can send.
CHARSETS: dict[str, str] = {"UNICODE UTF-8": "utf-8", "8859/1": "latin-1"}

_HL7_DELIMITERS = set("|^~\\&")


class Hl7Error(RadnodeError):
    """An HL7 message cannot be built, or an MLLP exchange failed.

    Messages never quote patient data (values are named by field, not shown).
    """


class MllpError(Hl7Error):
    """The MLLP exchange failed: no connection, timeout, bad framing."""


class Hl7DestinationSettings(BaseModel):
    """One RIS/EHR that takes ORU^R01 results over MLLP (``[[destinations]]``, type hl7).

    MSH-3/4 name radnode, MSH-5/6 the receiver, as its interface team asks. They are HD
    namespace ids (IS, at most 20 characters, no HL7 delimiters).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    type: Literal["hl7"] = "hl7"
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    sending_application: str = "RADNODE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    #: MSH-11: P production, T training, D debugging.
    processing_id: Literal["P", "T", "D"] = "P"
    #: Which order number carries the DICOM Accession Number: ORC-2/OBR-2 (placer),
    #: ORC-3/OBR-3 (filler, what a RIS usually assigns and IHE SWF expects) or both.
    order_number_field: Literal["placer", "filler", "both"] = "filler"
    #: OBR-4: "algorithm" names the pipeline that made the result, so two pipelines'
    #: results for one order are two services a RIS keeps apart (the requested
    #: procedure moves to OBR-44); "procedure" puts the requested procedure in OBR-4,
    #: for a RIS that files results only under the ordered service.
    universal_service_id: Literal["algorithm", "procedure"] = "algorithm"
    #: The assigning authorities of the patient ID (PID-3.4/3.5) and of the order number
    #: (EI.2-4 of ORC/OBR-2/3): "send" what the header says; "leave_out" for a RIS of
    #: one identifier domain whose headers carry an issuer it does not know, or one no
    #: HL7 field can take (a name longer than 20 characters that is no OID).
    issuers: Literal["send", "leave_out"] = "send"
    #: OBR-25/OBX-11 of every result: "final" (F, C for a correction, P only while the
    #: study lacks an instance lost in transit), or "preliminary" (always P) for a RIS
    #: that must not file an unverified AI result as final before a radiologist reads it.
    result_status: Literal["final", "preliminary"] = "final"
    #: MSH-18 and the byte encoding of the message.
    character_set: Literal["UNICODE UTF-8", "8859/1"] = "UNICODE UTF-8"
    connect_timeout_s: float = Field(10.0, gt=0)
    ack_timeout_s: float = Field(30.0, gt=0)
    #: Attempts before a delivery is dead-lettered (network errors are retried).
    max_attempts: int = Field(20, ge=1)
    #: Refusals after which a message the RIS answers with AE or AR (CE or CR) is
    #: dead-lettered: its deliveries go in order, so one it keeps refusing must not hold
    #: back the others for the hours ``max_attempts`` allows (acceptance pass); 8 (about
    #: ten minutes of tries with the default back-off) cover a RIS briefly refusing (AR)
    #: or not yet holding the order (AE). Only answered attempts count: a message that
    #: waited out a RIS outage still gets its 8 when the RIS is back.
    refused_attempts: int = Field(8, ge=1)
    #: Wait after the first failed attempt; doubles after each further one.
    backoff_s: float = Field(5.0, ge=0)
    max_backoff_s: float = Field(900.0, ge=0)

    @field_validator(
        "sending_application", "sending_facility", "receiving_application", "receiving_facility"
    )
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        if len(value) > 20:
            raise ValueError("at most 20 characters (HL7 IS)")
        if _HL7_DELIMITERS & set(value):
            raise ValueError("must not contain HL7 delimiters | ^ ~ \\ &")
        return value

    @property
    def encoding(self) -> str:
        return CHARSETS[self.character_set]

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            backoff_s=self.backoff_s,
            max_backoff_s=self.max_backoff_s,
        )


def frame(message: bytes) -> bytes:
    """Wrap one message in an MLLP block."""
    return START_BLOCK + message + END_BLOCK + CARRIAGE_RETURN


class MllpClient:
    """Sends one framed message and returns the framed answer's content."""

    def __init__(self, host: str, port: int, *, connect_timeout_s: float, ack_timeout_s: float):
        self.host = host
        self.port = port
        self.connect_timeout_s = connect_timeout_s
        self.ack_timeout_s = ack_timeout_s

    def exchange(self, message: bytes) -> bytes:
        """Send ``message`` and wait up to ``ack_timeout_s`` for one answer.

        Raises :class:`MllpError` when there is no connection, no complete answer in
        time, or the answer is not an MLLP block.
        """
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout_s)
        except OSError as exc:
            raise MllpError(f"cannot connect: {_os_reason(exc)}") from exc
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            deadline = time.monotonic() + self.ack_timeout_s
            try:
                sock.settimeout(self.ack_timeout_s)
                sock.sendall(frame(message))
                return self._read_block(sock, deadline)
            except TimeoutError as exc:
                raise MllpError(f"no answer within {self.ack_timeout_s:g} s") from exc
            except OSError as exc:
                raise MllpError(f"connection failed: {_os_reason(exc)}") from exc

    def _read_block(self, sock: socket.socket, deadline: float) -> bytes:
        buffer = b""
        while True:
            # The block ends at <FS>; the <CR> after it is not waited for: a receiver
            # that leaves it out (seen in the field) must not get an accepted message
            # resent until the retries run out. A late <CR> precedes the next answer's
            # <VT> and is skipped there.
            end = buffer.find(END_BLOCK)
            if end >= 0:
                start = buffer.find(START_BLOCK)
                if start < 0 or start > end:
                    raise MllpError("answer is not an MLLP block (no start block)")
                return buffer[start + 1 : end]
            if len(buffer) > MAX_ANSWER_BYTES:
                raise MllpError("answer too large for an ACK")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except ConnectionError as exc:  # reset: what came before may say who it is
                raise MllpError(f"connection failed: {_os_reason(exc)}{_not_mllp(buffer)}") from exc
            if not chunk:
                raise MllpError("connection closed before a complete answer" + _not_mllp(buffer))
            buffer += chunk


def _not_mllp(answer: bytes) -> str:
    """What an answer that is no MLLP block looks like (an HTTP server, a wrong port):
    said so, it points at the port at once (acceptance pass: only "connection closed").
    Its first word only, printable ASCII: not what it may say of a patient."""
    words = answer.split(None, 1)
    if not words or answer.lstrip().startswith(START_BLOCK):
        return ""
    word = words[0][:12].decode("ascii", errors="replace")
    shown = "".join(c if c.isprintable() and c.isascii() else "?" for c in word)
    return f"; the answer is not MLLP-framed (it starts with {shown!r}): check the port"


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


@dataclass(frozen=True)
class Ack:
    """The part of an acknowledgement radnode acts on.

    ``code`` is MSA-1 (AA/AE/AR, or CA/CE/CR in enhanced mode), ``control_id`` MSA-2 (the
    MSH-10 it answers), ``text`` the receiver's error text (MSA-3, ERR-3 text, ERR-8).
    """

    code: str
    control_id: str
    text: str

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")


def parse_ack(raw: bytes, encoding: str = "utf-8") -> Ack:
    """Read MSA (and ERR) from an answer. Raises :class:`Hl7Error` if it is not an ACK.

    python-hl7 is used here, not hl7apy: it is tolerant of the versions and small
    deviations real receivers answer with, and an ACK needs no validation to be read.
    """
    text = raw.decode(encoding, errors="replace").replace("\r\n", "\r").replace("\n", "\r")
    # a BOM, blanks around it, a batch (FHS/BHS ... BTS/FTS) around the one ACK:
    # seen from receivers, and refused they made every message be sent again (review)
    segments = [seg.strip(" \t\ufeff") for seg in text.split("\r")]
    starts = [i for i, seg in enumerate(segments) if seg.startswith("MSH")]
    if not starts:
        raise Hl7Error("answer is not an HL7 message (it has no MSH segment)")
    body = [seg for seg in segments[starts[0] :] if seg and not seg.startswith(("BTS", "FTS"))]
    try:
        message = python_hl7.parse("\r".join(body))
        msa = message.segment("MSA")
    except (KeyError, ValueError, IndexError, python_hl7.ParseException) as exc:
        raise Hl7Error("answer is not an HL7 ACK (no MSA segment)") from exc
    code = _field(msa, 1).upper()
    if code not in ("AA", "AE", "AR", "CA", "CE", "CR"):
        raise Hl7Error(f"answer has an unknown acknowledgement code {code[:4]!r}")
    parts = [_field(msa, 3)]
    for err in _segments(message, "ERR"):
        parts.extend((_component(err, 3, 1), _field(err, 8)))
    texts = [message.unescape(p).strip() for p in parts]
    error_text = "; ".join(dict.fromkeys(t for t in texts if t))  # in order, once each
    return Ack(code=code, control_id=_field(msa, 2), text=error_text)


#: Fields of radnode's own ORU that identify the patient or the order, and how many of
#: their leading components do: PID-3 (the ID of each repetition, not its issuer or
#: type code), PID-5 (family, given, middle name), PID-7 (birth date), PID-18
#: (account), PID-19 (SSN), ORC-2/3 and OBR-2/3 (the accession number, not its issuer).
_IDENTIFYING_FIELDS = (
    ("PID", ((3, 1), (5, 3), (7, 1), (18, 1), (19, 1))),
    ("ORC", ((2, 1), (3, 1))),
    ("OBR", ((2, 1), (3, 1))),
)
#: A quoted value, and anything shaped like a DICOM UID (four or more numeric parts).
_QUOTED_OR_UID = re.compile(rf"{QUOTED_VALUE}|\b\d+(?:\.\d+){{3,}}\b")
REDACTED = "<redacted>"


def without_identifiers(text: str, message: bytes | None, encoding: str = "utf-8") -> str:
    """The receiver's error ``text`` with the patient's identifiers taken out.

    Why: the text is logged and kept in the outbox, which hold no patient data, and a
    receiver may quote what it refused ("AE: unknown patient DOE^JANE, MRN 12345"). Every
    name part, ID, birth date and order number radnode sent in ``message`` (2 characters
    or more) is replaced wherever it stands as a word, as are quoted values and UIDs; the
    rest of the text, what tells the operator what to fix, stays.
    """
    if not text:
        return text
    text = _QUOTED_OR_UID.sub(REDACTED, text)
    tokens = sorted(_identifiers(message, encoding), key=len, reverse=True)
    if tokens:
        words = "|".join(re.escape(t) for t in tokens)
        text = re.sub(rf"(?<![\w.-])(?:{words})(?![\w-])", REDACTED, text, flags=re.IGNORECASE)
    return _WORD.sub(_keep_or_redact, text)


#: Words a receiver's error text is made of that name no one: HL7 terms (segments,
#: acknowledgment codes, table 0357's error names) and the words around them. A word
#: with a capital or a digit that is not here is redacted, so what the receiver quotes
#: that radnode did not send (another patient's name, an institution, a description)
#: stays out too (PHI audit); lower-case words and short numbers (codes, field numbers)
#: stay, so the sentence still says what to fix.
_SEGMENT_WORDS = "msh evn pid pd1 pv1 pv2 orc obr obx nte msa err sft spm tq1 ctd fhs bhs bts fts"
_SEGMENT_IDS = frozenset(_SEGMENT_WORDS.split())
_VOCABULARY_WORDS = """
    ack nak aa ae ar ca ce cr hl7 ris his ehr emr pacs lis mllp oru r01 adt orm omi oml
    mrn id ids dob uid uids sex gender accession placer filler visit account encounter
    patient patients order orders study studies series result results report reports
    observation observations procedure procedures exam examination service request
    message messages segment segments field fields component components repetition
    value values type types code codes table data sequence key identifier identifiers
    number name names date dates time birth facility application sending receiving
    control version processing event status provider physician doctor location
    unknown not found no none invalid missing required duplicate unsupported error
    errors warning rejected reject accepted accept failed failure internal record
    locked closed cancelled canceled discontinued complete completed final
    preliminary corrected correction does do did exist exists match matches mismatch
    belongs belong another other already on of for in is are was were be been the a
    an and or to from with by at as this that it its file database busy unavailable
    try again later retry please check contact administrator system server timeout
    length long short too format malformed bad wrong empty blank expected allowed
    permitted denied unauthorized authorized"""
_VOCABULARY = _SEGMENT_IDS | frozenset(_VOCABULARY_WORDS.split())
#: A word: anything between spaces, brackets and sentence punctuation (``<redacted>``
#: splits into its own word and stays).
_WORD = re.compile(r"[^\s,;:()\[\]{}<>\"!?]+")
#: Lower-case words (a pipeline's name has underscores); a date like 01/02/1980 is one
#: word with digits, and goes.
_LOWER_CASE_WORD = re.compile(r"[a-z_]+(?:['-][a-z_]+)*")
#: A field reference (PID-3, OBR-4.1, PID.5.1, ORC-2/3): a segment of
#: :data:`_SEGMENT_IDS`, field and component numbers of at most three digits. Any known
#: word let through "MRN-550902" and "DOB-19490102", another patient's identifiers a RIS
#: quoted in its refusal (acceptance pass).
_FIELD_REFERENCE = re.compile(r"([A-Za-z][A-Za-z0-9]{2})[-.]\d{1,3}(?:[./-]\d{1,3}){0,2}")
#: HL7 terms with digits a receiver quotes back: a message type (ORU^R01, ORU^R01^ORU_R01),
#: a version (2.5.1), a table id (0396, HL70357), radnode's coding system (99RADNODE).
_HL7_TERM = re.compile(
    r"[A-Z]{3}\^[A-Z]\d{2}(?:\^[A-Z]{3}_[A-Z]\d{2})?|\d\.\d(?:\.\d)?|(?:HL7)?0\d{3}|99RADNODE"
)


def _keep_or_redact(match: re.Match[str]) -> str:
    """``match``'s word if :data:`_VOCABULARY` (or its shape) says it names no one."""
    word = match.group(0)
    core = word.strip(".'-")
    if not any(c.isalnum() for c in core) or core == REDACTED.strip("<>"):
        return word
    if _LOWER_CASE_WORD.fullmatch(core) or core.lower() in _VOCABULARY:
        return word
    if core.isdigit() and len(core) <= 3:  # an error code, a field number
        return word
    if _HL7_TERM.fullmatch(core):
        return word
    reference = _FIELD_REFERENCE.fullmatch(core)
    if reference and reference.group(1).lower() in _SEGMENT_IDS:
        return word
    return REDACTED


def _identifiers(message: bytes | None, encoding: str) -> set[str]:
    """The words of :data:`_IDENTIFYING_FIELDS` in ``message``, 2+ characters each."""
    if not message:
        return set()
    raw = message.decode(encoding, errors="replace").replace("\n", "\r").strip("\r")
    try:
        parsed = python_hl7.parse(raw)
    except (KeyError, ValueError, IndexError, python_hl7.ParseException):
        return set()
    found: set[str] = set()
    for name, fields in _IDENTIFYING_FIELDS:
        for segment in _segments(parsed, name):
            for index, leading in fields:
                for repetition in _field(segment, index).split("~"):
                    for component in repetition.split("^")[:leading]:
                        for part in parsed.unescape(component).split():
                            if len(part) >= 2:
                                found.add(part)
                            if len(part) >= 8 and part[:8].isdigit():  # a date, as written too
                                found.update((part[:8], f"{part[:4]}-{part[4:6]}-{part[6:8]}"))
    return found


def _segments(message: python_hl7.Message, name: str) -> list[python_hl7.Segment]:
    try:
        return list(message.segments(name))
    except KeyError:  # python-hl7 raises when there is none
        return []


def _field(segment: python_hl7.Segment, index: int) -> str:
    return str(segment[index]) if len(segment) > index else ""


def _component(segment: python_hl7.Segment, index: int, component: int) -> str:
    """Component ``component`` (1-based) of the first repetition of a field, as text."""
    value = _field(segment, index)
    parts = value.split("~", 1)[0].split("^")
    return parts[component] if len(parts) > component else ""


class Hl7Deliverer:
    """Sends outbox deliveries of kind ``hl7`` to one MLLP destination."""

    def __init__(self, settings: Hl7DestinationSettings, client: MllpClient | None = None):
        self.settings = settings
        self.client = client or MllpClient(
            settings.host,
            settings.port,
            connect_timeout_s=settings.connect_timeout_s,
            ack_timeout_s=settings.ack_timeout_s,
        )

    def deliver(self, item: Delivery) -> DeliveryOutcome:
        if item.payload is None:
            return DeliveryOutcome.rejected("HL7 delivery has no payload")
        try:
            answer = self.client.exchange(item.payload)
            ack = parse_ack(answer, self.settings.encoding)
        except Hl7Error as exc:
            return DeliveryOutcome.retry(str(exc))
        if ack.control_id != item.message_id:
            return DeliveryOutcome.retry("ACK answers another message (MSA-2 != MSH-10)")
        if ack.accepted:
            return DeliveryOutcome.delivered()
        text = without_identifiers(ack.text, item.payload, self.settings.encoding)
        reason = f"{ack.code}: {text or 'no error text'}"
        # HL7 v2.5.1 2.9.2.2: AE, an error in the message; AR, a refusal for reasons
        # unrelated to it (system down). Receivers use the two either way round, so
        # both get the same few tries, then a dead letter the operator can resend.
        return DeliveryOutcome.retry(reason, at_most=self.settings.refused_attempts)
