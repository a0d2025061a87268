"""Who may associate: address and AE title allowlists, the called AE title, the limits.

Each refusal is an A-ASSOCIATE-RJ with the result, source and reason of PS3.8 9.3.4,
seen by real peers (pynetdicom, DCMTK's echoscu) and logged once by the SCP with the
reason and what to do. The SCP runs in process with a receiver that keeps nothing.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import structlog
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from dicom_nodes.policy import AssociationPolicy, network_problem
from dicom_nodes.scp import ReceivedInstance, StorageSCP
from dicom_nodes.status import StoreStatus
from tests.conftest import dcmtk_env, require_tool

pytestmark = pytest.mark.integration

PERMANENT, TRANSIENT = 1, 2
SERVICE_USER, PRESENTATION = 1, 3
NO_REASON, CALLING_AE, CALLED_AE, LOCAL_LIMIT = 1, 3, 7, 2


class Discard:
    def store(self, instance: ReceivedInstance) -> StoreStatus:
        return StoreStatus.SUCCESS


@pytest.fixture
def start_scp() -> Iterator:
    started: list[StorageSCP] = []

    def start(policy: AssociationPolicy) -> tuple[StorageSCP, list[str]]:
        outcomes: list[str] = []
        scp = StorageSCP(
            policy, Discard(), host="127.0.0.1", port=0, on_association=outcomes.append
        )
        scp.start()
        started.append(scp)
        return scp, outcomes

    yield start
    for scp in started:
        scp.stop()


def associate(port: int, calling: str = "PACS", called: str = "RADNODE") -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=called)


def rejection(assoc: Association) -> tuple[int, int, int]:
    assert assoc.is_rejected, "the association was not rejected"
    rj = assoc.acceptor.primitive
    return (rj.result, rj.result_source, rj.diagnostic)


def rejected_events(events: list[dict]) -> list[dict]:
    """The ``association.rejected`` lines. The SCP logs one once the A-ASSOCIATE-RJ is
    sent (pynetdicom's EVT_REJECTED), so the peer may have its answer first: tests wait
    for the line inside their ``capture_logs`` block."""
    return [e for e in events if e["event"] == "association.rejected"]


def echo(port: int, calling: str = "PACS") -> tuple[bool, str]:
    cmd = [require_tool("echoscu"), "-v", "-aet", calling, "-aec", "RADNODE", "127.0.0.1"]
    result = subprocess.run(
        [*cmd, str(port)], env=dcmtk_env(), capture_output=True, text=True, timeout=60
    )
    return result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- addresses


def test_loopback_in_the_address_allowlist_is_served(start_scp) -> None:
    scp, _ = start_scp(AssociationPolicy(allowed_peer_addresses=("10.0.0.0/8", "127.0.0.0/8")))

    ok, output = echo(scp.port)

    assert ok, output


def test_address_outside_the_allowlist_is_rejected_and_logged(start_scp) -> None:
    scp, outcomes = start_scp(AssociationPolicy(allowed_peer_addresses=("10.0.0.0/8", "::1")))

    with structlog.testing.capture_logs() as events:
        assoc = associate(scp.port)
        ok, output = echo(scp.port)
        _wait_until(lambda: len(rejected_events(events)) == 2)

    assert rejection(assoc) == (PERMANENT, SERVICE_USER, NO_REASON)
    assert not ok and "Association Rejected" in output
    logged = rejected_events(events)
    assert len(logged) == 2
    assert all(e["reason"] == "peer address not in node.allowed_peer_addresses" for e in logged)
    assert all(e["peer_address"] == "127.0.0.1" and e["peer_ae"] == "PACS" for e in logged)
    assert all("allowed_peer_addresses" in e["action"] for e in logged)
    assert outcomes == ["rejected", "rejected"]


def test_a_rejected_address_does_not_disturb_allowed_peers(start_scp) -> None:
    """The refusal is per association: the same SCP keeps serving after it."""
    scp, _ = start_scp(AssociationPolicy(allowed_peer_addresses=("10.0.0.0/8",)))
    assert associate(scp.port).is_rejected
    assert associate(scp.port).is_rejected  # the server thread is still accepting


@pytest.mark.parametrize(
    ("entry", "valid"),
    [
        ("127.0.0.1", True),
        ("10.1.0.0/16", True),
        ("10.1.2.3/16", True),  # host bits set: taken as its network
        ("fd00::/8", True),
        ("10.1.0.0/33", False),
        ("pacs.hospital.org", False),
        ("", False),
    ],
)
def test_address_entries_are_ips_or_networks(entry: str, valid: bool) -> None:
    assert (network_problem(entry) is None) is valid
    if not valid:
        with pytest.raises(ValueError, match="not an IP address or CIDR network"):
            AssociationPolicy(allowed_peer_addresses=(entry,))


def test_ipv4_peers_on_an_ipv6_socket_match_ipv4_entries() -> None:
    policy = AssociationPolicy(allowed_peer_addresses=("192.168.0.0/24",))
    assert policy.address_allowed("::ffff:192.168.0.7")
    assert not policy.address_allowed("::ffff:192.168.1.7")
    assert not policy.address_allowed("not-an-address")
    assert AssociationPolicy().address_allowed("not-an-address")  # no list: anyone


# --------------------------------------------------------------------------- AE titles


def test_unknown_calling_ae_is_rejected_with_reason_3(start_scp) -> None:
    scp, _ = start_scp(AssociationPolicy(allowed_calling_aets=("PACS",)))

    with structlog.testing.capture_logs() as events:
        assoc = associate(scp.port, calling="INTRUDER")
        _wait_until(lambda: rejected_events(events))

    assert rejection(assoc) == (PERMANENT, SERVICE_USER, CALLING_AE)
    (logged,) = rejected_events(events)
    assert logged["reason"] == "calling AE title not recognized"
    assert logged["peer_ae"] == "INTRUDER" and "allowed_calling_aets" in logged["action"]


def test_called_ae_mismatch_is_rejected_with_reason_7(start_scp) -> None:
    scp, _ = start_scp(AssociationPolicy())

    with structlog.testing.capture_logs() as events:
        assoc = associate(scp.port, called="SOMEONE_ELSE")
        _wait_until(lambda: rejected_events(events))

    assert rejection(assoc) == (PERMANENT, SERVICE_USER, CALLED_AE)
    (logged,) = rejected_events(events)
    assert logged["reason"] == "called AE title not recognized"
    assert logged["called_ae"] == "SOMEONE_ELSE" and "require_called_aet" in logged["action"]


def test_called_ae_check_can_be_relaxed(start_scp) -> None:
    scp, _ = start_scp(AssociationPolicy(require_called_aet=False))

    assoc = associate(scp.port, called="ANY-SCP")

    assert assoc.is_established
    assoc.release()


# --------------------------------------------------------------------------- limits


def test_max_associations_is_honoured_and_frees_up(start_scp) -> None:
    scp, outcomes = start_scp(AssociationPolicy(max_associations=2))
    held = [associate(scp.port), associate(scp.port)]
    assert all(a.is_established for a in held)

    with structlog.testing.capture_logs() as events:
        third = associate(scp.port)
        _wait_until(lambda: rejected_events(events))

    assert rejection(third) == (TRANSIENT, PRESENTATION, LOCAL_LIMIT)
    (logged,) = rejected_events(events)
    assert "too many concurrent associations" in logged["reason"]
    held.pop().release()
    _wait_until(lambda: outcomes.count("released") == 1)
    # The released association's thread ends once the peer has closed the connection
    # (pynetdicom checks every 10 ms); only then is its slot free.
    server = scp._server
    _wait_until(lambda: len(server.active_associations) == 1)
    fourth = associate(scp.port)
    assert fourth.is_established
    for assoc in (*held, fourth):
        assoc.release()


def test_a_half_sent_request_lets_go_of_its_slot_after_the_network_timeout(start_scp) -> None:
    """A peer (any address: the allowlists are checked once the request is whole) that
    sends the start of an A-ASSOCIATE-RQ and falls silent held its thread and slot for
    ever; with max_associations such peers locked everyone out (found by review)."""
    policy = AssociationPolicy(max_associations=1, network_timeout_s=1.0, acse_timeout_s=1.0)
    scp, _ = start_scp(policy)  # the read gives up after 1 s, the wait for a request too
    silent = socket.create_connection(("127.0.0.1", scp.port))
    silent.sendall(bytes([0x01, 0x00]) + (1000).to_bytes(4, "big") + b"\x00" * 14)
    try:
        _wait_until(lambda: len(scp._server.active_associations) == 1)
        _wait_until(lambda: len(scp._server.active_associations) == 0, timeout=10)
        ok, output = echo(scp.port)
        assert ok, output
    finally:
        silent.close()


@pytest.mark.parametrize(
    ("first_bytes", "looks_like"),
    [
        # the start of a TLS 1.2 ClientHello record, as openssl s_client sends it
        (bytes.fromhex("160301012c010001280303") + bytes(300), "tls"),
        (b"GET / HTTP/1.1\r\nHost: radnode\r\n\r\n" + bytes(100), "text"),
    ],
)
def test_a_peer_that_does_not_speak_dicom_gets_one_line_with_an_action(
    start_scp, caplog: pytest.LogCaptureFixture, first_bytes: bytes, looks_like: str
) -> None:
    """Load pass: a TLS handshake sent to the plain port logged pynetdicom's "Unknown
    PDU type received" 25 times, with neither the peer nor what to do. It gets one
    A-ABORT and the connection closes: it was answered with an A-ABORT per 6 bytes
    and held for the whole network timeout (session 17)."""
    scp, _ = start_scp(AssociationPolicy(network_timeout_s=30))
    with structlog.testing.capture_logs() as events:
        with socket.create_connection(("127.0.0.1", scp.port)) as stray:
            stray.sendall(first_bytes)
            stray.settimeout(10)  # well under the network timeout
            answer = b""
            while chunk := stray.recv(4096):
                answer += chunk
            _wait_until(lambda: any(e["event"] == "association.not_dicom" for e in events))
        ok, output = echo(scp.port)
    assert answer == bytes.fromhex("07000000000400000000")  # one A-ABORT, then closed
    assert ok, output
    said = [e for e in events if e["event"] == "association.not_dicom"]
    assert len(said) == 1, said
    assert said[0]["looks_like"] == looks_like
    assert said[0]["peer_address"] == "127.0.0.1"
    assert "port" in said[0]["action"]
    assert not [r for r in caplog.records if "Unknown PDU type" in r.getMessage()]


def test_a_pdu_of_no_known_type_on_an_established_association_closes_it_at_once(
    start_scp,
) -> None:
    """Acceptance pass: after an A-ASSOCIATE-AC, a PDU of type 0x0A got its A-ABORT but
    the connection stayed open until network_timeout_s, holding an association slot (a
    new association was refused, local limit exceeded). Now it closes at once."""
    from bench.echo_under_load import _raw_echo_pdus

    scp, _ = start_scp(AssociationPolicy(network_timeout_s=30, max_associations=1))
    associate_rq, _, _ = _raw_echo_pdus()
    with socket.create_connection(("127.0.0.1", scp.port)) as peer:
        peer.settimeout(10)  # well under the network timeout
        peer.sendall(associate_rq)
        header = peer.recv(6, socket.MSG_WAITALL)
        assert header[0] == 0x02  # A-ASSOCIATE-AC
        peer.recv(int.from_bytes(header[2:6], "big"), socket.MSG_WAITALL)
        started = time.monotonic()
        peer.sendall(bytes.fromhex("0a00000000020000"))
        answer = b""
        while chunk := peer.recv(4096):  # until the node closes the connection
            answer += chunk
        closed_after = time.monotonic() - started
    assert answer[:1] == b"\x07" and len(answer) == 10  # one A-ABORT, then closed
    assert closed_after < 5
    ok, output = echo(scp.port)  # the slot is free again
    assert ok, output


def test_stopping_aborts_open_associations(start_scp) -> None:
    """pynetdicom's shutdown only stops accepting: associations went on after the node
    stopped and each C-STORE got C0FF on the closed index (found by review)."""
    scp, outcomes = start_scp(AssociationPolicy())
    peer = associate(scp.port)
    assert peer.is_established
    started = time.monotonic()
    scp.stop()
    assert time.monotonic() - started < 10
    _wait_until(lambda: peer.is_aborted)
    assert "aborted" in outcomes


def test_max_pdu_length_is_announced(start_scp) -> None:
    scp, _ = start_scp(AssociationPolicy(max_pdu_bytes=65536))

    assoc = associate(scp.port)

    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 65536
    assoc.release()


def test_concurrent_allowed_and_refused_peers_are_each_answered(start_scp) -> None:
    """Rejections on some threads never stall associations on others."""
    scp, _ = start_scp(AssociationPolicy(allowed_calling_aets=("PACS",), max_associations=8))
    results: dict[str, list[bool]] = {"PACS": [], "INTRUDER": []}
    lock = threading.Lock()

    def run(calling: str) -> None:
        assoc = associate(scp.port, calling=calling)
        established = assoc.is_established
        if established:
            established = assoc.send_c_echo().Status == 0
            assoc.release()
        with lock:
            results[calling].append(established)

    threads = [threading.Thread(target=run, args=(name,)) for name in ["PACS", "INTRUDER"] * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert results == {"PACS": [True] * 3, "INTRUDER": [False] * 3}


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_the_scp_announces_radnodes_implementation_not_pynetdicoms(start_scp) -> None:
    """The A-ASSOCIATE-AC carried pynetdicom's PYNETDICOM_304 while the SCU and the
    spool files said radnode (conformance audit; PS3.7 D.3.3.2)."""
    from dicom_nodes.implementation import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
    from service import __version__

    assert f"RADNODE_{__version__.replace('.', '')}"[:16] == IMPLEMENTATION_VERSION_NAME
    scp, _ = start_scp(AssociationPolicy())
    assoc = associate(scp.port)
    try:
        assert assoc.is_established
        assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
        assert assoc.acceptor.implementation_version_name == IMPLEMENTATION_VERSION_NAME
    finally:
        assoc.release()
