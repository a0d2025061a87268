"""Receive throughput: radnode vs DCMTK storescp, same sender, same data, same run.

    .venv/bin/python bench/ingest.py [--slices 300] [--rounds 5] [--associations 1]
                                     [--receiver-processes 1] [--one-per-association]

Generates ``associations`` synthetic 512x512 CT series (``service.testing``), then for
each round sends them with DCMTK ``storescu +sd`` (one association per series, all
at once) into a fresh DCMTK ``storescp`` (``--fork`` when several associations) and
into a fresh ``radnode serve`` (``node.receiver_processes`` as given, timed once its
``/readyz`` says every receiver process accepts), interleaved. Only files that
storescu saw acknowledged with Success count. Every timed run starts after ``sync``
(nothing left dirty by the run before). Prints medians: images/s, MB/s and the ratio.
Every DCMTK program runs with TCP_NODELAY=1 (without it DCMTK waits on Nagle).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.testing import write_ct_series  # noqa: E402
from tests.conftest import (  # noqa: E402
    acknowledged_files,
    free_port,
    wait_for_port,
    wait_until_ready,
)

ENV = {**os.environ, "TCP_NODELAY": "1"}


def start_storescp(port: int, out: Path, fork: bool) -> subprocess.Popen[bytes]:
    cmd = ["storescp", "-od", str(out), "-aet", "RADNODE", *(["--fork"] if fork else []), str(port)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc=proc)
    return proc


def start_radnode(port: int, data: Path, receiver_processes: int) -> subprocess.Popen[bytes]:
    """Start ``radnode serve`` and return once it is in its steady state: every
    receiver process accepts and the worker has loaded its models (a worker still
    importing torch would take a core from the receivers on a 2-core machine)."""
    env = {
        **ENV,
        "RADNODE_NODE__RECEIVER_PROCESSES": str(receiver_processes),
        "RADNODE_NODE__PORT": str(port),
        "RADNODE_NODE__DATA_DIR": str(data),
        "RADNODE_NODE__MIN_FREE_DISK_MB": "1",
        "RADNODE_LOG__LEVEL": "info",
        "RADNODE_HTTP__PORT": str(http_port := free_port()),
    }
    radnode = Path(sys.executable).with_name("radnode")
    log_path = data / "radnode.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([str(radnode), "serve"], env=env, stdout=log_file)
    wait_until_ready(http_port, proc=proc)  # every receiver process accepts by then
    deadline = time.monotonic() + 120
    while b'"worker.started"' not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"radnode's worker did not start; see {log_path}")
        time.sleep(0.1)
    return proc


def send_one_per_association(port: int, series_dirs: list[Path]) -> tuple[float, int]:
    """Send every file in its own association (one storescu each, one after the other),
    as some PACS do; return (seconds, acked)."""
    start = time.perf_counter()
    acked = 0
    for path in sorted(p for d in series_dirs for p in d.iterdir()):
        cmd = ["storescu", "-v", "-aec", "RADNODE", "127.0.0.1", str(port), str(path)]
        result = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
        acked += len(acknowledged_files(result.stdout + result.stderr))
    return time.perf_counter() - start, acked


def send(port: int, series_dirs: list[Path]) -> tuple[float, int]:
    """Send every series at once, one association each; return (seconds, acked)."""
    start = time.perf_counter()
    senders = [
        subprocess.Popen(
            ["storescu", "-v", "+sd", "-aec", "RADNODE", "127.0.0.1", str(port), str(d)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for d in series_dirs
    ]
    outputs = [s.communicate()[0] for s in senders]
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(acknowledged_files(o)) for o in outputs)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--associations", type=int, default=1)
    parser.add_argument("--receiver-processes", type=int, default=1)
    parser.add_argument(
        "--nagle",
        action="store_true",
        help="run storescu/storescp without TCP_NODELAY=1 (DCMTK's packaged default)",
    )
    parser.add_argument(
        "--one-per-association",
        action="store_true",
        help="send every file in its own association (storescu per file; try --slices 50)",
    )
    args = parser.parse_args()
    sender = send_one_per_association if args.one_per_association else send
    if args.nagle:
        ENV.pop("TCP_NODELAY", None)
    if shutil.which("storescp") is None:
        sys.exit("DCMTK is not installed: bash .ci/install-system-packages")

    work = Path(tempfile.mkdtemp(prefix="radnode-bench-"))
    try:
        series_dirs = []
        for i in range(args.associations):
            d = work / f"series{i}"
            write_ct_series(d, slices=args.slices, seed=i)
            series_dirs.append(d)
        total_images = args.slices * args.associations
        total_mb = sum(f.stat().st_size for d in series_dirs for f in d.iterdir()) / 1e6
        print(
            f"data: {args.associations} x {args.slices} slices 512x512 CT, "
            f"{total_mb:.0f} MB; {args.rounds} interleaved rounds;"
            f" radnode with {args.receiver_processes} receiver process(es)"
            + ("; one association per file" if args.one_per_association else "")
        )

        results: dict[str, list[float]] = {"dcmtk storescp": [], "radnode": []}
        for round_no in range(args.rounds):
            for name in results:
                port = free_port()
                target = work / f"{name.split()[0]}-{round_no}"
                target.mkdir()
                proc = (
                    start_storescp(port, target, args.associations > 1)
                    if name.startswith("dcmtk")
                    else start_radnode(port, target, args.receiver_processes)
                )
                # Start every timed run with nothing dirty in the page cache: the data
                # a previous run (storescp's above all: it never syncs) left to be
                # written back would otherwise be flushed during this one and slow
                # down whichever receiver syncs.
                os.sync()
                try:
                    seconds, acked = sender(port, series_dirs)
                finally:
                    stop(proc)
                if acked != total_images:
                    print(f"  {name}: only {acked}/{total_images} acknowledged")
                results[name].append(seconds)
                shutil.rmtree(target, ignore_errors=True)

        print(f"{'receiver':<16}{'median s':>10}{'images/s':>11}{'MB/s':>9}")
        medians = {name: statistics.median(times) for name, times in results.items()}
        for name, seconds in medians.items():
            print(
                f"{name:<16}{seconds:>10.2f}{total_images / seconds:>11.0f}"
                f"{total_mb / seconds:>9.0f}"
            )
        ratio = medians["dcmtk storescp"] / medians["radnode"]
        print(f"radnode / storescp throughput ratio: {ratio:.2f}x (target >= 1.0x, issue 11)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
