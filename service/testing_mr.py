"""A real MR volume (NIfTI) written as a DICOM MR Image Storage series.

Why: the synthetic phantoms in :mod:`service.testing` cannot show that a published
network gives the right answer on a real scan. Debian's ``mricron-data`` ships the
Colin27 T1 head MR (``ch2.nii.gz``, 1 mm, BSD-3) with a reference brain extraction
(``ch2bet.nii.gz``); written as DICOM by :func:`write_mr_series`, it goes through
radnode exactly like a series from a scanner, and the SEG that comes back can be
compared with the reference mask.

Geometry: the volume is reoriented to RAS (``nibabel.as_closest_canonical``), then each
axial plane ``k`` becomes one image whose columns run to the patient's left and rows to
posterior, the usual radiological layout; Image Position/Orientation (Patient) are the
NIfTI affine converted to DICOM's LPS coordinates, so any reader that honours the DICOM
geometry puts every voxel back where the NIfTI put it.

Run ``python -m service.testing_mr OUT_DIR [--nifti FILE]`` to write one (Colin27 by default).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from service.testing import (
    _add_content_time,
    _add_equipment,
    _add_patient_and_study,
    _add_pixels,
    _add_series,
    _add_sop_common,
    _format_ds,
    _save,
    _Study,
)

__all__ = ["COLIN27", "COLIN27_BRAIN", "iter_mr_series", "write_mr_series"]

#: Colin27 T1 and its brain extraction, from Debian's ``mricron-data`` package.
COLIN27 = Path("/usr/share/mricron/templates/ch2.nii.gz")
COLIN27_BRAIN = Path("/usr/share/mricron/templates/ch2bet.nii.gz")

_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS -> LPS


def _stored_values(data: np.ndarray) -> tuple[np.ndarray, int]:
    """Unsigned integers for the pixel data, and Bits Stored.

    Integral data from 0 to 4095 are kept as they are (Colin27 is 0-254); anything else
    is scaled linearly onto 0-4095, as a scanner's reconstruction would quantise it.
    """
    data = np.nan_to_num(np.asarray(data, dtype=np.float64))
    low, high = float(data.min()), float(data.max())
    if low >= 0 and high <= 4095 and np.array_equal(data, np.round(data)):
        values = data
    else:
        values = np.round((data - low) / max(high - low, 1e-12) * 4095)
    bits = max(8, int(values.max()).bit_length())
    return values.astype(np.uint16), bits


def iter_mr_series(
    nifti: Path | str,
    *,
    patient_name: str = "PHANTOM^COLIN27",
    patient_id: str = "RADNODE-COLIN27",
    accession_number: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_description: str = "T1 3D HEAD (Colin27)",
    body_part: str = "HEAD",
) -> Iterator[Dataset]:
    """Yield one MR Image Storage dataset per axial plane of the NIfTI volume."""
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(str(nifti)))
    data = np.asarray(image.dataobj)
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{nifti}: expected a 3D volume, got shape {data.shape}")
    values, bits = _stored_values(data)
    nx, ny, nz = values.shape
    affine = np.asarray(image.affine, dtype=np.float64)
    axes = _LPS @ affine[:3, :3]  # voxel index step -> LPS millimetres
    row_step, column_step, slice_step = -axes[:, 0], -axes[:, 1], axes[:, 2]
    spacing = [float(np.linalg.norm(v)) for v in (row_step, column_step, slice_step)]
    iop = [_format_ds(v) for v in (*(row_step / spacing[0]), *(column_step / spacing[1]))]
    normal = slice_step / spacing[2]

    study = _Study(
        patient_name=patient_name,
        patient_id=patient_id,
        study_uid=study_uid or generate_uid(),
        accession_number=accession_number,
        study_description="MR HEAD",
    )
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = generate_uid(entropy_srcs=[series_uid, "frame-of-reference"])
    center = float(np.percentile(values[values > 0], 50)) if values.any() else 0.0
    for k in range(nz):
        ds = Dataset()
        _add_sop_common(ds, MRImageStorage, generate_uid(entropy_srcs=[series_uid, str(k)]))
        _add_patient_and_study(ds, study)
        _add_series(
            ds, modality="MR", series_uid=series_uid, description=series_description,
            body_part=body_part,
        )  # fmt: skip
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        _add_equipment(ds)
        # Typed as a scanner's T1 would be, so default routes (originals only) take it.
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ImageComments = f"written from NIfTI {Path(nifti).name} by radnode service.testing_mr"
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        _add_content_time(ds)
        # Image Plane: pixel (row 0, column 0) is voxel (nx-1, ny-1, k) of the RAS volume.
        corner = affine @ np.array([nx - 1, ny - 1, k, 1.0])
        position = _LPS @ corner[:3]
        ds.ImagePositionPatient = [_format_ds(v) for v in position]
        ds.ImageOrientationPatient = iop
        ds.PixelSpacing = [_format_ds(spacing[1]), _format_ds(spacing[0])]
        ds.SliceThickness = _format_ds(spacing[2])
        ds.SpacingBetweenSlices = _format_ds(spacing[2])
        ds.SliceLocation = _format_ds(float(position @ normal))
        # MR Image module: a T1-weighted 3D gradient echo, as Colin27 was acquired.
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = "18"
        ds.EchoTime = "10"
        ds.EchoTrainLength = 1
        ds.FlipAngle = "30"
        ds.MagneticFieldStrength = "1.5"
        ds.ImagedNucleus = "1H"
        ds.WindowCenter = _format_ds(center)
        ds.WindowWidth = _format_ds(max(2.0 * center, 1.0))
        plane = np.ascontiguousarray(values[::-1, ::-1, k].T)  # [row, column]
        _add_pixels(ds, plane, bits_stored=bits, photometric="MONOCHROME2")
        yield ds


def write_mr_series(
    nifti: Path | str,
    out_dir: Path | str,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **kwargs: object,
) -> list[Path]:
    """Write :func:`iter_mr_series` to ``out_dir`` as ``MR000001.dcm``, … in slice order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        _save(ds, out / f"MR{k + 1:06d}.dcm", transfer_syntax)
        for k, ds in enumerate(iter_mr_series(nifti, **kwargs))  # type: ignore[arg-type]
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m service.testing_mr``."""
    parser = argparse.ArgumentParser(
        prog="python -m service.testing_mr",
        description="Write a NIfTI MR volume as a DICOM MR Image Storage series.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--nifti", type=Path, default=COLIN27, help="default: Colin27")
    args = parser.parse_args(argv)
    paths = write_mr_series(args.nifti, args.out_dir)
    print(f"wrote {len(paths)} MR images from {args.nifti} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
