"""Dispatch: a complete study (or series) meets the routing rules and becomes jobs.

Three things trigger routing (ARCHITECTURE steps 3-5):

* a study completes (the quiet period) — every enabled route;
* a series has been quiet for the completion timeout while its study is still
  receiving — routes with ``completion = "series"``;
* a study has kept receiving for longer than a route's ``max_wait_s`` — that route,
  so a study that trickles in for hours is still processed.

A job is one (series, pipeline) at the series' current instance count (the index
refuses a second one), so triggers may overlap freely: a series is processed once
per size, and again only if more instances arrive. No match is a normal outcome,
logged once per trigger with each route's reason.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Sequence

import structlog

from service.index import StudyIndex
from service.observability import RepeatedFailureLog, redact_quoted
from service.records import JobRecord, SeriesInfo, StudySummary
from service.routing import RouteRule, RoutingPlan, plan, series_order
from service.uids import study_key

log = structlog.get_logger("service.dispatch")

#: Puts a new job's first run in the queue.
Enqueue = Callable[[JobRecord], object]


class Dispatcher:
    """Turns completion events into queued jobs."""

    def __init__(
        self,
        index: StudyIndex,
        routes: Sequence[RouteRule],
        enqueue: Enqueue,
        quiet_s: float,
        poll_s: float = 1.0,
        hold_s: float = 0.0,
        interrupted_s: float = 0.0,
    ) -> None:
        """``hold_s``, ``interrupted_s``: how long a series an open (or an interrupted)
        association was delivering may wait past its quiet period
        (:meth:`StudyIndex.quiet_series`)."""
        self.index = index
        self.routes = [r for r in routes if r.enabled]
        self.enqueue = enqueue
        self.quiet_s = quiet_s
        self.holds = {"hold_s": hold_s, "interrupted_s": interrupted_s}
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._check_failures = RepeatedFailureLog(
            "dispatch.check_failed", "check the data_dir disk"
        )
        self._thread = threading.Thread(target=self._run, name="dispatch", daemon=True)

    @property
    def _series_routes(self) -> list[RouteRule]:
        return [r for r in self.routes if r.completion == "series"]

    @property
    def _waiting_routes(self) -> list[RouteRule]:
        return [r for r in self.routes if r.max_wait_s is not None]

    # -- triggers ---------------------------------------------------------------

    def on_study_complete(self, study: StudySummary) -> list[JobRecord]:
        return self.route(study.study_uid, self.index.series_of(study.study_uid), self.routes,
                          trigger="study_complete")  # fmt: skip

    def check_now(self) -> list[JobRecord]:
        """Series-level completion and maximum waits (the study-level quiet period is
        the completion monitor's)."""
        jobs: list[JobRecord] = []
        if self._series_routes:
            by_study: dict[str, list[SeriesInfo]] = defaultdict(list)
            for series in self.index.quiet_series(self.quiet_s, **self.holds):
                by_study[series.study_uid].append(series)
            for study_uid, series in by_study.items():
                jobs += self.route(study_uid, series, self._series_routes, "series_complete")
        for route in self._waiting_routes:
            assert route.max_wait_s is not None
            for study in self.index.receiving_since(route.max_wait_s):
                jobs += self.route(
                    study.study_uid, self.index.series_of(study.study_uid), [route], "max_wait"
                )
        return jobs

    def start(self) -> None:
        if self._series_routes or self._waiting_routes:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check_now()
            except Exception as exc:
                self._check_failures.failed(exc, log)

    # -- routing ----------------------------------------------------------------

    def route(
        self,
        study_uid: str,
        series: Sequence[SeriesInfo],
        routes: Sequence[RouteRule],
        trigger: str,
    ) -> list[JobRecord]:
        """Plan ``series`` against ``routes``; create and enqueue the new jobs."""
        key = study_key(study_uid)
        if not routes:
            return []
        decided = plan(series, routes)
        created: list[JobRecord] = []
        for planned in decided.jobs():
            job = self.index.add_job(
                study_uid, planned.series_uid, planned.pipeline, planned.routes,
                planned.destinations,
            )  # fmt: skip
            if job is None:
                continue  # this series at this size already has its job
            created.append(job)
            log.info(
                "job.queued",
                job=job.job_id,
                study=key,
                pipeline=job.pipeline,
                routes=list(job.routes),
                trigger=trigger,
            )
            try:
                self.enqueue(job)
            except Exception as exc:
                # Queued in the index all the same: the tracker's pass submits every
                # unfinished job without a run once the queue answers. Raised, it was an
                # error with a traceback per study while Redis was down, and the study's
                # other jobs were made only on the hand-over's retry (acceptance pass).
                log.warning(
                    "job.submit_deferred",
                    job=job.job_id,
                    study=key,
                    reason=redact_quoted(f"{type(exc).__name__}: {exc}"),
                    action="check the queue (queue.url, Redis); the job is submitted once"
                    " it answers",
                )
        skipped = _skipped_series(series, decided) if created else []
        if skipped and trigger == "study_complete":
            # The series no route took, in a study some route did: a localizer series, a
            # reformat, a report. Said nowhere, an operator could not tell "not for any
            # model" from "lost" (acceptance pass).
            log.info("study.series_skipped", study=key, routed=len(series) - len(skipped),
                     skipped=skipped[:10])  # fmt: skip
        if not decided.matched and trigger == "study_complete":
            log.info(
                "study.unrouted",
                study=key,
                series=len(series),
                reasons=sorted({r.reason for r in decided.rejections})[:10],
            )
        elif decided.matched and not created and trigger == "study_complete":
            # The study came again (the PACS re-sent it, or sent back radnode's own
            # results): its line ended at study.complete, and an operator could not tell
            # "nothing to do" from "stuck" (acceptance pass).
            log.info(
                "study.nothing_new",
                study=key,
                series=len(series),
                reason="every routed series already has its job at this size",
            )
        return created


def _skipped_series(series: Sequence[SeriesInfo], decided: RoutingPlan) -> list[dict[str, object]]:
    """The series no route selected: SeriesNumber, Modality and why (each route's reason,
    as ``study.unrouted`` gives them; no description, no UID)."""
    selected = {s.series_uid for s in decided.selections}
    skipped = []
    for s in sorted(series, key=series_order):
        if s.series_uid in selected:
            continue
        reasons = sorted({r.reason for r in decided.rejections if r.series_uid == s.series_uid})
        skipped.append(
            {"series_number": s.series_number, "modality": s.modality.strip() or "?",
             "reasons": reasons[:3]}
        )  # fmt: skip
    return skipped
