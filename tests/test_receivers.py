"""Extra receiver processes (``node.receiver_processes``) with real processes and DCMTK.

The node binds the port; ``radnode receiver`` processes accept on the same socket and
write the same spool and index. To know which process took an association, the tests
stop the node process (SIGSTOP): then only a receiver process can accept, store and
answer, exactly as it does when the kernel hands it a connection under load.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from service.metrics import Metrics
from service.receivers import CountsOverPipe, apply_count
from service.testing import write_ct_series
from tests.conftest import RadnodeProcess, acknowledged_files, storescu, wait_until_ready

pytestmark = pytest.mark.integration


def _stored_metric(node: RadnodeProcess) -> float:
    url = f"http://127.0.0.1:{node.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "radnode_instances_received":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels == {"outcome": "stored"}:
                    return sample.value
    return 0.0


def _receiver_pids(node: RadnodeProcess) -> list[int]:
    spawned = {e["pid"] for e in node.events("receiver.spawned")}
    died = {e["pid"] for e in node.events("receiver.died")}
    return sorted(spawned - died)


@pytest.fixture
def two_process_node(radnode_factory) -> RadnodeProcess:
    node = radnode_factory(RADNODE_NODE__RECEIVER_PROCESSES="2").start()
    body = wait_until_ready(node.http_port, proc=node.proc)
    assert body["checks"]["receivers"] == {"ok": True}
    return node


def test_a_receiver_process_stores_and_acknowledges_while_the_node_is_stopped(
    two_process_node: RadnodeProcess, tmp_path: Path
) -> None:
    node = two_process_node
    assert node.proc is not None
    (receiver,) = _receiver_pids(node)
    files = write_ct_series(tmp_path / "ct", slices=12, rows=64, columns=64, seed=3)
    os.kill(node.proc.pid, signal.SIGSTOP)  # only the receiver process can accept now
    try:
        result = storescu(node.port, [files[0].parent], "+sd")
    finally:
        os.kill(node.proc.pid, signal.SIGCONT)
    assert len(acknowledged_files(result.stdout + result.stderr)) == len(files)
    with sqlite3.connect(node.data_dir / "index.sqlite3") as db:
        (indexed,) = db.execute("SELECT COUNT(*) FROM instances").fetchone()
    assert indexed == len(files)
    assert len(list((node.data_dir / "spool").rglob("*.dcm"))) == len(files)
    # the receiver's counts reach the node's /metrics once the node runs again
    deadline = time.monotonic() + 10
    while _stored_metric(node) < len(files) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _stored_metric(node) == len(files)
    # and the node completes the study the receiver took
    (complete,) = node.wait_for_event("study.complete", timeout=20)
    assert complete["instances"] == len(files)
    assert _receiver_pids(node) == [receiver]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_study_waits_for_the_association_that_pauses_inside_it(
    radnode_factory, tmp_path: Path, processes: int
) -> None:
    """A PACS that pauses inside an association for longer than the quiet period (a
    slow archive behind it) gets one result on the whole study, not one on its first
    part and a correction. With two processes the association is taken by the
    receiver process (the node is stopped while it connects) and the node, which
    completes studies, must still see the hold. pynetdicom is the sender: DCMTK's
    storescu cannot pause between instances."""
    node = radnode_factory(
        RADNODE_NODE__RECEIVER_PROCESSES=str(processes),
        RADNODE_STUDY__COMPLETION_TIMEOUT_S="1",
    ).start()
    assert node.proc is not None
    wait_until_ready(node.http_port, proc=node.proc)
    files = write_ct_series(tmp_path / "ct", slices=3, rows=32, columns=32, seed=5)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    if processes == 2:
        os.kill(node.proc.pid, signal.SIGSTOP)  # only the receiver process can accept
    try:
        assoc = ae.associate("127.0.0.1", node.port, ae_title="RADNODE")
    finally:
        if processes == 2:
            os.kill(node.proc.pid, signal.SIGCONT)
    assert assoc.is_established
    try:
        for path in files[:2]:
            assert assoc.send_c_store(dcmread(path)).Status == 0x0000
        time.sleep(2.5)  # quiet for more than twice the completion timeout
        assert node.events("study.complete") == []
        assert assoc.send_c_store(dcmread(files[2])).Status == 0x0000
    finally:
        assoc.release()
    (complete,) = node.wait_for_event("study.complete", timeout=20)
    assert complete["instances"] == 3
    time.sleep(1.5)
    assert len(node.events("study.complete")) == 1


def test_a_receiver_process_that_dies_is_restarted_and_readiness_says_so(
    two_process_node: RadnodeProcess, tmp_path: Path
) -> None:
    node = two_process_node
    (first,) = _receiver_pids(node)
    # what each process was writing when the receiver died (never acknowledged)
    incoming = node.data_dir / "spool" / "incoming"
    its_partial = incoming / f"{first}-0123abcd.part"
    nodes_partial = incoming / f"{node.proc.pid}-4567cdef.part"
    its_partial.write_bytes(b"half an instance")
    nodes_partial.write_bytes(b"being written by the node")
    os.kill(first, signal.SIGKILL)
    (died,) = node.wait_for_event("receiver.died", timeout=10)
    assert died["pid"] == first
    (removed,) = node.wait_for_event("spool.partials_removed", timeout=10)
    assert (removed["files"], removed["receiver_pid"]) == (1, first)
    assert not its_partial.exists()  # not left until the node's next start
    assert nodes_partial.exists()  # another process's write in flight is not touched
    node.wait_for_event("receiver.spawned", count=2, timeout=10)
    wait_until_ready(node.http_port, proc=node.proc)
    (second,) = _receiver_pids(node)
    assert second != first
    # the node and the new receiver together still take a whole series
    files = write_ct_series(tmp_path / "ct", slices=8, rows=64, columns=64, seed=4)
    result = storescu(node.port, [files[0].parent], "+sd")
    assert len(acknowledged_files(result.stdout + result.stderr)) == len(files)


def test_receiver_processes_stop_with_the_node(two_process_node: RadnodeProcess) -> None:
    node = two_process_node
    (receiver,) = _receiver_pids(node)
    assert node.stop() == 0
    deadline = time.monotonic() + 10
    while Path(f"/proc/{receiver}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{receiver}").exists()


def test_counts_cross_the_pipe_into_the_nodes_metrics() -> None:
    read_fd, write_fd = os.pipe()
    sender = CountsOverPipe(write_fd)
    sender.instance_stored(100)
    sender.instance_duplicate(7)
    sender.instance_refused(0xA700, 50)
    sender.association("accepted")
    os.close(write_fd)
    metrics = Metrics()
    with os.fdopen(read_fd) as pipe:
        assert all(apply_count(line, metrics) for line in pipe)
    sample = metrics.registry.get_sample_value
    assert sample("radnode_instances_received_total", {"outcome": "stored"}) == 1
    assert sample("radnode_received_bytes_total", {"outcome": "duplicate"}) == 7
    refused = {"status": "0xA700", "reason": "out_of_resources"}
    assert sample("radnode_store_refusals_total", refused) == 1
    assert sample("radnode_associations_total", {"outcome": "accepted"}) == 1


@pytest.mark.parametrize(
    "line",
    ["instance_stored", "instance_stored x", "instance_refused 1", "shutdown 1", "association"],
)
def test_a_malformed_count_line_is_refused(line: str) -> None:
    assert apply_count(line, Metrics()) is False


def test_the_node_starts_without_importing_torch() -> None:
    """The receive side (the node and its receiver processes) never runs a model: torch
    and MONAI (~2 s and a few hundred MiB to import) belong to the worker processes."""
    import subprocess
    import sys

    probe = "import sys, service.node; print(sorted({'torch', 'monai'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"
