"""C-STORE served on the DUL thread (dicom_nodes.inline_store).

* The reader's PDV bookkeeping, PDU by PDU: a C-STORE taken whole (its fragments in
  one PDU or spread over several), everything else handed to pynetdicom unchanged and
  in order, a broken C-STORE message refused. The association around the reader is a
  small stand-in here (accepted contexts, the peer's maximum PDU, a socket pair for the
  response); the tests below it use real peers.
* With pynetdicom as the peer: C-ECHO and C-STORE interleaved on one association; a
  C-STORE under a context negotiated for another SOP class still served (by
  pynetdicom's path, as before); a peer that breaks a C-STORE message is aborted with a
  log line and nothing is stored.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
import structlog
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from dicom_nodes import c_store, reactor
from dicom_nodes.c_store import decode_command, encode_c_store_rq
from dicom_nodes.inline_store import InlineStoreReader
from dicom_nodes.policy import AssociationPolicy
from dicom_nodes.scp import StorageSCP
from service.testing import write_ct_series
from tests.support.cut_sender import begin_store_then_abort
from tests.support.cut_sender import encoded as _encoded
from tests.support.cut_sender import pdu as _pdu
from tests.support.cut_sender import pdv as _pdv

CT = str(CTImageStorage)
CONTROL_DATA, CONTROL_COMMAND, CONTROL_DATA_LAST, CONTROL_COMMAND_LAST = 0, 1, 2, 3


def _echo_command(message_id: int) -> bytes:
    """A C-ECHO-RQ command set (PS3.7 9.3.5.1), no data set."""
    elements = [
        (0x0002, str(Verification).encode() + b"\0"),
        (0x0100, struct.pack("<H", 0x0030)),
        (0x0110, struct.pack("<H", message_id)),
        (0x0800, struct.pack("<H", 0x0101)),
    ]
    body = b"".join(struct.pack("<HHI", 0, tag, len(v)) + v for tag, v in elements)
    return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(body)) + body


class _Association:
    """What the reader uses of an association: its accepted contexts, the peer's
    maximum PDU, and direct writes (here into a socket pair the test reads)."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.theirs.settimeout(5)
        self.accepted_contexts = [
            SimpleNamespace(context_id=1, abstract_syntax=CT),
            SimpleNamespace(context_id=3, abstract_syntax=str(Verification)),
        ]
        self.dimse = SimpleNamespace(maximum_pdu_size=16384)
        self.dul = SimpleNamespace(direct_writes=self._direct_writes)

    @contextlib.contextmanager
    def _direct_writes(self) -> Iterator[socket.socket]:
        yield self.ours

    def response(self) -> dict[int, bytes]:
        """The command elements of the one response PDU written."""
        header = self.theirs.recv(6)
        (length,) = struct.unpack(">I", header[2:])
        body = b""
        while len(body) < length:
            body += self.theirs.recv(length - len(body))
        assert body[5] == CONTROL_COMMAND_LAST  # one PDV: the whole command, last
        elements = decode_command(body[6:])
        assert elements is not None
        return elements


@pytest.fixture
def stores() -> tuple[InlineStoreReader, _Association, list[tuple]]:
    assoc = _Association()
    served: list[tuple] = []

    def handler(request, context, data_set: bytes) -> int:
        served.append((request, context.context_id, data_set))
        return 0xB000  # a status the response must carry through

    return InlineStoreReader(assoc, handler), assoc, served


