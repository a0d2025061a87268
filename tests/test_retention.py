"""Retention: studies the node is done with leave the disk; nothing else does.

Real spool, index and outbox files in a temporary data_dir; the clock is a number the
test moves (days pass in microseconds). The last test runs ``radnode serve`` with a
keep time of seconds, real storescu, and sends the study again after its purge.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from dicom_nodes.status import StoreStatus
from service.delivery import Outbox
from service.index import StudyIndex
from service.ingest import Ingest
from service.records import JobState, StudyState
from service.retention import BATCH, Retention
from service.spool import Spool
from service.testing import write_ct_series
from tests.conftest import storescu
from tests.test_receive_path import received

DAY = 86400.0
KEEP_DAYS = 7


class Node:
    """The parts retention touches, on one data_dir, with a clock the test moves."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.now = 1_000_000.0
        self.spool = Spool(data_dir)
        self.index = StudyIndex(data_dir / "index.sqlite3")
        self.outbox = Outbox(data_dir / "outbox.sqlite3", clock=lambda: self.now)
        self.ingest = Ingest(self.spool, self.index, ae_title="RADNODE", min_free_bytes=0)
        self.freed: list[int] = []
        self.retention = Retention(
            self.index,
            self.outbox,
            data_dir=data_dir,
            spool_root=self.spool.root,
            keep_s=KEEP_DAYS * DAY,
            check_s=60,
            on_purged=self.freed.append,
            clock=lambda: self.now,
        )

    def receive(self, study_uid: str | None = None, count: int = 3) -> str:
        """``count`` instances of a (new) study, received now and complete."""
        study_uid = study_uid or generate_uid()
        series_uid = generate_uid()
        for _ in range(count):
            ds = dcmread(get_testdata_file("CT_small.dcm"))
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = generate_uid()
            assert self.ingest.store(received(ds)) == StoreStatus.SUCCESS
        study = self.index.study(study_uid)
        assert study is not None
        self.index._db.execute(  # received "now" on the test's clock
            "UPDATE studies SET last_received_at = ? WHERE study_uid = ?", (self.now, study_uid)
        )
        self.index.complete_quiet_studies(0, now=self.now + 1)
        return study_uid

    def job(self, study_uid: str, state: JobState = JobState.DONE) -> tuple[str, Path]:
        (series,) = self.index.series_of(study_uid)
        job = self.index.add_job(study_uid, series.series_uid, "p", ["r"], ["pacs"], now=self.now)
        assert job is not None
        result_dir = self.data_dir / "results" / job.job_id
        (result_dir / "dicom").mkdir(parents=True)
        (result_dir / "dicom" / "SR_1.dcm").write_bytes(b"x" * 1000)
        if state is not JobState.QUEUED:
            self.index.finish_job(job.job_id, state, result_dir=str(result_dir), now=self.now)
        return job.job_id, result_dir

    def deliver(self, job_id: str, *, sent: bool = True) -> int:
        delivery = self.outbox.enqueue(
            job_id=job_id, destination="pacs", kind="dicom", message_id=job_id, payload_ref="x"
        )
        if sent:
            self.outbox.mark_sent(delivery.id)
        return delivery.id

    def files_of(self, study_uid: str) -> list[Path]:
        return sorted((self.spool.root / study_uid).rglob("*.dcm"))


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def test_a_study_done_with_goes_after_keep_days_with_its_results_and_rows(node: Node) -> None:
    study = node.receive()
    job_id, result_dir = node.job(study)
    node.deliver(job_id)
    spool_bytes = sum(p.stat().st_size for p in node.files_of(study))
    node.now += KEEP_DAYS * DAY - 60
    assert node.retention.run_once() == 0  # not yet
    assert len(node.files_of(study)) == 3
    node.now += 120
    assert node.retention.run_once() == 1
    assert not (node.spool.root / study).exists() and not result_dir.exists()
    assert node.index.study(study) is None and node.index.job(job_id) is None
    assert node.outbox.unsent([job_id]) == 0 and node.outbox.list() == []
    assert node.freed == [spool_bytes + 1000]
    assert node.spool.root.is_dir()  # the spool itself stays


