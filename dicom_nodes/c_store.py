"""C-STORE at close to the speed of the wire: requests sent from files, responses
answered directly.

Why not pynetdicom's ``Association.send_c_store``: per instance it reads the file meta
group again, builds the command as a pydicom Dataset and encodes it twice, and hands
every P-DATA PDU to the DUL thread, which wraps, copies and writes it. Profiled with
py-spy on ``bench/scu.py`` (300 x 512^2 CT into storescp), the command half of that
took about half of the sending thread; with the command cheap, the DUL hand-over and
its copies were the rest (issue 11's note has the figures).

What is done here instead:

* The C-STORE-RQ command set is encoded directly: its seven elements (PS3.7 9.3.1.1),
  Implicit VR Little Endian as PS3.7 6.3.1 requires; ``tests/test_c_store.py`` checks
  it byte for byte against pynetdicom's own encoding.
* The P-DATA-TF PDUs are written on the sending thread, the data set straight from the
  page cache with ``sendfile``, inside
  :meth:`dicom_nodes.reactor.EventDrivenDUL.direct_writes` (the DUL's own writes held
  off meanwhile, data transfer state checked; plain TCP only, as radnode's SCU is).

What stays pynetdicom's: association negotiation, the state machine, reading the
response (the DUL decodes it onto the DIMSE queue), the reactor pause around the
exchanges (:func:`dicom_nodes.reactor.reactor_paused`, taken by the caller once for a
batch), choosing a context a file can be converted to and encoding it
(:mod:`dicom_nodes.scu`), and aborting the association when no valid response comes.

The Storage SCP's side: the C-STORE-RQ command set is decoded here
(:func:`decode_command`, :func:`c_store_rq`) and the C-STORE-RSP encoded here
(:func:`encode_c_store_rsp`, checked byte for byte against pynetdicom) for
:mod:`dicom_nodes.inline_store`, which serves received C-STOREs on the DUL thread; so
are the C-ECHO-RQ and C-ECHO-RSP (:func:`c_echo_rq`, :func:`encode_c_echo_rsp`), which
it answers there too.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pynetdicom.dimse_primitives import C_STORE

#: PS3.8 E.2 message control header: bit 0 command (1) or data set (0), bit 1 last.
_DATA, _COMMAND, _DATA_LAST, _COMMAND_LAST = 0x00, 0x01, 0x02, 0x03
#: PDU type, reserved, PDU length, PDV item length, context ID, control header.
_P_DATA_TF = struct.Struct(">BBIIBB")
#: Linux: hold a PDU header until its value follows (one segment, not two).
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
#: A PDV's item length (4) and presentation context ID (1) and control header (1).
_PDV_OVERHEAD = 6
#: Fragment size when the peer announces no maximum PDU length (0: unlimited).
_UNLIMITED_FRAGMENT = 4 * 1024 * 1024
#: PS3.7 9.3.1 / E.1: C-STORE-RQ and -RSP command fields; "a data set is present" and
#: "no data set" (any value but 0x0101 means present).
_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_C_ECHO_RQ = 0x0030
_C_ECHO_RSP = 0x8030
_DATA_SET_PRESENT = 0x0001
_NO_DATA_SET = 0x0101
#: PS3.7 Annex C: MEDIUM, as DCMTK storescu sends.
PRIORITY_MEDIUM = 0x0000


def _element(element: int, value: bytes) -> bytes:
    """One group 0000 element, Implicit VR Little Endian."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _command_set(*elements: bytes) -> bytes:
    """Elements in tag order behind their Command Group Length (0000,0000)."""
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def encode_c_store_rq(
    sop_class_uid: str, sop_instance_uid: str, message_id: int, priority: int = PRIORITY_MEDIUM
) -> bytes:
    """The command set of a C-STORE-RQ with a data set, as sent on the wire."""
    return _command_set(
        _element(0x0002, _uid(sop_class_uid)),
        _element(0x0100, struct.pack("<H", _C_STORE_RQ)),
        _element(0x0110, struct.pack("<H", message_id)),
        _element(0x0700, struct.pack("<H", priority)),
        _element(0x0800, struct.pack("<H", _DATA_SET_PRESENT)),
        _element(0x1000, _uid(sop_instance_uid)),
    )