def test_a_store_spread_over_pdus_is_served_whole_and_answered(stores):
    reader, assoc, served = stores
    command = encode_c_store_rq(CT, "1.2.3.4", 7)
    assert reader(_pdu(_pdv(1, CONTROL_COMMAND, command[:10]))) == []
    assert reader(_pdu(_pdv(1, CONTROL_COMMAND_LAST, command[10:]))) == []
    assert reader(_pdu(_pdv(1, CONTROL_DATA, b"ab"), _pdv(1, CONTROL_DATA, b"cd"))) == []
    assert served == []  # not before the last fragment
    assert reader(_pdu(_pdv(1, CONTROL_DATA_LAST, b"ef"))) == []
    ((request, context_id, data_set),) = served
    assert (request.sop_class_uid, request.sop_instance_uid, request.message_id) == (
        CT,
        "1.2.3.4",
        7,
    )
    assert (context_id, data_set) == (1, b"abcdef")
    response = assoc.response()
    assert struct.unpack("<H", response[0x0100]) == (0x8001,)  # C-STORE-RSP
    assert struct.unpack("<H", response[0x0120]) == (7,)  # answers Message ID 7
    assert struct.unpack("<H", response[0x0900]) == (0xB000,)  # the handler's status
    assert response[0x1000].rstrip(b"\0") == b"1.2.3.4"


def test_command_and_data_set_in_one_pdu(stores):
    reader, assoc, served = stores
    pdu = _pdu(
        _pdv(1, CONTROL_COMMAND_LAST, encode_c_store_rq(CT, "1.2.3.5", 1)),
        _pdv(1, CONTROL_DATA_LAST, b"whole"),
    )
    assert reader(pdu) == []
    assert [s[2] for s in served] == [b"whole"]
    assert struct.unpack("<H", assoc.response()[0x0120]) == (1,)


def test_an_echo_on_the_verification_context_is_answered_by_the_reader() -> None:
    """Given an echo handler, the reader answers C-ECHO itself: through pynetdicom one
    echo in twenty waited 25-40 ms for thread hand-overs while eight associations
    stored (bench/echo_under_load.py). On another context it is pynetdicom's."""
    assoc = _Association()
    reader = InlineStoreReader(assoc, lambda *_: 0, echo=lambda: 0x0000)
    assert reader(_pdu(_pdv(3, CONTROL_COMMAND_LAST, _echo_command(5)))) == []
    response = assoc.response()
    assert struct.unpack("<H", response[0x0100]) == (0x8030,)  # C-ECHO-RSP
    assert struct.unpack("<H", response[0x0120]) == (5,)
    assert struct.unpack("<H", response[0x0900]) == (0x0000,)
    assert response[0x0002].rstrip(b"\0") == str(Verification).encode()
    on_ct = _pdu(_pdv(1, CONTROL_COMMAND_LAST, _echo_command(6)))
    assert reader(on_ct) == [bytes(on_ct)]


def test_an_echo_goes_to_pynetdicom_unchanged_and_the_next_store_is_served(stores):
    reader, _, served = stores
    echo = _pdu(_pdv(3, CONTROL_COMMAND_LAST, _echo_command(2)))
    assert reader(echo) == [bytes(echo)]
    reader(_pdu(_pdv(1, CONTROL_COMMAND_LAST, encode_c_store_rq(CT, "1.2.3.6", 3))))
    reader(_pdu(_pdv(1, CONTROL_DATA_LAST, b"xy")))
    assert [s[2] for s in served] == [b"xy"]


def test_a_store_under_another_classes_context_goes_to_pynetdicom_with_its_data(stores):
    """Affected SOP Class MR under the CT context: pynetdicom's to judge, data set too."""
    reader, _, served = stores
    command = _pdu(_pdv(1, CONTROL_COMMAND_LAST, encode_c_store_rq(str(MRImageStorage), "9", 4)))
    first, last = _pdu(_pdv(1, CONTROL_DATA, b"ab")), _pdu(_pdv(1, CONTROL_DATA_LAST, b"cd"))
    assert [reader(p) for p in (command, first, last)] == [
        [bytes(p)] for p in (command, first, last)
    ]
    reader(_pdu(_pdv(1, CONTROL_COMMAND_LAST, encode_c_store_rq(CT, "1.2.3.7", 5))))
    reader(_pdu(_pdv(1, CONTROL_DATA_LAST, b"mine")))
    assert [s[2] for s in served] == [b"mine"]  # the reader took up the next one