@pytest.mark.parametrize(
    "keeps",
    ["pending delivery", "dead letter", "running job", "job finished lately", "receiving"],
)
def test_a_study_still_in_use_is_kept(node: Node, keeps: str) -> None:
    study = node.receive()
    job_id, _ = node.job(study, JobState.RUNNING if keeps == "running job" else JobState.DONE)
    delivery = node.deliver(job_id, sent=keeps not in ("pending delivery", "dead letter"))
    if keeps == "dead letter":
        node.outbox.mark_dead(delivery, error="rejected")
    node.now += KEEP_DAYS * DAY + 60
    if keeps == "job finished lately":
        node.index.finish_job(job_id, JobState.DONE, now=node.now - 60)
    if keeps == "receiving":
        node.index._db.execute("UPDATE studies SET state = 'receiving'")
    assert node.retention.run_once() == 0
    assert len(node.files_of(study)) == 3 and node.index.study(study) is not None


def test_only_the_old_study_goes(node: Node) -> None:
    old = node.receive()
    node.now += KEEP_DAYS * DAY
    new = node.receive()
    node.now += 120
    assert node.retention.run_once() == 1
    assert node.index.study(old) is None and len(node.files_of(new)) == 3


def test_an_instance_of_a_study_being_purged_is_refused_and_not_kept(node: Node) -> None:
    """The sender retries after the purge: acknowledged, the instance would have gone
    into a folder being deleted."""
    study = node.receive()
    last = node.index.study(study).last_received_at
    assert node.index.begin_purge(study, last, node.now)
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SOPInstanceUID = study, generate_uid()
    assert node.ingest.store(received(ds)) == StoreStatus.OUT_OF_RESOURCES
    assert len(node.files_of(study)) == 3  # the refused one was not left behind
    again = dcmread(node.files_of(study)[0])  # a duplicate, too, waits for the purge
    assert node.ingest.store(received(again)) == StoreStatus.OUT_OF_RESOURCES
    assert node.index.study(study).state == StudyState.PURGING


def test_a_purge_a_stop_interrupted_is_finished_at_start(node: Node) -> None:
    study = node.receive()
    assert node.index.begin_purge(study, node.index.study(study).last_received_at, node.now)
    node.files_of(study)[0].unlink()  # the stop came after the first file
    assert node.retention.resume() == 1
    assert node.index.study(study) is None and not (node.spool.root / study).exists()


def test_a_study_that_changed_since_it_was_chosen_is_not_marked(node: Node) -> None:
    study = node.receive()
    chosen = node.index.study(study).last_received_at
    node.index._db.execute("UPDATE studies SET last_received_at = last_received_at + 1")
    assert not node.index.begin_purge(study, chosen, node.now)
    assert node.index.study(study).state == StudyState.COMPLETE


def test_nothing_outside_the_spool_and_results_is_deleted(node: Node, tmp_path_factory) -> None:
    """The study is kept whole: its rows gone and its files left, the next start would
    index them again as a new study (found by review)."""
    outside = tmp_path_factory.mktemp("elsewhere") / "keep.dcm"
    outside.write_bytes(b"important")
    study = node.receive()
    node.index._db.execute("UPDATE instances SET path = ? WHERE rowid = 1", (str(outside),))
    node.now += KEEP_DAYS * DAY + 60
    with capture_logs() as logs:
        assert node.retention.run_once() == 0
    assert outside.read_bytes() == b"important" and len(node.files_of(study)) == 3
    assert node.index.study(study).state == StudyState.COMPLETE
    assert [e["event"] for e in logs] == ["retention.outside_data_dir"]
    with capture_logs() as again:  # said once, not at every pass
        assert node.retention.run_once() == 0
    assert again == []


@pytest.mark.parametrize("linked", ["spool", "results"])
def test_a_spool_or_results_folder_on_another_disk_is_purged_too(
    tmp_path: Path, tmp_path_factory, linked: str
) -> None:
    (tmp_path / linked).symlink_to(tmp_path_factory.mktemp("bigger-disk"))
    node = Node(tmp_path)
    study = node.receive()
    _, result_dir = node.job(study)
    node.now += KEEP_DAYS * DAY + 60
    assert node.retention.run_once() == 1
    assert node.files_of(study) == [] and not result_dir.exists()
    assert node.index.study(study) is None


def test_a_study_received_long_ago_but_completed_now_is_kept(node: Node) -> None:
    """A node down longer than keep_days completes its receiving studies at start:
    they have not been routed yet (found by review)."""
    study = node.receive()
    node.index._db.execute("UPDATE studies SET state = 'receiving', completed_at = NULL")
    node.now += KEEP_DAYS * DAY + 60
    node.index.complete_quiet_studies(1, now=node.now)
    assert node.retention.run_once() == 0 and node.index.study(study) is not None


