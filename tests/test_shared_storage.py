"""A worker on another machine checks that it sees the edge's data_dir at its path.

The end-to-end cases (real Redis, a real ``radnode worker`` that exits 1) are in
``tests/test_scale_out.py``; these cover the mark itself on a SQLite queue.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from service.config import Settings
from service.errors import StartupError
from service.queue import JobQueue
from service.shared_storage import MARK_FILE, check_shared_storage, edge_mark


def _queue(tmp_path: Path) -> JobQueue:
    return JobQueue(Settings(node={"data_dir": str(tmp_path / "queue")}))  # type: ignore[arg-type]


def test_the_mark_is_made_once_and_kept(tmp_path: Path) -> None:
    first = edge_mark(tmp_path / "data")
    again = edge_mark(tmp_path / "data")
    assert first == again and len(first.token) == 32
    assert first.data_dir == str((tmp_path / "data").resolve())
    assert (tmp_path / "data" / MARK_FILE).read_text().strip() == first.token
    assert edge_mark(tmp_path / "other").token != first.token


def test_a_worker_that_sees_the_edges_data_dir_passes(tmp_path: Path) -> None:
    queue = _queue(tmp_path)
    queue.mark_edge(edge_mark(tmp_path / "data"))
    check_shared_storage(queue)  # no exception


def test_a_different_data_dir_at_the_edges_path_is_refused(tmp_path: Path) -> None:
    queue = _queue(tmp_path)
    queue.mark_edge(edge_mark(tmp_path / "data"))
    (tmp_path / "data" / MARK_FILE).write_text("not-the-edge\n")
    with pytest.raises(StartupError, match="is not the edge's data_dir"):
        check_shared_storage(queue)


def test_without_a_published_mark_the_worker_starts_and_says_so(tmp_path: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        check_shared_storage(_queue(tmp_path))
    assert [e["event"] for e in logs] == ["worker.storage_unchecked"]