def test_a_data_set_without_its_command_goes_to_pynetdicom(stores):
    reader, _, served = stores
    middle, last = _pdu(_pdv(1, CONTROL_DATA, b"ab")), _pdu(_pdv(1, CONTROL_DATA_LAST, b"cd"))
    assert reader(middle) == [bytes(middle)]
    assert reader(last) == [bytes(last)]
    assert served == []


def test_items_not_taken_are_passed_on_in_order_within_a_pdu(stores):
    """A store's last fragment and an echo in one PDU: the echo alone goes on."""
    reader, _, served = stores
    reader(_pdu(_pdv(1, CONTROL_COMMAND_LAST, encode_c_store_rq(CT, "1.2.3.8", 6))))
    echo = _pdv(3, CONTROL_COMMAND_LAST, _echo_command(7))
    assert reader(_pdu(_pdv(1, CONTROL_DATA_LAST, b"zz"), echo)) == [bytes(_pdu(echo))]
    assert [s[2] for s in served] == [b"zz"]


@pytest.mark.parametrize(
    "intruder",
    [_pdv(1, CONTROL_COMMAND_LAST, b"\0" * 8), _pdv(3, CONTROL_DATA_LAST, b"xx")],
    ids=["command inside the data set", "another context"],
)
def test_a_broken_store_message_is_refused(stores, intruder):
    reader, _, served = stores
    reader(_pdu(_pdv(1, CONTROL_COMMAND_LAST, encode_c_store_rq(CT, "1.2.3.9", 8))))
    reader(_pdu(_pdv(1, CONTROL_DATA, b"ab")))
    with pytest.raises(reactor.MessageStructureError):
        reader(_pdu(intruder))
    assert served == []


def test_a_pdu_whose_items_do_not_add_up_is_left_to_pynetdicom_for_good(stores):
    reader, _, served = stores
    bad = _pdu(struct.pack(">IBB", 100, 1, CONTROL_COMMAND_LAST) + b"short")
    assert reader(bad) == [bytes(bad)]
    after = _pdu(_pdv(1, CONTROL_COMMAND_LAST, encode_c_store_rq(CT, "1.2.4", 9)))
    assert reader(after) == [bytes(after)]
    assert served == []


# -- with pynetdicom as the peer --------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.instances: list[tuple[str, str, int]] = []

    def store(self, instance):
        self.instances.append(
            (instance.sop_class_uid, instance.sop_instance_uid, len(instance.dataset))
        )
        return 0x0000


@pytest.fixture
def scp() -> Iterator[tuple[StorageSCP, _Recorder]]:
    recorder = _Recorder()
    node = StorageSCP(AssociationPolicy(ae_title="RADNODE"), recorder, host="127.0.0.1", port=0)
    node.start()
    yield node, recorder
    node.stop()


def _series(tmp_path: Path, slices: int = 2) -> list[pydicom.Dataset]:
    files = write_ct_series(tmp_path / "ct", slices=slices, rows=32, columns=32)
    return [pydicom.dcmread(f) for f in files]


def _associate(port: int, *contexts: str):
    ae = AE(ae_title="PACS")
    for uid in contexts:
        ae.add_requested_context(uid)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADNODE")
    assert assoc.is_established
    return assoc


@pytest.mark.integration
def test_echo_and_store_interleave_on_one_association(scp, tmp_path):
    node, recorder = scp
    first, second = _series(tmp_path)
    assoc = _associate(node.port, Verification, CTImageStorage)
    try:
        statuses = [
            assoc.send_c_echo().Status,
            assoc.send_c_store(first).Status,
            assoc.send_c_echo().Status,
            assoc.send_c_store(second).Status,
        ]
    finally:
        assoc.release()
    assert statuses == [0, 0, 0, 0]
    assert [uid for _, uid, _ in recorder.instances] == [
        first.SOPInstanceUID,
        second.SOPInstanceUID,
    ]


