"""Enhanced (multi-frame) CT: a whole series as one instance, from routing to results.

Modern scanners may send a series as one Enhanced CT or MR instance whose frames are the
slices; orientation, thickness and rescale then live in its functional groups and the
frames come in the scanner's order, not by position. The source here is highdicom's
Legacy Converted Enhanced CT of the synthetic phantom series, with its frames shuffled
and, for the derived series, a rescale intercept of its own on every other frame.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from service.headers import parse_header
from service.index import StudyIndex
from service.offline import scan_folder
from service.pipeline.result import BundleIdentity, Label, PipelineResult, StageTimings, TaskKind
from service.pipeline.volume import Volume, load_series, read_headers
from service.records import StoredInstance
from service.reference_routes import reference_routes
from service.routing import plan
from service.testing import make_ct_phantom, make_ct_series, make_enhanced_ct
from service.writers.dicom import write_dicom_results
from tests.conftest import require_tool, storescu

MODELS = Path(__file__).resolve().parents[1] / "models"
SLICES = 24
#: Frame f of the source holds the converter's frame ORDER[f] (head first there).
ORDER = [int(i) for i in np.random.default_rng(7).permutation(SLICES)]
INTERCEPTS = [-1024.0 if f % 2 else -1000.0 for f in range(SLICES)]


def _series() -> list[Dataset]:
    return make_ct_series(
        slices=SLICES, rows=48, columns=48, pixel_spacing=(6.0, 6.0), slice_thickness=5.0
    )


@pytest.fixture(scope="module")
def enhanced(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("enhanced") / "enhanced.dcm"
    make_enhanced_ct(_series(), frame_order=ORDER, intercepts=INTERCEPTS).save_as(
        path, enforce_file_format=True
    )
    return path


@pytest.fixture(scope="module")
def loaded(enhanced: Path) -> tuple[Volume, list[Dataset]]:
    return load_series([enhanced]), read_headers([enhanced])


def _frame_z(ds: Dataset, frame_number: int) -> float:
    group = ds.PerFrameFunctionalGroupsSequence[frame_number - 1]
    if "PlanePositionSequence" not in group:  # one frame: the converter shares it
        group = ds.SharedFunctionalGroupsSequence[0]
    return float(group.PlanePositionSequence[0].ImagePositionPatient[2])


def _slice_z(volume: Volume, k: int) -> float:
    return float(volume.origin[2] + k * volume.spacing[2] * volume.direction[8])


# --------------------------------------------------------------------------- receive


def test_the_header_takes_routing_facts_from_the_functional_groups(enhanced: Path) -> None:
    ds = pydicom.dcmread(enhanced)
    assert "ImageOrientationPatient" not in ds and "BodyPartExamined" not in ds
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    header = parse_header(buffer.getvalue(), ds.file_meta.TransferSyntaxUID)
    assert header.frame_count == SLICES
    assert header.image_orientation == pytest.approx((1, 0, 0, 0, 1, 0))
    assert header.slice_thickness == pytest.approx(5.0)
    assert header.body_part == "ABDOMEN"  # the Frame Anatomy code, as the defined term


def _encoded(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def test_a_frame_anatomy_code_becomes_the_body_part_a_rule_names() -> None:
    """Annex L's table: "Chest and Abdomen" is what a CHESTABDOMEN rule must match."""
    ds = make_enhanced_ct(make_ct_series(slices=4, rows=16, columns=16, body_part="CHESTABDOMEN"))
    header = parse_header(_encoded(ds), ds.file_meta.TransferSyntaxUID)
    region = ds.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0].AnatomicRegionSequence
    assert region[0].CodeMeaning == "Chest and Abdomen"
    assert header.body_part == "CHESTABDOMEN"


def test_an_enhanced_instance_of_one_frame_still_has_its_routing_facts() -> None:
    """Some scanners send an Enhanced series one frame per instance."""
    ds = make_enhanced_ct(make_ct_series(slices=1, rows=16, columns=16))
    assert int(ds.NumberOfFrames) == 1 and "ImageOrientationPatient" not in ds
    header = parse_header(_encoded(ds), ds.file_meta.TransferSyntaxUID)
    assert header.image_orientation == pytest.approx((1, 0, 0, 0, 1, 0))
    assert (header.slice_thickness, header.body_part) == (1.25, "ABDOMEN")


