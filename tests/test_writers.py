"""DICOM result writers: SEG, Comprehensive 3D SR, SC and derived series.

Results are built directly as PipelineResults on synthetic volumes (a 30-slice CT with a
known sphere, a 512x512 radiograph) and every written file is checked by dciodvfy.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import structlog

from service.config import load_settings
from service.errors import ResultsNotWritten
from service.pipeline.result import (
    BundleIdentity,
    CodedConcept,
    Label,
    PipelineResult,
    StageTimings,
    TaskKind,
)
from service.pipeline.volume import Volume, load_series, read_headers
from service.publish import NOT_ANALYZED_FOLDER, ResultPublisher, write_dicom
from service.records import JobTicket
from service.testing import write_ct_series, write_radiograph
from service.writers import sc
from service.writers.dicom import result_sr_uid, write_dicom_results, write_not_analyzed_report
from service.writers.files import write_result_files
from service.writers.provenance import (
    Provenance,
    device_uid,
    result_uid,
    sources_digest,
)
from tests.conftest import require_tool

LIVER = Label(
    1,
    "liver",
    CodedConcept("10200004", "SCT", "Liver"),
    CodedConcept("123037004", "SCT", "Anatomical Structure"),
)
UNCODED = Label(3, "blob")  # no codes: category SCT Tissue, type radnode's private code
EMPTY = Label(4, "nothing here", CodedConcept("18639004", "SCT", "Left kidney"))
NODULE = Label(0, "lung nodule", CodedConcept("427359005", "SCT", "Solitary nodule of lung"))
SPHERE_RADIUS_MM = 40.0


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> tuple[Volume, list[pydicom.Dataset]]:
    folder = tmp_path_factory.mktemp("ct")
    paths = write_ct_series(
        folder, slices=30, rows=64, columns=64, pixel_spacing=(5.0, 5.0), slice_thickness=5.0
    )
    volume = load_series(paths)
    by_uid = {h.SOPInstanceUID: h for h in read_headers(paths)}
    return volume, [by_uid[s.sop_instance_uid] for s in volume.sources]


@pytest.fixture(scope="module")
def radiograph(tmp_path_factory) -> tuple[Volume, list[pydicom.Dataset]]:
    path = write_radiograph(tmp_path_factory.mktemp("xr") / "xr.dcm", rows=512, columns=512)
    return load_series([path]), read_headers([path])


def _sphere(volume: Volume) -> np.ndarray:
    """Label 1: a sphere of SPHERE_RADIUS_MM at the volume centre; label 3: a small cube."""
    z, y, x = np.indices(volume.array.shape)
    sx, sy, sz = volume.spacing
    centre = np.asarray(volume.array.shape) / 2.0
    r2 = ((z - centre[0]) * sz) ** 2 + ((y - centre[1]) * sy) ** 2 + ((x - centre[2]) * sx) ** 2
    label_map = np.zeros(volume.array.shape, dtype=np.uint8)
    label_map[r2 <= SPHERE_RADIUS_MM**2] = 1
    label_map[2:5, 2:6, 2:6] = 3
    return label_map


def _segmentation(volume: Volume) -> PipelineResult:
    return PipelineResult(
        bundle=BundleIdentity("ct_abdomen_segmentation", "0.1.0", TaskKind.SEGMENTATION),
        labels=(LIVER, UNCODED, EMPTY),
        device="cpu",
        timings=StageTimings(),
        label_map=_sphere(volume),
    )


def _classification(probability: float, size: int = 512) -> PipelineResult:
    heatmap = np.zeros((1, size, size), dtype=np.float32)
    heatmap[0, 150:250, 300:400] = 0.9
    return PipelineResult(
        bundle=BundleIdentity("cxr_nodule_classification", "0.1.0", TaskKind.CLASSIFICATION),
        labels=(NODULE,),
        device="cpu",
        timings=StageTimings(),
        probabilities=(probability,),
        heatmap=heatmap,
    )


def _reconstruction(volume: Volume, scale: float = 0.5) -> PipelineResult:
    return PipelineResult(
        bundle=BundleIdentity("ct_lowdose_denoising", "0.1.0", TaskKind.RECONSTRUCTION),
        labels=(),
        device="cpu",
        timings=StageTimings(),
        image=(volume.array.astype(np.float32) * scale),
    )


def _read(paths: list[Path]) -> dict[str, list[pydicom.Dataset]]:
    by_modality: dict[str, list[pydicom.Dataset]] = {}
    for path in paths:
        ds = pydicom.dcmread(path)
        by_modality.setdefault(ds.Modality, []).append(ds)
    return by_modality


def _content_items(ds: pydicom.Dataset):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def _num(ds: pydicom.Dataset, code_value: str) -> list[float]:
    return [
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in _content_items(ds)
        if item.get("ValueType") == "NUM"
        and item.ConceptNameCodeSequence[0].CodeValue == code_value
    ]


def _dciodvfy_errors(path: Path) -> list[str]:
    tool = require_tool("dciodvfy")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    warnings = sorted({line for line in lines if line.startswith("Warning")})
    if warnings:
        print(f"{path.name}: " + " | ".join(warnings))
    return [line for line in lines if line.startswith("Error")]


@pytest.fixture(scope="module")
def written(ct, radiograph, tmp_path_factory) -> dict[str, list[Path]]:
    out = tmp_path_factory.mktemp("results")
    volume, headers = ct
    xr_volume, xr_headers = radiograph
    return {
        "segmentation": write_dicom_results(_segmentation(volume), volume, headers, out / "seg"),
        "classification": write_dicom_results(
            _classification(0.87), xr_volume, xr_headers, out / "cls"
        ),
        "reconstruction": write_dicom_results(
            _reconstruction(volume), volume, headers, out / "rec"
        ),
    }


def test_every_object_passes_dciodvfy(written):
    paths = [p for kind in written.values() for p in kind]
    checked = paths[:8] + [p for p in paths[8:] if not p.name.startswith("CT_")]
    errors = {p.name: e for p in checked if (e := _dciodvfy_errors(p))}
    assert errors == {}


def test_a_ct_with_an_empty_spacing_between_slices_still_gets_its_report(ct, tmp_path):
    """highdicom reads Spacing Between Slices when present; empty, it failed the job."""
    volume, headers = ct
    odd = [copy.deepcopy(h) for h in headers]
    for header in odd:
        header.SpacingBetweenSlices = None
    objects = _read(write_dicom_results(_segmentation(volume), volume, odd, tmp_path))
    assert len(objects["SR"]) == 1 and objects["SEG"]


@pytest.mark.parametrize("missing", ["ImagerPixelSpacing", "PatientOrientation"])
def test_a_cr_without_what_the_image_library_reads_still_gets_its_results(
    radiograph, tmp_path, missing
):
    """A valid CR with Pixel Spacing only (Imager Pixel Spacing is Type 3 there) failed
    the whole job in highdicom's Image Library entry, and nothing reached the PACS
    (acceptance pass). The image is left out of the library; the report is whole."""
    volume, headers = radiograph
    odd = [copy.deepcopy(h) for h in headers]
    for header in odd:
        header.Modality = "CR"
        header.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        header.PixelSpacing = header.ImagerPixelSpacing
        if missing == "PatientOrientation":
            header.PatientOrientation = ""
        else:
            del header.ImagerPixelSpacing
    objects = _read(write_dicom_results(_classification(0.87), volume, odd, tmp_path))
    (report,) = objects["SR"]
    assert objects["OT"] and "Present" in str(report.ContentSequence)
    assert "Image Library" not in str(report.ContentSequence)
    assert _dciodvfy_errors(next(tmp_path.glob("SR*.dcm"))) == []


def test_the_report_lists_its_overlay_images_in_its_evidence(written):
    """The heatmap is the only explanation of a classification's probability, and a
    reader of the SR could not get to it (acceptance pass)."""
    for kind in ("classification", "segmentation"):
        objects = _read(written[kind])
        (report,) = objects["SR"]
        listed = {
            sop.ReferencedSOPInstanceUID
            for study in report.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for sop in series.ReferencedSOPSequence
        }
        overlays = {ds.SOPInstanceUID for ds in objects["OT"]}
        assert overlays and overlays <= listed, kind


def test_segmentation_writes_sr_seg_and_sc(written):
    objects = _read(written["segmentation"])
    assert sorted(objects) == ["OT", "SEG", "SR"]
    assert len(objects["SEG"]) == 1 and len(objects["SR"]) == 1
    assert 1 <= len(objects["OT"]) <= 5


def test_seg_has_one_segment_per_nonempty_label_on_the_source_frames(written, ct):
    volume, headers = ct
    seg = _read(written["segmentation"])["SEG"][0]
    segments = seg.SegmentSequence
    assert [s.SegmentLabel for s in segments] == ["liver", "blob"]  # "nothing here" is empty
    assert segments[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    # an uncoded label: category Tissue, type radnode's private code, the code the SR
    # and the HL7 result give it too (acceptance pass: every one was "Tissue")
    uncoded = segments[1].SegmentedPropertyTypeCodeSequence[0]
    assert (uncoded.CodeValue, uncoded.CodingSchemeDesignator) == ("label-3", "99RADNODE")
    assert segments[1].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "85756007"
    sr = _read(written["segmentation"])["SR"][0]
    findings = {item.ConceptCodeSequence[0].CodeValue for item in _content_items(sr)
                if item.get("ConceptCodeSequence") and item.ConceptNameCodeSequence[0].CodeValue
                in ("121071", "363698007")}  # fmt: skip
    assert "label-3" in findings
    assert segments[0].SegmentAlgorithmType == "AUTOMATIC"
    assert segments[0].SegmentAlgorithmName == "ct_abdomen_segmentation"
    assert seg.StudyInstanceUID == headers[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == volume.frame_of_reference_uid
    assert seg.PatientID == headers[0].PatientID
    label_map = _sphere(volume)
    expected_frames = sum(int((label_map[k] == v).any()) for k in range(30) for v in (1, 3))
    assert int(seg.NumberOfFrames) == expected_frames  # empty frames omitted
    # label 3 became segment 2 (label 2 is empty): its frames are the cube's slices
    per_segment = [
        int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for frame in seg.PerFrameFunctionalGroupsSequence
    ]
    assert per_segment.count(2) == sum(int((label_map[k] == 3).any()) for k in range(30))
    referenced = {
        ref.ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
        for ref in frame.DerivationImageSequence[0].SourceImageSequence
    }
    source_uids = {h.SOPInstanceUID for h in headers}
    assert referenced and referenced <= source_uids


def test_sr_reports_the_sphere_volume_and_references_the_segment(written, ct):
    volume, headers = ct
    objects = _read(written["segmentation"])
    sr, seg = objects["SR"][0], objects["SEG"][0]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == headers[0].StudyInstanceUID
    volumes = _num(sr, "118565006")
    voxels = int((_sphere(volume) == 1).sum())
    assert volumes[0] == pytest.approx(voxels * 125.0 / 1000.0, rel=1e-3)
    assert volumes[0] == pytest.approx(4 / 3 * np.pi * SPHERE_RADIUS_MM**3 / 1000, rel=0.1)
    assert volumes[2] == 0.0  # the empty label still gets a group
    # to 0.01 mL, as the HL7 result says it (the pass read 1308.7142 mL against 1308.71)
    assert all(round(v, 2) == v for v in volumes)
    assert len(_num(sr, "112031")) == 2  # mean HU of both non-empty segments (CT)
    refs = [
        item
        for item in _content_items(sr)
        if item.get("ValueType") == "IMAGE"
        and "ReferencedSegmentNumber" in item.ReferencedSOPSequence[0]
    ]
    assert {r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for r in refs} == {
        seg.SOPInstanceUID
    }
    device = [i for i in _content_items(sr) if i.ConceptNameCodeSequence[0].CodeValue == "121012"]
    assert device and device_uid("ct_abdomen_segmentation", "0.1.0") == device[0].UID
    assert sr.VerificationFlag == "UNVERIFIED"


def test_classification_sr_has_probability_and_present_finding(written, radiograph):
    _, headers = radiograph
    objects = _read(written["classification"])
    assert sorted(objects) == ["OT", "SR"]  # no SEG for classification
    sr = objects["SR"][0]
    assert _num(sr, "122157") == [pytest.approx(87.0)]
    evaluations = [
        i.ConceptCodeSequence[0].CodeValue
        for i in _content_items(sr)
        if i.get("ValueType") == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "427359005"
    ]
    assert evaluations == ["52101004"]  # Present, 0.87 >= 0.5
    sc = objects["OT"][0]
    assert sc.BurnedInAnnotation == "YES"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == headers[0].SOPInstanceUID
    assert sc.StudyInstanceUID == headers[0].StudyInstanceUID
    assert sc.PhotometricInterpretation == "RGB"
    # The heat map (rows 150-250, columns 300-400 of the 512^2 image) is coloured
    # where it is hot; elsewhere, below the banner, the picture stays grey.
    pixels = sc.pixel_array.astype(int)
    scale = sc.Rows / 512
    hot = pixels[int(180 * scale) : int(220 * scale), int(330 * scale) : int(370 * scale)]
    cold = pixels[int(400 * scale) :, : int(100 * scale)]
    assert (np.ptp(hot, axis=2) > 60).mean() > 0.9
    assert (np.ptp(cold, axis=2) == 0).all()


def test_low_probability_is_absent(radiograph, tmp_path):
    volume, headers = radiograph
    paths = write_dicom_results(_classification(0.2), volume, headers, tmp_path)
    sr = _read(paths)["SR"][0]
    codes = [
        i.ConceptCodeSequence[0].CodeValue
        for i in _content_items(sr)
        if i.get("ValueType") == "CODE"
    ]
    assert "272519000" in codes and "52101004" not in codes


def test_every_derived_image_carries_an_ai_overlay_its_pixels_untouched(written):
    """A denoised CT looked like an acquired one in a viewer without a description
    overlay (acceptance pass): an overlay plane says it on every image, which a viewer
    draws over the image; the pixels and Burned In Annotation NO stay."""
    derived = _read(written["reconstruction"])["CT"]
    for ds in derived:
        size = (ds[0x6000, 0x0010].value, ds[0x6000, 0x0011].value)
        assert size == (ds.Rows, ds.Columns)
        assert ds[0x6000, 0x0040].value == "G" and ds.BurnedInAnnotation == "NO"
        assert "NOT FOR DIAGNOSIS" in ds[0x6000, 0x0022].value
    mask = derived[0].overlay_array(0x6000)
    assert mask.shape == (derived[0].Rows, derived[0].Columns)
    assert 0 < mask.sum() < mask.size // 20  # text in a corner, not a filled plane
    assert mask[: mask.shape[0] // 3].sum() == mask.sum()  # along the top edge


def test_derived_series_keeps_class_geometry_and_rescale(written, ct):
    volume, headers = ct
    objects = _read(written["reconstruction"])
    assert sorted(objects) == ["CT", "SR"]
    derived = sorted(objects["CT"], key=lambda ds: int(ds.InstanceNumber))
    assert len(derived) == len(headers)
    assert len({ds.SeriesInstanceUID for ds in derived}) == 1
    assert derived[0].SeriesInstanceUID != headers[0].SeriesInstanceUID
    for ds, source in zip(derived, headers, strict=True):
        assert ds.SOPClassUID == source.SOPClassUID
        assert ds.ImagePositionPatient == source.ImagePositionPatient
        assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    hu = derived[5].pixel_array * float(derived[5].RescaleSlope) + float(
        derived[5].RescaleIntercept
    )
    assert np.allclose(hu, np.rint(volume.array[5] * 0.5), atol=1.0)
    note = [
        i.TextValue
        for i in _content_items(objects["SR"][0])
        if i.get("ValueType") == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "121106"
    ]
    assert note and derived[0].SeriesInstanceUID in note[0]


def test_every_object_names_the_algorithm(written):
    for path in [p for kind in written.values() for p in kind][:40]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        items = [
            item
            for item in ds.ContributingEquipmentSequence
            if item.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
        ]
        assert len(items) == 1, path.name
        item = items[0]
        assert item.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"
        assert item.Manufacturer == "radnode"
        assert item.SoftwareVersions == "0.1.0"
        assert "not for diagnostic use" in item.ContributionDescription
        assert ds.SeriesDescription.startswith("AI ")


def test_every_object_of_a_result_series_has_one_series_date_and_time(written):
    """highdicom stamps each SC image with its own now(): the series time differed
    between the images of one series (review)."""
    for paths in written.values():
        by_series: dict[str, set[tuple[str, str]]] = {}
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            by_series.setdefault(ds.SeriesInstanceUID, set()).add((ds.SeriesDate, ds.SeriesTime))
        assert all(len(stamps) == 1 for stamps in by_series.values()), by_series


def test_a_revision_whose_earlier_sr_is_gone_is_still_marked_revised(ct, tmp_path):
    """The earlier result's folder may be gone (or not written yet by another worker):
    the result is still a revision, as its HL7 correction says, naming no SR."""
    volume, headers = ct
    paths = write_dicom_results(
        _segmentation(volume), volume, headers, tmp_path, predecessor=None, revised=True
    )
    sr = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert sr.SeriesDescription.endswith(" revised 30 img")
    assert "PredecessorDocumentsSequence" not in sr


def test_a_preliminary_result_says_so_and_has_uids_of_its_own(ct, tmp_path):
    """The SR's flags say PRELIMINARY and PARTIAL, every series description ends in
    "preliminary" (a revision's mark kept too); its UIDs are not the final result's,
    which a later job may make from the same images (the lost instance was of another
    series), but its findings keep their tracking UIDs."""
    volume, headers = ct
    final = write_dicom_results(_segmentation(volume), volume, headers, tmp_path / "f")
    preliminary = write_dicom_results(_segmentation(volume), volume, headers, tmp_path / "p",
                                      revised=True, preliminary=True)  # fmt: skip
    read = [[pydicom.dcmread(p) for p in paths] for paths in (final, preliminary)]
    (final_sr, *final_rest), (sr, *rest) = read
    assert (sr.PreliminaryFlag, sr.CompletionFlag) == ("PRELIMINARY", "PARTIAL")
    assert (final_sr.PreliminaryFlag, final_sr.CompletionFlag) == ("FINAL", "COMPLETE")
    assert all(ds.SeriesDescription.endswith(" revised 30 img preliminary") for ds in [sr, *rest])
    # the version is kept whole, the name shortened (it showed 0.1.0 as "0.1": review)
    assert all(" 0.1.0 revised" in ds.SeriesDescription for ds in [sr, *rest])
    assert not any("preliminary" in ds.SeriesDescription for ds in [final_sr, *final_rest])
    uids = {ds.SOPInstanceUID for ds in [sr, *rest]} | {ds.SeriesInstanceUID for ds in rest}
    assert not uids & {ds.SOPInstanceUID for ds in [final_sr, *final_rest]}
    assert result_sr_uid(_segmentation(volume), volume, preliminary=True) == sr.SOPInstanceUID

    def tracking(ds):  # the UIDREF items named Tracking Unique Identifier (DCM 112040)
        return {
            str(item.UID)
            for item in ds.iterall()
            if item.keyword == "ContentSequence"
            for item in item.value
            if item.get("ValueType") == "UIDREF"
            and item.ConceptNameCodeSequence[0].CodeValue == "112040"
        }

    assert tracking(sr) and tracking(sr) == tracking(final_sr)


def test_rewriting_gives_the_same_uids(ct, tmp_path):
    volume, headers = ct
    first = write_dicom_results(_segmentation(volume), volume, headers, tmp_path / "a")
    second = write_dicom_results(_segmentation(volume), volume, headers, tmp_path / "b")
    assert [p.name for p in first] == [p.name for p in second]
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in first]
    sources = sources_digest([str(h.SOPInstanceUID) for h in headers])
    assert uids[0] == result_uid(
        volume.series_uid, "ct_abdomen_segmentation", "0.1.0", "sr", 0, sources=sources
    )


def _names(paths: list[Path]) -> dict[str, pydicom.Dataset]:
    """SOP Instance UID -> header of each written object."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return {str(h.SOPInstanceUID): h for h in headers}


def test_a_series_that_grew_gets_new_objects_that_name_the_report_they_replace(ct, tmp_path):
    """The acceptance run's case: results were sent for the first part of a series, the
    rest came later. The second result's content differs, so none of its objects may
    reuse a UID of the first (a PACS keeps the first object it got under a UID, and
    would show the old result); its SR names the old SR as its predecessor, and the
    tracking UIDs (the findings) stay the same."""
    volume, headers = ct
    paths = [Path(h.filename) for h in headers]
    part = load_series(paths[:20])
    by_uid = {h.SOPInstanceUID: h for h in headers}
    part_headers = [by_uid[s.sop_instance_uid] for s in part.sources]
    before = _names(write_dicom_results(_segmentation(part), part, part_headers, tmp_path / "a"))
    (old_sr,) = [h for h in before.values() if h.Modality == "SR"]

    after = _names(
        write_dicom_results(
            _segmentation(volume), volume, headers, tmp_path / "b", predecessor=old_sr
        )
    )
    assert not set(before) & set(after)
    old_series = {h.SeriesInstanceUID for h in before.values()}
    assert not old_series & {h.SeriesInstanceUID for h in after.values()}
    (new_sr,) = [h for h in after.values() if h.Modality == "SR"]
    (study,) = new_sr.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == old_sr.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == old_sr.SeriesInstanceUID
    (item,) = series.ReferencedSOPSequence
    assert item.ReferencedSOPInstanceUID == old_sr.SOPInstanceUID
    assert _tracking_uids(new_sr) == _tracking_uids(old_sr) != set()
    assert "PredecessorDocumentsSequence" not in old_sr
    # In the PACS the two sit side by side: the revision says so, and when it was made.
    assert all(h.SeriesDescription.endswith(" revised 30 img") for h in after.values())
    assert not any("revised" in h.SeriesDescription for h in before.values())
    assert all(h.SeriesDate and h.SeriesTime for h in after.values())
    # ... and under numbers of their own: the same numbers twice read as one series
    old_numbers = {h.Modality: h.SeriesNumber for h in before.values()}
    new_numbers = {h.Modality: h.SeriesNumber for h in after.values()}
    assert len(new_numbers) >= 3  # SR, SEG, SC
    assert all(new_numbers[m] == old_numbers[m] + 4 for m in new_numbers)


def _tracking_uids(sr: pydicom.Dataset) -> set[str]:
    found: set[str] = set()
    pending = list(pydicom.dcmread(sr.filename).ContentSequence)
    while pending:
        item = pending.pop()
        if item.get("ConceptNameCodeSequence") and item.ConceptNameCodeSequence[0].CodeValue == (
            "112040"  # Tracking Unique Identifier
        ):
            found.add(str(item.UID))
        pending.extend(item.get("ContentSequence", []))
    return found


def test_each_pipeline_numbers_its_result_series_in_a_block_of_its_own(written):
    """Two pipelines on one study both wrote their report as series 9901 (acceptance
    run). Each pipeline now has a block of ten; kinds keep their order inside it."""
    names = ("ct_abdomen_segmentation", "ct_lowdose_denoising", "cxr_nodule_classification",
             "mr_brain_extraction")  # fmt: skip
    numbers = {}
    for name in names:
        provenance = Provenance.of(BundleIdentity(name, "1.0", TaskKind.SEGMENTATION), "1.2.3")
        kinds = [provenance.series_number(k) for k in ("SR", "SEG", "SC", "DERIVED")]
        assert kinds == list(range(kinds[0], kinds[0] + 4)) and 9000 < kinds[0] < 9900
        numbers[name] = kinds[0]
    assert len(set(numbers.values())) == len(names)  # the shipped pipelines do not clash
    sr = pydicom.dcmread(written["segmentation"][0], stop_before_pixels=True)
    expected = Provenance.of(BundleIdentity("ct_abdomen_segmentation", "0.1.0",
                                            TaskKind.SEGMENTATION), "x")  # fmt: skip
    assert sr.SeriesNumber == expected.series_number("SR")


def test_new_model_version_gets_new_uids_and_device_uid():
    assert result_uid("1.2.3", "p", "1.0", "sr") != result_uid("1.2.3", "p", "1.1", "sr")
    assert device_uid("p", "1.0") != device_uid("p", "1.1")
    assert len(result_uid("1.2.3", "p", "1.0", "sr")) <= 64


def test_headers_out_of_order_are_refused(ct, tmp_path):
    volume, headers = ct
    with pytest.raises(ValueError, match=r"volume\.sources order"):
        write_dicom_results(_segmentation(volume), volume, headers[::-1], tmp_path)


def test_dcmtk_dsrdump_renders_every_sr(written):
    reports = [p for kind in written.values() for p in kind if p.name.startswith("SR_")]
    assert len(reports) == 3  # segmentation, classification, reconstruction
    for path in reports:
        run = subprocess.run([require_tool("dsrdump"), str(path)], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert "Imaging Measurement Report" in run.stdout, run.stdout[:500]
        assert "E:" not in run.stderr, run.stderr  # DCMTK prefixes errors with "E:"


def test_heatmap_overlay_matches_the_per_pixel_ramp() -> None:
    """The looked-up blend is the ramp computed per pixel, to within 2 grey levels;
    zero heat leaves the picture as it was."""
    from service.writers.sc import HEATMAP_ALPHA, HEATMAP_FLOOR, _overlay_heatmap

    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    heat = rng.random((64, 80)).astype(np.float32)
    heat[:8] = 0.0
    ramp = np.stack([np.clip(1.5 - np.abs(4 * heat - c), 0, 1) for c in (3, 2, 1)], axis=2)
    weight = np.clip((heat - HEATMAP_FLOOR) / (1 - HEATMAP_FLOOR), 0, 1)
    alpha = (HEATMAP_ALPHA * weight)[:, :, np.newaxis]
    exact = np.clip((1 - alpha) * rgb + alpha * ramp * 255.0, 0, 255)
    blended = _overlay_heatmap(rgb, heat)
    assert blended.dtype == np.uint8
    assert np.abs(blended.astype(float) - exact).max() <= 2.0
    assert np.array_equal(blended[:8], rgb[:8])
    # heat below the floor leaves the picture grey too: no veil over the anatomy
    cool = np.full((4, 4), HEATMAP_FLOOR * 0.9, dtype=np.float32)
    assert np.array_equal(_overlay_heatmap(rgb[:4, :4], cool), rgb[:4, :4])


def test_key_slices_are_each_labels_largest_slice() -> None:
    from service.writers.sc import key_slices

    label_map = np.zeros((8, 10, 10), dtype=np.uint8)
    label_map[1, :2, :2] = 1
    label_map[2, :5, :5] = 1  # label 1 is largest here
    label_map[5, :3, :3] = 2
    label_map[2, 8:, 8:] = 2  # smaller than on slice 5
    assert key_slices(label_map, [1, 2, 3]) == [2, 5]  # label 3 is absent
    assert key_slices(label_map, [2, 1], limit=1) == [5]


def test_a_derived_monochrome1_image_keeps_its_source_stored_values(tmp_path):
    """An identity reconstruction of a MONOCHROME1 radiograph: loading inverted it to
    MONOCHROME2, so writing must invert it back; otherwise it shows as a negative."""
    source_path = write_radiograph(
        tmp_path / "xr.dcm", rows=64, columns=64, photometric="MONOCHROME1"
    )
    volume = load_series([source_path])
    assert volume.inverted_monochrome1
    identity = _reconstruction(volume, scale=1.0)
    paths = write_dicom_results(identity, volume, read_headers([source_path]), tmp_path / "out")
    (derived,) = [d for d in map(pydicom.dcmread, paths) if d.Modality != "SR"]
    source = pydicom.dcmread(source_path)
    assert derived.PhotometricInterpretation == "MONOCHROME1"
    assert np.array_equal(derived.pixel_array, source.pixel_array)


def test_secondary_captures_carry_the_sources_whole_patient_and_study_modules(tmp_path):
    """The SEG and SR copy the Patient and General Study modules; the SC copied only a
    few attributes, so Issuer of Patient ID (how a PACS tells two patients with the
    same ID apart) and Study Description were missing (review, dcentvfy)."""
    source = pydicom.dcmread(write_radiograph(tmp_path / "xr.dcm", rows=256, columns=256))
    source.IssuerOfPatientID = "HOSPITAL-A"
    source.StudyDescription = "CHEST PA"
    source.PatientAge = "054Y"
    path = tmp_path / "xr-full.dcm"
    source.save_as(path, enforce_file_format=True)
    volume, headers = load_series([path]), read_headers([path])
    result = _classification(0.9, size=256)
    written = [pydicom.dcmread(p) for p in write_dicom_results(result, volume, headers, tmp_path)]
    (sc,) = [ds for ds in written if ds.Modality == "OT"]
    for keyword in ("IssuerOfPatientID", "StudyDescription", "PatientAge", "PatientID"):
        assert sc.get(keyword) == source.get(keyword), keyword


@pytest.mark.parametrize(
    ("laterality", "image_laterality", "expected"),
    [("L", None, "L"), (None, "R", "R"), (None, "U", ""), (None, None, "")],
)
def test_a_secondary_capture_keeps_the_side_of_a_one_sided_image(
    tmp_path, laterality, image_laterality, expected
):
    """A hand or knee radiograph carries its side as Image Laterality, which the SC has
    no module for: its overlay was filed with an empty Laterality, without a side
    (acceptance pass)."""
    source = pydicom.dcmread(write_radiograph(tmp_path / "xr.dcm", rows=256, columns=256))
    for keyword, value in (("Laterality", laterality), ("ImageLaterality", image_laterality)):
        if value is None:
            source.pop(keyword, None)
        else:
            setattr(source, keyword, value)
    path = tmp_path / "xr-side.dcm"
    source.save_as(path, enforce_file_format=True)
    volume, headers = load_series([path]), read_headers([path])
    written = [
        pydicom.dcmread(p)
        for p in write_dicom_results(_classification(0.9, size=256), volume, headers, tmp_path)
    ]
    (sc,) = [ds for ds in written if ds.Modality == "OT"]
    assert "Laterality" in sc
    assert (sc.Laterality or "") == expected


def test_a_derived_series_is_dated_now_and_made_by_radnode(written, ct):
    """A denoised series copied the source's creation, series and content dates and
    its scanner as the General Equipment (review); the scanner belongs in Contributing
    Equipment as the acquisition equipment, the dates are the derivation's."""
    _, headers = ct
    objects = _read(written["reconstruction"])
    derived = sorted(objects["CT"], key=lambda ds: int(ds.InstanceNumber))
    source = headers[0]
    assert derived[0].Manufacturer == "radnode"
    assert derived[0].ManufacturerModelName != source.get("ManufacturerModelName")
    today = datetime.date.today().strftime("%Y%m%d")  # the fixture wrote them today
    assert source.SeriesDate != today
    for keyword in ("SeriesDate", "ContentDate", "InstanceCreationDate"):
        assert derived[0].get(keyword) == today, keyword
    purposes = [
        item.PurposeOfReferenceCodeSequence[0].CodeValue
        for item in derived[0].ContributingEquipmentSequence
    ]
    assert purposes == ["109101", "Newcode1"]
    assert derived[0].ContributingEquipmentSequence[0].Manufacturer == source.Manufacturer
    assert derived[0].StudyDate == source.StudyDate


@pytest.mark.parametrize(
    ("offset", "told"),
    [
        ("+0100", ("20261125", "101500.000000", "+0100")),
        ("-0530", ("20261125", "034500.000000", "-0530")),
        ("+2500", None),  # not an offset: local time, none said
        ("", None),
    ],
)
def test_a_result_tells_its_own_time_in_the_sources_time_zone(offset, told):
    """A node whose clock runs in UTC (a container) stamped a result made at 10:15 in a
    +0100 hospital as 09:15; a source that says its offset has the result's times told
    in it. Without one (or with a wrong one) they are the node's local time."""
    from service.writers.clock import result_time

    now = datetime.datetime(2026, 11, 25, 9, 15, tzinfo=datetime.UTC)
    source = pydicom.Dataset()
    if offset:
        source.TimezoneOffsetFromUTC = offset
    stamp = result_time(source, now)
    local = now.astimezone()
    expected = told or (local.strftime("%Y%m%d"), local.strftime("%H%M%S.%f"), None)
    assert (stamp.date, stamp.time, stamp.offset) == expected


def test_every_result_object_says_the_sources_time_zone(ct, written, tmp_path):
    """SR, SEG, SC and derived images: the offset the source said, and their own dates
    and times (Instance Creation, Content, Series) told in it."""
    volume, headers = ct
    zoned = [copy.deepcopy(h) for h in headers]
    for h in zoned:
        h.TimezoneOffsetFromUTC = "-1000"
    there = datetime.datetime.now(datetime.timezone(datetime.timedelta(hours=-10)))
    paths = [
        *write_dicom_results(_segmentation(volume), volume, zoned, tmp_path / "seg"),
        *write_dicom_results(_reconstruction(volume), volume, zoned, tmp_path / "rec"),
    ]
    objects = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    assert {ds.Modality for ds in objects} >= {"SR", "SEG", "OT", "CT"}
    for ds in objects:
        assert ds.TimezoneOffsetFromUTC == "-1000", ds.Modality
        for kind in ("InstanceCreation", "Content", "Series"):
            made = datetime.datetime.strptime(
                ds.get(f"{kind}Date") + ds.get(f"{kind}Time")[:6], "%Y%m%d%H%M%S"
            ).replace(tzinfo=there.tzinfo)
            assert abs((made - there).total_seconds()) < 120, (ds.Modality, kind)
    # a source that says no offset: the results say none
    unzoned = [pydicom.dcmread(p, stop_before_pixels=True) for ps in written.values() for p in ps]
    assert not any("TimezoneOffsetFromUTC" in ds for ds in unzoned)


def test_an_oblique_series_gets_every_result_with_its_full_orientation(tmp_path):
    """A plane turned 1 degree about z (common for MR, tilted CT): Patient Orientation
    needs two letters per direction, which highdicom's SC refused, and the job lost
    every DICOM result (found by review). The SC carries the full letters; everything
    passes dciodvfy."""
    cos, sin = np.cos(np.radians(1.0)), np.sin(np.radians(1.0))
    paths = write_ct_series(
        tmp_path / "ct", slices=12, rows=32, columns=32, pixel_spacing=(5.0, 5.0),
        slice_thickness=5.0,
    )  # fmt: skip
    for path in paths:
        ds = pydicom.dcmread(path)
        row, column = [cos, sin, 0.0], [-sin, cos, 0.0]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in row + column]
        ds.save_as(path, enforce_file_format=True)
    volume = load_series(paths)
    by_uid = {h.SOPInstanceUID: h for h in read_headers(paths)}
    headers = [by_uid[s.sop_instance_uid] for s in volume.sources]
    written = write_dicom_results(_segmentation(volume), volume, headers, tmp_path / "out")
    modalities = sorted({pydicom.dcmread(p, stop_before_pixels=True).Modality for p in written})
    assert modalities == ["OT", "SEG", "SR"]
    scs = [p for p in written if pydicom.dcmread(p, stop_before_pixels=True).Modality == "OT"]
    assert list(pydicom.dcmread(scs[0]).PatientOrientation) == ["LP", "PR"]
    assert {p.name: e for p in written if (e := _dciodvfy_errors(p))} == {}


def test_results_that_cannot_be_made_fail_the_job_instead_of_going_out_half(ct, tmp_path):
    """A writer error (here a label map one slice short of its series) was logged and
    the job went on as done: the HL7 result went to the RIS, the PACS got nothing and
    no alert fired (found by review). It is now the job's failure, with the reason."""
    volume, _ = ct
    result = _segmentation(volume)
    result = dataclasses.replace(result, label_map=result.label_map[1:])
    with (
        structlog.testing.capture_logs() as events,
        pytest.raises(ResultsNotWritten, match="could not be made"),
    ):
        write_dicom(result, volume, [], tmp_path)  # the volume holds its source headers
    (logged,) = [e for e in events if e["event"] == "dicom.not_written"]
    assert "nothing of the job was sent" in logged["action"]
    assert not list(tmp_path.glob("*.dcm"))


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(1).integers(0, 4096, size=(300, 200), dtype=np.uint16),
        np.random.default_rng(2).integers(-1024, 3000, size=(257, 31), dtype=np.int16),
        np.full((40, 40), 7, dtype=np.int32),
        np.random.default_rng(3).normal(size=(64, 64)).astype(np.float32),
        np.array([[0, 1 << 24]], dtype=np.int64),  # too wide a range to count
    ],
)
def test_window_percentiles_equal_numpys(values: np.ndarray) -> None:
    qs = (0.0, 1.0, 37.5, 99.0, 100.0)
    assert sc.percentiles(values, qs) == pytest.approx(tuple(np.percentile(values, qs)))


