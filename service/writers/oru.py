"""HL7 v2.5.1 ORU^R01: the text result of one pipeline run, for the RIS/EHR.

The PACS gets the DICOM objects; the RIS/EHR gets this message, tied to the order by the
Accession Number, so the result shows up in the patient's record next to the report
work list. docs/hl7.md is the message profile; in short::

    MSH  radnode -> receiver (per destination), ORU^R01^ORU_R01, 2.5.1, MSH-10 control id
    PID  PatientID/Issuer (PID-3), PatientName (PID-5), BirthDate (PID-7), Sex (PID-8)
    ORC  RE, Accession Number as placer and/or filler order number
    OBR  same order numbers, OBR-4 the pipeline (or the procedure: a destination
         setting), OBR-7 study date/time, OBR-25 F, OBR-44 the requested procedure
         (C, with OBX-11 C, for a result that replaces one sent for the same series;
         P for a preliminary result, made while an instance of the study was lost in
         transit, and F for the final result that replaces it)
    OBX  TX  summary: which algorithm (name, version) made it; not a diagnosis on its own
    OBX  CWE the finding: Present/Absent, or finding site (SCT 363698007)  } a pair per label,
    OBX  NM  probability in % (DCM 122157) or volume in mL (SCT)    } sharing OBX-4
             (a classification's pair: OBX-8 A at or above the SR's Present threshold, else N)
    OBX  ST  Study Instance UID (DCM 110180), Series Instance UID (DCM 112002)

The message is built and checked with hl7apy under STRICT validation, so a message the
receiver would reject for its structure never reaches the outbox.

Text from DICOM is escaped here (:func:`escape`) before hl7apy sees it: ``\\`` -> ``\\E\\``,
``|`` -> ``\\F\\``, ``^`` -> ``\\S\\``, ``&`` -> ``\\T\\``, ``~`` -> ``\\R\\``; control characters
become spaces. hl7apy's own escaping misses a literal backslash that happens to look like
an escape sequence (``a\\F\\b``) and leaves an escaped value unchanged, so escaping first
is both correct and safe. Identifiers (patient ID, issuer, accession) are never
truncated: one that does not fit its HL7 field stops the build (:class:`Hl7Error`).
Descriptive text that does not fit is shortened.
"""

from __future__ import annotations

import hashlib
import re
import textwrap
import unicodedata
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Group, Message, Segment
from hl7apy.exceptions import HL7apyException
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from service.delivery import Delivery, Outbox
from service.hl7 import Hl7DestinationSettings, Hl7Error
from service.pipeline.result import CodedConcept, PipelineResult, TaskKind
from service.writers.provenance import RADNODE_CODING_SCHEME, Provenance, label_finding

HL7_VERSION = "2.5.1"
_STRICT = VALIDATION_LEVEL.STRICT

#: Observation identifiers (OBX-3). DICOM codes where DICOM has one, so the HL7 result
#: and the SR (TID 1500) say the same thing in the same words.
SUMMARY = CodedConcept("121111", "DCM", "Summary")
#: A classification's answer (OBX-5 of its finding), the SR's qualitative evaluation
#: values: with the finding as OBX-3, a RIS that lists "identifier: value" shows
#: "Solitary nodule of lung: Absent", where the finding as the value read as a positive
#: result on a normal chest (acceptance pass).
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
FINDING_SITE = CodedConcept("363698007", "SCT", "Finding Site")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
VOLUME = CodedConcept("118565006", "SCT", "Volume")
STUDY_INSTANCE_UID = CodedConcept("110180", "DCM", "Study Instance UID")
SERIES_INSTANCE_UID = CodedConcept("112002", "DCM", "Series Instance UID")

#: Units (OBX-6), UCUM. Probabilities are sent in percent with one decimal: a RIS shows
#: OBX-5 and OBX-6 side by side, and "87.3 %" is read right where "0.873 1" is not.
PERCENT = CodedConcept("%", "UCUM", "percent")
MILLILITRE = CodedConcept("mL", "UCUM", "milliliter")

#: DICOM coding scheme designators whose HL7 coding system name (table 0396) differs.
_CODING_SYSTEMS = {"SRT": "SCT", "SNM3": "SNM3", "LN": "LN", "UCUM": "UCUM"}

