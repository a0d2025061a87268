"""Bad series on the production path: spool files through ``load_series``.

``tests/test_volume.py`` covers each refusal on in-memory series built there. This
file adds what it does not: the same kinds of damage in files written by
:func:`service.testing.write_ct_series` (read back header-first, as the worker does),
header contradictions it has no case for, the memory bound of a refusal, and a
property: whatever a header says, ``load_series`` returns a Volume or raises
``SeriesRefused`` -- never any other exception.
"""

from __future__ import annotations

import copy
import tracemalloc
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from service.pipeline.volume import SeriesRefused, Volume, load_series
from service.testing import make_ct_series, write_ct_series

SMALL = {"slices": 6, "rows": 16, "columns": 16}

Mutation = Callable[[list[Dataset]], list[Dataset]]


def on_disk(folder: Path, mutate: Mutation, **kwargs: object) -> list[Path]:
    """Write a small CT series, apply ``mutate`` to the datasets, save them again."""
    paths = write_ct_series(folder, **{**SMALL, **kwargs})  # type: ignore[arg-type]
    series = [pydicom.dcmread(path) for path in paths]
    kept = mutate(series)
    for stale in paths:
        stale.unlink()
    written = []
    for index, ds in enumerate(kept):
        written.append(folder / f"m{index:03d}.dcm")
        ds.save_as(written[-1], enforce_file_format=True)
    return written


def _set(keyword: str, value: object, index: int = 2) -> Mutation:
    def mutate(series: list[Dataset]) -> list[Dataset]:
        setattr(series[index], keyword, value)
        return series

    return mutate


def _set_all(keyword: str, value: object) -> Mutation:
    def mutate(series: list[Dataset]) -> list[Dataset]:
        for ds in series:
            setattr(ds, keyword, value)
        return series

    return mutate


def _same_position(series: list[Dataset]) -> list[Dataset]:
    series[3].ImagePositionPatient = series[2].ImagePositionPatient
    return series


def _sent_twice(series: list[Dataset]) -> list[Dataset]:
    return [*series, series[2]]


def _localizer(series: list[Dataset]) -> list[Dataset]:
    series[0].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal scout
    return series


def _missing_frame_of_reference(series: list[Dataset]) -> list[Dataset]:
    del series[4].FrameOfReferenceUID
    return series


def _with_scout(series: list[Dataset]) -> list[Dataset]:
    """A coronal scout inside the axial series, as some scanners send it."""
    scout = copy.deepcopy(series[0])
    scout.SOPInstanceUID = generate_uid()
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    scout.InstanceNumber = 0
    return [scout, *series]


# --------------------------------------------------------------------------- spool files


def test_a_scout_inside_the_series_is_set_aside_and_the_axial_images_load(
    tmp_path: Path,
) -> None:
    """It crossed the axial planes and the whole series was refused (mixed orientation):
    the radiologist got nothing for an ordinary CT."""
    paths = on_disk(tmp_path, _with_scout)
    scout_uid = pydicom.dcmread(paths[0]).SOPInstanceUID

    volume = load_series(paths)

    assert volume.array.shape == (SMALL["slices"], 16, 16)
    assert len(volume.sources) == len(volume.source_headers) == SMALL["slices"]
    assert scout_uid not in {source.sop_instance_uid for source in volume.sources}
    assert volume.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_single_slice_from_disk_is_a_flagged_volume(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, slices=1, rows=16, columns=16, slice_thickness=3.0)

    volume = load_series(paths)

    assert volume.is_single_slice and not volume.is_2d
    assert volume.array.shape == (1, 16, 16)
    assert volume.spacing[2] == pytest.approx(3.0)
    assert volume.slice_spacing_source == "SliceThickness"


def test_single_slice_without_thickness_says_its_depth_is_assumed(tmp_path: Path) -> None:
    def drop_thickness(series: list[Dataset]) -> list[Dataset]:
        del series[0].SliceThickness
        if "SpacingBetweenSlices" in series[0]:
            del series[0].SpacingBetweenSlices
        return series

    volume = load_series(on_disk(tmp_path, drop_thickness, slices=1))

    assert volume.is_single_slice
    assert volume.slice_spacing_source == "default" and volume.spacing[2] == 1.0


