"""Workers: run a job ticket from the queue and report how it went.

A worker is its own process (``radnode worker``; ``radnode serve`` starts
``queue.local_workers`` of them and restarts one that dies), so a model that crashes or
exhausts memory never takes the Storage SCP down, and the SCP keeps answering while a
model runs. Workers are stateless: the ticket says what to read (shared storage) and
where to write; they never touch the study index (the edge records their reports, see
``service.tracker``). Bundles are loaded once per worker and reused.

A run ends in one of three states, each with one ``job.finished`` log line:

* ``done``: result files under the ticket's result folder, plus the deliverables
  built for the job's destinations (``service.publish``);
* ``refused``: the series is not usable by the pipeline (uneven spacing, wrong
  modality, a single slice for a 3D model...); the reason says what to do;
* ``failed``: the bundle or the node failed; the error names the stage.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from service import run_claim
from service.beside import beside
from service.collector import settle_garbage_collector
from service.config import Settings
from service.errors import RadnodeError, SourceUnavailable, StartupError, out_of_space
from service.observability import redact_quoted
from service.pipeline.bundle import (
    BundleError,
    LoadedBundle,
    bundle_identity,
    choose_device,
    discover_bundles,
    load_bundle,
)
from service.pipeline.inference import InputMismatch, PipelineFailed, run_bundle
from service.pipeline.projection import frontal_projection
from service.pipeline.result import BundleIdentity, PipelineResult
from service.pipeline.volume import SeriesRefused, Volume, load_series
from service.publish import Publication, ResultPublisher
from service.queue import JobQueue
from service.records import JobReport, JobState, JobTicket
from service.shared_storage import check_shared_storage
from service.supervisor import TIMED_OUT_EXIT, child_command
from service.warmup import warm_up_writers
from service.writers.files import result_summary, write_result_files

log = structlog.get_logger("service.worker")


#: Loads of one bundle that ended its worker process before it is not loaded again.
QUARANTINE_AFTER = 2


class PipelineCache:
    """Bundles loaded once per process, by pipeline name.

    ``crash_marks``: a folder where a load in progress is marked (per host and bundle)
    and the mark removed when the load returns, raised or not. A mark still there at
    the next load means the process died loading that bundle (out of memory, a crash in
    native code); after :data:`QUARANTINE_AFTER` such deaths the bundle is refused with
    what to do, and the worker serves the other pipelines. Why: such a bundle kept the
    worker in a restart loop and every pipeline down with it (acceptance pass).

    A bundle whose files changed since it was loaded (configs, weights, scripts) is
    loaded again at its next job: a job failed by a bundle error says "fix the bundle,
    then retry the job", and the retry ran the bundle the worker had loaded at start
    (acceptance pass).
    """

    def __init__(
        self, models_dir: Path, device: str | None = None, crash_marks: Path | None = None
    ) -> None:
        self.models_dir = Path(models_dir)
        self.device = choose_device(device)
        self.crash_marks = crash_marks
        self._loaded: dict[str, LoadedBundle] = {}
        self._fingerprints: dict[str, tuple[tuple[str, int, int], ...]] = {}
        self._lock = threading.Lock()

    def _mark(self, name: str) -> Path | None:
        if self.crash_marks is None:
            return None
        return self.crash_marks / f"loading-{socket.gethostname()}-{name}"

    def _begin_load(self, name: str) -> Path | None:
        """Mark a load of ``name``; raise BundleError if loads of it killed the process."""
        mark = self._mark(name)
        if mark is None:
            return None
        try:
            deaths = int(mark.read_text() or 0) if mark.exists() else 0
        except (OSError, ValueError):
            deaths = 0
        if deaths >= QUARANTINE_AFTER:
            reason = (
                f"bundle {name}: quarantined: the worker died {deaths} times while loading"
                f" it (memory? a crash in native code); fix the bundle, then delete {mark}"
                " and restart the worker"
            )
            log.error("pipeline.quarantined", pipeline=name, deaths=deaths, action=reason)
            raise BundleError(reason)
        try:
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.write_text(str(deaths + 1))
        except OSError:
            return None  # no marks where none can be written; loading goes on
        return mark

    def get(self, name: str) -> LoadedBundle:
        with self._lock:
            fingerprint = bundle_fingerprint(self.models_dir / name)
            if name in self._loaded and self._fingerprints.get(name) != fingerprint:
                log.info("pipeline.changed", pipeline=name,
                         action="none: the bundle is loaded again for this job")  # fmt: skip
                del self._loaded[name]
            if name not in self._loaded:
                specs, problems = discover_bundles(self.models_dir)
                if name not in specs:
                    why = problems.get(name) or (
                        f"no bundle folder {name} in {self.models_dir}; install the bundle"
                        " there or fix the pipeline name (a route's, or radnode run --pipeline)"
                    )
                    raise BundleError(why)
                started = time.perf_counter()
                mark = self._begin_load(name)
                try:
                    self._loaded[name] = load_bundle(specs[name], self.device)
                    self._fingerprints[name] = fingerprint
                finally:  # returned or raised: the process lived through the load
                    if mark is not None:
                        mark.unlink(missing_ok=True)
                log.info(
                    "pipeline.loaded",
                    pipeline=name,
                    version=specs[name].identity.version,
                    device=str(self.device),
                    load_s=round(time.perf_counter() - started, 3),
                    swapped=list(self._loaded[name].swapped),
                )
            return self._loaded[name]

    def dimensions(self, name: str) -> int | None:
        """The input dimensions (2 or 3) of bundle ``name``, loaded or not; None when
        there is no such usable bundle (its job fails when it is loaded)."""
        with self._lock:
            if name in self._loaded:
                return self._loaded[name].spec.dimensions
        try:
            spec = discover_bundles(self.models_dir)[0].get(name)
        except OSError:  # the models folder cannot be read: the load says so, with its action
            return None
        return None if spec is None else spec.dimensions

    def identity(self, name: str) -> BundleIdentity:
        """Who ``name`` is, loaded or not (:func:`bundle_identity`)."""
        with self._lock:
            if name in self._loaded:
                return self._loaded[name].spec.identity
        return bundle_identity(self.models_dir, name)

    def loaded(self) -> dict[str, str]:
        """The bundles loaded so far: pipeline name -> bundle version."""
        with self._lock:
            return {name: b.spec.identity.version for name, b in sorted(self._loaded.items())}

    def preload(self, names: list[str]) -> dict[str, str]:
        """Load these bundles now, so a study's first job does not wait for its model.
        Returns the problems by pipeline name.

        A bundle that cannot be loaded is logged here and refused again, with its
        reason, by the job that needs it; the worker still serves the others.
        """
        problems = {}
        for name in dict.fromkeys(names):
            # named before it loads: a bundle that kills the process (out of memory, a
            # crash in native code) is the last one named (acceptance pass)
            log.info("pipeline.preloading", pipeline=name)
            try:
                self.get(name)
            except Exception as exc:
                problems[name] = f"{type(exc).__name__}: {exc}"
                log.error(
                    "pipeline.preload_failed",
                    pipeline=name,
                    reason=problems[name],
                    action="fix or install the bundle; its jobs fail until then",
                )
        return problems


class JobRunner:
    """Runs one job ticket at a time in a worker process; never touches the study index."""

    def __init__(
        self,
        settings: Settings,
        cache: PipelineCache,
        publisher: ResultPublisher,
        queue: JobQueue | None = None,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.publisher = publisher
        self.queue = queue

    def run(self, ticket: JobTicket) -> JobReport:
        """Run the ticket (with a heartbeat when a queue is attached); report the outcome.

        Every log line of the run carries its job id, those of the series reader and
        the writers too (they do not know the job)."""
        with structlog.contextvars.bound_contextvars(job=ticket.job_id):
            if self.queue is None:
                return self._run(ticket)
            with (
                self.queue.beating(ticket.job_id, worker_name(), ticket.attempt),
                _time_limit(self.settings.queue.job_timeout_s, ticket),
            ):
                return self._run(ticket)

    def _run(self, ticket: JobTicket) -> JobReport:
        bound = log.bind(job=ticket.job_id, study=ticket.study_key, pipeline=ticket.pipeline)
        bound.info("job.started", attempt=ticket.attempt, worker=worker_name())
        stage = "load"
        try:
            started = time.perf_counter()
            out_dir = Path(ticket.result_dir)
            run_claim.claim(out_dir, ticket.attempt)
            if self.cache.dimensions(ticket.pipeline) == 2:
                ticket = self._frontal_only(ticket, bound)
            volume = load_series(list(ticket.series_paths), scratch_dir=out_dir)
            load_s = time.perf_counter() - started
            stage = "model"
            bundle = self.cache.get(ticket.pipeline)
            stage = "inference"
            result = run_bundle(bundle, volume, load_s=load_s)
            stage = "write"
            run_claim.check(out_dir, ticket.attempt)  # taken for lost and run again meanwhile?
            written = time.perf_counter()
            publication = self._write_results(ticket, result, volume, out_dir)
            write_s = time.perf_counter() - written
        except run_claim.RunSuperseded as exc:
            bound.warning("job.run_superseded", attempt=ticket.attempt, reason=str(exc),
                          action="none: the later run's results stand")  # fmt: skip
            return JobReport(ticket.job_id, worker_name(), JobState.FAILED, error=str(exc))
        except SourceUnavailable as exc:
            return self._end(ticket, JobState.FAILED, str(exc), bound, action=_STORAGE_ACTION)
        except (SeriesRefused, InputMismatch) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            return self._refused(ticket, reason, bound)
        except (BundleError, PipelineFailed) as exc:
            return self._end(ticket, JobState.FAILED, str(exc), bound)
        except Exception as exc:
            if out_of_space(exc):
                return self._end(ticket, JobState.FAILED, _NO_SPACE, bound, action=_SPACE_ACTION)
            if isinstance(exc, RadnodeError):
                return self._end(ticket, JobState.FAILED, f"{stage}: {exc}", bound)
            bound.exception(
                "job.crashed", stage=stage, action="report this as a bug with the job id"
            )
            return self._end(ticket, JobState.FAILED, f"{stage}: {type(exc).__name__}: {exc}",
                             bound)  # fmt: skip
        timings = {
            "load_s": round(result.timings.load_s, 4),
            "preprocess_s": round(result.timings.preprocess_s, 4),
            "inference_s": round(result.timings.inference_s, 4),
            "postprocess_s": round(result.timings.postprocess_s, 4),
            "write_s": round(write_s, 4),
        }
        summary = result_summary(result, volume)
        bound.info(
            "job.finished",
            state=JobState.DONE.value,
            device=result.device,
            **timings,
            findings=summary.get("findings"),
            segments=[
                {"label": s["label"], "volume_ml": s["volume_ml"]}
                for s in summary.get("segments", [])
            ]
            or None,
            deliverables=len(publication.deliverables),
            not_sent=list(publication.not_sent) or None,
            preliminary=ticket.preliminary or None,
        )
        return JobReport(
            job_id=ticket.job_id,
            worker=worker_name(),
            state=JobState.DONE,
            result_dir=str(out_dir),
            timings=timings,
            deliverables=publication.deliverables,
            error="; ".join(publication.not_sent) or None,
        )

    def _write_results(
        self, ticket: JobTicket, result: PipelineResult, volume: Volume, out_dir: Path
    ) -> Publication:
        """The job's files (result.json, NIfTI copies) and its DICOM results, at once.

        Why at once: the NIfTI copies are mostly gzip, which runs without the GIL, and
        the DICOM objects are mostly Python; side by side a 300-slice CT segmentation's
        writing took 0.70 s instead of 0.84-0.96 s one after the other, and every result
        reaches the PACS that much sooner (issue 11's end-to-end target).
        """
        with beside("result-files", write_result_files, result, volume, out_dir,
                    preliminary=ticket.preliminary) as files:  # fmt: skip
            publication = self.publisher.prepare(ticket, result, volume)
            files.result()
        run_claim.check(out_dir, ticket.attempt)  # again: writing takes seconds
        return publication

    @staticmethod
    def _frontal_only(ticket: JobTicket, bound: Any) -> JobTicket:
        """``ticket`` narrowed to the frontal image of a series of radiographs (PA and
        lateral in one series), which a 2D pipeline reads; its results reference that
        image only (:func:`~service.pipeline.projection.frontal_projection`)."""
        chosen = frontal_projection(ticket.series_paths)
        if len(chosen) == len(ticket.series_paths):
            return ticket
        bound.info("job.image_chosen", images=len(ticket.series_paths), reason="frontal view")
        return replace(ticket, series_paths=tuple(chosen))

    def _refused(self, ticket: JobTicket, reason: str, bound: Any) -> JobReport:
        """A refusal, with the "not analyzed" SR for the destinations that want one.

        A preliminary job's refusal says first that an instance was lost in transit: a
        missing slice reads as uneven spacing, which the PACS sending the study again
        mends, where "fix the series" would send the operator the wrong way (review).
        """
        action = None
        if ticket.preliminary:
            reason = (
                f"{reason} (an instance of this study was lost in transit: if the reason is"
                " about missing images, the PACS sending the study again may mend it)"
            )
            action = (
                "if the reason is about missing images or spacing, have the PACS send the"
                " study again (study.instance_lost); else fix the series or the route,"
                " then retry the job"
            )
        report = self._end(ticket, JobState.REFUSED, reason, bound, action=action)
        try:
            run_claim.check(Path(ticket.result_dir), ticket.attempt)
        except run_claim.RunSuperseded:
            return report  # a later run owns the folder: it makes its own report
        publication = self.publisher.prepare_not_analyzed(
            ticket, lambda: self.cache.identity(ticket.pipeline), report.error or reason
        )
        if not (publication.deliverables or publication.not_sent):
            return report
        return replace(
            report,
            error="; ".join((report.error or reason, *publication.not_sent)),
            result_dir=ticket.result_dir,
            deliverables=publication.deliverables,
        )

    def _end(
        self,
        ticket: JobTicket,
        state: JobState,
        reason: str,
        bound: Any,
        *,
        action: str | None = None,
    ) -> JobReport:
        reason = redact_quoted(reason)  # from exceptions, which may quote header values
        if action is None:
            action = (
                "see the reason; fix the series or the route, then retry the job"
                if state is JobState.REFUSED
                else "check the pipeline's bundle and the log above, then retry the job"
            )
        bound.warning("job.finished", state=state.value, reason=reason, action=action)
        return JobReport(job_id=ticket.job_id, worker=worker_name(), state=state, error=reason)


#: A job whose results could not be written for lack of space: the disk's fault, and
#: fixed by freeing it (acceptance pass: "check the pipeline's bundle" and "report this
#: with the job id" were the advice).
_NO_SPACE = "no space left on the disk of the results folder (node.data_dir) to write the results"
_SPACE_ACTION = "free disk space under node.data_dir (or raise the quota), then retry the job"


#: What to do when a worker cannot read its job's spool files.
_STORAGE_ACTION = (
    "if the study's files were removed, resend it from the PACS; if this worker runs on"
    " another machine, mount node.data_dir there at the edge's path (docs/scale-out.md)"
    " or stop this worker; then retry the job"
)


@contextlib.contextmanager
def _time_limit(seconds: float, ticket: JobTicket) -> Iterator[None]:
    """End this worker process if the block runs longer than ``seconds`` (0: no limit).

    Why a process exit: a bundle that hangs (a transform waiting for ever) cannot be
    interrupted from another thread, and it held the worker, so every other pipeline's
    jobs waited with nothing saying why (acceptance pass). The worker exits; radnode
    serve (or the service manager, for a remote worker) starts it again, the edge sees
    the run lost and queues the job again, up to queue.max_attempts.
    """
    if not seconds:
        yield
        return

    def expire() -> None:
        log.error(
            "job.timed_out",
            job=ticket.job_id,
            pipeline=ticket.pipeline,
            seconds=seconds,
            action="the worker ends and is restarted, the job is tried again up to"
            " queue.max_attempts; check the bundle, or raise queue.job_timeout_s",
        )
        os._exit(TIMED_OUT_EXIT)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def bundle_fingerprint(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """Path, size and modification time of every file of a bundle that loading reads
    (``configs/``, ``models/``, ``scripts/``): a few dozen ``stat`` calls, cheap next to
    a job. Empty when the folder cannot be read (the load then says why)."""
    files: list[tuple[str, int, int]] = []
    for part in ("configs", "models", "scripts"):
        try:
            for path in (folder / part).rglob("*"):
                if "__pycache__" in path.parts or not path.is_file():
                    continue
                stat = path.stat()
                files.append((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
        except OSError:
            continue
    return tuple(sorted(files))


def worker_name(pid: int | None = None) -> str:
    """``host:pid``: how the index records which worker holds a job."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def run_worker(settings: Settings, *, local: bool = False) -> None:
    """``radnode worker``: consume jobs until SIGINT/SIGTERM.

    A worker on another machine (not ``local``, i.e. not started by ``radnode serve``)
    that cannot load a pipeline of an enabled route refuses to start: it would take
    that pipeline's jobs from the shared queue and fail each in milliseconds, far more
    than its share (found by review: 5 of 6 jobs failed, the good worker idle). A local
    worker shares the node's models folder, whose problems the node reports; it still
    serves the other pipelines."""
    no_huge_pages_for_arrays()
    queue = JobQueue(settings)
    queue.check()  # before anything slow: a wrong queue.url ends the worker with a reason
    if not local:
        check_shared_storage(queue)
    cache = PipelineCache(
        settings.models.dir,
        settings.models.device,
        crash_marks=Path(settings.node.data_dir) / "workers",
    )
    runner = JobRunner(settings, cache, ResultPublisher(settings), queue)
    queue.handler = runner.run
    # huey's consumer stops gracefully on SIGINT; make SIGTERM (docker stop, the node
    # going away) do the same, from here on: a stop while a bundle loads then unwinds
    # the load, and it is not taken for a load that killed the worker (PipelineCache)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    # the models of the enabled routes are loaded before the first job is taken
    problems = cache.preload([route.pipeline for route in settings.routes if route.enabled])
    if problems and not local:
        listed = "; ".join(f"{name}: {reason}" for name, reason in problems.items())
        raise StartupError(
            f"this worker cannot run every enabled route's pipeline ({listed}). Install or"
            f" fix the bundles in models.dir ({settings.models.dir}), or disable those"
            " routes: every worker of a queue must be able to run every job"
        )
    warm_up_writers()  # so is the one-time work of the result writers
    settle_garbage_collector()  # models and libraries stay out of every collection
    log.info("worker.started", pid=os.getpid(), device=str(cache.device),
             models_dir=str(settings.models.dir))  # fmt: skip
    consumer = queue.consumer()
    try:
        with queue.present(worker_name(), str(cache.device), cache.loaded()):
            consumer.run()
    finally:
        log.info("worker.stopped", pid=os.getpid())


def no_huge_pages_for_arrays() -> None:
    """Stop numpy asking for transparent huge pages on each large array.

    numpy marks every array over 4 MiB ``MADV_HUGEPAGE``; with the kernel's default
    ``defrag=madvise`` the first touch of such an array may stall in direct memory
    compaction. Measured in a worker on a 300-slice CT (five jobs): postprocessing
    0.58-0.63 s with it, 0.18-0.19 s without (the label map's 78 MB of new arrays); the
    other stages unchanged. torch's own allocations are not affected.
    """
    setter = getattr(getattr(np, "_core", np).multiarray, "_set_madvise_hugepage", None)
    if setter is not None:
        setter(False)


def worker_command(config_path: Path | None) -> list[str]:
    """The command line of a local worker: this interpreter, same config and environment."""
    return child_command("worker", config_path, "--local")
