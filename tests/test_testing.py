"""The synthetic data generator: valid IODs, consistent geometry, plausible values.

Every other test and benchmark trusts ``service.testing`` to look like a real
modality, so its geometry, Hounsfield units, encodings and IOD validity are pinned here
(dciodvfy from dicom3tools is the validator).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from service.testing import (
    main,
    make_ct_series,
    make_radiograph,
    write_ct_series,
    write_radiograph,
)
from tests.conftest import require_tool

SMALL_CT = {"slices": 8, "rows": 64, "columns": 64}


def hu(ds: Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def normal_of(ds: Dataset) -> np.ndarray:
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    return np.cross(iop[:3], iop[3:])


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60
    )
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


# --- CT geometry -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "iop"),
    [
        ("axial", [1, 0, 0, 0, 1, 0]),
        ("coronal", [1, 0, 0, 0, 0, -1]),
        ("sagittal", [0, 1, 0, 0, 0, -1]),
    ],
)
def test_positions_step_by_the_spacing_along_the_normal(orientation: str, iop: list[int]) -> None:
    series = make_ct_series(
        **SMALL_CT,
        pixel_spacing=(0.8, 0.6),
        slice_thickness=2.0,
        spacing_between_slices=1.5,
        orientation=orientation,  # type: ignore[arg-type]
    )
    first = series[0]
    normal = normal_of(first)
    positions = np.array([ds.ImagePositionPatient for ds in series], dtype=float)

    np.testing.assert_allclose(np.diff(positions, axis=0), np.tile(1.5 * normal, (7, 1)))
    for k, ds in enumerate(series):
        assert [float(v) for v in ds.ImageOrientationPatient] == iop
        assert [float(v) for v in ds.PixelSpacing] == [0.8, 0.6]
        assert float(ds.SliceThickness) == 2.0
        assert float(ds.SpacingBetweenSlices) == 1.5
        assert float(ds.SliceLocation) == pytest.approx(positions[k] @ normal)
        assert ds.InstanceNumber == k + 1
        assert (ds.Rows, ds.Columns) == (64, 64)
    assert len({ds.FrameOfReferenceUID for ds in series}) == 1
    assert len({ds.SeriesInstanceUID for ds in series}) == 1
    assert len({ds.StudyInstanceUID for ds in series}) == 1
    assert len({ds.SOPInstanceUID for ds in series}) == len(series)


def test_spacing_defaults_to_slice_thickness_and_uids_given_are_used() -> None:
    study, series_uid = generate_uid(), generate_uid()
    series = make_ct_series(
        slices=3, rows=16, columns=16, slice_thickness=3.0, study_uid=study, series_uid=series_uid
    )
    z = [float(ds.ImagePositionPatient[2]) for ds in series]
    assert np.diff(z).tolist() == [3.0, 3.0]
    assert {ds.StudyInstanceUID for ds in series} == {study}
    assert {ds.SeriesInstanceUID for ds in series} == {series_uid}


def test_ct_pixel_module_and_identity() -> None:
    ds = make_ct_series(slices=1, rows=32, columns=48)[0]
    assert ds.SOPClassUID == CTImageStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert (ds.Rows, ds.Columns) == (32, 48)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 1)
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert (float(ds.RescaleIntercept), float(ds.RescaleSlope)) == (-1024.0, 1.0)
    assert ds.pixel_array.dtype == np.int16
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.Modality == "CT"
    assert ds.BodyPartExamined == "ABDOMEN"
    assert ds.PatientName == "PHANTOM^CT"


# --- CT content ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom() -> list[Dataset]:
    # 358 mm across, like the default series, at a quarter of the resolution.
    return make_ct_series(slices=20, rows=128, columns=128, pixel_spacing=(2.8, 2.8), seed=3)


def hu_near(series: list[Dataset], x: float, y: float, z: float, half: int = 2) -> float:
    """Mean HU in a small patch around a point given as fractions (-1..1) of the box."""
    first = series[0]
    rows, columns, slices = first.Rows, first.Columns, len(series)
    k = round((z + 1) / 2 * slices - 0.5)
    i = round((y + 1) / 2 * rows - 0.5)
    j = round((x + 1) / 2 * columns - 0.5)
    return float(hu(series[k])[i - half : i + half + 1, j - half : j + half + 1].mean())


@pytest.mark.parametrize(
    ("where", "point", "low", "high"),
    [
        ("air", (-0.95, -0.95, 0.0), -1020, -980),
        ("subcutaneous fat", (0.0, -0.555, 0.0), -130, -70),
        ("soft tissue", (0.30, -0.25, -0.5), 25, 55),
        ("liver", (-0.36, -0.04, 0.30), 50, 70),
        ("spleen", (0.50, 0.16, 0.38), 40, 60),
        ("right kidney", (-0.34, 0.27, -0.12), 20, 45),
        ("vertebral body", (0.0, 0.33, 0.1), 600, 800),
    ],
)
def test_hounsfield_units_are_plausible(
    phantom: list[Dataset], where: str, point: tuple[float, float, float], low: float, high: float
) -> None:
    assert low <= hu_near(phantom, *point, half=1) <= high, where


def test_liver_is_on_the_patient_right_and_changes_through_the_slices(
    phantom: list[Dataset],
) -> None:
    # Patient right is image left (row direction +x points to the patient's left).
    assert hu_near(phantom, -0.36, -0.04, 0.3) - hu_near(phantom, 0.36, -0.04, 0.3) > 12
    # The liver is an ellipsoid: its section grows and shrinks through the slices.
    slices = len(phantom)
    along_z = [hu_near(phantom, -0.36, -0.04, (2 * k + 1) / slices - 1) for k in range(slices)]
    assert along_z[0] < 50 < max(along_z)
    widths = [int((hu(ds)[61:67].mean(axis=0)[:64] > 52).sum()) for ds in phantom]
    assert len(set(widths)) > 4


def test_noise_is_small_and_seeded() -> None:
    series = make_ct_series(slices=1, rows=64, columns=64, seed=5)
    corner = hu(series[0])[:8, :8]
    assert 4 < corner.std() < 16
    assert abs(corner.mean() + 1000) < 5


# --- files, encodings, determinism -----------------------------------------------------


@pytest.mark.parametrize(
    "transfer_syntax",
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless],
)
def test_written_files_round_trip(tmp_path: Path, transfer_syntax: str) -> None:
    uids = {"study_uid": generate_uid(), "series_uid": generate_uid()}
    series = make_ct_series(slices=4, rows=64, columns=64, seed=2, **uids)
    paths = write_ct_series(
        tmp_path, slices=4, rows=64, columns=64, seed=2, transfer_syntax=transfer_syntax, **uids
    )
    assert [p.name for p in paths] == [f"CT00000{k}.dcm" for k in range(1, 5)]
    for path, expected in zip(paths, series, strict=True):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == transfer_syntax
        assert ds.SOPInstanceUID == expected.SOPInstanceUID
        assert ds.ImagePositionPatient == expected.ImagePositionPatient
        np.testing.assert_array_equal(ds.pixel_array, expected.pixel_array)


def test_same_seed_and_uids_give_identical_bytes(tmp_path: Path) -> None:
    uids = {"study_uid": generate_uid(), "series_uid": generate_uid()}
    a = write_ct_series(tmp_path / "a", **SMALL_CT, seed=9, **uids)
    b = write_ct_series(tmp_path / "b", **SMALL_CT, seed=9, **uids)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    other = make_ct_series(**SMALL_CT, seed=10, **uids)
    assert not np.array_equal(other[0].pixel_array, pydicom.dcmread(a[0]).pixel_array)


def test_uids_are_fresh_when_not_given() -> None:
    a = make_ct_series(slices=1, rows=16, columns=16)[0]
    b = make_ct_series(slices=1, rows=16, columns=16)[0]
    assert a.StudyInstanceUID != b.StudyInstanceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID
    np.testing.assert_array_equal(a.pixel_array, b.pixel_array)


# --- radiographs -----------------------------------------------------------------------


def test_monochrome1_is_the_inverse_of_monochrome2() -> None:
    mono2 = make_radiograph(rows=128, columns=96, seed=4)
    mono1 = make_radiograph(rows=128, columns=96, seed=4, photometric="MONOCHROME1")
    assert mono1.PhotometricInterpretation == "MONOCHROME1"
    assert mono1.PresentationLUTShape == "INVERSE"
    assert mono2.PresentationLUTShape == "IDENTITY"
    expected = 4095 - mono2.pixel_array.astype(np.int32)
    np.testing.assert_array_equal(mono1.pixel_array.astype(np.int32), expected)


@pytest.mark.parametrize("bits_stored", [10, 12, 16])
def test_radiograph_values_fit_bits_stored(bits_stored: int) -> None:
    ds = make_radiograph(rows=96, columns=96, bits_stored=bits_stored, with_nodule=True)
    pixels = ds.pixel_array
    assert pixels.dtype == np.uint16
    assert (ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (bits_stored, bits_stored - 1, 0)
    assert int(pixels.max()) < 2**bits_stored
    assert int(pixels.max()) > 2 ** (bits_stored - 1)  # the range is used, not just fitted


def test_chest_anatomy_and_nodule() -> None:
    plain = make_radiograph(rows=200, columns=200, seed=1).pixel_array.astype(np.int32)
    nodule = make_radiograph(rows=200, columns=200, seed=1, with_nodule=True).pixel_array
    lung, spine, outside = plain[90:100, 55:65], plain[90:100, 97:103], plain[:10, :10]
    assert outside.mean() < lung.mean() < spine.mean()
    changed = np.abs(nodule.astype(np.int32) - plain) > 0
    assert 0 < changed.mean() < 0.2  # a local blob; the noise is the same


def test_dx_and_cr_attributes() -> None:
    dx = make_radiograph(rows=64, columns=64)
    assert dx.SOPClassUID == DigitalXRayImageStorageForPresentation
    assert dx.Modality == "DX"
    assert dx.PresentationIntentType == "FOR PRESENTATION"
    assert (dx.ViewPosition, dx.BodyPartExamined) == ("PA", "CHEST")
    assert float(dx.ImagerPixelSpacing[0]) == 0.2
    assert float(dx.PixelSpacing[0]) < 0.2  # at the patient, after magnification
    cr = make_radiograph(rows=64, columns=64, modality="CR")
    assert cr.SOPClassUID == ComputedRadiographyImageStorage
    assert cr.Modality == "CR"
    assert "PresentationIntentType" not in cr


# --- validity --------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", ["axial", "coronal"])
def test_ct_slice_validates(tmp_path: Path, orientation: str) -> None:
    paths = write_ct_series(tmp_path, slices=2, rows=64, columns=64, orientation=orientation)
    assert dciodvfy_errors(paths[1]) == []


@pytest.mark.parametrize(
    ("modality", "photometric"),
    [("DX", "MONOCHROME2"), ("DX", "MONOCHROME1"), ("CR", "MONOCHROME1")],
)
def test_radiograph_validates(tmp_path: Path, modality: str, photometric: str) -> None:
    path = write_radiograph(
        tmp_path / "xr.dcm",
        rows=64,
        columns=64,
        modality=modality,
        photometric=photometric,
        with_nodule=True,
    )
    assert dciodvfy_errors(path) == []


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["ct", str(tmp_path / "ct"), "--slices", "3", "--rows", "32", "--columns", "32"]) == 0
    )
    assert sorted(p.name for p in (tmp_path / "ct").iterdir()) == [
        "CT000001.dcm",
        "CT000002.dcm",
        "CT000003.dcm",
    ]
    out_file = tmp_path / "cxr.dcm"
    args = ["radiograph", str(out_file), "--rows", "64", "--columns", "64"]
    assert main([*args, "--photometric", "MONOCHROME1", "--nodule"]) == 0
    assert pydicom.dcmread(out_file).PhotometricInterpretation == "MONOCHROME1"
    printed = capsys.readouterr().out
    assert "3 CT slices" in printed
    assert "PHANTOM" not in printed  # no patient data in the output
