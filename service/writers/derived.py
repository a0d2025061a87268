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
* private elements removed (they describe the source acquisition, not this image);
* an overlay plane (group 6000) reading "AI PROCESSED - NOT FOR DIAGNOSIS" in the top
  left corner, unless the source has one there (:mod:`service.writers.marking`).

An Enhanced (multi-frame) source instance, whose frames are slices, gives one derived
multi-frame instance of the same SOP class: the source header with its functional
groups (geometry per frame), the frames in the source's frame order, each encoded with
its own frame's Pixel Value Transformation, Image and Frame Type ``DERIVED\\PRIMARY``
(an Enhanced image has no SECONDARY), and per frame a Derivation Image item (DCM 110001
"Image Processing") referencing the source frame. A series of several such instances
(one per stack) gives one derived instance per source instance.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian

from service.pipeline.result import PipelineResult
from service.pipeline.volume import Volume, frame_rescale, stored_range
from service.writers.clock import ResultTime, result_time
from service.writers.lossy import lossy_history, mark_lossy
from service.writers.marking import mark_as_ai_result
from service.writers.provenance import (
    CHARACTER_SET,
    MANUFACTURER,
    Provenance,
    clip_lo,
)
from service.writers.sources import SliceSource, in_frame_order, source_image_items

#: Elements of the source that do not describe the derived image and are dropped.
_DROPPED = frozenset(
    {
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
        "ExtendedOffsetTable",
        "ExtendedOffsetTableLengths",
        # the source scanner's identity: it is recorded as Acquisition Equipment instead
        "DeviceSerialNumber",
        "StationName",
        "DeviceUID",
    }
)


#: Derivation Code of each frame of a derived Enhanced image (CID 7203 is extensible).
IMAGE_PROCESSING = hd.sr.CodedConcept("110001", "DCM", "Image Processing")


@dataclass(frozen=True)
class DerivedSeries:
    """What the SR says about the derived series."""

    series_uid: str
    description: str
    count: int
    #: (SOP Class UID, SOP Instance UID) of each derived image, for the SR's evidence.
    instances: tuple[tuple[str, str], ...] = ()


def derived_series_info(
    provenance: Provenance, instances: Sequence[tuple[str, str]]
) -> DerivedSeries:
    return DerivedSeries(
        series_uid=provenance.uid("series:derived"),
        description=provenance.series_description("DERIVED"),
        count=len(instances),
        instances=tuple(instances),
    )


#: What the overlay of every derived image says (:mod:`service.writers.marking`).
AI_MARK = "AI PROCESSED - NOT FOR DIAGNOSIS"


def iter_derived_series(
    result: PipelineResult,
    volume: Volume,
    source_headers: Sequence[Dataset],
    provenance: Provenance,
    stamp: ResultTime | None = None,
) -> Iterator[Dataset]:
    """One derived instance per source instance, ready to save (see the module docstring),
    made at ``stamp`` (default now, in the source's time zone).

    A generator: the caller saves each instance before the next is built, so a long
    series is never held in memory twice.
    """
    image = result.image
    if image is None:
        raise ValueError("a derived series needs an image")
    if image.shape[0] != len(volume.sources) or image.shape[1:] != volume.array.shape[1:]:
        raise ValueError(f"image shape {image.shape} does not match the source volume")
    info = derived_series_info(provenance, ())  # its UID and description
    # The same for every image of the series, and costly to make (highdicom checks the
    # IOD: 4 ms an image); one scanner made the series.
    equipment = [*_acquisition_equipment(source_headers[0]), provenance.contributing_equipment()]
    enhanced = {s.sop_instance_uid for s in volume.sources if s.frame_number is not None}
    slice_of = {s.sop_instance_uid: k for k, s in enumerate(volume.sources)}
    # one Series Date/Time for every image of the series (review), in the source's zone
    made = stamp or result_time(source_headers[0])
    for number, source in enumerate(source_headers, start=1):
        ds = _derived_header(source, provenance, info, number, made)
        ds.ContributingEquipmentSequence = copy.deepcopy(equipment)
        if str(source.SOPInstanceUID) in enhanced:
            _derive_frames(ds, source, provenance)
            _set_frame_pixels(ds, source, in_frame_order(image, volume, source))
        else:
            ds.SourceImageSequence = source_image_items([source])
            _set_pixels(ds, image[slice_of[str(source.SOPInstanceUID)]])
            mark_as_ai_result(ds, AI_MARK)
        yield ds


