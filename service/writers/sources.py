"""Which source image, and which of its frames, each slice of a volume came from.

Every result references its source images, and some write data per source image (the
SEG's frames, the derived series' images). For a single-frame series, slice ``k`` of
the volume is one instance. For an Enhanced (multi-frame) CT or MR, a scanner sends the
whole series as one instance and the slices are its frames: the volume sorts them by
position, which need not be the order of the frames in the instance (a scanner may
store them head to feet, or interleaved). The writers ask here, so that a reference
names the right frame (Referenced Frame Number) and per-frame data goes back into the
source's frame order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from service.pipeline.volume import Volume, frame_macro, number_of_frames
from service.writers.provenance import SOURCE_IMAGE_PURPOSE


@dataclass(frozen=True)
class SliceSource:
    """The image one slice of the volume came from."""

    #: The source instance's header (no Pixel Data).
    header: Dataset
    #: 1-based frame of a multi-frame source; None for a single-frame image.
    frame_number: int | None = None


def slice_sources(volume: Volume, source_headers: Sequence[Dataset]) -> list[SliceSource]:
    """One :class:`SliceSource` per slice of ``volume``, in slice order.

    ``source_headers`` are the volume's source instances (each once), as
    :func:`service.writers.dicom.write_dicom_objects` is given them.
    """
    by_uid = {str(header.SOPInstanceUID): header for header in source_headers}
    return [SliceSource(by_uid[s.sop_instance_uid], s.frame_number) for s in volume.sources]


def source_image_items(sources: Sequence[SliceSource | Dataset]) -> list[Dataset]:
    """Source Image Sequence items (SOP class, instance, frame, purpose DCM 121322).

    highdicom has no class for Source Image Sequence items outside SEG, and these are
    only references, so they are built here, once, for the SC and derived writers.
    """
    items = []
    for source in sources:
        if isinstance(source, Dataset):
            source = SliceSource(source)
        item = Dataset()
        item.ReferencedSOPClassUID = source.header.SOPClassUID
        item.ReferencedSOPInstanceUID = source.header.SOPInstanceUID
        if source.frame_number is not None:
            item.ReferencedFrameNumber = source.frame_number
        item.PurposeOfReferenceCodeSequence = [SOURCE_IMAGE_PURPOSE]
        items.append(item)
    return items


def is_enhanced(volume: Volume) -> bool:
    """Whether the volume's slices are frames of Enhanced (multi-frame) instances."""
    return any(s.frame_number is not None for s in volume.sources)


#: Enhanced and Legacy Converted image classes -> the classic single-frame class whose
#: attributes an instance of one frame can be given (:func:`as_single_frame`).
CLASSIC_CLASS: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2.1": "1.2.840.10008.5.1.4.1.1.2",  # Enhanced CT -> CT
    "1.2.840.10008.5.1.4.1.1.2.2": "1.2.840.10008.5.1.4.1.1.2",  # Legacy Converted CT
    "1.2.840.10008.5.1.4.1.1.4.1": "1.2.840.10008.5.1.4.1.1.4",  # Enhanced MR -> MR
    "1.2.840.10008.5.1.4.1.1.4.4": "1.2.840.10008.5.1.4.1.1.4",  # Legacy Converted MR
    "1.2.840.10008.5.1.4.1.1.128.1": "1.2.840.10008.5.1.4.1.1.128",  # Legacy Conv. PET
    "1.2.840.10008.5.1.4.1.1.130": "1.2.840.10008.5.1.4.1.1.128",  # Enhanced PET -> PET
}


def one_frame_each(volume: Volume, source_headers: Sequence[Dataset]) -> bool:
    """Whether the series is several Enhanced instances of one frame each, of classes
    :data:`CLASSIC_CLASS` knows (some scanners send Enhanced MR this way)."""
    return (
        is_enhanced(volume)
        and len(source_headers) > 1
        and all(
            number_of_frames(h) == 1 and str(h.get("SOPClassUID", "")) in CLASSIC_CLASS
            for h in source_headers
        )
    )


def seg_problem(volume: Volume, source_headers: Sequence[Dataset]) -> str | None:
    """Why no SEG can reference this series' images, or None when one can.

    highdicom builds a SEG over single-frame images or over the frames of one
    multi-frame image. Enhanced instances of one frame each are given to it as the
    single-frame images they are (:func:`as_single_frame`); several instances of many
    frames (one per stack) cannot be.
    """
    if not volume.is_2d and not all("FrameOfReferenceUID" in h for h in source_headers):
        # Type 1 in every cross-sectional image, but anonymisers and old scanners drop
        # it; a SEG must share its source's frame of reference. The job failed after
        # inference, asking for a bug report (acceptance pass).
        return "the images have no Frame of Reference UID (removed by an anonymiser?)"
    if is_enhanced(volume) and len(source_headers) > 1:
        if one_frame_each(volume, source_headers):
            return None
        return (
            f"the series is {len(source_headers)} Enhanced (multi-frame) instances; a SEG "
            "references one multi-frame image or single-frame images"
        )
    return None