def test_orientation_given_per_frame_is_read_from_the_first_frame() -> None:
    """An MR with stacks has no shared orientation. pydicom writes sequences with a
    defined length: 300 frames' groups (~1 MB) are over the size the receive path skips
    unread, and must still be read here."""
    ds = make_enhanced_ct(make_ct_series(slices=300, rows=16, columns=16, orientation="coronal"))
    shared = ds.SharedFunctionalGroupsSequence[0]
    for group in ds.PerFrameFunctionalGroupsSequence:
        group.PlaneOrientationSequence = shared.PlaneOrientationSequence
    del shared.PlaneOrientationSequence
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    header = parse_header(buffer.getvalue(), ds.file_meta.TransferSyntaxUID)
    assert header.image_orientation == pytest.approx((1, 0, 0, 0, 0, -1))  # coronal


def test_the_index_counts_frames_and_the_reference_ct_route_takes_the_series(
    enhanced: Path, tmp_path: Path
) -> None:
    scan = scan_folder(enhanced.parent)
    ((path, header),) = next(iter(scan.series.values()))
    index = StudyIndex(tmp_path / "index.sqlite")
    index.add_instance(
        StoredInstance(header, str(path), path.stat().st_size, "1.2.840.10008.1.2.1", "CT")
    )
    (series,) = index.series_of(header.study_uid)
    assert (series.instance_count, series.images) == (1, SLICES)
    routes = reference_routes(MODELS)
    chosen = plan([series], routes).selections
    assert [s.pipeline for s in chosen] == ["ct_abdomen_segmentation"]
    assert scan.series_infos()[0].images == SLICES  # radnode route/run agree


def test_an_index_of_the_previous_schema_is_upgraded_in_place(tmp_path: Path) -> None:
    from service.index import _JOBS_TABLE

    path = tmp_path / "index.sqlite"
    StudyIndex(path).close()
    db = sqlite3.connect(path)
    # the jobs table as versions 2-7 made it: no preliminary, unique by series, size, pipeline
    jobs_v2 = _JOBS_TABLE.replace("    preliminary INTEGER NOT NULL DEFAULT 0,\n", "").replace(
        "instance_count, preliminary)", "instance_count)"
    )
    assert "preliminary" not in jobs_v2.split("--")[0] and jobs_v2 != _JOBS_TABLE
    db.executescript(
        "ALTER TABLE series DROP COLUMN image_count;"
        " ALTER TABLE series DROP COLUMN view_position;"
        " ALTER TABLE studies DROP COLUMN refused_too_large;"
        f" DROP TABLE lost_in_transit; DROP TABLE jobs; {jobs_v2};"
        " DROP TABLE refused_no_space; DROP TABLE delivering; PRAGMA user_version=2;"
        "INSERT INTO studies VALUES ('1.2', 'k', 'complete', 40, 0, 0, NULL);"
        "INSERT INTO series (series_uid, study_uid, modality, body_part, series_description,"
        " sop_class_uid, instance_count, image_type, manufacturer, manufacturer_model_name,"
        " first_received_at, last_received_at) VALUES ('1.2.3', '1.2', 'CT', '', '', '1.2',"
        " 40, '', '', '', 0, 0);"
        "INSERT INTO jobs (job_id, study_uid, series_uid, pipeline, instance_count, routes,"
        " destinations, state, created_at) VALUES ('j0', '1.2', '1.2.3', 'old', 40, '[]',"
        " '[]', 'done', 0);"
    )
    db.close()
    index = StudyIndex(path)
    (series,) = index.series_of("1.2")
    assert series.images == 40 and series.view_position == ""
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 9
    old_job = index.job("j0")  # version 9 made the jobs table again, its rows kept
    assert old_job is not None and old_job.state.value == "done" and not old_job.preliminary
    assert index.add_job("1.2", "1.2.3", "old", ["r"], []) is None
    indexes = sqlite3.connect(path).execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs'"
    )
    assert {"jobs_by_state", "jobs_by_study"} <= {name for (name,) in indexes}
    assert index.instances_refused("1.2") == (0, 0)
    index.hold_while_delivering("a1", "1.2", "1.2.3")  # version 7's table is there
    assert index.next_quiet_at(10, hold_s=60) is None  # the study is complete
    study = index.study("1.2")  # version 8's columns are there
    assert study is not None and not study.instance_lost
    job = index.add_job("1.2", "1.2.3", "p", ["r"], [])
    assert job is not None and not job.preliminary