_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}
_ST_MAX = 199  # ST and CE/CWE text components
_IS_MAX = 20  # IS (namespace ids)
_SUMMARY_WIDTH = 80  # characters per TX line, as a RIS shows them

_SEX = {"M": "M", "F": "F", "O": "O"}
_DICOM_TIME = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?")


@dataclass(frozen=True)
class OruMessage:
    """A built ORU^R01: its control id (MSH-10) and its bytes, ready to frame."""

    control_id: str
    er7: str
    encoding: str

    def to_bytes(self) -> bytes:
        return self.encoded()[0]

    def encoded(self) -> tuple[bytes, int]:
        """The message in its character set, and how many characters it cannot hold.

        A character outside the set (a Polish "Ł" in 8859/1) is written as its base
        letter where it has one ("Ł" -> "L", "ą" -> "a"), else as "?". Why: it was
        "?" in every case and nothing said so (acceptance pass); the caller logs the
        count, and the fix is UTF-8 on the destination.
        """
        replaced = 0
        out = []
        for char in self.er7:
            try:
                out.append(char.encode(self.encoding))
            except UnicodeEncodeError:
                replaced += 1
                out.append(_transliterated(char).encode(self.encoding, errors="replace"))
        return b"".join(out), replaced


#: Letters that Unicode does not decompose into a base letter and a mark, and
#: typographic punctuation.
_BASE_LETTERS = str.maketrans(
    {"Ł": "L", "ł": "l", "Đ": "D", "đ": "d", "Ø": "O", "ø": "o", "Ħ": "H", "ħ": "h", "ı": "i",
     "Œ": "OE", "œ": "oe", "–": "-", "—": "-", "‘": "'", "’": "'", "‚": "'", "“": '"',
     "”": '"', "„": '"', "‹": "<", "›": ">", "…": "..."}
)  # fmt: skip


def _transliterated(char: str) -> str:
    base = unicodedata.normalize("NFKD", char.translate(_BASE_LETTERS))
    return "".join(c for c in base if not unicodedata.combining(c)) or "?"


def escape(text: str) -> str:
    """Escape HL7 delimiters in ``text`` (HL7 v2 2.7.4); control characters become spaces."""
    return "".join(_escape_char(c) for c in text)


