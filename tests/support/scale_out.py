"""A real redis-server and `radnode worker` processes, for the scale-out tests and bench."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import RADNODE, free_port, json_events, require_tool, wait_for_port


def start_redis(directory: Path, port: int) -> subprocess.Popen[bytes]:
    """redis-server on ``port`` of loopback, no persistence; returns once it listens."""
    proc = subprocess.Popen(
        [require_tool("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for_port(port, proc=proc)
    return proc


@contextlib.contextmanager
def running_redis(directory: Path) -> Iterator[str]:
    """redis-server on a free loopback port, no persistence; yields its redis:// URL."""
    port = free_port()
    proc = start_redis(directory, port)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class Worker:
    """A `radnode worker` process whose JSON log lines are kept."""

    def __init__(self, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen([str(RADNODE), "worker"], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def events(self, name: str) -> list[dict]:
        return json_events(self.lines, name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