def _derived_header(
    source: Dataset, provenance: Provenance, info: DerivedSeries, number: int, made: ResultTime
) -> Dataset:
    """``source``'s header as the header of derived instance ``number`` (1-based): new
    identity, derivation and equipment; pixels and source references still to set."""
    ds = _copy_of_kept(source)
    ds.decode()  # all text to str, so it is re-encoded in the new character set
    sop_uid = provenance.uid("derived", number - 1)
    ds.SpecificCharacterSet = CHARACTER_SET
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = info.series_uid
    ds.SeriesNumber = provenance.series_number("DERIVED")
    ds.SeriesDescription = info.description
    ds.InstanceNumber = number
    ds.ImageType = _derived_type(source.get("ImageType"))
    # the banner names the bundle already (it was said twice: acceptance pass)
    ds.DerivationDescription = f"AI image processing: {provenance.banner}"[:1024]
    ds.ImageComments = provenance.banner
    # This image, series and equipment are radnode's, made now; acquisition date/time
    # stay the source's (found by review: all were the source's).
    ds.SeriesDate, ds.SeriesTime = made.date, made.time
    made.apply_to(ds)  # the source's offset kept: the times are told in it
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = provenance.model_name
    ds.SoftwareVersions = provenance.software_versions
    ds.BurnedInAnnotation = "NO"
    mark_lossy(ds, lossy_history([source]))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _copy_of_kept(source: Dataset) -> Dataset:
    """A deep copy of ``source`` without its private and :data:`_DROPPED` elements.

    Copying only what is kept: a scanner's private elements (a Siemens CSA header is
    tens of kB) were copied, decoded and then deleted for every image."""
    ds = Dataset()
    for element in source:
        if element.tag.is_private or element.keyword in _DROPPED:
            continue
        if element.VR == "SQ":
            ds.add(copy.deepcopy(element))
        else:  # values are immutable or (multi-valued) copied: a third of deepcopy's time
            value = element.value
            if isinstance(value, MultiValue):
                value = list(value)
            ds.add(DataElement(element.tag, element.VR, value))
    return ds


def _derivation(provenance: Provenance) -> str:
    return clip_lo(f"{provenance.name} {provenance.version} (AI)")[:64]


def _derived_type(image_type: Sequence[str] | str | None, *, enhanced: bool = False) -> list[str]:
    """Image Type (or an Enhanced frame's Frame Type) of a derived image: DERIVED,
    SECONDARY, then the source's further values. An Enhanced image keeps its second
    value: there it can only be PRIMARY (PS3.3 C.8.16.1)."""
    values = [image_type] if isinstance(image_type, str) else list(image_type or [])
    if enhanced:
        return ["DERIVED", *(values[1:] or ["PRIMARY"])]
    return ["DERIVED", "SECONDARY", *values[2:]]


def _derive_frames(ds: Dataset, source: Dataset, provenance: Provenance) -> None:
    """The functional groups of a derived Enhanced image: every Frame Type (CT, MR, ...
    Image Frame Type macros, shared or per frame) says DERIVED as the Image Type does,
    and each frame's Derivation Image item references the source frame it came from."""
    ds.ImageType = _derived_type(source.get("ImageType"), enhanced=True)
    del ds.DerivationDescription  # not in Enhanced IODs: each frame's item carries it
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    per_frame = ds.PerFrameFunctionalGroupsSequence
    for groups in (*shared, *per_frame):
        for element in groups:
            if element.VR == "SQ" and element.keyword.endswith("FrameTypeSequence"):
                for item in element.value:
                    if "FrameType" in item:
                        item.FrameType = _derived_type(item.FrameType, enhanced=True)
        if "DerivationImageSequence" in groups:
            del groups.DerivationImageSequence
    description = _derivation(provenance)
    for number, groups in enumerate(per_frame, start=1):
        derivation = Dataset()
        derivation.DerivationDescription = description
        derivation.DerivationCodeSequence = [IMAGE_PROCESSING]
        derivation.SourceImageSequence = source_image_items([SliceSource(source, number)])
        groups.DerivationImageSequence = [derivation]
    _reference_source(ds, source)