@pytest.mark.integration
def test_a_store_under_another_classes_context_is_still_served(scp, tmp_path):
    """The command names MR under the CT context: the reader leaves it to pynetdicom,
    which serves it as it always did (and the receiver checks the data set)."""
    node, recorder = scp
    (instance,) = _series(tmp_path, slices=1)
    instance.SOPClassUID = MRImageStorage
    data_set = _encoded(instance)
    assoc = _associate(node.port, CTImageStorage)
    try:
        (context,) = assoc.accepted_contexts
        with reactor.reactor_paused(assoc):
            answer = c_store.send_data_set(
                assoc, context.context_id, data_set, MRImageStorage, instance.SOPInstanceUID, 1
            )
    finally:
        assoc.release()
    assert answer.code == 0x0000
    assert recorder.instances == [(str(MRImageStorage), instance.SOPInstanceUID, len(data_set))]


@pytest.mark.integration
def test_a_peer_that_breaks_a_store_message_is_aborted(scp, tmp_path):
    node, recorder = scp
    assoc = _associate(node.port, CTImageStorage)
    (context,) = assoc.accepted_contexts
    command = encode_c_store_rq(CT, "1.2.3.10", 1)
    with structlog.testing.capture_logs() as events:
        with reactor.reactor_paused(assoc), assoc.dul.direct_writes() as sock:
            c_store.write_command(sock, context.context_id, command, 16384)
            c_store.write_command(sock, context.context_id, command, 16384)  # not data
        deadline = time.monotonic() + 5
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.01)
    assert assoc.is_aborted
    assert recorder.instances == []
    (logged,) = [e for e in events if e["event"] == "association.protocol_error"]
    assert logged["peer_address"] == "127.0.0.1"
    assert "command fragment" in logged["reason"]


def test_the_scp_installs_the_reader_before_the_association_is_accepted(scp):
    """Installed on EVT_REQUESTED: a store sent at once after A-ASSOCIATE-AC cannot
    reach pynetdicom's path first."""
    node, _ = scp
    assoc = _associate(node.port, Verification)
    try:
        (served,) = node._server.active_associations
        assert isinstance(served.dul.p_data_reader, InlineStoreReader)
    finally:
        assoc.release()


class _Slow(_Recorder):
    def store(self, instance):
        time.sleep(1.2)
        return super().store(instance)


@pytest.mark.integration
def test_a_store_that_outlasts_the_network_timeout_is_counted_in_the_close_line(tmp_path):
    """The network timeout aborts the association from the association thread while
    the DUL thread is still storing: the close line waits for that store (it said
    instances=0 for an instance stored and acknowledged), and nothing of the ended
    association is left for a later one (whose lines showed the old peer's AE title
    and counts when its object reused the address; found by review)."""
    receiver = _Slow()
    policy = AssociationPolicy(ae_title="RADNODE", network_timeout_s=0.5)
    node = StorageSCP(policy, receiver, host="127.0.0.1", port=0)
    node.start()
    (first,) = _series(tmp_path, slices=1)
    try:
        with structlog.testing.capture_logs() as events:
            assoc = _associate(node.port, CTImageStorage)
            assert assoc.send_c_store(first).Status == 0x0000
            if assoc.is_established:
                assoc.release()
            deadline = time.monotonic() + 5
            while node._server.active_associations and time.monotonic() < deadline:
                time.sleep(0.01)
            later = AE(ae_title="LATER")
            later.add_requested_context(CTImageStorage)
            other = later.associate("127.0.0.1", node.port, ae_title="RADNODE")
            other.release()
            while node._server.active_associations and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        node.stop()
    closed = [e for e in events if e["event"] == "association.closed"]
    assert [(e["peer_ae"], e["outcome"], e["instances"]) for e in closed] == [
        ("PACS", "aborted", 1),
        ("LATER", "released", 0),
    ]
    opened = [e["peer_ae"] for e in events if e["event"] == "association.opened"]
    assert opened == ["PACS", "LATER"]
    assert len(node._stats) == 0


