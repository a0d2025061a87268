"""A series of radiographs (PA and lateral in one series) gives its 2D pipeline the
frontal image; the index routes such a series as frontal whatever came first."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from service.config import Settings
from service.index import StudyIndex
from service.pipeline.projection import frontal_projection
from service.pipeline.volume import SeriesRefused
from service.publish import ResultPublisher
from service.records import InstanceHeader, JobState, JobTicket, StoredInstance
from service.testing import write_ct_series, write_radiograph
from service.worker import JobRunner, PipelineCache
from tests.support.bundles import write_classifier_bundle


def radiographs(folder: Path, views: list[str]) -> list[str]:
    """One series of radiographs, one per view, instance numbers 1, 2, ..."""
    paths = []
    for number, view in enumerate(views, start=1):
        path = write_radiograph(
            folder / f"{number}.dcm", rows=256, columns=256, study_uid="1.2.826.0.1.9",
            series_uid="1.2.826.0.1.9.1", seed=number,
        )  # fmt: skip
        ds = pydicom.dcmread(path)
        ds.ViewPosition, ds.InstanceNumber = view, number
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.9.1.{number}"
        ds.save_as(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize(
    ("views", "chosen"),
    [(["LL", "PA"], 1), (["AP", "LATERAL"], 0), (["AP", "LL", "PA"], 2), (["PA", "PA"], 1)],
)
def test_the_frontal_view_is_chosen_pa_before_ap_and_the_last_taken(
    tmp_path: Path, views: list[str], chosen: int
) -> None:
    paths = radiographs(tmp_path, views)
    assert frontal_projection(paths) == [paths[chosen]]


def test_a_series_of_laterals_is_refused_with_what_it_holds(tmp_path: Path) -> None:
    with pytest.raises(SeriesRefused, match=r"none is a frontal view.*LL, RL"):
        frontal_projection(radiographs(tmp_path, ["LL", "RL"]))


def test_anything_but_several_radiographs_is_left_to_the_volume_loader(tmp_path: Path) -> None:
    ct = [str(p) for p in write_ct_series(tmp_path / "ct", slices=3, rows=16, columns=16)]
    assert frontal_projection(ct) == ct
    one = radiographs(tmp_path / "one", ["LL"])
    assert frontal_projection(one) == one


def test_a_series_with_a_frontal_image_routes_as_frontal_whatever_came_first(
    tmp_path: Path,
) -> None:
    index = StudyIndex(tmp_path / "index.sqlite3")
    for number, view in enumerate(["LL", "PA", "LL"]):
        header = InstanceHeader(
            study_uid="1.2", series_uid="1.2.1", sop_instance_uid=f"1.2.1.{number}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", modality="DX", view_position=view,
        )  # fmt: skip
        index.add_instance(
            StoredInstance(header, f"/spool/{number}", 10, "1.2.840.10008.1.2.1", "X")
        )
    (series,) = index.series_of("1.2")
    assert series.view_position == "PA"
    # a localizer with a frontal View Position describes no series (review)
    for number, (view, kind) in enumerate([("LL", "AXIAL"), ("PA", "LOCALIZER")]):
        header = InstanceHeader(
            study_uid="1.3", series_uid="1.3.1", sop_instance_uid=f"1.3.1.{number}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", modality="DX", view_position=view,
            image_type=("ORIGINAL", "PRIMARY", kind),
        )  # fmt: skip
        index.add_instance(
            StoredInstance(header, f"/spool/3{number}", 10, "1.2.840.10008.1.2.1", "X")
        )
    (series,) = index.series_of("1.3")
    assert series.view_position == "LL"


def test_a_2d_pipeline_reads_the_frontal_image_of_a_pa_and_lateral_series(
    tmp_path: Path,
) -> None:
    """The series was refused ("route each instance on its own") and the PA never read
    (acceptance pass)."""
    paths = radiographs(tmp_path / "spool", ["LL", "PA"])
    write_classifier_bundle(tmp_path / "models")
    settings = Settings.model_validate({"node": {"data_dir": str(tmp_path / "data")}})
    runner = JobRunner(settings, PipelineCache(tmp_path / "models"), ResultPublisher(settings))
    ticket = JobTicket("j1", "key", "cxr_test_classifier", tuple(paths), str(tmp_path / "r"),
                       (), 1)  # fmt: skip
    report = runner.run(ticket)
    assert report.state is JobState.DONE, report.error
    pa = pydicom.dcmread(paths[1], stop_before_pixels=True).SOPInstanceUID
    reports = [pydicom.dcmread(p) for p in (tmp_path / "r" / "dicom").glob("SR*.dcm")]
    (sr,) = reports
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert pa in evidence
    lateral = pydicom.dcmread(paths[0], stop_before_pixels=True).SOPInstanceUID
    assert lateral not in evidence
