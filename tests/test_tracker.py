"""The edge's job tracker on a real index, queue (huey on SQLite) and outbox; no workers.

Found by ``bench/end_to_end.py``: a CT job sometimes ran twice. The dispatcher creates a
job and then submits it; the tracker's periodic pass submits any unfinished job that
has no task yet. When the pass ran between the two, both submitted.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import structlog
from huey.utils import Error
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import encode

from dicom_nodes.scp import ReceivedInstance
from dicom_nodes.status import StoreStatus
from service.config import Settings
from service.delivery import Outbox
from service.index import StudyIndex
from service.ingest import Ingest
from service.queue import Heartbeat, JobQueue
from service.records import Deliverable, JobReport, JobState
from service.spool import Spool
from service.tracker import JobTracker


def _node_with_one_instance(tmp_path: Path) -> tuple[Settings, StudyIndex, Dataset]:
    """Settings, a real index and spool holding one received CT instance, and it."""
    settings = Settings(node={"data_dir": str(tmp_path)})  # type: ignore[arg-type]
    index = StudyIndex(tmp_path / "index.sqlite3")
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    _receive(tmp_path, index, ds)
    return settings, index, ds


def _receive(tmp_path: Path, index: StudyIndex, ds: Dataset) -> None:
    """Store ``ds`` as the receive path does (spool under ``tmp_path``, ``index``)."""
    data = encode(ds, False, True)
    assert data is not None
    instance = ReceivedInstance(
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRLittleEndian, data,
        "PACS", "RADNODE", "127.0.0.1",
    )  # fmt: skip
    Ingest(Spool(tmp_path / "spool"), index, ae_title="RADNODE", min_free_bytes=0).store(instance)


def test_a_new_job_is_submitted_once_when_the_tracker_pass_sees_it_first(
    tmp_path: Path,
) -> None:
    settings, index, ds = _node_with_one_instance(tmp_path)
    queue = JobQueue(settings)
    tracker = JobTracker(settings, index, queue, Outbox(tmp_path / "outbox.sqlite3"))

    job = index.add_job(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), "p", ["r"], [])
    assert job is not None and job.task_id is None
    tracker.check_now()  # the periodic pass comes first and submits the new job
    task = tracker.submit(job)  # then the dispatcher, with its record from before

    assert queue.pending_task_ids() == {task}
    assert index.job(job.job_id).task_id == task
    index.close()


def test_the_quick_report_pass_records_running_jobs_only(tmp_path: Path) -> None:
    """check_reports (every 0.05 s) records what a worker reported for a running job;
    a job the index still has as queued waits for the full pass (check_now)."""
    settings, index, ds = _node_with_one_instance(tmp_path)
    tracker = JobTracker(settings, index, JobQueue(settings), Outbox(tmp_path / "outbox.sqlite3"))
    # A worker's side of the same queue (huey on the node's SQLite), run in this process.
    worker = JobQueue(
        settings, handler=lambda t: JobReport(job_id=t.job_id, worker="w:1", state=JobState.DONE)
    )

    study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    running = index.add_job(study, series, "first", ["r"], [])
    queued = index.add_job(study, series, "second", ["r"], [])
    assert running is not None and queued is not None
    for job in (running, queued):
        tracker.submit(job)
        worker.huey.execute(worker.huey.dequeue())
    index.start_job(running.job_id, worker="w:1")

    tracker.check_reports()
    assert index.job(running.job_id).state is JobState.DONE
    assert index.job(queued.job_id).state is JobState.QUEUED
    tracker.check_now()
    assert index.job(queued.job_id).state is JobState.DONE
    index.close()


def test_a_report_whose_deliverables_cannot_be_queued_yet_is_recorded_later(
    tmp_path: Path,
) -> None:
    """The job was marked done before its deliverables were in the outbox: a result file
    not yet visible (shared storage) ended the recording midway and the job, done, was
    never looked at again; nothing was sent (found by review)."""
    settings, index, ds = _node_with_one_instance(tmp_path)
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    tracker = JobTracker(settings, index, JobQueue(settings), outbox)
    message = tmp_path / "results" / "ris.hl7"
    report = JobReport(
        job_id="", worker="w:1", state=JobState.DONE,
        deliverables=(Deliverable("ris", "hl7", "ctrl-1", str(message)),),
    )  # fmt: skip
    worker = JobQueue(settings, handler=lambda t: dataclasses.replace(report, job_id=t.job_id))
    job = index.add_job(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), "p", ["r"], [])
    assert job is not None
    tracker.submit(job)
    worker.huey.execute(worker.huey.dequeue())

    with structlog.testing.capture_logs() as events:
        tracker.check_now()  # the message file is not there yet
        tracker.check_now()
    assert index.job(job.job_id).state is not JobState.DONE
    assert [e["event"] for e in events] == ["job.record_deferred"]  # once, not per pass
    message.parent.mkdir(parents=True)
    message.write_bytes(b"MSH|^~\\&|RADNODE\r")
    tracker.check_now()
    assert index.job(job.job_id).state is JobState.DONE
    assert [d.destination for d in outbox.list()] == ["ris"]
    index.close()


def test_the_node_starts_while_the_queue_is_down(tmp_path: Path) -> None:
    """Recovery at start submits jobs never submitted; with Redis down it raised and the
    node (its Storage SCP too) did not start (found by review). The tracker's pass
    submits them once the queue answers."""
    _, index, ds = _node_with_one_instance(tmp_path)
    down = Settings(
        node={"data_dir": str(tmp_path)},  # type: ignore[arg-type]
        queue={"url": "redis://127.0.0.1:1/0"},  # type: ignore[arg-type]
    )
    tracker = JobTracker(down, index, JobQueue(down), Outbox(tmp_path / "outbox.sqlite3"))
    job = index.add_job(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), "p", ["r"], [])
    assert job is not None and job.task_id is None
    with structlog.testing.capture_logs() as events:
        tracker.recover(local_workers_only=False)
    assert [e["event"] for e in events] == ["jobs.requeue_deferred"]
    assert index.job(job.job_id).task_id is None  # submitted later by the pass
    index.close()


def test_a_queue_that_stays_down_is_reported_once_not_every_pass(tmp_path: Path) -> None:
    """Every 0.2 s pass logged a full traceback while Redis was down (29 in 6 s; found
    by review): one, then a reminder a minute."""
    _, index, ds = _node_with_one_instance(tmp_path)
    down = Settings(
        node={"data_dir": str(tmp_path)},  # type: ignore[arg-type]
        queue={"url": "redis://127.0.0.1:1/0"},  # type: ignore[arg-type]
    )
    tracker = JobTracker(down, index, JobQueue(down), Outbox(tmp_path / "outbox.sqlite3"),
                         poll_s=0.1)  # fmt: skip
    assert index.add_job(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), "p", ["r"], [])
    with structlog.testing.capture_logs() as events:
        tracker.start()
        time.sleep(1.5)  # about 15 passes, each failing to submit the job
        tracker.stop()
    failed = [e for e in events if e["event"] == "jobs.check_failed"]
    assert len(failed) == 1, failed
    index.close()


def test_a_run_beating_with_a_clock_behind_the_edges_is_not_taken_for_lost(
    tmp_path: Path,
) -> None:
    """Beats are dated by the worker machine's clock. Compared with the edge's, a worker
    a minute behind had every healthy run taken for lost after 4 beats and run twice.
    The edge judges by when a beat changes; a run that stops beating is still lost."""
    settings, index, ds = _node_with_one_instance(tmp_path)
    queue = JobQueue(settings, heartbeat_s=0.1)
    tracker = JobTracker(settings, index, queue, Outbox(tmp_path / "outbox.sqlite3"))
    job = index.add_job(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), "p", ["r"], [])
    assert job is not None
    tracker.submit(job)
    behind = time.time() - 600  # the worker's clock: ten minutes behind

    def beat(at: float) -> None:
        queue.huey.put(f"hb:{job.job_id}:1", Heartbeat("w:1", 1, at))

    beat(behind)
    tracker.check_now()  # the first beat: the run has started
    assert index.job(job.job_id).state is JobState.RUNNING
    for _ in range(6):  # 0.6 s of beats, longer than the 0.4 s silence window
        time.sleep(0.1)
        behind += 0.1
        beat(behind)
        tracker.check_now()
        assert index.job(job.job_id).state is JobState.RUNNING
    time.sleep(0.6)  # then the worker dies
    tracker.check_now()
    assert index.job(job.job_id).state is JobState.QUEUED  # lost, queued again
    index.close()


def test_silence_while_the_edge_could_not_read_the_queue_does_not_count(tmp_path: Path) -> None:
    """Redis down for 26 s: as it came back, the edge compared with the last beat
    before the outage and took the healthy run for lost (acceptance pass). A failed pass
    restarts the count; a run that stays silent afterwards is still lost."""
    settings, index, ds = _node_with_one_instance(tmp_path)
    queue = JobQueue(settings, heartbeat_s=0.1)
    tracker = JobTracker(settings, index, queue, Outbox(tmp_path / "outbox.sqlite3"))
    job = index.add_job(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), "p", ["r"], [])
    assert job is not None
    tracker.submit(job)
    queue.huey.put(f"hb:{job.job_id}:1", Heartbeat("w:1", 1, time.time()))
    tracker.check_now()
    assert index.job(job.job_id).state is JobState.RUNNING
    time.sleep(0.6)  # longer than the 0.4 s window, the queue unreadable all along:
    tracker._blind = True  # what a failed pass leaves (tracker._run)
    tracker.check_now()
    assert index.job(job.job_id).state is JobState.RUNNING
    time.sleep(0.6)  # silent after the queue answers again: lost
    tracker.check_now()
    assert index.job(job.job_id).state is JobState.QUEUED
    index.close()


def test_a_run_that_crashed_outside_the_job_is_lost_not_a_stuck_pass(tmp_path: Path) -> None:
    """A run that raised outside the job handler (its first heartbeat could not be
    written) leaves huey's error instead of a report. Reading it raised on every pass,
    so no other job was looked at: a dead worker's run before it stayed running for
    ever (found by review). Now that run counts as lost and the pass goes on."""
    settings, index, ds = _node_with_one_instance(tmp_path)
    queue = JobQueue(settings, heartbeat_s=0.1)
    tracker = JobTracker(settings, index, queue, Outbox(tmp_path / "outbox.sqlite3"))
    study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    dead = index.add_job(study, series, "first", ["r"], [])
    assert dead is not None
    tracker.submit(dead)
    queue.huey.put(f"hb:{dead.job_id}:1", Heartbeat("w:1", 1, time.time()))
    tracker.check_now()
    assert index.job(dead.job_id).state is JobState.RUNNING
    time.sleep(0.01)
    crashed = index.add_job(study, series, "second", ["r"], [])
    assert crashed is not None
    task = tracker.submit(crashed)
    while queue.huey.dequeue() is not None:  # workers took both runs
        pass
    queue.huey.put_result(task, Error({"error": "ConnectionError: Redis blip"}))

    assert queue.report(task) is None
    for _ in range(8):  # the first run's worker is dead: no more beats
        time.sleep(0.1)
        tracker.check_now()
    assert index.job(dead.job_id).state is JobState.QUEUED  # lost, queued again
    assert index.job(crashed.job_id).task_id != task  # its run lost too: submitted again
    index.close()


def test_result_folders_are_named_by_absolute_path(tmp_path: Path, monkeypatch) -> None:
    """Tickets go to workers on other machines: with the default ./radnode-data a
    remote worker wrote results into its own working directory (found by review)."""
    monkeypatch.chdir(tmp_path)
    settings = Settings(node={"data_dir": "radnode-data"})  # type: ignore[arg-type]
    index = StudyIndex(tmp_path / "index.sqlite3")
    tracker = JobTracker(settings, index, JobQueue(settings), Outbox(tmp_path / "o.sqlite3"))
    assert tracker.results_dir == tmp_path.resolve() / "radnode-data" / "results"
    index.close()


def _store_another_instance(tmp_path: Path, index: StudyIndex, ds: Dataset, uid: str) -> None:
    """One more instance of the same series (the series grows)."""
    ds = ds.copy()
    ds.SOPInstanceUID = uid
    data = encode(ds, False, True)
    assert data is not None
    instance = ReceivedInstance(
        str(ds.SOPClassUID), uid, ExplicitVRLittleEndian, data, "PACS", "RADNODE", "127.0.0.1"
    )
    Ingest(Spool(tmp_path / "spool"), index, ae_title="RADNODE", min_free_bytes=0).store(instance)


def test_a_job_on_a_grown_series_replaces_the_last_result_of_that_pipeline(
    tmp_path: Path,
) -> None:
    """The ticket names the result folder of the latest finished job of the same series
    and pipeline: the worker makes its SR the new SR's predecessor and sends the HL7
    result as a correction. Failed jobs and other pipelines are not replaced."""
    settings, index, ds = _node_with_one_instance(tmp_path)
    tracker = JobTracker(settings, index, JobQueue(settings), Outbox(tmp_path / "o.sqlite3"))
    study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    first = index.add_job(study, series, "p", ["r"], [], now=1.0)
    other = index.add_job(study, series, "q", ["r"], [], now=1.0)
    assert first is not None and other is not None
    assert tracker.ticket(first).replaces is None
    index.finish_job(first.job_id, JobState.DONE, result_dir="/results/first", now=2.0)
    index.finish_job(other.job_id, JobState.DONE, result_dir="/results/other", now=2.0)

    _store_another_instance(tmp_path, index, ds, "1.2.826.0.1.3680043.8.498.777")
    second = index.add_job(study, series, "p", ["r"], [], now=3.0)
    assert second is not None
    assert tracker.ticket(second).replaces == "/results/first"
    assert tracker.ticket(second).not_analyzed == ()  # nothing of the series refused
    index.finish_job(second.job_id, JobState.FAILED, error="model failed", now=4.0)

    _store_another_instance(tmp_path, index, ds, "1.2.826.0.1.3680043.8.498.778")
    third = index.add_job(study, series, "p", ["r"], [], now=5.0)
    assert third is not None
    assert tracker.ticket(third).replaces == "/results/first"  # the failed run made none

    # Usually the series grows while its job still waits. The next job is held until
    # that one has finished (run side by side, the partial result could reach the PACS
    # and the RIS after its revision: review), then revises it if it made a result.
    _store_another_instance(tmp_path, index, ds, "1.2.826.0.1.3680043.8.498.779")
    fourth = index.add_job(study, series, "p", ["r"], [], now=6.0)
    assert fourth is not None
    assert tracker.submit(third) is not None
    assert tracker.submit(fourth) is None and index.job(fourth.job_id).task_id is None
    # every run of a job reads the instances it was made for, not those that came since
    assert len(tracker.ticket(third).series_paths) == 3
    assert len(tracker.ticket(fourth).series_paths) == 4
    assert index.superseded_by(third) == index.job(fourth.job_id)
    index.finish_job(third.job_id, JobState.DONE, result_dir="/results/third", now=7.0)
    assert tracker.submit(fourth) is not None
    assert tracker.ticket(fourth).replaces == "/results/third"
    assert index.superseded_by(index.job(fourth.job_id)) is None
    index.close()


def test_a_revision_of_a_refused_result_is_no_revision(tmp_path: Path) -> None:
    """An earlier job that was refused sent nothing: the job on the grown series is the
    series' first result (an HL7 correction of nothing was sent before: review)."""
    settings, index, ds = _node_with_one_instance(tmp_path)
    tracker = JobTracker(settings, index, JobQueue(settings), Outbox(tmp_path / "o.sqlite3"))
    study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    first = index.add_job(study, series, "p", ["r"], [], now=1.0)
    _store_another_instance(tmp_path, index, ds, "1.2.826.0.1.3680043.8.498.777")
    second = index.add_job(study, series, "p", ["r"], [], now=2.0)
    assert first is not None and second is not None
    assert tracker.submit(second) is None  # held while the first may still make a result
    index.finish_job(first.job_id, JobState.REFUSED, error="too short", now=3.0)
    assert tracker.submit(second) is not None
    assert tracker.ticket(second).replaces is None
    # ... and its SR supersedes the refused job's "not analyzed" one, if that was made
    assert tracker.ticket(second).not_analyzed == (str(tracker.results_dir / first.job_id),)
    # refused twice (too short, then a gap): the result supersedes both reports (review)
    index.finish_job(second.job_id, JobState.REFUSED, error="a gap", now=4.0)
    _store_another_instance(tmp_path, index, ds, "1.2.826.0.1.3680043.8.498.778")
    third = index.add_job(study, series, "p", ["r"], [], now=5.0)
    assert third is not None
    folders = tuple(str(tracker.results_dir / j.job_id) for j in (first, second))
    assert tracker.ticket(third).not_analyzed == folders
    # a result in between superseded the ones before it
    index.finish_job(third.job_id, JobState.DONE, result_dir="/results/third", now=6.0)
    _store_another_instance(tmp_path, index, ds, "1.2.826.0.1.3680043.8.498.779")
    fourth = index.add_job(study, series, "p", ["r"], [], now=7.0)
    assert fourth is not None and tracker.ticket(fourth).not_analyzed == ()
    index.close()


