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

from service.pipeline.volume import Volume
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


def multiframe_source(volume: Volume, source_headers: Sequence[Dataset]) -> Dataset | None:
    """The one multi-frame instance the volume's slices are frames of, or None when the
    slices are single-frame images.

    Raises ValueError for a series of several multi-frame instances (an MR sent as one
    instance per stack): a SEG, like a derived image, is made from one multi-frame
    source (highdicom's rule as well), so there is no single frame order to write in.
    """
    if all(s.frame_number is None for s in volume.sources):
        return None
    if len(source_headers) != 1:
        raise ValueError(
            f"the series is {len(source_headers)} multi-frame instances; a SEG or derived "
            "image is written for a series of single-frame images or one multi-frame image"
        )
    return source_headers[0]


def in_frame_order(per_slice: NDArray, volume: Volume, source: Dataset) -> NDArray:
    """``per_slice`` (slice order, as the volume) rearranged into ``source``'s frames.

    ``result[f - 1]`` is the slice that came from frame ``f``. A frame the volume did not
    use stays zero, which a SEG omits as empty.
    """
    frames = int(source.NumberOfFrames)
    if per_slice.shape[0] != len(volume.sources):
        raise ValueError(f"{per_slice.shape[0]} slices given, the volume has {len(volume.sources)}")
    numbers = np.array([s.frame_number for s in volume.sources], dtype=np.int64)
    if numbers.min() < 1 or numbers.max() > frames:
        raise ValueError(f"frame numbers outside 1..{frames} (NumberOfFrames)")
    if numbers.size == frames and np.array_equal(numbers, np.arange(1, frames + 1)):
        return per_slice  # already in frame order: no copy
    out = np.zeros((frames, *per_slice.shape[1:]), dtype=per_slice.dtype)
    out[numbers - 1] = per_slice
    return out