SPOOL_REFUSALS: list[tuple[str, Mutation, str, str]] = [
    ("localizer in the stack", _localizer, "mixed_orientation", "ImageOrientationPatient"),
    ("missing slice", lambda s: s[:3] + s[4:], "missing_slices", "slice(s) missing"),
    ("two images at one position", _same_position, "duplicate_position", "share a slice"),
    ("an instance sent twice", _sent_twice, "duplicate_position", "sent twice"),
    ("absurd rows", _set("Rows", 60000), "absurd_dimensions", "Rows x Columns 60000 x 16"),
    (
        "several frames of reference",
        _set("FrameOfReferenceUID", generate_uid()),
        "several_frames_of_reference",
        "FrameOfReferenceUID",
    ),
    (
        "a missing frame of reference",
        _missing_frame_of_reference,
        "several_frames_of_reference",
        "counting a missing one",
    ),
    ("mixed sizes", _set("Columns", 8), "mixed_sizes", "16 x 8 (1 images)"),
    (
        "orientation not orthonormal",
        _set_all("ImageOrientationPatient", [1, 0, 0, 0.5, 1, 0]),
        "malformed_attribute",
        "not two orthogonal unit vectors",
    ),
    ("zero pixel spacing", _set("PixelSpacing", [0, 0.7]), "malformed_attribute", "positive"),
    ("NaN position", _set("ImagePositionPatient", ["nan", 0, 0]), "malformed_attribute", "finite"),
    (
        "BitsStored above BitsAllocated",
        _set("BitsStored", 20),
        "missing_pixel_description",
        "contradict",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "code", "words"),
    [case[1:] for case in SPOOL_REFUSALS],
    ids=[case[0] for case in SPOOL_REFUSALS],
)
def test_damaged_spool_series_is_refused_with_its_reason(
    tmp_path: Path, mutate: Mutation, code: str, words: str
) -> None:
    paths = on_disk(tmp_path, mutate)

    with pytest.raises(SeriesRefused) as refused:
        load_series(paths)

    assert (refused.value.code, words in refused.value.reason) == (code, True), refused.value.reason
    assert "PHANTOM" not in refused.value.reason  # no patient name in reasons


