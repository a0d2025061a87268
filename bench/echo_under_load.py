"""Does the node still answer C-ECHO promptly while it is busy receiving?

Starts ``radnode serve`` (as tests/conftest.py's RadnodeProcess does), sends
``--senders`` (8) concurrent associations of ``--instances`` (300) small CT instances
each with DCMTK ``storescu``, and meanwhile measures C-ECHO round trips every 100 ms in
two ways:

* ``echo (open association)``: one association held open, a C-ECHO on it every 100 ms
  (DIMSE latency under load);
* ``echo (new association)``: connect, associate, C-ECHO, release every 100 ms, as a
  PACS's "verify node" button does (accept loop and association setup under load);
* ``echo (new association, raw client)``: the same exchange from a client that sends
  pre-encoded PDUs on a plain socket and reads the answers (no client library): the
  node's own time, without pynetdicom's requestor threads, which compete for the same
  two cores.

Prints median / p95 / max of both, and whether every instance was acknowledged by the
node and is on disk (spool files counted). Prints; never asserts.

``--with-model``: the node runs on the reference routes and bundles of ``models/``; a
phantom abdomen CT goes first and the load starts once its segmentation job has
started, so the receive path competes with a model for the CPU, as it does in a
hospital. Whether the job was still running when the load ended is printed. The same
load is first sent to a node without models (the idle rate), and the ratio of the two
receive rates is printed next to issue 11's target (>= 80 %).

    python -m bench.echo_under_load --senders 8 --instances 300 [--with-model]
"""

from __future__ import annotations

import argparse
import itertools
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import Verification  # noqa: E402

from service.testing import make_ct_phantom, write_ct_phantom, write_ct_series  # noqa: E402
from tests.conftest import RadnodeProcess, acknowledged_files, free_port, storescu  # noqa: E402


def _raw_echo_pdus() -> tuple[bytes, bytes, bytes]:
    """A-ASSOCIATE-RQ (Verification, implicit VR), a C-ECHO-RQ in one P-DATA-TF and an
    A-RELEASE-RQ, encoded once by pynetdicom's PDU classes."""
    from pynetdicom.dimse_messages import C_ECHO_RQ
    from pynetdicom.dimse_primitives import C_ECHO
    from pynetdicom.pdu import A_ASSOCIATE_RQ, A_RELEASE_RQ, P_DATA_TF
    from pynetdicom.pdu_primitives import A_ASSOCIATE, A_RELEASE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    request = A_ASSOCIATE()
    request.application_context_name = "1.2.840.10008.3.1.1.1"
    request.calling_ae_title, request.called_ae_title = "ECHOPROBE", "RADNODE"
    context = build_context(Verification)
    context.context_id = 1
    request.presentation_context_definition_list = [context]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    request.user_information = [maximum]
    associate = A_ASSOCIATE_RQ()
    associate.from_primitive(request)
    echo = C_ECHO()
    echo.MessageID, echo.AffectedSOPClassUID = 1, Verification
    message = C_ECHO_RQ()
    message.primitive_to_message(echo)
    data = b""
    for fragment in message.encode_msg(1, 16384):
        pdu = P_DATA_TF()
        pdu.from_primitive(fragment)
        data += pdu.encode()
    release = A_RELEASE_RQ()
    release.from_primitive(A_RELEASE())
    return associate.encode(), data, release.encode()


def _read_pdu_type(sock: socket.socket) -> int:
    """Read one whole PDU; its type (2 A-ASSOCIATE-AC, 4 P-DATA-TF, 6 A-RELEASE-RP)."""
    header = sock.recv(6, socket.MSG_WAITALL)
    if len(header) < 6:
        raise ConnectionError("the node closed the connection")
    (length,) = struct.unpack(">I", header[2:6])
    body = sock.recv(length, socket.MSG_WAITALL) if length else b""
    if len(body) < length:
        raise ConnectionError("the node closed the connection")
    return header[0]


def raw_echo(port: int, pdus: tuple[bytes, bytes, bytes]) -> list[float]:
    """Connect, associate, C-ECHO, release on a plain socket; the seconds of each of
    those four phases and of the whole. Raises ConnectionError when the node closes
    the connection or answers anything but A-ASSOCIATE-AC, P-DATA-TF, A-RELEASE-RP."""
    marks = [time.perf_counter()]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        marks.append(time.perf_counter())
        for pdu, expected in zip(pdus, (2, 4, 6), strict=True):
            sock.sendall(pdu)
            if _read_pdu_type(sock) != expected:
                raise ConnectionError("the node did not accept the association or the echo")
            marks.append(time.perf_counter())
    steps = [later - earlier for earlier, later in itertools.pairwise(marks)]
    return [*steps, marks[-1] - marks[0]]


class EchoProbe:
    """C-ECHO every ``interval`` seconds until stopped; keeps round-trip times (s)."""

    def __init__(self, port: int, *, fresh: bool, interval: float = 0.1, raw: bool = False) -> None:
        self.port, self.fresh, self.interval, self.raw = port, fresh, interval, raw
        self.times: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> EchoProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _ae(self) -> AE:
        ae = AE(ae_title="ECHOPROBE")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        return ae

    def _run(self) -> None:
        ae = self._ae()
        held = None if self.fresh else ae.associate("127.0.0.1", self.port, ae_title="RADNODE")
        pdus = _raw_echo_pdus() if self.raw else None
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                if pdus is not None:
                    raw_echo(self.port, pdus)  # raises unless every answer came
                    ok = True
                elif held is None:
                    assoc = ae.associate("127.0.0.1", self.port, ae_title="RADNODE")
                    ok = assoc.is_established and assoc.send_c_echo().Status == 0
                    if assoc.is_established:
                        assoc.release()
                else:
                    ok = held.is_established and held.send_c_echo().Status == 0
            except Exception:  # a failed echo is a data point, not a crash
                ok = False
            elapsed = time.perf_counter() - started
            if ok:
                self.times.append(elapsed)
            else:
                self.failures += 1
            self._stop.wait(max(0.0, self.interval - elapsed))
        if held is not None and held.is_established:
            held.release()