def encode_c_store_rsp(
    sop_class_uid: str, sop_instance_uid: str, message_id_being_responded_to: int, status: int
) -> bytes:
    """The command set of a C-STORE-RSP without Error Comment or Offending Element
    (PS3.7 9.3.1.2), as sent on the wire."""
    return _command_set(
        _element(0x0002, _uid(sop_class_uid)),
        _element(0x0100, struct.pack("<H", _C_STORE_RSP)),
        _element(0x0120, struct.pack("<H", message_id_being_responded_to)),
        _element(0x0800, struct.pack("<H", _NO_DATA_SET)),
        _element(0x0900, struct.pack("<H", status)),
        _element(0x1000, _uid(sop_instance_uid)),
    )


def encode_c_echo_rsp(sop_class_uid: str, message_id_being_responded_to: int, status: int) -> bytes:
    """The command set of a C-ECHO-RSP (PS3.7 9.3.5.2), as sent on the wire."""
    return _command_set(
        _element(0x0002, _uid(sop_class_uid)),
        _element(0x0100, struct.pack("<H", _C_ECHO_RSP)),
        _element(0x0120, struct.pack("<H", message_id_being_responded_to)),
        _element(0x0800, struct.pack("<H", _NO_DATA_SET)),
        _element(0x0900, struct.pack("<H", status)),
    )


@dataclass(frozen=True)
class EchoRequest:
    """What a received C-ECHO-RQ asks (PS3.7 9.3.5.1): no data set follows."""

    sop_class_uid: str
    message_id: int


def c_echo_rq(elements: dict[int, bytes]) -> EchoRequest | None:
    """The C-ECHO-RQ these command elements make; None for any other command and for
    a C-ECHO-RQ that announces a data set or lacks its Message ID or SOP Class UID."""
    try:
        (field,) = struct.unpack("<H", elements[0x0100])
        (message_id,) = struct.unpack("<H", elements[0x0110])
        sop_class_uid = elements[0x0002].strip(b"\0 ").decode("ascii")
    except (KeyError, struct.error, UnicodeDecodeError):
        return None
    if field != _C_ECHO_RQ or data_set_follows(elements) is not False or not sop_class_uid:
        return None
    return EchoRequest(sop_class_uid, message_id)


@dataclass(frozen=True)
class StoreRequest:
    """What a received C-STORE-RQ asks (PS3.7 9.3.1.1); its data set follows it."""

    sop_class_uid: str
    sop_instance_uid: str
    message_id: int


def decode_command(command: bytes | memoryview) -> dict[int, bytes] | None:
    """The elements of a command set (Implicit VR Little Endian, PS3.7 6.3.1) by
    element number, or None when it is not well-formed (not group 0000, an element
    running past the end)."""
    elements: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, offset)
        offset += 8
        if group != 0x0000 or offset + length > len(command):
            return None
        elements[element] = bytes(command[offset : offset + length])
        offset += length
    return elements if offset == len(command) else None


def data_set_follows(elements: dict[int, bytes]) -> bool | None:
    """Whether the command announces a data set (Command Data Set Type, PS3.7 E.1);
    None when it does not say."""
    try:
        (data_set_type,) = struct.unpack("<H", elements[0x0800])
    except (KeyError, struct.error):
        return None
    return data_set_type != _NO_DATA_SET


