"""A DICOM series becomes a volume with its geometry, or is refused with a reason.

Why this module exists: a model only sees an array, but every result radnode writes (SR
measurements, SEG masks, overlays) must land on the right voxels of the right source
images. So the array never travels without its geometry (origin, spacing, direction in
patient space) and the ordered list of source frames it came from.

Work is done in two passes so that a bad series costs little:

1. The headers of every instance are read without their pixel data (:func:`read_headers`;
   :func:`load_series` keeps Pixel Data's length, deferred, to check it before step 3).
   Localizer images in a series that has other images too are set aside
   (:func:`without_localizers`).
2. :func:`plan_volume` checks the geometry (one series, one frame of reference, one size,
   one orientation, positions on a regular grid along the slice normal, ...) and decides
   the slice order, the output shape and dtype. Every problem raises
   :class:`SeriesRefused`, whose ``reason`` names what is wrong and what an operator can
   do about it, and whose ``code`` is a short stable token for metrics.
3. Only then, once every native Pixel Data length matches its header, does
   :func:`load_series` decode the pixel data, one instance at a time, into one
   preallocated array (a 1000-slice study is never held twice).

Conventions (the same as ITK and NIfTI/MONAI, so nothing is re-derived downstream):

* ``Volume.array`` is indexed ``[k, j, i]`` = (slice, row, column) = (z, y, x).
* Voxel index ``(i, j, k)`` (column, row, slice) maps to patient LPS millimetres through
  ``Volume.affine_lps()``; ``Volume.affine_ras()`` is the same in RAS, which is what a
  MONAI ``MetaTensor`` expects by default. Both affines take indices in (i, j, k) order,
  which is the axis order of ``Volume.to_channel_first_xyz()``.
* ``direction`` is row-major 3x3 whose *columns* are the x axis (IOP row cosines), the y
  axis (IOP column cosines) and the z axis (the slice normal, row x column, in stacking
  order): the layout ``SimpleITK.Image.SetDirection`` takes.
* Slices are ordered by their position projected on the slice normal, never by
  InstanceNumber, which modalities number in either direction.

Values are in modality units: Rescale Slope/Intercept (or the Enhanced
Pixel Value Transformation) are applied. The output stays an integer type when every
slope is 1 and every intercept integral (the smallest of uint8/int16/int32/int64 that holds
the stored range before and after the intercept; int16 when the actual values fit it,
as they do for signed 16-bit CT with intercept -1024), else float32. MONOCHROME1 data is
inverted within its stored range, so bright always means more attenuation/signal
(MONOCHROME2), and ``inverted_monochrome1`` records that it happened.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from os import PathLike, fspath
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
import pydicom
import structlog
from numpy.typing import NDArray
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException
from pydicom.multival import MultiValue
from pydicom.pixels import iter_pixels
from pydicom.pixels.utils import get_expected_length
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from service.errors import RadnodeError, SourceUnavailable
from service.pipeline.paging import empty_volume
from service.records import is_localizer_type

log = structlog.get_logger("service.pipeline.volume")

SeriesItem: TypeAlias = str | PathLike[str] | Dataset
Vector3: TypeAlias = tuple[float, float, float]
Matrix3: TypeAlias = tuple[float, float, float, float, float, float, float, float, float]
PixelSpacingSource: TypeAlias = Literal["PixelSpacing", "ImagerPixelSpacing", "default"]
SliceSpacingSource: TypeAlias = Literal[
    "positions", "SliceThickness", "SpacingBetweenSlices", "default"
]

#: Largest Rows or Columns accepted; larger values mean a damaged header, not an image.
MAX_DIMENSION = 16384
#: Default cap on voxels in one volume (8 GiB as float32), checked before allocating.
DEFAULT_MAX_VOXELS = 2**31

#: Modalities whose single images are projections: 2D, no patient-space geometry.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "RF", "XA", "IO", "PX"})
_GREYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})
#: Two slices closer than this along the normal are at the same position.
_DUPLICATE_MM = 1e-3
#: How far IOP vectors may be from unit length and orthogonality.
_ORTHONORMAL_TOLERANCE = 1e-3
_RESEND = "re-send the series from the PACS"


class SeriesRefused(RadnodeError):
    """The series cannot become a volume radnode can trust.

    ``reason`` is one human-readable sentence or two: what is wrong, and what an operator
    can do. ``code`` is a short stable token (``"uneven_spacing"``, ...) for metrics and
    tests. Reasons name images by InstanceNumber (and frame), never by patient data.
    """

    def __init__(self, reason: str, *, code: str = "refused") -> None:
        self.reason = reason
        self.code = code
        super().__init__(reason)


@dataclass(frozen=True)
class Tolerances:
    """How much imperfection in the headers still counts as one regular volume.

    ``orientation``: largest difference between any ImageOrientationPatient component and
    the first image's. Slice gaps may differ from the median gap by
    ``max(spacing_relative * median, spacing_mm)``. Image positions may drift sideways
    (perpendicular to the normal) by ``max(spacing_mm, shear_pixels * pixel spacing)``.
    """

    orientation: float = 1e-4
    spacing_relative: float = 0.10
    spacing_mm: float = 0.01
    #: Half a pixel over the whole stack: a tenth refused a 292 mm CT whose orientation
    #: was rounded by 0.035 degrees (acceptance pass); a real gantry tilt drifts by
    #: many pixels (5 degrees over 300 mm: 26 mm).
    shear_pixels: float = 0.5


DEFAULT_TOLERANCES = Tolerances()


@dataclass(frozen=True)
class SourceFrame:
    """One source image a slice came from, so every output can reference it.

    ``frame_number`` is None for single-frame instances and 1-based for multi-frame ones
    (as DICOM's Referenced Frame Number is).
    """

    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None


@dataclass(frozen=True)
class PlannedFrame:
    """Where one slice's pixels come from and how to turn them into modality values."""

    source: SourceFrame
    #: Index of the instance in the list given to :func:`load_series`.
    item_index: int
    #: 0-based frame index within that instance (0 for single-frame instances).
    frame_index: int
    instance_number: int | None
    slope: float
    intercept: float
    #: (min, max) of the stored values that BitsStored and PixelRepresentation allow.
    stored_range: tuple[int, int]
    #: MONOCHROME1: invert within ``stored_range`` so the volume is MONOCHROME2.
    invert: bool

    @property
    def label(self) -> str:
        """How reasons name this image: InstanceNumber and frame, never patient data."""
        name = (
            f"InstanceNumber {self.instance_number}"
            if self.instance_number is not None
            else f"input item {self.item_index}"
        )
        if self.source.frame_number is not None:
            name += f" frame {self.source.frame_number}"
        return name


@dataclass(frozen=True)
class VolumePlan:
    """Everything the headers say about the volume, decided before any pixel is decoded.

    ``frames`` is in slice order: ``frames[k]`` fills ``array[k]``.
    """

    shape: tuple[int, int, int]
    dtype: np.dtype[Any]
    origin: Vector3
    spacing: Vector3
    direction: Matrix3
    frames: tuple[PlannedFrame, ...]
    frame_of_reference_uid: str | None
    modality: str
    study_uid: str
    series_uid: str
    is_2d: bool
    bits_stored: int
    pixel_spacing_source: PixelSpacingSource
    slice_spacing_source: SliceSpacingSource


@dataclass(frozen=True, eq=False)
class Volume:
    """A series as an array in modality units plus the geometry that places it in the patient.

    Frozen: the fields cannot be rebound; the array itself stays writable so that MONAI and
    torch can wrap it without copies or warnings. Compared by identity (arrays have no
    single truth value).

    * ``array``: shape (slices, rows, columns) = (z, y, x); see the module docstring for
      the dtype rule.
    * ``origin``: LPS mm of the centre of voxel (0, 0, 0) (first voxel of the first slice).
    * ``spacing``: (column spacing, row spacing, slice spacing) = (x, y, z) in mm.
    * ``direction``: row-major 3x3; columns are the x, y and z axes in LPS.
    * ``sources``: one entry per slice, in slice order.
    * ``is_2d``: a single projection image (CR, DX, MG, ...) or one image without
      orientation/position; its origin is (0, 0, 0) and direction the identity, which
      mean "no patient geometry", not a position.
    * ``pixel_spacing_source``: which attribute gave x/y spacing; ``"ImagerPixelSpacing"``
      is at the detector, not the patient; ``"default"`` means 1.0 mm was assumed.
    * ``slice_spacing_source``: ``"positions"`` when measured between slices; otherwise
      the attribute a single slice's depth came from.
    """

    array: NDArray[Any]
    origin: Vector3
    spacing: Vector3
    direction: Matrix3
    frame_of_reference_uid: str | None
    modality: str
    study_uid: str
    series_uid: str
    sources: tuple[SourceFrame, ...]
    is_2d: bool
    inverted_monochrome1: bool
    bits_stored: int
    pixel_spacing_source: PixelSpacingSource
    slice_spacing_source: SliceSpacingSource
    #: Of the returned data: MONOCHROME1 input has been inverted.
    photometric_interpretation: str = "MONOCHROME2"
    #: The header of each input item, in input order, without Pixel Data (read files)
    #: or as given (Datasets): the writers take patient, study and reference
    #: attributes from them instead of reading every file a third time.
    source_headers: tuple[Dataset, ...] = ()

    @property
    def is_single_slice(self) -> bool:
        """One cross-sectional slice: a valid volume of depth 1 that 3D pipelines refuse."""
        return not self.is_2d and self.array.shape[0] == 1

    def affine_lps(self) -> NDArray[np.float64]:
        """4x4 matrix mapping voxel index (i=column, j=row, k=slice, 1) to LPS mm.

        ``array[k, j, i]`` is the voxel at ``affine_lps() @ (i, j, k, 1)``.
        """
        axes = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        affine = np.eye(4)
        affine[:3, :3] = axes * np.asarray(self.spacing, dtype=np.float64)  # scale columns
        affine[:3, 3] = self.origin
        return affine

    def affine_ras(self) -> NDArray[np.float64]:
        """:meth:`affine_lps` in RAS (x and y negated), MONAI's and NIfTI's default space."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps()

    def to_channel_first_xyz(self) -> NDArray[Any]:
        """The array as (1, x, y, z): MONAI's channel-first layout for the affines above.

        ``to_channel_first_xyz()[0, i, j, k] == array[k, j, i]``. A view, not a copy.
        """
        return self.array.transpose(2, 1, 0)[np.newaxis]


@dataclass(frozen=True)
class _FrameHeader:
    """One 2D image's header facts, before the series is ordered."""

    planned: PlannedFrame
    position: Vector3 | None
    orientation: tuple[float, ...] | None
    #: DICOM order: (row spacing, column spacing), i.e. (y, x).
    pixel_spacing: tuple[float, float] | None
    pixel_spacing_source: PixelSpacingSource
    slice_thickness: float | None
    spacing_between_slices: float | None


@dataclass(frozen=True)
class _Geometry:
    order: tuple[_FrameHeader, ...]
    origin: Vector3
    spacing: Vector3
    direction: Matrix3
    is_2d: bool
    pixel_spacing_source: PixelSpacingSource
    slice_spacing_source: SliceSpacingSource


# --------------------------------------------------------------------------- public API


def read_headers(items: Sequence[SeriesItem], *, defer_pixels: bool = False) -> list[Dataset]:
    """Read each instance without its pixel data; Datasets given in memory pass through.

    Cheap by design: geometry checks run on these, so a refused series is never decoded.
    ``defer_pixels`` keeps Pixel Data's length without reading its bytes (see
    :func:`_read_header`).
    """
    return [_read_header(item, i, defer_pixels=defer_pixels) for i, item in enumerate(items)]


#: What damaged header values raise inside pydicom, numpy and the checks below when
#: they are not of the form the standard gives (a list where one value belongs, an odd
#: byte count, a number that is text...). Each becomes a refusal, never a crash.
_MALFORMED = (TypeError, ValueError, NotImplementedError, AttributeError, KeyError,
              IndexError, OverflowError, BytesLengthException)  # fmt: skip


@contextlib.contextmanager
def _refuse_malformed(what: str) -> Iterator[None]:
    try:
        yield
    except SeriesRefused:
        raise
    except MemoryError:
        raise SeriesRefused(
            f"the series does not fit in memory while {what}; check Rows, Columns and"
            " the number of frames, or route it to a node with more memory",
            code="too_large",
        ) from None
    except _MALFORMED as exc:
        raise SeriesRefused(
            f"a header value is malformed ({type(exc).__name__} while {what}: {exc}); "
            f"{_RESEND} or check the modality's export settings",
            code="malformed_attribute",
        ) from exc


def plan_volume(
    headers: Sequence[Dataset],
    *,
    tolerances: Tolerances = DEFAULT_TOLERANCES,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> VolumePlan:
    """Check a series' headers and decide the volume's shape, dtype, order and geometry.

    Raises :class:`SeriesRefused` for anything that would make the geometry a guess,
    including header values too damaged to read.
    """
    with _refuse_malformed("checking the headers"):
        return _plan_volume(headers, tolerances=tolerances, max_voxels=max_voxels)


def _plan_volume(
    headers: Sequence[Dataset], *, tolerances: Tolerances, max_voxels: int
) -> VolumePlan:
    if not headers:
        raise SeriesRefused(
            "the series is empty: no instances were given. Check that the study was "
            "received completely and that routing selected the right series.",
            code="empty_series",
        )
    _check_one_series(headers)
    rows, columns = _check_image_size(headers)
    for index, header in enumerate(headers):
        _check_pixel_format(header, index)
    frames = [frame for index, h in enumerate(headers) for frame in _frame_headers(index, h)]
    modality = str(headers[0].get("Modality", "") or "")
    geometry = _geometry(frames, modality, tolerances)
    shape = (len(frames), rows, columns)
    if math.prod(shape) > max_voxels:
        raise SeriesRefused(
            f"the volume would have {math.prod(shape)} voxels ({shape[0]} slices of "
            f"{rows} x {columns}), more than the limit of {max_voxels}. Raise the limit "
            "if this node has the memory, or route a thinner reconstruction.",
            code="too_large",
        )
    planned = tuple(frame.planned for frame in geometry.order)
    first = headers[0]
    return VolumePlan(
        shape=shape,
        dtype=_output_dtype(planned),
        origin=geometry.origin,
        spacing=geometry.spacing,
        direction=geometry.direction,
        frames=planned,
        frame_of_reference_uid=_text(first, "FrameOfReferenceUID") or None,
        modality=modality,
        study_uid=_text(first, "StudyInstanceUID"),
        series_uid=_text(first, "SeriesInstanceUID"),
        is_2d=geometry.is_2d,
        bits_stored=max(int(h.BitsStored) for h in headers),
        pixel_spacing_source=geometry.pixel_spacing_source,
        slice_spacing_source=geometry.slice_spacing_source,
    )


def load_series(
    items: Sequence[SeriesItem],
    *,
    tolerances: Tolerances = DEFAULT_TOLERANCES,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    scratch_dir: Path | None = None,
) -> Volume:
    """Turn one series (file paths and/or pydicom Datasets) into a :class:`Volume`.

    Headers are checked first (:func:`plan_volume`); pixel data is decoded afterwards, one
    instance at a time, straight into one preallocated array. Compressed transfer
    syntaxes decode through pydicom's pixel handlers (pylibjpeg plugins: JPEG, JPEG-LS,
    JPEG 2000, RLE). Raises :class:`SeriesRefused`.

    ``scratch_dir``: a large array is file-backed there, so that it can be paged out
    while the model runs (:mod:`service.pipeline.paging`).
    """
    with _refuse_malformed("reading the headers"):
        # Pixel Data deferred, not skipped: its length is known without reading it.
        headers = read_headers(items, defer_pixels=True)
        items, headers = without_localizers(items, headers)
    plan = plan_volume(headers, tolerances=tolerances, max_voxels=max_voxels)
    with _refuse_malformed("decoding the pixel data"):
        _check_pixel_lengths(plan, headers)  # before the volume's array is allocated
        array = _decode(plan, items, headers, scratch_dir)
    return Volume(
        array=array,
        origin=plan.origin,
        spacing=plan.spacing,
        direction=plan.direction,
        frame_of_reference_uid=plan.frame_of_reference_uid,
        modality=plan.modality,
        study_uid=plan.study_uid,
        series_uid=plan.series_uid,
        sources=tuple(frame.source for frame in plan.frames),
        is_2d=plan.is_2d,
        inverted_monochrome1=any(frame.invert for frame in plan.frames),
        bits_stored=plan.bits_stored,
        pixel_spacing_source=plan.pixel_spacing_source,
        slice_spacing_source=plan.slice_spacing_source,
        source_headers=tuple(headers),
    )


def is_localizer(header: Dataset) -> bool:
    """Image Type says LOCALIZER (a scout or topogram; PS3.3 C.8.2.1.1.1 for CT)."""
    value = header.get("ImageType")
    return is_localizer_type([value] if isinstance(value, str) else list(value or ()))


def without_localizers(
    items: Sequence[SeriesItem], headers: Sequence[Dataset]
) -> tuple[list[SeriesItem], list[Dataset]]:
    """The series without its localizer images, when it has other images too.

    Why: some scanners put the scout into the axial series. Its plane crosses the
    others, so the whole series was refused ("mixes orientations") and the
    radiologist got nothing. A series of localizers only is left as it is (routing
    keeps such series away from volume models).
    """
    keep = [i for i, header in enumerate(headers) if not is_localizer(header)]
    if not keep or len(keep) == len(headers):
        return list(items), list(headers)
    log.info("series.localizers_skipped", localizers=len(headers) - len(keep), kept=len(keep))
    return [items[i] for i in keep], [headers[i] for i in keep]


# --------------------------------------------------------------------------- reading


def _read_header(item: SeriesItem, index: int, *, defer_pixels: bool = False) -> Dataset:
    """The header of one item; ``defer_pixels`` keeps Pixel Data's length, not its bytes.

    Only :func:`load_series` defers: a deferred element is read from the file when it
    is touched, which the writers (who iterate over source headers) must never do, so
    :func:`read_headers` does not defer unless asked.
    """
    if isinstance(item, Dataset):
        return item
    if defer_pixels:
        return _dcmread(item, index, stop_before_pixels=False, defer_size=_DEFER_BYTES)
    return _dcmread(item, index, stop_before_pixels=True)


#: Values longer than this stay in the file while headers are read (Pixel Data, overlays,
#: icons); their lengths are known, their bytes are not read.
_DEFER_BYTES = 4096
_PIXEL_DATA = Tag(0x7FE0, 0x0010)


def _dcmread(
    path: str | PathLike[str],
    index: int,
    *,
    stop_before_pixels: bool,
    defer_size: int | None = None,
) -> Dataset:
    try:
        return pydicom.dcmread(
            fspath(path), stop_before_pixels=stop_before_pixels, defer_size=defer_size
        )
    except OSError as exc:  # the file cannot be opened or read here: not the study's fault
        raise SourceUnavailable(
            f"this worker cannot read input item {index} ({type(exc).__name__}:"
            f" {exc.strerror or exc}): it was removed from the spool (by retention or by"
            " hand), or node.data_dir is not mounted at the edge's path on this worker's"
            " machine (docs/scale-out.md)"
        ) from exc
    except Exception as exc:  # pydicom raises many types on bad files
        raise SeriesRefused(
            f"input item {index} could not be read as DICOM ({type(exc).__name__}: {exc}). "
            f"Check the spool file, or {_RESEND}.",
            code="unreadable_file",
        ) from exc


def _text(ds: Dataset | None, keyword: str) -> str:
    if ds is None:
        return ""
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _floats(ds: Dataset | None, keyword: str, count: int) -> tuple[float, ...] | None:
    """``count`` finite numbers from a DS/FD attribute, None when absent or empty."""
    if ds is None:
        return None
    try:
        value = ds.get(keyword)
    except Exception as exc:  # a malformed DS string raises on conversion
        raise _malformed(keyword, f"{type(exc).__name__}: {exc}") from exc
    if value is None or value == "":
        return None
    raw = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    try:
        numbers = tuple(float(v) for v in raw)
    except (TypeError, ValueError) as exc:
        raise _malformed(keyword, str(exc)) from exc
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        raise _malformed(keyword, f"expected {count} finite numbers, got {raw!r}")
    return numbers


def _number(ds: Dataset | None, keyword: str) -> float | None:
    values = _floats(ds, keyword, 1)
    return None if values is None else values[0]


def _malformed(keyword: str, detail: str) -> SeriesRefused:
    return SeriesRefused(
        f"{keyword} is malformed ({detail}); the geometry cannot be trusted. "
        f"Correct the header at the modality or PACS, then {_RESEND}.",
        code="malformed_attribute",
    )


def _instance_number(ds: Dataset) -> int | None:
    try:
        value = ds.get("InstanceNumber")
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- series checks


def _check_one_series(headers: Sequence[Dataset]) -> None:
    series = {_text(h, "SeriesInstanceUID") for h in headers}
    if len(series) > 1:
        raise SeriesRefused(
            f"the input mixes {len(series)} different SeriesInstanceUIDs; a volume is built "
            "from one series. Group instances by series before loading (a caller bug or a "
            "mis-indexed series).",
            code="several_series",
        )
    frames_of_reference = {_text(h, "FrameOfReferenceUID") for h in headers}
    if len(frames_of_reference) > 1:
        raise SeriesRefused(
            f"the series has {len(frames_of_reference)} different FrameOfReferenceUIDs "
            "(counting a missing one): its images were not acquired in one patient "
            "coordinate system, e.g. the patient moved between acquisitions, so their "
            "positions cannot be combined. Split the series by Frame of Reference at the "
            "modality or PACS.",
            code="several_frames_of_reference",
        )


def _check_image_size(headers: Sequence[Dataset]) -> tuple[int, int]:
    sizes: dict[tuple[int, int], int] = {}
    for header in headers:
        try:
            size = (int(header.get("Rows") or 0), int(header.get("Columns") or 0))
        except (TypeError, ValueError):
            size = (0, 0)
        if not (0 < size[0] <= MAX_DIMENSION and 0 < size[1] <= MAX_DIMENSION):
            raise SeriesRefused(
                f"{_header_label(header)} has Rows x Columns {size[0]} x {size[1]}, outside "
                f"1..{MAX_DIMENSION}: the header is damaged or the object is not an image. "
                f"Check the instance on the PACS, or {_RESEND}.",
                code="absurd_dimensions",
            )
        sizes[size] = sizes.get(size, 0) + 1
    if len(sizes) > 1:
        listed = ", ".join(f"{r} x {c} ({n} images)" for (r, c), n in sorted(sizes.items()))
        raise SeriesRefused(
            f"the images have different sizes (Rows x Columns: {listed}); a volume needs one "
            "size. The series probably mixes localizers, reformats or secondary captures: "
            "route only the images of one kind.",
            code="mixed_sizes",
        )
    return next(iter(sizes))


#: PS3.3 C.7.6.3.1.2's defined terms: a value among them is no patient data.
_PHOTOMETRIC_TERMS = frozenset({
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL",
    "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB",
})  # fmt: skip


def _shown_photometric(value: str) -> str:
    """A defined term as it is (the operator's log and /api/jobs redact every quoted
    value from a data set: "PhotometricInterpretation '<redacted>'" said nothing;
    acceptance pass); anything else quoted, and so redacted there."""
    if not value:
        return "missing"
    return value if value in _PHOTOMETRIC_TERMS else f"'{value}'"


def _check_pixel_format(header: Dataset, index: int) -> None:
    photometric = _text(header, "PhotometricInterpretation").upper()
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    if photometric not in _GREYSCALE or samples != 1:
        raise SeriesRefused(
            f"{_header_label(header, index)} has PhotometricInterpretation "
            f"{_shown_photometric(photometric)} with {samples} sample(s) per pixel: only "
            "greyscale (MONOCHROME1/MONOCHROME2) images become volumes. Colour images "
            "(screenshots, photos, fused displays) need a pipeline that accepts them.",
            code="unsupported_photometric",
        )
    for keyword in ("BitsAllocated", "BitsStored", "PixelRepresentation"):
        if header.get(keyword) is None:
            raise SeriesRefused(
                f"{_header_label(header, index)} has no {keyword}, so its pixel values "
                f"cannot be interpreted. Correct the header, or {_RESEND}.",
                code="missing_pixel_description",
            )
    if not 1 <= int(header.BitsStored) <= int(header.BitsAllocated):
        raise SeriesRefused(
            f"{_header_label(header, index)} has BitsStored {header.BitsStored} and "
            f"BitsAllocated {header.BitsAllocated}, which contradict each other. Correct "
            f"the header, or {_RESEND}.",
            code="missing_pixel_description",
        )


def _header_label(header: Dataset, index: int | None = None) -> str:
    number = _instance_number(header)
    if number is not None:
        return f"InstanceNumber {number}"
    return "an image" if index is None else f"input item {index}"


# --------------------------------------------------------------------------- frames


def _frame_headers(index: int, ds: Dataset) -> list[_FrameHeader]:
    """One entry per 2D frame of the instance (Enhanced multi-frame gives several)."""
    if ds.get("PerFrameFunctionalGroupsSequence"):
        return _enhanced_frames(index, ds)
    if number_of_frames(ds) > 1:
        raise SeriesRefused(
            f"{_header_label(ds, index)} is a multi-frame image with "
            f"{number_of_frames(ds)} frames but no per-frame plane positions (no "
            "Per-frame Functional Groups), so where each frame lies cannot be determined. "
            "Ask the modality or PACS to send the series as single-frame or Enhanced "
            "(e.g. Enhanced CT/MR) instances.",
            code="multiframe_without_geometry",
        )
    return [
        _frame_header(
            index=index,
            instance=ds,
            frame_index=0,
            frame_number=None,
            geometry=(ds, ds, ds, ds),
        )
    ]


def _enhanced_frames(index: int, ds: Dataset) -> list[_FrameHeader]:
    """Frames of an Enhanced image: each functional group per frame, else shared."""
    per_frame = ds.PerFrameFunctionalGroupsSequence
    count = number_of_frames(ds)
    if len(per_frame) != count:
        raise SeriesRefused(
            f"{_header_label(ds, index)} has NumberOfFrames {count} but "
            f"{len(per_frame)} Per-frame Functional Groups items; the instance is damaged. "
            f"{_RESEND.capitalize()}.",
            code="malformed_functional_groups",
        )
    shared_sequence = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_sequence[0] if shared_sequence else None
    frames = []
    for frame_index in range(count):
        groups = (per_frame[frame_index], shared)
        frames.append(
            _frame_header(
                index=index,
                instance=ds,
                frame_index=frame_index,
                frame_number=frame_index + 1,
                geometry=(
                    _group_item(groups, "PlanePositionSequence"),
                    _group_item(groups, "PlaneOrientationSequence"),
                    _group_item(groups, "PixelMeasuresSequence"),
                    _group_item(groups, "PixelValueTransformationSequence"),
                ),
            )
        )
    return frames


def _group_item(groups: tuple[Dataset | None, ...], keyword: str) -> Dataset | None:
    """The first item of a functional group macro, per-frame taking precedence."""
    for group in groups:
        if group is not None and group.get(keyword):
            item: Dataset = group[keyword].value[0]
            return item
    return None


def frame_macro(ds: Dataset, frame_number: int, keyword: str) -> Dataset | None:
    """The item of functional group macro ``keyword`` (e.g. PlanePositionSequence) that
    holds for frame ``frame_number`` (1-based) of an Enhanced image: per frame before
    shared, as loading reads them."""
    shared_sequence = ds.get("SharedFunctionalGroupsSequence")
    groups = (
        ds.PerFrameFunctionalGroupsSequence[frame_number - 1],
        shared_sequence[0] if shared_sequence else None,
    )
    return _group_item(groups, keyword)


def frame_rescale(ds: Dataset, frame_number: int) -> tuple[float, float]:
    """(slope, intercept) of frame ``frame_number`` (1-based) of an Enhanced image, as
    loading applied them: its Pixel Value Transformation, per frame before shared, (1, 0)
    without one. The derived-series writer encodes each frame back with them."""
    item = frame_macro(ds, frame_number, "PixelValueTransformationSequence")
    slope, intercept = _number(item, "RescaleSlope"), _number(item, "RescaleIntercept")
    return (1.0 if slope is None else slope, 0.0 if intercept is None else intercept)


def _frame_header(
    *,
    index: int,
    instance: Dataset,
    frame_index: int,
    frame_number: int | None,
    geometry: tuple[Dataset | None, Dataset | None, Dataset | None, Dataset | None],
) -> _FrameHeader:
    """Build one frame's facts; ``geometry`` holds the datasets that carry (position,
    orientation, pixel measures, rescale): the instance itself, or functional group items.
    """
    position_ds, orientation_ds, measures_ds, rescale_ds = geometry
    position = _floats(position_ds, "ImagePositionPatient", 3)
    pixel_spacing, spacing_source = _pixel_spacing(measures_ds)
    value_range = stored_range(int(instance.BitsStored), int(instance.PixelRepresentation))
    slope = _number(rescale_ds, "RescaleSlope")
    intercept = _number(rescale_ds, "RescaleIntercept")
    planned = PlannedFrame(
        source=SourceFrame(
            sop_instance_uid=_text(instance, "SOPInstanceUID"),
            sop_class_uid=_text(instance, "SOPClassUID"),
            frame_number=frame_number,
        ),
        item_index=index,
        frame_index=frame_index,
        instance_number=_instance_number(instance),
        slope=1.0 if slope is None else slope,
        intercept=0.0 if intercept is None else intercept,
        stored_range=value_range,
        invert=_text(instance, "PhotometricInterpretation").upper() == "MONOCHROME1",
    )
    return _FrameHeader(
        planned=planned,
        position=None if position is None else (position[0], position[1], position[2]),
        orientation=_floats(orientation_ds, "ImageOrientationPatient", 6),
        pixel_spacing=pixel_spacing,
        pixel_spacing_source=spacing_source,
        slice_thickness=_number(measures_ds, "SliceThickness"),
        spacing_between_slices=_number(measures_ds, "SpacingBetweenSlices"),
    )


def stored_range(bits_stored: int, pixel_representation: int) -> tuple[int, int]:
    """The values BitsStored bits can hold, two's complement when PixelRepresentation is 1
    (also what the derived-series writer encodes back into)."""
    if pixel_representation == 1:
        return -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    return 0, 2**bits_stored - 1


def _pixel_spacing(
    ds: Dataset | None,
) -> tuple[tuple[float, float] | None, PixelSpacingSource]:
    """(row spacing, column spacing) in DICOM order, and which attribute gave it."""
    keywords: tuple[Literal["PixelSpacing", "ImagerPixelSpacing"], ...] = (
        "PixelSpacing",
        "ImagerPixelSpacing",
    )
    for keyword in keywords:
        values = _floats(ds, keyword, 2)
        if values is None:
            continue
        if min(values) <= 0:
            raise _malformed(keyword, f"spacing must be positive, got {values}")
        return (values[0], values[1]), keyword
    return None, "default"


def number_of_frames(ds: Dataset) -> int:
    """Number of Frames, 1 when absent or not a number."""
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


# --------------------------------------------------------------------------- geometry


def _geometry(frames: list[_FrameHeader], modality: str, tol: Tolerances) -> _Geometry:
    if len(frames) == 1 and _is_flat_image(frames[0], modality):
        return _flat_geometry(frames[0])
    _require_positions(frames, modality)
    row, column, normal = _common_orientation(frames, tol)
    pixel_spacing, pixel_source = _common_pixel_spacing(frames)
    # Position along the normal orders the slices; InstanceNumber is never trusted.
    distances = [float(np.dot(_vec(f.position), normal)) for f in frames]
    ranks = sorted(range(len(frames)), key=distances.__getitem__)  # stable on ties
    order = tuple(frames[rank] for rank in ranks)
    along = np.array([distances[rank] for rank in ranks])
    _check_no_duplicates(order, along)
    _check_not_sheared(order, along, normal, min(pixel_spacing), tol)
    if len(order) == 1:
        slice_spacing, slice_source = _single_slice_spacing(order[0])
    else:
        _check_regular_spacing(order, along, tol)
        slice_spacing = float(along[-1] - along[0]) / (len(order) - 1)
        slice_source = "positions"
    axes = np.column_stack([row, column, normal])
    origin = _vec(order[0].position)
    return _Geometry(
        order=order,
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        spacing=(pixel_spacing[1], pixel_spacing[0], slice_spacing),
        direction=_matrix3(axes),
        is_2d=False,
        pixel_spacing_source=pixel_source,
        slice_spacing_source=slice_source,
    )


def _is_flat_image(frame: _FrameHeader, modality: str) -> bool:
    """A single projection radiograph, or one image that is not placed in the patient."""
    return (
        modality.upper() in PROJECTION_MODALITIES
        or frame.position is None
        or frame.orientation is None
    )


def _flat_geometry(frame: _FrameHeader) -> _Geometry:
    """2D images get origin 0 and identity direction: pixel spacing is all they carry."""
    row_spacing, column_spacing = frame.pixel_spacing or (1.0, 1.0)
    return _Geometry(
        order=(frame,),
        origin=(0.0, 0.0, 0.0),
        spacing=(column_spacing, row_spacing, 1.0),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        is_2d=True,
        pixel_spacing_source=frame.pixel_spacing_source,
        slice_spacing_source="default",
    )


def _require_positions(frames: list[_FrameHeader], modality: str) -> None:
    missing = [f for f in frames if f.position is None or f.orientation is None]
    if not missing:
        return
    hint = (
        f"{modality} images are projections, not slices: route each instance on its own"
        if modality.upper() in PROJECTION_MODALITIES
        else "if these are separate 2D images, route each instance on its own; otherwise "
        "ask the modality to send the image plane attributes"
    )
    raise SeriesRefused(
        f"{len(missing)} of {len(frames)} images lack ImagePositionPatient or "
        "ImageOrientationPatient (PlanePosition/PlaneOrientation for Enhanced images, "
        f"first: {missing[0].planned.label}), so a series of several images cannot be "
        f"stacked in space; {hint}.",
        code="missing_position",
    )


def _common_orientation(
    frames: list[_FrameHeader], tol: Tolerances
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Unit row, column and normal vectors shared by every frame."""
    first = np.asarray(frames[0].orientation, dtype=np.float64)
    worst, worst_frame = 0.0, frames[0]
    for frame in frames[1:]:
        difference = float(np.max(np.abs(np.asarray(frame.orientation) - first)))
        if difference > worst:
            worst, worst_frame = difference, frame
    if worst > tol.orientation:
        raise SeriesRefused(
            "the images have different ImageOrientationPatient (largest difference "
            f"{worst:.2g} between {frames[0].planned.label} and {worst_frame.planned.label}, "
            f"tolerance {tol.orientation:g}): the series mixes image planes, e.g. a "
            "localizer or a second reformat. Route only the images of one plane.",
            code="mixed_orientation",
        )
    row, column = first[:3], first[3:]
    if (
        abs(np.linalg.norm(row) - 1) > _ORTHONORMAL_TOLERANCE
        or abs(np.linalg.norm(column) - 1) > _ORTHONORMAL_TOLERANCE
        or abs(float(np.dot(row, column))) > _ORTHONORMAL_TOLERANCE
    ):
        raise _malformed(
            "ImageOrientationPatient", f"{tuple(first)} is not two orthogonal unit vectors"
        )
    row = row / np.linalg.norm(row)
    column = column / np.linalg.norm(column)
    normal = np.cross(row, column)
    return row, column, normal / np.linalg.norm(normal)


def _common_pixel_spacing(
    frames: list[_FrameHeader],
) -> tuple[tuple[float, float], PixelSpacingSource]:
    spacings = [f.pixel_spacing for f in frames]
    first = spacings[0]
    if first is None and all(s is None for s in spacings):
        return (1.0, 1.0), "default"
    for frame, spacing in zip(frames, spacings, strict=True):
        if first is None or spacing is None or not np.allclose(spacing, first, rtol=1e-4):
            raise SeriesRefused(
                f"the images have different pixel spacing ({frames[0].planned.label}: "
                f"{first}, {frame.planned.label}: {spacing}); a volume needs one grid. The "
                "series probably mixes reconstructions: route only one of them.",
                code="mixed_pixel_spacing",
            )
    assert first is not None  # the loop refused a missing spacing
    return first, frames[0].pixel_spacing_source


def _check_no_duplicates(order: tuple[_FrameHeader, ...], along: NDArray[np.float64]) -> None:
    gaps = np.diff(along)
    duplicates = np.flatnonzero(gaps <= _DUPLICATE_MM)
    if duplicates.size == 0:
        return
    first = int(duplicates[0])
    raise SeriesRefused(
        f"{duplicates.size} image(s) share a slice position with another (first: "
        f"{order[first].planned.label} and {order[first + 1].planned.label} at "
        f"{along[first]:.3f} mm along the slice normal): the series holds several images "
        "per position (echoes, phases, time points, or an instance sent twice). Split the "
        "series so that each position appears once, or route a single-phase series.",
        code="duplicate_position",
    )


def _check_not_sheared(
    order: tuple[_FrameHeader, ...],
    along: NDArray[np.float64],
    normal: NDArray[np.float64],
    pixel_spacing: float,
    tol: Tolerances,
) -> None:
    """Positions must step along the normal; sideways drift (gantry tilt) is no grid."""
    positions = np.array([_vec(f.position) for f in order])
    sideways = positions - positions[0] - np.outer(along - along[0], normal)
    drift = float(np.max(np.linalg.norm(sideways, axis=1)))
    limit = max(tol.spacing_mm, tol.shear_pixels * pixel_spacing)
    if drift > limit:
        raise SeriesRefused(
            f"the image positions drift {drift:.3g} mm sideways across the stack (limit "
            f"{limit:.3g} mm): the slices are sheared, as with CT gantry tilt, and a regular "
            "grid cannot represent them. Reconstruct the series without tilt at the "
            "modality, or resample it before sending.",
            code="sheared_stack",
        )


def _check_regular_spacing(
    order: tuple[_FrameHeader, ...], along: NDArray[np.float64], tol: Tolerances
) -> None:
    gaps = np.diff(along)
    median = float(np.median(gaps))
    allowed = max(tol.spacing_relative * median, tol.spacing_mm)
    bad = np.flatnonzero(np.abs(gaps - median) > allowed)
    if bad.size == 0:
        _check_on_one_grid(order, along)
        return
    first = int(bad[0])
    gap = float(gaps[first])
    # every wide gap counted, not only the first (20 gaps were "about 1 slice missing":
    # acceptance pass)
    missing = sum(max(round(float(gaps[i]) / median) - 1, 0) for i in bad)
    if missing >= 1:
        what, code = f"about {missing} slice(s) missing", "missing_slices"
    else:
        what, code = "uneven slice spacing", "uneven_spacing"
    raise SeriesRefused(
        f"{what}: {bad.size} gap(s) between consecutive slices differ from the median "
        f"spacing {median:.4g} mm by more than {allowed:.3g} mm (first: {gap:.4g} mm "
        f"between {order[first].planned.label} and {order[first + 1].planned.label}). "
        "Slices may be missing or the series may mix acquisitions: re-send the complete "
        "series from the PACS, or have the modality send it with even slice spacing.",
        code=code,
    )


def _check_on_one_grid(order: tuple[_FrameHeader, ...], along: NDArray[np.float64]) -> None:
    """Every slice within half a slice of its place on the volume's regular grid (first
    to last position, evenly): gaps that each pass the median check can still drift
    (30 gaps of 2.9 mm, then 29 of 3.15 mm put a slice 3.7 mm, more than a slice, off
    its grid position; found by review), and the model would see a distorted volume."""
    spacing = float(along[-1] - along[0]) / (len(along) - 1)
    grid = along[0] + spacing * np.arange(len(along))
    off = np.abs(along - grid)
    worst = int(np.argmax(off))
    if off[worst] <= 0.5 * abs(spacing):
        return
    raise SeriesRefused(
        f"uneven slice spacing: the slice positions drift from one regular grid, "
        f"{order[worst].planned.label} lies {off[worst]:.3g} mm from its place at the "
        f"mean spacing {spacing:.4g} mm (more than half a slice). The series may mix "
        "acquisitions: re-send the complete series from the PACS.",
        code="uneven_spacing",
    )


def _single_slice_spacing(frame: _FrameHeader) -> tuple[float, SliceSpacingSource]:
    """A lone slice has no neighbour to measure against: take the header's word for it."""
    if frame.slice_thickness is not None and frame.slice_thickness > 0:
        return frame.slice_thickness, "SliceThickness"
    if frame.spacing_between_slices is not None and frame.spacing_between_slices > 0:
        return frame.spacing_between_slices, "SpacingBetweenSlices"
    return 1.0, "default"


def _vec(values: Vector3 | None) -> NDArray[np.float64]:
    assert values is not None  # callers checked _require_positions
    return np.asarray(values, dtype=np.float64)


def _matrix3(axes: NDArray[np.float64]) -> Matrix3:
    a = [float(v) for v in axes.reshape(9)]
    return (a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8])


# --------------------------------------------------------------------------- pixels


def _output_dtype(frames: Sequence[PlannedFrame]) -> np.dtype[Any]:
    """Integers when rescaling cannot make fractions, else float32 (see module docstring)."""
    if any(f.slope != 1.0 or not float(f.intercept).is_integer() for f in frames):
        return np.dtype(np.float32)
    # The array holds stored values first, then stored values + intercept.
    low = min(min(f.stored_range[0], f.stored_range[0] + int(f.intercept)) for f in frames)
    high = max(max(f.stored_range[1], f.stored_range[1] + int(f.intercept)) for f in frames)
    for candidate in (np.uint8, np.int16, np.int32, np.int64):
        info = np.iinfo(candidate)
        if info.min <= low and high <= info.max:
            return np.dtype(candidate)
    return np.dtype(np.float64)


def _decode(
    plan: VolumePlan,
    items: Sequence[SeriesItem],
    headers: Sequence[Dataset],
    scratch_dir: Path | None = None,
) -> NDArray[Any]:
    """Fill one preallocated array, reading and decoding one instance at a time.

    An integer plan wider than 16 bits comes from the range BitsStored allows, not from
    the data: a signed 16-bit CT with intercept -1024 could in theory reach -33792, so
    the plan says int32, while its real values fit int16. The array therefore starts as
    int16 and is widened to the plan's type only if a frame's values do not fit; half
    the memory for such series through the whole job, the same values either way.
    """
    out = empty_volume(plan.shape, _first_try_dtype(plan.dtype), scratch_dir)
    slots: dict[int, list[tuple[int, PlannedFrame]]] = {}
    for slice_index, frame in enumerate(plan.frames):
        slots.setdefault(frame.item_index, []).append((slice_index, frame))
    for item_index, targets in sorted(slots.items()):
        targets.sort(key=lambda target: target[1].frame_index)
        first = targets[0][1]
        item = items[item_index]
        ds = _with_pixel_data(item, headers[item_index], first)
        try:
            _check_pixel_data(ds, first)
            decoded = _decoded_frames(ds, [frame.frame_index for _, frame in targets], first)
            for (slice_index, frame), pixels in zip(targets, decoded, strict=True):
                if out.dtype == plan.dtype:
                    _store(out[slice_index], pixels, frame)
                    continue
                values = np.empty(out.shape[1:], dtype=plan.dtype)
                _store(values, pixels, frame)
                if not _fits(values, out.dtype):
                    # into a new scratch map, not astype (memory): a wide series stays
                    # file-backed and paged out while the model runs
                    wider = empty_volume(plan.shape, plan.dtype, scratch_dir)
                    wider[...] = out
                    out = wider
                out[slice_index] = values
        finally:
            if not isinstance(item, Dataset):
                # our own header: keep it (the writers use it), without its pixels
                ds.pop(_PIXEL_DATA, None)
                _drop_inflated_copy(ds)
    return out


def _drop_inflated_copy(ds: Dataset) -> None:
    """A deflated file was inflated into memory by pydicom, which reads the header's
    deferred values from that copy (``ds.buffer``): read what is still deferred
    (overlays, private blobs; only top-level values are ever deferred) and let the
    copy go. Kept, it held the whole series a second time, outside the scratch map,
    for the rest of the job (found by review)."""
    if getattr(ds, "buffer", None) is None:
        return
    for tag in list(ds.keys()):
        ds[tag]  # reading it is the point: a deferred value is loaded now
    ds.buffer = None


def _first_try_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    if dtype.kind in "iu" and dtype.itemsize > 2:
        return np.dtype(np.int16)
    return dtype


def _fits(values: NDArray[Any], dtype: np.dtype[Any]) -> bool:
    info = np.iinfo(dtype)
    return values.size == 0 or (info.min <= values.min() and values.max() <= info.max)


def _with_pixel_data(item: SeriesItem, header: Dataset, frame: PlannedFrame) -> Dataset:
    """The dataset to decode: an in-memory item itself; for a file, the header read in
    pass 1, whose deferred Pixel Data pydicom now reads from the file (one seek and
    read instead of parsing the whole file a second time: 0.3 s of 300 CT slices).

    The file must be the one whose header was checked: if it was rewritten since
    (its modification time moved), the job is refused and can be retried."""
    if isinstance(item, Dataset):
        return item
    try:
        changed = os.stat(fspath(item)).st_mtime != header.timestamp
    except OSError:
        changed = True
    if changed:
        raise SeriesRefused(
            f"input item {frame.item_index} changed between reading its header and its "
            "pixel data. Retry the job once the spool is settled.",
            code="changed_during_load",
        )
    return header


def _pixel_data_length(ds: Dataset) -> int:
    """Bytes of Pixel Data, without reading a deferred value (0 when there is none)."""
    element = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    if element is None:
        return 0
    if isinstance(element, RawDataElement):
        return int(element.length)
    return len(element.value) if element.value is not None else 0


def _check_pixel_lengths(plan: VolumePlan, headers: Sequence[Dataset]) -> None:
    """Every instance's native Pixel Data is as long as its header promises.

    Why before allocating: a header that claims 8000 x 8000 pixels over a few bytes of
    data would otherwise reserve gigabytes for a series that is refused anyway.
    """
    first_frames: dict[int, PlannedFrame] = {}
    for frame in plan.frames:
        first_frames.setdefault(frame.item_index, frame)
    for item_index, frame in sorted(first_frames.items()):
        _check_pixel_data(headers[item_index], frame)


def _check_pixel_data(ds: Dataset, frame: PlannedFrame) -> None:
    """Missing or mis-sized native Pixel Data is refused before any decoder sees it."""
    actual = _pixel_data_length(ds)
    if actual == 0:
        raise SeriesRefused(
            f"{frame.label} has no Pixel Data (or only Float Pixel Data, which is not "
            f"supported). {_RESEND.capitalize()}, or route the series elsewhere.",
            code="missing_pixel_data",
        )
    transfer_syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if transfer_syntax is not None and transfer_syntax.is_encapsulated:
        return  # compressed: the decoder checks the frames it finds
    expected = get_expected_length(ds, "bytes")
    if actual not in (expected, expected + expected % 2):
        raise SeriesRefused(
            f"{frame.label} has {actual} bytes of Pixel Data where Rows, Columns, "
            f"BitsAllocated and NumberOfFrames promise {expected}: the instance is truncated "
            f"or its header is wrong. {_RESEND.capitalize()}.",
            code="wrong_pixel_data_length",
        )


def _decoded_frames(ds: Dataset, indices: list[int], frame: PlannedFrame) -> Iterator[NDArray[Any]]:
    """Frames in ``indices`` order; any decoder failure becomes a refusal."""
    native = _native_frame(ds, indices)
    if native is not None:
        yield native
        return
    # correct_unused_bits: clear (or sign-extend over) bits above BitsStored, as DICOM
    # says they hold no pixel value; it also keeps values inside the chosen dtype.
    frames = iter_pixels(ds, indices=indices, correct_unused_bits=True)
    while True:
        try:
            pixels = next(frames)
        except StopIteration:
            return
        except Exception as exc:  # decoders raise many types on corrupt data
            raise SeriesRefused(
                f"pixel data could not be decoded: {frame.label}: {type(exc).__name__}: "
                f"{exc}. The data may be corrupt or use a transfer syntax this node cannot "
                f"decode; {_RESEND} or ask for an uncompressed transfer syntax.",
                code="undecodable_pixel_data",
            ) from exc
        yield pixels


#: Uncompressed little-endian syntaxes whose Pixel Data is the pixels as they are.
_NATIVE_SYNTAXES = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)
_NATIVE_DTYPES = {(8, 0): "u1", (8, 1): "i1", (16, 0): "<u2", (16, 1): "<i2"}