def _reference_source(ds: Dataset, source: Dataset) -> None:
    """List the source instance where an Enhanced image lists what its frames reference:
    Source Image Evidence (the Derivation Image items' instances) and the Common Instance
    Reference module (every instance referenced, by series; the source's own entries,
    e.g. a converted image's originals, are kept)."""
    instance = Dataset()
    instance.ReferencedSOPClassUID = source.SOPClassUID
    instance.ReferencedSOPInstanceUID = source.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedSOPSequence = [instance]
    evidence = Dataset()
    evidence.StudyInstanceUID = source.StudyInstanceUID
    evidence.ReferencedSeriesSequence = [series]
    ds.SourceImageEvidenceSequence = [evidence]
    listed = Dataset()
    listed.ReferencedSOPClassUID = source.SOPClassUID
    listed.ReferencedSOPInstanceUID = source.SOPInstanceUID
    referenced = list(ds.get("ReferencedSeriesSequence") or [])
    same = next((s for s in referenced if s.SeriesInstanceUID == source.SeriesInstanceUID), None)
    if same is None:
        same = Dataset()
        same.SeriesInstanceUID = source.SeriesInstanceUID
        same.ReferencedInstanceSequence = []
        referenced.append(same)
    same.ReferencedInstanceSequence = [*(same.get("ReferencedInstanceSequence") or []), listed]
    ds.ReferencedSeriesSequence = referenced


def _acquisition_equipment(source: Dataset) -> list[Dataset]:
    """The source scanner as Contributing Equipment (DCM 109101 Acquisition Equipment),
    as highdicom records it on the SEG and SC; none if the source names no maker."""
    try:
        return [hd.ContributingEquipment.for_image_acquisition(source)]
    except (AttributeError, TypeError, ValueError):
        return []


def stored_values(
    pixels: np.ndarray, header: Dataset, rescale: tuple[float, float] | None = None
) -> np.ndarray:
    """Modality values -> stored values of ``header``'s encoding (rounded, clipped).

    The inverse of what loading did (service.pipeline.volume): un-rescale (with
    ``rescale`` = (slope, intercept) where given, an Enhanced frame's; else the header's
    Rescale Slope and Intercept), and for a MONOCHROME1 source invert within the stored
    range again, so the derived image keeps the source's photometric interpretation and
    windows and shows like the source (without this a denoised MONOCHROME1 radiograph
    came back as its negative)."""
    if rescale is not None:
        slope, intercept = rescale
    else:
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
    _check_encoding(ds)
    _store_pixel_data(ds, stored_values(pixels, ds))


def _set_frame_pixels(ds: Dataset, source: Dataset, frames: np.ndarray) -> None:
    """All frames (source frame order), each with its own frame's rescale."""
    _check_encoding(ds)
    stored = np.stack(
        [
            stored_values(frame, ds, frame_rescale(source, number))
            for number, frame in enumerate(frames, start=1)
        ]
    )
    _store_pixel_data(ds, stored)


def _check_encoding(ds: Dataset) -> None:
    if int(ds.BitsAllocated) not in (8, 16, 32) or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError("derived series need greyscale sources of 8, 16 or 32 bits")


def _store_pixel_data(ds: Dataset, stored: np.ndarray) -> None:
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds["PixelData"].VR = "OB" if int(ds.BitsAllocated) == 8 else "OW"
