"""Series to volume: geometry, ordering, values and every reason to refuse a series.

Series are synthetic and built here with pydicom, so each test knows the true geometry:
stored pixel value ``k * 1024 + j * 32 + i`` marks slice k (in construction order), row j
and column i, which makes any mix-up of axes or slices visible in the values.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from service.errors import RadnodeError
from service.pipeline import paging
from service.pipeline.volume import (
    SeriesRefused,
    SourceFrame,
    Tolerances,
    Volume,
    load_series,
    plan_volume,
    read_headers,
)

ROWS, COLUMNS = 32, 32
PIXEL_SPACING = (0.8, 0.7)  # DICOM order: row spacing (y), column spacing (x)
STEP = 2.5
ORIGIN = (-10.0, -20.0, 30.0)
AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
CORONAL = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))


def rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """Rodrigues' rotation matrix, for oblique test planes."""
    a = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    t = np.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


OBLIQUE_R = rotation((1.0, 2.0, 0.5), 27.0)
OBLIQUE = (tuple(OBLIQUE_R @ (1.0, 0.0, 0.0)), tuple(OBLIQUE_R @ (0.0, 1.0, 0.0)))


def marker(k: int) -> np.ndarray:
    """Stored values of construction slice k: k * 1024 + row * 32 + column."""
    j, i = np.mgrid[0:ROWS, 0:COLUMNS]
    return (k * 1024 + j * 32 + i).astype(np.uint16)


def with_file_meta(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    return ds


def image_pixel(ds: Dataset, pixels: np.ndarray, *, bits_stored: int = 14) -> None:
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()


def ct_series(
    n: int = 10,
    *,
    plane: tuple[tuple[float, ...], tuple[float, ...]] = AXIAL,
    step: float = STEP,
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
) -> list[Dataset]:
    """n CT slices; construction slice k sits at ORIGIN + k * step * normal."""
    row, column = (np.asarray(v, dtype=float) for v in plane)
    normal = np.cross(row, column)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    slices = []
    for k in range(n):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame_of_reference
        ds.Modality = "CT"
        ds.InstanceNumber = n - k  # numbered against the position: order must not use it
        ds.ImagePositionPatient = [float(v) for v in np.add(ORIGIN, k * step * normal)]
        ds.ImageOrientationPatient = [float(v) for v in (*row, *column)]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceThickness = abs(step)
        if slope is not None:
            ds.RescaleSlope = slope
        if intercept is not None:
            ds.RescaleIntercept = intercept
        image_pixel(ds, marker(k))
        slices.append(with_file_meta(ds))
    return slices


def enhanced_ct(series: list[Dataset], frame_order: list[int]) -> Dataset:
    """One Enhanced CT instance holding ``series``' slices as frames in ``frame_order``."""
    first = series[0]
    ds = Dataset()
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "Modality"):
        setattr(ds, keyword, getattr(first, keyword))
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(frame_order)
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    measures = Dataset()
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.SliceThickness
    rescale = Dataset()
    rescale.RescaleSlope = first.RescaleSlope
    rescale.RescaleIntercept = first.RescaleIntercept
    rescale.RescaleType = "HU"
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for index in frame_order:
        position = Dataset()
        position.ImagePositionPatient = series[index].ImagePositionPatient
        group = Dataset()
        group.PlanePositionSequence = Sequence([position])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    image_pixel(ds, np.stack([marker(index) for index in frame_order]))
    return with_file_meta(ds)


def radiograph(photometric: str = "MONOCHROME1", spacing: str | None = "ImagerPixelSpacing"):
    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.InstanceNumber = 1
    if spacing is not None:
        setattr(ds, spacing, [0.15, 0.1])
    pixels = (np.arange(24 * 20).reshape(24, 20) * 7 % 4096).astype(np.uint16)
    image_pixel(ds, pixels, bits_stored=12)
    ds.PhotometricInterpretation = photometric
    return with_file_meta(ds), pixels


def expected_values(k: int, intercept: float = -1024.0) -> np.ndarray:
    return marker(k).astype(np.int64) + int(intercept)


# --------------------------------------------------------------------------- geometry