# --------------------------------------------------------------------------- results


def _segmentation(volume: Volume) -> PipelineResult:
    """Label 1 on the lower half of the slices, so a wrong frame order shows."""
    label_map = np.zeros(volume.array.shape, dtype=np.uint8)
    label_map[: SLICES // 2, 10:30, 12:36] = 1
    label_map[3, 5:8, 5:8] = 2  # one slice only
    return PipelineResult(
        bundle=BundleIdentity("ct_abdomen_segmentation", "0.1.0", TaskKind.SEGMENTATION),
        labels=(Label(1, "lower block"), Label(2, "speck")),
        device="cpu",
        timings=StageTimings(),
        label_map=label_map,
    )


@pytest.fixture(scope="module")
def segmentation(loaded, tmp_path_factory) -> dict[str, list[Dataset]]:
    volume, headers = loaded
    paths = write_dicom_results(
        _segmentation(volume), volume, headers, tmp_path_factory.mktemp("s")
    )
    objects: dict[str, list[Dataset]] = {}
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.filename = str(path)
        objects.setdefault(str(ds.Modality), []).append(ds)
    return objects


def test_the_volume_puts_shuffled_frames_in_position_order(loaded) -> None:
    volume, (source,) = loaded
    assert [s.frame_number for s in volume.sources] != list(range(1, SLICES + 1))
    for k, frame in enumerate(volume.sources):
        assert _frame_z(source, frame.frame_number) == pytest.approx(_slice_z(volume, k))


def test_seg_frames_reference_the_source_frame_at_their_position(loaded, segmentation) -> None:
    volume, (source,) = loaded
    (seg,) = segmentation["SEG"]
    label_map = _segmentation(volume).label_map
    masks = seg.pixel_array.reshape(-1, volume.array.shape[1], volume.array.shape[2])
    seen = 0
    for frame, mask in zip(seg.PerFrameFunctionalGroupsSequence, masks, strict=True):
        (reference,) = frame.DerivationImageSequence[0].SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        number = int(reference.ReferencedFrameNumber)
        z = float(frame.PlanePositionSequence[0].ImagePositionPatient[2])
        assert z == pytest.approx(_frame_z(source, number))
        k = next(k for k, s in enumerate(volume.sources) if s.frame_number == number)
        segment = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_array_equal(mask.astype(bool), label_map[k] == segment)
        seen += 1
    assert seen == SLICES // 2 + 1  # the block's slices and the speck's one


def test_key_images_reference_their_frame_and_are_oriented(loaded, segmentation) -> None:
    volume, _ = loaded
    label_map = _segmentation(volume).label_map
    for sc in segmentation["OT"]:
        (reference,) = sc.SourceImageSequence
        number = int(reference.ReferencedFrameNumber)
        k = next(k for k, s in enumerate(volume.sources) if s.frame_number == number)
        assert label_map[k].any()  # a key slice: one with a segment on it
        assert list(sc.PatientOrientation) == ["L", "P"]


def test_every_result_of_an_enhanced_source_passes_dciodvfy(loaded, tmp_path: Path) -> None:
    volume, headers = loaded
    tool = require_tool("dciodvfy")
    paths = write_dicom_results(_segmentation(volume), volume, headers, tmp_path / "seg")
    paths += write_dicom_results(_reconstruction(volume), volume, headers, tmp_path / "rec")
    errors = {}
    for path in paths:
        run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
        found = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
        if found:
            errors[path.name] = found
    assert errors == {}


def _reconstruction(volume: Volume) -> PipelineResult:
    return PipelineResult(
        bundle=BundleIdentity("ct_lowdose_denoising", "0.1.0", TaskKind.RECONSTRUCTION),
        labels=(),
        device="cpu",
        timings=StageTimings(),
        image=volume.array.astype(np.float32) * 0.5,
    )


def test_the_derived_image_is_one_enhanced_instance_in_source_frame_order(
    loaded, tmp_path: Path
) -> None:
    volume, (source,) = loaded
    paths = write_dicom_results(_reconstruction(volume), volume, [source], tmp_path)
    (derived_path,) = [p for p in paths if p.name.startswith("CT_")]
    derived = pydicom.dcmread(derived_path)
    assert derived.SOPClassUID == source.SOPClassUID
    assert int(derived.NumberOfFrames) == SLICES
    assert list(derived.ImageType[:2]) == ["DERIVED", "PRIMARY"]  # Enhanced: no SECONDARY
    for number, group in enumerate(derived.PerFrameFunctionalGroupsSequence, start=1):
        assert _frame_z(derived, number) == pytest.approx(_frame_z(source, number))
        (reference,) = group.DerivationImageSequence[0].SourceImageSequence
        assert int(reference.ReferencedFrameNumber) == number
    frame_types = [
        item.FrameType[0]
        for groups in (
            *derived.SharedFunctionalGroupsSequence,
            *derived.PerFrameFunctionalGroupsSequence,
        )
        for element in groups
        if element.keyword.endswith("FrameTypeSequence")
        for item in element.value
    ]
    assert frame_types and set(frame_types) == {"DERIVED"}
    # Read back as radnode reads any series: each frame's own intercept undone again.
    again = load_series([derived_path])
    np.testing.assert_allclose(again.array, np.rint(volume.array * 0.5), atol=1.0)


# --------------------------------------------------------------------------- end to end


def test_serve_segments_an_enhanced_ct_sent_by_storescu(radnode_factory, tmp_path: Path) -> None:
    """The reference CT route on defaults: one Enhanced CT instance in, a SEG whose liver
    is the phantom's, over the instance's frames, out (real model, real storescu)."""
    node = radnode_factory(RADNODE_ROUTES=None, RADNODE_MODELS__DIR=str(MODELS)).start()
    phantom = make_ct_phantom(seed=10301, rows=128)  # held out: training used seeds < 10000
    series = make_ct_series(
        volume=phantom.hu,
        pixel_spacing=(phantom.spacing[1], phantom.spacing[0]),
        slice_thickness=phantom.spacing[2],
    )
    order = [int(i) for i in np.random.default_rng(3).permutation(len(series))]
    enhanced = make_enhanced_ct(series, frame_order=order)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    # -R: propose the file's SOP class; storescu's default list lacks Legacy Converted.
    assert storescu(node.port, [path], "-R").returncode == 0

    (finished,) = node.wait_for_event("job.recorded", timeout=300)
    assert (finished["pipeline"], finished["state"]) == ("ct_abdomen_segmentation", "done")
    (summary_path,) = (node.data_dir / "results").rglob("result.json")
    summary = json.loads(summary_path.read_text())
    volumes = {s["label"].lower(): s["volume_ml"] for s in summary["segments"]}
    true_liver_ml = float((phantom.labels == 1).sum()) * float(np.prod(phantom.spacing)) / 1000
    assert abs(volumes["liver"] - true_liver_ml) < 0.15 * true_liver_ml, (volumes, true_liver_ml)
    (seg_path,) = summary_path.parent.glob("dicom/SEG_*.dcm")
    seg = pydicom.dcmread(seg_path)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        (reference,) = frame.DerivationImageSequence[0].SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
        z = float(frame.PlanePositionSequence[0].ImagePositionPatient[2])
        assert z == pytest.approx(_frame_z(enhanced, int(reference.ReferencedFrameNumber)))


# --------------------------------------------------------------------------- other layouts


def _per_frame_geometry(ds: Dataset) -> Dataset:
    """Plane Orientation and Pixel Measures per frame, none shared (Enhanced MR often)."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    for group in ds.PerFrameFunctionalGroupsSequence:
        group.PlaneOrientationSequence = shared.PlaneOrientationSequence
        group.PixelMeasuresSequence = shared.PixelMeasuresSequence
    del shared.PlaneOrientationSequence, shared.PixelMeasuresSequence
    return ds


def test_a_seg_is_written_when_the_geometry_is_given_per_frame(tmp_path: Path) -> None:
    path = tmp_path / "in" / "enhanced.dcm"
    path.parent.mkdir()
    source = _per_frame_geometry(make_enhanced_ct(_series(), frame_order=ORDER))
    source.save_as(path, enforce_file_format=True)
    volume, headers = load_series([path]), read_headers([path])
    paths = write_dicom_results(_segmentation(volume), volume, headers, tmp_path / "out")
    (seg,) = [pydicom.dcmread(p) for p in paths if p.name.startswith("SEG_")]
    for frame in seg.PerFrameFunctionalGroupsSequence:
        (reference,) = frame.DerivationImageSequence[0].SourceImageSequence
        z = float(frame.PlanePositionSequence[0].ImagePositionPatient[2])
        assert z == pytest.approx(_frame_z(source, int(reference.ReferencedFrameNumber)))
    assert "PlaneOrientationSequence" not in headers[0].SharedFunctionalGroupsSequence[0]


def _instances(tmp_path: Path, stacks: int) -> tuple[Volume, list[Dataset], list[Path]]:
    """The series as ``stacks`` Enhanced instances; the volume and its source headers."""
    series = _series()
    size = SLICES // stacks
    paths = []
    for k in range(stacks):
        part = make_enhanced_ct(
            series[k * size : (k + 1) * size],
            sop_instance_uid=generate_uid(entropy_srcs=[str(series[0].SeriesInstanceUID), str(k)]),
        )
        part.InstanceNumber = k + 1
        paths.append(tmp_path / f"part{k}.dcm")
        part.save_as(paths[-1], enforce_file_format=True)
    volume = load_series(paths)
    by_uid = {str(h.SOPInstanceUID): h for h in read_headers(paths)}
    headers = [by_uid[uid] for uid in dict.fromkeys(s.sop_instance_uid for s in volume.sources)]
    return volume, headers, paths


def test_enhanced_instances_of_one_frame_each_get_a_seg_that_references_each(
    tmp_path: Path,
) -> None:
    """Some scanners send an Enhanced MR or CT series one frame per instance: highdicom
    is given them as the single-frame images they are, and the references keep their
    Enhanced class."""
    volume, headers, _ = _instances(tmp_path, SLICES)
    written = write_dicom_results(_segmentation(volume), volume, headers, tmp_path / "seg")
    (seg,) = [pydicom.dcmread(p) for p in written if p.name.startswith("SEG_")]
    label_map = _segmentation(volume).label_map
    masks = seg.pixel_array.reshape(-1, volume.array.shape[1], volume.array.shape[2])
    by_uid = {str(h.SOPInstanceUID): k for k, h in enumerate(headers)}
    for frame, mask in zip(seg.PerFrameFunctionalGroupsSequence, masks, strict=True):
        (reference,) = frame.DerivationImageSequence[0].SourceImageSequence
        assert reference.ReferencedSOPClassUID == headers[0].SOPClassUID  # Enhanced, kept
        k = by_uid[reference.ReferencedSOPInstanceUID]
        z = float(frame.PlanePositionSequence[0].ImagePositionPatient[2])
        assert z == pytest.approx(_frame_z(headers[k], 1))
        segment = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_array_equal(mask.astype(bool), label_map[k] == segment)
    listed = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert {i.ReferencedSOPClassUID for i in listed} == {headers[0].SOPClassUID}
    assert "SOPClassUID" in headers[0] and "ImagePositionPatient" not in headers[0]
    tool = require_tool("dciodvfy")
    run = subprocess.run([tool, seg.filename], capture_output=True, text=True, timeout=60)
    assert [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line] == []


@pytest.mark.parametrize("stacks", [2, SLICES])  # two stacks; one frame per instance
def test_a_series_of_several_enhanced_instances_gets_a_derived_image_each(
    tmp_path: Path, stacks: int
) -> None:
    volume, headers, _ = _instances(tmp_path, stacks)
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    if stacks == 2:
        with capture_logs() as logs:
            written = write_dicom_results(_segmentation(volume), volume, headers, tmp_path / "s")
        assert sorted({p.name.split("_")[0] for p in written}) == ["OT", "SR"]
        warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
        assert warnings == ["results.seg_not_written"]
    derived = [
        pydicom.dcmread(p)
        for p in write_dicom_results(_reconstruction(volume), volume, headers, tmp_path / "rec")
        if p.name.startswith("CT_")
    ]
    assert len(derived) == stacks
    again = load_series([d.filename for d in derived])
    np.testing.assert_allclose(again.array, np.rint(volume.array * 0.5), atol=1.0)
    for ds in derived:
        sources = {
            g.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for g in ds.PerFrameFunctionalGroupsSequence
        }
        assert len(sources) == 1 and sources <= set(by_uid)
