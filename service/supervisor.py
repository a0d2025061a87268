"""Child processes of the node: start them, restart one that dies, stop them.

The node runs two kinds of helpers as processes of their own: pipeline workers (a
model that crashes or exhausts memory must not take the Storage SCP down) and extra
receiver processes (pynetdicom is pure Python, so more associations need more CPUs,
not more threads). Both are this same interpreter running a ``radnode`` subcommand
with the node's configuration file and environment, die with the node (even when it
is killed), and are restarted one second after they die.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger("service.supervisor")


def child_command(subcommand: str, config_path: Path | None, *args: str) -> list[str]:
    """``radnode <subcommand>`` as a child: this interpreter, same config and environment."""
    command = [sys.executable, "-m", "service.cli", subcommand]
    if config_path is not None:
        command += ["--config", str(config_path)]
    return [*command, *args]


#: Exit status of a worker that ended itself because a job ran past its time limit
#: (``queue.job_timeout_s``): the node says so instead of "died (out of memory?)".
TIMED_OUT_EXIT = 75


class ProcessSupervisor:
    """Keeps ``count`` processes of one ``role`` running.

    Log events are ``<role>.spawned`` and ``<role>.died`` (the latter with
    ``died_action``, what the operator should do). ``on_exit`` is told the pid of a
    process that died (the node puts a dead worker's job back at once instead of
    waiting for its heartbeat to go silent). ``pass_fds`` are inherited by every child
    (receivers accept on the node's listening sockets).
    """

    def __init__(
        self,
        count: int,
        command: list[str],
        *,
        role: str = "worker",
        died_action: str = "it is restarted; if this repeats, check memory and the logs",
        on_exit: Callable[[int, int], None] | None = None,
        restart_delay_s: float = 1.0,
        niceness: int = 0,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.count = count
        self.role = role
        self.died_action = died_action
        self.niceness = niceness
        self.command = command
        self.on_exit = on_exit
        self.restart_delay_s = restart_delay_s
        self.pass_fds = pass_fds
        self._procs: list[subprocess.Popen[bytes]] = []
        self._spawned_at: list[float] = []
        self._quick_deaths: list[int] = []
        self._respawn_at: list[float | None] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"{role}s", daemon=True)

    def start(self) -> None:
        self._procs = [self._spawn() for _ in range(self.count)]
        now = time.monotonic()
        self._spawned_at = [now] * self.count
        self._quick_deaths = [0] * self.count
        self._respawn_at = [None] * self.count
        if self.count:
            self._thread.start()

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _spawn(self) -> subprocess.Popen[bytes]:
        # logs go to the node's stdout; a child dies with its node (even on SIGKILL)
        niceness = self.niceness

        def in_child() -> None:
            _die_with_parent()
            if niceness:
                os.nice(niceness)

        proc = subprocess.Popen(self.command, preexec_fn=in_child, pass_fds=self.pass_fds)
        log.info(f"{self.role}.spawned", pid=proc.pid, niceness=niceness)
        return proc

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            for i, proc in enumerate(self._procs):
                if self._stop.is_set():
                    return
                now = time.monotonic()
                respawn_at = self._respawn_at[i]
                if respawn_at is not None:
                    if now >= respawn_at:
                        self._respawn_at[i] = None
                        self._procs[i] = self._spawn()
                        self._spawned_at[i] = now
                    continue
                code = proc.poll()
                if code is None:
                    continue
                delay = self._restart_delay(i, now)
                log.error(
                    f"{self.role}.died",
                    pid=proc.pid,
                    exit_code=code,
                    restart_in_s=delay,
                    deaths_in_a_row=self._quick_deaths[i],
                    action=self.died_action,
                )
                if self.on_exit is not None:
                    try:
                        self.on_exit(proc.pid, code)
                    except Exception:  # the restart below must happen all the same
                        log.exception(f"{self.role}.exit_handling_failed", pid=proc.pid,
                                      action="check the data_dir disk")  # fmt: skip
                self._respawn_at[i] = now + delay

    def _restart_delay(self, slot: int, now: float) -> float:
        """``restart_delay_s``, doubled for each death within a minute of its start, up
        to a minute. Why: a worker killed while it loads a bundle (out of memory, a
        crash in native code) was restarted 23 times in 100 s (acceptance pass)."""
        quick = now - self._spawned_at[slot] < QUICK_DEATH_S
        self._quick_deaths[slot] = self._quick_deaths[slot] + 1 if quick else 0
        doublings = max(self._quick_deaths[slot] - 1, 0)
        return min(self.restart_delay_s * 2.0**doublings, MAX_RESTART_DELAY_S)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGINT (a clean stop) to each, then SIGKILL to any still running at the deadline."""
        self._stop.set()
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


#: A child that dies within this many seconds of its start died "quickly".
QUICK_DEATH_S = 60.0
#: The longest wait before a child is started again.
MAX_RESTART_DELAY_S = 60.0


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to send SIGTERM when the parent dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
