"""Receiving from DCMTK's storescu and echoscu, the way a PACS would send.

Real peers on loopback: ``radnode serve`` as a child process and DCMTK's tools.
"""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from service.testing import write_ct_series
from tests.conftest import (
    RadnodeProcess,
    acknowledged_files,
    dcmtk_env,
    require_tool,
    storescu,
)

pytestmark = pytest.mark.integration


def spool_file(node: RadnodeProcess, source: Path) -> Path:
    ds = dcmread(source, stop_before_pixels=True)
    return (
        node.data_dir
        / "spool"
        / ds.StudyInstanceUID
        / ds.SeriesInstanceUID
        / f"{ds.SOPInstanceUID}.dcm"
    )


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("ct300"), slices=300, seed=7)


def test_echo(radnode: RadnodeProcess) -> None:
    result = subprocess.run(
        [require_tool("echoscu"), "-v", "-aec", "RADNODE", "127.0.0.1", str(radnode.port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


def test_300_slice_series_arrives_whole_and_byte_identical(
    radnode: RadnodeProcess, ct_series: list[Path]
) -> None:
    result = storescu(radnode.port, [ct_series[0].parent], "+sd")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(acknowledged_files(result.stdout + result.stderr)) == 300
    for source in [*ct_series[::29], ct_series[-1]]:
        stored = dcmread(spool_file(radnode, source))
        assert stored.PixelData == dcmread(source).PixelData
    (complete,) = radnode.wait_for_event("study.complete")
    assert complete["instances"] == 300
    assert complete["series"] == 1
    with sqlite3.connect(radnode.data_dir / "index.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 300
        assert db.execute("SELECT instance_count, modality FROM series").fetchall() == [(300, "CT")]
    closed = radnode.wait_for_event("association.closed")
    assert closed[-1]["instances"] == 300
    assert closed[-1]["bytes"] > 300 * 512 * 512 * 2


# (file, storescu option that proposes the file's own transfer syntax)
TRANSFER_SYNTAX_CASES = [
    ("CT_small.dcm", "-xe", "1.2.840.10008.1.2.1"),
    ("MR_small_implicit.dcm", "-xi", "1.2.840.10008.1.2"),
    ("MR_small_bigendian.dcm", "-xb", "1.2.840.10008.1.2.2"),
    ("image_dfl.dcm", "-xd", "1.2.840.10008.1.2.1.99"),
    ("SC_rgb_jpeg_dcmtk.dcm", "-xy", "1.2.840.10008.1.2.4.50"),
    ("JPGExtended.dcm", "-xx", "1.2.840.10008.1.2.4.51"),
    ("MR_small_jp2klossless.dcm", "-xv", "1.2.840.10008.1.2.4.90"),
    ("JPEG2000.dcm", "-xw", "1.2.840.10008.1.2.4.91"),
    ("MR_small_jpeg_ls_lossless.dcm", "-xt", "1.2.840.10008.1.2.4.80"),
    ("JPEGLSNearLossless_16.dcm", "-xu", "1.2.840.10008.1.2.4.81"),
    ("MR_small_RLE.dcm", "-xr", "1.2.840.10008.1.2.5"),
]


def with_own_instance_uid(name: str, out_dir: Path) -> Path:
    """A copy of a pydicom test file under a fresh SOP Instance UID.

    Several test files share one SOP Instance UID (the node would de-duplicate them)
    and some lack the Study/Series UIDs every stored instance needs.
    """
    dataset = dcmread(get_testdata_file(name))
    dataset.StudyInstanceUID = dataset.get("StudyInstanceUID") or generate_uid()
    dataset.SeriesInstanceUID = dataset.get("SeriesInstanceUID") or generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    copy = out_dir / name
    dataset.save_as(copy)
    return copy


def test_pydicom_test_files_arrive_in_their_transfer_syntax(
    radnode: RadnodeProcess, tmp_path: Path
) -> None:
    for name, option, transfer_syntax in TRANSFER_SYNTAX_CASES:
        source = with_own_instance_uid(name, tmp_path)
        assert dcmread(source).file_meta.TransferSyntaxUID == transfer_syntax
        result = storescu(radnode.port, [source], option, "-R")
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
        stored = dcmread(spool_file(radnode, source))
        assert stored.file_meta.TransferSyntaxUID == transfer_syntax, name
        original = dcmread(source)
        assert stored.PixelData == original.PixelData, name


def test_a_transfer_syntax_proposed_before_its_fallbacks_is_the_one_accepted(
    radnode: RadnodeProcess, tmp_path: Path
) -> None:
    """``storescu +C`` proposes one context per SOP class with the file's syntax first
    and the uncompressed ones after it. radnode took Explicit VR Little Endian, so the
    sender had to decompress, and DCMTK cannot decompress JPEG 2000: the C-STORE failed
    (acceptance pass). The requestor's preference is taken now."""
    for name, option, transfer_syntax in (
        ("MR_small_jp2klossless.dcm", "-xv", "1.2.840.10008.1.2.4.90"),
        ("MR_small_jpeg_ls_lossless.dcm", "-xt", "1.2.840.10008.1.2.4.80"),
    ):
        source = with_own_instance_uid(name, tmp_path)
        result = storescu(radnode.port, [source], option, "+C", "-R")
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
        stored = dcmread(spool_file(radnode, source))
        assert stored.file_meta.TransferSyntaxUID == transfer_syntax, name


def test_calling_ae_not_on_the_allowlist_is_rejected(radnode_factory) -> None:
    node = radnode_factory(RADNODE_NODE__ALLOWED_CALLING_AETS='["ORTHANC"]').start()
    source = Path(get_testdata_file("CT_small.dcm"))
    refused = storescu(node.port, [source], aet="INTRUDER")
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stdout + refused.stderr
    rejected = node.wait_for_event("association.rejected")
    assert rejected[0]["peer_ae"] == "INTRUDER"
    assert not spool_file(node, source).exists()
    allowed = storescu(node.port, [source], aet="ORTHANC")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert spool_file(node, source).exists()


def test_resent_series_is_deduplicated(radnode: RadnodeProcess, ct_series: list[Path]) -> None:
    first = storescu(radnode.port, ct_series[:10])
    again = storescu(radnode.port, ct_series[:10])
    assert first.returncode == 0 and again.returncode == 0
    with sqlite3.connect(radnode.data_dir / "index.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 10
        assert db.execute("SELECT instance_count FROM studies").fetchone()[0] == 10


def test_each_association_gets_its_own_copy_of_the_contexts() -> None:
    """pynetdicom deep-copies the server's contexts per association; radnode's cheaper
    copy must still give every association contexts it may change alone."""
    from copy import deepcopy

    from dicom_nodes.policy import AssociationPolicy
    from dicom_nodes.scp import StorageSCP, _SupportedContexts

    scp = StorageSCP(AssociationPolicy(ae_title="RADNODE"), receiver=None, host="127.0.0.1", port=0)  # type: ignore[arg-type]
    scp.start()
    try:
        contexts = scp._server.contexts  # type: ignore[union-attr]
        assert isinstance(contexts, _SupportedContexts)
        copies = deepcopy(contexts)
    finally:
        scp.stop()
    assert [(c.abstract_syntax, c.transfer_syntax) for c in copies] == [
        (c.abstract_syntax, c.transfer_syntax) for c in contexts
    ]
    assert all(
        a is not b and a._transfer_syntax is not b._transfer_syntax
        for a, b in zip(copies, contexts, strict=True)
    )
    copies[0].context_id = 99
    copies[0]._transfer_syntax.clear()
    assert contexts[0].context_id != 99 and contexts[0].transfer_syntax


def test_one_instance_per_association(radnode: RadnodeProcess, tmp_path: Path) -> None:
    """Some PACS open an association per instance: each one is stored."""
    files = write_ct_series(tmp_path / "ct", slices=8, rows=32, columns=32)
    for path in files:
        assert acknowledged_files(storescu(radnode.port, [path]).stderr) == [str(path)]
    for path in files:
        assert spool_file(radnode, path).read_bytes().endswith(path.read_bytes()[-1024:])


def test_an_association_offering_nothing_radnode_takes_is_named_in_a_warning(
    radnode: RadnodeProcess,
) -> None:
    """DCMTK findscu asks for Modality Worklist only: every context is refused, the peer
    aborts, and the log said only opened/closed (acceptance pass). One warning names
    what was asked for and what to do."""
    result = subprocess.run(
        [require_tool("findscu"), "-W", "-aec", "RADNODE", "-k", "PatientName=",
         "127.0.0.1", str(radnode.port)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    (warning,) = radnode.wait_for_event("association.no_acceptable_context")
    assert any("1.2.840.10008.5.1.4.31" in uid for uid in warning["sop_classes"])
    assert warning["peer_ae"] == "FINDSCU" and "uncompressed" in warning["action"]


def test_what_the_node_keeps_is_not_readable_by_everyone(
    radnode: RadnodeProcess, tmp_path: Path
) -> None:
    """Acceptance pass: the spool, results and HL7 messages (patient data) were 0644 in
    0755 folders; the node keeps them to its user and group."""
    (source,) = write_ct_series(tmp_path / "one", slices=1, rows=16, columns=16)
    assert storescu(radnode.port, [source]).returncode == 0
    kept = spool_file(radnode, source)
    for path in (kept, kept.parent, kept.parent.parent, radnode.data_dir / "index.sqlite3"):
        assert path.stat().st_mode & 0o007 == 0, (path, oct(path.stat().st_mode))