def as_single_frame(header: Dataset) -> Dataset:
    """A one-frame Enhanced instance's header as highdicom reads a single-frame image:
    its frame's position, orientation and pixel measures at the top level, and the
    classic SOP class (so highdicom does not take it for a multi-frame image). The
    references the SEG makes to it are given its true class back afterwards
    (:func:`restore_sop_classes`). The caller's header is left as it is."""
    view = _shallow_copy(header)
    for sequence, keywords in (
        ("PlanePositionSequence", ("ImagePositionPatient",)),
        ("PlaneOrientationSequence", ("ImageOrientationPatient",)),
        ("PixelMeasuresSequence", ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices")),
    ):
        item = frame_macro(header, 1, sequence)
        for keyword in keywords if item is not None else ():
            if keyword in item and keyword not in view:
                view.add(item[keyword])
    if "SOPClassUID" in view:
        del view.SOPClassUID  # from the copy only
    view.SOPClassUID = CLASSIC_CLASS[str(header.SOPClassUID)]
    return view


def restore_sop_classes(dataset: Dataset, sources: Sequence[Dataset]) -> None:
    """Give every reference in ``dataset`` to one of ``sources`` that source's own SOP
    class (undoing :func:`as_single_frame` in what was written)."""
    true_class = {str(h.SOPInstanceUID): h.SOPClassUID for h in sources}
    for item in _items(dataset):
        uid = item.get("ReferencedSOPInstanceUID")
        if uid is not None and str(uid) in true_class and "ReferencedSOPClassUID" in item:
            item.ReferencedSOPClassUID = true_class[str(uid)]


def _items(dataset: Dataset):
    """Every item of every sequence in ``dataset``, depth first."""
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                yield item
                yield from _items(item)


def with_shared_geometry(source: Dataset) -> Dataset:
    """``source`` with its plane orientation and pixel measures in the Shared Functional
    Groups, as highdicom's SEG requires (it raises "Source images must have a shared
    orientation"). Enhanced MR often gives them per frame; the volume has already
    checked that every frame has the same, so the first frame's stand for all. The
    caller's header is left as it was."""
    shared_sequence = source.get("SharedFunctionalGroupsSequence")
    shared = shared_sequence[0] if shared_sequence else Dataset()
    first = source.PerFrameFunctionalGroupsSequence[0]
    missing = [
        keyword
        for keyword in ("PlaneOrientationSequence", "PixelMeasuresSequence")
        if keyword not in shared and keyword in first
    ]
    if not missing:
        return source
    view_shared = _shallow_copy(shared)
    for keyword in missing:
        view_shared.add(first[keyword])
    view = _shallow_copy(source)
    if "SharedFunctionalGroupsSequence" in view:
        del view.SharedFunctionalGroupsSequence  # from the copy only
    view.SharedFunctionalGroupsSequence = [view_shared]
    return view


def _shallow_copy(ds: Dataset) -> Dataset:
    """A new data set holding ``ds``'s elements (not copies): adding or deleting elements
    leaves ``ds`` alone. (``copy.copy`` and ``Dataset(ds)`` share the element dict, and
    setting an existing attribute changes the shared element in place.)"""
    copy = Dataset()
    for element in ds:
        copy.add(element)
    return copy


def in_frame_order(per_slice: NDArray, volume: Volume, source: Dataset) -> NDArray:
    """The slices of ``per_slice`` (volume order) that are frames of ``source``, in its
    frame order: ``result[f - 1]`` is the slice that came from frame ``f``. A frame the
    volume did not use stays zero, which a SEG omits as empty.
    """
    if per_slice.shape[0] != len(volume.sources):
        raise ValueError(f"{per_slice.shape[0]} slices given, the volume has {len(volume.sources)}")
    uid = str(source.SOPInstanceUID)
    frames = number_of_frames(source)
    picked = [
        (k, s.frame_number)
        for k, s in enumerate(volume.sources)
        if s.sop_instance_uid == uid and s.frame_number is not None
    ]
    if not picked:
        raise ValueError("none of the volume's slices is a frame of this instance")
    slices = np.array([k for k, _ in picked], dtype=np.int64)
    numbers = np.array([f for _, f in picked], dtype=np.int64)
    if numbers.min() < 1 or numbers.max() > frames:
        raise ValueError(f"frame numbers outside 1..{frames} (NumberOfFrames)")
    if slices.size == per_slice.shape[0] == frames and np.array_equal(
        numbers, np.arange(1, frames + 1)
    ):
        return per_slice  # the whole volume, already in frame order: no copy
    out = np.zeros((frames, *per_slice.shape[1:]), dtype=per_slice.dtype)
    out[numbers - 1] = per_slice[slices]
    return out
