"""Secondary Capture RGB images (highdicom SCImage) for viewers that show nothing else.

Many PACS viewers cannot draw a SEG or read an SR; every viewer shows an image. So:

* **segmentation**: up to :data:`MAX_IMAGES` key slices (for each label, the slice with
  its largest area; labels sharing a slice share an image) with each segment drawn as a
  translucent fill and a solid contour in the SEG's display colours, and a legend.
* **classification**: the source radiograph with the class-activation ``heatmap``
  blended over it (where the pipeline made one) and the probabilities.
* **reconstruction**: none (the derived series is itself viewable).

Each image is windowed for reading (CT: abdomen W400/L40; radiographs and others: the
1st-99th percentile), scaled so that the banner is legible, carries a burned-in banner
naming the algorithm and "NOT FOR DIAGNOSTIC USE" (so Burned In Annotation is YES),
and references its source image (Source Image Sequence, purpose DCM 121322; with the
Referenced Frame Number when the source is an Enhanced multi-frame image).
Text is drawn with Pillow's built-in font.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from service.pipeline.result import PipelineResult, TaskKind
from service.pipeline.volume import Volume
from service.writers.lossy import lossy_history, mark_lossy
from service.writers.provenance import (
    MANUFACTURER,
    Provenance,
    patient_orientation,
)
from service.writers.seg import color_of
from service.writers.sources import SliceSource, slice_sources, source_image_items
from service.writers.sr import SegmentStats

#: At most this many SC images per result.
MAX_IMAGES = 5
#: CT abdomen window (width, level) in HU.
CT_WINDOW = (400.0, 40.0)
#: Images are scaled so that their longer side lies within these bounds (pixels).
MIN_SIDE, MAX_SIDE = 512, 1024
FILL_ALPHA = 0.35
HEATMAP_ALPHA = 0.5
#: Heat (0-1) below which nothing is drawn.
HEATMAP_FLOOR = 0.25


def build_sc_images(
    result: PipelineResult,
    volume: Volume,
    source_headers: Sequence[Dataset],
    provenance: Provenance,
    *,
    stats: dict[int, SegmentStats] | None = None,
) -> list[hd.sc.SCImage]:
    """The SC images of ``result`` (see the module docstring); may be empty."""
    sources = slice_sources(volume, source_headers)
    if result.kind is TaskKind.SEGMENTATION and result.label_map is not None:
        return _segmentation_images(result, volume, sources, provenance, stats or {})
    if result.kind is TaskKind.CLASSIFICATION:
        return _classification_images(result, volume, sources, provenance)
    return []


# --------------------------------------------------------------------------- kinds


def key_slices(label_map: NDArray, values: Sequence[int], limit: int = MAX_IMAGES) -> list[int]:
    """For each label value (in order), the slice with its largest area; unique, sorted."""
    chosen: list[int] = []
    for value in values:
        # slice by slice: count_nonzero over a whole slice is vectorised, with an
        # axis it sums int64s (0.18 s -> 0.03 s for four labels over 300 x 512^2)
        areas = np.array([np.count_nonzero(plane == value) for plane in label_map])
        if areas.max(initial=0) == 0:
            continue
        k = int(np.argmax(areas))
        if k not in chosen:
            chosen.append(k)
        if len(chosen) == limit:
            break
    return sorted(chosen)


def _segmentation_images(
    result: PipelineResult,
    volume: Volume,
    sources: Sequence[SliceSource],
    provenance: Provenance,
    stats: dict[int, SegmentStats],
) -> list[hd.sc.SCImage]:
    label_map = result.label_map
    assert label_map is not None
    slices = key_slices(label_map, [label.value for label in result.labels])
    if not slices:  # nothing found: show the middle slice, so the viewer says so
        slices = [label_map.shape[0] // 2]
    images = []
    for number, k in enumerate(slices, start=1):
        rgb = _grey_rgb(volume.array[k], volume.modality)
        legend = []
        for position, label in enumerate(result.labels):
            mask = label_map[k] == label.value
            if not mask.any():
                continue
            color = color_of(position)
            rgb = _overlay_mask(rgb, mask, color)
            stat = stats.get(label.value)
            text = f"{label.name}: {stat.volume_ml:.1f} mL" if stat else label.name
            legend.append((text, color))
        if not legend:
            legend.append(("no finding segmented", (255, 255, 255)))
        image, scale = _scaled(rgb)
        _banner(image, provenance, legend, image_label(sources[k]))
        images.append(_sc_image(image, scale, sources[k], provenance, number, volume))
    return images


def image_label(source: SliceSource) -> str:
    """Which source image an overlay shows, as the viewer numbers it: its series and
    Instance Number (and frame). radnode's own slice index ("slice 78/100") sent a
    reader 55 slices away on a feet-first or top-down numbered series (acceptance
    pass)."""
    header = source.header
    series = header.get("SeriesNumber")
    number = header.get("InstanceNumber")
    parts = [f"series {series}"] if series not in (None, "") else []
    parts.append(f"image {number}" if number not in (None, "") else "image (no number)")
    if source.frame_number is not None:
        parts.append(f"frame {source.frame_number}")
    return ", ".join(parts)


def _classification_images(
    result: PipelineResult,
    volume: Volume,
    sources: Sequence[SliceSource],
    provenance: Provenance,
) -> list[hd.sc.SCImage]:
    heatmap = result.heatmap
    k = 0
    if heatmap is not None and heatmap.shape[0] > 1:
        k = int(np.argmax(heatmap.reshape(heatmap.shape[0], -1).max(axis=1)))
    # Scaled to the displayed size first, then blended: a 2000 x 2000 radiograph's
    # heat map is blended on a quarter of the pixels (the map is smooth; 0.13 s -> 0.03 s).
    # Scaled while still grey: a third of the pixels to resample (the same picture:
    # every channel of a grey RGB image is resampled alike).
    grey, scale = _scaled_grey(_grey(volume.array[k], volume.modality))
    image = grey.convert("RGB")
    if heatmap is not None:
        heat = Image.fromarray(np.ascontiguousarray(heatmap[k], dtype=np.float32), mode="F")
        heat = heat.resize(image.size, Image.Resampling.BILINEAR)
        image = Image.fromarray(_overlay_heatmap(np.asarray(image), np.asarray(heat)), "RGB")
    legend = [
        (f"{label.name}: {100.0 * p:.1f} %" + (" (present)" if present else ""), (255, 255, 255))
        for label, p, present in zip(
            result.labels, result.probabilities or (), result.findings_present(), strict=True
        )
    ]
    detail = ""
    if heatmap is not None:
        # an all-zero map draws nothing: say so rather than name a map that is not there
        shown = float(np.nanmax(heatmap[k])) >= 0.5 / 255  # below: no grey level changes
        detail = "class activation map" if shown else "no class activation to show"
    _banner(image, provenance, legend, detail)
    return [_sc_image(image, scale, sources[k], provenance, 1, volume)]


# --------------------------------------------------------------------------- pixels


def _grey_rgb(pixels: NDArray, modality: str) -> NDArray[np.uint8]:
    """Window a slice to 8 bits (CT W400/L40, else percentiles) as RGB."""
    grey8 = _grey(pixels, modality)
    return np.repeat(grey8[:, :, np.newaxis], 3, axis=2)


def _grey(pixels: NDArray, modality: str) -> NDArray[np.uint8]:
    """Window a slice to 8 bits: CT W400/L40, else its 1st to 99th percentile."""
    if modality.upper() == "CT":
        width, level = CT_WINDOW
        low, high = level - width / 2, level + width / 2
    else:
        low, high = percentiles(pixels, (1.0, 99.0))
        if high <= low:
            high = low + 1.0
    values = pixels.astype(np.float32, copy=False)
    grey = np.clip((values - low) / (high - low), 0.0, 1.0)
    return (grey * 255.0 + 0.5).astype(np.uint8)


#: Integer images whose values span at most this many levels are counted, not sorted.
_COUNTED_LEVELS = 1 << 20


def percentiles(pixels: NDArray, qs: Sequence[float]) -> tuple[float, ...]:
    """``np.percentile(pixels, qs)`` (linear interpolation), found from a histogram of
    the values when they are integers of a modest range: a 2000 x 2000 radiograph's
    window took 0.06 s of partial sorting, its histogram takes a few milliseconds."""
    if pixels.dtype.kind not in "iu" or pixels.size == 0:
        return tuple(float(v) for v in np.percentile(pixels, qs))
    low, high = int(pixels.min()), int(pixels.max())
    if high - low >= _COUNTED_LEVELS:
        return tuple(float(v) for v in np.percentile(pixels, qs))
    shifted = pixels.astype(np.int64, copy=False).ravel() - low
    below = np.cumsum(np.bincount(shifted, minlength=high - low + 1))  # values <= level
    found = []
    for q in qs:
        rank = (pixels.size - 1) * q / 100.0
        lower, fraction = int(np.floor(rank)), rank - np.floor(rank)
        at_lower = int(np.searchsorted(below, lower, side="right"))
        at_upper = int(np.searchsorted(below, min(lower + 1, pixels.size - 1), side="right"))
        found.append(low + at_lower + fraction * (at_upper - at_lower))
    return tuple(float(v) for v in found)


def _overlay_mask(
    rgb: NDArray[np.uint8], mask: NDArray[np.bool_], color: tuple[int, int, int]
) -> NDArray[np.uint8]:
    out = rgb.astype(np.float32)
    tint = np.asarray(color, dtype=np.float32)
    out[mask] = (1 - FILL_ALPHA) * out[mask] + FILL_ALPHA * tint
    out[_contour(mask)] = tint
    return out.astype(np.uint8)


def _contour(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Mask pixels with a 4-neighbour outside the mask."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~inner


def _overlay_heatmap(rgb: NDArray[np.uint8], heatmap: NDArray) -> NDArray[np.uint8]:
    """Blend a [0, 1] map in a blue-green-yellow-red ramp, weighted by its value above
    :data:`HEATMAP_FLOOR`.

    The map is quantised to 256 levels and the ramp and weights looked up: the same
    picture to within 2 of 255 grey levels, in a fifth of the time of computing the
    ramp per pixel (0.58 s -> 0.12 s for a 2000 x 2000 radiograph, most of its
    result writing)."""
    h = np.clip(np.nan_to_num(heatmap.astype(np.float32, copy=False)), 0.0, 1.0)
    index = (h * 255.0 + 0.5).astype(np.uint8)
    levels = np.arange(256, dtype=np.float32) / 255.0
    ramp = np.stack([np.clip(1.5 - np.abs(4 * levels - c), 0, 1) for c in (3, 2, 1)], axis=1)
    # Below HEATMAP_FLOOR the picture stays grey: a class activation map is rarely zero
    # anywhere, and a blue veil over the whole radiograph hid the anatomy (acceptance
    # pass); above it the weight rises to HEATMAP_ALPHA at the hottest.
    alpha = HEATMAP_ALPHA * np.clip((levels - HEATMAP_FLOOR) / (1.0 - HEATMAP_FLOOR), 0.0, 1.0)
    out = rgb * (1 - alpha)[index][:, :, np.newaxis]
    out += (alpha[:, np.newaxis] * ramp * 255.0)[index]
    return np.clip(out, 0, 255).astype(np.uint8)


def _scaled(rgb: NDArray[np.uint8]) -> tuple[Image.Image, float]:
    """A Pillow image whose longer side is within [MIN_SIDE, MAX_SIDE]; and the scale."""
    return _fit(Image.fromarray(rgb, mode="RGB"))


def _scaled_grey(grey: NDArray[np.uint8]) -> tuple[Image.Image, float]:
    """:func:`_scaled` of a grey image (mode L)."""
    return _fit(Image.fromarray(grey, mode="L"))


def _fit(image: Image.Image) -> tuple[Image.Image, float]:
    longer = max(image.size)
    scale = 1.0
    if longer < MIN_SIDE:
        scale = float(int(np.ceil(MIN_SIDE / longer)))
    elif longer > MAX_SIDE:
        scale = MAX_SIDE / longer
    if scale != 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
        image = image.resize(size, resample)
    return image, scale


#: Letters NFKD does not take apart into a base letter and its marks.
_FOLDED = str.maketrans({"ß": "ss", "Æ": "AE", "æ": "ae", "Ø": "O", "ø": "o", "Œ": "OE",
                         "œ": "oe", "Ł": "L", "ł": "l", "Đ": "D", "đ": "d", "Þ": "Th",
                         "þ": "th", "ı": "i"})  # fmt: skip


def drawable(text: str) -> str:
    """``text`` in the letters Pillow's built-in font draws (ASCII): accents dropped,
    ß as ss, anything else ``?``. Why: it drew "Épanchement pleural (größer)" as boxes
    in place of É, ö and ß (acceptance pass); the SR, SEG and HL7 result keep the text
    as it is, and the image needs no font installed on the node."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_FOLDED))
    base = "".join(c for c in decomposed if not unicodedata.combining(c))
    return base.encode("ascii", "replace").decode("ascii")


