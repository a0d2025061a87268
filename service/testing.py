"""Synthetic DICOM data: a CT abdomen phantom series and a chest radiograph phantom.

Tests and benchmarks need DICOM that looks like what a PACS sends — full-size 16-bit
CT series with consistent geometry, projection radiographs with the attributes that
routing and pipelines look at — but real studies carry protected health information
and public sample sets would have to be downloaded. This module draws such data from
simple geometric phantoms instead: no PHI, no network, deterministic for a given seed,
and fast enough (a 300-slice 512x512 series in a few seconds) to generate per test run.

The objects are valid instances of their IODs (``dciodvfy`` reports no errors):

* :func:`make_ct_phantom` / :func:`write_ct_phantom` — a randomised adult abdomen
  (sizes in mm) with its label map: liver, spleen and kidneys. The reference CT models
  were trained on it, and ``python -m service.testing ct`` writes it.
* :func:`make_ct_series` / :func:`write_ct_series` — CT Image Storage. Air outside an
  elliptic body of fat and soft tissue, with liver (patient right), spleen, kidneys,
  aorta and a vertebral column with discs; organs are ellipsoids, so their sections
  change from slice to slice. Values are Hounsfield units stored with intercept -1024.
  The phantom is scaled to the imaged box, so small test images still show every organ;
  at the default size (512x512 at 0.7 mm, 300 slices of 1.25 mm) its sizes are adult.
  Written a slice at a time, for tests and benchmarks of size and speed; the reference
  CT model does not know its anatomy.
* :func:`make_radiograph` / :func:`write_radiograph` — Digital X-Ray (for presentation)
  or Computed Radiography: a PA chest with lung fields, heart and mediastinum, spine,
  ribs and, on request, a round nodule in a lung field.

Run ``python -m service.testing --help`` to write either to disk.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

if TYPE_CHECKING:
    from service.pipeline.volume import Volume

__all__ = [
    "CT_PHANTOM_LABELS",
    "CTPhantom",
    "Orientation",
    "cli_ct_phantom",
    "iter_ct_series",
    "make_ct_phantom",
    "make_ct_series",
    "make_enhanced_ct",
    "make_radiograph",
    "organ_volumes_ml",
    "phantom_volume",
    "write_ct_phantom",
    "write_ct_series",
    "write_radiograph",
]

Orientation = Literal["axial", "coronal", "sagittal"]

# Fixed dates and times keep the output deterministic (same seed and UIDs, same bytes).
_STUDY_DATE = "20250101"
_STUDY_TIME = "093000"
_BIRTH_DATE = "19700101"

_UNCOMPRESSED = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)

# Row and column direction cosines (LPS patient coordinates) of each orientation.
_ORIENTATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}


# ---------------------------------------------------------------------------------------
# Modules shared by every object: Patient, General Study, General Series, Equipment, SOP
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Study:
    """The patient and study that all instances of one call belong to."""

    patient_name: str
    patient_id: str
    study_uid: str
    accession_number: str
    study_description: str


def _add_patient_and_study(ds: Dataset, study: _Study) -> None:
    """Patient and General Study modules."""
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = _BIRTH_DATE
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = _STUDY_DATE
    ds.StudyTime = _STUDY_TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = study.accession_number
    ds.StudyDescription = study.study_description


def _add_series(
    ds: Dataset, *, modality: str, series_uid: str, description: str, body_part: str
) -> None:
    """General Series module (and the Body Part Examined that routing rules match)."""
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDate = _STUDY_DATE
    ds.SeriesTime = _STUDY_TIME
    ds.SeriesDescription = description
    ds.BodyPartExamined = body_part


def _add_equipment(ds: Dataset) -> None:
    """General Equipment module: says plainly that no real device made this."""
    ds.Manufacturer = "radnode test phantoms"  # not "radnode": routable
    ds.ManufacturerModelName = "synthetic phantom"
    ds.StationName = "RADNODE-SIM"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "radnode service.testing"


def _add_sop_common(ds: Dataset, sop_class: str, sop_instance: str) -> None:
    """SOP Common module plus the file meta information of a Part 10 file."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.InstanceCreationDate = _STUDY_DATE
    ds.InstanceCreationTime = _STUDY_TIME
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta


def _add_content_time(ds: Dataset) -> None:
    """Content and acquisition date/time (General Image, General Acquisition)."""
    ds.ContentDate = _STUDY_DATE
    ds.ContentTime = _STUDY_TIME
    ds.AcquisitionDate = _STUDY_DATE
    ds.AcquisitionTime = _STUDY_TIME


def _add_pixels(ds: Dataset, pixels: np.ndarray, *, bits_stored: int, photometric: str) -> None:
    """Image Pixel module for one-sample, 16-bit-allocated, native pixel data."""
    rows, columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OW"