def _escape_char(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    return " " if ord(char) < 32 or ord(char) == 127 else char


def _fit(text: str, limit: int = _ST_MAX) -> str:
    """Escaped ``text``, shortened to ``limit`` characters without splitting an escape."""
    out, length = [], 0
    for char in text:
        piece = _escape_char(char)
        if length + len(piece) > limit:
            break
        out.append(piece)
        length += len(piece)
    return "".join(out).strip()


def _ident(text: str, limit: int, what: str) -> str:
    """Escaped identifier; one that does not fit is an error, never truncated."""
    escaped = escape(text.strip())
    if len(escaped) > limit:
        raise Hl7Error(f"{what} does not fit its HL7 field ({limit} characters)")
    return escaped


def control_id_for(job_id: str, destination: str) -> str:
    """The MSH-10 of the result of ``job_id`` for ``destination``: unique per message,
    and the same when a job runs again, so the outbox sends it only once."""
    return hashlib.sha256(f"{job_id}\0{destination}".encode()).hexdigest()[:20]


def coding_system(scheme: str) -> str:
    """HL7 coding system (table 0396) for a DICOM coding scheme designator."""
    return _CODING_SYSTEMS.get(scheme, scheme)


def _coded(concept: CodedConcept | None, text: str = "") -> str:
    """ER7 of a CE/CWE: identifier^text^coding system (text only without a code)."""
    if concept is None:
        return "^" + _fit(text)
    return "^".join(
        (_fit(concept.value), _fit(concept.meaning), _fit(coding_system(concept.scheme)))
    )


def _text(ds: Dataset, keyword: str) -> str:
    """A DICOM text value as one string (a multi-valued one joined back with ``\\``)."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _hl7_now(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def _dicom_datetime(ds: Dataset, date_kw: str, time_kw: str) -> str:
    """HL7 TS from a DICOM DA and TM (and TimezoneOffsetFromUTC); '' if the date is bad."""
    date = _text(ds, date_kw)
    if not re.fullmatch(r"\d{8}", date):
        return ""
    result = date
    match = _DICOM_TIME.fullmatch(_text(ds, time_kw).replace(":", ""))
    if match:
        hours, minutes, seconds, fraction = match.groups()
        result += hours + (minutes or "") + (seconds or "")
        if seconds and fraction:
            result += "." + fraction[:4]
        offset = _text(ds, "TimezoneOffsetFromUTC")
        if re.fullmatch(r"[+-]\d{4}", offset):
            result += offset
    return result


def _set(element: Segment | Group, path: str, er7: str) -> None:
    """Set ``path`` (e.g. ``pid_5.xpn_1.fn_1``) to already escaped ER7, if not empty."""
    if not er7:
        return
    *parents, leaf = path.split(".")
    for name in parents:
        element = getattr(element, name)
    setattr(element, leaf, er7)


def build_oru(
    result: PipelineResult,
    source: Dataset,
    spacing_mm: tuple[float, float, float],
    destination: Hl7DestinationSettings,
    *,
    control_id: str | None = None,
    now: datetime | None = None,
    correction: bool = False,
    preliminary: bool = False,
    after_preliminary: bool = False,
) -> OruMessage:
    """Build the ORU^R01 for ``result``, computed from the series ``source`` belongs to.

    ``source`` is the header of any instance of the source series (patient, study and
    order attributes are read from it); ``spacing_mm`` the voxel spacing (x, y, z) of
    the volume, for segment volumes. ``control_id`` defaults to a random one; pass
    :func:`control_id_for` to make re-runs idempotent. ``correction``: the result
    replaces one already reported for this order (the series grew after its first
    result), so its result status is C, "correction" (OBR-25, table 0123; OBX-11, table
    0085), not F. ``preliminary``: an instance of the study was lost in transit (see
    :attr:`~service.records.JobTicket.preliminary`), so the status is P and the summary
    says why; ``after_preliminary``: the result it replaces was preliminary, so this
    one is the final result (F), not a correction of a final one. Raises
    :class:`Hl7Error` (which never quotes patient data) if the message cannot be built.
    """
    now = now or datetime.now(UTC)
    status = result_status(
        correction=correction,
        preliminary=preliminary,
        after_preliminary=after_preliminary,
        always_preliminary=destination.result_status == "preliminary",
    )
    control_id = control_id or uuid.uuid4().hex[:20]
    try:
        message = Message("ORU_R01", version=HL7_VERSION, validation_level=_STRICT)
        _msh(message.msh, destination, control_id, now)
        patient_result = message.add_group("ORU_R01_PATIENT_RESULT")
        _pid(
            patient_result.add_group("ORU_R01_PATIENT").add_segment("PID"),
            source,
            with_issuer=destination.issuers == "send",
        )
        order = patient_result.add_group("ORU_R01_ORDER_OBSERVATION")
        _order(order, source, destination, now, status, result)
        observed_at = _hl7_now(now)
        method = _fit(f"{result.bundle.name} {result.bundle.version}")
        for set_id, (value_type, ident, sub_id, value, units, flag) in enumerate(
            _observations(result, source, spacing_mm, revised=correction, preliminary=preliminary),
            start=1,
        ):
            obx = order.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
            obx.obx_1 = str(set_id)
            obx.obx_2 = value_type
            obx.obx_3 = ident
            _set(obx, "obx_4", sub_id)
            obx.obx_5 = value
            _set(obx, "obx_6", units)
            _set(obx, "obx_8", flag)
            obx.obx_11 = status
            obx.obx_14 = observed_at
            obx.obx_17 = "^" + method
        message.validate()
        # Every segment ends with a carriage return, the last one too (HL7 v2.5.1
        # 2.5.4); hl7apy joins segments with it but does not end the last (review).
        er7 = message.to_er7() + "\r"
    except HL7apyException as exc:
        # hl7apy quotes the offending value in its messages: keep it (PHI) out of ours.
        raise Hl7Error(f"cannot build ORU^R01: {type(exc).__name__}") from None
    return OruMessage(control_id=control_id, er7=er7, encoding=destination.encoding)


def _msh(msh: Segment, dest: Hl7DestinationSettings, control_id: str, now: datetime) -> None:
    _set(msh, "msh_3.hd_1", escape(dest.sending_application))
    _set(msh, "msh_4.hd_1", escape(dest.sending_facility))
    _set(msh, "msh_5.hd_1", escape(dest.receiving_application))
    _set(msh, "msh_6.hd_1", escape(dest.receiving_facility))
    msh.msh_7 = _hl7_now(now)
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = _ident(control_id, 20, "message control id")
    msh.msh_11 = dest.processing_id
    msh.msh_12 = HL7_VERSION
    msh.msh_18 = dest.character_set


def _pid(pid: Segment, ds: Dataset, *, with_issuer: bool = True) -> None:
    pid.pid_1 = "1"
    patient_id = _text(ds, "PatientID")
    if not patient_id:
        raise Hl7Error("source instance has no PatientID (PID-3 is required)")
    _set(pid, "pid_3.cx_1", _ident(patient_id, _ST_MAX, "PatientID"))
    if with_issuer:
        _patient_id_issuer(pid, ds)
    _person_name(pid, ds.get("PatientName"))
    birth_date = _text(ds, "PatientBirthDate")
    if re.fullmatch(r"\d{8}", birth_date):
        pid.pid_7 = birth_date
    sex = _text(ds, "PatientSex").upper()
    if sex:
        pid.pid_8 = _SEX.get(sex, "U")


def _patient_id_issuer(pid: Segment, ds: Dataset) -> None:
    """PID-3.4 (HD) and PID-3.5 from the header's issuer attributes."""
    qualifiers = ds.get("IssuerOfPatientIDQualifiersSequence")
    item = qualifiers[0] if qualifiers else Dataset()
    namespace, universal, universal_type = _authority(
        _text(ds, "IssuerOfPatientID"),
        _text(item, "UniversalEntityID"),
        _text(item, "UniversalEntityIDType"),
        "IssuerOfPatientID",
        'set issuers = "leave_out" on the destination if the RIS knows one patient-ID'
        " domain only, or have the PACS send a Universal Entity ID",
    )
    _set(pid, "pid_3.cx_4.hd_1", namespace)
    _set(pid, "pid_3.cx_4.hd_2", universal)
    _set(pid, "pid_3.cx_4.hd_3", universal_type)
    _set(pid, "pid_3.cx_5", escape(_text(item, "IdentifierTypeCode")))


#: An ISO object identifier (what IHE PIX domains use as patient ID issuers).
_OID = re.compile(r"[0-2](?:\.(?:0|[1-9]\d*))+")


def _authority(
    namespace: str, universal: str, universal_type: str, what: str, advice: str
) -> tuple[str, ...]:
    """HD.1-3 (EI.2-4) of an assigning authority, escaped: the local namespace, the
    universal ID and its type.

    A namespace longer than its 20 characters (IS) cannot be HD.1, and an identifier is
    never shortened. Where it is an OID, as IHE PIX issuers often are, it is the
    universal ID, of type ISO; where the header gives a universal ID as well, that names
    the authority and the long name is left out. Otherwise :class:`Hl7Error` that ends
    in ``advice``: the acceptance pass had every study of an OID-issuer site go without
    its ORU.
    """
    namespace, universal = namespace.strip(), universal.strip()
    if len(escape(namespace)) > _IS_MAX:
        if not universal and _OID.fullmatch(namespace):
            namespace, universal, universal_type = "", namespace, "ISO"
        elif universal:
            namespace = ""
        else:
            raise Hl7Error(
                f"{what} does not fit HL7 HD.1 ({_IS_MAX} characters) and is no OID; {advice}"
            )
    return (
        _ident(namespace, _IS_MAX, what),
        _ident(universal, _ST_MAX, f"{what} universal ID"),
        escape(universal_type.strip()),
    )


def _person_name(pid: Segment, value: object) -> None:
    """DICOM PN family^given^middle^prefix^suffix -> XPN 1.1, 2, 3, 5, 4: the
    alphabetic group, or the first group that has a name. A Japanese, Chinese or Korean
    name may come with its ideographic (or phonetic) group only ("=山田^太郎"): it was
    sent as an unnamed patient (conformance audit)."""
    if isinstance(value, MultiValue):
        value = value[0] if value else None
    name = value if isinstance(value, PersonName) else PersonName(str(value or ""))
    if not name.alphabetic.strip("^ "):
        written = next((g for g in (name.ideographic, name.phonetic) if g.strip("^ ")), "")
        name = PersonName(written)
    parts = (name.family_name, name.given_name, name.middle_name, name.name_suffix)
    if not any(p.strip() for p in (*parts, name.name_prefix)):
        # PID-5 is required, and "" would tell the receiver to delete the name it has:
        # an unnamed patient is sent as name type U (unspecified, HL7 table 0200).
        pid.pid_5.xpn_7 = "U"
        return
    _set(pid, "pid_5.xpn_1.fn_1", _fit(name.family_name))
    _set(pid, "pid_5.xpn_2", _fit(name.given_name))
    _set(pid, "pid_5.xpn_3", _fit(name.middle_name))
    _set(pid, "pid_5.xpn_4", _fit(name.name_suffix))
    _set(pid, "pid_5.xpn_5", _fit(name.name_prefix))


def _order(
    order: Group,
    ds: Dataset,
    dest: Hl7DestinationSettings,
    now: datetime,
    status: str,
    result: PipelineResult,
) -> None:
    number = _order_number(ds, with_issuer=dest.issuers == "send")
    placer = number if dest.order_number_field in ("placer", "both") else ""
    filler = number if dest.order_number_field in ("filler", "both") else ""
    orc = order.add_segment("ORC")
    orc.orc_1 = "RE"
    _set(orc, "orc_2", placer)
    _set(orc, "orc_3", filler)
    orc.orc_9 = _hl7_now(now)
    obr = order.add_segment("OBR")
    obr.obr_1 = "1"
    _set(obr, "obr_2", placer)
    _set(obr, "obr_3", filler)
    procedure = _requested_procedure(ds)
    if dest.universal_service_id == "algorithm":
        obr.obr_4 = _algorithm_service_id(result)
    else:
        obr.obr_4 = procedure or _study_service_id(ds)
    _set(obr, "obr_7", _dicom_datetime(ds, "StudyDate", "StudyTime"))
    obr.obr_22 = _hl7_now(now)
    obr.obr_24 = "RAD"
    obr.obr_25 = status
    if procedure and dest.universal_service_id == "algorithm":
        obr.obr_44 = procedure


def _order_number(ds: Dataset, *, with_issuer: bool = True) -> str:
    """EI ER7 of the Accession Number, with its issuer where the header names one (and
    ``with_issuer``)."""
    accession = _text(ds, "AccessionNumber")
    if not accession:
        return ""
    parts = [_ident(accession, _ST_MAX, "AccessionNumber")]
    issuers = ds.get("IssuerOfAccessionNumberSequence") if with_issuer else None
    if issuers:
        item = issuers[0]
        parts += _authority(
            _text(item, "LocalNamespaceEntityID"),
            _text(item, "UniversalEntityID"),
            _text(item, "UniversalEntityIDType"),
            "Issuer of Accession Number",
            'set issuers = "leave_out" on the destination if the RIS knows one order-number'
            " domain only, or have the PACS send a Universal Entity ID",
        )
    return "^".join(parts).rstrip("^")


def _algorithm_service_id(result: PipelineResult) -> str:
    """OBR-4 naming the pipeline: ``<code>^AI <kind>: <name> <version>^99RADNODE``, the
    code :func:`algorithm_code` of the bundle name.

    Why: with the ordered procedure in OBR-4, the results of two pipelines on one study
    (segmentation and denoising) were two final results of one service under one
    order, and a RIS that files by order and service kept only the last (acceptance
    pass). The bundle name is stable across versions, so a RIS can map it to a service.
    """
    bundle = result.bundle
    text = f"AI {bundle.kind.value}: {bundle.name} {bundle.version}"
    return _coded(CodedConcept(algorithm_code(bundle.name), RADNODE_CODING_SCHEME, text))


#: CE/CWE.1 (the identifier) holds at most 20 characters in HL7 v2.5.1.
_CODE_MAX = 20


def algorithm_code(name: str) -> str:
    """The OBR-4 identifier of pipeline ``name``: the name itself when it fits the 20
    characters of CWE.1, else its first 15 and 4 hex digits of its hash
    (``ct_abdomen_segmentation`` -> ``ct_abdomen_segm-8c6b``): stable, distinct, and
    within what a receiver takes (review); the text component names it whole."""
    if len(name) <= _CODE_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:4]
    return f"{name[: _CODE_MAX - 5]}-{digest}"