def test_axial_series_geometry_and_values() -> None:
    volume = load_series(ct_series())

    assert volume.array.shape == (10, ROWS, COLUMNS)
    assert volume.origin == pytest.approx(ORIGIN)
    assert volume.spacing == pytest.approx((0.7, 0.8, STEP))  # (x, y, z)
    assert volume.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert volume.array.dtype == np.int16  # 14-bit unsigned - 1024 fits
    for k in range(10):
        np.testing.assert_array_equal(volume.array[k], expected_values(k))
    assert not volume.is_2d and not volume.is_single_slice
    assert volume.modality == "CT" and volume.photometric_interpretation == "MONOCHROME2"
    assert volume.slice_spacing_source == "positions"
    assert volume.pixel_spacing_source == "PixelSpacing"


def _signed_16_bit(series: list[Dataset], values: list[np.ndarray]) -> list[Dataset]:
    """Re-encode each slice as signed 16-bit (BitsStored 16): the plan must allow int32."""
    for ds, slice_values in zip(series, values, strict=True):
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
        ds.PixelData = slice_values.astype("<i2").tobytes()
    return series


def test_signed_16_bit_ct_with_intercept_is_held_as_int16_when_its_values_fit() -> None:
    """GE-style CT (signed 16-bit, intercept -1024) could in theory reach -33792, so the
    plan is int32; its real values fit int16, which halves the memory of the job."""
    series = ct_series()
    stored = [marker(k).astype(np.int16) - 1000 for k in range(10)]
    volume = load_series(_signed_16_bit(series, stored))
    assert volume.array.dtype == np.int16
    for k in range(10):
        np.testing.assert_array_equal(volume.array[k], stored[k].astype(np.int64) - 1024)


def test_values_beyond_int16_widen_the_volume_to_the_planned_type() -> None:
    series = ct_series()
    stored = [marker(k).astype(np.int16) - 1000 for k in range(10)]
    stored[6][3, 4] = -32000  # -32000 - 1024 does not fit int16
    volume = load_series(_signed_16_bit(series, stored))
    assert volume.array.dtype == np.int32
    for k in range(10):  # frames stored before the widening keep their values
        np.testing.assert_array_equal(volume.array[k], stored[k].astype(np.int64) - 1024)


