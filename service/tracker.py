"""The edge's side of jobs: submit runs, record reports, notice lost runs.

The study index has one writer, the edge (ARCHITECTURE step 5 and the scale-out
design): workers only read their ticket, run, and leave a report and a heartbeat in
the queue's store. Every ``report_poll_s`` (0.05 s) the tracker looks for the reports
of running jobs, the moment a study's results can start on their way; every
``poll_s`` (0.2 s) it looks at every unfinished job:

* a report arrived: record the outcome, put its deliverables in the outbox;
* a heartbeat arrived for a queued job: the job is running (one more attempt);
* a running job's heartbeat has been silent for 4 beats (its worker died, or its
  machine did): submit it again, or mark it failed after ``queue.max_attempts`` runs;
* an unfinished job with no run in the queue (a crash between creating and
  submitting it): submit it;
* a queued job whose run is neither waiting in the queue nor beating nor reported,
  on two looks 4 beats apart (a worker took it and died at once): submit it again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from service.config import Settings
from service.delivery import Outbox
from service.index import StudyIndex
from service.observability import RepeatedFailureLog
from service.pipeline.bundle import bundle_identity
from service.publish import ResultPublisher, enqueue_deliverables
from service.queue import HeardClock, JobQueue
from service.records import JobRecord, JobReport, JobState, JobTicket

log = structlog.get_logger("service.tracker")

#: A run is lost after this many heartbeat periods of silence.
SILENT_BEATS = 4


#: What to do about a job whose every run was lost (its worker died or went silent).
_LOST_ACTION = (
    "fix the cause (the worker's log around the job's job.started lines), then retry the"
    " job (POST /api/jobs/{id}/retry)"
)


class JobTracker:
    """Submits job runs and turns their reports into index state and deliveries."""

    def __init__(
        self,
        settings: Settings,
        index: StudyIndex,
        queue: JobQueue,
        outbox: Outbox,
        on_delivery: Callable[[], None] | None = None,
        poll_s: float = 0.2,
        report_poll_s: float = 0.05,
    ) -> None:
        self.settings = settings
        self.index = index
        self.queue = queue
        self.outbox = outbox
        self.on_delivery = on_delivery
        self.poll_s = poll_s
        self.report_poll_s = report_poll_s
        # absolute: workers on other machines get this path (found by review: the
        # default ./radnode-data sent their results into their own working directory)
        self.results_dir = Path(settings.node.data_dir).resolve() / "results"
        self._lock = threading.RLock()
        #: queued jobs seen without any trace of their run, and since when
        self._untraced: dict[str, float] = {}
        #: when each run's heartbeat was last heard, keyed by (job, attempt)
        self._heard = HeardClock()
        self._deferred: set[str] = set()  # jobs whose recording failed (logged once)
        self._held: set[str] = set()  # jobs waiting for an earlier one (logged once)
        #: a pass failed (the queue did not answer); silence counts from _silence_from
        self._blind = False
        self._silence_from = 0.0
        self._check_failures = RepeatedFailureLog(
            "jobs.check_failed", "check the data_dir disk and the queue"
        )
        self._next_trace_check = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jobs", daemon=True)

    def ticket(self, job: JobRecord) -> JobTicket:
        earlier = self.index.replaced_by(job)
        # refused since the last result: those before it, that result superseded already
        refused = self.index.refused_before(job, since=earlier)
        return JobTicket(
            job_id=job.job_id,
            study_key=job.study_key,
            pipeline=job.pipeline,
            series_paths=tuple(self.index.instance_paths(job.series_uid, job.instance_count)),
            result_dir=str(self.results_dir / job.job_id),
            destinations=job.destinations,
            attempt=job.attempts + 1,
            replaces=None if earlier is None else self._result_dir(earlier),
            not_analyzed=tuple(self._result_dir(r) for r in refused),
            preliminary=job.preliminary,
            replaces_preliminary=earlier is not None and earlier.preliminary,
        )

    def _result_dir(self, job: JobRecord) -> str:
        return job.result_dir or str(self.results_dir / job.job_id)

    def submit(self, job: JobRecord) -> str | None:
        """Put a run of ``job`` in the queue, unless one was put there meanwhile.

        Why the check: the dispatcher creates a job and then submits it, while this
        tracker's own pass submits any unfinished job without a task. Both could see
        the new job without one, and the study would run twice. Under the tracker's lock
        the job is read again; a task id means its run is already queued.

        None when the job is held: an earlier job of its series and pipeline is still
        unfinished (see :meth:`_submit`); a later pass submits it.
        """
        with self._lock:
            current = self.index.job(job.job_id) or job
            if current.task_id is not None:
                return current.task_id
            return self._submit(current)

    def _submit(self, job: JobRecord) -> str | None:
        """Put a run of ``job`` in the queue and remember its task id, unless an earlier
        job of the same series and pipeline is unfinished: then hold it (None); or
        refuse it when its study was cut short (:meth:`_refused_as_cut_short`).

        Why hold: the later job is the grown series' revision. Submitted only once the
        earlier one has finished, it is known whether it revises a result that was sent
        (``replaced_by``), and the earlier result is in the outbox ahead of it, so the
        PACS and the RIS get the revision last whatever the number of workers (review:
        two workers sent the partial result after its correction).
        """
        if self._refused_as_cut_short(job):
            return None
        earlier = self.index.earlier_unfinished(job)
        if earlier is not None:
            if job.job_id not in self._held:
                self._held.add(job.job_id)
                log.info(
                    "job.held",
                    job=job.job_id,
                    study=job.study_key,
                    pipeline=job.pipeline,
                    until=earlier.job_id,
                    reason="an earlier job of this series and pipeline is unfinished",
                )
            if job.task_id is not None:  # a run queued before it had to wait: not its run
                self.index.set_task(job.job_id, None)
            return None
        self._held.discard(job.job_id)
        task_id = self.queue.submit(self.ticket(job))
        self.index.set_task(job.job_id, task_id)
        return task_id

    def _refused_as_cut_short(self, job: JobRecord) -> bool:
        """Refuse ``job`` (True) when instances of its study were refused: for
        node.max_study_mb, or while the disk was full (since it last reopened). Part of
        the study was never stored, and a result on the rest would be sent as the
        study's (acceptance passes: a final ORU on 55 of 64 slices; a job on the 151 of
        300 slices stored before the disk filled)."""
        too_large, no_space = self.index.instances_refused(job.study_uid)
        if too_large:
            reason = (
                f"{too_large} instance(s) of the study were refused for node.max_study_mb,"
                " so its series may be incomplete; raise the limit if the study is genuine"
                " and have the PACS send it again"
            )
        elif no_space:
            reason = (
                f"{no_space} instance(s) of the study were refused while the disk was full,"
                " so its series may be incomplete; free disk space under node.data_dir: the"
                " study is processed again when the PACS sends them again (or retry this"
                " job once the study is whole)"
            )
        else:
            return False
        self.index.start_job(job.job_id, worker="edge")
        ticket = self.ticket(job)
        publication = ResultPublisher(self.settings).prepare_not_analyzed(
            ticket, lambda: bundle_identity(self.settings.models.dir, job.pipeline), reason
        )
        if publication.deliverables:
            enqueue_deliverables(
                self.outbox,
                JobReport(job.job_id, "edge", JobState.REFUSED,
                          deliverables=publication.deliverables),
            )  # fmt: skip
            if self.on_delivery is not None:
                self.on_delivery()
        self.index.finish_job(
            job.job_id,
            JobState.REFUSED,
            error="; ".join((reason, *publication.not_sent)),
            result_dir=ticket.result_dir if publication.deliverables else None,
        )
        log.warning(
            "job.finished",
            job=job.job_id,
            study=job.study_key,
            state="refused",
            reason=reason,
            action="raise node.max_study_mb and restart, then resend the study"
            if too_large
            else "free disk space; the PACS's retries bring the rest, and the study runs again",
        )
        return True

    def recover(self, local_workers_only: bool) -> None:
        """At start. With only local workers, which died with the node, any run that was
        taken from the queue is lost for sure: empty the queue and submit every
        unfinished job again now, rather than after a heartbeat timeout. With remote
        workers, runs in flight may be alive: only jobs never submitted are submitted."""
        try:
            self._recover(local_workers_only)
        except Exception as exc:
            # The queue (Redis) is down: the node must still start and receive. The
            # tracker's pass submits every job that has no run in the queue once it is
            # back (found by review: the SCP never came up while Redis was down).
            log.warning(
                "jobs.requeue_deferred",
                reason=f"{type(exc).__name__}: {exc}",
                action="check queue.url; unfinished jobs are submitted when the queue answers",
            )

    def _recover(self, local_workers_only: bool) -> None:
        requeued = []
        if local_workers_only:
            self.queue.flush()
        for job in self.index.unfinished_jobs():
            if local_workers_only:
                if job.state is JobState.RUNNING:
                    self.index.back_to_queue(job.job_id)
                self.queue.forget(job.job_id, job.task_id, job.attempts)
                self._submit(job)
                requeued.append(job.job_id)
            elif job.task_id is None:
                self._submit(job)
                requeued.append(job.job_id)
        if requeued:
            log.info("jobs.requeued", jobs=requeued, reason="node restarted")

    def worker_died(self, worker: str, why: str = "") -> None:
        """A local worker process exited: its running jobs go back to the queue now.
        ``why``: what the node knows of it (a job that ran past ``job_timeout_s``);
        without it the job's error suggests memory, the common cause."""
        with self._lock:
            for job in self.index.unfinished_jobs():
                if job.state is JobState.RUNNING and job.worker == worker:
                    self._lost(job, why or f"worker {worker} died", cause_known=bool(why))

    def check_now(self) -> None:
        with self._lock:
            now = time.time()
            if self._blind:
                # The last pass could not read the queue: a run's silence counts from
                # now, not from its last beat before the outage (acceptance pass: a
                # healthy run was taken for lost as Redis came back and ran twice).
                self._blind = False
                self._silence_from = now
                self._untraced.clear()
            for job in self.index.unfinished_jobs():
                if job.task_id is None:
                    self._submit(job)
                    continue
                report = self.queue.report(job.task_id)
                if report is not None:
                    self._record(job, report)
                    continue
                if job.state is JobState.QUEUED:
                    beat = self.queue.heartbeat(job.job_id, job.attempts + 1)
                    if beat is not None:
                        self.index.start_job(job.job_id, worker=beat.worker)
                elif job.state is JobState.RUNNING:
                    beat = self.queue.heartbeat(job.job_id, job.attempts)
                    last = job.started_at or now
                    if beat is not None:  # on this edge's clock: a first beat is news
                        last = self._heard.heard((job.job_id, job.attempts), beat.at, now)
                    last = max(last, self._silence_from)
                    if now - last > SILENT_BEATS * self.queue.heartbeat_s:
                        self._lost(job, "its worker stopped sending heartbeats")
            self._heard.forget_others()  # runs that ended or were lost
            self._check_untraced(now)

    def check_reports(self) -> None:
        """Record the reports of running jobs. Cheap enough to run often (one indexed
        read, then one queue look per running job, at most one per worker), and the
        report is what a study's results wait on: at 0.2 s only they waited 0.1 s on
        average (bench/end_to_end.py, job.finished to job.recorded)."""
        with self._lock:
            for job in self.index.running_jobs():
                if job.task_id is None:
                    continue
                report = self.queue.report(job.task_id)
                if report is not None:
                    self._record(job, report)

    def _check_untraced(self, now: float) -> None:
        """Queued jobs whose run vanished between a worker taking it and its first beat."""
        window = SILENT_BEATS * self.queue.heartbeat_s
        if now < self._next_trace_check:
            return
        self._next_trace_check = now + window
        pending = self.queue.pending_task_ids()
        seen = {}
        for job in self.index.unfinished_jobs():
            if job.state is not JobState.QUEUED or job.task_id is None or job.task_id in pending:
                continue
            if self.queue.heartbeat(job.job_id, job.attempts + 1) or self.queue.report(job.task_id):
                continue
            since = self._untraced.get(job.job_id, now)
            seen[job.job_id] = since
            if now - since >= window:
                del seen[job.job_id]
                self._lost(job, "its run left the queue but no worker reported on it")
        self._untraced = seen

    def _record(self, job: JobRecord, report) -> None:
        """Record a worker's report; if that fails, leave the job for the next pass
        (one line, not one per pass) and go on with the other jobs."""
        try:
            self._record_now(job, report)
        except Exception as exc:
            if job.job_id not in self._deferred:
                self._deferred.add(job.job_id)
                log.warning(
                    "job.record_deferred",
                    job=job.job_id,
                    reason=f"{type(exc).__name__}: {exc}",
                    action="check the results folder and data_dir disk; retried every pass",
                )
            return
        self._deferred.discard(job.job_id)

    def _record_now(self, job: JobRecord, report) -> None:
        # Into the outbox first (idempotent per job and destination), then finished: a
        # job marked done whose deliverables could not be queued (a result file not yet
        # visible on shared storage, an outbox error) was never looked at again and its
        # results never sent (found by review). Now the next pass records it again.
        queued = enqueue_deliverables(self.outbox, report)
        if job.state is JobState.QUEUED:
            self.index.start_job(job.job_id, worker=report.worker)
        self.index.finish_job(
            job.job_id,
            report.state,
            error=report.error,
            result_dir=report.result_dir,
            timings=report.timings,
        )
        self.queue.forget(job.job_id, job.task_id, job.attempts)
        log.info(
            "job.recorded",
            job=job.job_id,
            study=job.study_key,
            pipeline=job.pipeline,
            state=report.state.value,
            worker=report.worker,
            deliveries=queued,
        )
        if queued and self.on_delivery is not None:
            self.on_delivery()

    def _lost(self, job: JobRecord, why: str, *, cause_known: bool = False) -> None:
        self.queue.forget(job.job_id, job.task_id, job.attempts)
        if job.state is JobState.QUEUED:  # a run no worker reported starting counts too
            self.index.back_to_queue(job.job_id, count_run=True)
            job = self.index.job(job.job_id) or job
        if job.attempts >= self.settings.queue.max_attempts:
            guess = "" if cause_known else " (out of memory?)"
            what = f"{why} on each of {job.attempts} runs{guess}"
            self.index.finish_job(
                job.job_id, JobState.FAILED, error=f"{what}; fix the cause, then retry the job"
            )
            log.error("job.finished", job=job.job_id, study=job.study_key, state="failed",
                      reason=what, action=_LOST_ACTION)  # fmt: skip
            return
        self.index.back_to_queue(job.job_id)
        self._submit(job)
        log.warning("job.requeued", job=job.job_id, study=job.study_key, reason=why,
                    attempts=job.attempts, action="none: the job runs again, up to"
                    f" queue.max_attempts ({self.settings.queue.max_attempts}) runs; if"
                    " workers keep dying, check their memory and log")  # fmt: skip

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        next_full_check = 0.0
        while not self._stop.wait(self.report_poll_s):
            try:
                if time.monotonic() >= next_full_check:
                    next_full_check = time.monotonic() + self.poll_s
                    self.check_now()
                else:
                    self.check_reports()
            except Exception as exc:
                self._blind = True
                self._check_failures.failed(exc, log)