def test_absurd_volume_is_refused_before_any_allocation(tmp_path: Path) -> None:
    """Within-limit Rows x Columns, but too many voxels: refused from the headers."""
    paths = on_disk(tmp_path, lambda s: _set_all("Columns", 16384)(_set_all("Rows", 16384)(s)))

    tracemalloc.start()
    try:
        with pytest.raises(SeriesRefused) as refused:
            load_series(paths, max_voxels=2**30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert refused.value.code == "too_large"
    assert peak < 50 * 2**20


def test_header_promising_more_pixels_than_it_has_is_refused_before_allocating(
    tmp_path: Path,
) -> None:
    def lie(series: list[Dataset]) -> list[Dataset]:
        for ds in series:
            ds.Rows, ds.Columns = 8000, 8000  # pixel data stays 16 x 16
        return series

    paths = on_disk(tmp_path, lie)
    tracemalloc.start()
    try:
        with pytest.raises(SeriesRefused) as refused:
            load_series(paths)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert refused.value.code == "wrong_pixel_data_length"
    assert peak < 50 * 2**20, f"{peak / 2**20:.0f} MiB reserved for a refused series"


# --------------------------------------------------------------------------- property


#: Attributes the planner reads, with their VR, for raw (wire-level) value mutations.
PLANNER_ATTRIBUTES: dict[str, str] = {
    "Rows": "US",
    "Columns": "US",
    "BitsAllocated": "US",
    "BitsStored": "US",
    "HighBit": "US",
    "PixelRepresentation": "US",
    "SamplesPerPixel": "US",
    "PhotometricInterpretation": "CS",
    "NumberOfFrames": "IS",
    "InstanceNumber": "IS",
    "ImagePositionPatient": "DS",
    "ImageOrientationPatient": "DS",
    "PixelSpacing": "DS",
    "SliceThickness": "DS",
    "SpacingBetweenSlices": "DS",
    "RescaleSlope": "DS",
    "RescaleIntercept": "DS",
    "FrameOfReferenceUID": "UI",
    "SeriesInstanceUID": "UI",
    "Modality": "CS",
    "PixelData": "OW",
}

_TEXT = st.text(alphabet="0123456789.-+eE\\ naNifIMOCHR", max_size=40).map(str.encode)
_VALUE = {
    "US": st.one_of(
        st.binary(max_size=6), st.integers(0, 65535).map(lambda n: n.to_bytes(2, "little"))
    ),
    "IS": _TEXT,
    "DS": _TEXT,
    "CS": st.one_of(_TEXT, st.sampled_from([b"MONOCHROME1", b"RGB", b"YBR_FULL", b"CT", b"DX"])),
    "UI": st.one_of(st.just(b""), st.just(b"1.2.3"), st.binary(max_size=20)),
    "OW": st.binary(max_size=64).map(lambda b: b + b"\x00" * (len(b) % 2)),
}


@st.composite
def mutations(
    draw: st.DrawFn,
    attributes: tuple[str, ...] = tuple(sorted(PLANNER_ATTRIBUTES)),
    values: dict[str, st.SearchStrategy[bytes]] = _VALUE,
) -> list[tuple[int, str, bytes | None]]:
    """Up to four (slice, attribute, raw value or None to delete) changes."""
    changes = []
    for _ in range(draw(st.integers(1, 4))):
        keyword = draw(st.sampled_from(attributes))
        value = draw(st.none() | values[PLANNER_ATTRIBUTES[keyword]])
        changes.append((draw(st.integers(0, 3)), keyword, value))
    return changes


#: Attributes whose damage once escaped (see KNOWN_ESCAPES), and US values of odd
#: length: this property leaves them out so that it checks everything else on its own;
#: the unrestricted property below covers them too.
UNGUARDED = frozenset(
    {"SamplesPerPixel", "PixelRepresentation", "BitsAllocated", "BitsStored", "NumberOfFrames"}
)
_GUARDED_VALUE = {
    **_VALUE,
    "US": st.integers(0, 65535).map(lambda n: n.to_bytes(2, "little")),
}


def _encoded_series() -> list[bytes]:
    out = []
    for ds in make_ct_series(slices=4, rows=8, columns=8):
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


ENCODED = _encoded_series()


def mutated_series(changes: list[tuple[int, str, bytes | None]]) -> list[Dataset]:
    """The series read from its bytes (raw elements, as from a file), then mutated raw."""
    series = [pydicom.dcmread(BytesIO(data)) for data in ENCODED]
    for index, keyword, value in changes:
        ds, tag = series[index], Tag(keyword)
        if value is None:
            if tag in ds:
                del ds[tag]
            continue
        vr = PLANNER_ATTRIBUTES[keyword]
        ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    return series


def check_load_series(changes: list[tuple[int, str, bytes | None]]) -> None:
    """The property: a Volume, or SeriesRefused with a code and a reason."""
    try:
        volume = load_series(mutated_series(changes), max_voxels=2**22)
    except SeriesRefused as refused:
        assert refused.code and refused.reason
        return
    assert isinstance(volume, Volume)
    assert volume.array.shape[0] == len(volume.sources)


#: Minimal header damage the property below once found escaping as another exception
#: (TypeError, BytesLengthException...); volume.py now turns each into SeriesRefused.
KNOWN_ESCAPES = [
    ("SamplesPerPixel", b"\x00" * 6, "two values: int() of a list"),
    ("SamplesPerPixel", b"", "empty: None reaches get_expected_length"),
    ("SamplesPerPixel", None, "absent: AttributeError in get_expected_length"),
    ("PixelRepresentation", b"\x00" * 6, "two values: int() of a list"),
    ("BitsAllocated", b"\x00" * 4, "two values: int() of a list"),
    ("BitsAllocated", b"\x00" * 3, "odd length US value"),
    ("BitsStored", b"\x00" * 4, "two values: int() of a list"),
    ("BitsStored", b"\x00" * 3, "odd length US value"),
    ("Columns", b"\x00" * 3, "odd length US value: BytesLengthException from any US"),
    ("NumberOfFrames", b"C", "not an integer string: str % int in _check_pixel_data"),
]


@pytest.mark.parametrize(
    ("keyword", "value"),
    [pytest.param(k, v, id=f"{k}-{why}") for k, v, why in KNOWN_ESCAPES],
)
def test_known_header_damage_is_refused(keyword: str, value: bytes | None) -> None:
    check_load_series([(0, keyword, value)])


PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@PROPERTY_SETTINGS
@given(mutations(tuple(sorted(set(PLANNER_ATTRIBUTES) - UNGUARDED)), _GUARDED_VALUE))
def test_header_damage_gives_a_volume_or_series_refused(changes) -> None:
    check_load_series(changes)


@PROPERTY_SETTINGS
@given(mutations())
def test_any_header_damage_gives_a_volume_or_series_refused(changes) -> None:
    check_load_series(changes)


def test_the_set_aside_scout_is_logged(tmp_path: Path) -> None:
    paths = on_disk(tmp_path, _with_scout)
    with structlog.testing.capture_logs() as logs:
        load_series(paths)
    (line,) = [e for e in logs if e["event"] == "series.localizers_skipped"]
    assert (line["localizers"], line["kept"]) == (1, SMALL["slices"])
