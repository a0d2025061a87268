"""SIGKILL during a transfer loses nothing that was acknowledged.

The sender is DCMTK's storescu; its -v output says which files got Success. The
node is killed at a random moment while the series streams in, restarted on the
same data dir, and every acknowledged instance must be on disk, byte-identical, and
in the index (the restart reconciles the index with the spool).
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest
from pydicom import dcmread

from service.testing import write_ct_series
from tests.conftest import acknowledged_files, dcmtk_env, require_tool

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("crash"), slices=120, rows=256, columns=256)


@pytest.mark.parametrize("run", range(3))
def test_sigkill_during_receive_loses_no_acknowledged_instance(
    radnode_factory, series: list[Path], run: int
) -> None:
    kill_after = random.Random(run).randint(5, 100)
    node = radnode_factory().start()

    def storescu_cmd(port: int) -> list[str]:
        return [require_tool("storescu"), "-v", "-aec", "RADNODE", "127.0.0.1", str(port)]

    sender = subprocess.Popen(
        [*storescu_cmd(node.port), *map(str, series)],
        env=dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    killed = threading.Event()

    def watch() -> None:
        assert sender.stdout is not None
        for line in sender.stdout:
            output.append(line)
            if not killed.is_set() and len(acknowledged_files("".join(output))) >= kill_after:
                node.kill()
                killed.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    sender.wait(timeout=120)
    watcher.join(timeout=30)
    assert killed.is_set(), "the transfer ended before the kill point"
    acked = acknowledged_files("".join(output))
    assert kill_after <= len(acked) < len(series)

    restarted = radnode_factory().start()  # same data dir
    restarted.wait_for_event("spool.reconciled")
    with sqlite3.connect(restarted.data_dir / "index.sqlite3") as db:
        indexed = {r[0] for r in db.execute("SELECT sop_instance_uid FROM instances")}
    for source in map(Path, acked):
        original = dcmread(source)
        assert original.SOPInstanceUID in indexed
        stored = (
            restarted.data_dir
            / "spool"
            / original.StudyInstanceUID
            / original.SeriesInstanceUID
            / f"{original.SOPInstanceUID}.dcm"
        )
        assert dcmread(stored).PixelData == original.PixelData
    assert not list((restarted.data_dir / "spool" / "incoming").iterdir())
    # the rest of the series can be sent again and the study completes whole
    resend = subprocess.run(
        [*storescu_cmd(restarted.port), *map(str, series)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resend.returncode == 0
    (complete,) = restarted.wait_for_event("study.complete")
    assert complete["instances"] == len(series)
