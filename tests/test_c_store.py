"""The Storage SCU's own C-STORE path (dicom_nodes.c_store) against pynetdicom and storescp.

* The command set is byte for byte what pynetdicom encodes for the same request, and
  so is the Storage SCP's directly written response.
* DCMTK storescu reads the SCP's direct responses, failure statuses included.
* Files go through real DCMTK storescp at several maximum PDU lengths, including one so
  small that the command itself is fragmented, and storescp stores exactly the data set
  that was sent (every element, pixel data byte for byte): the PDU framing is right.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from io import BytesIO

import numpy as np
import pydicom
import pytest
from pynetdicom.dimse_messages import C_ECHO_RQ, C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode

from dicom_nodes.c_store import (
    PRIORITY_MEDIUM,
    EchoRequest,
    StoreRequest,
    c_echo_rq,
    c_store_rq,
    decode_command,
    encode_c_echo_rsp,
    encode_c_store_rq,
    encode_c_store_rsp,
    fragment_size,
)
from dicom_nodes.policy import AssociationPolicy
from dicom_nodes.scp import StorageSCP
from dicom_nodes.scu import FileState, StorageDestination, send_files
from service.testing import write_ct_series
from tests.conftest import dcmtk_env, free_port, require_tool, wait_for_port


def _pynetdicom_command(sop_class: str, sop_instance: str, message_id: int) -> bytes:
    request = C_STORE()
    request.MessageID = message_id
    request.Priority = PRIORITY_MEDIUM
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    request.DataSet = BytesIO(b"\x00")  # any data set: "present" in the command
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return encode(message.command_set, True, True)


@pytest.mark.parametrize(
    ("sop_instance", "message_id"),
    [
        ("1.2.3.4.55", 1),  # even length
        ("1.2.3.4.555", 65535),  # odd length: padded with NUL, largest message ID
        ("2.25.123456789012345678901234567890123456789", 0),
    ],
)
def test_command_set_is_what_pynetdicom_encodes(sop_instance, message_id):
    sop_class = "1.2.840.10008.5.1.4.1.1.2"
    ours = encode_c_store_rq(sop_class, sop_instance, message_id)
    assert ours == _pynetdicom_command(sop_class, sop_instance, message_id)


def _pynetdicom_response(
    sop_class: str, sop_instance: str, message_id: int, status: int, **optional: str
) -> C_STORE:
    response = C_STORE()
    response.MessageIDBeingRespondedTo = message_id
    response.AffectedSOPClassUID = sop_class
    response.AffectedSOPInstanceUID = sop_instance
    response.Status = status
    for keyword, value in optional.items():
        setattr(response, keyword, value)
    return response


@pytest.mark.parametrize(
    ("sop_instance", "message_id", "status"),
    [
        ("1.2.3.4.55", 1, 0x0000),
        ("1.2.3.4.555", 65535, 0xA700),  # odd length UID
        ("2.25.123456789012345678901234567890123456789", 0, 0xC000),
        ("1.2.3", 7, 0xB007),
    ],
)
def test_response_command_set_is_what_pynetdicom_encodes(sop_instance, message_id, status):
    sop_class = "1.2.840.10008.5.1.4.1.1.2"
    message = C_STORE_RSP()
    message.primitive_to_message(_pynetdicom_response(sop_class, sop_instance, message_id, status))
    expected = encode(message.command_set, True, True)
    assert encode_c_store_rsp(sop_class, sop_instance, message_id, status) == expected


class _FixedStatus:
    def __init__(self, status: int) -> None:
        self.status = status
        self.instances: list[str] = []

    def store(self, instance):
        self.instances.append(instance.sop_instance_uid)
        return self.status


@pytest.mark.integration
@pytest.mark.parametrize(
    ("status", "storescu_says"),
    [(0x0000, "Success"), (0xA700, "Refused: OutOfResources"), (0xC000, "Error")],
)
def test_storescu_reads_the_scps_direct_responses(tmp_path, status, storescu_says):
    files = write_ct_series(tmp_path / "ct", slices=2, rows=32, columns=32)
    receiver = _FixedStatus(status)
    scp = StorageSCP(AssociationPolicy(ae_title="RADNODE"), receiver, host="127.0.0.1", port=0)
    scp.start()
    try:
        sent = subprocess.run(
            [
                *(require_tool("storescu"), "-v", "--no-halt", "-aec", "RADNODE"),
                *("127.0.0.1", str(scp.port), *map(str, files)),
            ],
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        scp.stop()
    responses = [ln for ln in sent.stderr.splitlines() if "Received Store Response" in ln]
    assert len(responses) == len(files) == len(receiver.instances)
    assert all(f"({storescu_says}" in line for line in responses), sent.stderr


def test_fragments_fit_the_peers_maximum_pdu():
    assert fragment_size(16384) == 16384 - 6  # PDV item length (4), context ID, header
    assert fragment_size(0) > 1024 * 1024  # 0: the peer set no limit


@pytest.mark.integration
@pytest.mark.parametrize("peer_max_pdu", [4096, 16384, 131072])
def test_storescp_stores_exactly_what_was_sent(tmp_path, peer_max_pdu):
    files = write_ct_series(tmp_path / "ct", slices=3, rows=96, columns=80)
    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    peer = subprocess.Popen(
        [
            require_tool("storescp"),
            *("-pdu", str(peer_max_pdu), "-aet", "STORESCP", "-od", str(received)),
            str(port),
        ],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=peer)
        report = send_files(StorageDestination("127.0.0.1", port, "STORESCP"), files)
    finally:
        peer.terminate()
        peer.wait(10)
    assert [o.state for o in report.outcomes] == [FileState.SUCCESS] * len(files)
    stored = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, received.iterdir())}
    assert len(stored) == len(files)
    for path in files:
        sent = pydicom.dcmread(path)
        got = stored[sent.SOPInstanceUID]
        assert got.PixelData == sent.PixelData
        assert np.array_equal(got.pixel_array, sent.pixel_array)
        assert [e.tag for e in got] == [e.tag for e in sent]
        assert all(got[e.tag].value == e.value for e in sent)


def _written_pdus(write: Callable[[socket.socket], None]) -> list[bytes]:
    """The P-DATA-TF PDUs ``write`` puts on one end of a socket pair, read back from
    the other end and split at their length fields."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        write(ours)
        ours.shutdown(socket.SHUT_WR)
        stream = b""
        while chunk := theirs.recv(65536):
            stream += chunk
    pdus = []
    while stream:
        length = int.from_bytes(stream[2:6], "big")
        pdus.append(stream[: 6 + length])
        stream = stream[6 + length :]
    return pdus


