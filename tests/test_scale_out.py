"""Scale-out: one edge, two `radnode worker` processes, a real redis-server between them.

The edge (`radnode serve` with `queue.local_workers = 0`) receives, routes, records and
delivers; the workers only run jobs from Redis. Storage is shared (same data dir), as the
deployment guide asks. One worker is killed mid-job: its job runs again on the other,
and every result reaches the RIS exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from service.testing import write_ct_series
from tests.conftest import RADNODE, free_port, require_tool, storescu, wait_for_port
from tests.support.bundles import write_zoo_spleen_bundle

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_url(tmp_path: Path):
    port = free_port()
    proc = subprocess.Popen(
        [require_tool("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for_port(port, proc=proc)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


class Worker:
    """A `radnode worker` process whose JSON log lines are kept."""

    def __init__(self, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen([str(RADNODE), "worker"], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def events(self, name: str) -> list[dict]:
        found = []
        for line in list(self.lines):
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            if item.get("event") == name:
                found.append(item)
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def test_two_workers_share_the_jobs_and_a_killed_worker_loses_none(
    radnode_factory, redis_url: str, tmp_path: Path, listener_factory
) -> None:
    models = tmp_path / "models"
    write_zoo_spleen_bundle(models)
    ris = listener_factory("AA")
    routes = [{"name": "ct", "pipeline": "spleen_ct_segmentation",
               "match": {"Modality": "CT"}, "destinations": ["ris"]}]  # fmt: skip
    destinations = [{"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": ris.port,
                     "backoff_s": 0.2}]  # fmt: skip
    shared = {
        "RADNODE_QUEUE__URL": redis_url,
        "RADNODE_QUEUE__HEARTBEAT_S": "0.5",
        "RADNODE_MODELS__DIR": str(models),
        "RADNODE_ROUTES": json.dumps(routes),
        "RADNODE_DESTINATIONS": json.dumps(destinations),
    }
    edge = radnode_factory(RADNODE_QUEUE__LOCAL_WORKERS="0", **shared).start()
    worker_env = {**os.environ, **shared, "RADNODE_NODE__DATA_DIR": str(edge.data_dir)}
    workers = [Worker(worker_env), Worker(worker_env)]
    try:
        studies = 6
        for i in range(studies):
            series = write_ct_series(
                tmp_path / f"ct{i}", slices=24, rows=96, columns=96,
                pixel_spacing=(3.0, 3.0), slice_thickness=3.0, seed=i,
            )  # fmt: skip
            assert storescu(edge.port, series).returncode == 0
        # kill the first worker that starts a job, while it runs it
        deadline = time.monotonic() + 120
        victim = None
        while victim is None and time.monotonic() < deadline:
            victim = next((w for w in workers if w.events("job.started")), None)
            time.sleep(0.05)
        assert victim is not None, "no worker started a job"
        victim.proc.kill()
        survivor = workers[1 - workers.index(victim)]
        edge.wait_for_event("job.recorded", count=studies, timeout=300)
        edge.wait_for_event("hl7.sent", count=studies, timeout=60)
    finally:
        for w in workers:
            w.stop()
    with sqlite3.connect(edge.data_dir / "index.sqlite3") as db:
        states = db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
    assert states == [("done", studies)]
    assert edge.events("job.requeued"), "the killed worker's job must be noticed and re-run"
    # both workers ran jobs; the survivor finished the rest
    assert victim.events("job.started") and survivor.events("job.finished")
    survivor_pid = str(survivor.proc.pid)
    recorded_by = [e["worker"].rsplit(":", 1)[1] for e in edge.events("job.recorded")]
    assert recorded_by.count(survivor_pid) >= studies - len(victim.events("job.finished"))
    # every result reached the RIS exactly once
    control_ids = [m.split("\r")[0].split("|")[9] for m in ris.received]
    assert len(control_ids) == studies == len(set(control_ids))