def test_a_study_cut_short_by_max_study_mb_gets_its_jobs_refused_not_run(tmp_path: Path) -> None:
    """55 of 64 slices stored, 9 refused A700 for node.max_study_mb: the job ran on the
    rest and sent a final result as the study's (acceptance pass). It is refused, with
    the reason and what to do; forgetting the refusals (a restart with a raised limit,
    an operator's retry) lets the next job run."""
    settings, index, ds = _node_with_one_instance(tmp_path)
    tracker = JobTracker(settings, index, JobQueue(settings), Outbox(tmp_path / "o.sqlite3"))
    study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    index.refused_too_large(study)
    job = index.add_job(study, series, "p", ["r"], [])
    assert job is not None
    with structlog.testing.capture_logs() as events:
        assert tracker.submit(job) is None
    refused = index.job(job.job_id)
    assert refused.state is JobState.REFUSED and "node.max_study_mb" in refused.error
    assert [e["action"] for e in events if e["event"] == "job.finished"] == [
        "raise node.max_study_mb and restart, then resend the study"
    ]
    index.forget_refused_too_large()
    _store_another_instance(tmp_path, index, ds, "1.2.826.0.1.3680043.8.498.777")
    again = index.add_job(study, series, "p", ["r"], [])
    assert again is not None and tracker.submit(again) is not None
    index.close()