def test_a_radiograph_scaled_while_grey_is_the_picture_scaled_in_colour() -> None:
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 4096, size=(2000, 1500), dtype=np.uint16)
    grey, scale = sc._scaled_grey(sc._grey(pixels, "DX"))
    rgb, rgb_scale = sc._scaled(sc._grey_rgb(pixels, "DX"))
    assert scale == rgb_scale and grey.size == rgb.size == (768, 1024)
    np.testing.assert_array_equal(np.asarray(grey.convert("RGB")), np.asarray(rgb))


def test_nifti_copies_hold_the_results_in_the_volume_grid(ct, tmp_path):
    """label_map.nii.gz (compresses well) and image.nii (a reconstructed image hardly
    compresses: gzip cost seconds), each voxel where the volume has it."""
    import nibabel

    volume, _ = ct
    seg = write_result_files(_segmentation(volume), volume, tmp_path / "seg")
    rec = write_result_files(_reconstruction(volume), volume, tmp_path / "rec")
    assert sorted(p.name for p in seg) == ["label_map.nii.gz", "result.json"]
    assert sorted(p.name for p in rec) == ["image.nii", "result.json"]
    labels = nibabel.load(tmp_path / "seg" / "label_map.nii.gz")
    image = nibabel.load(tmp_path / "rec" / "image.nii")
    np.testing.assert_array_equal(np.asarray(labels.dataobj).transpose(2, 1, 0), _sphere(volume))
    np.testing.assert_allclose(
        np.asarray(image.dataobj).transpose(2, 1, 0), volume.array.astype(np.float32) * 0.5
    )
    np.testing.assert_allclose(image.affine, volume.affine_ras())


