"""DICOM Segmentation (binary) from a segmentation result's label map, with highdicom.

One segment per :class:`~service.pipeline.result.Label` that has at least one voxel,
numbered 1.. in label order (the label's voxel value need not be consecutive; the
mapping is kept in :class:`SegResult`). Each segment carries the bundle's coded
category/type (fallback SCT 85756007 "Tissue" for both), algorithm type AUTOMATIC with
the Algorithm Identification Sequence from :mod:`service.writers.provenance`, a
deterministic Tracking UID (the SR's measurement group uses the same one), and a
display colour that matches the Secondary Capture overlay.

Frames are the source slices in ``volume.sources`` order (``label_map[k]`` lies on
``source_headers[k]``), so highdicom references each source image per frame, keeps the
source's Frame of Reference and plane positions, and omits frames where a segment is
empty. Labels with no voxel get no segment (a segment without frames is not useful,
and highdicom refuses a SEG whose every frame is empty): :func:`write_seg` returns
``None`` when nothing was segmented at all.

An Enhanced (multi-frame) source is one instance whose frames are the slices: the label
map is put back into the source's frame order (:mod:`service.writers.sources`), and
highdicom then takes each frame's position from the source's functional groups and
references the source frame by number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from service.pipeline.result import Label, PipelineResult
from service.pipeline.volume import Volume
from service.writers.provenance import MANUFACTURER, Provenance, clip_lo, code, label_code
from service.writers.sources import (
    as_single_frame,
    in_frame_order,
    is_enhanced,
    one_frame_each,
    restore_sop_classes,
    seg_problem,
    with_shared_geometry,
)

#: When a bundle gives no codes: the segmented property category. The type is the
#: label's private code (:func:`~service.writers.provenance.label_finding`), so the SEG,
#: the SR and the HL7 result tell uncoded segments apart by the same code (every one was
#: SCT "Tissue", which the HL7 result did not say: acceptance pass).
FALLBACK_CATEGORY = hd.sr.CodedConcept("85756007", "SCT", "Tissue")

#: Segment colours (RGB), shared with the SC overlay so both look the same.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
)


def color_of(position: int) -> tuple[int, int, int]:
    """Colour of the ``position``-th label (0-based, in the bundle's label order)."""
    return PALETTE[position % len(PALETTE)]


@dataclass(frozen=True, eq=False)
class SegResult:
    """The SEG dataset and which label went to which segment number."""

    dataset: hd.seg.Segmentation
    #: label value -> segment number
    segment_numbers: dict[int, int]


def segment_category(label: Label) -> hd.sr.CodedConcept:
    return code(label.category) if label.category is not None else FALLBACK_CATEGORY


def build_seg(
    result: PipelineResult,
    volume: Volume,
    source_headers: Sequence[Dataset],
    provenance: Provenance,
    voxel_counts: dict[int, int] | None = None,
) -> SegResult | None:
    """Build the SEG of ``result.label_map`` over ``source_headers``, or None if empty."""
    label_map = result.label_map
    if label_map is None:
        raise ValueError("a SEG needs a label map")
    if label_map.shape[0] != len(volume.sources):
        raise ValueError(
            f"label map has {label_map.shape[0]} slices, the volume {len(volume.sources)}"
        )
    problem = seg_problem(volume, source_headers)
    if problem is not None:
        raise ValueError(problem)
    counts = voxel_counts if voxel_counts is not None else result.voxel_counts()
    present = [
        (position, label)
        for position, label in enumerate(result.labels)
        if counts.get(label.value, 0) > 0
    ]
    if not present:
        return None
    numbers: dict[int, int] = {}
    descriptions = []
    for number, (position, label) in enumerate(present, start=1):
        numbers[label.value] = number
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=clip_lo(label.name),
                segmented_property_category=segment_category(label),
                segmented_property_type=label_code(label),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=provenance.algorithm_identification(),
                tracking_uid=provenance.uid("tracking", label.value),
                tracking_id=clip_lo(label.name),
                display_color=hd.color.CIELabColor.from_rgb(*color_of(position)),
            )
        )
    # Label values -> consecutive segment numbers. Usually they are the same already
    # (labels 1..n, all present): then the label map itself is the pixel array, with no
    # second volume-sized copy; otherwise one lookup-table pass.
    if (
        all(value == number for value, number in numbers.items())
        and (label_map.dtype in (np.uint8, np.uint16))
        and int(label_map.max(initial=0)) <= len(numbers)
    ):
        segments = label_map
    else:
        lut = np.zeros(int(label_map.max(initial=0)) + 1, dtype=np.uint16)
        for value, number in numbers.items():
            lut[value] = number
        segments = lut[label_map].astype(np.uint8 if len(present) < 256 else np.uint16)
    source_images = list(source_headers)
    one_frame = one_frame_each(volume, source_headers)
    if one_frame:  # Enhanced instances of a frame each: single-frame images to highdicom
        source_images = [as_single_frame(h) for h in source_headers]
    elif is_enhanced(volume):  # one multi-frame source (seg_problem): back to its frames
        segments = in_frame_order(segments, volume, source_headers[0])
        source_images = [with_shared_geometry(source_headers[0])]
    pixel_array = segments if segments.shape[0] > 1 else segments[0]
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=provenance.uid("series:seg"),
        series_number=provenance.series_number("SEG"),
        sop_instance_uid=provenance.uid("seg"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=provenance.model_name,
        software_versions=provenance.software_versions,
        device_serial_number=provenance.device_uid[-16:],
        content_label="AI_SEGMENTATION",
        content_description=clip_lo(f"{provenance.name} {provenance.version} AI result"),
        content_creator_name=None,
        omit_empty_frames=True,
        series_description=provenance.series_description("SEG"),
        specific_character_set="ISO_IR 192",
        contributing_equipment=[provenance.contributing_equipment()],
    )
    if one_frame:
        restore_sop_classes(seg, source_headers)
    return SegResult(dataset=seg, segment_numbers=numbers)