def _requested_procedure(ds: Dataset) -> str:
    """CE of the requested (or performed) procedure code; "" when the header has none."""
    for keyword in ("RequestedProcedureCodeSequence", "ProcedureCodeSequence"):
        items = ds.get(keyword)
        if items:
            item = items[0]
            value = (
                _text(item, "CodeValue")
                or _text(item, "LongCodeValue")
                or _text(item, "URNCodeValue")
            )
            if value:
                scheme = _text(item, "CodingSchemeDesignator")
                return _coded(CodedConcept(value, scheme, _text(item, "CodeMeaning")))
    return ""


def _study_service_id(ds: Dataset) -> str:
    """OBR-4 text without a procedure code: the study description, else the modality."""
    description = _text(ds, "StudyDescription")
    modality = _text(ds, "Modality")
    return _coded(None, description or (f"{modality} study" if modality else "Imaging study"))


#: value type, OBX-3, OBX-4, OBX-5, OBX-6, OBX-8 (abnormal flag, table 0078)
Observation = tuple[str, str, str, str, str, str]


def _observations(
    result: PipelineResult,
    ds: Dataset,
    spacing_mm: tuple[float, float, float],
    *,
    revised: bool = False,
    preliminary: bool = False,
) -> Iterable[Observation]:
    findings = list(_finding_lines(result, spacing_mm, revised=revised, preliminary=preliminary))
    for line in _summary_lines(result, ds, [text for text, _ in findings], preliminary):
        yield "TX", _coded(SUMMARY), "", line, "", ""
    for sub_id, (_, observations) in enumerate(findings, start=1):
        for value_type, ident, value, units, flag in observations:
            yield value_type, ident, str(sub_id), value, units, flag
    yield "ST", _coded(STUDY_INSTANCE_UID), "", _fit(_text(ds, "StudyInstanceUID")), "", ""
    yield "ST", _coded(SERIES_INSTANCE_UID), "", _fit(_text(ds, "SeriesInstanceUID")), "", ""


