"""Prometheus metrics: what an operator graphs and alerts on.

One :class:`Metrics` object owns its own :class:`~prometheus_client.CollectorRegistry`
(not the library's global one), so a node, a test or a benchmark each count only what
they did, and nothing in radnode is a mutable module-level global. The node builds one
and hands it to the stages that record (ingest, completion, worker, delivery); the HTTP
API serves :meth:`Metrics.exposition` at ``GET /metrics``.

Every name starts with ``radnode_``. Labels carry only bounded, non-patient values:
an outcome word, a DIMSE status, a pipeline or destination name from the configuration,
a job state, a stage name. Never a UID, a study key, an AE title or an address: those
are unbounded (one time series each) and belong in the logs. ``docs/operations.md``
lists every metric with its meaning.

Values that are a property of the moment rather than a count of events (free disk
space, jobs per state, queue depth) are read when Prometheus scrapes, from callables
given to the constructor, so they cannot go stale.
"""

from __future__ import annotations

import math
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dicom_nodes.status import StoreStatus
from service import __version__
from service.records import JobRecord, JobState

log = structlog.get_logger("service.metrics")

#: Histogram buckets in seconds, from a fast stage (0.1 s) to a slow study (30 min).
DURATION_BUCKETS: tuple[float, ...] = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
)

#: Outcomes of one received C-STORE as counted by ``radnode_instances_received_total``.
INSTANCE_OUTCOMES = ("stored", "duplicate", "refused")
#: ``accepted`` and ``rejected`` are counted when an association is requested,
#: ``released`` and ``aborted`` when an accepted one ends.
ASSOCIATION_OUTCOMES = ("accepted", "rejected", "released", "aborted")
#: ``delivered``: the peer acknowledged; ``retry``: a try failed and will be repeated;
#: ``failed``: the last try failed (the delivery is dead-lettered, see dead letters).
DELIVERY_OUTCOMES = ("delivered", "retry", "failed")
#: States a job run ends in (``radnode_jobs_finished_total``).
JOB_STATES = ("done", "failed", "refused")


class ReceiveCounter(Protocol):
    """What the receive path counts: :class:`Metrics` in the node, a pipe to the node in
    a receiver process (:class:`service.receivers.CountsOverPipe`)."""

    def instance_stored(self, size_bytes: int) -> None: ...

    def instance_duplicate(self, size_bytes: int) -> None: ...

    def instance_refused(self, status: int, size_bytes: int) -> None: ...

    def association(self, outcome: str) -> None: ...


#: Returns the number of jobs per ``(pipeline, state)`` as the study index knows them.
JobCounts = Callable[[], Mapping[tuple[str, str], int]]


def _or_nan(read: Callable[[], float], metric: str) -> float:
    """A gauge's value read at scrape time, NaN when it cannot be read: a queue that is
    unreachable must not fail the whole scrape (found by review: /metrics answered
    500 while Redis was down, so every other series went stale with it)."""
    try:
        return float(read())
    except Exception as exc:
        now = time.monotonic()
        if now - _READ_FAILURES_SAID.get(metric, -math.inf) >= READ_FAILURE_EVERY_S:
            _READ_FAILURES_SAID[metric] = now
            log.warning(
                "metrics.read_failed",
                metric=metric,
                reason=type(exc).__name__,
                action="check the queue (queue.url); the other metrics were served; said"
                " once a minute while it lasts",
            )
        return math.nan


#: A gauge that cannot be read is logged once a minute, not at every scrape
#: (acceptance pass: two lines per scrape through a Redis outage, ~480 an hour).
READ_FAILURE_EVERY_S = 60.0
#: By metric: when its failure to be read was last logged (monotonic).
_READ_FAILURES_SAID: dict[str, float] = {}


def _check(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)} (got {value!r})")
    return value


