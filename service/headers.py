"""Read the attributes radnode needs from an encoded data set, without pixel decoding.

The receive path calls :func:`parse_header` on every C-STORE. It parses element
headers with pydicom, converts only the handful of attributes the index and routing
use, and checks that the data set is whole: no element runs past the end of the
bytes, and native pixel data has the length its Rows, Columns, Samples per Pixel,
Bits Allocated and Number of Frames promise.
"""

from __future__ import annotations

import functools
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_sequence_item
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian
from pydicom.values import convert_value

from service.errors import UnreadableDataset
from service.records import InstanceHeader

_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
#: Float and Double Float Pixel Data (Parametric Maps, PS3.3 C.7.6.3): 4 and 8 bytes
#: a sample, never encapsulated.
_FLOAT_PIXEL_DATA = {0x7FE00008: 4, 0x7FE00009: 8}
#: Attributes of the Image Pixel module other than Rows and Columns (Samples per
#: Pixel, Photometric Interpretation, Bits Allocated, Bits Stored, High Bit, Pixel
#: Representation): one present says "an image", whose pixel data must be there too.
_IMAGE_PIXEL_TAGS = (0x00280002, 0x00280004, 0x00280100, 0x00280101, 0x00280102, 0x00280103)
#: Spectroscopy Data: MR Spectroscopy has Rows and Columns of its own, and no pixels.
_SPECTROSCOPY_DATA = 0x56000020
#: Values longer than this (pixel data, above all) are skipped, not copied out of the
#: received bytes: only their lengths are checked. Saves ~0.07 ms per CT slice.
_SKIP_VALUES_OVER = 64 * 1024


#: A deflated data set may inflate to at most this. Deflate packs up to ~1000:1: a
#: 4 MB C-STORE inflated to 4 GB and minutes of parsing (found by review). No image a
#: sender deflates comes near it (Deflated Explicit VR is used for SR and small images).
MAX_INFLATED_BYTES = 512 * 1024 * 1024


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data, MAX_INFLATED_BYTES)
    except zlib.error as exc:
        raise UnreadableDataset(f"deflated data set could not be inflated: {exc}") from exc
    if inflater.unconsumed_tail:
        raise UnreadableDataset(
            f"deflated data set inflates beyond {MAX_INFLATED_BYTES // (1024 * 1024)} MiB"
        )
    return inflated


def _read(data: bytes, transfer_syntax_uid: str) -> Dataset:
    uid = UID(transfer_syntax_uid)
    if uid == DeflatedExplicitVRLittleEndian:
        data = _inflate(data)
    implicit = uid.is_implicit_VR if uid.is_transfer_syntax else False
    little = uid != ExplicitVRBigEndian
    stream = BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = read_dataset(
                stream,
                is_implicit_VR=implicit,
                is_little_endian=little,
                defer_size=_SKIP_VALUES_OVER,
                specific_tags=_SPECIFIC_TAGS,
            )
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise UnreadableDataset(f"not a parseable DICOM data set ({type(exc).__name__})") from exc
    if stream.tell() > len(data):  # a skipped value, too, must end within the data
        raise UnreadableDataset("data set is truncated: an element runs past the end")
    for raw in dataset._dict.values():
        length = getattr(raw, "length", _UNDEFINED_LENGTH)
        value = getattr(raw, "value", None)
        if length != _UNDEFINED_LENGTH and isinstance(value, bytes) and len(value) < length:
            raise UnreadableDataset(f"data set is truncated in element {raw.tag}")
    _undefer_sequences(dataset, data)
    return dataset


#: Shared and Per-frame Functional Groups Sequence: read when an Enhanced image needs
#: them (:func:`_with_frame_facts`).
_SHARED_GROUPS, _PER_FRAME_GROUPS = 0x52009229, 0x52009230
_FUNCTIONAL_GROUPS = (_SHARED_GROUPS, _PER_FRAME_GROUPS)


def _undefer_sequences(dataset: Dataset, data: bytes) -> None:
    """Give the functional groups their bytes if reading skipped them for their length.

    A sequence of defined length over :data:`_SKIP_VALUES_OVER` (the per-frame groups of
    a few hundred frames) is skipped like pixel data, and pydicom would later look for
    a file to read it from. Its bytes are right here (the checks above proved that).
    """
    for tag in _FUNCTIONAL_GROUPS:
        raw = dataset._dict.get(tag)  # type: ignore[call-overload]
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            start = raw.value_tell
            dataset._dict[tag] = raw._replace(value=data[start : start + raw.length])


