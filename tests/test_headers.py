"""The header reader converts values as pydicom does.

:mod:`service.headers` converts the attributes it needs straight from pydicom's raw
elements (``pydicom.values.convert_value``) instead of through ``Dataset.get`` (issue
11: ~0.2 ms of every C-STORE). These tests hold the fast path to pydicom's answer on
every file pydicom ships (transfer syntaxes, character sets, odd and broken values)
and on values in other character sets made here.
"""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from service.errors import UnreadableDataset
from service.headers import header_from_dataset, parse_header

PYDICOM_DATA = Path(pydicom.__file__).parent / "data"
SHIPPED = sorted(
    [*PYDICOM_DATA.glob("test_files/*.dcm"), *PYDICOM_DATA.glob("charset_files/*.dcm")]
)


def _converted(path: Path) -> Dataset:
    """The file with every element already converted by pydicom (``Dataset.get``'s
    path: the header reader's fast path does not apply to converted elements)."""
    ds = dcmread(path, force=True)
    for _ in ds:  # iterating converts each raw element in place
        pass
    return ds


def test_every_file_pydicom_ships_gives_the_same_header_both_ways() -> None:
    compared = 0
    for path in SHIPPED:
        try:
            reference = header_from_dataset(_converted(path))
        except Exception:
            continue  # a file pydicom itself cannot convert (deliberately broken)
        fast = header_from_dataset(dcmread(path, force=True))
        assert fast == reference, path.name
        compared += 1
    assert compared >= 80, f"only {compared} of {len(SHIPPED)} files compared"


@pytest.mark.parametrize(
    ("charset", "description", "manufacturer"),
    [
        ("ISO_IR 100", "Thorax ärztlich", "Société Générale d'Imagerie"),
        ("ISO_IR 192", "Грудная клетка", "医療機器"),
        (["", "ISO 2022 IR 87"], "胸部ＣＴ", "ＡＢＣ社"),
        ("ISO_IR 144", "Грудная клетка", "Завод"),
    ],
)
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_text_in_other_character_sets_is_decoded_as_pydicom_does(
    charset: str | list[str], description: str, manufacturer: str, syntax: str
) -> None:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SpecificCharacterSet = charset
    ds.SeriesDescription = description
    ds.Manufacturer = manufacturer
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    encoded = dcmread(BytesIO(buffer.getvalue()))
    body = buffer.getvalue()[encoded.file_meta.FileMetaInformationGroupLength + 144 :]

    header = parse_header(body, syntax)

    assert header.series_description == description
    assert header.manufacturer == manufacturer
    assert header == header_from_dataset(_converted_bytes(buffer.getvalue()))


def _converted_bytes(data: bytes) -> Dataset:
    ds = dcmread(BytesIO(data))
    for _ in ds:
        pass
    return ds


def test_a_value_sent_as_un_is_read() -> None:
    """An explicit VR that is not the dictionary's (UN, as some routers send) still
    gives the value."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds["SeriesNumber"].VR = "UN"
    ds["SeriesNumber"].value = b"42"
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    body = buffer.getvalue()[ds.file_meta.FileMetaInformationGroupLength + 144 :]

    assert parse_header(body, ExplicitVRLittleEndian).series_number == 42


def test_pixel_data_sent_as_a_sequence_is_refused_as_unreadable() -> None:
    """Explicit VR SQ of undefined length for Pixel Data: pydicom reads it as a
    sequence, which has no length, and an AttributeError reached the SCP instead of a
    'cannot understand' status (found by review)."""

    def element(tag: int, vr: bytes, value: bytes) -> bytes:
        return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value

    body = b"".join([
        element(0x00080016, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0"),
        element(0x00080018, b"UI", b"1.2.3.4\0"),
        element(0x00280010, b"US", struct.pack("<H", 2)),
        element(0x00280011, b"US", struct.pack("<H", 2)),
        element(0x00280100, b"US", struct.pack("<H", 8)),
        struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"SQ", 0, 0xFFFFFFFF),
        struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF),
        struct.pack("<HHI", 0xFFFE, 0xE00D, 0),
        struct.pack("<HHI", 0xFFFE, 0xE0DD, 0),
    ])  # fmt: skip
    with pytest.raises(UnreadableDataset, match="Pixel Data"):
        parse_header(body, ExplicitVRLittleEndian)


def test_a_radiographs_view_position_reaches_the_series_that_routing_reads(tmp_path) -> None:
    from service.index import StudyIndex
    from service.records import StoredInstance
    from service.testing import write_radiograph

    path = write_radiograph(tmp_path / "cxr.dcm", rows=64, columns=64)
    ds = dcmread(path)
    ds.ViewPosition = "LL"
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    body = buffer.getvalue()[ds.file_meta.FileMetaInformationGroupLength + 144 :]
    header = parse_header(body, ds.file_meta.TransferSyntaxUID)
    assert header.view_position == "LL"
    index = StudyIndex(tmp_path / "index.sqlite3")
    index.add_instance(StoredInstance(header, str(path), 1, ExplicitVRLittleEndian, "CR"))
    (series,) = index.series_of(header.study_uid)
    assert series.view_position == "LL"
    index.close()


def test_a_series_compressed_lossily_by_dcmtk_routes_as_acquired(tmp_path) -> None:
    """``dcmcjpeg`` (lossy JPEG baseline) turns ORIGINAL into DERIVED and says Lossy
    Image Compression 01: read from the received bytes and indexed, the series is the
    scanner's and a CT route takes it (acceptance pass: it was skipped as derived)."""
    import subprocess

    from service.index import StudyIndex
    from service.records import StoredInstance
    from service.routing import RouteRule
    from service.testing import write_ct_series

    (original,) = write_ct_series(tmp_path, slices=1, rows=64, columns=64)
    compressed = tmp_path / "lossy.dcm"
    subprocess.run(["dcmcjpeg", "+eb", str(original), str(compressed)], check=True)
    ds = dcmread(compressed)
    body = compressed.read_bytes()[ds.file_meta.FileMetaInformationGroupLength + 144 :]
    header = parse_header(body, ds.file_meta.TransferSyntaxUID)
    assert header.image_type[:2] == ("DERIVED", "PRIMARY") and header.lossy_compressed
    index = StudyIndex(tmp_path / "index.sqlite3")
    index.add_instance(
        StoredInstance(header, str(compressed), 1, ds.file_meta.TransferSyntaxUID, "CT")
    )
    (series,) = index.series_of(header.study_uid)
    index.close()
    assert series.lossy_compressed
    route = RouteRule.model_validate({"name": "ct", "pipeline": "p", "match": {"Modality": "CT"}})
    assert route.mismatches(series) == []


@pytest.mark.parametrize("body", [bytes(256), b"\xff" * 64 + bytes(192)])
def test_zeros_or_garbage_read_as_an_empty_data_set_are_not_dicom(body: bytes) -> None:
    """Acceptance pass: 256 zero bytes were answered C001 ("Study Instance UID is
    missing"); what has none of the identifying UIDs is not a DICOM data set (C000)."""
    with pytest.raises(UnreadableDataset):
        parse_header(body, ExplicitVRLittleEndian)