def _banner(
    image: Image.Image,
    provenance: Provenance,
    legend: list[tuple[str, tuple[int, int, int]]],
    detail: str,
) -> None:
    """Burn the algorithm's name, NOT FOR DIAGNOSTIC USE, and the legend into the image."""
    size = max(12, image.width // 36)
    font = ImageFont.load_default(size=size)
    lines = [
        (f"{provenance.name} {provenance.version} - AI result", (255, 255, 255)),
        ("NOT FOR DIAGNOSTIC USE", (255, 80, 80)),
        *legend,
    ]
    if detail:
        lines.append((detail, (200, 200, 200)))
    lines = [(drawable(text), color) for text, color in lines]
    draw = ImageDraw.Draw(image, "RGBA")
    pad = size // 3
    height = len(lines) * (size + pad) + pad
    width = max(draw.textlength(text, font=font) for text, _ in lines) + 2 * pad
    draw.rectangle((0, 0, min(image.width, int(width)), height), fill=(0, 0, 0, 170))
    y = pad
    for text, color in lines:
        draw.text((pad, y), text, fill=color, font=font)
        y += size + pad


def _sc_image(
    image: Image.Image,
    scale: float,
    slice_source: SliceSource,
    provenance: Provenance,
    number: int,
    volume: Volume,
) -> hd.sc.SCImage:
    source = slice_source.header
    pixel_spacing = None
    if volume.pixel_spacing_source != "default":
        # Volume spacing is (x, y); DICOM Pixel Spacing is (row, column) = (y, x).
        pixel_spacing = (volume.spacing[1] / scale, volume.spacing[0] / scale)
    # A frame of an Enhanced image has its orientation in the functional groups, which
    # the volume has read: its row and column axes are the frame's.
    frame_axes = _row_column(volume) if slice_source.frame_number is not None else None
    orientation = patient_orientation(source, frame_axes)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.asarray(image, dtype=np.uint8),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=provenance.uid("series:sc"),
        series_number=provenance.series_number("SC"),
        sop_instance_uid=provenance.uid("sc", number),
        instance_number=number,
        manufacturer=MANUFACTURER,
        pixel_spacing=pixel_spacing,
        # highdicom takes one letter per direction; DICOM allows several for an oblique
        # plane (PS3.3 C.7.6.1.1.1), set in full below. An oblique series lost all its
        # DICOM results to highdicom's ValueError (found by review).
        patient_orientation=tuple(value[0] for value in orientation),
        transfer_syntax_uid=hd.UID("1.2.840.10008.1.2.1"),
        **provenance.common_kwargs("SC"),
    )
    # highdicom's from_ref_dataset copies a few patient and study attributes; the SEG
    # and SR carry the whole modules (Issuer of Patient ID, Study Description, ...), so
    # must the SC, or a PACS that keys patients by ID and issuer files it elsewhere
    # (found by review: dcentvfy "present in one instance but not the other").
    sc.copy_patient_and_study_information(source)
    sc.PatientOrientation = list(orientation)
    sc.BurnedInAnnotation = "YES"
    sc.Laterality = _series_laterality(source)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ImageComments = provenance.banner
    sc.SourceImageSequence = source_image_items([slice_source])
    mark_lossy(sc, lossy_history([source]))
    return sc


def _series_laterality(source: Dataset) -> str | None:
    """General Series Laterality (Type 2C, R or L): the source's; else the side of a
    one-sided image (a mammogram, a hand radiograph carries Image Laterality, which
    the SC has no module for), so the overlay is not filed without its side (acceptance
    pass); else empty, as dciodvfy wants it (absent is an error there, empty a
    warning)."""
    for keyword in ("Laterality", "ImageLaterality"):
        side = str(source.get(keyword) or "").strip().upper()
        if side in ("R", "L"):
            return side
    return None


def _row_column(volume: Volume) -> tuple[float, ...] | None:
    """Image Orientation (Patient) of the volume's slices: its x and y axes (LPS)."""
    if volume.is_2d:
        return None
    d = volume.direction
    return (d[0], d[3], d[6], d[1], d[4], d[7])