def _native_frame(ds: Dataset, indices: list[int]) -> NDArray[Any] | None:
    """The one frame of a single-frame, uncompressed, 8/16-bit greyscale instance, read
    straight from its Pixel Data; None for anything else (pydicom decodes those).

    Why: pydicom's pixel pipeline costs about 1 ms a frame in Python around a copy
    that takes a tenth of that; for the common CT/MR case this is the same array
    (bits above BitsStored cleared or sign-extended, as ``correct_unused_bits`` does;
    ``tests/test_volume.py`` compares both), a third of the series' decoding time."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if indices != [0] or syntax not in _NATIVE_SYNTAXES:
        return None
    if int(ds.get("SamplesPerPixel") or 1) != 1 or int(ds.get("NumberOfFrames") or 1) != 1:
        return None
    allocated, stored = int(ds.BitsAllocated), int(ds.get("BitsStored") or ds.BitsAllocated)
    dtype = _NATIVE_DTYPES.get((allocated, int(ds.get("PixelRepresentation") or 0)))
    rows, columns = int(ds.Rows), int(ds.Columns)
    if dtype is None or not 0 < stored <= allocated:
        return None
    pixels = np.frombuffer(ds.PixelData, dtype=dtype, count=rows * columns)
    pixels = pixels.reshape(rows, columns)
    unused = allocated - stored
    if unused and pixels.dtype.kind == "i":
        pixels = (pixels << unused) >> unused  # sign-extend from BitsStored
    elif unused:
        pixels = pixels & ((1 << stored) - 1)
    return pixels


def _store(target: NDArray[Any], pixels: NDArray[Any], frame: PlannedFrame) -> None:
    """Copy one decoded frame into its slice: invert MONOCHROME1, then rescale, in place."""
    if pixels.shape != target.shape:
        raise SeriesRefused(
            f"{frame.label} decoded to shape {pixels.shape}, not {target.shape} as its "
            f"header says. {_RESEND.capitalize()}.",
            code="wrong_pixel_data_length",
        )
    target[...] = pixels
    if frame.invert:
        low, high = frame.stored_range
        np.subtract(low + high, target, out=target)
    if frame.slope != 1.0:
        target *= frame.slope
    if frame.intercept != 0.0:
        target += frame.intercept if target.dtype.kind == "f" else int(frame.intercept)