def test_an_instance_refused_for_a_full_disk_and_stored_on_the_retry_is_not_missing(
    tmp_path: Path,
) -> None:
    """Review: the refusals were forgotten only when the study reopened, so a retry that
    came within the quiet period left the whole study refused for ever."""
    _, index, ds = _node_with_one_instance(tmp_path)
    study, uid = str(ds.StudyInstanceUID), "1.2.826.0.1.3680043.8.498.779"
    index.refused_no_space(study, uid)
    index.refused_no_space(study, uid)  # the same instance refused twice counts once
    assert index.instances_refused(study) == (0, 1)
    _store_another_instance(tmp_path, index, ds, uid)  # the retry, study still receiving
    assert index.instances_refused(study) == (0, 0)
    index.close()


def test_a_study_cut_short_by_a_full_disk_is_refused_until_the_pacs_sends_again(
    tmp_path: Path,
) -> None:
    """Acceptance pass: 151 of 300 slices stored, then A700 for a full disk; the study
    completed and a job ran on half of it. Now refused with "free disk space", and the
    refusals are forgotten when the study reopens (the PACS retrying), so the study runs
    again, whole."""
    settings, index, ds = _node_with_one_instance(tmp_path)
    tracker = JobTracker(settings, index, JobQueue(settings), Outbox(tmp_path / "o.sqlite3"))
    study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    full = ds.copy()
    full.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.778"
    data = encode(full, False, True)
    assert data is not None
    uids = (str(full.SOPClassUID), str(full.SOPInstanceUID))
    instance = ReceivedInstance(*uids, ExplicitVRLittleEndian, data, "PACS", "RADNODE", "127.0.0.1")
    spool = Spool(tmp_path / "spool")
    no_room = Ingest(spool, index, ae_title="RADNODE", min_free_bytes=spool.free_bytes() * 2)
    assert no_room.store(instance) == StoreStatus.OUT_OF_RESOURCES
    assert index.instances_refused(study) == (0, 1)
    assert [s.study_uid for s in index.complete_quiet_studies(0.0, now=time.time() + 1)] == [study]
    job = index.add_job(study, series, "p", ["r"], [])
    assert job is not None
    with structlog.testing.capture_logs() as events:
        assert tracker.submit(job) is None
    refused = index.job(job.job_id)
    assert refused.state is JobState.REFUSED and "disk was full" in refused.error
    (said,) = [e for e in events if e["event"] == "job.finished"]
    assert "free disk space" in said["action"]
    # the PACS sends the refused instance again: stored, it is no longer missing
    _store_another_instance(tmp_path, index, ds, str(full.SOPInstanceUID))
    assert index.instances_refused(study) == (0, 0)
    again = index.add_job(study, series, "p", ["r"], [])
    assert again is not None and tracker.submit(again) is not None
    index.close()