#: Every attribute radnode reads from a header: keyword -> (tag, VR in PS3.6).
_READ: dict[str, tuple[int, str]] = {
    keyword: (tag, dictionary_VR(tag))
    for keyword in (
        "SpecificCharacterSet", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
        "SOPClassUID", "Modality", "BodyPartExamined", "SeriesDescription", "SeriesNumber",
        "InstanceNumber", "SliceThickness", "ImageType", "ImageOrientationPatient",
        "Manufacturer", "ManufacturerModelName", "Rows", "Columns", "BitsAllocated",
        "SamplesPerPixel", "NumberOfFrames", "ViewPosition", "LossyImageCompression",
    )
    if (tag := tag_for_keyword(keyword)) is not None
}  # fmt: skip


#: The elements read from a received data set; the others are skipped unread (their
#: lengths still have to add up). Halves pydicom's reading of a CT slice's header.
_SPECIFIC_TAGS = [tag for tag, _ in _READ.values()] + [
    *_FUNCTIONAL_GROUPS,
    _PIXEL_DATA,
    *_FLOAT_PIXEL_DATA,
    *_IMAGE_PIXEL_TAGS,
    _SPECTROSCOPY_DATA,
]


#: The VRs whose values pydicom decodes with the Specific Character Set (PS3.5 6.1.2.3).
_CHARACTER_SET_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})


class _Values:
    """The values of the attributes in :data:`_READ`, read from one data set.

    Why not ``Dataset.get``: it costs ~20 µs a value (keyword lookup, hooks, the
    character set looked up again for each), and the receive path reads ~20 of them
    per C-STORE: 0.3-0.4 ms of every instance (issue 11's profile). A raw element in
    its dictionary VR (or implicit) goes straight to pydicom's own converter,
    ``pydicom.values.convert_value``, with the data set's character set: what
    ``Dataset.get`` ends up calling. Anything else (an element already converted,
    another VR, a value that does not convert) takes ``Dataset.get`` and its handling.
    ``tests/test_headers.py`` compares the two on pydicom's test files.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._encodings: list[str] | None = None

    def get(self, keyword: str) -> Any:
        tag, vr = _READ[keyword]
        raw = self.dataset._dict.get(tag)  # type: ignore[call-overload]
        if raw is None:
            return None
        if isinstance(raw, RawDataElement) and raw.VR in (None, vr):
            try:
                encodings = self.character_set() if vr in _CHARACTER_SET_VRS else None
                return convert_value(vr, raw, encodings)
            except Exception:
                pass  # Dataset.get below gives pydicom's answer (or its error)
        return self.dataset.get(keyword)

    def character_set(self) -> list[str]:
        """The data set's Specific Character Set as Python codecs."""
        if self._encodings is None:
            self._encodings = convert_encodings(self.get("SpecificCharacterSet"))
        return self._encodings


def _text(values: _Values, keyword: str) -> str:
    try:
        value = values.get(keyword)
    except Exception:
        return ""
    return "" if value is None else str(value).strip()


def _number(values: _Values, keyword: str, kind: type) -> Any:
    try:
        value = values.get(keyword)
        return None if value in (None, "") else kind(value)
    except Exception:
        return None


def _multi(values: _Values, keyword: str) -> tuple[str, ...]:
    try:
        value = values.get(keyword)
    except Exception:
        return ()
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value.strip(),)
    return tuple(str(v).strip() for v in value)


def _check_pixel_data(values: _Values, transfer_syntax_uid: str) -> None:
    elements = values.dataset._dict
    raw = elements.get(_PIXEL_DATA)  # type: ignore[call-overload]
    if raw is None:
        floating = next((tag for tag in _FLOAT_PIXEL_DATA if tag in elements), None)
        if floating is not None:
            _check_pixel_length(values, elements[floating], bits=8 * _FLOAT_PIXEL_DATA[floating])
        elif _has_image_pixel_module(elements):
            # an image without its pixels: Success would tell the PACS a useless
            # instance is kept (acceptance pass: Rows, Columns and Pixel Data removed)
            raise UnreadableDataset("image attributes present but Pixel Data is missing")
        return
    uid = UID(transfer_syntax_uid)
    if uid.is_compressed:
        return  # encapsulated: fragment lengths were checked while parsing
    _check_pixel_length(values, raw, bits=_number(values, "BitsAllocated", int))


