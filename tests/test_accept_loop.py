"""The Storage SCP's accept loop does no more than accepting needs.

Found by profiling association set-up (a raw-socket client timing A-ASSOCIATE-RQ to
-AC, py-spy on the node): pynetdicom's server ran a full ``gc.collect()`` every 60
turns of its loop (a 70 ms stop of the whole node) and started a thread per
connection only to start the association's own thread. No timing is asserted here
(``bench/echo_under_load.py`` measures it); these tests check the behaviour that made
the time. The SCP runs in process with a receiver that keeps nothing, and real
pynetdicom peers associate over loopback.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_nodes import scp as scp_module
from dicom_nodes.policy import AssociationPolicy
from dicom_nodes.scp import ReceivedInstance, StorageSCP
from dicom_nodes.status import StoreStatus
from service.collector import settle_garbage_collector


class Discard:
    def store(self, instance: ReceivedInstance) -> StoreStatus:
        return StoreStatus.SUCCESS


@pytest.fixture
def scp() -> Iterator[StorageSCP]:
    node = StorageSCP(AssociationPolicy(ae_title="RADNODE"), Discard(), host="127.0.0.1", port=0)
    node.start()
    yield node
    node.stop()


def _echo(port: int) -> int:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADNODE")
    assert assoc.is_established
    status = assoc.send_c_echo().Status
    assoc.release()
    return int(status)


def test_a_plain_connection_is_set_up_on_the_accepting_thread(scp, monkeypatch) -> None:
    """No thread per connection before the association's own: the accepting thread
    builds the association (the handshake of a TLS connection still gets a thread)."""
    seen: dict[str, list[threading.Thread]] = {"accepted": [], "set_up": []}
    server_class = scp_module._AssociationServer
    accept, set_up = server_class.get_request, server_class.process_request_thread

    def get_request(self):
        seen["accepted"].append(threading.current_thread())
        return accept(self)

    def process_request_thread(self, request, client_address):
        seen["set_up"].append(threading.current_thread())
        return set_up(self, request, client_address)

    monkeypatch.setattr(server_class, "get_request", get_request)
    monkeypatch.setattr(server_class, "process_request_thread", process_request_thread)
    assert [_echo(scp.port) for _ in range(3)] == [0, 0, 0]
    assert len(seen["set_up"]) == 3
    assert set(seen["set_up"]) == set(seen["accepted"])  # one thread: the accept loop


def test_the_accept_loop_never_forces_a_full_collection(scp, monkeypatch) -> None:
    """pynetdicom's loop called gc.collect() every 60 turns (each connection and each
    idle half second); a full collection stops every association in the process."""
    collections: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(1) or 0)
    for _ in range(200):
        scp._server.service_actions()
    assert collections == []
    assert _echo(scp.port) == 0  # and associations are still served


def test_start_up_objects_are_kept_out_of_every_collection() -> None:
    gc.unfreeze()
    try:
        settle_garbage_collector()
        assert gc.get_freeze_count() > 1000  # modules, classes, pydicom's dictionaries
    finally:
        gc.unfreeze()  # the test process goes on as it was