@pytest.mark.parametrize("make", [_segmentation, _reconstruction])
def test_a_source_without_type2_patient_attributes_still_gets_results(ct, tmp_path, make):
    """A sender left out Patient ID (Type 2, so non-conformant): every result of the
    job failed in highdicom with "no attribute 'PatientID'" (acceptance run). The
    results now carry the attributes empty, as the source does in effect."""
    volume, headers = ct
    stripped = [copy.deepcopy(h) for h in headers]
    for header in stripped:
        for keyword in ("PatientID", "PatientName", "StudyID", "AccessionNumber",
                        "ReferringPhysicianName", "PatientBirthDate"):  # fmt: skip
            if keyword in header:
                delattr(header, keyword)
    paths = write_dicom_results(make(volume), volume, stripped, tmp_path)
    for path in paths[:3]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.PatientID == "" and ds.StudyInstanceUID == headers[0].StudyInstanceUID


def test_a_revision_made_from_the_same_images_is_the_same_result(ct, tmp_path, monkeypatch):
    """Only a localizer joined the series after its result: the next job's sources are
    the same images, so its result is the earlier one again: not marked revised, not
    naming itself as its own predecessor (review), the same SR UID."""
    monkeypatch.setenv("RADNODE_ROUTES", "[]")
    monkeypatch.setenv(
        "RADNODE_DESTINATIONS", '[{"name": "ris", "type": "hl7", "host": "ris", "port": 2575}]'
    )
    volume, headers = ct
    publisher = ResultPublisher(load_settings())
    paths = tuple(str(h.filename) for h in headers)

    def ticket(job: str, replaces: str | None) -> JobTicket:
        return JobTicket(job, "key", "p", paths, str(tmp_path / job), ("ris",), 1, replaces)

    once = publisher.prepare(ticket("first", None), _segmentation(volume), volume)
    again = publisher.prepare(
        ticket("second", str(tmp_path / "first")), _segmentation(volume), volume
    )
    first, second = (_names((tmp_path / j / "dicom").glob("*.dcm")) for j in ("first", "second"))
    assert set(first) == set(second)
    assert not any("revised" in h.SeriesDescription for h in second.values())
    assert not any("PredecessorDocumentsSequence" in h for h in second.values())
    # the RIS got this result already: the same MSH-10, which the outbox keeps once
    ((kind, message_id),) = {(d.kind, d.message_id) for d in once.deliverables}
    assert kind == "hl7" and [d.message_id for d in again.deliverables] == [message_id]
    # ... however many times it repeats (a second localizer: review)
    third = publisher.prepare(
        ticket("third", str(tmp_path / "second")), _segmentation(volume), volume
    )
    assert [d.message_id for d in third.deliverables] == [message_id]


