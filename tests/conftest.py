"""Fixtures that start real peers on loopback: radnode itself and DCMTK tools.

Ports are taken free from the OS and every peer is polled until it answers; no
fixed ports, no fixed sleeps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: Shared fixtures that live in their own modules.
pytest_plugins = ["tests.support.mllp", "tests.support.orthanc"]

REPO = Path(__file__).resolve().parent.parent
RADNODE = Path(sys.executable).with_name("radnode")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on port {port} within {timeout} s")


def wait_until_ready(
    http_port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None
) -> dict:
    """Poll a node's ``GET /readyz`` until it answers 200; return its body."""
    url = f"http://127.0.0.1:{http_port}/readyz"
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            last = exc.read().decode(errors="replace")
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready within {timeout} s: {last}")


def dcmtk_env() -> dict[str, str]:
    """DCMTK waits on Nagle's algorithm unless told otherwise (25x slower here)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; .ci/run installs it (apt-get install dcmtk)")
    return path


def storescu(
    port: int, files: list[Path] | list[str], *args: str, aet: str = "STORESCU"
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` with DCMTK storescu; -v output tells what was acknowledged."""
    cmd = [
        require_tool("storescu"),
        "-v",
        "-aet",
        aet,
        "-aec",
        "RADNODE",
        *args,
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    return subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=300)


def acknowledged_files(storescu_output: str) -> list[str]:
    """Files storescu saw acknowledged with Success, from its -v output."""
    acked: list[str] = []
    current: str | None = None
    for line in storescu_output.splitlines():
        if line.startswith("I: Sending file: "):
            current = line.removeprefix("I: Sending file: ").strip()
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
            current = None
    return acked


def json_events(lines: list[str], name: str | None = None) -> list[dict]:
    """The JSON log events among ``lines`` (optionally only those named ``name``)."""
    parsed = []
    for line in list(lines):
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if name is None or item.get("event") == name:
            parsed.append(item)
    return parsed


@dataclass
class RadnodeProcess:
    """``radnode serve`` as a child process with its own data dir and ports."""

    data_dir: Path
    port: int
    http_port: int
    #: Overrides of :meth:`env`; ``None`` unsets a variable.
    extra_env: dict[str, str | None] = field(default_factory=dict)
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def env(self) -> dict[str, str]:
        env: dict[str, str | None] = {
            **os.environ,
            "RADNODE_NODE__PORT": str(self.port),
            "RADNODE_NODE__DATA_DIR": str(self.data_dir),
            "RADNODE_NODE__MIN_FREE_DISK_MB": "1",
            "RADNODE_HTTP__PORT": str(self.http_port),
            "RADNODE_STUDY__COMPLETION_TIMEOUT_S": "2",
            # No routes unless a test asks: the reference routes would run real models.
            "RADNODE_ROUTES": "[]",
            **self.extra_env,
        }
        return {key: value for key, value in env.items() if value is not None}

    def start(self, *args: str) -> RadnodeProcess:
        self.proc = subprocess.Popen(
            [str(RADNODE), "serve", *args],
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.data_dir.parent,
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        wait_for_port(self.port, proc=self.proc)
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def events(self, name: str | None = None) -> list[dict]:
        """Parsed JSON log events (optionally only those named ``name``)."""
        return json_events(self.lines, name)

    def wait_for_event(self, name: str, timeout: float = 30.0, count: int = 1) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise TimeoutError(
            f"no {count} x {name!r} in the log within {timeout} s:\n" + "\n".join(self.lines[-20:])
        )

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        if self._reader is not None:
            self._reader.join(timeout=5)


@pytest.fixture
def radnode_factory(tmp_path: Path) -> Iterator:
    """Make RadnodeProcess objects; every one still running is stopped at the end."""
    started: list[RadnodeProcess] = []

    def make(**env: str | None) -> RadnodeProcess:
        node = RadnodeProcess(
            data_dir=tmp_path / "radnode-data",
            port=free_port(),
            http_port=free_port(),
            extra_env=env,
        )
        started.append(node)
        return node

    yield make
    for node in started:
        node.stop()


@pytest.fixture
def radnode(radnode_factory) -> RadnodeProcess:
    """A running ``radnode serve`` on free ports with a 2 s completion timeout."""
    return radnode_factory().start()
