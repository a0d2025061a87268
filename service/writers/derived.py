"""Derived image series for reconstruction results (e.g. a denoised CT).

Why this writer copies the source header instead of using highdicom: highdicom has no
generic single-frame CT (or MR, ...) image class; its image classes cover SEG, SC,
parametric maps and legacy-converted enhanced images. A derived CT must stay a CT
Image Storage instance, with the same SOP class, geometry, frame of reference and pixel
encoding as its source, so that every viewer and hanging protocol treats it like the
original. Copying each source header (read without pixel data) and replacing only
pixel data, identifiers and the derivation attributes is the smallest change that
keeps all of that true; the provenance (Contributing Equipment) still comes from
:mod:`service.writers.provenance`, and the references use its Source Image items.

Per slice ``k`` (``volume.sources`` order): the header of ``source_headers[k]`` with

* new SOP Instance UID and Series Instance UID (deterministic, see
  :func:`~service.writers.provenance.result_uid`), Series Number/Description, Instance
  Number ``k + 1``;
* Image Type ``DERIVED\\SECONDARY`` (the source's further values kept), Derivation
  Description (algorithm and banner), Image Comments (banner), Source Image Sequence
  -> the source slice (purpose DCM 121322), Contributing Equipment -> the source
  scanner (DCM 109101) and the algorithm; General Equipment -> radnode and the bundle;
  Instance Creation, Series and Content Date/Time -> now (Acquisition's stay);
* pixel values ``round((image - intercept) / slope)`` in the source's Bits Allocated /
  Bits Stored / Pixel Representation, clipped to the stored range, with the source's
  Rescale Slope and Intercept, written in Explicit VR Little Endian;
* private elements removed (they describe the source acquisition, not this image).

Only single-frame sources are supported (one instance per slice); a multi-frame source
raises :class:`ValueError`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from service.pipeline.result import PipelineResult
from service.pipeline.volume import Volume, stored_range
from service.writers.provenance import (
    CHARACTER_SET,
    MANUFACTURER,
    SERIES_NUMBERS,
    Provenance,
    clip_lo,
    source_image_items,
)

#: Elements of the source that do not describe the derived image and are dropped.
_DROPPED = (
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "LargestImagePixelValue",
    "SmallestImagePixelValue",
    "LargestPixelValueInSeries",
    "SmallestPixelValueInSeries",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "ReferencedImageSequence",
    "SourceImageSequence",
    "DerivationCodeSequence",
    "ContributingEquipmentSequence",
    "IrradiationEventUID",
    "InstanceCreatorUID",
    "DigitalSignaturesSequence",
    "MACParametersSequence",
    "EncryptedAttributesSequence",
    "OriginalAttributesSequence",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
    # the source scanner's identity: it is recorded as Acquisition Equipment instead
    "DeviceSerialNumber",
    "StationName",
    "DeviceUID",
)


@dataclass(frozen=True)
class DerivedSeries:
    """What the SR says about the derived series."""

    series_uid: str
    description: str
    count: int


def derived_series_info(provenance: Provenance, count: int) -> DerivedSeries:
    return DerivedSeries(
        series_uid=provenance.uid("series:derived"),
        description=provenance.series_description("DERIVED"),
        count=count,
    )


def iter_derived_series(
    result: PipelineResult,
    volume: Volume,
    source_headers: Sequence[Dataset],
    provenance: Provenance,
) -> Iterator[Dataset]:
    """One derived instance per source slice, ready to save (see the module docstring).

    A generator: the caller saves each instance before the next is built, so a long
    series is never held in memory twice.
    """
    image = result.image
    if image is None:
        raise ValueError("a derived series needs an image")
    if image.shape[0] != len(source_headers) or image.shape[1:] != volume.array.shape[1:]:
        raise ValueError(f"image shape {image.shape} does not match the source volume")
    info = derived_series_info(provenance, len(source_headers))
    series_uid, description = info.series_uid, info.description
    derivation = clip_lo(f"{provenance.name} {provenance.version} (AI)")[:64]
    now = datetime.now()
    created_date, created_time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for k, source in enumerate(source_headers):
        if int(source.get("NumberOfFrames", 1) or 1) > 1:
            raise ValueError("derived series are written for single-frame sources only")
        ds = copy.deepcopy(source)
        ds.decode()  # all text to str, so it is re-encoded in the new character set
        ds.remove_private_tags()
        for keyword in _DROPPED:
            if keyword in ds:
                delattr(ds, keyword)
        sop_uid = provenance.uid("derived", k)
        ds.SpecificCharacterSet = CHARACTER_SET
        ds.SOPInstanceUID = sop_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = SERIES_NUMBERS["DERIVED"]
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        image_type = list(source.get("ImageType", []) or [])
        ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]]
        ds.DerivationDescription = f"{derivation}: {provenance.banner}"[:1024]
        ds.ImageComments = provenance.banner
        ds.SourceImageSequence = source_image_items([source])
        ds.ContributingEquipmentSequence = [
            *_acquisition_equipment(source),
            provenance.contributing_equipment(),
        ]
        # This image, series and equipment are radnode's, made now; acquisition
        # date/time stay the source's (found by review: all were the source's).
        ds.InstanceCreationDate = ds.SeriesDate = ds.ContentDate = created_date
        ds.InstanceCreationTime = ds.SeriesTime = ds.ContentTime = created_time
        ds.Manufacturer = MANUFACTURER
        ds.ManufacturerModelName = provenance.model_name
        ds.SoftwareVersions = provenance.software_versions
        ds.BurnedInAnnotation = "NO"
        _set_pixels(ds, image[k])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        yield ds


def _acquisition_equipment(source: Dataset) -> list[Dataset]:
    """The source scanner as Contributing Equipment (DCM 109101 Acquisition Equipment),
    as highdicom records it on the SEG and SC; none if the source names no maker."""
    try:
        return [hd.ContributingEquipment.for_image_acquisition(source)]
    except (AttributeError, TypeError, ValueError):
        return []


def stored_values(pixels: np.ndarray, header: Dataset) -> np.ndarray:
    """Modality values -> stored values of ``header``'s encoding (rounded, clipped).

    The inverse of what loading did (service.pipeline.volume): un-rescale, and for a
    MONOCHROME1 source invert within the stored range again, so the derived image keeps
    the source's photometric interpretation and windows and shows like the source
    (without this a denoised MONOCHROME1 radiograph came back as its negative)."""
    slope = float(header.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(header.get("RescaleIntercept", 0.0) or 0.0)
    bits_allocated = int(header.BitsAllocated)
    bits_stored = int(header.get("BitsStored", bits_allocated))
    signed = int(header.get("PixelRepresentation", 0)) == 1
    low, high = stored_range(bits_stored, int(signed))
    values = np.rint((pixels.astype(np.float32, copy=False) - np.float32(intercept)) / slope)
    if str(header.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        values = np.float32(low + high) - values
    values = np.clip(np.nan_to_num(values, nan=low), low, high)
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits_allocated // 8}").newbyteorder("<")
    return values.astype(dtype)


def _set_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    if int(ds.BitsAllocated) not in (8, 16, 32) or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError("derived series need greyscale sources of 8, 16 or 32 bits")
    stored = stored_values(pixels, ds)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds["PixelData"].VR = "OB" if int(ds.BitsAllocated) == 8 else "OW"
