"""The edge's view of its workers, on a real (SQLite) huey queue with a test clock.

A worker announces itself with :meth:`JobQueue.present`; the edge's
:class:`WorkerWatch` judges who is alive by the age of the last announcement and logs
the changes. The scale-out test (``tests/test_scale_out.py``) does the same with real
``radnode worker`` processes and Redis; here the clock is the test's, so "silent for
an hour" takes no hour.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import structlog

from service.config import Settings
from service.queue import JobQueue, WorkerPresence
from service.worker_watch import FORGET_AFTER_S, START_GRACE_S, WorkerWatch


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _queue(tmp_path: Path) -> JobQueue:
    settings = Settings(node={"data_dir": str(tmp_path)})  # type: ignore[arg-type]
    return JobQueue(settings, heartbeat_s=1.0)


def _announce(queue: JobQueue, name: str, at: float) -> None:
    presence = WorkerPresence(name, "cpu", {"ct_seg": "1.0.0"}, at - 10, at)
    queue.huey.put(f"worker:{name}", presence)


def test_a_present_worker_is_listed_alive_and_withdrawn_when_it_stops(tmp_path: Path) -> None:
    queue = _queue(tmp_path)
    watch = WorkerWatch(queue, expect_workers=True)
    with queue.present("gpu-1:42", "cuda:0", {"ct_seg": "1.0.0"}):
        (view,) = watch.poll()
        assert (view.name, view.device, view.alive) == ("gpu-1:42", "cuda:0", True)
        assert view.pipelines == {"ct_seg": "1.0.0"}
        assert watch.alive_count() == 1
    with structlog.testing.capture_logs() as logs:
        assert watch.poll() == []
    events = [e["event"] for e in logs]
    assert events == ["worker.gone", "workers.none_alive"]


def test_a_worker_silent_for_four_beats_is_not_alive_and_said_once(tmp_path: Path) -> None:
    queue, clock = _queue(tmp_path), Clock()
    watch = WorkerWatch(queue, expect_workers=True, clock=clock)
    _announce(queue, "a:1", clock.now)
    _announce(queue, "b:2", clock.now)
    with structlog.testing.capture_logs() as logs:
        watch.poll()
        clock.now += 4.5  # b beats on, a does not
        _announce(queue, "b:2", clock.now)
        views = watch.poll()
        watch.poll()
    assert {v.name: v.alive for v in views} == {"a:1": False, "b:2": True}
    silent = [e for e in logs if e["event"] == "worker.silent"]
    assert [e["worker"] for e in silent] == ["a:1"] and silent[0]["alive"] == 1
    assert [e["worker"] for e in logs if e["event"] == "worker.seen"] == ["a:1", "b:2"]
    assert not [e for e in logs if e["event"] == "workers.none_alive"]


def test_a_worker_is_not_taken_for_silent_as_the_queue_answers_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No worker can announce itself while Redis is down: one alive before a
    30 s outage was reported silent a second after Redis answered, and seen again two
    seconds later (acceptance pass). Silence counts from the queue's return; the
    outage itself is simulated (the scale-out test stops a real Redis)."""
    queue, clock = _queue(tmp_path), Clock()
    watch = WorkerWatch(queue, expect_workers=True, clock=clock)
    _announce(queue, "a:1", clock.now)
    real_workers = queue.workers
    with structlog.testing.capture_logs() as logs:
        watch.poll_or_log()
        monkeypatch.setattr(queue, "workers", lambda: (_ for _ in ()).throw(ConnectionError()))
        for _ in range(30):
            clock.now += 1.0
            watch.poll_or_log()
        monkeypatch.setattr(queue, "workers", real_workers)
        clock.now += 1.0
        watch.poll_or_log()  # back; the worker has not beaten yet
        assert [v.alive for v in watch.latest] == [True]
        clock.now += 4.5  # and then it does not: silent, counted from the return
        watch.poll_or_log()
    assert [v.alive for v in watch.latest] == [False]
    (silent,) = [e for e in logs if e["event"] == "worker.silent"]
    assert silent["silent_s"] == 4  # 4.5 s since the queue answered, not 35 s


def test_a_worker_silent_for_an_hour_is_forgotten(tmp_path: Path) -> None:
    queue, clock = _queue(tmp_path), Clock()
    watch = WorkerWatch(queue, expect_workers=True, clock=clock)
    _announce(queue, "old:1", clock.now - FORGET_AFTER_S - 1)
    assert [v.alive for v in watch.poll()] == [False]  # first sight: not yet forgotten
    clock.now += 1.0
    assert watch.poll() == []  # seen unchanged: forgotten
    assert queue.workers() == []