def test_a_study_cut_short_sends_its_not_analyzed_report_where_one_is_wanted(
    tmp_path: Path,
) -> None:
    """The edge refuses a cut-short study's jobs itself, before any worker: with
    send_not_analyzed the PACS still hears that the AI did not run, and why."""
    _, index, ds = _node_with_one_instance(tmp_path)
    settings = Settings.model_validate({
        "node": {"data_dir": str(tmp_path)},
        "destinations": [{"name": "pacs", "type": "dicom", "host": "127.0.0.1", "port": 104,
                          "ae_title": "PACS", "send_not_analyzed": True}],
    })  # fmt: skip
    outbox = Outbox(tmp_path / "o.sqlite3")
    tracker = JobTracker(settings, index, JobQueue(settings), outbox)
    study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    index.refused_too_large(study)
    job = index.add_job(study, series, "bone_threshold", ["r"], ["pacs"])
    assert job is not None and tracker.submit(job) is None
    assert index.job(job.job_id).state is JobState.REFUSED
    (delivery,) = outbox.list(job_id=job.job_id)
    assert delivery.destination == "pacs" and delivery.kind == "dicom"
    (report,) = Path(delivery.payload_ref).glob("SR_*.dcm")
    texts = [str(e.value) for e in dcmread(report).iterall() if e.keyword == "TextValue"]
    assert any("max_study_mb" in t and "not performed" in t for t in texts)
    index.close()


