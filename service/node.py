"""The node: the one module that wires the others together.

``Node`` builds the spool, the study index, the receive path, the Storage SCP and
the completion monitor from :class:`~service.config.Settings`, reconciles the index
with the spool at start (so a crash between the file and the index row loses
nothing), and stops them in the reverse order.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType

import structlog
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_nodes.tls import TlsError
from service import __version__
from service.api import ApiServer, DeadLetter, DeliveryView, RetryOutcome, disk_space_check
from service.collector import settle_garbage_collector
from service.completion import CompletionMonitor
from service.config import Settings
from service.delivery import DeliveryState, DeliveryTarget, DeliveryWorker, Outbox
from service.dicom_delivery import DicomDeliverer
from service.dispatch import Dispatcher
from service.errors import StartupError
from service.headers import header_from_dataset
from service.hl7 import Hl7Deliverer, Hl7DestinationSettings
from service.index import StudyIndex
from service.metrics import FinishedJobRecorder, Metrics
from service.observability import redact_quoted
from service.pipeline.bundle import discover_bundles
from service.publish import outbox_path
from service.queue import JobQueue, QueueProbe
from service.receivers import ReceiverPool, build_receive_path
from service.records import JobRecord, JobState, StoredInstance, StudySummary, WorkerView
from service.retention import Retention
from service.shared_storage import edge_mark
from service.spool import Spool
from service.supervisor import TIMED_OUT_EXIT, ProcessSupervisor
from service.tracker import JobTracker
from service.uids import study_key
from service.worker import worker_command, worker_name
from service.worker_watch import WorkerWatch

log = structlog.get_logger("service.node")


class Node:
    """A running radnode: Storage SCP, spool, index, completion, dispatch and workers."""

    def __init__(self, settings: Settings, config_path: Path | None = None) -> None:
        self.settings = settings
        data_dir = Path(settings.node.data_dir)
        try:
            self.spool = Spool(data_dir)
            self.index = StudyIndex(data_dir / "index.sqlite3")
            # node.max_study_mb may have been raised for the studies it refused: their
            # jobs run again on what they hold once the PACS has sent them again
            self.index.forget_refused_too_large()
            # the associations open when the node stopped were cut: their studies wait
            # study.interrupted_wait_s for the PACS to send the rest
            self.index.interrupt_deliveries()
        except (OSError, sqlite3.Error) as exc:
            raise StartupError(
                f"cannot use node.data_dir {data_dir}: {exc}; make it writable for radnode"
            ) from exc
        self.queue = JobQueue(settings)
        # no routes, no jobs: no workers are started and none are missed
        self.worker_watch = WorkerWatch(
            self.queue,
            expect_workers=bool(settings.routes),
            # workers on other machines check that they see this data_dir
            edge_mark=edge_mark(data_dir) if settings.queue.url else None,
        )
        self.queue_probe = QueueProbe(self.queue)
        self.queue_probe.poll()
        self.metrics = Metrics(
            data_dir=data_dir,
            job_counts=self.index.jobs_by_pipeline_state,
            queue_depth=self.queue_probe.depth,
            workers_alive=self.worker_watch.alive_count,
            queue_reachable=self.queue_probe.reachable,
        )
        try:
            self.scp = build_receive_path(settings, self.spool, self.index, self.metrics)
        except (TlsError, ValueError) as exc:
            self.index.close()
            raise StartupError(f"DICOM TLS: {exc}") from exc
        self.receivers = ReceiverPool(
            settings.node.receiver_processes - 1,
            config_path,
            self.metrics,
            on_exit=self._receiver_died,
        )
        self.dispatcher = Dispatcher(
            self.index,
            settings.routes,
            lambda job: self.tracker.submit(job),
            settings.study.completion_timeout_s,
            hold_s=settings.node.network_timeout_s,
            interrupted_s=settings.study.interrupted_wait_s,
        )
        self.completion = CompletionMonitor(
            self.index,
            settings.study.completion_timeout_s,
            on_complete=self.dispatcher.on_study_complete,
            metrics=self.metrics,
            hold_s=settings.node.network_timeout_s,
            interrupted_s=settings.study.interrupted_wait_s,
        )
        self.outbox = Outbox(outbox_path(settings))
        self.metrics.watch_deliveries(
            self.outbox.waiting,
            [d.name for d in settings.destinations],
            dead=lambda: {
                name: by_state.get(DeliveryState.DEAD, 0)
                for name, by_state in self.outbox.counts().items()
            },
        )
        self.metrics.start_at_zero(
            destinations=[d.name for d in settings.destinations],
            pipelines=sorted({route.pipeline for route in settings.routes}),
        )
        self.delivery = DeliveryWorker(
            self.outbox,
            {
                d.name: DeliveryTarget(
                    Hl7Deliverer(d) if isinstance(d, Hl7DestinationSettings) else DicomDeliverer(d),
                    d.retry_policy(),
                )
                for d in settings.destinations
            },
            poll_interval_s=1.0,
            lease_s=300,
            metrics=self.metrics,
        )
        self.tracker = JobTracker(
            settings, self.index, self.queue, self.outbox, on_delivery=self.delivery.wake
        )
        self.job_metrics = FinishedJobRecorder(
            self.metrics, self.index.recent_jobs, self._last_received_at
        )
        self.api = ApiServer(
            NodeStatus(self),
            self.metrics,
            host=settings.http.host,
            port=settings.http.port,
            token=settings.http.token,
        )
        self.workers = ProcessSupervisor(
            # no routes, no jobs: do not pay for worker processes
            settings.queue.local_workers if settings.routes else 0,
            worker_command(config_path),
            role="worker",
            died_action="it is restarted; a job it was running runs again unless it has"
            " had queue.max_attempts runs (the job's job.lost or job.failed line says"
            " which); if this repeats, check memory and the bundle named by the worker's"
            " last pipeline.preloading or job.started line",
            on_exit=self._worker_died,
            niceness=settings.queue.local_worker_niceness,
        )
        self.retention = Retention(
            self.index,
            self.outbox,
            data_dir=data_dir,
            spool_root=self.spool.root,
            keep_s=settings.study.keep_days * 86400.0,
            check_s=settings.study.retention_check_s,
            on_purged=self.metrics.study_purged,
        )
        self._stopped = threading.Event()
        self._housekeeping = threading.Thread(
            target=self._poll_job_metrics, name="job-metrics", daemon=True
        )

    def start(self) -> None:
        log.info("node.starting", version=__version__, data_dir=str(self.spool.root.parent))
        if not self.settings.node.allowed_calling_aets:
            log.warning(
                "config.open_to_any_calling_ae",
                action="set node.allowed_calling_aets to the PACS AE titles",
            )
        self.retention.resume()  # before reconcile: a half-purged study goes, not back in
        self.reconcile()
        self.check_pipelines()
        # With no remote workers configured, every worker died with the node.
        self.tracker.recover(local_workers_only=self.settings.queue.url is None)
        if self.settings.queue.url is None:
            try:
                self.worker_watch.forget_all()
            except Exception as exc:  # never a reason not to start: shown as silent
                log.warning("workers.forget_failed", reason=f"{type(exc).__name__}: {exc}",
                            action="none; workers of the previous run show as silent")  # fmt: skip
        self.worker_watch.poll_or_log()  # publishes the data_dir mark before any worker asks
        settle_garbage_collector()
        try:
            self.scp.start()
        except OSError as exc:
            self.index.close()
            raise StartupError(
                f"cannot listen on {self.settings.node.host}:{self.settings.node.port}: "
                f"{exc.strerror}; stop the other program on that port or change node.port"
            ) from exc
        try:
            self.api.start()
        except StartupError:
            self.scp.stop()
            self.index.close()
            raise
        if self.receivers.count:
            self.receivers.start(self.scp.share_listeners())
        self.job_metrics.prime()
        self.workers.start()
        self.completion.start()
        self.dispatcher.start()
        self.tracker.start()
        self.delivery.start()
        self._housekeeping.start()
        log.info("node.started", ae_title=self.settings.node.ae_title, port=self.scp.port)

    def reconcile(self) -> None:
        """Make the index agree with the spool after an unclean stop."""
        partials = self.spool.discard_partials()
        on_disk = {p.stem: p for p in self.spool.iter_instances()}
        missing = self.index.missing_from(on_disk)
        for sop_uid in sorted(missing):
            self._index_file(on_disk[sop_uid])
        log.info(
            "spool.reconciled",
            partials_removed=partials,
            indexed_from_spool=len(missing),
            instances=len(on_disk),
        )

    def check_pipelines(self) -> None:
        """Say at start which routes name a pipeline that is missing or broken.

        The node still starts: receiving must not stop because a model is missing; the
        jobs of such a route fail with the same reason.
        """
        specs, problems = discover_bundles(self.settings.models.dir)
        for name, problem in problems.items():
            log.error("pipeline.unusable", pipeline=name, reason=problem,
                      action="fix the bundle under models.dir and restart; its jobs fail"
                      " until then, the other pipelines run")  # fmt: skip
        remote_only = self.settings.queue.remote_workers_only
        for route in self.settings.routes:
            if not route.enabled:  # runs nothing: its pipeline may well be absent
                continue
            if route.pipeline not in specs and route.pipeline not in problems:
                (log.info if remote_only else log.error)(
                    "route.pipeline_missing",
                    route=route.name,
                    pipeline=route.pipeline,
                    models_dir=str(self.settings.models.dir),
                    action="install the bundle in models.dir or fix the route's pipeline",
                )
        log.info("pipelines.found", pipelines=sorted(specs))
        if not specs and not remote_only:
            # The node still receives and completes studies, but no job will ever run:
            # one line that says so (the third acceptance pass found only a
            # pipeline.unusable naming the folder).
            log.error(
                "pipelines.none",
                models_dir=str(self.settings.models.dir),
                action="install MONAI bundles there or set models.dir; studies are"
                " received and kept, and no pipeline runs until then",
            )
        log.info(
            "routes.active",
            routes=[route.name for route in self.settings.routes if route.enabled],
            source=self.settings.routes_source,
        )
        if self.settings.environment_overrides:
            log.warning(
                "config.environment_overrides",
                keys=list(self.settings.environment_overrides),
                action="the RADNODE_* environment variables win over the file for these"
                " keys; unset them to use the file's values",
            )

    def _receiver_died(self, pid: int, _exit_code: int) -> None:
        """What its associations were delivering waits for the PACS to send it again;
        the files it was writing were never acknowledged and go (a restarted receiver
        has another pid, so they would stay until the node's next start)."""
        self.index.interrupt_deliveries(pid)
        removed = self.spool.discard_partials(pid)
        if removed:
            log.info("spool.partials_removed", files=removed, receiver_pid=pid)

    def _worker_died(self, pid: int, exit_code: int) -> None:
        try:
            self.worker_watch.forget(worker_name(pid))
        except Exception as exc:  # the queue unreadable: it shows as silent, no more
            log.warning(
                "workers.forget_failed",
                reason=f"{type(exc).__name__}: {exc}",
                action="none; the dead worker shows as silent until it is dropped",
            )
        if exit_code == TIMED_OUT_EXIT:  # it ended itself: its job ran past job_timeout_s
            timeout = self.settings.queue.job_timeout_s
            self.tracker.worker_died(
                worker_name(pid), f"it ran longer than queue.job_timeout_s ({timeout:g} s)"
            )
        else:
            self.tracker.worker_died(worker_name(pid))

    def _index_file(self, path: Path) -> None:
        try:
            dataset = dcmread(path, stop_before_pixels=True)
            header = header_from_dataset(dataset)
        except OSError as exc:
            # the environment's fault (permissions, a stale mount), not the file's: it
            # stays where it is, to be indexed at a start that can read it (review)
            reason = f"{type(exc).__name__}: {exc.strerror or 'read failed'}"
            action = "check the permissions and the mount of node.data_dir, then restart"
            self._say_unreadable(path, None, reason, action)
            return
        except (InvalidDicomError, ValueError) as exc:
            reason = redact_quoted(f"{type(exc).__name__}: {exc}")  # may quote values
            try:
                moved_to: str | None = str(self.spool.quarantine(path))
            except OSError:
                moved_to = None
            action = (
                "inspect the quarantined file; resend the instance from the PACS"
                if moved_to
                else "the file could not be moved either: check the disk under node.data_dir"
            )
            self._say_unreadable(path, moved_to, reason, action)
            return
        meta = dataset.file_meta
        self.index.add_instance(
            StoredInstance(
                header=header,
                path=str(path),
                size_bytes=path.stat().st_size,
                transfer_syntax_uid=str(meta.TransferSyntaxUID),
                calling_ae=str(meta.get("SendingApplicationEntityTitle", "")),
            )
        )

    @staticmethod
    def _say_unreadable(path: Path, moved_to: str | None, reason: str, action: str) -> None:
        """One ``spool.unreadable_file`` line: the study by its key, never the file's name
        (its SOP Instance UID)."""
        log.error(
            "spool.unreadable_file",
            study=study_key(path.parent.parent.name),
            quarantined=moved_to,
            reason=reason,
            action=action,
        )

    def _last_received_at(self, study_uid: str) -> float | None:
        study = self.index.study(study_uid)
        return None if study is None else study.last_received_at

    def _poll_job_metrics(self) -> None:
        """Workers are other processes: count their finished jobs from the index, and
        see which of them are alive. Retention runs here too, when a pass is due."""
        while not self._stopped.wait(2.0):
            try:
                self.job_metrics.poll()
            except Exception:
                log.exception("metrics.job_poll_failed", action="check the data_dir disk")
            self.queue_probe.poll()
            self.worker_watch.poll_or_log()
            self.retention.poll()

    def stop(self) -> None:
        self.api.stop()
        # receivers first: the node's own stop shuts the shared listening sockets
        self.receivers.stop()
        self.scp.stop()
        self.completion.stop()
        self.dispatcher.stop()
        self.workers.stop()
        self.tracker.stop()
        self.delivery.stop()
        self.outbox.close()
        self.index.close()
        self._stopped.set()
        log.info("node.stopped")

    def run_until_signalled(self) -> None:
        """Start, then block until SIGINT or SIGTERM; stop cleanly."""

        def _handle(signum: int, _frame: FrameType | None) -> None:
            log.info("node.signal", signal=signal.Signals(signum).name)
            self._stopped.set()

        signal.signal(signal.SIGTERM, _handle)
        signal.signal(signal.SIGINT, _handle)
        self.start()
        # Wake now and then: a signal that lands while this thread is entering a
        # blocking wait (or on another thread) only trips a flag, and Python runs the
        # handler at this thread's next bytecode; an untimed wait could sleep forever.
        while not self._stopped.wait(1.0):
            pass
        self.stop()


class NodeStatus:
    """The status API's view of a node (see :class:`service.api.StatusSource`)."""

    def __init__(self, node: Node) -> None:
        self._node = node

    def recent_studies(self, limit: int) -> list[StudySummary]:
        return self._node.index.recent_studies(limit)

    def recent_jobs(self, limit: int, state: JobState | None = None) -> list[JobRecord]:
        return self._node.index.recent_jobs(limit, state)

    def workers(self) -> list[WorkerView]:
        watch = self._node.worker_watch
        if watch.stale:  # the queue does not answer: none can be vouched for as alive
            return [replace(view, alive=False) for view in watch.latest]
        return list(watch.latest)

    def dead_letters(self, limit: int) -> list[DeadLetter]:
        letters = []
        for item in self._node.outbox.list(state=DeliveryState.DEAD, limit=limit):
            job = self._node.index.job(item.job_id)
            letters.append(
                DeadLetter(
                    job_id=item.job_id,
                    study_key=job.study_key if job else "",
                    pipeline=job.pipeline if job else "",
                    destination=item.destination,
                    attempts=item.attempts,
                    error=item.last_error or "",
                    dead_lettered_at=item.finished_at or item.created_at,
                )
            )
        return letters

    def resolved_by(self, jobs: Sequence[JobRecord]) -> dict[str, str]:
        found = {}
        for job in jobs:
            if job.state in (JobState.FAILED, JobState.REFUSED):
                later = self._node.index.resolved_by(job)
                if later is not None:
                    found[job.job_id] = later.job_id
        return found

    def deliveries(self, job_ids: Sequence[str]) -> dict[str, list[DeliveryView]]:
        found = self._node.outbox.of_jobs(job_ids)
        return {
            job_id: [
                DeliveryView(
                    destination=item.destination,
                    kind=str(item.kind),
                    state=str(item.state),
                    attempts=item.attempts,
                    next_attempt_at=(
                        item.next_attempt_at if item.state is DeliveryState.PENDING else None
                    ),
                    # a delivery that got through has no current error (the second
                    # acceptance pass read the last retry's as a failure)
                    error=None if item.state is DeliveryState.SENT else item.last_error,
                )
                for item in items
            ]
            for job_id, items in found.items()
        }

    def retry_job(self, job_id: str) -> RetryOutcome:
        index = self._node.index
        job = index.job(job_id)
        if job is None:
            return RetryOutcome.UNKNOWN_JOB
        if index.superseded_by(job) is not None:
            return RetryOutcome.SUPERSEDED
        index.forget_refused_too_large(job.study_uid)  # the operator says it is whole now
        dead = self._node.outbox.list(state=DeliveryState.DEAD, job_id=job_id)
        if dead:
            for item in dead:
                self._node.outbox.resend(item.id)
            self._node.delivery.wake()
            log.info("job.resend_requested", job=job_id, deliveries=len(dead))
            return RetryOutcome.RETRIED
        # A done job with an error made no result for a destination (an HL7 result
        # that could not be built, a destination the worker did not know): once the
        # operator has fixed the settings, a run again makes it. What was delivered is
        # not sent twice (the outbox takes each message once; acceptance pass: 409).
        unfinished_result = job.state is JobState.DONE and bool(job.error)
        if job.state not in (JobState.FAILED, JobState.REFUSED) and not unfinished_result:
            return RetryOutcome.NOT_RETRYABLE
        if unfinished_result and self._node.outbox.list(state=DeliveryState.PENDING, job_id=job_id):
            # its other results are still on their way: a run now would rewrite the
            # files being sent (review); retry once they are delivered
            return RetryOutcome.NOT_RETRYABLE
        if index.requeue_job(job_id) is None:
            return RetryOutcome.NOT_RETRYABLE
        requeued = index.job(job_id)
        if requeued is not None:
            self._node.tracker.submit(requeued)
        log.info("job.retry_requested", job=job_id, study=job.study_key)
        return RetryOutcome.RETRIED

    def discard_dead_letters(self, job_id: str) -> list[str] | None:
        if self._node.index.job(job_id) is None:
            return None
        dropped = self._node.outbox.discard_dead(job_id)
        for item in dropped:
            log.warning(
                "delivery.discarded",
                job=job_id,
                delivery=item.id,
                destination=item.destination,
                kind=item.kind,
                action="none: an operator gave this result up; the destination will not get it",
            )
        return sorted({item.destination for item in dropped})

    def resend_dead_letters(self, destination: str | None) -> tuple[list[str], list[str]] | None:
        index, outbox = self._node.index, self._node.outbox
        dead = outbox.list(state=DeliveryState.DEAD, destination=destination, limit=1_000_000)
        configured = {d.name for d in self._node.settings.destinations}
        if destination is not None and destination not in configured and not dead:
            return None
        resent: dict[str, None] = {}
        superseded: dict[str, None] = {}
        for item in sorted(dead, key=lambda d: d.id):  # the order they were made in
            job = index.job(item.job_id)
            if job is not None and index.superseded_by(job) is not None:
                superseded[item.job_id] = None  # it would land after its revision
                continue
            outbox.resend(item.id)
            resent[item.job_id] = None
        if resent:
            self._node.delivery.wake()
        return list(resent), list(superseded)

    def readiness(self) -> dict[str, bool | str]:
        node = self._node
        checks: dict[str, bool | str] = {
            "scp_listening": node.scp.listening,
            "queue": node.queue_probe.reachable()
            or "the job queue cannot be read; check queue.url",
            "disk": disk_space_check(
                node.spool.root, node.settings.node.min_free_disk_mb * 1024 * 1024
            ),
        }
        if node.receivers.count:
            checks["receivers"] = node.receivers.ready() or (
                "a receiver process is starting or restarting; see receiver.* log events"
            )
        return checks