def _free_bytes(path: Path) -> float:
    try:
        return float(shutil.disk_usage(path).free)
    except OSError:
        # A missing or unreadable data dir must not break the whole scrape; NaN makes
        # the gauge visibly wrong and /readyz says why.
        return math.nan


def _read_at_scrape(source: Callable[[], Mapping[Any, Any]], event: str) -> dict[Any, Any] | None:
    """``source()`` as a dict, or None (logged) when it fails: a scrape must still return
    every other metric when the index or the outbox is busy or broken, and the gap in
    this one is not silent."""
    try:
        return dict(source())
    except Exception as exc:
        log.warning(
            event,
            reason=f"{type(exc).__name__}: {exc}",
            action="check that node.data_dir is readable; the next scrape retries",
        )
        return None


class _JobCountsCollector(Collector):
    """``radnode_jobs``: jobs per pipeline and state, read from the index at scrape."""

    def __init__(self, source: JobCounts) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "radnode_jobs",
            "Jobs per pipeline and state, as the study index holds them now.",
            labels=["pipeline", "state"],
        )
        counts = _read_at_scrape(self._source, "metrics.job_counts_failed")
        if counts is None:
            return
        for (pipeline, state), count in sorted(counts.items()):
            family.add_metric([pipeline, state], count)
        yield family


