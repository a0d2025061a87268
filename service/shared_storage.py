"""Is the edge's data_dir visible to this worker, at the same path?

Jobs name files by the edge's absolute paths (the series in ``<data_dir>/spool``, the
results folder in ``<data_dir>/results``), so a worker on another machine needs the
edge's ``node.data_dir`` mounted at the same path. A worker without it took jobs and
failed every one ("could not be read as DICOM"), draining the queue while a good
worker idled (found by review).

The edge keeps a random token in ``<data_dir>/.radnode-edge`` and publishes it, with
the path, through the queue (:meth:`service.queue.JobQueue.mark_edge`); a worker on
another machine reads the file at that path before it takes a job and refuses to
start when it is missing or different.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import structlog

from service.errors import StartupError
from service.queue import EdgeMark, JobQueue

log = structlog.get_logger("service.shared_storage")

MARK_FILE = ".radnode-edge"


def edge_mark(data_dir: Path) -> EdgeMark:
    """The edge's mark for ``data_dir``, made once (and durably) on first use."""
    data_dir = Path(data_dir).resolve()
    path = data_dir / MARK_FILE
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        token = ""
    if not token:
        data_dir.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        partial = path.with_suffix(".part")
        with open(partial, "w", encoding="ascii") as handle:
            handle.write(token + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    return EdgeMark(token=token, data_dir=str(data_dir))


def check_shared_storage(queue: JobQueue) -> None:
    """Raise :class:`StartupError` when the edge's data_dir is not here at its path.

    An edge that has not published its mark yet (not started, or the queue restarted
    without persistence) cannot be checked: logged, and the worker starts.
    """
    mark = queue.edge_mark()
    if mark is None:
        log.warning(
            "worker.storage_unchecked",
            reason="the edge has not published its data_dir yet",
            action="start `radnode serve`; make sure its node.data_dir is mounted here"
            " at the same path",
        )
        return
    path = Path(mark.data_dir) / MARK_FILE
    try:
        found = path.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise StartupError(
            f"the edge's data_dir {mark.data_dir} is not readable here ({exc.strerror}):"
            " jobs name their files there. Mount the edge's node.data_dir (shared"
            " storage) at the same path on this machine (docs/scale-out.md)"
        ) from exc
    if found != mark.token:
        raise StartupError(
            f"{mark.data_dir} on this machine is not the edge's data_dir (its"
            f" {MARK_FILE} differs): jobs would read and write the wrong files. Mount"
            " the edge's node.data_dir at the same path (docs/scale-out.md)"
        )
