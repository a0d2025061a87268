"""The worker's warm-up writes every kind of result for a tiny synthetic study.

It must succeed on a clean install (a failure would only be logged, and the first
job would silently pay the one-time costs again), and leave nothing behind.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from structlog.testing import capture_logs

from service.warmup import warm_up_writers


def test_warm_up_writes_every_result_kind_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with capture_logs() as logs:
        seconds = warm_up_writers()
    events = [entry["event"] for entry in logs]
    assert "worker.warm_up_failed" not in events, logs
    assert events[-1] == "worker.warmed_up" and seconds > 0
    assert list(Path(tmp_path).iterdir()) == []


def test_a_failing_warm_up_is_logged_not_raised(monkeypatch):
    """A writer that fails (a stand-in that raises: no real writer fails on this
    synthetic study) costs a warning, never the worker."""
    import service.warmup as warmup

    def broken(folder: Path) -> None:
        raise RuntimeError("writer broke")

    monkeypatch.setattr(warmup, "_write_results", broken)
    with capture_logs() as logs:
        warm_up_writers()
    failed = [entry for entry in logs if entry["event"] == "worker.warm_up_failed"]
    assert failed and "writer broke" in failed[0]["reason"]


def test_the_worker_stops_numpy_asking_for_huge_pages():
    import numpy as np

    from service.worker import no_huge_pages_for_arrays

    setter = np._core.multiarray._set_madvise_hugepage
    before = setter(True)
    try:
        no_huge_pages_for_arrays()
        assert setter(True) is False  # the value it was set to
    finally:
        setter(before)
