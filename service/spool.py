"""The spool: one DICOM Part 10 file per received instance, durable before Success.

Layout under ``<data_dir>/spool``::

    incoming/<pid>-<random>.part                being written; never acknowledged
    <StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm

A file is written as the received data set bytes behind a file meta header built
from the C-STORE request, flushed and fsynced, renamed into place, and its directory
fsynced: after :meth:`Spool.write` returns, the instance survives a crash or a power
cut. Only UIDs that passed :mod:`service.uids` checks are used as path parts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

from dicom_nodes.implementation import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from service.errors import StorageFull

_PREAMBLE = b"\x00" * 128 + b"DICM"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, Explicit VR Little Endian (PS3.10 7.1)."""
    if vr == b"OB":  # 4-byte length after two reserved bytes
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _text(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")  # AE titles and UIDs are ASCII by their VR
    return raw + pad if len(raw) % 2 else raw


def file_meta_bytes(
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    source_ae: str,
    sending_ae: str,
) -> bytes:
    """Encode the preamble, ``DICM`` prefix and file meta group for one instance.

    Encoded here rather than with pydicom's ``write_file_meta_info``, which took a
    third of a millisecond per instance on the receive path (issue 11's profile);
    ``tests/test_receive_path.py`` checks the bytes against pydicom's for the same
    values. The UIDs are validated before they get here; AE titles are ASCII.
    """
    elements = [
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", _text(sop_class_uid, b"\0")),
        _element(0x0003, b"UI", _text(sop_instance_uid, b"\0")),
        _element(0x0010, b"UI", _text(transfer_syntax_uid, b"\0")),
        _element(0x0012, b"UI", _text(IMPLEMENTATION_CLASS_UID, b"\0")),
        _element(0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME, b" ")),
        _element(0x0016, b"AE", _text(source_ae, b" ")),
    ]
    if sending_ae:
        elements.append(_element(0x0017, b"AE", _text(sending_ae, b" ")))
        elements.append(_element(0x0018, b"AE", _text(source_ae, b" ")))
    body = b"".join(elements)
    return _PREAMBLE + _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


class Spool:
    """Durable storage of received instances under ``<data_dir>/spool``."""

    def __init__(self, data_dir: Path) -> None:
        self.root = (data_dir / "spool").resolve()
        self.incoming = self.root / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Where an instance lives. The UIDs must already be validated."""
        return self.root / study_uid / series_uid / f"{sop_instance_uid}.dcm"

    def _ensure_dir(self, directory: Path) -> None:
        """Create ``directory`` (and its study folder) durably, once per process."""
        if directory in self._known_dirs:
            return
        for level in (directory.parent, directory):
            if not level.is_dir():
                level.mkdir(exist_ok=True)
                _fsync_dir(level.parent)
        self._known_dirs.add(directory)

    def write(self, target: Path, meta: bytes, dataset: bytes) -> int:
        """Write ``meta + dataset`` to ``target`` durably; return the bytes written.

        Raises :class:`StorageFull` when the bytes cannot be made durable; the
        partial file is removed and nothing is left under the final name.
        """
        if target.parent.parent.parent != self.root:
            raise ValueError("refusing a spool path outside the spool")  # defence in depth
        # named by this process: a receiver process that dies mid-write leaves its
        # partial files to the node, which removes them (discard_partials(pid))
        partial = self.incoming / f"{os.getpid()}-{uuid.uuid4().hex}.part"
        try:
            self._ensure_dir(target.parent)
            with open(partial, "xb") as handle:
                handle.write(meta)
                handle.write(dataset)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.replace(partial, target)
            except FileNotFoundError:
                # its folder was removed since this process made it (an operator
                # deleted the study): make it again, once
                self._known_dirs.discard(target.parent)
                self._ensure_dir(target.parent)
                os.replace(partial, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise StorageFull(f"could not write to the spool: {exc.strerror}") from exc
        return len(meta) + len(dataset)

    def quarantine(self, path: Path) -> Path:
        """Move a spool file that cannot be read out of the spool, to
        ``<data_dir>/quarantine/<hash>.dcm``, and return where it went.

        Why: left in place it was reported at every start, by a name that is its SOP
        Instance UID (PHI audit); moved, the spool holds only what the index can use, the
        bytes stay for the operator to inspect, and the new name says nothing.
        """
        folder = self.root.parent / "quarantine"
        folder.mkdir(exist_ok=True)
        name = hashlib.sha256(str(path).encode()).hexdigest()[:16]
        target = folder / f"{name}-{uuid.uuid4().hex[:8]}.dcm"  # never over an earlier one
        os.replace(path, target)
        try:
            _fsync_dir(folder)
            _fsync_dir(path.parent)
        except OSError:
            pass  # moved all the same; at worst a crash now puts it back where it was
        return target

    def discard_partials(self, pid: int | None = None) -> int:
        """Remove files left in ``incoming`` by a crash (only those of process ``pid``,
        a receiver process that died while the node runs on); none was acknowledged."""
        count = 0
        for partial in self.incoming.glob("*.part" if pid is None else f"{pid}-*.part"):
            partial.unlink(missing_ok=True)
            count += 1
        return count

    def iter_instances(self) -> Iterator[Path]:
        """Every instance file in the spool (for reconciling the index at start)."""
        for study_dir in self.root.iterdir():
            if study_dir == self.incoming or not study_dir.is_dir():
                continue
            for series_dir in study_dir.iterdir():
                if series_dir.is_dir():
                    yield from series_dir.glob("*.dcm")

    def free_bytes(self) -> int:
        """Free space on the spool's file system, as seen by an unprivileged user."""
        return shutil.disk_usage(self.root).free