class _WaitingDeliveriesCollector(Collector):
    """``radnode_deliveries_waiting`` and the age of the oldest, read from the outbox at
    scrape: "results not delivered for 30 minutes" needs a gauge, not a counter of tries
    (acceptance pass)."""

    def __init__(
        self,
        source: Callable[[], Mapping[str, tuple[int, float]]],
        destinations: Sequence[str],
        clock: Callable[[], float],
        dead: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self._source, self._destinations, self._clock = source, destinations, clock
        self._dead = dead

    def collect(self) -> Iterator[GaugeMetricFamily]:
        count = GaugeMetricFamily(
            "radnode_deliveries_waiting",
            "Results queued for a destination and not sent yet (pending; dead letters are"
            " radnode_dead_letters_total), by destination.",
            labels=["destination"],
        )
        age = GaugeMetricFamily(
            "radnode_deliveries_oldest_waiting_seconds",
            "Seconds since the oldest waiting delivery of a destination was queued; 0 when"
            " none waits.",
            labels=["destination"],
        )
        waiting = _read_at_scrape(self._source, "metrics.deliveries_failed")
        if waiting is None:
            return
        now = self._clock()
        for destination in sorted({*self._destinations, *waiting}):
            pending, oldest = waiting.get(destination, (0, now))
            count.add_metric([destination], pending)
            age.add_metric([destination], max(now - oldest, 0.0) if pending else 0.0)
        yield count
        yield age
        if self._dead is None:
            return
        dead = _read_at_scrape(self._dead, "metrics.deliveries_failed")
        if dead is None:
            return
        open_letters = GaugeMetricFamily(
            "radnode_dead_letters_open",
            "Dead letters not resent yet, by destination: results a destination never got"
            " (operator action needed; survives restarts, unlike radnode_dead_letters_total).",
            labels=["destination"],
        )
        for destination in sorted({*self._destinations, *dead}):
            open_letters.add_metric([destination], dead.get(destination, 0))
        yield open_letters


class Metrics:
    """Every radnode metric, registered in one registry this object owns.

    ``data_dir`` feeds ``radnode_disk_free_bytes``; ``job_counts`` feeds
    ``radnode_jobs``; ``queue_depth`` (if given) feeds ``radnode_queue_depth`` at
    scrape, otherwise :meth:`set_queue_depth` sets it. All three are optional so a
    stage can be tested with a bare ``Metrics()``.
    """

    def __init__(
        self,
        *,
        data_dir: Path | None = None,
        job_counts: JobCounts | None = None,
        queue_depth: Callable[[], int] | None = None,
        workers_alive: Callable[[], int] | None = None,
        queue_reachable: Callable[[], bool] | None = None,
    ) -> None:
        # The extra ``*_created`` series (one per counter and histogram child) double
        # what Prometheus stores and are used by nothing radnode documents. This is
        # a process-wide switch of the library; every radnode registry wants it off.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        info = Gauge(
            "radnode_info", "Always 1; labels say which radnode runs.", ["version"], registry=r
        )
        info.labels(version=__version__).set(1)

        # -- receive ------------------------------------------------------------
        self.instances_received = Counter(
            "radnode_instances_received",
            "C-STORE requests by outcome: stored, duplicate (already held), refused.",
            ["outcome"],
            registry=r,
        )
        self.bytes_received = Counter(
            "radnode_received_bytes",
            "Encoded data set bytes of C-STORE requests, by the same outcome.",
            ["outcome"],
            registry=r,
        )
        self.store_refusals = Counter(
            "radnode_store_refusals",
            "C-STOREs answered with a failure status, by status code and reason.",
            ["status", "reason"],
            registry=r,
        )
        self.associations = Counter(
            "radnode_associations",
            "Associations: accepted or rejected when requested; released or aborted at the end.",
            ["outcome"],
            registry=r,
        )
        self.studies_completed = Counter(
            "radnode_studies_completed",
            "Studies marked complete after their quiet period (a reopened study counts again).",
            registry=r,
        )
        self.studies_purged = Counter(
            "radnode_studies_purged",
            "Studies removed by retention (study.keep_days): spool files, results, rows.",
            registry=r,
        )
        self.bytes_purged = Counter(
            "radnode_purged_bytes",
            "Bytes of spool files and results removed by retention.",
            registry=r,
        )

        # -- jobs -----------------------------------------------------------------
        self.jobs_finished = Counter(
            "radnode_jobs_finished",
            "Job runs that finished, by pipeline and state: done, failed, refused.",
            ["pipeline", "state"],
            registry=r,
        )
        self.inference_seconds = Histogram(
            "radnode_inference_seconds",
            "Seconds the network took for one job (the bundle's inferer), by pipeline.",
            ["pipeline"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "radnode_stage_seconds",
            "Seconds of each stage of a job (load, preprocess, inference, postprocess, "
            "write, deliver), by pipeline and stage.",
            ["pipeline", "stage"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "radnode_end_to_end_seconds",
            "Seconds from the last instance of the study received to the job finished "
            "(results written and handed to delivery), by pipeline; done jobs only.",
            ["pipeline"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "radnode_queue_depth",
            "Jobs waiting in the job queue, not yet taken by a worker.",
            registry=r,
        )
        if queue_depth is not None:
            self.queue_depth.set_function(lambda: _or_nan(queue_depth, "radnode_queue_depth"))
        if queue_reachable is not None:
            up = Gauge(
                "radnode_queue_up",
                "1 when the job queue (queue.url) answers, 0 when it does not: the node "
                "still receives, but no job starts until it answers again.",
                registry=r,
            )
            up.set_function(lambda: _or_nan(lambda: int(queue_reachable()), "radnode_queue_up"))
        if workers_alive is not None:
            alive = Gauge(
                "radnode_workers_alive",
                "Worker processes (local and remote) heard from within 4 heartbeats "
                "(queue.heartbeat_s); 0 with routes configured means jobs wait.",
                registry=r,
            )
            alive.set_function(lambda: _or_nan(workers_alive, "radnode_workers_alive"))
        if job_counts is not None:
            r.register(_JobCountsCollector(job_counts))

        # -- delivery -------------------------------------------------------------
        self.deliveries = Counter(
            "radnode_deliveries",
            "Delivery tries by destination and outcome: delivered, retry, failed.",
            ["destination", "outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "radnode_dead_letters",
            "Deliveries given up after the last retry (operator action needed), by destination.",
            ["destination"],
            registry=r,
        )

        # Series with a fixed set of labels exist from the start at 0, so rate() and
        # alerts work before the first event of each kind.
        for outcome in INSTANCE_OUTCOMES:
            self.instances_received.labels(outcome=outcome)
            self.bytes_received.labels(outcome=outcome)
        for outcome in ASSOCIATION_OUTCOMES:
            self.associations.labels(outcome=outcome)
        for status in StoreStatus:
            if status is not StoreStatus.SUCCESS:
                self.store_refusals.labels(status=f"0x{status:04X}", reason=status.name.lower())

        # -- host -----------------------------------------------------------------
        if data_dir is not None:
            disk = Gauge(
                "radnode_disk_free_bytes",
                "Free bytes on the file system of node.data_dir, read at scrape.",
                registry=r,
            )
            disk.set_function(lambda: _free_bytes(data_dir))

    def start_at_zero(self, *, destinations: Iterable[str], pipelines: Iterable[str]) -> None:
        """Create the series of the configured destinations and pipelines at 0.

        Why: a labelled counter that first appears at 1 (or at 125, after a burst of
        refusals inside one scrape) has no increase() for an alert to see; the first
        dead letter after every restart went unnoticed (acceptance pass).
        """
        for destination in destinations:
            for outcome in DELIVERY_OUTCOMES:
                self.deliveries.labels(destination=destination, outcome=outcome)
            self.dead_letters.labels(destination=destination)
        for pipeline in pipelines:
            for state in JOB_STATES:
                self.jobs_finished.labels(pipeline=pipeline, state=state)

    def watch_deliveries(
        self,
        waiting: Callable[[], Mapping[str, tuple[int, float]]],
        destinations: Sequence[str],
        clock: Callable[[], float] = time.time,
        dead: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        """Serve ``radnode_deliveries_waiting`` and its age from ``waiting`` (the
        outbox's :meth:`~service.delivery.Outbox.waiting`), and
        ``radnode_dead_letters_open`` from ``dead`` (dead letters by destination), at
        each scrape."""
        self.registry.register(_WaitingDeliveriesCollector(waiting, destinations, clock, dead=dead))

    # -- receive path -----------------------------------------------------------

    def instance_stored(self, size_bytes: int) -> None:
        self._instance("stored", size_bytes)

    def instance_duplicate(self, size_bytes: int) -> None:
        self._instance("duplicate", size_bytes)

    def instance_refused(self, status: int, size_bytes: int) -> None:
        """Count a C-STORE answered with failure ``status`` (a DIMSE status code)."""
        self._instance("refused", size_bytes)
        try:
            reason = StoreStatus(status).name.lower()
        except ValueError:
            reason = "other"
        self.store_refusals.labels(status=f"0x{status:04X}", reason=reason).inc()

    def _instance(self, outcome: str, size_bytes: int) -> None:
        self.instances_received.labels(outcome=outcome).inc()
        self.bytes_received.labels(outcome=outcome).inc(size_bytes)

    def association(self, outcome: str) -> None:
        """Count an association event; ``outcome`` is one of :data:`ASSOCIATION_OUTCOMES`.

        Its signature fits :class:`dicom_nodes.scp.StorageSCP`'s ``on_association``.
        """
        self.associations.labels(outcome=_check(outcome, ASSOCIATION_OUTCOMES, "outcome")).inc()

    def study_completed(self) -> None:
        self.studies_completed.inc()

    # -- jobs -------------------------------------------------------------------

    def study_purged(self, size_bytes: int) -> None:
        self.studies_purged.inc()
        self.bytes_purged.inc(size_bytes)

    def job_finished(
        self,
        pipeline: str,
        state: str,
        timings: Mapping[str, float] | None = None,
        end_to_end_s: float | None = None,
    ) -> None:
        """Count a finished run (``state``: done, failed or refused) and its timings."""
        self.jobs_finished.labels(pipeline=pipeline, state=str(state)).inc()
        if timings:
            self.job_timings(pipeline, timings)
        if end_to_end_s is not None:
            self.end_to_end(pipeline, end_to_end_s)

    def job_timings(self, pipeline: str, timings: Mapping[str, float]) -> None:
        """Observe a finished run's stage seconds, as in ``JobRecord.timings``.

        Keys are stage names with an ``_s`` suffix (``load_s``, ``inference_s`` …);
        ``inference_s`` also feeds ``radnode_inference_seconds``.
        """
        for key, seconds in timings.items():
            stage = key.removesuffix("_s")
            self.stage_seconds.labels(pipeline=pipeline, stage=stage).observe(seconds)
            if stage == "inference":
                self.inference_seconds.labels(pipeline=pipeline).observe(seconds)

    def end_to_end(self, pipeline: str, seconds: float) -> None:
        self.end_to_end_seconds.labels(pipeline=pipeline).observe(seconds)

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    # -- delivery ---------------------------------------------------------------

    def delivery(self, destination: str, outcome: str) -> None:
        """Count one delivery try; ``outcome`` is one of :data:`DELIVERY_OUTCOMES`."""
        _check(outcome, DELIVERY_OUTCOMES, "outcome")
        self.deliveries.labels(destination=destination, outcome=outcome).inc()

    def dead_letter(self, destination: str) -> None:
        self.dead_letters.labels(destination=destination).inc()

    # -- exposition -------------------------------------------------------------

    #: The Content-Type of :meth:`exposition` (the Prometheus text format).
    content_type = CONTENT_TYPE_LATEST

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format, as served at ``GET /metrics``."""
        return generate_latest(self.registry)


class FinishedJobRecorder:
    """Turns jobs finished by worker processes into metrics of the node's process.

    Workers run in their own processes (``queue.local_workers``, ``radnode worker`` on
    other machines), so counters they incremented would never reach the node's
    ``/metrics``. The study index is shared and holds each run's state and timings:
    the node calls :meth:`poll` every few seconds, and each run finished since the
    last poll is counted once. :meth:`prime` at start marks what is already finished
    as seen, so a restart does not count old runs again.
    """

    def __init__(
        self,
        metrics: Metrics,
        recent_jobs: Callable[[int], Sequence[JobRecord]],
        last_received_at: Callable[[str], float | None] | None = None,
        window: int = 500,
    ) -> None:
        """``recent_jobs(limit)``: newest jobs first (``StudyIndex.recent_jobs``);
        ``last_received_at(study_uid)``: when the job's study got its last instance,
        for ``radnode_end_to_end_seconds``. ``window`` must exceed the jobs created
        between two polls.
        """
        self._metrics = metrics
        self._recent_jobs = recent_jobs
        self._last_received_at = last_received_at
        self._window = window
        self._seen: OrderedDict[tuple[str, float], None] = OrderedDict()

    def prime(self) -> None:
        """Mark every run finished so far as seen, without counting it."""
        for job in self._finished():
            self._remember(job)

    def poll(self) -> int:
        """Count the runs finished since the last call; returns how many."""
        counted = 0
        for job in self._finished():
            if (job.job_id, job.finished_at) in self._seen:
                continue
            self._remember(job)
            end_to_end = None
            # only runs that made results: a refusal or failure is not a latency
            # (the second acceptance pass saw refused jobs in the histogram)
            done = job.state is JobState.DONE and job.finished_at is not None
            if done and self._last_received_at is not None:
                received = self._last_received_at(job.study_uid)
                if received is not None:
                    end_to_end = max(job.finished_at - received, 0.0)
            self._metrics.job_finished(job.pipeline, job.state, job.timings, end_to_end)
            counted += 1
        return counted

    def _finished(self) -> list[JobRecord]:
        jobs = self._recent_jobs(self._window)
        return [j for j in jobs if j.state.finished and j.finished_at is not None]

    def _remember(self, job: JobRecord) -> None:
        assert job.finished_at is not None
        self._seen[(job.job_id, job.finished_at)] = None
        while len(self._seen) > 4 * self._window:
            self._seen.popitem(last=False)
