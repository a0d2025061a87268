"""Fuzzing the two parsers that read what peers send: bounded here, long in bench/fuzz.py.

1. :func:`service.headers.parse_header` runs on every C-STORE's bytes. Whatever those
   bytes are -- truncated, bit-flipped, with random elements spliced in -- it returns
   an InstanceHeader or raises a RadnodeError (UnreadableDataset), which the receive
   path turns into a named DIMSE status. Any other exception is a bug.
2. The volume planner reads spool files header-first. Whatever bytes a file holds,
   ``plan_volume(read_headers(paths))`` returns a plan or raises SeriesRefused.

The properties are plain functions so that ``bench/fuzz.py`` runs them for longer
(with atheris when it is installed). Here: 200 examples each, derandomized.
"""

from __future__ import annotations

import struct
import tempfile
import zlib
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.dsutils import encode

from service import headers
from service.errors import RadnodeError, UnreadableDataset
from service.headers import parse_header
from service.pipeline.volume import SeriesRefused, VolumePlan, plan_volume, read_headers
from service.records import InstanceHeader
from service.testing import make_ct_series

TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
)


def _encodings() -> dict[str, bytes]:
    """A real CT data set (with pixel data) in each transfer syntax, as on the wire."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    out = {}
    for uid in TRANSFER_SYNTAXES:
        implicit = uid == ImplicitVRLittleEndian
        little = uid != ExplicitVRBigEndian
        data = encode(ds, implicit, little, uid == DeflatedExplicitVRLittleEndian)
        assert data is not None
        out[uid] = data
    return out


ENCODINGS = _encodings()


_LENGTHS = st.sampled_from([0, 1, 2, 4, 0xFFFF, 0xFFFFFFFF]) | st.integers(0, 2**32 - 1)


@st.composite
def damaged(draw: st.DrawFn) -> tuple[bytes, str]:
    """A valid encoding, then a few of: truncate, flip bytes, splice a random element."""
    transfer_syntax = draw(st.sampled_from(TRANSFER_SYNTAXES))
    data = bytearray(ENCODINGS[transfer_syntax])
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["truncate", "flip", "splice", "length"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if action == "truncate":
            del data[at:]
        elif action == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif action == "splice":
            group, element = draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF))
            vr = draw(st.sampled_from([b"UL", b"US", b"OB", b"SQ", b"UN", b"DS", b"UI", b"XX"]))
            length = draw(
                st.sampled_from([0, 1, 2, 4, 0xFFFF, 0xFFFFFFFF]) | st.integers(0, 2**32 - 1)
            )
            value = draw(st.binary(max_size=16))
            element_bytes = (
                struct.pack("<HH", group, element) + vr + struct.pack("<H", length & 0xFFFF)
            )
            if draw(st.booleans()):  # long form (OB/SQ/UN style) or implicit VR
                element_bytes = struct.pack("<HHI", group, element, length)
            data[at:at] = element_bytes + value
        else:  # overwrite 4 bytes with a length-like number
            data[at : at + 4] = struct.pack("<I", draw(st.sampled_from([0, 0xFFFFFFFF, 2**31, 7])))
    return bytes(data), transfer_syntax


def check_parse_header(data: bytes, transfer_syntax: str) -> str:
    """The property; returns what happened ("header" or the error's class name)."""
    try:
        header = parse_header(data, transfer_syntax)
    except RadnodeError as exc:
        assert str(exc), "a refusal must say why"
        return type(exc).__name__
    assert isinstance(header, InstanceHeader)
    return "header"


def _series_files() -> list[bytes]:
    out = []
    for ds in make_ct_series(slices=4, rows=8, columns=8):
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


SERIES = _series_files()


@st.composite
def damaged_series(draw: st.DrawFn) -> list[bytes]:
    """Four Part 10 files of one series, some with bytes flipped or cut (pixels stay)."""
    files = [bytearray(data) for data in SERIES]
    for _ in range(draw(st.integers(1, 6))):
        target = files[draw(st.integers(0, len(files) - 1))]
        header_end = len(target) - 8 * 8 * 2  # bytes before the 8x8x2 of pixel data
        if header_end <= 132:  # cut short earlier
            continue
        at = draw(st.integers(128, header_end - 1))
        if draw(st.integers(0, 9)) == 0:
            del target[at:]
        else:
            target[at] ^= draw(st.integers(1, 255))
    return [bytes(f) for f in files]


def check_plan(files: list[bytes]) -> str:
    """The property: a VolumePlan, or SeriesRefused with a code."""
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for index, data in enumerate(files):
            paths.append(Path(folder) / f"{index}.dcm")
            paths[-1].write_bytes(data)
        try:
            plan = plan_volume(read_headers(paths), max_voxels=2**22)
        except SeriesRefused as refused:
            assert refused.code and refused.reason
            return refused.code
    assert isinstance(plan, VolumePlan)
    return "plan"


BOUNDED = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_valid_encodings_parse() -> None:
    for uid, data in ENCODINGS.items():
        assert check_parse_header(data, uid) == "header", uid


def test_a_deflate_bomb_is_refused_before_it_is_inflated_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """64 MiB of zeros deflate to ~64 KiB; with the cap lowered to 8 MiB the data set
    is refused as unreadable, never inflated whole (review: 4 MB sent, 4 GB used)."""
    monkeypatch.setattr(headers, "MAX_INFLATED_BYTES", 8 * 1024 * 1024)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = packer.compress(bytes(64 * 1024 * 1024)) + packer.flush()
    assert len(bomb) < 128 * 1024
    with pytest.raises(UnreadableDataset, match="inflates beyond 8 MiB"):
        parse_header(bomb, DeflatedExplicitVRLittleEndian)
    deflated = ENCODINGS[DeflatedExplicitVRLittleEndian]  # a real one still parses
    assert check_parse_header(deflated, DeflatedExplicitVRLittleEndian) == "header"


@BOUNDED
@given(damaged())
def test_parse_header_returns_a_header_or_a_radnode_error(case: tuple[bytes, str]) -> None:
    check_parse_header(*case)


@BOUNDED
@given(st.binary(max_size=512), st.sampled_from(TRANSFER_SYNTAXES))
def test_parse_header_survives_random_bytes(data: bytes, transfer_syntax: str) -> None:
    check_parse_header(data, transfer_syntax)


def test_undamaged_series_plans() -> None:
    assert check_plan(SERIES) == "plan"


@BOUNDED
@given(damaged_series())
def test_planner_returns_a_plan_or_series_refused(files: list[bytes]) -> None:
    check_plan(files)