def test_a_widened_volume_stays_file_backed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Widening to the planned type must not trade the scratch map for memory (found
    by review: astype made an anonymous copy, so MR/PET series with values beyond
    int16 lost their paging)."""
    monkeypatch.setattr(paging, "MIN_FILE_BACKED_BYTES", 0)
    series = ct_series()
    stored = [marker(k).astype(np.int16) - 1000 for k in range(10)]
    stored[6][3, 4] = -32000
    volume = load_series(_signed_16_bit(series, stored), scratch_dir=tmp_path / "job")
    assert volume.array.dtype == np.int32
    assert paging.is_file_backed(volume.array)
    for k in range(10):
        np.testing.assert_array_equal(volume.array[k], stored[k].astype(np.int64) - 1024)


def test_shuffled_input_gives_the_same_volume_ordered_by_position() -> None:
    series = ct_series()
    shuffled = series[:]
    random.Random(7).shuffle(shuffled)

    ordered, mixed = load_series(series), load_series(shuffled)

    np.testing.assert_array_equal(ordered.array, mixed.array)
    assert ordered.origin == mixed.origin and ordered.sources == mixed.sources
    assert [s.sop_instance_uid for s in mixed.sources] == [d.SOPInstanceUID for d in series]
    assert all(s.frame_number is None for s in mixed.sources)


def test_positions_decreasing_along_the_normal_are_stacked_ascending() -> None:
    series = ct_series(step=-STEP)  # construction slice 0 is the highest

    volume = load_series(series)

    assert volume.origin == pytest.approx(series[-1].ImagePositionPatient)
    np.testing.assert_array_equal(volume.array[0], expected_values(9))
    assert volume.spacing[2] == pytest.approx(STEP)


@pytest.mark.parametrize("plane", [AXIAL, CORONAL, OBLIQUE], ids=["axial", "coronal", "oblique"])
def test_affine_maps_a_voxel_to_its_patient_position(plane) -> None:
    series = ct_series(plane=plane)
    volume = load_series(series)
    i, j, k = 3, 5, 7
    row, column = (np.asarray(v) for v in plane)
    # Independent of the loader: the slice's own IPP plus i columns and j rows.
    expected = (
        np.asarray(series[k].ImagePositionPatient, dtype=float)
        + i * PIXEL_SPACING[1] * row
        + j * PIXEL_SPACING[0] * column
    )

    lps = volume.affine_lps() @ (i, j, k, 1)
    ras = volume.affine_ras() @ (i, j, k, 1)

    np.testing.assert_allclose(lps[:3], expected, atol=1e-4)
    np.testing.assert_allclose(ras[:3], expected * (-1, -1, 1), atol=1e-4)
    assert volume.array[k, j, i] == marker(k)[j, i] - 1024
    xyz = volume.to_channel_first_xyz()
    assert xyz.shape == (1, COLUMNS, ROWS, 10)
    assert xyz[0, i, j, k] == volume.array[k, j, i]
    direction = np.asarray(volume.direction).reshape(3, 3)
    np.testing.assert_allclose(direction[:, 2], np.cross(row, column), atol=1e-6)


def test_coronal_slices_stack_along_the_posterior_axis() -> None:
    volume = load_series(ct_series(plane=CORONAL))

    assert volume.direction == pytest.approx((1, 0, 0, 0, 0, 1, 0, -1, 0))


def test_orientation_noise_within_tolerance_is_accepted() -> None:
    series = ct_series()
    series[4].ImageOrientationPatient = [1.0, 0.00005, 0.0, 0.0, 1.0, 0.0]

    assert load_series(series).array.shape[0] == 10


# --------------------------------------------------------------------------- values


def test_rescale_with_fractional_values_gives_float32() -> None:
    volume = load_series(ct_series(slope=2.5, intercept=-1000.5))

    assert volume.array.dtype == np.float32
    np.testing.assert_allclose(volume.array[3], marker(3) * 2.5 - 1000.5)


def test_missing_rescale_keeps_stored_values() -> None:
    volume = load_series(ct_series(slope=None, intercept=None))

    assert volume.array.dtype.kind in "iu"
    np.testing.assert_array_equal(volume.array[2], marker(2))


def test_rescale_that_varies_per_slice_is_applied_per_slice() -> None:
    series = ct_series(slope=None, intercept=None)
    for k, ds in enumerate(series):  # as PET writes it: one slope per slice
        ds.RescaleSlope = 1 + 0.25 * k
        ds.RescaleIntercept = 0

    volume = load_series(series)

    assert volume.array.dtype == np.float32
    for k in range(10):
        np.testing.assert_allclose(volume.array[k], marker(k) * (1 + 0.25 * k))


def test_bits_above_bits_stored_are_not_pixel_values() -> None:
    series = ct_series(slope=None, intercept=None)
    dirty = marker(4) | 0x8000  # bit 15 set in a 14-bit image (e.g. an old overlay plane)
    series[4].PixelData = dirty.astype("<u2").tobytes()

    volume = load_series(series)

    np.testing.assert_array_equal(volume.array[4], marker(4))


@pytest.mark.parametrize(
    ("allocated", "stored", "signed"),
    [(16, 16, 0), (16, 12, 0), (16, 12, 1), (16, 16, 1), (8, 8, 0), (8, 6, 1)],
)
def test_native_pixel_data_is_read_as_pydicom_decodes_it(
    allocated: int, stored: int, signed: int
) -> None:
    """The direct read of uncompressed single frames gives pydicom's array, random high
    bits included (cleared, or sign-extended for signed data)."""
    from pydicom.pixels import pixel_array

    from service.pipeline.volume import _native_frame

    ds = ct_series(1)[0]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, stored - 1
    ds.PixelRepresentation = signed
    raw = np.random.default_rng(allocated + stored + signed).integers(
        0, 2**allocated, ROWS * COLUMNS, dtype=np.uint64
    )
    ds.PixelData = raw.astype(f"<u{allocated // 8}").tobytes()
    direct = _native_frame(ds, [0])
    assert direct is not None
    expected = pixel_array(ds, correct_unused_bits=True)
    assert direct.dtype == expected.dtype
    np.testing.assert_array_equal(direct, expected)
    assert _native_frame(ds, [1]) is None  # other frames: pydicom's decoders


def test_radiograph_monochrome1_is_inverted_2d_image() -> None:
    ds, pixels = radiograph("MONOCHROME1")

    volume = load_series([ds])

    assert volume.is_2d and not volume.is_single_slice
    assert volume.array.shape == (1, 24, 20)
    np.testing.assert_array_equal(volume.array[0], 4095 - pixels.astype(np.int64))
    assert volume.inverted_monochrome1
    assert volume.photometric_interpretation == "MONOCHROME2"
    assert volume.origin == (0.0, 0.0, 0.0)
    assert volume.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert volume.spacing == pytest.approx((0.1, 0.15, 1.0))
    assert volume.pixel_spacing_source == "ImagerPixelSpacing"
    assert volume.frame_of_reference_uid is None


def test_radiograph_without_spacing_defaults_to_one_mm_and_says_so() -> None:
    ds, pixels = radiograph("MONOCHROME2", spacing=None)

    volume = load_series([ds])

    np.testing.assert_array_equal(volume.array[0], pixels)
    assert not volume.inverted_monochrome1
    assert volume.spacing == (1.0, 1.0, 1.0)
    assert volume.pixel_spacing_source == "default"


def test_single_ct_slice_is_a_volume_of_depth_one() -> None:
    volume = load_series(ct_series(1))

    assert volume.is_single_slice and not volume.is_2d
    assert volume.array.shape == (1, ROWS, COLUMNS)
    assert volume.spacing == pytest.approx((0.7, 0.8, STEP))
    assert volume.slice_spacing_source == "SliceThickness"


# --------------------------------------------------------------------------- inputs


def test_a_deflated_series_keeps_no_inflated_copy_of_its_files(tmp_path: Path) -> None:
    """pydicom inflates a deflated file into memory and reads deferred values from that
    copy: once decoded, the headers must not hold it (the series twice in memory), and
    a large value that was still deferred must have been read first."""
    blob = bytes(range(256)) * 32  # 8 KiB: deferred when the header is read
    series = ct_series()
    paths = []
    for index, ds in enumerate(series):
        ds.private_block(0x0009, "RADNODE TEST", create=True).add_new(0x10, "OB", blob)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        path = tmp_path / f"{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)

    volume = load_series(paths)

    np.testing.assert_array_equal(volume.array, load_series(ct_series()).array)
    for header in volume.source_headers:
        assert getattr(header, "buffer", None) is None
        assert "PixelData" not in header
        assert header.private_block(0x0009, "RADNODE TEST")[0x10].value == blob


def test_paths_and_datasets_give_the_same_volume(tmp_path: Path) -> None:
    series = ct_series()
    paths = []
    for index, ds in enumerate(series):
        path = tmp_path / f"{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    random.Random(3).shuffle(paths)

    from_files, in_memory = load_series(paths), load_series(series)

    np.testing.assert_array_equal(from_files.array, in_memory.array)
    assert from_files.sources == in_memory.sources
    assert all("PixelData" not in header for header in read_headers(paths))


def _resident_kib(array: np.ndarray) -> int:
    """Resident KiB of the mapping that holds ``array`` (from /proc/self/smaps)."""
    start = array.__array_interface__["data"][0]
    blocks = Path("/proc/self/smaps").read_text().split("\n")
    for index, line in enumerate(blocks):
        low, _, high = line.partition(" ")[0].partition("-")
        if high and int(low, 16) <= start < int(high, 16):
            for field in blocks[index + 1 : index + 20]:
                if field.startswith("Rss:"):
                    return int(field.split()[1])
    raise AssertionError("the array's mapping is not in /proc/self/smaps")


def test_a_file_backed_volume_pages_out_and_back_without_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large volume (here: any, the threshold lowered) is decoded into an unlinked
    scratch file in the job's folder; paged out, its pages leave the process and its
    values come back unchanged."""
    monkeypatch.setattr(paging, "MIN_FILE_BACKED_BYTES", 0)
    series = ct_series()
    in_memory = load_series(series)
    backed = load_series(series, scratch_dir=tmp_path / "job")

    assert not paging.is_file_backed(in_memory.array)
    assert paging.is_file_backed(backed.array)
    assert list((tmp_path / "job").iterdir()) == []  # unlinked: nothing left behind
    np.testing.assert_array_equal(backed.array, in_memory.array)
    assert _resident_kib(backed.array) >= backed.array.nbytes // 1024 - 4

    assert paging.page_out(backed.array)
    assert _resident_kib(backed.array) == 0
    np.testing.assert_array_equal(backed.array, in_memory.array)
    assert not paging.page_out(in_memory.array)  # in memory: nothing to do