def test_a_first_result_supersedes_the_not_analyzed_report_of_the_refused_job(
    ct, tmp_path, monkeypatch
):
    """A slice was missing: the series was refused and a "not analyzed" SR went to the
    PACS; the re-sent slice made a result, and both reports stood side by side, neither
    naming the other (acceptance pass). The result's SR now names it as predecessor,
    and the result is no revision (nothing was reported to the RIS before)."""
    monkeypatch.setenv("RADNODE_ROUTES", "[]")
    volume, headers = ct
    refused = write_not_analyzed_report(
        _segmentation(volume).bundle, headers, "a slice is missing",
        tmp_path / "refused" / NOT_ANALYZED_FOLDER,
    )  # fmt: skip
    paths = tuple(str(h.filename) for h in headers)
    ticket = JobTicket("later", "key", "p", paths, str(tmp_path / "later"), (), 1, None,
                       (str(tmp_path / "refused"),))  # fmt: skip
    ResultPublisher(load_settings()).prepare(ticket, _segmentation(volume), volume)
    (sr,) = [h for h in _names((tmp_path / "later" / "dicom").glob("*.dcm")).values()
             if h.Modality == "SR"]  # fmt: skip
    (study,) = sr.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == refused.sop_instance_uid
    assert "revised" not in sr.SeriesDescription
    # the two reports do not share a Series Number, and the one that made no result
    # does not say "AI result" (acceptance pass)
    not_analyzed = pydicom.dcmread(refused.path)
    assert not_analyzed.SeriesNumber == sr.SeriesNumber + 8
    comments = [str(e.value) for e in not_analyzed.iterall() if e.keyword == "TextValue"]
    assert any("made no result" in c for c in comments)
    assert not any("AI result" in c for c in comments)