def test_a_command_larger_than_the_peers_pdu_is_fragmented(tmp_path):
    """No peer here takes a maximum PDU below 4096 and a command set is ~150 bytes, so
    the framing is checked on the bytes written into a socket pair: every PDU fits,
    command pieces in order with the last one flagged, one PDV per PDU."""
    from dicom_nodes import c_store

    command = encode_c_store_rq("1.2.840.10008.5.1.4.1.1.2", "1.2.3", 7)
    data = tmp_path / "data"
    data.write_bytes(b"x" * 25)

    def write_request(sock: socket.socket) -> None:
        with data.open("rb") as stream:
            c_store.write_command(sock, 5, command, size=40)
            c_store._write_file(sock, 5, stream, 0, 25, size=40)

    pdus = _written_pdus(write_request)
    assert all(pdu[0] == 0x04 for pdu in pdus)
    assert all(int.from_bytes(pdu[6:10], "big") == len(pdu) - 10 for pdu in pdus)  # one PDV
    controls = [pdu[11] for pdu in pdus]
    n_command = -(-len(command) // 40)
    assert controls[:n_command] == [1] * (n_command - 1) + [3]
    assert b"".join(pdu[12:] for pdu in pdus[:n_command]) == command
    assert all(int.from_bytes(pdu[2:6], "big") <= 40 + 6 for pdu in pdus)
    assert controls[n_command:] == [2]  # 25 bytes of data: one last fragment
    assert pdus[-1][12:] == b"x" * 25

    # An encoded (converted) data set is framed the same way: 90 bytes, 40 a PDU.
    pdus = _written_pdus(lambda sock: c_store._write_bytes(sock, 5, memoryview(b"y" * 90), 40))
    assert [pdu[11] for pdu in pdus] == [0, 0, 2]
    assert [len(pdu) - 12 for pdu in pdus] == [40, 40, 10]
    assert b"".join(pdu[12:] for pdu in pdus) == b"y" * 90


def test_fragments_are_even_when_the_peer_announces_an_odd_maximum():
    from dicom_nodes.c_store import fragment_size

    assert fragment_size(4097) == 4090
    assert fragment_size(4096) == 4090
    assert fragment_size(0) % 2 == 0


def test_a_received_request_is_read_as_pynetdicom_reads_it():
    """UIDs lose their padding on both sides, as pydicom strips them; a command that is
    not a C-STORE-RQ with a data set is not one."""
    command = encode_c_store_rq("1.2.840.10008.5.1.4.1.1.2", "1.2.3", 9)
    padded = command.replace(b"1.2.3\0", b" 1.2.3")  # same length, a leading space
    for raw in (command, padded):
        elements = decode_command(raw)
        assert elements is not None
        assert c_store_rq(elements) == StoreRequest("1.2.840.10008.5.1.4.1.1.2", "1.2.3", 9)
    response = decode_command(encode_c_store_rsp("1.2.840.10008.5.1.4.1.1.2", "1.2.3", 9, 0))
    assert response is not None and c_store_rq(response) is None  # a response
    assert decode_command(command[:-1]) is None  # an element runs past the end


VERIFICATION = "1.2.840.10008.1.1"


@pytest.mark.parametrize(("message_id", "status"), [(1, 0x0000), (65535, 0x0000), (0, 0x0122)])
def test_echo_response_is_what_pynetdicom_encodes(message_id, status):
    primitive = C_ECHO()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = VERIFICATION
    primitive.Status = status
    message = C_ECHO_RSP()
    message.primitive_to_message(primitive)
    expected = encode(message.command_set, True, True)
    assert encode_c_echo_rsp(VERIFICATION, message_id, status) == expected


def test_an_echo_request_is_read_as_pynetdicom_writes_it():
    primitive = C_ECHO()
    primitive.MessageID = 42
    primitive.AffectedSOPClassUID = VERIFICATION
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    elements = decode_command(encode(message.command_set, True, True))
    assert elements is not None
    assert c_echo_rq(elements) == EchoRequest(VERIFICATION, 42)
    assert c_store_rq(elements) is None
    store = decode_command(encode_c_store_rq("1.2.840.10008.5.1.4.1.1.2", "1.2.3", 9))
    assert store is not None and c_echo_rq(store) is None
    response = decode_command(encode_c_echo_rsp(VERIFICATION, 42, 0))
    assert response is not None and c_echo_rq(response) is None  # a response