def c_store_rq(elements: dict[int, bytes]) -> StoreRequest | None:
    """The C-STORE-RQ these command elements make; None for any other command and for
    a C-STORE-RQ without a data set, Message ID or UIDs (left to pynetdicom, which
    answers or aborts as it always has)."""
    try:
        (field,) = struct.unpack("<H", elements[0x0100])
        (message_id,) = struct.unpack("<H", elements[0x0110])
        sop_class_uid = elements[0x0002].strip(b"\0 ").decode("ascii")
        sop_instance_uid = elements[0x1000].strip(b"\0 ").decode("ascii")
    except (KeyError, struct.error, UnicodeDecodeError):
        return None
    if field != _C_STORE_RQ or not data_set_follows(elements):
        return None
    if not sop_class_uid or not sop_instance_uid:
        return None
    return StoreRequest(sop_class_uid, sop_instance_uid, message_id)


@dataclass(frozen=True)
class StoreStatus:
    """What the peer answered: its status code and error comment; ``code`` is None
    when no valid response came (DIMSE timeout, abort, malformed response)."""

    code: int | None
    comment: str = ""


def fragment_size(peer_max_pdu: int) -> int:
    """The largest even PDV value that fits the peer's maximum PDU length (PS3.8
    9.3.1). Even: DCMTK and others refuse odd fragments, and a peer may announce an
    odd maximum."""
    if not peer_max_pdu:
        return _UNLIMITED_FRAGMENT
    return max((peer_max_pdu - _PDV_OVERHEAD) & ~1, 2)


def send_file(
    assoc: Any,
    context_id: int,
    path: Path,
    data_set_offset: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    message_id: int,
) -> StoreStatus:
    """Send the data set of ``path`` (from ``data_set_offset``, after its file meta
    group) under ``context_id``, whose transfer syntax is the file's own.

    Call it while the association's reactor is held (:func:`dicom_nodes.reactor.
    reactor_paused`; once for a whole batch: a pause per instance cost the sender 12 %
    in two thread hand-overs). Returns the peer's answer; without a valid one (DIMSE
    timeout, abort, malformed response) the association is aborted, as pynetdicom's
    ``send_c_store`` does. Raises OSError if the file cannot be read or the connection
    fails, and RuntimeError if the association is not in data transfer.
    """
    command = encode_c_store_rq(sop_class_uid, sop_instance_uid, message_id % 65536)
    size = fragment_size(assoc.dimse.maximum_pdu_size)
    with open(path, "rb") as stream:
        length = os.fstat(stream.fileno()).st_size - data_set_offset
        with assoc.dul.direct_writes() as sock:
            write_command(sock, context_id, command, size)
            _write_file(sock, context_id, stream, data_set_offset, length, size)
    return _response(assoc, message_id, sop_instance_uid)


def send_data_set(
    assoc: Any,
    context_id: int,
    data_set: bytes,
    sop_class_uid: str,
    sop_instance_uid: str,
    message_id: int,
) -> StoreStatus:
    """Send ``data_set``, already encoded in the transfer syntax of ``context_id``; as
    :func:`send_file` otherwise (a file converted to a syntax the peer accepted)."""
    command = encode_c_store_rq(sop_class_uid, sop_instance_uid, message_id % 65536)
    size = fragment_size(assoc.dimse.maximum_pdu_size)
    with assoc.dul.direct_writes() as sock:
        write_command(sock, context_id, command, size)
        _write_bytes(sock, context_id, memoryview(data_set), size)
    return _response(assoc, message_id, sop_instance_uid)