def _finding_lines(
    result: PipelineResult,
    spacing_mm: tuple[float, float, float],
    *,
    revised: bool = False,
    preliminary: bool = False,
) -> Iterable[tuple[str, list[tuple[str, str, str, str, str]]]]:
    """Per label: a summary sentence and its OBX pair (coded concept, measurement).

    A classification's finding says present or absent, as the SR does
    (:meth:`~service.pipeline.result.PipelineResult.findings_present`), in the sentence;
    both OBX carry the abnormal flag (A / N): a finding present, or a normal class
    absent, is abnormal. A RIS that lists coded findings showed "Solitary nodule of
    lung" on a normal chest, the 0.2 % beside it the only hint, and a "Normal" class
    present was flagged abnormal (acceptance passes).
    """
    if result.kind is TaskKind.CLASSIFICATION and result.probabilities is not None:
        for label, probability, present, abnormal in zip(
            result.labels,
            result.probabilities,
            result.findings_present(),
            result.findings_abnormal(),
            strict=True,
        ):
            percent = min(100.0, max(0.0, probability * 100.0))
            flag = "A" if abnormal else "N"
            answer = _coded(PRESENT if present else ABSENT)
            yield (
                f"{label.name}: {'present' if present else 'absent'}"
                f" (probability {percent:.1f} %).",
                [
                    ("CWE", _coded(label_finding(label)), answer, "", flag),
                    ("NM", _coded(PROBABILITY), f"{percent:.1f}", _coded(PERCENT), flag),
                ],
            )
    elif result.kind is TaskKind.RECONSTRUCTION and result.image is not None:
        # what the RIS reader should open; the summary named no series (acceptance pass)
        # named as the DICOM writer names it: a revision's number and description
        images = result.image.shape[0]
        provenance = Provenance.of(
            result.bundle, "", revised_from=images if revised else 0, preliminary=preliminary
        )
        yield (
            f"Derived image series {provenance.series_number('DERIVED')} "
            f'"{provenance.series_description("DERIVED")}" ({result.image.shape[0]} images)'
            " in this study.",
            [],
        )
    elif result.kind is TaskKind.SEGMENTATION and result.label_map is not None:
        volumes = result.segment_volumes_ml(spacing_mm)
        for label in result.labels:
            volume = volumes.get(label.value, 0.0)
            yield (
                f"{label.name}: volume {volume:.2f} mL.",
                [
                    ("CWE", _coded(FINDING_SITE), _coded(label_finding(label)), "", ""),
                    ("NM", _coded(VOLUME), f"{volume:.2f}", _coded(MILLILITRE), ""),
                ],
            )


