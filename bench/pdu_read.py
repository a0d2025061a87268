"""Reading PDUs off a socket: pynetdicom's AssociationSocket.recv vs radnode's
WholeReadSocket (dicom_nodes.reactor), same bytes, same run.

    .venv/bin/python bench/pdu_read.py [--pdus 4800] [--pdu-kib 128] [--rounds 3]

A thread writes ``pdus`` blocks of ``pdu-kib`` KiB into one end of a socket pair; the
other end reads them back one PDU-sized ``recv`` at a time, as the DUL reads a
P-DATA-TF PDU after its 6-byte header. 4800 x 128 KiB is what four 300-slice CT series
put on the wire. Prints the wall and CPU seconds of the reading side (medians).
"""

from __future__ import annotations

import argparse
import queue
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pynetdicom.transport import AssociationSocket

from dicom_nodes.reactor import WholeReadSocket


def read_all(cls: type[AssociationSocket], pdus: int, pdu_bytes: int) -> tuple[float, float]:
    """(wall s, CPU s of this process) to read ``pdus`` PDUs through ``cls``."""
    ours, theirs = socket.socketpair()
    # Built around a connected socket, an AssociationSocket only queues Evt5 on its
    # owner's DUL: a namespace with that queue stands in for the association.
    owner = SimpleNamespace(dul=SimpleNamespace(event_queue=queue.Queue()))
    reader = cls(owner, client_socket=ours)  # type: ignore[arg-type]
    payload = b"\x00" * pdu_bytes

    def write() -> None:
        for _ in range(pdus):
            theirs.sendall(payload)

    writer = threading.Thread(target=write)
    writer.start()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(pdus):
        if len(reader.recv(pdu_bytes)) != pdu_bytes:
            raise RuntimeError("short read")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    writer.join()
    ours.close()
    theirs.close()
    return wall, cpu  # CPU includes the writer thread's, the same for both


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pdus", type=int, default=4800)
    parser.add_argument("--pdu-kib", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pdu_bytes = args.pdu_kib * 1024
    results: dict[str, list[tuple[float, float]]] = {"pynetdicom": [], "radnode": []}
    for _ in range(args.rounds):  # interleaved
        results["pynetdicom"].append(read_all(AssociationSocket, args.pdus, pdu_bytes))
        results["radnode"].append(read_all(WholeReadSocket, args.pdus, pdu_bytes))
    megabytes = args.pdus * pdu_bytes / 1e6
    print(f"{args.pdus} PDUs of {args.pdu_kib} KiB ({megabytes:.0f} MB), {args.rounds} rounds")
    print(f"{'reader':<12}{'wall s':>8}{'cpu s':>8}")
    for name, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"{name:<12}{wall:>8.2f}{cpu:>8.2f}")


if __name__ == "__main__":
    main()
