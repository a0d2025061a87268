"""The edge's view of its workers: which are alive, logged when that changes.

Workers announce themselves through the queue every ``queue.heartbeat_s``, waiting or
working (:meth:`service.queue.JobQueue.present`). Job heartbeats alone exist only while a
job runs: an edge whose workers had all died, or whose remote workers were never
started, looked healthy while studies queued up (found by review). The edge polls the
announcements every few seconds (:meth:`WorkerWatch.poll`); ``/api/workers``,
``radnode status`` and the ``radnode_workers_alive`` gauge show the result, and the log
says when a worker appears, goes silent or stops, and when none is left.

A worker is alive while it has announced itself anew within ``SILENT_BEATS``
heartbeats, the rule the edge already applies to a running job. "Anew" is judged by the
edge's clock, from the announcement changing, so a worker machine whose clock is off
is not taken for silent (or alive) by it; only an announcement seen for the first time
is dated by the worker's clock. One silent for an hour is forgotten.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from service.queue import EdgeMark, HeardClock, JobQueue, WorkerPresence
from service.records import WorkerView
from service.tracker import SILENT_BEATS

log = structlog.get_logger("service.worker_watch")

#: A worker silent this long is dropped from the list (its machine is gone for good).
FORGET_AFTER_S = 3600.0
#: With jobs to run and no worker seen for this long after the start, the log says so.
START_GRACE_S = 120.0


class WorkerWatch:
    """Reads the workers' announcements and reports changes; :attr:`latest` is the
    list of the last poll (the metrics gauge and the API read it, never the queue)."""

    def __init__(
        self,
        queue: JobQueue,
        *,
        expect_workers: bool,
        edge_mark: EdgeMark | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._queue = queue
        self._mark = edge_mark
        self._expect = expect_workers
        self._clock = clock
        self._silent_after = SILENT_BEATS * queue.heartbeat_s
        self._started = clock()
        self._alive: set[str] = set()
        self._said_none = False
        self._failing = False
        #: when the queue last answered again after an outage: no worker could announce
        #: itself before, so silence counts from here (as the job tracker's does; an
        #: acceptance pass saw a live worker reported silent a second after Redis came
        #: back, and seen again two seconds later)
        self._silence_from = 0.0
        #: when each worker's announcement was last heard to change, by name
        self._heard = HeardClock()
        #: pipeline -> the bundle versions its live workers differ on, as last warned
        self._mixed: dict[str, tuple[str, ...]] = {}
        self.latest: list[WorkerView] = []

    def forget_all(self) -> None:
        """Drop every announcement: with a queue on this machine (SQLite), the workers
        of a previous run of the node died with it."""
        for presence in self._queue.workers():
            self._queue.withdraw(presence.name)

    def forget(self, name: str) -> None:
        """Drop one worker's announcement: a local worker that exited (the node saw it
        die and starts another). Left, it was reported ``worker.silent`` a few beats
        later, "a job it was running is queued again", for a process already replaced
        and a job already dealt with (acceptance pass)."""
        self._queue.withdraw(name)

    def alive_count(self) -> int:
        """Workers alive at the last poll. Raises while the queue cannot be read: the
        last list would go on showing workers "alive" through a Redis outage
        (acceptance pass), so the gauge reads NaN instead."""
        if self._failing:
            raise ConnectionError("the queue cannot be read: whether workers live is unknown")
        return sum(view.alive for view in self.latest)

    @property
    def stale(self) -> bool:
        """Whether :attr:`latest` is from before the queue stopped answering."""
        return self._failing

    def poll_or_log(self) -> None:
        """:meth:`poll`; a queue that does not answer is logged once until it does (the
        job tracker reports the outage itself) and :attr:`latest` stays as it was."""
        try:
            self.poll()
        except Exception as exc:
            if not self._failing:
                log.warning(
                    "workers.poll_failed",
                    reason=f"{type(exc).__name__}: {exc}",
                    action="check queue.url; the list of workers is stale until the queue answers",
                )
            self._failing = True
        else:
            self._failing = False

    def poll(self) -> list[WorkerView]:
        """Read the announcements, log what changed, and return the workers by name."""
        now = self._clock()
        if self._failing:  # the queue answers again
            self._silence_from = now
        if self._mark is not None:  # again each pass: a restarted queue may have lost it
            self._queue.mark_edge(self._mark)
        views = []
        quiet_since: dict[str, float] = {}  # by name: silent since, for the log
        for presence in self._queue.workers():
            known = presence.name in self._heard
            # first sight: dated by the worker's clock (a presence left by a dead worker)
            since = self._heard.heard(presence.name, presence.at, now, min(presence.at, now))
            since = max(since, self._silence_from)
            quiet_since[presence.name] = since
            # forgotten only once seen unchanged: a live worker whose clock is hours
            # behind must not be dropped at each first sight (found by review)
            if known and now - since > FORGET_AFTER_S:
                self._queue.withdraw(presence.name)
                continue
            views.append(self._view(presence, alive=now - since <= self._silent_after))
        self._heard.forget_others()
        self._report(views, now, quiet_since)
        self._check_versions(views)
        self.latest = views
        return views

    def _check_versions(self, views: list[WorkerView]) -> None:
        """One warning per pipeline whose live workers load different bundle versions:
        its results then alternate between versions, study by study (acceptance pass:
        four ORUs in a row said 0.2.0, 0.2.1, 0.2.0, 0.2.1)."""
        versions: dict[str, dict[str, list[str]]] = {}
        for view in views:
            if view.alive:
                for pipeline, version in view.pipelines.items():
                    versions.setdefault(pipeline, {}).setdefault(version, []).append(view.name)
        mixed = {p: v for p, v in versions.items() if len(v) > 1}
        for pipeline, by_version in sorted(mixed.items()):
            seen = tuple(sorted(by_version))
            if self._mixed.get(pipeline) != seen:
                log.warning(
                    "workers.versions_differ",
                    pipeline=pipeline,
                    versions={v: sorted(names) for v, names in sorted(by_version.items())},
                    action="install the same bundle version on every worker; until then"
                    " the results of this pipeline depend on which worker took the job",
                )
        self._mixed = {p: tuple(sorted(v)) for p, v in mixed.items()}

    @staticmethod
    def _view(presence: WorkerPresence, *, alive: bool) -> WorkerView:
        return WorkerView(
            name=presence.name,
            device=presence.device,
            pipelines=dict(presence.pipelines),
            started_at=presence.started_at,
            last_seen=presence.at,
            alive=alive,
        )

    def _report(self, views: list[WorkerView], now: float, quiet_since: dict[str, float]) -> None:
        listed = {view.name for view in views}
        alive = {view.name for view in views if view.alive}
        before = self._alive
        for name in sorted(alive - before):
            log.info("worker.seen", worker=name, alive=len(alive))
        for name in sorted(before - alive):
            if name in listed:
                log.warning(
                    "worker.silent",
                    worker=name,
                    silent_s=round(now - quiet_since.get(name, now)),
                    alive=len(alive),
                    action="check the worker's machine and its log; a job it was"
                    " running is queued again",
                )
            else:
                log.info("worker.gone", worker=name, alive=len(alive))
        self._alive = alive
        if alive:
            self._said_none = False
            return
        lost_last = bool(before)
        waited = now - self._started > START_GRACE_S
        if self._expect and not self._said_none and (lost_last or waited):
            self._said_none = True
            log.warning(
                "workers.none_alive",
                action="start `radnode worker` (or set queue.local_workers); studies"
                " are received and their jobs wait in the queue until a worker runs",
            )