def _response(assoc: Any, message_id: int, sop_instance_uid: str) -> StoreStatus:
    """The peer's answer to the request just sent, decoded by pynetdicom's DUL.

    Only a C-STORE-RSP to this very request counts: one that answers another Message
    ID or instance (a peer that answered a request twice) would otherwise be taken as
    this file's answer, and every later answer as the one before's; a file the peer
    refused was counted as stored (found by review). Such a peer is aborted."""
    _, response = assoc.dimse.get_msg(block=True)
    if response is None:
        peer_ended = assoc.acse.is_aborted("a-abort") or assoc.acse.is_aborted("a-p-abort")
        if peer_ended or not assoc.is_established:
            assoc._handle_no_response()
            return StoreStatus(None, "the peer aborted the association (or the connection"
                               " dropped) before it answered")  # fmt: skip
        # Still established: the DIMSE timeout ran out, and radnode aborts. Said as
        # such: "association aborted" sent a PACS administrator looking for an abort in
        # the PACS's own log (acceptance pass).
        assoc._handle_no_response()
        return StoreStatus(
            None,
            f"no C-STORE response within dimse_timeout_s ({assoc.dimse_timeout:g} s);"
            " radnode aborted the association",
        )
    if not response.is_valid_response:
        assoc.abort()
        return StoreStatus(None, "invalid C-STORE response")
    if not _answers(response, message_id, sop_instance_uid):
        assoc.abort()
        return StoreStatus(None, "the peer answered another request (Message ID or instance)")
    return StoreStatus(int(response.Status), str(response.ErrorComment or ""))


def _answers(response: Any, message_id: int, sop_instance_uid: str) -> bool:
    """Whether ``response`` is the C-STORE-RSP to request ``message_id`` for
    ``sop_instance_uid`` (the Affected SOP Instance UID may be absent, PS3.7 9.3.1.2)."""
    answered_uid = getattr(response, "AffectedSOPInstanceUID", None)
    return (
        isinstance(response, C_STORE)
        and response.MessageIDBeingRespondedTo == message_id % 65536
        and (not answered_uid or str(answered_uid) == sop_instance_uid)
    )


def _pdu_header(context_id: int, control: int, value_length: int) -> bytes:
    """A P-DATA-TF PDU with one PDV (PS3.8 9.3.5, E.2), up to the PDV's value."""
    return _P_DATA_TF.pack(
        0x04, 0, value_length + _PDV_OVERHEAD, value_length + 2, context_id, control
    )


def _write_file(
    sock: socket.socket, context_id: int, stream: BinaryIO, offset: int, length: int, size: int
) -> None:
    """Write the data set as P-DATA-TF PDUs straight from the page cache (``sendfile``):
    no copy in Python and no hand-over to the DUL thread, which was where the sender
    spent its time once the command was cheap."""
    while True:
        count = min(size, length)
        last = count == length
        sock.sendall(_pdu_header(context_id, _DATA_LAST if last else _DATA, count), _MSG_MORE)
        _sendfile(sock, stream, offset, count)
        if last:
            return
        offset += count
        length -= count


def _sendfile(sock: socket.socket, stream: BinaryIO, offset: int, count: int) -> None:
    """``os.sendfile`` until ``count`` bytes are out. Not ``socket.sendfile``: on a
    blocking socket that waits for writability without a limit, so a peer that stopped
    reading held the sender forever; here the socket's send timeout (SO_SNDTIMEO, set
    by the SCU from its network timeout) ends each call, and a file that turns out
    shorter than its size raises instead of leaving the PDU short."""
    while count:
        sent = os.sendfile(sock.fileno(), stream.fileno(), offset, count)
        if not sent:
            raise OSError("the file ended before its size: it changed while being sent")
        offset += sent
        count -= sent


def _write_bytes(sock: socket.socket, context_id: int, data: memoryview, size: int) -> None:
    """Write an encoded data set as P-DATA-TF PDUs of at most ``size`` value bytes."""
    start = 0
    while True:
        piece = data[start : start + size]
        last = start + size >= len(data)
        sock.sendall(_pdu_header(context_id, _DATA_LAST if last else _DATA, len(piece)), _MSG_MORE)
        sock.sendall(piece)
        if last:
            return
        start += size


def write_command(sock: socket.socket, context_id: int, command: bytes, size: int) -> None:
    """Write a command set as P-DATA-TF PDUs of at most ``size`` value bytes each."""
    for start in range(0, len(command), size):
        piece = command[start : start + size]
        control = _COMMAND_LAST if start + size >= len(command) else _COMMAND
        sock.sendall(_pdu_header(context_id, control, len(piece)) + piece)