def _has_image_pixel_module(elements: dict[int, Any]) -> bool:
    """Any Image Pixel module attribute, or Rows and Columns of anything but MR
    Spectroscopy (whose data is Spectroscopy Data)."""
    if any(tag in elements for tag in _IMAGE_PIXEL_TAGS):
        return True
    sized = _READ["Rows"][0] in elements or _READ["Columns"][0] in elements
    return sized and _SPECTROSCOPY_DATA not in elements


def _check_pixel_length(values: _Values, raw: Any, *, bits: int | None) -> None:
    """Native pixel data as long as Rows x Columns x Samples x Frames x ``bits`` say."""
    rows = _number(values, "Rows", int)
    columns = _number(values, "Columns", int)
    if not rows or not columns or not bits:
        raise UnreadableDataset("Pixel Data present but Rows, Columns or Bits Allocated missing")
    samples = _number(values, "SamplesPerPixel", int) or 1
    frames = _number(values, "NumberOfFrames", int) or 1
    pixels = rows * columns * samples * frames
    expected = (pixels + 7) // 8 if bits == 1 else pixels * (bits // 8)
    length = getattr(raw, "length", None)  # a Pixel Data sent as a sequence has none
    if not isinstance(length, int):
        raise UnreadableDataset("Pixel Data is not a value (sent as a sequence?)")
    if length not in (expected, expected + 1):
        raise UnreadableDataset(
            f"Pixel Data has {length} bytes, its image attributes need {expected}"
        )


def parse_header(dataset: bytes, transfer_syntax_uid: str) -> InstanceHeader:
    """Parse ``dataset`` (encoded in ``transfer_syntax_uid``) into an InstanceHeader.

    UIDs are returned as found; the caller validates them. Raises
    :class:`UnreadableDataset` when the bytes are not a whole DICOM data set.
    """
    read = _read(dataset, transfer_syntax_uid)
    if not any(tag in read for tag in _IDENTIFYING):
        # Zeros or garbage that pydicom reads as an empty data set: not DICOM (C000),
        # not "Study Instance UID is missing" (C001), as the conformance statement says
        # (acceptance pass).
        raise UnreadableDataset("not a DICOM data set: none of its identifying UIDs is there")
    values = _Values(read)
    _check_pixel_data(values, transfer_syntax_uid)
    return _header(values)


#: Study, Series, SOP Instance and SOP Class UID: a data set with none of them is not one.
_IDENTIFYING = tuple(
    _READ[keyword][0]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
)


def header_from_dataset(ds: Dataset) -> InstanceHeader:
    """The InstanceHeader of an already parsed data set (e.g. a spool file)."""
    return _header(_Values(ds))


def _orientation(values: Sequence[Any]) -> tuple[float, ...] | None:
    try:
        return tuple(float(v) for v in values) if len(values) == 6 else None
    except (TypeError, ValueError):
        return None


def _first_item(values: _Values, tag: int) -> Dataset | None:
    """The first item of a functional groups sequence, or None (absent, empty, unreadable).

    Only that item is parsed out of a sequence still in its bytes: the per-frame groups
    have an item per frame, and pydicom spends ~30 µs on each (a 1000-frame image:
    30 ms on the receive path) where routing needs the first frame's.
    """
    dataset = values.dataset
    raw = dataset._dict.get(tag)  # type: ignore[call-overload]
    try:
        if isinstance(raw, RawDataElement) and raw.VR in (None, "SQ"):
            if not isinstance(raw.value, bytes) or not raw.value:
                return None
            implicit, little = dataset.original_encoding
            return read_sequence_item(
                BytesIO(raw.value),
                bool(implicit),
                little is not False,
                values.character_set(),
            )
        sequence = dataset.get(tag)
        return sequence.value[0] if sequence is not None and sequence.value else None
    except Exception:
        return None


def _macro(groups: Dataset | None, sequence: str, keyword: str) -> Any:
    """``keyword`` of the first item of ``groups``' ``sequence`` (a functional group macro)."""
    try:
        items = groups.get(sequence) if groups is not None else None
        return items[0].get(keyword) if items else None
    except Exception:
        return None