def test_without_room_for_the_scratch_file_the_volume_stays_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk is simulated (the one stand-in here: filling a real disk in a test
    is not an option): the volume is read into memory instead, values unchanged."""

    def disk_full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(paging, "MIN_FILE_BACKED_BYTES", 0)
    monkeypatch.setattr(paging.os, "posix_fallocate", disk_full)
    series = ct_series()
    volume = load_series(series, scratch_dir=tmp_path)
    assert not paging.is_file_backed(volume.array)
    np.testing.assert_array_equal(volume.array, load_series(series).array)


def test_a_file_rewritten_between_header_and_pixels_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pixel data is read from the file whose header was checked; a file rewritten in
    between (here: its modification time moved after planning) refuses the job, so it
    is retried on the settled spool rather than decoded from other bytes."""
    import os

    from service.pipeline import volume as volume_module

    paths = []
    for index, ds in enumerate(ct_series()):
        paths.append(tmp_path / f"{index}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    planned = volume_module.plan_volume

    def plan_then_rewrite(*args: object, **kwargs: object) -> object:
        plan = planned(*args, **kwargs)
        stat = os.stat(paths[4])
        os.utime(paths[4], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        return plan

    monkeypatch.setattr(volume_module, "plan_volume", plan_then_rewrite)
    with pytest.raises(SeriesRefused) as refused:
        load_series(paths)
    assert refused.value.code == "changed_during_load"
    monkeypatch.undo()
    volume = load_series(paths)  # settled: the same files load
    assert all("PixelData" not in header for header in volume.source_headers)
    assert [h.SOPInstanceUID for h in volume.source_headers] == [
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths
    ]


def test_enhanced_ct_equals_the_single_frame_series() -> None:
    series = ct_series()
    frame_order = [4, 0, 9, 2, 7, 1, 8, 3, 6, 5]
    enhanced = enhanced_ct(series, frame_order)

    multi, single = load_series([enhanced]), load_series(series)

    np.testing.assert_array_equal(multi.array, single.array)
    assert multi.origin == pytest.approx(single.origin)
    assert multi.spacing == pytest.approx(single.spacing)
    assert multi.direction == pytest.approx(single.direction)
    expected = tuple(
        SourceFrame(enhanced.SOPInstanceUID, EnhancedCTImageStorage, frame_order.index(k) + 1)
        for k in range(10)
    )
    assert multi.sources == expected


COMPRESSED = [
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
]


@pytest.mark.parametrize("name", COMPRESSED)
def test_encoded_transfer_syntaxes_decode_to_the_uncompressed_volume(name: str) -> None:
    reference = load_series([get_testdata_file("MR_small.dcm")])

    volume = load_series([get_testdata_file(name)])

    assert volume.array.shape == (1, 64, 64) and volume.is_single_slice
    np.testing.assert_array_equal(volume.array, reference.array)
    assert volume.origin == reference.origin and volume.direction == reference.direction


def test_geometry_is_refused_before_pixel_data_is_decoded(tmp_path: Path) -> None:
    series = ct_series(3)
    series[1].ImagePositionPatient = series[0].ImagePositionPatient
    for ds in series:
        ds.PixelData = b"\x00" * 10  # would be refused as wrong length if decoded
    paths = []
    for index, ds in enumerate(series):
        paths.append(tmp_path / f"{index}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)

    with pytest.raises(SeriesRefused) as refused:
        plan_volume(read_headers(paths))

    assert refused.value.code == "duplicate_position"


# --------------------------------------------------------------------------- refusals


def _drop(keyword: str, index: int = 3) -> Callable[[list[Dataset]], list[Dataset]]:
    def mutate(series: list[Dataset]) -> list[Dataset]:
        delattr(series[index], keyword)
        return series

    return mutate


def _set(keyword: str, value: object, index: int = 3) -> Callable[[list[Dataset]], list[Dataset]]:
    def mutate(series: list[Dataset]) -> list[Dataset]:
        setattr(series[index], keyword, value)
        return series

    return mutate


def _shift(fraction: float) -> Callable[[list[Dataset]], list[Dataset]]:
    def mutate(series: list[Dataset]) -> list[Dataset]:
        position = list(series[5].ImagePositionPatient)
        position[2] += fraction * STEP
        series[5].ImagePositionPatient = position
        return series

    return mutate


def _duplicate(series: list[Dataset]) -> list[Dataset]:
    series[5].ImagePositionPatient = series[4].ImagePositionPatient
    return series


def _sheared(series: list[Dataset]) -> list[Dataset]:
    for k, ds in enumerate(series):  # 5 degree gantry tilt: y drifts with z
        position = list(ds.ImagePositionPatient)
        position[1] += k * STEP * np.tan(np.radians(5))
        ds.ImagePositionPatient = position
    return series


def _corrupt_rle(series: list[Dataset]) -> list[Dataset]:
    ds = series[2]
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"\x01\x00\x00\x00" + b"\x00" * 60 + b"\xff" * 8])
    ds["PixelData"].VR = "OB"
    return series


def _legacy_multiframe(series: list[Dataset]) -> list[Dataset]:
    ds = series[0]
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    return [ds]


def _two_radiographs(series: list[Dataset]) -> list[Dataset]:
    first, _ = radiograph()
    second, _ = radiograph()
    second.SeriesInstanceUID = first.SeriesInstanceUID
    return [first, second]


REFUSALS = [
    ("empty", lambda s: [], "empty_series", "empty"),
    ("mixed sizes", _set("Columns", 16), "mixed_sizes", "different sizes"),
    ("zero rows", _set("Rows", 0), "absurd_dimensions", "Rows x Columns 0 x 32"),
    ("huge columns", _set("Columns", 20000), "absurd_dimensions", "outside 1..16384"),
    (
        "mixed orientation",
        _set("ImageOrientationPatient", [1.0, 0.0, 0.0, 0.0, 0.9998, 0.02]),
        "mixed_orientation",
        "ImageOrientationPatient",
    ),
    (
        "several frames of reference",
        _set("FrameOfReferenceUID", generate_uid()),
        "several_frames_of_reference",
        "FrameOfReferenceUID",
    ),
    (
        "several series",
        _set("SeriesInstanceUID", generate_uid()),
        "several_series",
        "SeriesInstanceUID",
    ),
    ("duplicate position", _duplicate, "duplicate_position", "share a slice position"),
    ("missing slice", lambda s: s[:5] + s[6:], "missing_slices", "1 slice(s) missing"),
    (
        "slices missing in two places",  # counted at every gap, not the first only
        lambda s: s[:3] + s[4:7] + s[8:],
        "missing_slices",
        "about 2 slice(s) missing: 2 gap(s)",
    ),
    ("uneven spacing", _shift(0.3), "uneven_spacing", "uneven slice spacing"),
    ("no position", _drop("ImagePositionPatient"), "missing_position", "ImagePositionPatient"),
    ("no orientation", _drop("ImageOrientationPatient"), "missing_position", "Orientation"),
    ("sheared stack", _sheared, "sheared_stack", "gantry tilt"),
    ("undecodable", _corrupt_rle, "undecodable_pixel_data", "pixel data could not be decoded"),
    ("no pixel data", _drop("PixelData"), "missing_pixel_data", "no Pixel Data"),
    (
        "short pixel data",
        lambda s: _set("PixelData", s[3].PixelData[:-100])(s),
        "wrong_pixel_data_length",
        "bytes of Pixel Data",
    ),
    ("colour", _set("PhotometricInterpretation", "RGB"), "unsupported_photometric", "RGB"),
    ("malformed position", _set("ImagePositionPatient", [1.0, 2.0]), "malformed_attribute", ""),
    (
        "legacy multi-frame",
        _legacy_multiframe,
        "multiframe_without_geometry",
        "no per-frame plane positions",
    ),
    ("two radiographs", _two_radiographs, "missing_position", "route each instance"),
]


@pytest.mark.parametrize(
    ("mutate", "code", "words"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
def test_refused_series_say_why(
    mutate: Callable[[list[Dataset]], list[Dataset]], code: str, words: str
) -> None:
    series = mutate(ct_series())

    with pytest.raises(SeriesRefused) as refused:
        load_series(series)

    assert refused.value.code == code
    assert words in refused.value.reason
    assert isinstance(refused.value, RadnodeError)
    assert str(refused.value) == refused.value.reason


def test_a_photometric_defined_term_survives_redaction_and_anything_else_does_not() -> None:
    """Job errors are redacted of quoted data-set values: "PhotometricInterpretation
    '<redacted>'" told the operator nothing (acceptance pass). A defined term is shown;
    a value that is not one may be anything, and stays redacted."""
    from service.observability import redact_quoted

    for value, shown in (("YBR_FULL_422", True), ("PALETTE COLOR", True), ("DOE^JOHN", False)):
        with pytest.raises(SeriesRefused) as refused:
            load_series(_set("PhotometricInterpretation", value)(ct_series()))
        assert (value in redact_quoted(refused.value.reason)) is shown


def test_spacing_tolerance_is_a_parameter() -> None:
    slightly_uneven = _shift(0.05)

    assert load_series(slightly_uneven(ct_series())).array.shape[0] == 10
    with pytest.raises(SeriesRefused) as refused:
        load_series(slightly_uneven(ct_series()), tolerances=Tolerances(spacing_relative=0.01))
    assert refused.value.code == "uneven_spacing"


def test_sideways_drift_of_a_rounded_orientation_is_no_gantry_tilt() -> None:
    """Positions drifting 0.4 pixel sideways across the stack (an orientation rounded in
    the header, not a tilt: the acceptance pass saw 0.178 mm over 292 mm refused) make
    one volume; twice that is refused."""

    def drift(pixels: float) -> Callable[[list[Dataset]], list[Dataset]]:
        def mutate(series: list[Dataset]) -> list[Dataset]:
            for k, ds in enumerate(series):
                position = list(ds.ImagePositionPatient)
                position[0] += pixels * PIXEL_SPACING[1] * k / (len(series) - 1)
                ds.ImagePositionPatient = position
            return series

        return mutate

    assert load_series(drift(0.4)(ct_series())).array.shape[0] == 10
    with pytest.raises(SeriesRefused) as refused:
        load_series(drift(0.8)(ct_series()))
    assert refused.value.code == "sheared_stack"


def test_voxel_limit_refuses_before_allocating() -> None:
    with pytest.raises(SeriesRefused) as refused:
        load_series(ct_series(), max_voxels=1000)
    assert refused.value.code == "too_large"


def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"not dicom at all")

    with pytest.raises(SeriesRefused) as refused:
        load_series([path])
    assert refused.value.code == "unreadable_file"


def test_volume_is_compared_by_identity() -> None:
    volume = load_series(ct_series(2))

    assert volume == volume
    assert isinstance(volume, Volume) and volume != load_series(ct_series(2))


def test_pydicom_reads_back_written_test_series(tmp_path: Path) -> None:
    """Guards the fixtures: what the tests build is a valid file pydicom can decode."""
    ds = ct_series(1)[0]
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)

    np.testing.assert_array_equal(pydicom.dcmread(tmp_path / "a.dcm").pixel_array, marker(0))


def test_spacing_that_drifts_slowly_is_refused() -> None:
    """Every gap within 10 % of the median, yet the positions drift off one regular
    grid by more than a slice: 30 gaps of 2.9 mm, then 29 of 3.15 mm (found by review;
    the model saw a distorted volume)."""
    series = ct_series(60)
    gaps = [2.9] * 30 + [3.15] * 29
    z = float(series[0].ImagePositionPatient[2])
    for ds, gap in zip(series[1:], gaps, strict=True):
        z += gap
        ds.ImagePositionPatient = [*list(ds.ImagePositionPatient)[:2], z]
    with pytest.raises(SeriesRefused) as refused:
        load_series(series)
    assert refused.value.code == "uneven_spacing"
    assert "drift" in refused.value.reason
    # jitter around one grid stays accepted
    jittered = ct_series(60)
    for k, ds in enumerate(jittered):
        position = list(ds.ImagePositionPatient)
        position[2] += 0.02 * STEP * (-1) ** k
        ds.ImagePositionPatient = position
    assert load_series(jittered).array.shape[0] == 60