def _summary(name: str, probe: EchoProbe) -> str:
    if not probe.times:
        return f"{name}: no successful echo ({probe.failures} failed)"
    ms = sorted(t * 1000 for t in probe.times)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return (
        f"{name}: n={len(ms)} median {statistics.median(ms):.1f} ms, p95 {p95:.1f} ms, "
        f"max {ms[-1]:.1f} ms, failed {probe.failures}"
    )


def _send_load(port: int, series: list[list[Path]]) -> list[Any]:
    """Every series at once, one storescu association each; their completed runs."""
    with ThreadPoolExecutor(max_workers=len(series)) as pool:
        return list(pool.map(lambda files: storescu(port, files), series))


def _idle_receive_rate(work: Path, series: list[list[Path]], senders: int) -> float:
    """Instances/s for the same load into a node that runs no model."""
    node = RadnodeProcess(
        data_dir=work / "idle-data",
        port=free_port(),
        http_port=free_port(),
        extra_env={"RADNODE_NODE__MAX_ASSOCIATIONS": str(senders + 4)},
    )
    node.start()
    try:
        started = time.monotonic()
        _send_load(node.port, series)
        return sum(len(s) for s in series) / (time.monotonic() - started)
    finally:
        node.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, default=8, help="concurrent associations")
    parser.add_argument("--instances", type=int, default=300, help="instances per association")
    parser.add_argument("--size", type=int, default=64, help="rows = columns of each image")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--phantom-rows",
        type=int,
        default=512,
        help="rows of the phantom CT (--with-model): its job must outlast the load",
    )
    parser.add_argument("--phantom-slices", type=int, default=400, help="slices of the phantom")
    parser.add_argument(
        "--with-model", action="store_true", help="keep a segmentation model running"
    )
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="radnode-echo-load-"))
    print(f"work folder: {work}")
    series = [
        write_ct_series(
            work / f"sender{k}", slices=args.instances, rows=args.size, columns=args.size, seed=k
        )
        for k in range(args.senders)
    ]
    total = args.senders * args.instances
    print(
        f"{args.senders} senders x {args.instances} instances ({args.size}x{args.size}) = {total}"
    )

    idle_rate = None
    if args.with_model:
        idle_rate = _idle_receive_rate(work, series, args.senders)
        print(f"idle node (no model): {idle_rate:.0f} instances/s")

    node = RadnodeProcess(
        data_dir=work / "radnode-data",
        port=free_port(),
        http_port=free_port(),
        extra_env={
            "RADNODE_NODE__MAX_ASSOCIATIONS": str(args.senders + 4),
            **(
                {"RADNODE_ROUTES": None, "RADNODE_MODELS__DIR": str(REPO / "models")}
                if args.with_model
                else {}
            ),
        },
    )
    node.start()
    try:
        if args.with_model:
            phantom = write_ct_phantom(
                work / "phantom",
                make_ct_phantom(seed=10400, rows=args.phantom_rows, slices=args.phantom_slices),
            )
            storescu(node.port, phantom)
            node.wait_for_event("job.started", timeout=300)
            print("a segmentation job is running; starting the load")
        spool = node.data_dir / "spool"
        before = sum(1 for _ in spool.rglob("*.dcm"))  # the phantom, with --with-model
        idle = EchoProbe(node.port, fresh=False).start()
        time.sleep(2.0)
        idle.stop()
        print(_summary("idle echo (open association)", idle))

        raw_idle = EchoProbe(node.port, fresh=True, raw=True).start()
        time.sleep(2.0)
        raw_idle.stop()
        print(_summary("idle echo (new association, raw client)", raw_idle))

        held = EchoProbe(node.port, fresh=False).start()
        fresh = EchoProbe(node.port, fresh=True).start()
        raw = EchoProbe(node.port, fresh=True, raw=True).start()
        started = time.monotonic()
        results = _send_load(node.port, series)
        seconds = time.monotonic() - started
        for probe in (held, fresh, raw):
            probe.stop()

        acked = sum(len(acknowledged_files(r.stdout + r.stderr)) for r in results)
        failed_senders = sum(1 for r in results if r.returncode != 0)
        on_disk = sum(1 for _ in spool.rglob("*.dcm")) - before
        print(f"sent in {seconds:.1f} s ({total / seconds:.0f} instances/s)")
        if idle_rate:
            print(
                f"receive rate while the model runs: {total / seconds / idle_rate:.0%} of idle"
                " (target >= 80 %, issue 11)"
            )
        if args.with_model:
            busy = not node.events("job.recorded")
            print(f"the model job was {'still running' if busy else 'finished'} at the end")
        print(_summary("echo (open association)", held))
        print(_summary("echo (new association)", fresh))
        print(_summary("echo (new association, raw client)", raw))
        print(
            f"acknowledged {acked}/{total}, on disk {on_disk}/{total}, senders failed "
            f"{failed_senders}: {'ALL STORED' if acked == on_disk == total else 'MISSING'}"
        )
    finally:
        code = node.stop()
        print(f"radnode exited with {code}")
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
