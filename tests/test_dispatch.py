"""Completion triggers become jobs: study, series and maximum-wait units, no duplicates."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import structlog

from service.dispatch import Dispatcher
from service.index import StudyIndex
from service.records import InstanceHeader, JobState, StoredInstance
from service.routing import RouteRule


def add(index: StudyIndex, study: str, series: str, n: int, now: float, modality: str = "CT"):
    for i in range(n):
        header = InstanceHeader(
            study_uid=study, series_uid=series, sop_instance_uid=f"{series}.{i}.{now}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", modality=modality, instance_number=i,
        )  # fmt: skip
        index.add_instance(StoredInstance(header, f"/spool/{i}", 10, "1.2.840.10008.1.2.1", "X"),
                           now=now)  # fmt: skip


@pytest.fixture
def index(tmp_path: Path) -> StudyIndex:
    return StudyIndex(tmp_path / "index.sqlite3")


def rule(**kwargs) -> RouteRule:
    return RouteRule.model_validate({"name": "r", "pipeline": "p", **kwargs})


def test_study_completion_queues_one_job_per_series_and_pipeline(index: StudyIndex) -> None:
    queued: list[str] = []
    routes = [rule(match={"Modality": "CT"}, pick="all"),
              rule(name="r2", pipeline="p", match={"Modality": "CT"}, pick="all")]  # fmt: skip
    dispatcher = Dispatcher(index, routes, lambda job: queued.append(job.job_id), quiet_s=5)
    add(index, "1.1", "1.1.1", 3, now=time.time() - 60)
    add(index, "1.1", "1.1.2", 2, now=time.time() - 60, modality="SR")
    (study,) = index.complete_quiet_studies(5)
    with structlog.testing.capture_logs() as events:
        jobs = dispatcher.on_study_complete(study)
    assert [(j.series_uid, j.pipeline, j.routes) for j in jobs] == [("1.1.1", "p", ("r", "r2"))]
    assert queued == [jobs[0].job_id]
    # the SR series no route took is said, with why (it was said nowhere: acceptance pass)
    (skipped,) = [e for e in events if e["event"] == "study.series_skipped"]
    assert skipped["routed"] == 1
    (series,) = skipped["skipped"]
    assert series["modality"] == "SR" and "Modality" in series["reasons"][0]
    # the same trigger again (e.g. a restart) does not duplicate the job, and says so
    with structlog.testing.capture_logs() as events:
        assert dispatcher.on_study_complete(study) == []
    assert [e["event"] for e in events] == ["study.nothing_new"]
    # a late instance makes the series bigger: it gets a new job
    add(index, "1.1", "1.1.1", 1, now=time.time())
    (study,) = index.complete_quiet_studies(0)
    assert len(dispatcher.on_study_complete(study)) == 1
    assert index.jobs_by_state() == {JobState.QUEUED.value: 2}


def test_a_queue_that_does_not_answer_leaves_every_job_queued_for_later(index: StudyIndex) -> None:
    """Redis down while a study completed: the first job's submit raised, so the study's
    hand-over failed with a traceback, the job had no job.queued line and the study's
    other jobs waited for the hand-over's retry (acceptance pass). Every job is made and
    said queued; the submit is deferred (the tracker submits jobs without a run)."""

    def unreachable(job) -> None:
        raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    dispatcher = Dispatcher(index, [rule(match={"Modality": "CT"}, pick="all")], unreachable, 5)
    add(index, "1.2", "1.2.1", 2, now=time.time() - 60)
    add(index, "1.2", "1.2.2", 2, now=time.time() - 60)
    (study,) = index.complete_quiet_studies(5)
    with structlog.testing.capture_logs() as events:
        jobs = dispatcher.on_study_complete(study)
    assert len(jobs) == 2
    assert [e["event"] for e in events] == ["job.queued", "job.submit_deferred"] * 2
    assert index.jobs_by_state() == {JobState.QUEUED.value: 2}


def test_series_completion_routes_before_the_study_is_complete(index: StudyIndex) -> None:
    queued: list[str] = []
    routes = [rule(match={"Modality": "CT"}, completion="series")]
    dispatcher = Dispatcher(index, routes, lambda job: queued.append(job.job_id), quiet_s=5)
    add(index, "2.1", "2.1.1", 4, now=time.time() - 10)  # quiet series
    add(index, "2.1", "2.1.2", 4, now=time.time())  # still arriving
    jobs = dispatcher.check_now()
    assert [j.series_uid for j in jobs] == ["2.1.1"]
    assert index.study("2.1").state == "receiving"


def test_max_wait_routes_a_study_that_keeps_trickling_in(index: StudyIndex) -> None:
    queued: list[str] = []
    dispatcher = Dispatcher(
        index, [rule(max_wait_s=30)], lambda job: queued.append(job.job_id), quiet_s=5
    )
    add(index, "3.1", "3.1.1", 1, now=time.time() - 100)  # first instance long ago
    add(index, "3.1", "3.1.1", 1, now=time.time())  # and still arriving
    (job,) = dispatcher.check_now()
    assert queued == [job.job_id] and index.study("3.1").state == "receiving"
    assert dispatcher.check_now() == []  # once per series size, not once per poll
    fresh = Dispatcher(
        index, [rule(name="r2", max_wait_s=300)], lambda job: queued.append(job.job_id), quiet_s=5
    )
    assert fresh.check_now() == []  # not waited long enough for this route


def test_finished_jobs_are_not_started_again_but_can_be_retried(index: StudyIndex) -> None:
    add(index, "4.1", "4.1.1", 1, now=time.time())
    job = index.add_job("4.1", "4.1.1", "p", ["r"], [])
    assert job is not None and job.state is JobState.QUEUED
    assert index.start_job(job.job_id, worker="h:1").attempts == 1
    assert index.running_jobs_of("h:1") == [job.job_id]
    index.finish_job(job.job_id, JobState.FAILED, error="bundle p: broken")
    assert index.start_job(job.job_id) is None
    assert index.unfinished_jobs() == []
    assert index.requeue_job(job.job_id).state is JobState.QUEUED
    assert [j.job_id for j in index.unfinished_jobs()] == [job.job_id]


def _instance(series: str, uid: str, image_type: tuple[str, ...], iop: tuple, number: int):
    header = InstanceHeader(
        study_uid=series.rsplit(".", 1)[0], series_uid=series, sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", modality="CT", instance_number=number,
        image_type=image_type, image_orientation=iop, slice_thickness=1.25,
    )  # fmt: skip
    return StoredInstance(header, f"/spool/{uid}", 10, "1.2.840.10008.1.2.1", "X")


SCOUT = (("ORIGINAL", "PRIMARY", "LOCALIZER"), (1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
AXIAL = (("ORIGINAL", "PRIMARY", "AXIAL"), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))


@pytest.mark.parametrize("scout_first", [True, False])
def test_a_scout_inside_an_axial_series_does_not_decide_its_routing(
    index: StudyIndex, scout_first: bool
) -> None:
    """The series took its routing attributes from its first instance: a scout that
    came first made the whole axial series a localizer, and the reference routes
    (ImageType excludes LOCALIZER) skipped it."""
    queued: list[str] = []
    routes = [rule(match={"Modality": "CT", "ImageType": {"excludes": ["LOCALIZER"]}})]
    dispatcher = Dispatcher(index, routes, lambda job: queued.append(job.job_id), quiet_s=5)
    then = time.time() - 60
    scout = _instance("5.1.1", "5.1.1.0", *SCOUT, number=0)
    axial = [_instance("5.1.1", f"5.1.1.{i}", *AXIAL, number=i) for i in range(1, 5)]
    for stored in [scout, *axial] if scout_first else [*axial, scout]:
        index.add_instance(stored, now=then)

    (series,) = index.series_of("5.1")
    assert series.image_type == AXIAL[0]
    assert series.image_orientation == AXIAL[1]
    (study,) = index.complete_quiet_studies(5)
    assert [job.series_uid for job in dispatcher.on_study_complete(study)] == ["5.1.1"]


def test_a_series_of_scouts_stays_a_localizer_series(index: StudyIndex) -> None:
    index.add_instance(_instance("6.1.1", "6.1.1.0", *SCOUT, number=1))
    index.add_instance(_instance("6.1.1", "6.1.1.1", SCOUT[0], (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), 2))
    (series,) = index.series_of("6.1")
    assert "LOCALIZER" in series.image_type