def test_a_store_that_begins_after_its_association_closed_is_refused_not_stored() -> None:
    """Stopping the node aborts associations from another thread. A data set that came
    in whole just then was stored and acknowledged after the close line had counted
    the association (the acceptance pass: 24 acknowledged, 23 logged). Once closed, a
    store is refused (A700: the peer sends it again) and the receiver never sees it."""
    from types import SimpleNamespace

    from dicom_nodes.scp import _AssociationStats

    receiver = _Recorder()
    node = StorageSCP(AssociationPolicy(ae_title="RADNODE"), receiver, host="127.0.0.1", port=0)
    peer = SimpleNamespace(ae_title="PACS", address="127.0.0.1")
    assoc = SimpleNamespace(requestor=peer, acceptor=SimpleNamespace(ae_title="RADNODE"))
    stats = _AssociationStats(calling_ae="PACS", address="127.0.0.1")
    args = (CTImageStorage, "1.2.3.4", "1.2.840.10008.1.2.1", b"\x08\x00")
    stats.closed = True
    assert node._store(assoc, stats, *args) == 0xA700
    assert receiver.instances == [] and stats.instances == 0
    stats.closed = False
    node._store(assoc, stats, *args)
    assert len(receiver.instances) == 1 and stats.instances == 1


def test_a_store_through_pynetdicom_after_its_association_closed_is_refused() -> None:
    """The same for a C-STORE the inline reader left to pynetdicom: the close has taken
    the association's counts away, and the store was saved uncounted (review)."""
    from types import SimpleNamespace

    receiver = _Recorder()
    node = StorageSCP(AssociationPolicy(ae_title="RADNODE"), receiver, host="127.0.0.1", port=0)

    class Assoc:  # weakly referenced, as the node keys its counts
        requestor = SimpleNamespace(
            ae_title="PACS", address="127.0.0.1", primitive=SimpleNamespace(calling_ae_title="PACS")
        )
        acceptor = SimpleNamespace(ae_title="RADNODE")

    assoc = Assoc()
    request = SimpleNamespace(
        AffectedSOPClassUID=CTImageStorage,
        AffectedSOPInstanceUID="1.2.3.4",
        DataSet=SimpleNamespace(getvalue=lambda: b"\x08\x00"),
    )
    context = SimpleNamespace(transfer_syntax="1.2.840.10008.1.2.1")
    event = SimpleNamespace(assoc=assoc, request=request, context=context)
    assert node._on_store(event) == 0xA700  # no counts: it has closed
    assert receiver.instances == []
    node._open_stats(assoc)
    node._on_store(event)
    assert len(receiver.instances) == 1


@pytest.mark.integration
@pytest.mark.parametrize("cut", [True, False])
def test_an_abort_in_the_middle_of_a_store_says_an_instance_was_cut(scp, tmp_path, cut: bool):
    """A PACS that aborts while an instance is on its way leaves the study without it
    (unless it sends it again); one that aborts between instances (some end every
    association so) loses nothing. The close line tells the two apart."""
    node, recorder = scp
    (instance,) = _series(tmp_path, slices=1)
    assoc = _associate(node.port, CTImageStorage)
    if not cut:
        assert assoc.send_c_store(instance).Status == 0x0000
    with structlog.testing.capture_logs() as events:
        if cut:
            begin_store_then_abort(assoc, instance)
        else:
            assoc.abort()
        deadline = time.monotonic() + 5
        while not [e for e in events if e["event"] == "association.closed"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    (closed,) = [e for e in events if e["event"] == "association.closed"]
    assert closed["outcome"] == "aborted"
    assert closed["instance_cut"] is cut
    assert len(recorder.instances) == (0 if cut else 1)
