"""The receive path in process: headers, spool, index, ingest and completion."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import structlog
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import encode

from dicom_nodes.scp import ReceivedInstance
from dicom_nodes.status import StoreStatus
from service.completion import CompletionMonitor
from service.errors import UnreadableDataset
from service.headers import parse_header
from service.index import StudyIndex
from service.ingest import Ingest
from service.records import StudyState
from service.spool import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    Spool,
    file_meta_bytes,
)
from service.uids import study_key


def ct_small() -> Dataset:
    return dcmread(get_testdata_file("CT_small.dcm"))


def encoded(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    deflated = transfer_syntax == DeflatedExplicitVRLittleEndian
    data = encode(ds, False, True, deflated)
    assert data is not None
    return data


def received(ds: Dataset, data: bytes | None = None, **overrides: str) -> ReceivedInstance:
    fields = {
        "sop_class_uid": str(ds.SOPClassUID),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "transfer_syntax_uid": ExplicitVRLittleEndian,
        "dataset": encoded(ds) if data is None else data,
        "calling_ae": "PACS",
        "called_ae": "RADNODE",
        "peer_address": "127.0.0.1",
    }
    fields.update(overrides)
    return ReceivedInstance(**fields)  # type: ignore[arg-type]


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Spool, StudyIndex, Ingest]:
    spool = Spool(tmp_path)
    index = StudyIndex(tmp_path / "index.sqlite3")
    ingest = Ingest(spool, index, ae_title="RADNODE", min_free_bytes=0)
    yield spool, index, ingest
    index.close()


def test_header_is_read_without_pixel_decoding() -> None:
    ds = ct_small()
    header = parse_header(encoded(ds), ExplicitVRLittleEndian)
    assert header.study_uid == ds.StudyInstanceUID
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.modality == "CT"
    assert header.slice_thickness == float(ds.SliceThickness)
    assert header.image_orientation == tuple(float(v) for v in ds.ImageOrientationPatient)
    assert header.image_type == tuple(ds.ImageType)


def test_deflated_data_set_is_read() -> None:
    ds = ct_small()
    data = encoded(ds, DeflatedExplicitVRLittleEndian)
    assert parse_header(data, DeflatedExplicitVRLittleEndian).sop_instance_uid == ds.SOPInstanceUID


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda b: b[:-300], "truncated"),
        (lambda b: b"this is not DICOM at all, just text" * 20, "truncated|parseable"),
        (lambda b: b[: b.index(b"\xe0\x7f\x10\x00")], "Pixel Data is missing"),
    ],
)
def test_damaged_data_sets_are_refused(mangle, reason: str) -> None:
    with pytest.raises(UnreadableDataset, match=reason):
        parse_header(mangle(encoded(ct_small())), ExplicitVRLittleEndian)


#: The Image Pixel module but Rows, Columns and Pixel Data (PS3.3 C.7.6.3).
_PIXEL_MODULE = ("SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
                 "BitsStored", "HighBit", "PixelRepresentation")  # fmt: skip


def _without(ds: Dataset, *keywords: str) -> Dataset:
    for keyword in keywords:
        if keyword in ds:
            delattr(ds, keyword)
    return ds


@pytest.mark.parametrize(
    ("removed", "photometric"),
    [
        # acceptance pass: Rows, Columns and Pixel Data removed, the rest kept, got 0000
        (("Rows", "Columns"), None),
        # only Samples per Pixel and an empty Photometric Interpretation left
        (("Rows", "Columns", *_PIXEL_MODULE[2:]), ""),
    ],
)
def test_an_image_without_its_pixels_is_refused(
    removed: tuple[str, ...], photometric: str | None
) -> None:
    ds = _without(ct_small(), "PixelData", *removed)
    if photometric is not None:
        ds.PhotometricInterpretation = photometric
    with pytest.raises(UnreadableDataset, match="Pixel Data is missing"):
        parse_header(encoded(ds), ExplicitVRLittleEndian)


def _parametric_map(frames: int = 2, cut: int = 0) -> Dataset:
    """A CT_small header carrying Float Pixel Data, as a Parametric Map does."""
    ds = _without(ct_small(), "PixelData")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    ds.BitsAllocated, ds.NumberOfFrames = 32, frames
    ds.FloatPixelData = bytes(ds.Rows * ds.Columns * frames * 4 - cut)
    return ds


def test_float_pixel_data_is_the_pixel_data_of_a_parametric_map() -> None:
    ds = _parametric_map()
    assert parse_header(encoded(ds), ExplicitVRLittleEndian).sop_instance_uid == ds.SOPInstanceUID
    with pytest.raises(UnreadableDataset, match="Pixel Data has"):
        parse_header(encoded(_parametric_map(cut=4 * 128)), ExplicitVRLittleEndian)


def test_mr_spectroscopy_has_rows_and_columns_but_no_pixels() -> None:
    ds = _without(ct_small(), "PixelData", *_PIXEL_MODULE)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.2"  # MR Spectroscopy Storage
    ds.SpectroscopyData = bytes(4 * 64)
    assert parse_header(encoded(ds), ExplicitVRLittleEndian).sop_instance_uid == ds.SOPInstanceUID
    del ds.SpectroscopyData  # Rows and Columns, nothing else: an image without pixels
    with pytest.raises(UnreadableDataset, match="Pixel Data is missing"):
        parse_header(encoded(ds), ExplicitVRLittleEndian)


def large_ct() -> Dataset:
    """CT_small with 512 x 512 pixels: Pixel Data beyond the size whose value the
    header parser skips rather than copies."""
    ds = ct_small()
    ds.Rows = ds.Columns = 512
    ds.PixelData = bytes(512 * 512 * 2)
    return ds


@pytest.mark.parametrize("cut", [1, 300, 100_000])
def test_truncated_large_pixel_data_is_refused(cut: int) -> None:
    data = encoded(large_ct())
    assert parse_header(data, ExplicitVRLittleEndian).sop_instance_uid  # whole: fine
    with pytest.raises(UnreadableDataset, match="truncated"):
        parse_header(data[:-cut], ExplicitVRLittleEndian)


def test_wrong_length_pixel_data_is_refused() -> None:
    ds = ct_small()
    ds.PixelData = ds.PixelData[:-2048]
    with pytest.raises(UnreadableDataset, match="Pixel Data has"):
        parse_header(encoded(ds), ExplicitVRLittleEndian)


def _pydicom_file_meta(sop_class: str, sop_instance: str, syntax: str, source: str, sending: str):
    from io import BytesIO

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = source
    if sending:
        meta.SendingApplicationEntityTitle = sending
        meta.ReceivingApplicationEntityTitle = source
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("sop_instance", "syntax", "source", "sending"),
    [
        ("1.2.3.4", ExplicitVRLittleEndian, "RADNODE", "PACS"),
        ("1.2.3.45", DeflatedExplicitVRLittleEndian, "RADNODE1", "ODD"),  # odd lengths
        ("2.25.1" + "1" * 58, "1.2.840.10008.1.2", "AI", ""),  # 64 chars, no sending AE
    ],
)
def test_file_meta_is_what_pydicom_writes(sop_instance, syntax, source, sending) -> None:
    sop_class = "1.2.840.10008.5.1.4.1.1.2"
    ours = file_meta_bytes(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        transfer_syntax_uid=syntax,
        source_ae=source,
        sending_ae=sending,
    )
    assert ours == _pydicom_file_meta(sop_class, sop_instance, syntax, source, sending)


def test_stored_file_is_received_bytes_plus_file_meta(parts) -> None:
    spool, index, ingest = parts
    ds = ct_small()
    data = encoded(ds)
    assert ingest.store(received(ds, data)) == StoreStatus.SUCCESS
    path = spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    raw = path.read_bytes()
    assert raw.endswith(data)
    stored = dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert stored.file_meta.SendingApplicationEntityTitle == "PACS"
    assert stored.PixelData == ds.PixelData
    assert index.instance_count() == 1
    assert not list(spool.incoming.iterdir())


def test_duplicates_are_acknowledged_once_stored_once(parts) -> None:
    _spool, index, ingest = parts
    ds = ct_small()
    assert ingest.store(received(ds)) == StoreStatus.SUCCESS
    assert ingest.store(received(ds)) == StoreStatus.SUCCESS
    assert index.instance_count() == 1
    (study,) = index.recent_studies()
    assert study.instance_count == 1


def test_hostile_uids_never_become_paths(parts, tmp_path: Path) -> None:
    _spool, index, ingest = parts
    ds = ct_small()
    ds.SOPInstanceUID = "../../../../tmp/evil"
    status = ingest.store(received(ds))
    assert status == StoreStatus.INVALID_UID
    ds = ct_small()
    ds.StudyInstanceUID = "1.2.3/../../escape"
    assert ingest.store(received(ds)) == StoreStatus.INVALID_UID
    ds = ct_small()
    del ds.StudyInstanceUID  # the spool layout and routing both need it
    assert ingest.store(received(ds)) == StoreStatus.INVALID_UID
    assert index.instance_count() == 0
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "index.sqlite3" not in p.name]
    assert written == []


def test_request_and_data_set_must_agree(parts) -> None:
    _, index, ingest = parts
    ds = ct_small()
    other = generate_uid()
    assert ingest.store(received(ds, sop_instance_uid=other)) == StoreStatus.SOP_INSTANCE_MISMATCH
    mr_class = "1.2.840.10008.5.1.4.1.1.4"
    assert ingest.store(received(ds, sop_class_uid=mr_class)) == StoreStatus.SOP_CLASS_MISMATCH
    classless = ct_small()
    del classless.SOPClassUID  # Type 1 (conformance audit: it was stored without one)
    instance = received(ds, data=encoded(classless))
    assert ingest.store(instance) == StoreStatus.SOP_CLASS_MISMATCH
    assert index.instance_count() == 0


def test_disk_guard_refuses_with_out_of_resources(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    index = StudyIndex(tmp_path / "index.sqlite3")
    ingest = Ingest(spool, index, ae_title="RADNODE", min_free_bytes=spool.free_bytes() * 2)
    assert ingest.store(received(ct_small())) == StoreStatus.OUT_OF_RESOURCES
    assert index.instance_count() == 0
    index.close()


def test_an_index_that_cannot_grow_refuses_with_out_of_resources(parts) -> None:
    """A disk filled past the guard by something else: the index COMMIT fails. The
    sender gets A700 (retry), not C0FF "report this as a bug", which a PACS may take as
    final (acceptance pass); its resend is stored once there is room. SQLite's own
    max_page_count gives the real "database or disk is full" error without a full disk."""
    _, index, ingest = parts
    assert ingest.store(received(ct_small())) == StoreStatus.SUCCESS
    (pages,) = index._db.execute("PRAGMA page_count").fetchone()
    index._db.execute(f"PRAGMA max_page_count = {pages}")
    statuses = []
    with structlog.testing.capture_logs() as events:
        while StoreStatus.OUT_OF_RESOURCES not in statuses and len(statuses) < 200:
            refused_one = ct_small()
            refused_one.SOPInstanceUID = generate_uid()
            statuses.append(ingest.store(received(refused_one)))  # until the pages are full
    assert statuses[-1] == StoreStatus.OUT_OF_RESOURCES
    (refused,) = [e for e in events if e["event"] == "store.refused"]
    assert "disk is full" in refused["reason"] and "node.data_dir" in refused["action"]
    index._db.execute(f"PRAGMA max_page_count = {pages * 100}")
    assert ingest.store(received(refused_one)) == StoreStatus.SUCCESS  # the sender's retry
    assert index.instance_count() == len(statuses) + 1


def test_quiet_study_completes_and_late_instance_reopens(parts) -> None:
    _, index, ingest = parts
    completed = []
    monitor = CompletionMonitor(index, quiet_s=0.01, on_complete=completed.append)
    ds = ct_small()
    assert ingest.store(received(ds)) == StoreStatus.SUCCESS
    time.sleep(0.05)
    assert [s.study_uid for s in monitor.check_now()] == [ds.StudyInstanceUID]
    assert completed[0].state == StudyState.COMPLETE
    assert monitor.check_now() == []  # completes once
    late = ct_small()
    late.SOPInstanceUID = generate_uid()
    assert ingest.store(received(late)) == StoreStatus.SUCCESS
    study = index.study(ds.StudyInstanceUID)
    assert study is not None and study.state == StudyState.RECEIVING
    assert study.instance_count == 2
    time.sleep(0.05)
    assert len(monitor.check_now()) == 1


def test_a_duplicate_that_reopens_a_study_names_the_study_in_its_log_line(parts) -> None:
    """The acceptance run saw ``study.reopened`` without its ``study`` key for a
    duplicate instance (docs/logging.md promises it)."""
    _, index, ingest = parts
    ds = ct_small()
    assert ingest.store(received(ds)) == StoreStatus.SUCCESS
    time.sleep(0.05)
    assert CompletionMonitor(index, quiet_s=0.01).check_now()
    with structlog.testing.capture_logs() as logs:
        assert ingest.store(received(ds)) == StoreStatus.SUCCESS
    (line,) = [e for e in logs if e["event"] == "study.reopened"]
    assert line["study"] == study_key(ds.StudyInstanceUID)
    assert line["cause"] == "duplicate instance"


def test_completion_is_not_early(parts) -> None:
    _, index, ingest = parts
    monitor = CompletionMonitor(index, quiet_s=60)
    assert ingest.store(received(ct_small())) == StoreStatus.SUCCESS
    assert monitor.check_now() == []
    study = index.recent_studies()[0]
    assert study.state == StudyState.RECEIVING


def test_completion_wakes_when_the_next_study_falls_quiet_not_a_poll_later(parts) -> None:
    _, index, ingest = parts
    monitor = CompletionMonitor(index, quiet_s=30, poll_s=10)
    assert monitor._next_wait() == 10  # nothing receiving: the poll period
    assert ingest.store(received(ct_small())) == StoreStatus.SUCCESS
    (study,) = index.recent_studies()
    wait = monitor._next_wait()
    assert 0 < wait <= 10  # capped by the poll period
    short = CompletionMonitor(index, quiet_s=2, poll_s=10)
    due_in = study.last_received_at + 2 - time.time()
    assert abs(short._next_wait() - due_in) < 0.1


def test_a_study_is_held_open_while_its_association_is(parts) -> None:
    """A PACS pausing inside an association longer than the quiet period got a result
    on part of the study, sent to the RIS as final (noted in session 17). The study
    completes once the association closes; a quiet study whose association went on to
    another study completes as before."""
    _, index, ingest = parts
    monitor = CompletionMonitor(index, quiet_s=0.01, hold_s=60, poll_s=0.5)
    first, second = ct_small(), ct_small()
    second.StudyInstanceUID, second.SOPInstanceUID = generate_uid(), generate_uid()
    assert ingest.store(received(first, association="a1")) == StoreStatus.SUCCESS
    time.sleep(0.05)
    assert monitor.check_now() == []  # quiet, but a1 is still open on it
    assert monitor._next_wait() >= 0.5  # waits for the poll, does not spin on it
    # a1 moves on to the second study: the first is not held any more
    assert ingest.store(received(second, association="a1")) == StoreStatus.SUCCESS
    time.sleep(0.05)
    assert [s.study_uid for s in monitor.check_now()] == [first.StudyInstanceUID]
    ingest.association_ended("a1")
    assert [s.study_uid for s in monitor.check_now()] == [second.StudyInstanceUID]


def test_a_series_is_held_while_its_association_is_on_it_not_after(parts) -> None:
    """Routes completed by series: the series an open association is still sending
    waits; the one it finished before moving on does not."""
    _, index, ingest = parts
    first, second = ct_small(), ct_small()
    second.SeriesInstanceUID, second.SOPInstanceUID = generate_uid(), generate_uid()
    for ds in (first, second):
        assert ingest.store(received(ds, association="a1")) == StoreStatus.SUCCESS
    time.sleep(0.05)
    quiet = [s.series_uid for s in index.quiet_series(0.01, hold_s=60)]
    assert quiet == [first.SeriesInstanceUID]
    ingest.association_ended("a1")
    quiet = {s.series_uid for s in index.quiet_series(0.01, hold_s=60)}
    assert quiet == {first.SeriesInstanceUID, second.SeriesInstanceUID}


def test_a_hold_ends_after_hold_s(parts) -> None:
    """An association the node did not see close (a receiver process killed) holds
    its study for at most ``hold_s`` after its last instance."""
    _, index, ingest = parts
    ds = ct_small()
    assert ingest.store(received(ds, association="lost")) == StoreStatus.SUCCESS
    time.sleep(0.05)
    assert CompletionMonitor(index, quiet_s=0.01, hold_s=30).check_now() == []
    (study,) = CompletionMonitor(index, quiet_s=0.01, hold_s=0.02).check_now()
    assert not study.interrupted


def test_an_open_association_that_outlasted_its_hold_holds_the_reopened_study(parts) -> None:
    """Review: completing a study deleted the row of the association still open on it,
    and the receiver, which writes a row only when the association moves to another
    series, never wrote it again: the reopened study completed under its feet."""
    _, index, ingest = parts
    first, later = ct_small(), ct_small()
    later.SOPInstanceUID = generate_uid()
    assert ingest.store(received(first, association="slow")) == StoreStatus.SUCCESS
    time.sleep(0.05)
    assert len(CompletionMonitor(index, quiet_s=0.01, hold_s=0.02).check_now()) == 1
    assert ingest.store(received(later, association="slow")) == StoreStatus.SUCCESS
    time.sleep(0.05)
    assert CompletionMonitor(index, quiet_s=0.01, hold_s=30).check_now() == []


@pytest.mark.parametrize("cut", ["aborted", "node restarted"])
def test_a_cut_sending_waits_interrupted_s_for_the_rest_then_completes_marked(
    parts, cut: str
) -> None:
    """Acceptance pass: the node killed after 457 of a CT's 600 slices, the study
    completed five seconds after the restart and a final result on 457 slices went out.
    An aborted association, or one open when the node stopped, holds its study for
    ``interrupted_s``; the PACS sending again ends the wait; with nothing more the
    study completes marked interrupted."""
    _, index, ingest = parts
    first, rest = ct_small(), ct_small()
    rest.SOPInstanceUID = generate_uid()
    assert ingest.store(received(first, association="a1")) == StoreStatus.SUCCESS
    if cut == "aborted":
        ingest.association_ended("a1", aborted=True)
    else:
        index.interrupt_deliveries()  # what the node does at its start
    time.sleep(0.05)
    waiting = CompletionMonitor(index, quiet_s=0.01, hold_s=0.01, interrupted_s=30, poll_s=0.5)
    assert waiting.check_now() == []  # well past quiet_s and hold_s
    assert waiting._next_wait() >= 0.5  # no spin on it
    # the PACS sends the rest on a new association, and releases it
    assert ingest.store(received(rest, association="a2")) == StoreStatus.SUCCESS
    ingest.association_ended("a2")
    time.sleep(0.05)
    (study,) = waiting.check_now()
    assert study.instance_count == 2 and not study.interrupted
    # a study cut and never sent again completes after interrupted_s, marked
    other = ct_small()
    other.StudyInstanceUID, other.SOPInstanceUID = generate_uid(), generate_uid()
    assert ingest.store(received(other, association="a3")) == StoreStatus.SUCCESS
    ingest.association_ended("a3", aborted=True)
    time.sleep(0.05)
    with structlog.testing.capture_logs() as logs:
        (late,) = CompletionMonitor(index, quiet_s=0.01, interrupted_s=0.02).check_now()
    assert late.interrupted and late.study_uid == other.StudyInstanceUID
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["study.interrupted"]


def test_an_instance_cut_in_transit_makes_the_study_s_jobs_preliminary_until_sent_again(
    parts,
) -> None:
    """An association aborted in the middle of an instance leaves the study without it:
    the study completes marked ``instance_lost`` (one warning that says the results are
    preliminary, not also ``study.interrupted``), and every job made for it meanwhile is
    preliminary, until that instance is stored: another association of the study that
    does not bring it leaves the mark (review: a parallel association moving on to its
    next series cleared it); the PACS sending it again clears it, and later jobs are
    final."""
    _, index, ingest = parts
    first, rest, other = ct_small(), ct_small(), ct_small()
    rest.SOPInstanceUID = generate_uid()
    other.SOPInstanceUID, other.SeriesInstanceUID = generate_uid(), generate_uid()
    assert ingest.store(received(first, association="a1")) == StoreStatus.SUCCESS
    ingest.association_ended("a1", aborted=True, lost_instance=str(rest.SOPInstanceUID))
    assert ingest.store(received(other, association="b1")) == StoreStatus.SUCCESS
    ingest.association_ended("b1")
    time.sleep(0.05)
    with structlog.testing.capture_logs() as logs:
        (study,) = CompletionMonitor(index, quiet_s=0.01, interrupted_s=0.02).check_now()
    assert study.instance_lost  # (b1 sent of the study: the interrupted wait ended)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["study.instance_lost"]
    assert "preliminary" in warnings[0]["action"]
    series = str(first.SeriesInstanceUID)
    job = index.add_job(study.study_uid, series, "p", ["r"], [])
    assert job is not None and job.preliminary
    # the PACS sends the lost instance again: the mark goes, the grown series' job is final
    assert ingest.store(received(rest, association="a2")) == StoreStatus.SUCCESS
    ingest.association_ended("a2")
    assert not index.study(study.study_uid).instance_lost
    again = index.add_job(study.study_uid, series, "p", ["r"], [])
    assert again is not None and not again.preliminary


def test_a_series_that_did_not_grow_gets_its_final_job_when_the_lost_instance_comes(
    parts,
) -> None:
    """The lost instance was of another series (the PACS sent the whole study again;
    this series' instances were duplicates): its preliminary result must become final
    all the same (known limit of session 22: the jobs' unique key kept it preliminary).
    And a series that has its final result gets no preliminary job at the same size when
    a later association of the study is cut."""
    _, index, ingest = parts
    first, lost, other, later = ct_small(), ct_small(), ct_small(), ct_small()
    lost.SOPInstanceUID = generate_uid()
    other.SOPInstanceUID, other.SeriesInstanceUID = generate_uid(), generate_uid()
    later.SOPInstanceUID = generate_uid()
    assert ingest.store(received(first, association="a1")) == StoreStatus.SUCCESS
    assert ingest.store(received(other, association="a1")) == StoreStatus.SUCCESS
    ingest.association_ended("a1", aborted=True, lost_instance=str(lost.SOPInstanceUID))
    study_uid, unchanged = str(first.StudyInstanceUID), str(other.SeriesInstanceUID)
    preliminary = index.add_job(study_uid, unchanged, "p", ["r"], [])
    assert preliminary is not None and preliminary.preliminary
    assert index.add_job(study_uid, unchanged, "p", ["r"], []) is None
    # the whole study again: the duplicate adds nothing to its series, the lost one comes
    assert ingest.store(received(other, association="a2")) == StoreStatus.SUCCESS
    assert ingest.store(received(lost, association="a2")) == StoreStatus.SUCCESS
    ingest.association_ended("a2")
    final = index.add_job(study_uid, unchanged, "p", ["r"], [])
    assert final is not None and not final.preliminary
    assert final.instance_count == preliminary.instance_count
    assert index.replaced_by(final) is None  # not done yet: nothing to replace
    assert index.add_job(study_uid, unchanged, "p", ["r"], []) is None
    # a later association of the study is cut: the series' final result stands
    assert ingest.store(received(other, association="a3")) == StoreStatus.SUCCESS
    ingest.association_ended("a3", aborted=True, lost_instance=str(later.SOPInstanceUID))
    assert index.study(study_uid).instance_lost
    assert index.add_job(study_uid, unchanged, "p", ["r"], []) is None


def test_an_abort_between_instances_loses_nothing_and_marks_nothing(parts) -> None:
    """Some PACS end every association with A-ABORT: aborted after its last instance,
    the study waits for more as interrupted, but nothing was lost and its jobs are final.
    Nor is anything lost when the instance cut short is one stored already (a re-send)."""
    _, index, ingest = parts
    instance = ct_small()
    assert ingest.store(received(instance, association="a1")) == StoreStatus.SUCCESS
    ingest.association_ended("a1", aborted=True)
    assert ingest.store(received(instance, association="a2")) == StoreStatus.SUCCESS
    ingest.association_ended("a2", aborted=True, lost_instance=str(instance.SOPInstanceUID))
    time.sleep(0.05)
    (study,) = CompletionMonitor(index, quiet_s=0.01, interrupted_s=0.02).check_now()
    assert study.interrupted and not study.instance_lost
    job = index.add_job(study.study_uid, str(instance.SeriesInstanceUID), "p", ["r"], [])
    assert job is not None and not job.preliminary


def test_index_lists_series_with_routing_attributes(parts) -> None:
    _, index, ingest = parts
    ds = ct_small()
    ingest.store(received(ds))
    (series,) = index.series_of(ds.StudyInstanceUID)
    assert series.modality == "CT"
    assert series.instance_count == 1
    assert series.sop_class_uid == ds.SOPClassUID
    assert series.slice_thickness == float(ds.SliceThickness)
    assert series.image_orientation is not None and len(series.image_orientation) == 6


def test_a_failed_handover_neither_blocks_other_studies_nor_is_lost(parts) -> None:
    """Two studies fall quiet together; routing the first fails once (the queue was
    unreachable). The second is routed in the same pass, the first on a later one
    (review: both were left complete and never routed)."""
    _, index, ingest = parts
    first, second = ct_small(), ct_small()
    for ds in (first, second):
        ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
        assert ingest.store(received(ds)) == StoreStatus.SUCCESS
    routed: list[str] = []
    failures = {first.StudyInstanceUID: 1}

    def route(study) -> None:
        if failures.get(study.study_uid, 0) > 0:
            failures[study.study_uid] -= 1
            raise ConnectionError("queue unreachable")
        routed.append(study.study_uid)

    monitor = CompletionMonitor(index, quiet_s=0.01, on_complete=route, retry_after_s=0.05)
    time.sleep(0.05)
    with structlog.testing.capture_logs() as events:
        assert len(monitor.check_now()) == 2
    assert routed == [second.StudyInstanceUID]
    assert [e["event"] for e in events].count("study.handover_failed") == 1
    time.sleep(0.1)
    monitor.check_now()
    assert routed == [second.StudyInstanceUID, first.StudyInstanceUID]
    monitor.check_now()
    assert len(routed) == 2  # routed once each


def test_an_instance_whose_spool_file_was_removed_is_stored_again(parts) -> None:
    """An operator removed a study's spool folder and the PACS sends it again: the
    known instance was acknowledged as a duplicate but not stored, a new one failed
    with A700 'free disk space' (the folder was remembered as made; found by review)."""
    spool, index, ingest = parts
    ds = ct_small()
    assert ingest.store(received(ds)) == StoreStatus.SUCCESS
    (path,) = index.instance_paths(ds.SeriesInstanceUID)
    shutil.rmtree(spool.root / ds.StudyInstanceUID)

    assert ingest.store(received(ds)) == StoreStatus.SUCCESS
    assert Path(path).is_file()
    assert dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    newer = ct_small()
    newer.SOPInstanceUID = generate_uid()
    assert ingest.store(received(newer)) == StoreStatus.SUCCESS
    study = index.study(ds.StudyInstanceUID)
    assert study is not None and study.instance_count == 2
