"""Bad input gets a clear failure status and a log line; the node keeps receiving.

DCMTK's storescu refuses to send malformed files, so these tests send hostile bytes
with pynetdicom (a real DICOM peer over loopback) in its raw "send the file's bytes
as they are" mode. The node under test is the real ``radnode serve`` process.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode

from service.spool import file_meta_bytes
from tests.conftest import RadnodeProcess, storescu

pytestmark = pytest.mark.integration

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def raw_sending() -> Iterator[None]:
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = previous


def raw_file(path: Path, body: bytes, sop_instance_uid: str) -> Path:
    """A Part 10 file whose meta is valid and whose data set is ``body``."""
    meta = file_meta_bytes(
        sop_class_uid=CT_IMAGE_STORAGE,
        sop_instance_uid=sop_instance_uid,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        source_ae="TEST",
        sending_ae="",
    )
    path.write_bytes(meta + body)
    return path


def send_raw(port: int, files: list[Path]) -> list[int]:
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADNODE")
    assert assoc.is_established
    statuses = []
    try:
        for msg_id, path in enumerate(files, start=1):
            status = assoc.send_c_store(path, msg_id=msg_id)
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        assoc.release()
    return statuses


def ct_body(**changes: str) -> bytes:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    data = encode(ds, False, True)
    assert data is not None
    return data


def test_bad_input_gets_failure_statuses_and_node_keeps_receiving(
    radnode: RadnodeProcess, tmp_path: Path, raw_sending: None
) -> None:
    good_uid = generate_uid()
    truncated = ct_body(SOPInstanceUID=(t := generate_uid()))[:-5000]
    hostile = "1.2.3/../../../../tmp/escape"
    files = [
        raw_file(
            tmp_path / "garbage.dcm",
            b"MZ\x90\x00 this is an executable, not DICOM" * 50,
            generate_uid(),
        ),
        raw_file(tmp_path / "truncated.dcm", truncated, t),
        raw_file(tmp_path / "hostile.dcm", ct_body(SOPInstanceUID=hostile), hostile),
        raw_file(
            tmp_path / "overlong.dcm",
            ct_body(SOPInstanceUID=(o := generate_uid()), StudyInstanceUID="1." * 40 + "1"),
            o,
        ),
        raw_file(tmp_path / "good.dcm", ct_body(SOPInstanceUID=good_uid), good_uid),
    ]
    statuses = send_raw(radnode.port, files)
    assert statuses[0] == 0xC000  # cannot understand
    assert statuses[1] == 0xC000
    assert statuses[2] == 0xC001  # invalid UID
    assert statuses[3] == 0xC001
    assert statuses[4] == 0x0000  # the same association goes on
    refused = radnode.wait_for_event("store.refused", count=4)
    reasons = [event["reason"] for event in refused]
    assert "not a parseable" in reasons[0] or "truncated" in reasons[0]
    assert "truncated" in reasons[1]
    assert reasons[2].startswith("invalid UID: Affected SOP Instance UID")
    assert "longer than 64" in reasons[3]
    assert all("action" in event for event in refused)
    assert not any(hostile in line or "escape" in line for line in radnode.lines)
    assert not Path("/tmp/escape.dcm").exists()
    stored = list((radnode.data_dir / "spool").rglob("*.dcm"))
    assert [p.stem for p in stored] == [good_uid]
    # and a real sender on a new association is still served
    after = storescu(radnode.port, [Path(get_testdata_file("MR_small.dcm"))])
    assert after.returncode == 0, after.stdout + after.stderr


def test_a_study_past_max_study_mb_is_refused_with_a700_and_others_go_on(
    radnode_factory, tmp_path: Path
) -> None:
    from service.testing import write_ct_series
    from tests.conftest import acknowledged_files

    node = radnode_factory(RADNODE_NODE__MAX_STUDY_MB="1").start()
    big = write_ct_series(tmp_path / "big", slices=20, rows=256, columns=256)  # 2.6 MB
    small = write_ct_series(tmp_path / "small", slices=3, rows=64, columns=64)

    sent = storescu(node.port, big)
    acked = acknowledged_files(sent.stdout + sent.stderr)
    assert 5 <= len(acked) <= 8, len(acked)  # 131 kB each: about 1 MB of them fit
    refused = node.wait_for_event("store.refused")
    assert refused[0]["status"] == "0xA700" and "max_study_mb" in refused[0]["reason"]
    study_dir = next((node.data_dir / "spool").glob("1.*"))
    assert sum(1 for _ in study_dir.rglob("*.dcm")) == len(acked)
    # the study is known to be incomplete: its jobs are refused, not run on the rest
    index = sqlite3.connect(node.data_dir / "index.sqlite3")
    (count,) = index.execute("SELECT refused_too_large FROM studies").fetchone()
    assert count == len(node.events("store.refused")) >= 1
    index.close()

    other = storescu(node.port, small)
    assert other.returncode == 0 and len(acknowledged_files(other.stdout + other.stderr)) == 3


def test_an_unsupported_transfer_syntax_is_refused_in_negotiation(radnode: RadnodeProcess) -> None:
    mpeg2 = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile: not a syntax radnode takes
    ae = AE(ae_title="VIDEO")
    ae.add_requested_context(CT_IMAGE_STORAGE, mpeg2)
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification, so the association opens
    assoc = ae.associate("127.0.0.1", radnode.port, ae_title="RADNODE")
    assert assoc.is_established
    try:
        (rejected,) = assoc.rejected_contexts
        assert rejected.abstract_syntax == CT_IMAGE_STORAGE
        assert rejected.result == 0x04  # transfer syntaxes not supported
        assert int(assoc.send_c_echo().Status) == 0x0000  # the node goes on
    finally:
        assoc.release()
