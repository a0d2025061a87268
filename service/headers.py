"""Read the attributes radnode needs from an encoded data set, without pixel decoding.

The receive path calls :func:`parse_header` on every C-STORE. It parses element
headers with pydicom, converts only the handful of attributes the index and routing
use, and checks that the data set is whole: no element runs past the end of the
bytes, and native pixel data has the length its Rows, Columns, Samples per Pixel,
Bits Allocated and Number of Frames promise.
"""

from __future__ import annotations

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
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian
from pydicom.values import convert_value

from service.errors import UnreadableDataset
from service.records import InstanceHeader

_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
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


#: Sequences read when a multi-frame image needs them (:func:`_frame_facts`).
_FUNCTIONAL_GROUPS = (0x52009229, 0x52009230)


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
        "SamplesPerPixel", "NumberOfFrames", "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
    )
    if (tag := tag_for_keyword(keyword)) is not None
}  # fmt: skip


#: The elements read from a received data set; the others are skipped unread (their
#: lengths still have to add up). Halves pydicom's reading of a CT slice's header.
_SPECIFIC_TAGS = [tag for tag, _ in _READ.values()] + [_PIXEL_DATA]


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
                encodings = self._character_set() if vr in _CHARACTER_SET_VRS else None
                return convert_value(vr, raw, encodings)
            except Exception:
                pass  # Dataset.get below gives pydicom's answer (or its error)
        return self.dataset.get(keyword)

    def _character_set(self) -> list[str]:
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
    raw = values.dataset._dict.get(_PIXEL_DATA)  # type: ignore[call-overload]
    rows = _number(values, "Rows", int)
    if raw is None:
        if rows:
            raise UnreadableDataset("image attributes present but Pixel Data is missing")
        return
    uid = UID(transfer_syntax_uid)
    if uid.is_compressed:
        return  # encapsulated: fragment lengths were checked while parsing
    columns = _number(values, "Columns", int)
    bits = _number(values, "BitsAllocated", int)
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
    values = _Values(_read(dataset, transfer_syntax_uid))
    _check_pixel_data(values, transfer_syntax_uid)
    return _header(values)


def header_from_dataset(ds: Dataset) -> InstanceHeader:
    """The InstanceHeader of an already parsed data set (e.g. a spool file)."""
    return _header(_Values(ds))


def _orientation(values: Sequence[Any]) -> tuple[float, ...] | None:
    try:
        return tuple(float(v) for v in values) if len(values) == 6 else None
    except (TypeError, ValueError):
        return None


def _first_item(values: _Values, keyword: str) -> Dataset | None:
    """The first item of a functional groups sequence, or None (absent, empty, unreadable)."""
    try:
        sequence = values.dataset.get(keyword)
        return sequence[0] if sequence else None
    except Exception:
        return None


def _macro(groups: Dataset | None, sequence: str, keyword: str) -> Any:
    """``keyword`` of the first item of ``groups``' ``sequence`` (a functional group macro)."""
    try:
        items = groups.get(sequence) if groups is not None else None
        return items[0].get(keyword) if items else None
    except Exception:
        return None


@dataclass(frozen=True)
class _FrameFacts:
    """What an Enhanced (multi-frame) image keeps in its functional groups, not at the
    top level: the routing attributes a single-frame image has in its header."""

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
        region = _macro(groups, "FrameAnatomySequence", "AnatomicRegionSequence")
        try:
            body_part = str(region[0].get("CodeMeaning", "") or "").strip() if region else ""
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


def _frame_facts(values: _Values) -> _FrameFacts:
    """Orientation, thickness and anatomy of a multi-frame image's frames.

    The Shared Functional Groups describe every frame. An image whose frames differ (an
    MR with several stacks) has them per frame: the first frame's then stand for the
    series, as the first instance's do for single-frame images (the per-frame sequence
    is read only in that case; it has an item per frame). Legacy Converted images move
    Body Part Examined into the Frame Anatomy macro as a code: its meaning ("Abdomen")
    is what a body-part rule then sees.
    """
    facts = _FrameFacts.of(_first_item(values, "SharedFunctionalGroupsSequence"))
    if facts.complete:
        return facts
    return facts.or_else(_FrameFacts.of(_first_item(values, "PerFrameFunctionalGroupsSequence")))


def _header(ds: _Values) -> InstanceHeader:
    iop = _orientation(_multi(ds, "ImageOrientationPatient"))
    thickness = _number(ds, "SliceThickness", float)
    body_part = _text(ds, "BodyPartExamined")
    frames = max(_number(ds, "NumberOfFrames", int) or 1, 1)
    if frames > 1 and (iop is None or thickness is None or not body_part):
        facts = _frame_facts(ds)
        iop = iop if iop is not None else facts.orientation
        thickness = thickness if thickness is not None else facts.slice_thickness
        body_part = body_part or facts.body_part
    return InstanceHeader(
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        modality=_text(ds, "Modality"),
        body_part=body_part,
        series_description=_text(ds, "SeriesDescription"),
        series_number=_number(ds, "SeriesNumber", int),
        instance_number=_number(ds, "InstanceNumber", int),
        slice_thickness=thickness,
        image_type=_multi(ds, "ImageType"),
        image_orientation=iop,
        frame_count=frames,
        manufacturer=_text(ds, "Manufacturer"),
        manufacturer_model_name=_text(ds, "ManufacturerModelName"),
    )
