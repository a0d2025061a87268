"""The job queue: huey on SQLite (one machine) or Redis (workers on other machines).

A task carries a :class:`~service.records.JobTicket` (everything the worker needs) and
leaves a :class:`~service.records.JobReport` in huey's result store (under the task id,
put by :meth:`JobQueue.keep_report`) until the edge has recorded it. While it runs, the
worker writes a heartbeat (``hb:<job id>:<attempt>``) every few seconds; the edge reads
both, so the study index has one writer (the edge) and a worker that dies mid-job is
noticed by its silent heartbeat.

The study index, not the queue, is the truth about jobs (ARCHITECTURE step 5): the
edge re-submits a job whose run was lost, and re-running a job is harmless (results
have derived UIDs; deliveries are idempotent).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from huey import Huey, RedisHuey, SqliteHuey
from huey.exceptions import TaskException
from redis import ConnectionPool

from service.config import Settings, url_without_password
from service.errors import StartupError
from service.records import JobReport, JobTicket

log = structlog.get_logger("service.queue")


#: The one task name producers and consumers agree on.
TASK_NAME = "radnode.run_job"

JobHandler = Callable[[JobTicket], JobReport]


@dataclass(frozen=True)
class Heartbeat:
    """A worker's sign of life for one job run."""

    worker: str
    attempt: int
    at: float


class HeardClock:
    """When each beat was last heard to change, on this process's clock.

    Beats (a run's heartbeat, a worker's announcement) are dated by the machine that
    wrote them; compared with this machine's clock, one whose clock is off looked
    silent or alive by its offset (found by review: a worker a minute behind had every
    healthy run taken for lost and run twice). A beat is heard when its date changes.
    """

    def __init__(self) -> None:
        #: key -> (the beat's date, when this clock heard that date first)
        self._heard: dict[Hashable, tuple[float, float]] = {}
        self._kept: set[Hashable] = set()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._heard

    def heard(self, key: Hashable, beat_at: float, now: float, first: float | None = None) -> float:
        """When ``key``'s beat was last heard: ``now`` if its date changed, ``first``
        (default ``now``) the first time it is seen. Kept until :meth:`forget_others`."""
        prior = self._heard.get(key)
        if prior is None:
            since = now if first is None else first
        elif beat_at != prior[0]:
            since = now
        else:
            since = prior[1]
        self._heard[key] = (beat_at, since)
        self._kept.add(key)
        return since

    def forget_others(self) -> None:
        """Forget every key not heard of since the last call (runs ended, workers gone).
        Only at the end of a whole pass: a pass that ends early keeps what it had."""
        for key in set(self._heard) - self._kept:
            del self._heard[key]
        self._kept = set()


@dataclass(frozen=True)
class EdgeMark:
    """Which data_dir the edge uses, and the token in it (see :mod:`service.shared_storage`)."""

    token: str
    data_dir: str


@dataclass(frozen=True)
class WorkerPresence:
    """A worker process's sign of life, beaten while it waits for jobs too.

    Why: job heartbeats exist only while a job runs, so an edge whose every worker had
    died (or never started: ``queue.local_workers = 0`` and no ``radnode worker``
    anywhere) looked healthy while studies queued up unseen. The edge reads these
    (``/api/workers``, ``radnode_workers_alive``) and logs when none is alive.
    """

    #: ``host:pid``, as the index records the worker of a job.
    name: str
    #: Where its models run (``cpu``, ``cuda:0``).
    device: str
    #: The pipelines it loaded at start (others load on their first job) -> bundle version.
    pipelines: dict[str, str]
    started_at: float
    at: float


#: Seconds to open a connection to Redis, and to wait for any one answer. Why bounded:
#: redis-py waits forever by default, so a Redis host that drops packets (a firewall,
#: a dead VM) hung ``/readyz``, ``/metrics`` and the tracker for the kernel's TCP
#: timeout. The longest wait huey asks for is its 1 s blocking read. /readyz and
#: /metrics never wait on it: they read :class:`QueueProbe`.
REDIS_CONNECT_TIMEOUT_S = 5.0
REDIS_ANSWER_TIMEOUT_S = 5.0


def make_huey(settings: Settings) -> Huey:
    """SQLite under ``node.data_dir`` unless ``queue.url`` names a Redis server."""
    if settings.queue.url:
        pool = ConnectionPool.from_url(
            settings.queue.url,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
            socket_timeout=REDIS_ANSWER_TIMEOUT_S,
        )
        return RedisHuey("radnode", connection_pool=pool, results=True)
    path = Path(settings.node.data_dir) / "queue.sqlite3"
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteHuey("radnode", filename=str(path), results=True, fsync=True)


