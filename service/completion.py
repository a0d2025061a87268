"""Study completion: a study is complete after a quiet period with no new instance.

A PACS may send one study over several associations, in any order, with pauses; the
only signal DICOM gives is silence. The monitor polls the index and marks complete
every study that has been quiet for ``completion_timeout_s``; an instance that
arrives later reopens the study (see :meth:`StudyIndex.add_instance`). State lives in
the index, so a restart loses no timer: a study that was receiving when the node
stopped completes after the quiet period counted from its last instance.

Silence is not the whole signal: while the association that sent a study's last
instance is still open, the PACS may only be pausing (a slow archive behind it), so the
study is held until that association closes, at most ``hold_s`` (the node passes
``node.network_timeout_s``: an association idle that long is closed by the node). An
association that was aborted, or cut by the node stopping, holds its study
``interrupted_s`` (``study.interrupted_wait_s``) from its last instance, for the PACS to
send the rest again (acceptance pass: a node killed after 457 of 600 slices sent a
final result on the 457 five seconds after its restart).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from service.index import StudyIndex
from service.metrics import Metrics
from service.observability import RepeatedFailureLog
from service.records import StudyState, StudySummary

log = structlog.get_logger("service.completion")

StudyCompleteHandler = Callable[[StudySummary], None]


#: A study whose hand-over (routing) failed is tried again after 5 s, doubling up to
#: 5 minutes, this many times in all.
HANDOVER_ATTEMPTS = 10


class CompletionMonitor:
    """Background thread that turns quiet studies into complete ones."""

    def __init__(
        self,
        index: StudyIndex,
        quiet_s: float,
        on_complete: StudyCompleteHandler | None = None,
        poll_s: float | None = None,
        metrics: Metrics | None = None,
        retry_after_s: float = 5.0,
        hold_s: float = 0.0,
        interrupted_s: float = 0.0,
    ) -> None:
        self._index = index
        self._holds = {"hold_s": hold_s, "interrupted_s": interrupted_s}
        self._metrics = metrics if metrics is not None else Metrics()
        self._quiet_s = quiet_s
        self._on_complete = on_complete
        self._poll_s = poll_s if poll_s is not None else min(1.0, quiet_s / 4)
        self._retry_after_s = retry_after_s
        #: study UID -> (failed hand-overs, when to try again (monotonic))
        self._failed: dict[str, tuple[int, float]] = {}
        self._stop = threading.Event()
        self._check_failures = RepeatedFailureLog(
            "completion.check_failed", "check the data_dir disk"
        )
        self._thread = threading.Thread(target=self._run, name="completion", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def check_now(self) -> list[StudySummary]:
        """Complete every study that is due; return them (also used by tests)."""
        completed = self._index.complete_quiet_studies(self._quiet_s, **self._holds)
        for study in completed:
            log.info(
                "study.complete",
                study=study.study_key,
                instances=study.instance_count,
                series=study.series_count,
                receive_s=round(study.last_received_at - study.first_received_at, 3),
            )
            if study.instance_lost:
                log.warning(
                    "study.instance_lost",
                    study=study.study_key,
                    instances=study.instance_count,
                    action="an association sending it ended in the middle of an instance"
                    " that has not been sent again: its results are marked preliminary"
                    " (SR Preliminary Flag, HL7 result status P); send the study again from"
                    " the PACS for final results",
                )
            elif study.interrupted:
                log.warning(
                    "study.interrupted",
                    study=study.study_key,
                    instances=study.instance_count,
                    waited_s=self._holds["interrupted_s"],
                    action="the association sending it was aborted (or the node stopped)"
                    " and the PACS sent nothing more: its results may cover part of a series;"
                    " if the PACS sends the study again, corrected results follow",
                )
            self._metrics.study_completed()
        for study in [*completed, *self._due_again()]:
            self._hand_over(study)
        return completed

    def _hand_over(self, study: StudySummary) -> None:
        """Give a complete study to the router, on its own: one that fails (the queue
        unreachable, a bug) is tried again later and never keeps the others from being
        routed (found by review: one failure left every study completed in the same
        pass complete and never routed)."""
        if self._on_complete is None:
            return
        try:
            self._on_complete(study)
        except Exception:
            attempts = self._failed.get(study.study_uid, (0, 0.0))[0] + 1
            if attempts >= HANDOVER_ATTEMPTS:
                self._failed.pop(study.study_uid, None)
                log.exception(
                    "study.handover_failed",
                    study=study.study_key,
                    attempts=attempts,
                    action="fix the cause in this trace; if `radnode status` lists no job"
                    " for this study, send the study again (jobs already made are"
                    " submitted once the queue answers)",
                )
                return
            wait = min(self._retry_after_s * 2 ** (attempts - 1), 300.0)
            self._failed[study.study_uid] = (attempts, time.monotonic() + wait)
            log.exception(
                "study.handover_failed",
                study=study.study_key,
                attempts=attempts,
                retry_in_s=wait,
                action="check the queue and the data_dir disk",
            )
        else:
            self._failed.pop(study.study_uid, None)

    def _due_again(self) -> list[StudySummary]:
        """Studies whose failed hand-over is due to be tried again (still complete)."""
        now = time.monotonic()
        due = []
        for uid, (_, at) in list(self._failed.items()):
            if at > now:
                continue
            study = self._index.study(uid)
            if study is None or study.state != StudyState.COMPLETE:
                del self._failed[uid]  # reopened by new instances, or gone: not ours now
                continue
            due.append(study)
        return due

    def _next_wait(self) -> float:
        """Until the next study falls quiet, at most one poll period.

        Why not a fixed poll: every second of slack after the quiet period is latency
        added to every study's results.
        """
        due = self._index.next_quiet_at(self._quiet_s, **self._holds)
        if due is None:
            return self._poll_s
        return min(self._poll_s, max(0.01, due - time.time() + 0.005))

    def _run(self) -> None:
        wait = self._poll_s
        while not self._stop.wait(wait):
            try:
                self.check_now()
                wait = self._next_wait()
            except Exception as exc:
                wait = self._poll_s
                # Keep monitoring: a failing check (e.g. a locked database) is retried
                # at the next poll, and the study index still holds every study.
                self._check_failures.failed(exc, log)
