"""The event-driven pynetdicom reactors (dicom_nodes.reactor) keep pynetdicom's protocol.

Both ends are real pynetdicom associations over loopback; DCMTK peers exercise the same
classes through every other SCP/SCU test. No timing is asserted here (bench/ingest.py
and bench/scu.py measure speed); these tests check that the substituted classes are the
ones pynetdicom builds and that release, abort, the network timeout and many
back-to-back messages behave as before.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
import tracemalloc
from types import SimpleNamespace

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from dicom_nodes import reactor
from tests.conftest import free_port


@pytest.fixture
def server():
    reactor.install()
    events: list[str] = []
    done = threading.Event()

    def closed(event: evt.Event) -> None:
        events.append("released" if event.event is evt.EVT_RELEASED else "aborted")
        done.set()

    ae = AE(ae_title="RADNODE")
    ae.add_supported_context(Verification)
    ae.network_timeout = 0.5
    port = free_port()
    scp = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_RELEASED, closed), (evt.EVT_ABORTED, closed)],
    )
    yield scp, port, events, done
    scp.shutdown()


def _requestor(port: int):
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="RADNODE")


def test_both_ends_use_the_event_driven_classes(server):
    scp, port, _, _ = server
    assoc = _requestor(port)
    assert assoc.is_established
    assert type(assoc) is reactor.EventDrivenAssociation
    assert isinstance(assoc.dul, reactor.EventDrivenDUL)
    assert type(assoc.dul.socket) is reactor.WholeReadSocket
    accepted = scp.active_associations
    assert [type(a) for a in accepted] == [reactor.EventDrivenAssociation]
    assert type(accepted[0].dul.socket) is reactor.WholeReadSocket
    assoc.release()


def test_many_messages_then_release_end_both_threads(server):
    scp, port, events, done = server
    assoc = _requestor(port)
    statuses = [assoc.send_c_echo().Status for _ in range(500)]
    assert statuses == [0x0000] * 500
    accepted = scp.active_associations[0]
    assoc.release()
    assert assoc.is_released
    assert done.wait(5)
    assert events == ["released"]
    accepted.join(5)
    assoc.join(5)
    assert not accepted.is_alive() and not assoc.is_alive()
    assert not accepted.dul.is_alive() and not assoc.dul.is_alive()


def test_peer_abort_is_seen_by_the_acceptor(server):
    _, port, events, done = server
    assoc = _requestor(port)
    assert assoc.send_c_echo().Status == 0x0000
    assoc.abort()
    assert done.wait(5)
    assert events == ["aborted"]


def test_network_timeout_still_ends_an_idle_association(server):
    """The acceptor's network timeout (0.5 s) is checked although the reactor no
    longer wakes every millisecond."""
    _, port, events, done = server
    started = time.monotonic()  # before associating: the acceptor's timer starts after
    assoc = _requestor(port)
    assert done.wait(10)
    assert events == ["aborted"]
    assert time.monotonic() - started >= 0.5
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.01)
    assert assoc.is_aborted


def _whole_read_pair() -> tuple[reactor.WholeReadSocket, socket.socket]:
    """A WholeReadSocket on one end of a socket pair. Built around a connected socket,
    an AssociationSocket touches only its owner's DUL event queue (it queues Evt5)."""
    owner = SimpleNamespace(dul=SimpleNamespace(event_queue=queue.Queue()))
    ours, theirs = socket.socketpair()
    return reactor.WholeReadSocket(owner, client_socket=ours), theirs  # type: ignore[arg-type]


def test_whole_read_joins_a_pdu_that_arrives_in_pieces():
    sock, peer = _whole_read_pair()
    payload = bytes(range(256)) * 12 * 1024  # 3 MiB: the 1 MiB first buffer grows twice

    def send_in_pieces() -> None:
        for start in range(0, len(payload), 100_000):
            peer.sendall(payload[start : start + 100_000])
            time.sleep(0.001)

    sender = threading.Thread(target=send_in_pieces)
    sender.start()
    got = sock.recv(len(payload))
    sender.join()
    assert isinstance(got, bytearray)
    assert got == payload
    peer.close()


def test_whole_read_returns_what_arrived_before_the_peer_closed():
    sock, peer = _whole_read_pair()
    peer.sendall(b"\x04\x00\x00\x00")
    peer.close()
    assert sock.recv(6) == bytearray(b"\x04\x00\x00\x00")
    assert sock.recv(6) == bytearray()


def test_whole_read_allocates_for_what_arrives_not_what_is_announced():
    """A peer's 6-byte PDU header can announce 1 GiB before any association is checked;
    the read must not allocate it up front."""
    sock, peer = _whole_read_pair()
    peer.sendall(b"x" * 3000)
    peer.close()
    tracemalloc.start()
    try:
        got = sock.recv(1 << 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == bytearray(b"x" * 3000)
    assert peak < 8 * 1024 * 1024


def test_a_rejection_that_comes_at_once_is_seen_as_a_rejection():
    """pynetdicom's requestor checks "connected" only after it sent its request; a
    rejection read and the connection closed before that check was taken for a failed
    connect and reported as an abort, the peer's reason lost (2-4 in 1500 rejections
    on a loaded machine). The requestor's thread is held here right at that point
    (its own EVT_REQUESTED handler) so the rejection surely comes first."""
    reactor.install()
    acceptor = AE(ae_title="RADNODE")
    acceptor.add_supported_context(Verification)
    acceptor.require_called_aet = True
    port = free_port()
    scp = acceptor.start_server(("127.0.0.1", port), block=False)
    try:
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(Verification)
        assoc = ae.associate(
            "127.0.0.1",
            port,
            ae_title="NOT-RADNODE",  # called AE title not recognised: rejected at once
            evt_handlers=[(evt.EVT_REQUESTED, lambda event: time.sleep(0.3))],
        )
    finally:
        scp.shutdown()
    assert assoc.is_rejected and not assoc.is_aborted
    assert assoc.acceptor.primitive.diagnostic == 0x07