def _save(ds: Dataset, path: Path, transfer_syntax: str) -> Path:
    """Write ``ds`` as a Part 10 file in ``transfer_syntax``.

    The uncompressed syntaxes (implicit, explicit, deflated) only change the file meta;
    any other syntax is compressed with pydicom's encoders (RLE Lossless always works,
    JPEG 2000 Lossless with pylibjpeg-openjpeg), which raise if none is available.
    """
    ts = UID(transfer_syntax)
    if ts in _UNCOMPRESSED:
        ds.file_meta.TransferSyntaxUID = ts
    else:
        ds.compress(ts, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------------------------------
# CT phantom
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ellipsoid:
    """An axis-aligned ellipsoid in normalised patient coordinates, filled with ``hu``.

    Coordinates run from -1 to 1 across the imaged box along x (patient left), y
    (posterior) and z (head). An infinite radius makes an elliptic cylinder.
    """

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    hu: float


_INF = math.inf


def _phantom() -> tuple[_Ellipsoid, ...]:
    """The abdomen, in painting order (later shapes cover earlier ones)."""
    shapes = [
        _Ellipsoid((0.0, 0.02, 0.0), (0.88, 0.62, _INF), -100.0),  # subcutaneous fat
        _Ellipsoid((0.0, 0.02, 0.0), (0.79, 0.53, _INF), 40.0),  # muscle and viscera
        _Ellipsoid((-0.36, -0.04, 0.30), (0.36, 0.33, 0.50), 60.0),  # liver (patient right)
        _Ellipsoid((0.50, 0.16, 0.38), (0.15, 0.17, 0.28), 50.0),  # spleen
        _Ellipsoid((-0.27, 0.27, -0.12), (0.10, 0.12, 0.30), 32.0),  # right kidney
        _Ellipsoid((0.27, 0.27, -0.04), (0.10, 0.12, 0.30), 32.0),  # left kidney
        _Ellipsoid((-0.27, 0.29, -0.12), (0.04, 0.05, 0.14), -60.0),  # right renal sinus
        _Ellipsoid((0.27, 0.29, -0.04), (0.04, 0.05, 0.14), -60.0),  # left renal sinus
        _Ellipsoid((0.06, 0.15, 0.0), (0.05, 0.05, _INF), 45.0),  # aorta
        _Ellipsoid((-0.07, 0.16, 0.0), (0.045, 0.04, _INF), 40.0),  # inferior vena cava
        _Ellipsoid((0.0, 0.33, 0.0), (0.09, 0.10, _INF), 700.0),  # vertebral bodies
    ]
    # Intervertebral discs: about one every 32 mm at the default series length.
    shapes += [
        _Ellipsoid((0.0, 0.33, -0.915 + 0.17 * k), (0.085, 0.095, 0.025), 80.0) for k in range(11)
    ]
    shapes += [
        _Ellipsoid((0.0, 0.465, 0.0), (0.035, 0.035, _INF), 15.0),  # spinal canal
        _Ellipsoid((0.0, 0.54, 0.0), (0.022, 0.05, _INF), 700.0),  # spinous processes
    ]
    return tuple(shapes)


_PHANTOM = _phantom()
_CT_NOISE_HU = 10.0
_CT_INTERCEPT = -1024


@dataclass(frozen=True)
class _CTGeometry:
    """Where every voxel of the series lies in patient space (LPS, mm)."""

    rows: int
    columns: int
    slices: int
    row_spacing: float  # between rows, along the column direction (PixelSpacing[0])
    column_spacing: float  # between columns, along the row direction (PixelSpacing[1])
    slice_spacing: float
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    origin: np.ndarray  # ImagePositionPatient of the first slice

    @classmethod
    def build(
        cls,
        *,
        rows: int,
        columns: int,
        slices: int,
        pixel_spacing: Sequence[float],
        slice_spacing: float,
        orientation: str,
    ) -> _CTGeometry:
        if orientation not in _ORIENTATIONS:
            raise ValueError(f"orientation must be one of {sorted(_ORIENTATIONS)}")
        if min(rows, columns, slices) < 1:
            raise ValueError("rows, columns and slices must be positive")
        row_dir, col_dir = (np.array(v) for v in _ORIENTATIONS[orientation])
        normal = np.cross(row_dir, col_dir)
        dr, dc = float(pixel_spacing[0]), float(pixel_spacing[1])
        # Centre the imaged box on the patient-space origin.
        origin = -(
            (columns - 1) / 2 * dc * row_dir
            + (rows - 1) / 2 * dr * col_dir
            + (slices - 1) / 2 * slice_spacing * normal
        )
        return cls(rows, columns, slices, dr, dc, slice_spacing, row_dir, col_dir, normal, origin)

    def position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k`` (0-based)."""
        return self.origin + k * self.slice_spacing * self.normal

    def normalised_axes(self, k: int) -> list[tuple[int | None, np.ndarray | float]]:
        """Normalised patient coordinates of slice ``k``, one entry per x, y, z.

        Each entry is ``(image_axis, values)``: axis 0 means the values vary down the
        rows (shape ``(rows,)``), axis 1 across the columns (shape ``(columns,)``), and
        ``None`` a single value for the whole slice (the axis along the normal).
        """
        position = self.position(k)
        axes: list[tuple[int | None, np.ndarray | float]] = []
        for a in range(3):
            if self.row_dir[a]:
                steps = np.arange(self.columns) * self.column_spacing * self.row_dir[a]
                half = self.columns * self.column_spacing / 2
                axes.append((1, (position[a] + steps) / half))
            elif self.col_dir[a]:
                steps = np.arange(self.rows) * self.row_spacing * self.col_dir[a]
                half = self.rows * self.row_spacing / 2
                axes.append((0, (position[a] + steps) / half))
            else:
                half = self.slices * self.slice_spacing / 2
                axes.append((None, float(position[a]) / half))
        return axes


def _paint(
    image: np.ndarray, shape: _Ellipsoid, axes: list[tuple[int | None, np.ndarray | float]]
) -> None:
    """Set the pixels of ``image`` inside ``shape`` to its HU value.

    The ellipsoid inequality is separable for axis-aligned planes: a per-row term plus a
    per-column term plus a constant. Only the bounding box is ever touched.
    """
    rows, columns = image.shape
    per_row = np.zeros(rows)
    per_column = np.zeros(columns)
    constant = 0.0
    for (image_axis, values), c, r in zip(axes, shape.center, shape.radii, strict=True):
        if math.isinf(r):
            continue
        term = ((values - c) / r) ** 2
        if image_axis is None:
            constant += float(term)
        elif image_axis == 0:
            per_row += term
        else:
            per_column += term
    inside_rows = np.flatnonzero(per_row + constant <= 1.0)
    inside_columns = np.flatnonzero(per_column + constant <= 1.0)
    if inside_rows.size == 0 or inside_columns.size == 0:
        return
    r0, r1 = inside_rows[0], inside_rows[-1] + 1
    c0, c1 = inside_columns[0], inside_columns[-1] + 1
    mask = per_row[r0:r1, None] + per_column[None, c0:c1] + constant <= 1.0
    image[r0:r1, c0:c1][mask] = shape.hu


def _ct_hu_slice(geometry: _CTGeometry, k: int, rng: np.random.Generator) -> np.ndarray:
    """Hounsfield units of slice ``k``: the phantom plus gaussian noise (float32)."""
    image = np.full((geometry.rows, geometry.columns), -1000.0, dtype=np.float32)
    axes = geometry.normalised_axes(k)
    for shape in _PHANTOM:
        _paint(image, shape, axes)
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(_CT_NOISE_HU)
    return image


def _ct_stored_values(hu: np.ndarray) -> np.ndarray:
    """Stored int16 values for intercept -1024, slope 1 (HU clipped to -1024..3071)."""
    return np.rint(np.clip(hu, -1024.0, 3071.0) - _CT_INTERCEPT).astype(np.int16)


def _format_ds(value: float) -> str:
    """A DS value: plain decimal, at most 16 characters, no ``-0``."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def iter_ct_series(
    *,
    slices: int = 300,
    rows: int = 512,
    columns: int = 512,
    pixel_spacing: tuple[float, float] = (0.7, 0.7),
    slice_thickness: float = 1.25,
    spacing_between_slices: float | None = None,
    orientation: Orientation = "axial",
    patient_name: str = "PHANTOM^CT",
    patient_id: str = "RADNODE-PHANTOM-0001",
    accession_number: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_description: str = "CT ABDOMEN PHANTOM",
    body_part: str = "ABDOMEN",
    seed: int = 0,
    volume: np.ndarray | None = None,
) -> Iterator[Dataset]:
    """Yield the slices of :func:`make_ct_series` one at a time (same arguments).

    Only one slice is in memory at a time, which keeps long series cheap to write.
    """
    if volume is not None:
        if volume.ndim != 3:
            raise ValueError("volume must be (slices, rows, columns) in HU")
        slices, rows, columns = (int(n) for n in volume.shape)
    spacing = slice_thickness if spacing_between_slices is None else spacing_between_slices
    geometry = _CTGeometry.build(
        rows=rows,
        columns=columns,
        slices=slices,
        pixel_spacing=pixel_spacing,
        slice_spacing=spacing,
        orientation=orientation,
    )
    study = _Study(
        patient_name=patient_name,
        patient_id=patient_id,
        study_uid=study_uid or generate_uid(),
        accession_number=accession_number,
        study_description="CT ABDOMEN",
    )
    series_uid = series_uid or generate_uid()
    # Derived from the series UID: given UIDs and seed, the output is byte-identical.
    frame_of_reference_uid = generate_uid(entropy_srcs=[series_uid, "frame-of-reference"])
    image_type = (
        ["ORIGINAL", "PRIMARY", "AXIAL"]
        if orientation == "axial"
        else ["DERIVED", "SECONDARY", "REFORMATTED"]
    )
    iop = [_format_ds(v) for v in (*geometry.row_dir, *geometry.col_dir)]
    rng = np.random.default_rng(seed)

    for k in range(slices):
        ds = Dataset()
        _add_sop_common(ds, CTImageStorage, generate_uid(entropy_srcs=[series_uid, str(k)]))
        _add_patient_and_study(ds, study)
        _add_series(
            ds,
            modality="CT",
            series_uid=series_uid,
            description=series_description,
            body_part=body_part,
        )
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        _add_equipment(ds)
        # General Image and General Acquisition
        ds.ImageType = image_type
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        _add_content_time(ds)
        if orientation != "axial":
            ds.DerivationDescription = "synthetic multiplanar reformat"
        # Image Plane
        position = geometry.position(k)
        ds.ImagePositionPatient = [_format_ds(v) for v in position]
        ds.ImageOrientationPatient = iop
        ds.PixelSpacing = [_format_ds(geometry.row_spacing), _format_ds(geometry.column_spacing)]
        ds.SliceThickness = _format_ds(slice_thickness)
        ds.SpacingBetweenSlices = _format_ds(spacing)
        ds.SliceLocation = _format_ds(float(position @ geometry.normal))
        # CT Image
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = _format_ds(
            max(rows * geometry.row_spacing, columns * geometry.column_spacing)
        )
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "150"
        ds.RotationDirection = "CW"
        ds.ExposureTime = "500"
        ds.XRayTubeCurrent = 200
        ds.Exposure = 100
        ds.ConvolutionKernel = "STANDARD"
        ds.RescaleIntercept = str(_CT_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        # VOI LUT: a soft-tissue window
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        _add_pixels(
            ds,
            _ct_stored_values(_ct_hu_slice(geometry, k, rng) if volume is None else volume[k]),
            bits_stored=16,
            photometric="MONOCHROME2",
        )
        yield ds


def make_ct_series(
    *,
    slices: int = 300,
    rows: int = 512,
    columns: int = 512,
    pixel_spacing: tuple[float, float] = (0.7, 0.7),
    slice_thickness: float = 1.25,
    spacing_between_slices: float | None = None,
    orientation: Orientation = "axial",
    patient_name: str = "PHANTOM^CT",
    patient_id: str = "RADNODE-PHANTOM-0001",
    accession_number: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_description: str = "CT ABDOMEN PHANTOM",
    body_part: str = "ABDOMEN",
    seed: int = 0,
    volume: np.ndarray | None = None,
) -> list[Dataset]:
    """Return a CT abdomen phantom series as CT Image Storage datasets, in slice order.

    Slice ``k`` lies at ``ImagePositionPatient = origin + k * spacing * normal``, where
    the normal is the cross product of the row and column directions of
    ``orientation`` and ``spacing`` is ``spacing_between_slices`` (default: the slice
    thickness); the imaged box is centred on the patient-space origin. Pixel values are
    signed 16-bit, HU = stored - 1024. The pixel noise is drawn from ``seed``; UIDs not
    given are generated, and SOP Instance and Frame of Reference UIDs are derived from
    the series UID, so fixed UIDs and seed give identical datasets.

    ``volume`` (HU, shape (slices, rows, columns) of the series in ``orientation``,
    e.g. :attr:`CTPhantom.hu` for an axial one) replaces the fixed phantom: the series
    then has its shape and ``seed`` is unused.
    """
    return list(
        iter_ct_series(
            slices=slices,
            rows=rows,
            columns=columns,
            pixel_spacing=pixel_spacing,
            slice_thickness=slice_thickness,
            spacing_between_slices=spacing_between_slices,
            orientation=orientation,
            patient_name=patient_name,
            patient_id=patient_id,
            accession_number=accession_number,
            study_uid=study_uid,
            series_uid=series_uid,
            series_description=series_description,
            body_part=body_part,
            seed=seed,
            volume=volume,
        )
    )


def write_ct_series(
    out_dir: Path | str,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **kwargs: object,
) -> list[Path]:
    """Write :func:`make_ct_series` ``(**kwargs)`` to ``out_dir`` as Part 10 files.

    Files are named ``CT000001.dcm``, ``CT000002.dcm``, … in slice order, and their
    paths are returned in that order. ``transfer_syntax`` is Explicit VR Little Endian
    by default; Implicit VR Little Endian, Deflated Explicit VR Little Endian and RLE
    Lossless (or any other syntax pydicom can encode here) are accepted.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        _save(ds, out / f"CT{k + 1:06d}.dcm", transfer_syntax)
        for k, ds in enumerate(iter_ct_series(**kwargs))  # type: ignore[arg-type]
    ]


def make_enhanced_ct(
    series: Sequence[Dataset],
    *,
    frame_order: Sequence[int] | None = None,
    intercepts: Sequence[float] | None = None,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """``series`` (CT Image Storage slices) as one Enhanced CT instance, as a scanner that
    sends multi-frame images would: highdicom's Legacy Converted Enhanced CT Image.

    The converter stores frames head first. ``frame_order`` rearranges them (frame
    ``f`` of the result is the converter's frame ``frame_order[f]``), so readers cannot
    rely on any order. ``intercepts`` gives each frame (in the result's order) its own
    Pixel Value Transformation, the stored values shifted to keep the same HU, as an
    Enhanced image may. Body Part Examined moves into the Frame Anatomy code, as
    conversion does. Pixel data stays native (Explicit VR Little Endian).
    """
    import highdicom as hd

    first = series[0]
    ds = hd.legacy.LegacyConvertedEnhancedCTImage(
        list(series),
        series_instance_uid=str(first.SeriesInstanceUID),
        series_number=int(first.get("SeriesNumber") or 1),
        sop_instance_uid=sop_instance_uid
        or generate_uid(entropy_srcs=[str(first.SeriesInstanceUID), "enhanced"]),
        instance_number=1,
    )
    frames = ds.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns))
    dtype = frames.dtype
    order = list(range(len(frames))) if frame_order is None else list(frame_order)
    if sorted(order) != list(range(len(frames))):
        raise ValueError(f"frame_order must be a permutation of 0..{len(frames) - 1}")
    per_frame = list(ds.PerFrameFunctionalGroupsSequence)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence([per_frame[i] for i in order])
    frames = frames[order]
    if intercepts is not None:
        shared = ds.SharedFunctionalGroupsSequence[0]
        common = float(shared.PixelValueTransformationSequence[0].RescaleIntercept)
        del shared.PixelValueTransformationSequence
        frames = frames.astype(np.int32)
        for f, (group, intercept) in enumerate(
            zip(ds.PerFrameFunctionalGroupsSequence, intercepts, strict=True)
        ):
            transformation = Dataset()
            transformation.RescaleIntercept = _format_ds(intercept)
            transformation.RescaleSlope = "1"
            transformation.RescaleType = "HU"
            group.PixelValueTransformationSequence = DicomSequence([transformation])
            frames[f] += round(common - intercept)
        frames = frames.astype(dtype)
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    return ds


# ---------------------------------------------------------------------------------------
# Randomised, labelled CT phantom (training and evaluation data for the reference models)
# ---------------------------------------------------------------------------------------

#: Label values of :attr:`CTPhantom.labels`; 0 is everything else.
CT_PHANTOM_LABELS: dict[int, str] = {
    1: "liver",
    2: "spleen",
    3: "right kidney",
    4: "left kidney",
}

# Half-extents (mm) of the default series' box: the fixed phantom's normalised units.
_HALF_BOX_MM = (179.2, 179.2, 187.5)


@dataclass(frozen=True, eq=False)
class CTPhantom:
    """One randomised abdomen: HU volume, label map and the voxel spacing.

    ``hu`` and ``labels`` are indexed ``[slice, row, column]`` (z, y, x) like
    :attr:`service.pipeline.volume.Volume.array`; slice ``k`` of an axial series lies
    at z = ``(k - (slices - 1) / 2) * spacing[2]`` mm, the box centred on the origin as
    in :func:`make_ct_series`. ``spacing`` is (x=column, y=row, z=slice) in mm.
    ``labels`` uses :data:`CT_PHANTOM_LABELS`. ``clean`` is ``hu`` before the noise.
    """

    hu: np.ndarray
    labels: np.ndarray
    clean: np.ndarray
    spacing: tuple[float, float, float]


@dataclass(frozen=True)
class _Organ:
    """A rotated ellipsoid in mm; ``label`` goes into the label map where it is painted."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    hu: float
    label: int = 0
    angle: float = 0.0  # rotation about z, radians


def _random_abdomen(rng: np.random.Generator) -> list[_Organ]:
    """The fixed phantom's shapes in mm, each jittered: size, place, turn, contrast."""
    hx, hy, hz = _HALF_BOX_MM
    body = (rng.uniform(0.85, 1.12), rng.uniform(0.82, 1.15), rng.uniform(0.88, 1.12))

    def mm(center: Sequence[float], radii: Sequence[float]) -> tuple[tuple, tuple]:
        c = (center[0] * hx * body[0], center[1] * hy * body[1], center[2] * hz * body[2])
        r = (radii[0] * hx * body[0], radii[1] * hy * body[1], radii[2] * hz * body[2])
        return c, r

    def organ(center, radii, hu, label=0, move=0.0, grow=0.0, turn=0.0) -> _Organ:
        c, r = mm(center, radii)
        c = tuple(v + rng.normal(0.0, move) for v in c)
        r = tuple(v * rng.uniform(1.0 - grow, 1.0 + grow) for v in r)
        return _Organ(c, r, hu, label, rng.uniform(-turn, turn))  # type: ignore[arg-type]

    fat = rng.uniform(0.05, 0.16)  # subcutaneous fat thickness, fraction of the body
    shapes = [
        organ((0.0, 0.02, 0.0), (0.88, 0.62, _INF), rng.uniform(-115, -85)),
        organ((0.0, 0.02, 0.0), (0.88 - fat, 0.62 - 0.9 * fat, _INF), rng.uniform(35, 45)),
    ]
    # Bowel loops and gas, under the solid organs.
    for _ in range(int(rng.integers(3, 8))):
        gas = rng.random() < 0.35
        shapes.append(
            organ(
                (rng.uniform(-0.45, 0.45), rng.uniform(-0.40, 0.05), rng.uniform(-0.8, 0.4)),
                (rng.uniform(0.04, 0.10), rng.uniform(0.03, 0.08), rng.uniform(0.05, 0.15)),
                rng.uniform(-950, -700) if gas else rng.uniform(10, 35),
                turn=math.pi,
            )
        )
    liver_hu = rng.uniform(55, 65)
    kidney_hu = rng.uniform(28, 36)
    solid = [
        organ((-0.36, -0.04, 0.30), (0.36, 0.33, 0.50), liver_hu, 1, 8.0, 0.15, 0.35),
        # left lobe: reaches across the midline, size varies a lot
        organ((-0.05, -0.20, 0.40), (0.22, 0.13, 0.22), liver_hu, 1, 10.0, 0.35, 0.4),
        organ((0.50, 0.16, 0.38), (0.15, 0.17, 0.28), rng.uniform(45, 52), 2, 8.0, 0.25, 0.6),
        organ((-0.27, 0.27, -0.12), (0.10, 0.12, 0.30), kidney_hu, 3, 6.0, 0.15, 0.4),
        organ((0.27, 0.27, -0.04), (0.10, 0.12, 0.30), kidney_hu, 4, 6.0, 0.15, 0.4),
    ]
    # Perirenal fat (thicker in heavier patients) and a thin perisplenic rim: painted
    # under the organs, so the liver, the aorta and the spine still touch them.
    fat_hu = shapes[0].hu + rng.uniform(-10, 10)
    perirenal = rng.uniform(3.0, 8.0) + 60.0 * fat
    perisplenic = rng.uniform(1.5, 5.0)
    shapes += [
        _Organ(o.center, tuple(r + pad for r in o.radii), fat_hu, 0, o.angle)  # type: ignore[arg-type]
        for o, pad in ((solid[2], perisplenic), (solid[3], perirenal), (solid[4], perirenal))
    ]
    shapes += solid
    # Renal sinus fat inside each kidney (not kidney: label 0).
    for kidney in shapes[-2:]:
        r = kidney.radii
        shapes.append(
            _Organ(
                (kidney.center[0] * 0.96, kidney.center[1] + 0.2 * r[1], kidney.center[2]),
                (0.4 * r[0], 0.42 * r[1], 0.47 * r[2]),
                -60.0,
                0,
                kidney.angle,
            )
        )
    shapes += [
        organ((0.06, 0.15, 0.0), (0.05, 0.05, _INF), rng.uniform(40, 50), move=3.0),  # aorta
        organ((-0.07, 0.16, 0.0), (0.045, 0.04, _INF), 40.0, move=3.0),  # IVC
        organ((0.0, 0.33, 0.0), (0.09, 0.10, _INF), rng.uniform(600, 800)),  # vertebrae
    ]
    spine = shapes[-1]
    step = 0.17 * hz * body[2]
    phase = rng.uniform(0, step)
    shapes += [
        _Organ(
            (spine.center[0], spine.center[1], -1.2 * hz + phase + step * k),
            (spine.radii[0] * 0.94, spine.radii[1] * 0.95, 0.025 * hz),
            80.0,
        )
        for k in range(16)
    ]
    shapes += [
        _Organ(
            (spine.center[0], spine.center[1] + 0.135 * hy * body[1], 0.0),
            (0.035 * hx, 0.035 * hy, _INF),
            15.0,
        ),
        _Organ(
            (spine.center[0], spine.center[1] + 0.21 * hy * body[1], 0.0),
            (0.022 * hx, 0.05 * hy, _INF),
            rng.uniform(600, 800),
        ),
    ]
    return shapes


@dataclass(frozen=True)
class _Warp:
    """A smooth bending of space: per axis, a few long sine waves of the coordinates.

    Drawn once and applied to blocks of slices, so a large phantom never needs its
    whole coordinate grid in memory (a 300 x 512 x 512 one took about 4 GB at once).
    """

    #: per axis (x, y, z): (wave vector, amplitude in mm, phase) of each wave
    waves: tuple[tuple[tuple[np.ndarray, np.float32, float], ...], ...]

    @classmethod
    def draw(cls, rng: np.random.Generator, amplitude: float) -> _Warp:
        """Draw the waves; the order of draws is fixed, so a seed keeps its phantom."""
        axes = []
        for _axis in range(3):
            waves = []
            for _ in range(3):
                k = rng.normal(0.0, 1.0, 3)
                k *= 2 * math.pi / rng.uniform(150.0, 350.0) / np.linalg.norm(k)
                scale = np.float32(amplitude / 3 * rng.uniform(0.5, 1.5))
                waves.append((k, scale, rng.uniform(0, 2 * math.pi)))
            axes.append(tuple(waves))
        return cls(tuple(axes))

    def apply(
        self, x: np.ndarray, y: np.ndarray, z: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Coordinates displaced by the waves: organs bend instead of staying ellipsoids."""
        out = [x, y, z]
        for axis, waves in enumerate(self.waves):
            shift = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.float32)
            for k, scale, phase in waves:
                shift += scale * np.sin((k[0] * x + k[1] * y + k[2] * z + phase).astype(np.float32))
            out[axis] = out[axis] + shift
        return out[0], out[1], out[2]


#: Voxels painted at a time by :func:`make_ct_phantom` (bounds its working memory).
_PHANTOM_BLOCK_VOXELS = 2_000_000


def _paint_organs(
    clean: np.ndarray,
    labels: np.ndarray,
    shapes: Sequence[_Organ],
    coordinates: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """Paint ``shapes`` in order into a block of slices, given each voxel's (x, y, z) mm."""
    xx, yy, zz = coordinates
    for shape in shapes:
        cos, sin = math.cos(shape.angle), math.sin(shape.angle)
        dx, dy, dz = xx - shape.center[0], yy - shape.center[1], zz - shape.center[2]
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        inside = (u / shape.radii[0]) ** 2 + (v / shape.radii[1]) ** 2
        if not math.isinf(shape.radii[2]):
            inside += (dz / shape.radii[2]) ** 2
        mask = inside <= 1.0
        clean[mask] = shape.hu
        labels[mask] = shape.label


def make_ct_phantom(
    *,
    seed: int = 0,
    rows: int = 128,
    columns: int | None = None,
    pixel_spacing: float | None = None,
    slice_spacing: float | None = None,
    slices: int | None = None,
    noise_hu: float = 10.0,
) -> CTPhantom:
    """A randomised abdominal CT phantom with its label map (liver, spleen, kidneys).

    Everything not given is drawn from ``seed``: the anatomy (body habitus, fat
    thickness, perirenal fat that grows with it, a thin perisplenic fat rim, organ
    sizes, positions, turns, a smooth bending of the whole abdomen,
    bowel loops and gas, HU of each tissue), the field of view (340-440 mm, so
    ``pixel_spacing`` = FOV / ``rows``), the slice spacing (2-5 mm), the scanned
    length (200-380 mm, so ``slices``) and where along the body the scan starts.
    Sizes are adult, in millimetres, so the phantom does not scale with the image as
    :func:`make_ct_series` does. Gaussian noise of ``noise_hu`` is added to ``hu``
    (``clean`` has none). Write it as a DICOM series with :func:`write_ct_phantom`.
    It is built a few slices at a time: memory is the three volumes it returns
    (9 bytes a voxel) plus a small working block, whatever the size.
    """
    rng = np.random.default_rng(seed)
    columns = rows if columns is None else columns
    if pixel_spacing is None:
        pixel_spacing = rng.uniform(340.0, 440.0) / max(rows, columns)
    if slice_spacing is None:
        slice_spacing = rng.uniform(2.0, 5.0)
    if slices is None:
        slices = max(8, round(rng.uniform(200.0, 380.0) / slice_spacing))
    z_offset = rng.uniform(-70.0, 70.0)  # where the scan is centred on the anatomy
    shapes = _random_abdomen(rng)

    x = ((np.arange(columns) - (columns - 1) / 2) * pixel_spacing).astype(np.float32)
    y = ((np.arange(rows) - (rows - 1) / 2) * pixel_spacing).astype(np.float32)
    z = ((np.arange(slices) - (slices - 1) / 2) * slice_spacing + z_offset).astype(np.float32)
    warp = _Warp.draw(rng, amplitude=rng.uniform(4.0, 14.0))

    clean = np.full((slices, rows, columns), -1000.0, dtype=np.float32)
    labels = np.zeros((slices, rows, columns), dtype=np.uint8)
    hu = np.empty_like(clean)
    block = max(1, _PHANTOM_BLOCK_VOXELS // (rows * columns))
    for z0 in range(0, slices, block):
        part = slice(z0, min(z0 + block, slices))
        zz, yy, xx = np.meshgrid(z[part], y, x, indexing="ij")
        _paint_organs(clean[part], labels[part], shapes, warp.apply(xx, yy, zz))
        # The noise comes after every other draw: drawn block by block it is the
        # same stream as one draw for the whole volume.
        noise = rng.standard_normal(clean[part].shape, dtype=np.float32)
        hu[part] = clean[part] + noise * np.float32(noise_hu)
    return CTPhantom(
        hu=hu,
        labels=labels,
        clean=clean,
        spacing=(float(pixel_spacing), float(pixel_spacing), float(slice_spacing)),
    )


def write_ct_phantom(
    out_dir: Path | str,
    phantom: CTPhantom,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    orientation: Orientation = "axial",
    **kwargs: object,
) -> list[Path]:
    """Write a :class:`CTPhantom` as a CT series (see :func:`write_ct_series`).

    The phantom is an axial acquisition; ``orientation`` "coronal" or "sagittal" writes
    it as a multiplanar reformat of that volume instead (one image per row, or per
    column, of the axial grid), in the same patient space, for trying routes that look
    at orientation. ``kwargs`` go to :func:`iter_ct_series` (UIDs, names, descriptions);
    the geometry comes from the phantom. HU are rounded to integers as stored values.
    """
    volume, pixel_spacing, thickness = _phantom_as_series(phantom, orientation)
    return write_ct_series(
        out_dir,
        transfer_syntax=transfer_syntax,
        volume=volume,
        orientation=orientation,
        pixel_spacing=pixel_spacing,
        slice_thickness=thickness,
        **kwargs,
    )


def _phantom_as_series(
    phantom: CTPhantom, orientation: str
) -> tuple[np.ndarray, tuple[float, float], float]:
    """The phantom's HU as (slices, rows, columns) of a series in ``orientation``, with
    its (row, column) pixel spacing and slice spacing.

    :func:`iter_ct_series` centres every series on the origin, as the phantom is, so
    only the axes move: a coronal image runs head to feet down its rows (column
    direction -z) and its slices go along +y; a sagittal one runs along +y across its
    columns and its slices go along -x (the normal of :data:`_ORIENTATIONS`).
    """
    sx, sy, sz = phantom.spacing
    hu = phantom.hu  # [z, y, x]
    if orientation == "axial":
        return hu, (sy, sx), sz
    if orientation == "coronal":
        return hu.transpose(1, 0, 2)[:, ::-1, :], (sz, sx), sy
    if orientation == "sagittal":
        return hu.transpose(2, 0, 1)[::-1, ::-1, :], (sz, sy), sx
    raise ValueError(f"orientation must be one of {sorted(_ORIENTATIONS)}")


def phantom_volume(
    array: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    modality: str = "CT",
    is_2d: bool = False,
) -> Volume:
    """An array as the :class:`~service.pipeline.volume.Volume` radnode would read.

    For training and measuring bundles on generated data without writing DICOM files:
    ``array`` is (z, y, x) in modality units (a radiograph: (1, rows, columns), bright =
    dense), ``spacing`` (x, y, z) mm. The geometry is that of :func:`make_ct_series`:
    axial, the box centred on the origin (a 2D image: no patient geometry).
    """
    from service.pipeline.volume import Volume

    shape = np.asarray(array.shape[::-1], dtype=np.float64)  # (x, y, z)
    origin = (0.0, 0.0, 0.0) if is_2d else tuple(-(shape - 1) * np.asarray(spacing) / 2)
    return Volume(
        array=array,
        origin=tuple(float(v) for v in origin),
        spacing=tuple(float(v) for v in spacing),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        frame_of_reference_uid=None,
        modality=modality,
        study_uid="1.2.826.0.1.3680043.8.498.1",
        series_uid="1.2.826.0.1.3680043.8.498.1.1",
        sources=(),
        is_2d=is_2d,
        inverted_monochrome1=False,
        bits_stored=16,
        pixel_spacing_source="PixelSpacing",
        slice_spacing_source="positions",
    )


# ---------------------------------------------------------------------------------------
# Chest radiograph phantom
# ---------------------------------------------------------------------------------------

_RADIOGRAPH_SOP_CLASSES = {
    "DX": DigitalXRayImageStorageForPresentation,
    "CR": ComputedRadiographyImageStorage,
}
# Geometry of a PA chest: source-detector 1800 mm, patient about 150 mm before the detector.
_SOURCE_TO_DETECTOR_MM = 1800.0
_SOURCE_TO_PATIENT_MM = 1650.0


def _projected_ellipsoid(
    u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float
) -> np.ndarray:
    """Relative thickness (0..1) of an ellipsoid projected onto the image plane."""
    r2 = ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2
    return np.sqrt(np.clip(1.0 - r2, 0.0, None))


@dataclass(frozen=True)
class _ChestAnatomy:
    """How one chest differs from the standard one (the defaults are the standard)."""

    shift: tuple[float, float] = (0.0, 0.0)  # whole chest, normalised u, v
    body: tuple[float, float] = (1.0, 1.0)  # scale of the body outline
    lungs: tuple[float, float] = (1.0, 1.0)  # scale of both lung fields
    heart: float = 1.0  # scale of the heart
    heart_shift: float = 0.0  # u
    rib_period: float = 0.13
    rib_phase: float = 0.0
    nodule_contrast: float = 0.12


def _random_chest_anatomy(rng: np.random.Generator) -> _ChestAnatomy:
    return _ChestAnatomy(
        shift=(rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)),
        body=(rng.uniform(0.9, 1.08), rng.uniform(0.92, 1.06)),
        lungs=(rng.uniform(0.88, 1.08), rng.uniform(0.88, 1.08)),
        heart=rng.uniform(0.85, 1.25),
        heart_shift=rng.uniform(-0.04, 0.05),
        rib_period=rng.uniform(0.11, 0.15),
        rib_phase=rng.uniform(0.0, 2 * math.pi),
        nodule_contrast=rng.uniform(0.12, 0.22),
    )


def _chest_density(
    rows: int,
    columns: int,
    nodule: tuple[float, float, float] | None,
    anatomy: _ChestAnatomy | None = None,
) -> np.ndarray:
    """Attenuation (about 0..1) of a PA chest; image left is the patient's right.

    ``u`` runs from -1 (image left) to 1 (image right), ``v`` from -1 (head) to 1 (feet).
    """
    a = anatomy or _ChestAnatomy()
    u = ((np.arange(columns, dtype=np.float32) - (columns - 1) / 2) / (columns / 2))[None, :]
    v = ((np.arange(rows, dtype=np.float32) - (rows - 1) / 2) / (rows / 2))[:, None]
    if nodule is not None:  # the nodule moves with the chest it is in
        nodule = (nodule[0] * a.lungs[0], nodule[1] * a.lungs[1], nodule[2])
    u = (u - np.float32(a.shift[0])) / np.float32(a.body[0])
    v = (v - np.float32(a.shift[1])) / np.float32(a.body[1])
    bu, bv = a.body
    lu, lv = a.lungs[0] / bu, a.lungs[1] / bv
    body = _projected_ellipsoid(u, v, 0.0, 0.15, 0.84, 1.15)
    neck = _projected_ellipsoid(u, v, 0.0, -0.95, 0.22, 0.35)
    right_lung = _projected_ellipsoid(u, v, -0.38 * lu, -0.08 * lv, 0.30 * lu, 0.62 * lv)
    left_lung = _projected_ellipsoid(u, v, 0.37 * lu, -0.05 * lv, 0.28 * lu, 0.60 * lv)
    lungs = right_lung + left_lung
    heart = _projected_ellipsoid(
        u, v, 0.10 + a.heart_shift, 0.30, 0.30 * a.heart, 0.24 * math.sqrt(a.heart)
    )
    mediastinum = _projected_ellipsoid(u, v, 0.0, -0.15, 0.13, 0.75)
    spine = _projected_ellipsoid(u, v, 0.0, 0.0, 0.07, 1.6)
    liver_dome = _projected_ellipsoid(u, v, -0.30, 0.80, 0.55, 0.35)
    # Posterior ribs: faint bands that curve down laterally, only over the thorax.
    thorax = _projected_ellipsoid(u, v, 0.0, -0.06, 0.74, 0.70)
    rib_phase = (v - 0.45 * u * u) * np.float32(2 * math.pi / a.rib_period) + np.float32(
        a.rib_phase
    )
    beside_spine = np.clip((np.abs(u) - 0.06) / 0.10, 0.0, 1.0)
    ribs = np.clip(np.cos(rib_phase), 0.0, None) ** 6 * np.minimum(thorax * 3.0, 1.0)
    ribs *= beside_spine
    # Clavicles: short bands rising laterally above the lung apices.
    clavicle_v = -0.72 + 0.22 * np.abs(u) - 0.20 * (np.abs(u) - 0.30) ** 2
    clavicles = np.exp(-(((v - clavicle_v) / 0.028) ** 2)) * beside_spine
    clavicles *= np.clip((0.62 - np.abs(u)) / 0.08, 0.0, 1.0)
    density = (
        0.04
        + 0.55 * np.maximum(body, 0.8 * neck)
        - 0.32 * lungs
        + 0.18 * heart
        + 0.12 * mediastinum
        + 0.20 * spine * np.sqrt(body)
        + 0.10 * liver_dome
        + 0.06 * ribs
        + 0.08 * clavicles
    )
    if nodule is not None:
        nu, nv, radius = nodule
        blob = np.exp(-(((u - nu) ** 2 + (v - nv) ** 2) / (radius * radius)))
        density = density + a.nodule_contrast * blob
    return density.astype(np.float32)


def _nodule_position(
    rng: np.random.Generator, radius_range: tuple[float, float] = (0.04, 0.07)
) -> tuple[float, float, float]:
    """A nodule centre and radius (normalised) well inside one of the lung fields."""
    cu, cv, ru, rv = (-0.38, -0.08, 0.30, 0.62) if rng.random() < 0.5 else (0.37, -0.05, 0.28, 0.60)
    angle = rng.uniform(0.0, 2 * math.pi)
    distance = rng.uniform(0.0, 0.5)
    radius = rng.uniform(*radius_range)  # 0.04-0.07: about 8-14 mm at 0.2 mm, 2000 columns
    return (
        cu + distance * ru * math.cos(angle),
        cv + distance * rv * math.sin(angle),
        radius,
    )


def make_radiograph(
    *,
    rows: int = 2000,
    columns: int = 2000,
    bits_stored: int = 12,
    photometric: Literal["MONOCHROME1", "MONOCHROME2"] = "MONOCHROME2",
    modality: Literal["DX", "CR"] = "DX",
    with_nodule: bool = False,
    pixel_spacing: float = 0.2,
    patient_name: str = "PHANTOM^CHEST",
    patient_id: str = "RADNODE-PHANTOM-0002",
    accession_number: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    seed: int = 0,
    vary_anatomy: bool = False,
) -> Dataset:
    """Return a PA chest radiograph phantom as a DX (for presentation) or CR dataset.

    Pixel values are unsigned and fill ``bits_stored`` bits. With MONOCHROME2 bone and
    soft tissue are high values (white) and the lungs low; MONOCHROME1 stores exactly
    ``2**bits_stored - 1`` minus the MONOCHROME2 values for the same seed, so both
    display the same. ``pixel_spacing`` is the detector pixel pitch (mm); the Pixel
    Spacing at the patient is smaller by the geometric magnification. The noise and,
    with ``with_nodule``, the nodule's place in a lung field and size come from ``seed``.

    ``vary_anatomy`` also draws the chest from ``seed``: position, body and lung size,
    heart size, rib spacing, exposure, and a nodule that may be smaller and
    fainter on average (7-14 mm); without it every chest is the same standard one.
    """
    if modality not in _RADIOGRAPH_SOP_CLASSES:
        raise ValueError("modality must be 'DX' or 'CR'")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError("photometric must be 'MONOCHROME1' or 'MONOCHROME2'")
    if not 8 <= bits_stored <= 16:
        raise ValueError("bits_stored must be between 8 and 16")
    noise_rng, nodule_rng, anatomy_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    anatomy = _random_chest_anatomy(anatomy_rng) if vary_anatomy else None
    radii = (0.035, 0.07) if vary_anatomy else (0.04, 0.07)
    nodule = _nodule_position(nodule_rng, radii) if with_nodule else None
    max_value = 2**bits_stored - 1
    gain, noise = (
        (0.9, 0.004)
        if anatomy is None
        else (
            anatomy_rng.uniform(0.7, 0.95),
            anatomy_rng.uniform(0.002, 0.008),
        )
    )
    signal = _chest_density(rows, columns, nodule, anatomy) * np.float32(gain * max_value)
    signal += noise_rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(
        noise * max_value
    )
    pixels = np.rint(np.clip(signal, 0, max_value)).astype(np.uint16)
    if photometric == "MONOCHROME1":
        pixels = (max_value - pixels).astype(np.uint16)

    series_uid = series_uid or generate_uid()
    study = _Study(
        patient_name=patient_name,
        patient_id=patient_id,
        study_uid=study_uid or generate_uid(),
        accession_number=accession_number,
        study_description="XR CHEST PA",
    )
    ds = Dataset()
    sop_class = _RADIOGRAPH_SOP_CLASSES[modality]
    _add_sop_common(ds, sop_class, generate_uid(entropy_srcs=[series_uid, "0"]))
    _add_patient_and_study(ds, study)
    _add_series(
        ds,
        modality=modality,
        series_uid=series_uid,
        description="CHEST PA PHANTOM",
        body_part="CHEST",
    )
    _add_equipment(ds)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    _add_content_time(ds)
    ds.PatientOrientation = ["L", "F"]  # PA, displayed as if facing the patient
    ds.ViewPosition = "PA"
    ds.ImageLaterality = "U"
    ds.KVP = "120"
    ds.ExposureTime = 10
    ds.XRayTubeCurrent = 250
    ds.DistanceSourceToDetector = _format_ds(_SOURCE_TO_DETECTOR_MM)
    ds.DistanceSourceToPatient = _format_ds(_SOURCE_TO_PATIENT_MM)
    magnification = _SOURCE_TO_DETECTOR_MM / _SOURCE_TO_PATIENT_MM
    ds.ImagerPixelSpacing = [_format_ds(pixel_spacing)] * 2
    ds.PixelSpacing = [_format_ds(pixel_spacing / magnification)] * 2
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "source-detector and source-patient distances"
    ds.AnatomicRegionSequence = DicomSequence([_code("51185008", "SCT", "Chest")])
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.EstimatedRadiographicMagnificationFactor = _format_ds(magnification)
        ds.PositionerType = "COLUMN"
        ds.ViewCodeSequence = DicomSequence([_code("399348003", "SCT", "postero-anterior")])
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        # +1: lower values mean less X-ray intensity at the detector (MONOCHROME1 here).
        ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME1" else -1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
        ds.LossyImageCompression = "00"
        ds.BurnedInAnnotation = "NO"
        ds.AcquisitionContextSequence = DicomSequence()
    ds.WindowCenter = _format_ds((max_value + 1) / 2)
    ds.WindowWidth = _format_ds(max_value + 1)
    _add_pixels(ds, pixels, bits_stored=bits_stored, photometric=photometric)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    """A Code Sequence item."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def write_radiograph(
    path: Path | str, *, transfer_syntax: str = ExplicitVRLittleEndian, **kwargs: object
) -> Path:
    """Write :func:`make_radiograph` ``(**kwargs)`` to ``path`` as a Part 10 file."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(make_radiograph(**kwargs), out, transfer_syntax)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


#: Length of abdomen the ``ct`` command covers when only ``--slices`` is given: inside
#: the 200-380 mm the reference CT model was trained on, liver top to kidneys' lower poles.
_CLI_SCAN_LENGTH_MM = 300.0
#: The ``ct`` command's default seed: held out (the reference CT model was trained on
#: seeds 0-59 and measured on 10000-10009), so a first try shows honest results.
_CLI_CT_SEED = 10000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.testing",
        description="Write synthetic DICOM phantoms (no patient data).",
        epilog="A T1-weighted head MR (the published Colin27 scan, for brain extraction):"
        " python -m service.testing_mr --help",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    ct = commands.add_parser(
        "ct",
        help="an abdominal CT series, one file per slice",
        description="Write an adult abdominal CT phantom (make_ct_phantom: the anatomy the "
        "reference CT models were trained on, sizes in mm) and print its true organ volumes.",
    )
    ct.add_argument("out_dir", type=Path)
    ct.add_argument(
        "--slices",
        type=int,
        help=f"number of axial slices (default: from the seed; with only --slices they "
        f"cover {_CLI_SCAN_LENGTH_MM:.0f} mm)",
    )
    ct.add_argument(
        "--slice-spacing",
        type=float,
        help="mm between axial slices (default: from the seed, 2-5 mm, or "
        f"{_CLI_SCAN_LENGTH_MM:.0f} mm / --slices)",
    )
    ct.add_argument("--rows", type=int, default=512)
    ct.add_argument("--columns", type=int, help="default: --rows")
    ct.add_argument(
        "--orientation",
        choices=sorted(_ORIENTATIONS),
        default="axial",
        help="coronal and sagittal write a reformat of the axial volume",
    )
    ct.add_argument("--seed", type=int, default=_CLI_CT_SEED, help="the anatomy and noise")
    ct.add_argument("--transfer-syntax", default=ExplicitVRLittleEndian, help="a UID")
    ct.add_argument(
        "--fixed-phantom",
        action="store_true",
        help="write the older fixed phantom instead: scaled to the image box (small images "
        "keep every organ), any size in constant memory, 300 slices of 1.25 mm by default; "
        "its organs are not the reference CT model's anatomy, so that model's results on it "
        "mean nothing",
    )

    xr = commands.add_parser("radiograph", help="a PA chest radiograph")
    xr.add_argument("out_file", type=Path)
    xr.add_argument("--rows", type=int, default=2000)
    xr.add_argument("--columns", type=int, default=2000)
    xr.add_argument("--bits-stored", type=int, default=12)
    xr.add_argument("--photometric", choices=["MONOCHROME1", "MONOCHROME2"], default="MONOCHROME2")
    xr.add_argument("--modality", choices=sorted(_RADIOGRAPH_SOP_CLASSES), default="DX")
    xr.add_argument("--nodule", action="store_true", help="add a round nodule in a lung field")
    xr.add_argument("--seed", type=int, default=0)
    xr.add_argument("--transfer-syntax", default=ExplicitVRLittleEndian, help="a UID")
    return parser


def cli_ct_phantom(
    *,
    seed: int = _CLI_CT_SEED,
    rows: int = 512,
    columns: int | None = None,
    slices: int | None = None,
    slice_spacing: float | None = None,
) -> CTPhantom:
    """The phantom ``python -m service.testing ct`` writes for these options.

    Only ``slices`` given: the slices cover :data:`_CLI_SCAN_LENGTH_MM`, so that asking
    for many slices gives thin ones over an abdomen, not a metre of body around it (the
    seed's own 2-5 mm spacing times 300 slices would be 0.6-1.5 m, far from what the
    reference CT model knows). Only ``slice_spacing`` given: the same length.
    """
    if any(n is not None and n < 1 for n in (rows, columns, slices)):
        raise ValueError("--slices, --rows and --columns must be positive")
    if slice_spacing is not None and slice_spacing <= 0:
        raise ValueError("--slice-spacing must be a positive number of mm")
    if slices is not None and slice_spacing is None:
        slice_spacing = _CLI_SCAN_LENGTH_MM / slices
    elif slices is None and slice_spacing is not None:
        slices = max(1, round(_CLI_SCAN_LENGTH_MM / slice_spacing))
    return make_ct_phantom(
        seed=seed, rows=rows, columns=columns, slices=slices, slice_spacing=slice_spacing
    )


def organ_volumes_ml(phantom: CTPhantom) -> dict[str, float]:
    """Each labelled organ's true volume inside the imaged box, in mL, by name."""
    voxel_ml = float(np.prod(phantom.spacing)) / 1000.0
    return {
        name: np.count_nonzero(phantom.labels == value) * voxel_ml
        for value, name in CT_PHANTOM_LABELS.items()
    }


def _main_ct(args: argparse.Namespace) -> None:
    """Write the CT the ``ct`` command asks for and say what it is."""
    if args.fixed_phantom:
        slices = 300 if args.slices is None else args.slices
        columns = args.rows if args.columns is None else args.columns
        extra = {} if args.slice_spacing is None else {"slice_thickness": args.slice_spacing}
        paths = write_ct_series(
            args.out_dir,
            slices=slices,
            rows=args.rows,
            columns=columns,
            orientation=args.orientation,
            seed=args.seed,
            transfer_syntax=args.transfer_syntax,
            **extra,
        )
        size_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(
            f"wrote {len(paths)} CT slices of the fixed phantom ({args.rows}x{columns}, "
            f"{args.orientation}, {size_mb:.1f} MB) to {args.out_dir}"
        )
        return
    phantom = cli_ct_phantom(
        seed=args.seed,
        rows=args.rows,
        columns=args.columns,
        slices=args.slices,
        slice_spacing=args.slice_spacing,
    )
    paths = write_ct_phantom(
        args.out_dir,
        phantom,
        transfer_syntax=args.transfer_syntax,
        orientation=args.orientation,
    )
    slices, rows, columns = phantom.hu.shape
    sx, _sy, sz = phantom.spacing
    size_mb = sum(p.stat().st_size for p in paths) / 1e6
    volumes = ", ".join(f"{name} {ml:.0f} mL" for name, ml in organ_volumes_ml(phantom).items())
    print(
        f"wrote {len(paths)} CT slices ({args.orientation}; axial volume {slices} x {rows}x"
        f"{columns}, {sx:.2f} mm pixels, {sz:.2f} mm slices, seed {args.seed}, "
        f"{size_mb:.1f} MB) to {args.out_dir}\n"
        f"true organ volumes in the imaged box: {volumes}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m service.testing``."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "ct":
        try:
            _main_ct(args)
        except ValueError as exc:
            parser.error(str(exc))
    else:
        path = write_radiograph(
            args.out_file,
            rows=args.rows,
            columns=args.columns,
            bits_stored=args.bits_stored,
            photometric=args.photometric,
            modality=args.modality,
            with_nodule=args.nodule,
            seed=args.seed,
            transfer_syntax=args.transfer_syntax,
        )
        print(
            f"wrote {args.modality} chest radiograph ({args.rows}x{args.columns}, "
            f"{args.bits_stored} bits, {args.photometric}"
            f"{', with nodule' if args.nodule else ''}) to {path}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