def test_a_run_lost_before_its_first_beat_counts_so_the_next_run_has_its_own_number(
    tmp_path: Path,
) -> None:
    """A worker took the run and stalled before its first heartbeat; the edge took the
    run for lost and queued the job again, and the next run got the same attempt number
    (noted in session 16). Had the first run woken, the two would both have claimed the
    result folder as run 1 and neither seen the other (:mod:`service.run_claim`)."""
    settings, index, ds = _node_with_one_instance(tmp_path)
    queue = JobQueue(settings, heartbeat_s=0.1)
    tracker = JobTracker(settings, index, queue, Outbox(tmp_path / "outbox.sqlite3"))
    job = index.add_job(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), "p", ["r"], [])
    assert job is not None
    tracker.submit(job)
    (first,) = list(queue.huey.pending())
    assert first.args[0].attempt == 1
    queue.huey.dequeue()  # a worker took it, and says nothing
    tracker.check_now()  # the first pass only notes the run it cannot trace
    time.sleep(0.5)  # longer than the 0.4 s window
    with structlog.testing.capture_logs() as logs:
        tracker.check_now()
    assert [e["reason"] for e in logs if e["event"] == "job.requeued"] == [
        "its run left the queue but no worker reported on it"
    ]
    (second,) = list(queue.huey.pending())
    assert second.args[0].attempt == 2
    record = index.job(job.job_id)
    assert record.state is JobState.QUEUED and record.attempts == 1
    # the stalled run wakes and beats as run 1: not taken for the new run's start
    queue.huey.put(f"hb:{job.job_id}:1", Heartbeat("w:1", 1, time.time()))
    tracker.check_now()
    assert index.job(job.job_id).state is JobState.QUEUED
    index.close()