def test_studies_kept_for_dead_letters_do_not_hide_the_ones_after_them(node: Node) -> None:
    held = []
    for _ in range(BATCH + 5):
        held.append(node.receive(count=1))
        job_id, _ = node.job(held[-1])
        node.outbox.mark_dead(node.deliver(job_id, sent=False), error="rejected")
        node.now += 1
    free = node.receive(count=1)
    node.now += KEEP_DAYS * DAY + 60
    assert node.retention.run_once() == 1
    assert node.index.study(free) is None
    assert all(node.index.study(uid) is not None for uid in held)


def test_jobs_of_a_study_being_purged_are_neither_created_nor_queued_again(node: Node) -> None:
    study = node.receive()
    job_id, _ = node.job(study, JobState.FAILED)
    node.now += KEEP_DAYS * DAY + 60
    assert node.index.begin_purge(study, node.index.study(study).last_received_at, node.now)
    assert node.index.requeue_job(job_id) is None  # POST /api/jobs/{id}/retry
    (series,) = node.index.series_of(study)
    assert node.index.add_job(study, series.series_uid, "other", [], []) is None


def test_a_job_that_ran_since_the_study_was_chosen_keeps_it(node: Node) -> None:
    study = node.receive()
    job_id, _ = node.job(study)
    node.now += KEEP_DAYS * DAY + 60
    node.index.finish_job(job_id, JobState.DONE, now=node.now)  # re-run just now
    assert not node.index.begin_purge(
        study, node.index.study(study).last_received_at, node.now - 60
    )


def test_a_failed_jobs_scratch_folder_goes_with_its_study(node: Node) -> None:
    study = node.receive()
    job_id, result_dir = node.job(study, JobState.QUEUED)  # records no result_dir ...
    node.index.finish_job(job_id, JobState.FAILED, error="x", now=node.now)  # ... failing
    node.now += KEEP_DAYS * DAY + 60
    assert node.retention.run_once() == 1
    assert not result_dir.exists()


def test_a_series_uid_shared_by_two_studies_does_not_stop_retention(node: Node) -> None:
    first = node.receive()
    (series,) = node.index.series_of(first)
    node.now += 10
    second = node.receive(count=1)
    node.index._db.execute(
        "UPDATE instances SET series_uid = ? WHERE study_uid = ?", (series.series_uid, second)
    )
    node.now += KEEP_DAYS * DAY + 60
    assert node.retention.run_once() == 2
    assert node.index.study(first) is None and node.index.study(second) is None


def test_an_instance_sent_again_while_its_study_went_is_stored_anew(
    node: Node, monkeypatch
) -> None:
    """The duplicate check saw the file, then a whole purge ran before the study was
    touched: acknowledged as a duplicate, it was lost (found by review)."""
    study = node.receive(count=1)
    (path,) = node.files_of(study)
    data = path.read_bytes()
    node.now += KEEP_DAYS * DAY + 60
    assert node.retention.run_once() == 1
    path.parent.mkdir(parents=True)
    path.write_bytes(data)  # what the duplicate check saw
    monkeypatch.setattr(node.index, "instance_path", lambda uid: str(path))
    ds = dcmread(path)
    assert node.ingest.store(received(ds)) == StoreStatus.SUCCESS
    monkeypatch.undo()
    assert node.index.instance_path(str(ds.SOPInstanceUID)) == str(path) and path.exists()


def test_serve_purges_a_processed_study_and_takes_it_again(radnode_factory, tmp_path: Path) -> None:
    """No routes: complete is all a study has to be. Kept 3 s, checked every 0.5 s."""
    node = radnode_factory(
        RADNODE_ROUTES="[]",
        RADNODE_STUDY__KEEP_DAYS=str(3 / DAY),
        RADNODE_STUDY__RETENTION_CHECK_S="0.5",
    ).start()
    files = write_ct_series(tmp_path / "ct", slices=4, rows=32, columns=32)
    assert storescu(node.port, files).returncode == 0
    (purged,) = node.wait_for_event("study.purged", timeout=30)
    assert purged["instances"] == 4 and purged["freed_bytes"] > 0
    assert list((node.data_dir / "spool").rglob("*.dcm")) == []
    time.sleep(0.2)
    assert storescu(node.port, files).returncode == 0  # the PACS sends it again
    node.wait_for_event("study.complete", count=2, timeout=30)
    assert len(list((node.data_dir / "spool").rglob("*.dcm"))) == 4
