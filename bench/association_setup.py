"""How long an idle node takes to set up an association, answer a C-ECHO and release.

    .venv/bin/python bench/association_setup.py [--count 200]

A client on a plain socket sends pre-encoded PDUs (A-ASSOCIATE-RQ, a C-ECHO-RQ,
A-RELEASE-RQ; see bench/echo_under_load.py) and times each answer, so the figures are
the receiver's own and not a client library's. Runs against DCMTK ``storescp``
(TCP_NODELAY=1) and ``radnode serve`` in turn, ``--count`` associations each, one at a
time, and prints the median and the worst of each phase. A PACS's "verify node" button
is one such association. Prints; never asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.echo_under_load import _raw_echo_pdus, raw_echo  # noqa: E402
from tests.conftest import RadnodeProcess, free_port, wait_for_port  # noqa: E402

#: What bench.echo_under_load.raw_echo times, in its order.
PHASES = ("connect", "associate", "C-ECHO", "release", "total")


def measure(name: str, port: int, count: int) -> None:
    pdus = _raw_echo_pdus()
    failures: list[str] = []

    def timed() -> list[float] | None:
        try:
            return raw_echo(port, pdus)
        except OSError as exc:  # a failure is a data point, not a crash
            failures.append(f"{type(exc).__name__}: {exc}")
            return None

    for _ in range(10):  # warm up: first associations import and allocate
        timed()
    rows = [row for row in (timed() for _ in range(count)) if row is not None]
    columns = list(zip(*rows, strict=True))
    cells = [f"{statistics.median(c) * 1000:6.2f} / {max(c) * 1000:6.1f}" for c in columns]
    print(f"{name:<10}" + "".join(f"{cell:>18}" for cell in cells) + f"{len(failures):>10}")
    for failure in sorted(set(failures)):
        print(f"  {name} failed {failures.count(failure)}x: {failure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="associations per receiver")
    args = parser.parse_args()
    print(f"{args.count} associations each; ms, median / worst")
    print(f"{'receiver':<10}" + "".join(f"{phase:>18}" for phase in PHASES) + "    failed")
    with tempfile.TemporaryDirectory(prefix="radnode-assoc-") as work:
        port = free_port()
        storescp = subprocess.Popen(
            ["storescp", "-aet", "RADNODE", "-od", work, str(port)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(port, proc=storescp)
            measure("storescp", port, args.count)
        finally:
            storescp.terminate()
            storescp.wait(timeout=10)
        node = RadnodeProcess(
            data_dir=Path(work) / "radnode", port=free_port(), http_port=free_port()
        )
        node.start()
        try:
            measure("radnode", node.port, args.count)
        finally:
            node.stop()


if __name__ == "__main__":
    main()