def test_a_live_worker_whose_clock_is_hours_behind_is_kept(tmp_path: Path) -> None:
    """On first sight it was dated by its clock, two hours back, and dropped; it
    announced itself again and was dropped again, for ever (found by review)."""
    queue, clock = _queue(tmp_path), Clock()
    watch = WorkerWatch(queue, expect_workers=True, clock=clock)
    behind = clock.now - 2 * 3600
    for _ in range(3):
        _announce(queue, "far:1", behind)
        watch.poll()
        clock.now += 1.0
        behind += 1.0
    assert [(v.name, v.alive) for v in watch.latest] == [("far:1", True)]


def test_no_worker_after_the_start_grace_is_said_once_when_jobs_need_one(tmp_path: Path) -> None:
    queue, clock = _queue(tmp_path), Clock()
    expecting = WorkerWatch(queue, expect_workers=True, clock=clock)
    idle = WorkerWatch(queue, expect_workers=False, clock=clock)  # no routes
    with structlog.testing.capture_logs() as logs:
        expecting.poll()  # within the grace: workers are still loading their models
        clock.now += START_GRACE_S + 1
        for _ in range(3):
            expecting.poll()
            idle.poll()
    assert [e["event"] for e in logs] == ["workers.none_alive"]
    assert "radnode worker" in logs[0]["action"]


def test_an_unreachable_queue_is_logged_once_and_the_last_list_kept(tmp_path: Path) -> None:
    queue = _queue(tmp_path)
    watch = WorkerWatch(queue, expect_workers=True)
    _announce(queue, "a:1", time.time())
    watch.poll()

    def broken() -> list[WorkerPresence]:
        raise ConnectionError("queue down")

    queue.workers = broken  # type: ignore[method-assign]  # the queue's answer, failing
    with structlog.testing.capture_logs() as logs:
        watch.poll_or_log()
        watch.poll_or_log()
    assert [e["event"] for e in logs] == ["workers.poll_failed"]
    assert [v.name for v in watch.latest] == ["a:1"]
    # but not vouched for: a Redis outage showed the worker alive throughout (acceptance)
    assert watch.stale
    with pytest.raises(ConnectionError):
        watch.alive_count()  # radnode_workers_alive reads NaN


def test_live_workers_on_different_bundle_versions_are_warned_about_once(
    tmp_path: Path,
) -> None:
    """Acceptance pass: two workers on 0.2.0 and 0.2.1 took turns; the ORUs alternated."""
    queue, now = _queue(tmp_path), time.time()
    watch = WorkerWatch(queue, expect_workers=True)
    queue.huey.put("worker:a:1", WorkerPresence("a:1", "cpu", {"cxr": "0.2.0"}, now - 10, now))
    queue.huey.put("worker:b:2", WorkerPresence("b:2", "cpu", {"cxr": "0.2.1"}, now - 10, now))
    with structlog.testing.capture_logs() as logs:
        watch.poll()
        watch.poll()
    (warned,) = [e for e in logs if e["event"] == "workers.versions_differ"]
    assert warned["pipeline"] == "cxr"
    assert warned["versions"] == {"0.2.0": ["a:1"], "0.2.1": ["b:2"]}


def test_forget_all_drops_the_announcements_of_a_previous_run(tmp_path: Path) -> None:
    queue = _queue(tmp_path)
    _announce(queue, "a:1", time.time())
    _announce(queue, "b:2", time.time())
    WorkerWatch(queue, expect_workers=True).forget_all()
    assert queue.workers() == []


def test_a_worker_whose_clock_is_off_is_judged_by_the_edges_clock(tmp_path: Path) -> None:
    """Its announcements are dated by its own clock; the edge judges freshness by when
    it saw each new one, so a clock 10 minutes behind still counts as alive."""
    queue, clock = _queue(tmp_path), Clock()
    watch = WorkerWatch(queue, expect_workers=True, clock=clock)
    behind = clock.now - 600
    _announce(queue, "late:1", behind)
    assert [v.alive for v in watch.poll()] == [False]  # first sight: its own date
    for _ in range(5):
        clock.now += 1.0
        behind += 1.0
        _announce(queue, "late:1", behind)
        assert [v.alive for v in watch.poll()] == [True]
    clock.now += 4.5  # then it stops announcing
    assert [v.alive for v in watch.poll()] == [False]
