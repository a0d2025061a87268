"""Local worker processes run at a lower CPU priority than the node (real processes)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from service.config import Settings
from service.supervisor import ProcessSupervisor


def _nice_of(pid: int) -> int:
    # /proc/<pid>/stat: field 19 is the nice value (after the parenthesised command)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])


def _spawned_nice(niceness: int) -> int:
    supervisor = ProcessSupervisor(
        1, [sys.executable, "-c", "import time; time.sleep(60)"], niceness=niceness
    )
    supervisor.start()
    try:
        (pid,) = supervisor.pids()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the child is niced before exec
            if Path(f"/proc/{pid}/stat").exists():
                return _nice_of(pid)
            time.sleep(0.05)
        raise AssertionError("worker process did not appear")
    finally:
        supervisor.stop(timeout_s=5)


def test_local_workers_run_niced_by_default_and_zero_keeps_the_node_priority() -> None:
    own = os.nice(0)
    default = Settings().queue.local_worker_niceness
    assert default > 0
    assert _spawned_nice(default) == min(19, own + default)
    assert _spawned_nice(0) == own