class JobQueue:
    """Submit tickets and read reports (the edge); run tickets (a worker)."""

    def __init__(
        self,
        settings: Settings,
        handler: JobHandler | None = None,
        heartbeat_s: float | None = None,
    ) -> None:
        self.huey = make_huey(settings)
        self._url = settings.queue.url or f"sqlite under {settings.node.data_dir}"
        self.heartbeat_s = heartbeat_s or settings.queue.heartbeat_s
        #: What runs a ticket in a worker (None: this process only submits).
        self.handler = handler

        def run_job(ticket: JobTicket, task: Any = None) -> None:
            if self.handler is None:
                raise RuntimeError("this process only submits jobs; run `radnode worker`")
            self.keep_report(str(task.id), ticket, self.handler(ticket))

        self._task = self.huey.task(name=TASK_NAME, retries=0, context=True)(run_job)

    #: How long a worker holds a finished run's report for a queue that does not answer.
    REPORT_PATIENCE_S = 3600.0

    def keep_report(self, task_id: str, ticket: JobTicket, report: JobReport) -> bool:
        """Put ``report`` where the edge reads it, trying again every heartbeat while
        the queue does not answer (for up to :data:`REPORT_PATIENCE_S`).

        Why not huey's own result storing: when Redis was down as the run ended, huey
        logged the error and dropped the report; the edge took the healthy run for lost
        and ran the job a second time (acceptance pass). The edge does not count a
        run's silence while it cannot read the queue itself (:mod:`service.tracker`).
        """
        deadline = time.monotonic() + self.REPORT_PATIENCE_S
        failing = False
        while True:
            try:
                self.huey.put_result(task_id, report)
            except Exception as exc:
                if time.monotonic() > deadline:
                    log.error("report.lost", job=ticket.job_id, reason=f"{type(exc).__name__}",
                              action="the edge runs the job again; check queue.url")  # fmt: skip
                    return False
                if not failing:
                    log.warning(
                        "report.unsaved",
                        job=ticket.job_id,
                        reason=f"{type(exc).__name__}: {exc}",
                        action="check queue.url; the worker keeps the report and tries again",
                    )
                failing = True
                time.sleep(self.heartbeat_s)
                continue
            if failing:
                log.info("report.saved", job=ticket.job_id)
            return True

    # -- the edge ---------------------------------------------------------------

    def submit(self, ticket: JobTicket) -> str:
        """Enqueue a run of ``ticket``; return its task id."""
        return str(self._task(ticket).id)

    def report(self, task_id: str) -> JobReport | None:
        """The run's report if the worker has finished it (kept until :meth:`forget`).

        A run that raised outside the job handler (its first heartbeat could not be
        written, say) left huey's error instead of a report; reading it raised on every
        tracker pass and stopped the pass for every job (found by review). It counts
        as no report: the run is lost and the tracker queues the job again."""
        try:
            value = self.huey.result(task_id, preserve=True)
        except TaskException:
            return None
        return value if isinstance(value, JobReport) else None

    def heartbeat(self, job_id: str, attempt: int) -> Heartbeat | None:
        """The latest beat of run ``attempt`` of the job.

        Keyed by attempt: a superseded run that is still going (its worker stalled, the
        edge gave up on it and queued the job again) must not pass for the new run.
        """
        value = self.huey.get(_heartbeat_key(job_id, attempt), peek=True)
        return value if isinstance(value, Heartbeat) else None

    def forget(self, job_id: str, task_id: str | None, attempts: int) -> None:
        """Drop a job's report and the heartbeats of its runs so far (and the next)."""
        for attempt in range(1, attempts + 2):
            self.huey.get(_heartbeat_key(job_id, attempt))
        if task_id:
            self.huey.get(task_id)

    def pending_task_ids(self) -> set[str]:
        """Ids of the runs still waiting in the queue."""
        return {str(task.id) for task in self.huey.pending()}

    def flush(self) -> None:
        """Drop every queued run and stored result (the edge re-submits from the index)."""
        self.huey.flush()

    def depth(self) -> int:
        """Runs waiting in the queue (not those a worker holds)."""
        return int(self.huey.pending_count())

    def check(self) -> None:
        """Raise :class:`StartupError` naming what to fix when the queue does not
        answer: a worker with a wrong address, password or TLS setting logged
        "started" and then huey's tracebacks ten times a second, for ever (found by
        review)."""
        try:
            self.huey.pending_count()
        except Exception as exc:
            raise StartupError(
                f"cannot use the queue at {url_without_password(self._url)}: "
                f"{type(exc).__name__}: {str(exc).rstrip('.')}. Check queue.url (address,"
                " password, redis:// or rediss://) and that the server is up"
            ) from exc

    # -- who is there: workers announce themselves, the edge reads ----------------

    def workers(self) -> list[WorkerPresence]:
        """Every worker that announced itself and has not withdrawn, alive or not (the
        caller judges by ``at``), by name."""
        found = []
        for key, raw in self.huey.storage.result_items().items():
            if not key.startswith(_WORKER_PREFIX):
                continue
            try:
                value = self.huey.serializer.deserialize(raw)
            except Exception:
                continue  # written by another radnode version: it re-announces itself
            if isinstance(value, WorkerPresence):
                found.append(value)
        return sorted(found, key=lambda w: w.name)

    def mark_edge(self, mark: EdgeMark) -> None:
        """Publish the edge's data_dir mark (the edge, at start and on each watch pass)."""
        self.huey.put(_EDGE_KEY, mark)

    def edge_mark(self) -> EdgeMark | None:
        """The edge's data_dir mark, if it has published one."""
        value = self.huey.get(_EDGE_KEY, peek=True)
        return value if isinstance(value, EdgeMark) else None

    def withdraw(self, name: str) -> None:
        """Forget worker ``name`` (it stopped, or the edge gave up on it)."""
        self.huey.get(_WORKER_PREFIX + name)

    # -- a worker ---------------------------------------------------------------

    @contextmanager
    def beating(self, job_id: str, worker: str, attempt: int) -> Iterator[None]:
        """Write this run's heartbeat now and every ``heartbeat_s`` until the block ends."""

        def put() -> None:
            self.huey.put(_heartbeat_key(job_id, attempt), Heartbeat(worker, attempt, time.time()))

        with self._beating(put, f"heartbeat-{job_id}", job=job_id):
            yield

    @contextmanager
    def present(self, name: str, device: str, pipelines: dict[str, str]) -> Iterator[None]:
        """Announce this worker now and every ``heartbeat_s`` until the block ends, then
        withdraw it (a worker killed without that goes silent and the edge notices)."""
        started = time.time()

        def put() -> None:
            presence = WorkerPresence(name, device, pipelines, started, time.time())
            self.huey.put(_WORKER_PREFIX + name, presence)

        try:
            with self._beating(put, "presence", worker=name):
                yield
        finally:
            # a queue that is down cannot be told: the edge sees the worker go silent
            with suppress(Exception):
                self.withdraw(name)

    @contextmanager
    def _beating(self, put: Callable[[], None], thread_name: str, **about: str) -> Iterator[None]:
        """``put()`` now and every ``heartbeat_s`` on a thread until the block ends."""
        stop = threading.Event()

        def beat() -> None:
            # A queue that is briefly unreachable must not end the heartbeat: the edge
            # would take the healthy run for dead and run the job a second time (found
            # by review: 3 s of Redis restart, two runs into one result folder).
            failing = False
            while not stop.wait(self.heartbeat_s):
                try:
                    put()
                except Exception as exc:
                    if not failing:
                        log.warning(
                            "heartbeat.failed",
                            **about,
                            reason=f"{type(exc).__name__}: {exc}",
                            action="check queue.url; the worker goes on and beats again",
                        )
                    failing = True
                else:
                    if failing:
                        log.info("heartbeat.resumed", **about)
                    failing = False

        put()  # before any work: a run the edge sees has always beaten once

        thread = threading.Thread(target=beat, name=thread_name, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def consumer(self, workers: int = 1) -> Any:
        """A huey consumer that polls often (a queued job starts within 0.04 s; each poll
        of the SQLite queue is one indexed read, Redis is not polled but blocks).
        Measured on 2 cores: polling every 0.02-0.04 s costs an idle worker 0.85 % of a
        core (0.45 % at 0.05-0.1 s, 1.6 % at 0.01-0.02 s) and took 0.04-0.06 s off the
        wait of every job, a tenth of a radiograph's whole time after completion."""
        return self.huey.create_consumer(
            workers=workers,
            worker_type="thread",
            periodic=False,
            initial_delay=0.02,
            backoff=1.2,
            max_delay=0.04,
            check_worker_health=True,
        )


#: Key prefix of the workers' presence records in huey's result store.
_WORKER_PREFIX = "worker:"
#: Key of the edge's data_dir mark.
_EDGE_KEY = "edge:data_dir"


def _heartbeat_key(job_id: str, attempt: int) -> str:
    return f"hb:{job_id}:{attempt}"


class QueueProbe:
    """The queue's reachability and depth as a background loop last read them.

    Why: ``/readyz`` and ``/metrics`` asked Redis on every call, so a Redis behind a
    dropping firewall held each for the answer timeout: a readiness probe (1 s) failed
    and took the node out of service, and a scrape ran past Prometheus's timeout, so
    ``radnode_queue_up`` was missing instead of 0 (review). The node polls every 2 s.
    """

    def __init__(self, queue: JobQueue) -> None:
        self._queue = queue
        self._depth: int | None = None
        self._polled = False

    def poll(self) -> None:
        try:
            self._depth = self._queue.depth()
        except Exception:
            self._depth = None
        self._polled = True

    def reachable(self) -> bool:
        """Whether the last poll got an answer (True before the first poll)."""
        return self._depth is not None or not self._polled

    def depth(self) -> int:
        """Runs waiting at the last poll; raises when the queue did not answer it."""
        if self._depth is None:
            raise ConnectionError("the job queue did not answer the last poll")
        return self._depth