def result_status(
    *,
    correction: bool,
    preliminary: bool,
    after_preliminary: bool,
    always_preliminary: bool = False,
) -> str:
    """OBR-25 / OBX-11 (HL7 tables 0123 and 0085): C for a result that replaces a final
    one, even a preliminary result (P after F would take a final result back, which a
    RIS may refuse or file over the final one: review); else P while the study lacks an
    instance lost in transit; else F, the final result that follows a preliminary one
    included (P then F is how a result becomes final; C would say a final one was
    wrong). ``always_preliminary`` (the destination's ``result_status``): P whatever."""
    if always_preliminary:
        return "P"
    if correction and not after_preliminary:
        return "C"
    return "P" if preliminary else "F"


#: The summary's sentence for a preliminary result (see :func:`result_status`).
PRELIMINARY_NOTE = (
    "PRELIMINARY: an image of this study was lost in transit (the PACS's association"
    " ended while sending it), so this result may cover only part of the series. A final"
    " result follows when the PACS sends the study again."
)


def _summary_lines(
    result: PipelineResult, ds: Dataset, findings: list[str], preliminary: bool = False
) -> list[str]:
    """The TX summary as escaped lines, each within one OBX-5 (ST/TX limit)."""
    bundle = result.bundle
    series = _text(ds, "SeriesDescription")
    number = _text(ds, "SeriesNumber")
    source = f"series {number} " if number else "series "
    source += f'"{series}"' if series else "(no description)"
    # Short paragraphs, one fact each: wrapped at 80, the sentence naming the algorithm
    # left "(classification)" alone on a line (session 17's radiologist pass).
    paragraphs = [
        f"AI {bundle.kind.value}: {bundle.name} version {bundle.version}.",
        f"Run by radnode on {source}.",
        *([PRELIMINARY_NOTE] if preliminary else []),
        *findings,
        "This result was produced by an algorithm and is not a diagnosis on its own; "
        "it must be reviewed by a qualified physician together with the images.",
    ]
    lines: list[str] = []
    for paragraph in paragraphs:
        for line in textwrap.wrap(paragraph, _SUMMARY_WIDTH):
            if len(escape(line)) <= _ST_MAX:
                lines.append(escape(line))
            else:  # full of delimiters: at most 3 characters each once escaped
                lines.extend(escape(p) for p in textwrap.wrap(line, _ST_MAX // 3))
    return lines


def enqueue_oru(
    outbox: Outbox,
    *,
    job_id: str,
    result: PipelineResult,
    source: Dataset,
    spacing_mm: tuple[float, float, float],
    destination: Hl7DestinationSettings,
) -> Delivery:
    """Build the ORU^R01 of a finished job and put it in the outbox for ``destination``.

    Idempotent per (job, destination): the control id is :func:`control_id_for`, and the
    outbox keeps the first message enqueued under it.
    """
    message = build_oru(
        result,
        source,
        spacing_mm,
        destination,
        control_id=control_id_for(job_id, destination.name),
    )
    return outbox.enqueue(
        job_id=job_id,
        destination=destination.name,
        kind="hl7",
        message_id=message.control_id,
        payload=message.to_bytes(),
    )