def test_text_not_in_its_declared_character_set_is_named_in_a_warning(ct, tmp_path, monkeypatch):
    """Latin-1 bytes under ISO_IR 192 reached the PACS and the RIS as "M\ufffdller", and
    nothing said why (acceptance pass). One line names the attribute, not the value."""
    monkeypatch.setenv("RADNODE_ROUTES", "[]")
    volume, headers = ct
    odd = [copy.deepcopy(h) for h in headers]
    for header in odd:
        header.PatientName = "M\ufffdller^J\ufffdrgen"
    garbled = dataclasses.replace(volume, source_headers=tuple(odd))
    ticket = JobTicket("j", "key", "p", tuple(str(h.filename) for h in headers),
                       str(tmp_path / "j"), (), 1)  # fmt: skip
    with structlog.testing.capture_logs() as events:
        ResultPublisher(load_settings()).prepare(ticket, _segmentation(volume), garbled)
    (line,) = [e for e in events if e["event"] == "dicom.text_undecodable"]
    assert line["attributes"] == ["PatientName"] and "ller" not in str(line)


def test_images_without_a_frame_of_reference_get_their_report_without_a_seg(ct, tmp_path):
    """Anonymisers and old scanners drop the Frame of Reference UID. The job failed
    after inference with highdicom's error and "report this with the job id"
    (acceptance pass); the SR and overlays need no frame of reference."""
    volume, headers = ct
    stripped = [copy.deepcopy(h) for h in headers]
    for header in stripped:
        del header.FrameOfReferenceUID
    with structlog.testing.capture_logs() as events:
        written = _names(write_dicom_results(_segmentation(volume), volume, stripped, tmp_path))
    assert sorted({h.Modality for h in written.values()}) == ["OT", "SR"]
    (skipped,) = [e for e in events if e["event"] == "results.seg_not_written"]
    assert "Frame of Reference" in skipped["reason"]


