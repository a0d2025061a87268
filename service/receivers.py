"""The receive path, and extra receiver processes that run it on more CPUs.

pynetdicom handles every PDU and DIMSE message in Python, so one process serves all
its associations on one GIL: four concurrent associations go no faster than one. With
``node.receiver_processes`` > 1 the node starts that many minus one ``radnode
receiver`` processes that accept on the node's own listening sockets (the pre-fork
model, see :class:`dicom_nodes.scp.SharedListeners`): the kernel gives each new
association to one process waiting in ``accept``, and a busy process is the last to
wake, so associations spread over the idle ones.

Every process runs the same :class:`~service.ingest.Ingest` on the same spool and study
index (SQLite in WAL mode serialises writers across processes; the busy timeout covers
the wait), so an instance is durable and indexed before Success whichever process took
it, and the node's completion monitor sees it in the index as before. A receiver
process's counts reach the node's :class:`~service.metrics.Metrics` as one short line
per event on a pipe all receivers share (writes below ``PIPE_BUF`` are atomic). A
receiver stops on SIGINT or SIGTERM, dies with the node, and is restarted if it dies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from dicom_nodes.policy import AssociationPolicy
from dicom_nodes.scp import SharedListeners, StorageSCP
from service.collector import settle_garbage_collector
from service.config import Settings
from service.index import StudyIndex
from service.ingest import Ingest
from service.metrics import ReceiveCounter
from service.spool import Spool
from service.supervisor import ProcessSupervisor, child_command

log = structlog.get_logger("service.receivers")


def association_policy(settings: Settings) -> AssociationPolicy:
    """The Storage SCP's policy from ``[node]``."""
    node = settings.node
    return AssociationPolicy(
        ae_title=node.ae_title,
        allowed_calling_aets=tuple(node.allowed_calling_aets),
        max_associations=node.max_associations,
        max_pdu_bytes=node.max_pdu_bytes,
        dimse_timeout_s=node.dimse_timeout_s,
        network_timeout_s=node.network_timeout_s,
        allowed_peer_addresses=tuple(node.allowed_peer_addresses),
        require_called_aet=node.require_called_aet,
        tls_cert=node.tls_cert,
        tls_key=node.tls_key,
        tls_key_password=node.tls_key_password.get_secret_value()
        if node.tls_key_password
        else None,
        tls_ca=node.tls_ca,
        tls_require_client_cert=node.tls_require_client_cert,
    )


def build_receive_path(
    settings: Settings,
    spool: Spool,
    index: StudyIndex,
    counter: ReceiveCounter,
    shared: SharedListeners | None = None,
) -> StorageSCP:
    """The Storage SCP and the Ingest it hands instances to, as the node and every
    receiver process build them.

    Raises :class:`dicom_nodes.tls.TlsError` or ValueError for a TLS setting that
    cannot be used.
    """
    node = settings.node
    ingest = Ingest(
        spool,
        index,
        ae_title=node.ae_title,
        min_free_bytes=node.min_free_disk_mb * 1024 * 1024,
        max_study_bytes=node.max_study_mb * 1024 * 1024,
        metrics=counter,
    )
    return StorageSCP(
        association_policy(settings),
        ingest,
        host=node.host,
        port=node.port,
        on_association=counter.association,
        on_association_end=ingest.association_ended,
        tls_port=node.tls_port,
        shared=shared,
    )


# -- counts from receiver processes to the node ----------------------------------

#: The ReceiveCounter methods a receiver may call on the node's Metrics, and how many
#: integer arguments each takes (``association`` takes one word).
_COUNTED = {"instance_stored": 1, "instance_duplicate": 1, "instance_refused": 2}


