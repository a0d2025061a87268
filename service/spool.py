"""The spool: one DICOM Part 10 file per received instance, durable before Success.

Layout under ``<data_dir>/spool``::

    incoming/<random>.part                      being written; never acknowledged
    <StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm

A file is written as the received data set bytes behind a file meta header built
from the C-STORE request, flushed and fsynced, renamed into place, and its directory
fsynced: after :meth:`Spool.write` returns, the instance survives a crash or a power
cut. Only UIDs that passed :mod:`service.uids` checks are used as path parts.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from service import __version__
from service.errors import StorageFull

#: radnode's Implementation Class UID (PS3.7 D.3.3.2), derived from a fixed UUID.
IMPLEMENTATION_CLASS_UID = "2.25.186415519836318406418423104426519003785"
IMPLEMENTATION_VERSION_NAME = f"RADNODE_{__version__.replace('.', '')}"[:16]
_PREAMBLE = b"\x00" * 128 + b"DICM"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_meta_bytes(
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    source_ae: str,
    sending_ae: str,
) -> bytes:
    """Encode the preamble, ``DICM`` prefix and file meta group for one instance."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = source_ae
    if sending_ae:
        meta.SendingApplicationEntityTitle = sending_ae
        meta.ReceivingApplicationEntityTitle = source_ae
    buffer = BytesIO()
    buffer.write(_PREAMBLE)
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()


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
        partial = self.incoming / f"{uuid.uuid4().hex}.part"
        try:
            self._ensure_dir(target.parent)
            with open(partial, "xb") as handle:
                handle.write(meta)
                handle.write(dataset)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise StorageFull(f"could not write to the spool: {exc.strerror}") from exc
        return len(meta) + len(dataset)

    def discard_partials(self) -> int:
        """Remove files left in ``incoming`` by a crash; none was ever acknowledged."""
        count = 0
        for partial in self.incoming.glob("*.part"):
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