def test_a_study_without_accession_number_warns_that_the_ris_may_not_match_it(
    ct, tmp_path, monkeypatch
):
    """Its ORU goes with empty order numbers, which a RIS files nowhere: said, not
    silent (acceptance pass)."""
    monkeypatch.setenv("RADNODE_ROUTES", "[]")
    monkeypatch.setenv(
        "RADNODE_DESTINATIONS", '[{"name": "ris", "type": "hl7", "host": "h", "port": 1}]'
    )
    volume, headers = ct
    publisher = ResultPublisher(load_settings())
    paths = tuple(str(h.filename) for h in headers)
    for accession in ("ACC-1", ""):  # the fixture's headers have none: left so
        for header in volume.source_headers or headers:
            header.AccessionNumber = accession
        out = str(tmp_path / f"j{accession}")
        ticket = JobTicket(f"j{accession}", "key", "p", paths, out, ("ris",), 1)
        with structlog.testing.capture_logs() as events:
            publication = publisher.prepare(ticket, _segmentation(volume), volume)
        assert [d.kind for d in publication.deliverables] == ["hl7"]
        warned = [e for e in events if e["event"] == "hl7.no_order_number"]
        assert len(warned) == (0 if accession else 1)


def test_an_overlay_names_its_image_as_the_viewer_numbers_it(ct, tmp_path, monkeypatch):
    """'slice 78/100' was radnode's sort index: on a top-down numbered or feet-first
    series a reader went 55 slices away (acceptance pass). The banner names the
    source's series and Instance Number, which the SC also references."""
    volume, headers = ct
    captions: list[str] = []
    monkeypatch.setattr(sc, "_banner", lambda image, prov, legend, detail: captions.append(detail))
    written = _names(write_dicom_results(_segmentation(volume), volume, headers, tmp_path))
    overlays = [h for h in written.values() if h.Modality in ("OT", "SC")]
    by_uid = {h.SOPInstanceUID: h for h in headers}
    shown = {
        f"series {by_uid[o.SourceImageSequence[0].ReferencedSOPInstanceUID].SeriesNumber}, "
        f"image {by_uid[o.SourceImageSequence[0].ReferencedSOPInstanceUID].InstanceNumber}"
        for o in overlays
    }
    assert overlays and set(captions) == shown