class CountsOverPipe:
    """A :class:`~service.metrics.ReceiveCounter` that writes each event to a pipe."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def _send(self, *words: object) -> None:
        # OSError: the node is gone, and this process is about to be stopped with it
        with contextlib.suppress(OSError):
            os.write(self._fd, (" ".join(str(w) for w in words) + "\n").encode())

    def instance_stored(self, size_bytes: int) -> None:
        self._send("instance_stored", size_bytes)

    def instance_duplicate(self, size_bytes: int) -> None:
        self._send("instance_duplicate", size_bytes)

    def instance_refused(self, status: int, size_bytes: int) -> None:
        self._send("instance_refused", status, size_bytes)

    def association(self, outcome: str) -> None:
        self._send("association", outcome)

    def ready(self) -> None:
        """Tell the node this process accepts associations now."""
        self._send("ready", os.getpid())


def apply_count(line: str, metrics: ReceiveCounter) -> bool:
    """Apply one line from :class:`CountsOverPipe` to ``metrics``; False if malformed."""
    name, *args = line.split()
    try:
        if name == "association" and len(args) == 1:
            metrics.association(args[0])
        elif _COUNTED.get(name) == len(args):
            getattr(metrics, name)(*(int(a) for a in args))
        else:
            return False
    except ValueError:
        return False
    return True


class ReceiverPool:
    """``count`` receiver processes accepting on the node's listening sockets."""

    def __init__(
        self,
        count: int,
        config_path: Path | None,
        metrics: ReceiveCounter,
        on_exit: Callable[[int, int], None] | None = None,
    ) -> None:
        """``on_exit(pid, exit_code)``: a receiver process ended (the node marks what
        its associations were delivering as interrupted)."""
        self.count = count
        self._on_exit = on_exit
        self._config_path = config_path
        self._metrics = metrics
        self._supervisor: ProcessSupervisor | None = None
        self._read_fd = -1
        self._ready_pids: set[int] = set()

    def start(self, listeners: SharedListeners) -> None:
        if self.count < 1:
            return
        read_fd, write_fd = os.pipe()
        self._read_fd = read_fd
        threading.Thread(target=self._read_counts, name="receiver-counts", daemon=True).start()
        fds = listeners.fds()
        self._supervisor = ProcessSupervisor(
            self.count,
            child_command(
                "receiver",
                self._config_path,
                "--listen-fds",
                ",".join(str(fd) for fd in fds),
                "--counts-fd",
                str(write_fd),
            ),
            role="receiver",
            died_action="it is restarted and the other receivers go on; if this repeats,"
            " check the logs above it",
            pass_fds=(*fds, write_fd),
            on_exit=self._on_exit,
        )
        self._supervisor.start()
        # the children hold the write end; the node keeps its copy for restarts

    def pids(self) -> list[int]:
        return self._supervisor.pids() if self._supervisor is not None else []

    def ready(self) -> bool:
        """Every receiver process that runs now has said it accepts associations."""
        pids = self.pids()
        return len(pids) == self.count and self._ready_pids.issuperset(pids)

    def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.stop(timeout_s=10)

    def _read_counts(self) -> None:
        with os.fdopen(self._read_fd, "r", encoding="ascii", errors="replace") as pipe:
            for line in pipe:
                words = line.split()
                if len(words) == 2 and words[0] == "ready" and words[1].isdigit():
                    self._ready_pids.add(int(words[1]))
                elif words and not apply_count(line, self._metrics):
                    log.warning("receiver.bad_count_line", action="report this as a bug")


def run_receiver(settings: Settings, listen_fds: list[int], counts_fd: int) -> None:
    """Body of ``radnode receiver``: serve associations until SIGINT or SIGTERM."""
    sockets = [socket.socket(fileno=fd) for fd in listen_fds]
    shared = SharedListeners(*sockets)
    data_dir = Path(settings.node.data_dir)
    index = StudyIndex(data_dir / "index.sqlite3")
    counter = CountsOverPipe(counts_fd)
    scp = build_receive_path(settings, Spool(data_dir), index, counter, shared)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    settle_garbage_collector()
    scp.start()
    counter.ready()
    log.info("receiver.started", pid=os.getpid())
    while not stopped.wait(1.0):  # timed, as in Node.run_until_signalled
        pass
    scp.stop()
    index.close()
    log.info("receiver.stopped", pid=os.getpid())