def test_a_job_stopped_by_its_time_limit_says_so_not_out_of_memory(tmp_path: Path) -> None:
    """Acceptance pass: a bundle that hung past queue.job_timeout_s on both runs failed
    with "worker ... died on each of 2 runs (out of memory?)"; the node knew better."""
    settings, index, ds = _node_with_one_instance(tmp_path)
    queue = JobQueue(settings)
    tracker = JobTracker(settings, index, queue, Outbox(tmp_path / "outbox.sqlite3"))
    job = index.add_job(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), "p", ["r"], [])
    assert job is not None
    why = "it ran longer than queue.job_timeout_s (30 s)"
    for _ in range(settings.queue.max_attempts):
        tracker.submit(index.job(job.job_id))
        index.start_job(job.job_id, worker="vm:1")
        tracker.worker_died("vm:1", why)
    record = index.job(job.job_id)
    assert record.state is JobState.FAILED
    assert record.error == f"{why} on each of 2 runs; fix the cause, then retry the job"
    index.close()


def test_a_refusal_is_resolved_by_the_first_later_job_of_its_series_that_made_a_result(
    tmp_path: Path,
) -> None:
    """``radnode status`` listed a refusal (a slice missing) long after the slice came
    and a later job analysed the series (acceptance pass): the index names that job."""
    _, index, ds = _node_with_one_instance(tmp_path)
    study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    refused = index.add_job(study, series, "p", ["r"], [])
    other_pipeline = index.add_job(study, series, "q", ["r"], [])
    assert refused is not None and other_pipeline is not None
    index.finish_job(refused.job_id, JobState.REFUSED, error="a slice is missing")
    index.finish_job(other_pipeline.job_id, JobState.DONE)  # not this pipeline's result
    assert index.resolved_by(index.job(refused.job_id)) is None
    # the missing slice arrives: the series grew, and its new job makes the result
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".2"
    _receive(tmp_path, index, ds)
    grown = index.add_job(study, series, "p", ["r"], [])
    assert grown is not None
    assert index.resolved_by(index.job(refused.job_id)) is None  # queued: not yet
    index.finish_job(grown.job_id, JobState.DONE)
    resolved = index.resolved_by(index.job(refused.job_id))
    assert resolved is not None and resolved.job_id == grown.job_id
    index.close()