def test_every_report_group_and_derived_series_says_it_is_not_for_diagnosis(ct, tmp_path):
    """SR viewers show the content tree and a series list shows the description; the
    warning was only in Contributing Equipment and Image Comments, which neither shows
    (acceptance pass: the denoised CT read as a diagnostic CT)."""
    volume, headers = ct
    written = _names(write_dicom_results(_segmentation(volume), volume, headers, tmp_path))
    (sr,) = [h for h in written.values() if h.Modality == "SR"]
    groups = [
        item
        for container in sr.ContentSequence
        if "ContentSequence" in container
        for item in container.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Measurement Group"
    ]
    comments = [[c.TextValue for c in g.ContentSequence if c.ValueType == "TEXT"] for g in groups]
    assert groups and all(
        any("not for diagnostic use" in text for text in texts) for texts in comments
    )
    image = volume.array.astype(np.float32)
    result = PipelineResult(
        bundle=BundleIdentity("denoise", "1.0", TaskKind.RECONSTRUCTION),
        labels=(),
        device="cpu",
        timings=StageTimings(),
        image=image,
    )
    derived = _names(write_dicom_results(result, volume, headers, tmp_path / "recon"))
    series = {h.SeriesDescription for h in derived.values() if h.Modality != "SR"}
    assert series == {"AI derived, not for diagnosis: denoise 1.0"}
    # named once, not "denoise 1.0 (AI): denoise 1.0 - ..." (acceptance pass)
    assert {h.DerivationDescription for h in derived.values() if h.Modality != "SR"} == {
        "AI image processing: denoise 1.0 — AI result, not for diagnostic use on its own"
    }
    # the report lists the images it is about in its evidence, not only in a comment
    (report,) = [h for h in derived.values() if h.Modality == "SR"]
    images = {h.SOPInstanceUID for h in derived.values() if h.Modality != "SR"}
    listed = {
        sop.ReferencedSOPInstanceUID
        for study in report.CurrentRequestedProcedureEvidenceSequence
        for series_item in study.ReferencedSeriesSequence
        for sop in series_item.ReferencedSOPSequence
    }
    assert images <= listed and len(images) == len(headers)


