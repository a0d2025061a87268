"""Storage SCU throughput: radnode's SCU against DCMTK storescu, into DCMTK storescp.

    .venv/bin/python bench/scu.py [--slices 300] [--size 512] [--repeat 3] [--pdu N] [--nagle]

Writes a CT series and its derived (reconstruction) series of ``--slices`` slices,
starts ``storescp`` (max PDU 128 KiB, ``--ignore`` so that disk speed is not measured)
on a free loopback port, and sends the derived series with both tools, best of
``--repeat``. Prints files/s, MB/s and the ratio radnode / storescu.

``--pdu`` sets the maximum PDU both receivers announce (16384 is DCMTK's default);
``--nagle`` runs the DCMTK programs without ``TCP_NODELAY=1``, as they are packaged,
which is how many PACS run (see ``dicom_nodes/reactor.py``, ``_ack_at_once``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from dicom_nodes.scu import StorageDestination, send_files  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("storescp did not listen")


def _derived_series(tmp: Path, slices: int, size: int) -> list[Path]:
    from service.pipeline.result import BundleIdentity, PipelineResult, StageTimings, TaskKind
    from service.pipeline.volume import load_series, read_headers
    from service.testing import write_ct_series
    from service.writers.dicom import write_dicom_results

    paths = write_ct_series(tmp / "ct", slices=slices, rows=size, columns=size)
    volume = load_series(paths)
    by_uid = {h.SOPInstanceUID: h for h in read_headers(paths)}
    headers = [by_uid[s.sop_instance_uid] for s in volume.sources]
    result = PipelineResult(
        bundle=BundleIdentity("bench_denoise", "0.0.1", TaskKind.RECONSTRUCTION),
        labels=(),
        device="cpu",
        timings=StageTimings(),
        image=volume.array.astype(np.float32),
    )
    written = write_dicom_results(result, volume, headers, tmp / "out")
    return [p for p in written if p.name.startswith("CT_")]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pdu", type=int, default=131072, help="max PDU both ends receive")
    parser.add_argument(
        "--nagle",
        action="store_true",
        help="run storescp/storescu without TCP_NODELAY=1 (DCMTK's packaged default)",
    )
    args = parser.parse_args()
    storescp, storescu = shutil.which("storescp"), shutil.which("storescu")
    if not storescp or not storescu:
        print("DCMTK storescp/storescu are needed (apt-get install dcmtk)")
        return 2
    env = dict(os.environ) if args.nagle else {**os.environ, "TCP_NODELAY": "1"}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files = _derived_series(tmp, args.slices, args.size)
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        port = _free_port()
        peer = subprocess.Popen(
            [storescp, "--ignore", "-pdu", str(args.pdu), "-aet", "BENCH", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait(port)
            destination = StorageDestination("127.0.0.1", port, "BENCH")
            ours, theirs = [], []
            for _ in range(args.repeat):
                t = time.perf_counter()
                report = send_files(destination, files)
                ours.append(time.perf_counter() - t)
                assert report.all_acknowledged, report.reason
                t = time.perf_counter()
                subprocess.run(
                    [
                        storescu,
                        "-aec",
                        "BENCH",
                        "-pdu",
                        str(args.pdu),
                        "127.0.0.1",
                        str(port),
                        *map(str, files),
                    ],
                    env=env,
                    check=True,
                    capture_output=True,
                )
                theirs.append(time.perf_counter() - t)
        finally:
            peer.terminate()
            peer.wait(10)
    best_ours, best_theirs = min(ours), min(theirs)
    print(f"{len(files)} files, {megabytes:.1f} MB, best of {args.repeat}")
    for name, seconds in (("radnode scu", best_ours), ("storescu", best_theirs)):
        rate = f"{len(files) / seconds:7.1f} files/s  {megabytes / seconds:7.1f} MB/s"
        print(f"  {name:12s} {seconds:6.2f} s  {rate}")
    print(f"  ratio radnode/storescu: {best_theirs / best_ours:.2f}x")
    print(
        "  reference (issue 11): storescu 825 files/s into storescp, pynetdicom 33 files/s;"
        " target radnode >= 0.5x storescu in the same run"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
