"""Scale-out: one edge, two `radnode worker` processes, a real redis-server between them.

The edge (`radnode serve` with `queue.local_workers = 0`) receives, routes, records and
delivers; the workers only run jobs from Redis. Storage is shared (same data dir), as the
deployment guide asks. One worker is killed mid-job: its job runs again on the other,
and every result reaches the RIS exactly once.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import structlog

from service.config import Settings
from service.queue import JobQueue
from service.records import JobReport, JobState, JobTicket
from service.shared_storage import MARK_FILE, edge_mark
from service.testing import write_ct_series
from tests.conftest import RADNODE, free_port, storescu
from tests.support.bundles import write_zoo_spleen_bundle
from tests.support.scale_out import Worker, running_redis, start_redis

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_url(tmp_path: Path):
    with running_redis(tmp_path) as url:
        yield url


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
        # the edge saw both workers, and the killed one go silent (4 beats of 0.5 s)
        silent = edge.wait_for_event("worker.silent", timeout=30)
        assert [e["worker"].rsplit(":", 1)[1] for e in silent] == [str(victim.proc.pid)]
        listed = _get_json(edge.http_port, "/api/workers")
        by_pid = {w["name"].rsplit(":", 1)[1]: w for w in listed["workers"]}
        assert by_pid[str(victim.proc.pid)]["alive"] is False
        assert by_pid[str(survivor.proc.pid)]["alive"] is True
        assert "spleen_ct_segmentation" in by_pid[str(survivor.proc.pid)]["pipelines"]
        assert listed["alive"] == 1
        assert "radnode_workers_alive 1.0" in _get_text(edge.http_port, "/metrics")
        # the last worker stops cleanly: it is gone, and the edge says none is left
        survivor.stop()
        gone = edge.wait_for_event("worker.gone", timeout=30)
        assert gone[0]["worker"].endswith(f":{survivor.proc.pid}")
        edge.wait_for_event("workers.none_alive", timeout=30)
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


def _get_text(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read().decode("utf-8")


def _get_json(port: int, path: str) -> dict:
    return json.loads(_get_text(port, path))


def test_heartbeats_go_on_after_redis_restarts(tmp_path: Path) -> None:
    """One failed write ended a run's heartbeat thread: after a 3 s Redis restart the
    edge took the healthy run for dead and ran the job again (found by review). The
    heartbeat is back once Redis is (no persistence: only a new beat can be there)."""
    port = free_port()
    settings = Settings(
        node={"data_dir": str(tmp_path)},  # type: ignore[arg-type]
        queue={"url": f"redis://127.0.0.1:{port}/0"},  # type: ignore[arg-type]
    )
    queue = JobQueue(settings, heartbeat_s=0.1)
    server = start_redis(tmp_path, port)
    try:
        with queue.beating("job-1", "w:1", 1):
            server.terminate()
            server.wait(timeout=10)
            time.sleep(0.5)  # beats fail meanwhile
            server = start_redis(tmp_path, port)
            deadline = time.monotonic() + 5
            while queue.heartbeat("job-1", 1) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert queue.heartbeat("job-1", 1) is not None
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_report_finished_while_redis_is_down_reaches_the_edge_once_redis_is_back(
    tmp_path: Path,
) -> None:
    """huey dropped the report of a run that ended while Redis was down, and the edge
    ran the healthy job a second time (acceptance pass). The worker keeps the report
    and puts it once Redis answers."""
    port = free_port()
    settings = Settings(
        node={"data_dir": str(tmp_path)},  # type: ignore[arg-type]
        queue={"url": f"redis://127.0.0.1:{port}/0"},  # type: ignore[arg-type]
    )
    queue = JobQueue(settings, heartbeat_s=0.1)
    ticket = JobTicket("job-1", "key", "p", (), str(tmp_path / "r"), (), 1)
    report = JobReport(job_id="job-1", worker="w:1", state=JobState.DONE)
    kept: list[bool] = []
    with structlog.testing.capture_logs() as events:
        keeper = threading.Thread(
            target=lambda: kept.append(queue.keep_report("t-1", ticket, report))
        )
        keeper.start()  # nothing listens on the port yet: Redis is down
        time.sleep(0.5)
        server = start_redis(tmp_path, port)
        try:
            keeper.join(timeout=10)
            assert kept == [True]
            assert queue.report("t-1") == report
        finally:
            server.terminate()
            server.wait(timeout=10)
    assert [e["event"] for e in events if e["event"].startswith("report.")] == [
        "report.unsaved",
        "report.saved",
    ]


def test_a_worker_that_cannot_use_its_queue_says_so_and_exits(tmp_path: Path) -> None:
    """It logged "started" and then huey's tracebacks ten times a second, for ever."""
    env = {
        **os.environ,
        "RADNODE_NODE__DATA_DIR": str(tmp_path),
        "RADNODE_QUEUE__URL": "redis://:s3cret@127.0.0.1:1/0",  # nothing listens on port 1
    }
    run = subprocess.run(
        [str(RADNODE), "worker"], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1
    assert "cannot use the queue at redis://:***@127.0.0.1:1/0" in run.stderr
    assert "s3cret" not in run.stdout + run.stderr
    assert "worker.started" not in run.stdout


def test_a_worker_that_cannot_run_an_enabled_pipeline_refuses_to_start(
    redis_url: str, tmp_path: Path
) -> None:
    """It took that pipeline's jobs from the shared queue and failed each in
    milliseconds (5 of 6 jobs failed while the good worker idled; found by review)."""
    routes = [{"name": "ct", "pipeline": "spleen_ct_segmentation",
               "match": {"Modality": "CT"}, "destinations": []}]  # fmt: skip
    env = {
        **os.environ,
        "RADNODE_NODE__DATA_DIR": str(tmp_path / "data"),
        "RADNODE_QUEUE__URL": redis_url,
        "RADNODE_MODELS__DIR": str(tmp_path / "empty_models"),
        "RADNODE_ROUTES": json.dumps(routes),
    }
    (tmp_path / "empty_models").mkdir()
    run = subprocess.run(
        [str(RADNODE), "worker"], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1, run.stdout[-2000:]
    assert "cannot run every enabled route's pipeline (spleen_ct_segmentation" in run.stderr
    assert "worker.started" not in run.stdout


@pytest.mark.parametrize("storage", ["not mounted", "another data_dir"])
def test_a_worker_that_does_not_see_the_edges_data_dir_refuses_to_start(
    redis_url: str, tmp_path: Path, storage: str
) -> None:
    """Jobs name the edge's files by path; a worker without the shared storage took jobs
    and failed each. The edge's mark is planted in Redis here as an edge on another
    machine publishes it (an edge on this machine would be visible by definition)."""
    settings = Settings(
        node={"data_dir": str(tmp_path / "edge")},  # type: ignore[arg-type]
        queue={"url": redis_url},  # type: ignore[arg-type]
    )
    mark = edge_mark(tmp_path / "edge")
    if storage == "not mounted":
        (tmp_path / "edge" / MARK_FILE).unlink()
    else:  # the same path holds another node's data_dir
        (tmp_path / "edge" / MARK_FILE).write_text("0123456789abcdef\n")
    JobQueue(settings).mark_edge(mark)
    env = {**os.environ, "RADNODE_NODE__DATA_DIR": str(tmp_path / "edge"),
           "RADNODE_QUEUE__URL": redis_url}  # fmt: skip
    run = subprocess.run(
        [str(RADNODE), "worker"], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1, run.stdout[-2000:]
    expected = "is not readable here" if storage == "not mounted" else "is not the edge's data_dir"
    assert expected in run.stderr and "Mount the edge's node.data_dir" in run.stderr
    assert "worker.started" not in run.stdout


def test_the_edge_publishes_its_data_dir_and_a_worker_that_sees_it_starts(
    radnode_factory, redis_url: str
) -> None:
    edge = radnode_factory(RADNODE_QUEUE__URL=redis_url, RADNODE_QUEUE__LOCAL_WORKERS="0").start()
    settings = Settings(queue={"url": redis_url})  # type: ignore[arg-type]
    mark = JobQueue(settings).edge_mark()
    assert mark is not None and Path(mark.data_dir) == edge.data_dir.resolve()
    assert (edge.data_dir / MARK_FILE).read_text().strip() == mark.token
    env = {**os.environ, "RADNODE_QUEUE__URL": redis_url,
           "RADNODE_NODE__DATA_DIR": str(edge.data_dir)}  # fmt: skip
    worker = Worker(env)
    try:
        edge.wait_for_event("worker.seen", timeout=120)
        assert worker.events("worker.started")
    finally:
        worker.stop()


def test_a_silent_redis_is_unreachable_not_a_hang_and_read_from_the_last_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py waits for ever by default: a Redis host behind a dropping firewall hung
    /readyz, /metrics and the tracker. And /readyz and /metrics asked Redis on every
    call, so each waited out the answer timeout: a readiness probe failed, a scrape ran
    past Prometheus's timeout (review). The node's 2 s poll now ends, and they read
    what it found. A listening socket that never answers stands in for such a Redis (a
    real one cannot be made to stall like this)."""
    from service.queue import QueueProbe

    monkeypatch.setattr("service.queue.REDIS_ANSWER_TIMEOUT_S", 0.5)
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        settings = Settings.model_validate(
            {"node": {"data_dir": str(tmp_path)},
             "queue": {"url": f"redis://127.0.0.1:{silent.getsockname()[1]}/0"}}
        )  # fmt: skip
        queue = JobQueue(settings)
        asked: list[str] = []
        real_depth = queue.depth
        queue.depth = lambda: asked.append("depth") or real_depth()  # type: ignore[method-assign]
        probe = QueueProbe(queue)
        assert probe.reachable()  # not polled yet: nothing known against it
        poll = threading.Thread(target=probe.poll)  # the background loop's call
        poll.start()
        poll.join(timeout=30)
        assert not poll.is_alive(), "the poll still waits for a Redis that never answers"
        assert asked == ["depth"]
        assert probe.reachable() is False
        with pytest.raises(ConnectionError):
            probe.depth()
        assert asked == ["depth"], "the readiness check or the scrape asked the queue itself"
    finally:
        silent.close()