def test_a_malformed_birth_date_is_left_out_of_the_results_not_a_failed_job(ct, tmp_path):
    """A 7-digit PatientBirthDate failed the job in highdicom, whose error quoted it
    into the log and /api/jobs (acceptance pass). The results carry it empty."""
    volume, headers = ct
    odd = [copy.deepcopy(h) for h in headers]
    for header in odd:
        header.PatientBirthDate = "1961029"
        header.PatientSex = "X"
    written = _names(write_dicom_results(_segmentation(volume), volume, odd, tmp_path))
    assert written and all(h.PatientBirthDate == "" for h in written.values())
    assert all(h.PatientSex == "" for h in written.values())


def test_a_name_split_by_a_backslash_keeps_its_first_value_not_a_failed_job(ct, tmp_path):
    """A backslash in PatientName makes it two values where one is allowed; highdicom
    failed every result of the job on it (acceptance pass)."""
    volume, headers = ct
    odd = [copy.deepcopy(h) for h in headers]
    for header in odd:
        header.PatientName = ["Doe|x&y~z", "Jane^Q"]
        header.ReferringPhysicianName = ["Ref^One", "Ref^Two"]
        header.PatientID = ["123", "456"]  # an ID stays as it came: the PACS's patient
        header.PatientBirthDate = ["1961029", "19610101"]  # kept only if it is a date
    written = _names(write_dicom_results(_segmentation(volume), volume, odd, tmp_path))
    assert written and {str(h.PatientName) for h in written.values()} == {"Doe|x&y~z"}
    assert {str(h.ReferringPhysicianName) for h in written.values()} == {"Ref^One"}
    assert all(list(h.PatientID) == ["123", "456"] for h in written.values())
    assert all(h.PatientBirthDate == "" for h in written.values())


@pytest.mark.parametrize(
    ("attribute", "sop_class", "exclude"),
    [
        ("PerFrameFunctionalGroupsSequence", "1.2.840.10008.5.1.4.1.1.2", None),  # CT
        ("PerFrameFunctionalGroupsSequence", "1.2.840.10008.5.1.4.1.1.2.1", None),  # Enh CT
        ("PixelData", "1.2.840.10008.5.1.4.1.1.88.34", ["IconImageSequence"]),  # Comp 3D SR
        ("PixelData", "1.2.840.10008.5.1.4.1.1.1.1", ["IconImageSequence"]),  # DX
        ("ContentDate", "1.2.840.10008.5.1.4.1.1.66.4", None),  # SEG
    ],
)
def test_the_iod_lookup_cache_answers_as_highdicom_does(attribute, sop_class, exclude) -> None:
    from highdicom import _standard_utils

    from service.writers import iod_lookup

    assert _standard_utils.is_attribute_in_iod is iod_lookup.is_attribute_in_iod
    expected = iod_lookup._uncached(attribute, sop_class, exclude)
    assert iod_lookup.is_attribute_in_iod(attribute, sop_class, exclude) is expected
    assert iod_lookup.is_attribute_in_iod(attribute, sop_class, exclude) is expected  # cached


def test_an_overlay_of_a_jpeg_compressed_radiograph_says_it_is_lossy(tmp_path) -> None:
    """PS3.3 C.7.6.1.1.5: an image made from a lossy one is lossy, and says so. The
    radiograph arrives as JPEG Baseline (DCMTK's dcmcjpeg) without saying it itself."""
    plain = write_radiograph(tmp_path / "xr.dcm", rows=256, columns=256)
    jpeg = tmp_path / "xr-jpeg.dcm"
    subprocess.run([require_tool("dcmcjpeg"), "+eb", str(plain), str(jpeg)], check=True, timeout=60)
    assert pydicom.dcmread(jpeg).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    volume, headers = load_series([jpeg]), read_headers([jpeg])
    written = [
        pydicom.dcmread(p)
        for p in write_dicom_results(_classification(0.9, size=256), volume, headers, tmp_path)
    ]
    (overlay,) = [ds for ds in written if ds.Modality == "OT"]
    assert overlay.LossyImageCompression == "01"
    assert overlay.LossyImageCompressionMethod == "ISO_10918_1"


def test_a_derived_series_keeps_its_sources_lossy_history(tmp_path) -> None:
    paths = write_ct_series(tmp_path / "ct", slices=6, rows=32, columns=32)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = [12.5]
        ds.LossyImageCompressionMethod = ["ISO_10918_1"]
        ds.save_as(path, enforce_file_format=True)
    volume = load_series(paths)
    by_uid = {h.SOPInstanceUID: h for h in read_headers(paths)}
    headers = [by_uid[s.sop_instance_uid] for s in volume.sources]
    written = write_dicom_results(_reconstruction(volume), volume, headers, tmp_path / "out")
    derived = [ds for ds in map(pydicom.dcmread, written) if ds.Modality == "CT"]
    assert len(derived) == 6
    for ds in derived:
        assert ds.LossyImageCompression == "01"
        assert float(ds.LossyImageCompressionRatio) == 12.5
        assert ds.LossyImageCompressionMethod == "ISO_10918_1"
    # and a source that was never compressed lossily gives no such history
    clean = write_ct_series(tmp_path / "clean", slices=6, rows=32, columns=32)
    volume = load_series(clean)
    by_uid = {h.SOPInstanceUID: h for h in read_headers(clean)}
    headers = [by_uid[s.sop_instance_uid] for s in volume.sources]
    for path in write_dicom_results(_reconstruction(volume), volume, headers, tmp_path / "o2"):
        assert "LossyImageCompression" not in pydicom.dcmread(path, stop_before_pixels=True)


def test_the_overlay_draws_label_names_in_letters_its_font_has() -> None:
    """Acceptance pass: Pillow's built-in font drew "Épanchement pleural (größer)" with
    boxes for É, ö and ß; the overlay draws the base letters (the SR keeps the text)."""
    assert sc.drawable("Épanchement pleural (größer)") == "Epanchement pleural (grosser)"
    assert sc.drawable("Łódź 胸部") == "Lodz ??"
    assert sc.drawable("liver 95.0 %") == "liver 95.0 %"