@functools.cache
def _body_parts_by_code() -> dict[tuple[str, str], str]:
    """(coding scheme, code value) -> Body Part Examined defined term (PS3.16 Annex L).

    From highdicom's copy of the table: it has no public accessor, so a highdicom that
    moves it leaves the code meaning in use (what the fallback below gives)."""
    try:
        from highdicom._standard_utils import get_anatomic_region_map

        return {
            (str(code.scheme_designator), str(code.value)): term
            for term, (code, _) in get_anatomic_region_map().items()
        }
    except Exception:
        return {}


def _body_part(region: Dataset) -> str:
    """An Anatomic Region code as the Body Part Examined term a single-frame image of the
    region would carry ("CHESTABDOMEN"), else its code meaning."""
    scheme = str(region.get("CodingSchemeDesignator", "") or "").strip()
    value = str(region.get("CodeValue", "") or "").strip()
    term = _body_parts_by_code().get((scheme, value))
    return term or str(region.get("CodeMeaning", "") or "").strip()


@dataclass(frozen=True)
class _FrameFacts:
    """The routing attributes a single-frame image has in its header, which an Enhanced
    image keeps in its functional groups."""

    orientation: tuple[float, ...] | None = None
    slice_thickness: float | None = None
    body_part: str = ""

    @classmethod
    def of(cls, groups: Dataset | None) -> _FrameFacts:
        """The facts of one Shared or Per-Frame Functional Groups item."""
        orientation = _orientation(
            _macro(groups, "PlaneOrientationSequence", "ImageOrientationPatient") or ()
        )
        try:
            thickness = float(_macro(groups, "PixelMeasuresSequence", "SliceThickness"))
        except (TypeError, ValueError):
            thickness = None
        try:
            region = _macro(groups, "FrameAnatomySequence", "AnatomicRegionSequence")
            body_part = _body_part(region[0]) if region else ""
        except Exception:
            body_part = ""
        return cls(orientation, thickness, body_part)

    @property
    def complete(self) -> bool:
        return None not in (self.orientation, self.slice_thickness) and bool(self.body_part)

    def or_else(self, other: _FrameFacts) -> _FrameFacts:
        """These facts, with ``other``'s where these have none."""
        return _FrameFacts(
            self.orientation if self.orientation is not None else other.orientation,
            self.slice_thickness if self.slice_thickness is not None else other.slice_thickness,
            self.body_part or other.body_part,
        )


def _with_frame_facts(values: _Values, top: _FrameFacts) -> _FrameFacts:
    """``top`` (the top-level attributes), completed from an Enhanced image's groups.

    The Shared Functional Groups describe every frame. An image whose frames differ (an
    MR with several stacks) has them per frame: the first frame's then stand for the
    series, as the first instance's do for single-frame images. Legacy Converted images
    move Body Part Examined into the Frame Anatomy macro as a code, mapped back to the
    defined term here. Enhanced SOP classes use the groups whatever their frame count.
    """
    if top.complete:
        return top
    present = values.dataset._dict
    if _SHARED_GROUPS not in present and _PER_FRAME_GROUPS not in present:
        return top
    facts = top.or_else(_FrameFacts.of(_first_item(values, _SHARED_GROUPS)))
    if facts.complete:
        return facts
    return facts.or_else(_FrameFacts.of(_first_item(values, _PER_FRAME_GROUPS)))


def _header(ds: _Values) -> InstanceHeader:
    facts = _with_frame_facts(
        ds,
        _FrameFacts(
            _orientation(_multi(ds, "ImageOrientationPatient")),
            _number(ds, "SliceThickness", float),
            _text(ds, "BodyPartExamined"),
        ),
    )
    return InstanceHeader(
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        modality=_text(ds, "Modality"),
        body_part=facts.body_part,
        series_description=_text(ds, "SeriesDescription"),
        series_number=_number(ds, "SeriesNumber", int),
        instance_number=_number(ds, "InstanceNumber", int),
        slice_thickness=facts.slice_thickness,
        image_type=_multi(ds, "ImageType"),
        image_orientation=facts.orientation,
        frame_count=max(_number(ds, "NumberOfFrames", int) or 1, 1),
        manufacturer=_text(ds, "Manufacturer"),
        manufacturer_model_name=_text(ds, "ManufacturerModelName"),
        view_position=_text(ds, "ViewPosition"),
        lossy_compressed=_text(ds, "LossyImageCompression") == "01",
    )
