"""Event-driven waits for pynetdicom's two reactor threads.

Every pynetdicom association runs two polling loops. The DUL thread, when a pass finds
nothing to do, sleeps ``_run_loop_delay`` (1 ms) before it looks at the socket and
its outgoing queue again; the association thread sleeps a fixed 1 ms before each look
at the DIMSE message queue. A C-STORE exchange crosses those sleeps several times (the
last PDU in, the message handed to the handler, the response out, the next request's
first PDU in; on the sending side the wait for the reactor to pause before each
request), so on loopback a good part of each instance's time was spent asleep.
py-spy on ``radnode serve`` receiving 300 CT slices showed it (issue 11's note).

Here both loops wait on what they are waiting for instead:

* :class:`EventDrivenDUL` blocks in ``select`` on the association's socket and on a
  wake-up socket that is written when a primitive is queued for sending or the DUL is
  told to stop; ``_run_loop_delay`` is 0 so the loop never sleeps blind. The wait is
  bounded (:data:`IDLE_WAIT_S`) so timers (ARTIM) are still looked at.
* :class:`EventDrivenAssociation` runs pynetdicom's own reactor pass, unchanged, but
  waits on a :class:`threading.Event` that is set when a DIMSE message is complete,
  when the DUL hands up a primitive (A-RELEASE, A-ABORT), when a sender asks the
  reactor to pause (the ``_reactor_checkpoint`` is cleared) and when the association
  is killed. The wait is bounded too, so the network timeout is still checked.

Nothing of the protocol changes: the state machine, the PDUs, the pause handshake
between the reactor and the ``send_*`` methods are pynetdicom's. The subclasses are
installed by :func:`install` as the class pynetdicom instantiates for both the
acceptor (``RequestHandler._create_association``) and the requestor
(``AE.associate``); pynetdicom is pinned in ``constraints.txt`` and
``tests/test_reactor.py`` checks both paths use them.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any, cast

import pynetdicom.ae
import pynetdicom.association
import pynetdicom.transport
import structlog
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket

log = structlog.get_logger("dicom_nodes.reactor")

#: PDU types PS3.8 9.3 defines (A-ASSOCIATE-RQ 0x01 ... A-ABORT 0x07); P-DATA-TF.
_PDU_TYPES = frozenset(range(0x01, 0x08))
_P_DATA_TF = 0x04

#: Longest blind wait of either loop: how late a timer (ARTIM, network timeout) or a
#: kill may be noticed. Every real event ends the wait at once.
IDLE_WAIT_S = 0.01


class MessageStructureError(Exception):
    """Raised by a :attr:`EventDrivenDUL.p_data_reader` when the peer broke the
    structure of a DIMSE message (PS3.8 E.2): the association is aborted."""


class _NotifyingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls ``notify`` after every ``put``."""

    def __init__(self, notify: Any) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class _Checkpoint:
    """The reactor's pause checkpoint: pynetdicom's ``_reactor_checkpoint`` (an Event
    there, with the same ``set``/``clear``/``wait``/``is_set``).

    Clearing it (a sender wants the reactor paused) wakes the reactor so it reaches the
    pause at once. The reactor pauses in :meth:`hold`, which marks the association
    paused and unpaused under the same lock as ``set`` and ``clear``: with a plain Event
    a sender that set the checkpoint and cleared it again for its next message could
    see the reactor still marked paused while it was already running a pass, and that
    pass could take the next response off the DIMSE queue.
    """

    def __init__(self, wake: threading.Event, mark_paused: Callable[[bool], None]) -> None:
        self._cond = threading.Condition()
        self._open = True
        self._held = False
        self._wake = wake
        self._mark_paused = mark_paused

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._open = False
        self._wake.set()

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._open, timeout)

    def hold(self) -> None:
        """Reactor side: stay here while the checkpoint is cleared."""
        with self._cond:
            self._held = True
            self._mark_paused(True)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._open)
            self._mark_paused(False)
            self._held = False

    def wait_until_held(self, ended: Callable[[], bool]) -> bool:
        """Sender side, after :meth:`clear`: True once the reactor holds, False if the
        association ends first."""
        with self._cond:
            while not self._held:
                if ended():
                    return False
                self._cond.wait(IDLE_WAIT_S)
            return True


#: What to tell the operator when a peer's first bytes are not a DICOM PDU.
_NOT_DICOM_ACTIONS = {
    "tls": "the peer speaks TLS to a plain DICOM port: give it the TLS port "
    "(node.tls_port) or turn TLS off at the peer",
    "text": "the peer sent text (an HTTP client, a port scanner): it is not a DICOM "
    "application, or it was given node.port instead of http.port",
    "other": "the peer does not speak DICOM upper layer (PS3.8); check the sending "
    "system's DICOM node settings",
}


#: The same, when radnode called the peer (a destination) and got this back.
_NOT_DICOM_DESTINATION = {
    "tls": "the destination speaks TLS on this port: set tls = true on the destination,"
    " or give it the PACS's plain DICOM port",
    "text": "the destination answered with text (an HTTP server?): check its host and port",
    "other": "the destination does not answer as a DICOM application: check its host and port",
}


def _looks_like(first_byte: int) -> str:
    """A TLS record starts 0x16 (handshake); HTTP and other text protocols with a
    printable letter."""
    if first_byte == 0x16:
        return "tls"
    if 0x41 <= first_byte <= 0x5A or 0x61 <= first_byte <= 0x7A:
        return "text"
    return "other"


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL that waits in ``select`` instead of sleeping."""

    def __init__(self, assoc: Association, on_user_primitive: Any) -> None:
        super().__init__(assoc)
        self._run_loop_delay = 0.0
        self._selecting = False
        self._send_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.to_provider_queue = _NotifyingQueue(self._poke)
        self.to_user_queue = _NotifyingQueue(on_user_primitive)
        #: Sees every P-DATA-TF PDU read in data transfer (Sta6) before pynetdicom
        #: does and returns the PDUs pynetdicom is to decode, in order (see
        #: :class:`dicom_nodes.inline_store.InlineStoreReader`). Set it before the
        #: association is accepted; called on this thread only.
        self.p_data_reader: Callable[[bytearray], list[bytes]] | None = None
        self._response_awaited = threading.Event()
        self._not_dicom = False

    def _poke(self) -> None:
        """Wake the DUL if it is (about to be) in ``select``; otherwise it looks at its
        queues anyway before it waits again (a send per PDU cost the sender ~10 %)."""
        if self._selecting:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")

    def _stop_waiting(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _drain(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass

    def _is_transport_event(self) -> bool:
        if self.state_machine.current_state == "Sta5" and not self._response_awaited.is_set():
            # Requestor, A-ASSOCIATE-RQ sent: pynetdicom's ACSE thread checks the
            # socket is connected and only then waits for the answer. An A-ASSOCIATE-RJ
            # read before that check closes the connection, and the check then took the
            # rejection for a failed connect and aborted (a loaded machine: ~1 in 400
            # rejections; the peer's reason was lost). The answer is read once the ACSE
            # waits for it.
            self._response_awaited.wait(IDLE_WAIT_S)
            return False
        self._wait_for_work()
        return super()._is_transport_event()

    def receive_pdu(self, wait: bool = False, timeout: float | None = None) -> Any:
        self._response_awaited.set()
        return super().receive_pdu(wait, timeout)

    def _wait_for_work(self) -> None:
        """Block until the socket is readable, something is queued to send, or the
        DUL is stopped; at most :data:`IDLE_WAIT_S`.

        ``_selecting`` is raised before the queues are looked at: a primitive queued
        after that look finds it raised and pokes; one queued before is seen."""
        self._selecting = True
        try:
            self._select()
        finally:
            self._selecting = False

    def _select(self) -> None:
        if (
            self._kill_thread
            or not self.event_queue.empty()
            or not self.to_provider_queue.empty()
            or self.socket is None
        ):
            return
        sock = self.socket.socket
        if sock is None or (hasattr(sock, "pending") and sock.pending()):
            return
        try:
            readable, _, _ = select.select([sock, self._wake_r], [], [], IDLE_WAIT_S)
        except (OSError, ValueError):
            return  # closed under us: pynetdicom's own check reports it
        if sock in readable:
            _ack_at_once(sock)
        self._drain()

    def _read_pdu_data(self) -> None:
        """pynetdicom's read of one PDU (its events for a closed connection and an
        unknown PDU type), with P-DATA-TF in data transfer shown to
        :attr:`p_data_reader` first."""
        reader = self.p_data_reader
        pdu = self._read_pdu()
        if pdu is None:
            return
        if reader is None or pdu[0] != _P_DATA_TF or self.state_machine.current_state != "Sta6":
            self._decode_and_queue(pdu)
            return
        try:
            passed = reader(pdu)
        except MessageStructureError as exc:  # AA-8, as for any invalid PDU
            log.warning(
                "association.protocol_error",
                reason=str(exc),
                peer_address=str(self.assoc.requestor.address),
                action="the association was aborted; check the sending system",
            )
            self.event_queue.put("Evt19")
            return
        except Exception:
            log.exception("association.reader_failed", action="report this as a bug")
            self.event_queue.put("Evt19")
            return
        for raw in passed:
            self._decode_and_queue(raw)

    def _read_pdu(self) -> bytearray | None:
        """One whole PDU, or None with Evt17 (connection closed, or closed midway) or
        Evt19 (unknown PDU type) queued, as pynetdicom's read does."""
        assert self.socket is not None
        if self._not_dicom:
            # What follows a PDU of no known type is not read. Once the A-ABORT has gone
            # (Sta13) the connection closes; with no data left, pynetdicom closes it.
            if self.state_machine.current_state == "Sta13":
                _discard_readable(self.socket.socket)
                self.socket.close()
            return None
        try:
            header = self.socket.recv(6)
            if len(header) != 6:
                self.event_queue.put("Evt17")
                return None
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type not in _PDU_TYPES:
                self._say_not_dicom(pdu_type)
                # A-ABORT once (AA-1/AA-8), then close: the peer is not speaking DICOM,
                # so waiting for it to close (Sta13, ARTIM) answered each further 6
                # bytes of an HTTP request with another A-ABORT and held the
                # connection for network_timeout_s (60 s) after an HTTP GET. Queuing
                # Evt17 after Evt19 closed it before association only: on an
                # established one the machine went back to Sta1 with the connection
                # open, holding its slot for network_timeout_s (acceptance pass).
                self._not_dicom = True
                self.event_queue.put("Evt19")
                return None
            body = self.socket.recv(length)
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")
            return None
        if len(body) != length:
            self.event_queue.put("Evt17")
            return None
        return header + body

    def _say_not_dicom(self, first_byte: int) -> None:
        """One line, with what to do, for a peer that does not speak DICOM here.

        pynetdicom logged "Unknown PDU type received" for every 6 bytes of the stray
        data, without the peer or an action: 25 error lines for one TLS handshake sent
        to the plain port (load pass). The bytes themselves are not logged."""
        looks_like = _looks_like(first_byte)
        if self.assoc.is_requestor:  # we called a destination, and it is not DICOM
            peer, action = self.assoc.acceptor.address, _NOT_DICOM_DESTINATION[looks_like]
        else:
            peer, action = self.assoc.requestor.address, _NOT_DICOM_ACTIONS[looks_like]
        log.warning(
            "association.not_dicom",
            peer_address=str(peer),
            first_byte=f"0x{first_byte:02X}",
            looks_like=looks_like,
            action=action,
        )

    def _decode_and_queue(self, pdu: bytes | bytearray) -> None:
        """The end of pynetdicom's read: decode, queue the event and the PDU
        (``_decode_pdu`` takes bytes as they are, a bytearray as a copy)."""
        try:
            decoded, event = self._decode_pdu(pdu)  # type: ignore[arg-type]
        except Exception:
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)

    def _send(self, pdu: Any) -> None:
        with self._send_lock:  # never between the PDUs of a direct_writes() caller
            super()._send(pdu)

    @contextlib.contextmanager
    def direct_writes(self) -> Iterator[socket.socket]:
        """The connection, for a caller to write P-DATA-TF PDUs itself, with the DUL's
        own writes held off meanwhile. P-DATA in data transfer (Sta6) changes no state
        (PS3.8 9.2, DT-1), so the state machine stays right; only pynetdicom's
        EVT_PDU_SENT/EVT_DATA_SENT are not fired for these PDUs. A write that fails is
        reported to the state machine as pynetdicom's own send reports it (Evt17).

        Raises RuntimeError outside Sta6 (the association ended or was never
        established) and on a TLS connection from any thread but the DUL's own, as
        OpenSSL must not be written from one thread while the DUL thread reads."""
        with self._send_lock:
            sock = self.socket.socket if self.socket is not None else None
            if sock is None or self.state_machine.current_state != "Sta6":
                raise RuntimeError("the association is not in data transfer")
            if is_tls(sock) and threading.current_thread() is not self:
                raise RuntimeError("direct writes on a TLS connection")
            try:
                yield sock
            except OSError:
                self.event_queue.put("Evt17")
                raise

    def kill_dul(self) -> None:
        super().kill_dul()
        self._stop_waiting()

    def stop_dul(self) -> bool:
        """pynetdicom's ``stop_dul`` (stop once back in Sta1), but the DUL is woken
        and joined: pynetdicom waits by sleeping ``_run_loop_delay``, which is 0 here,
        so it spun on the GIL until the DUL's bounded wait ran out."""
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self._stop_waiting()
        while threading.current_thread() is not self and self.is_alive():
            self.join(IDLE_WAIT_S)
        return True

    def run_reactor(self) -> None:
        """pynetdicom's DUL loop (``DULServiceProvider.run_reactor``) without its
        ``time.sleep(_run_loop_delay)`` before each look: the look itself waits in
        ``select`` for work (:meth:`_wait_for_work`), and ``sleep(0)`` gave the core
        away once per PDU (receiving 300 CT slices: 0.93 -> 0.82 s)."""
        try:
            self._idle_timer.start()
            self.assoc._dul_ready.set()
            while not self._kill_thread:
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception:
                    self._abort_on_error()
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    continue
                self.state_machine.do_action(event)
        finally:
            for end in (self._wake_r, self._wake_w):
                end.close()

    def _abort_on_error(self) -> None:
        """As pynetdicom does when its DUL loop fails: an A-ABORT written past the
        state machine (whose state can no longer be trusted), both reactors ended."""
        log.exception("association.dul_failed", action="report this as a bug")
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = 0x00
        with contextlib.suppress(Exception):
            cast(AssociationSocket, self.socket).send(abort.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


def _discard_readable(sock: socket.socket | None) -> None:
    """Read and drop what has arrived (up to 4 MiB), without waiting: closed with unread
    bytes, a connection is reset rather than closed, and a peer's stack may then drop
    the A-ABORT it had not read yet (review)."""
    if sock is None:
        return
    with contextlib.suppress(OSError, ValueError):  # BlockingIOError, SSL want-read
        sock.setblocking(False)
        for _ in range(64):
            if not sock.recv(65536):
                return


def connection_of(assoc: Any) -> socket.socket | None:
    """The association's TCP (or TLS) socket; None before it connects or once closed."""
    return getattr(getattr(assoc.dul, "socket", None), "socket", None)


def is_tls(sock: socket.socket) -> bool:
    """Whether the connection speaks TLS (OpenSSL then owns its reads and writes)."""
    return isinstance(sock, ssl.SSLSocket)


_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def _ack_at_once(sock: socket.socket) -> None:
    """Acknowledge what arrives now rather than up to 40 ms later (Linux TCP_QUICKACK,
    which the kernel drops again by itself, hence set before every read).

    A peer with Nagle's algorithm on (DCMTK as packaged, Orthanc with it, unless
    ``TCP_NODELAY=1`` is in their environment) writes a PDU in two pieces and holds the
    second until the first is acknowledged; with our delayed ACK every C-STORE then
    stalled ~44 ms (``bench/scu.py --nagle``: 22 files/s, storescu as slow)."""
    if _TCP_QUICKACK is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)


#: The first buffer a read allocates; a longer PDU grows it as its bytes arrive.
_FIRST_READ_BYTES = 1024 * 1024


class WholeReadSocket(AssociationSocket):
    """pynetdicom's AssociationSocket that reads a PDU in as few calls as the kernel
    allows.

    pynetdicom reads every PDU 4096 bytes per ``recv`` and appends each piece to a
    bytearray: a 128 KiB P-DATA-TF PDU took 32 trips through Python and a 512 KiB CT
    slice ~140 (strace of ``radnode serve`` receiving 300 slices: 42,475 ``recvfrom``
    calls; ``bench/pdu_read.py``: 0.46 -> 0.25 s CPU per 629 MB). Here the bytes land
    straight in one buffer (``recv_into``), which loopback and LAN fill in one to a few
    calls. The buffer starts at the PDU's length up to 1 MiB and doubles only as bytes
    arrive, so a peer that announces a 4 GiB PDU in the 6 bytes of its header, before
    any association is checked, costs no more memory than the bytes it really sends
    (found by review). What is returned, and what a closed connection or a timeout
    does, is pynetdicom's."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        buffer = bytearray(min(nr_bytes, _FIRST_READ_BYTES))
        nr_read = 0
        while nr_read < nr_bytes:
            if nr_read == len(buffer):  # full, more to come: double it
                buffer += bytes(min(len(buffer), nr_bytes - nr_read))
            with memoryview(buffer) as view:
                got = sock.recv_into(view[nr_read:], len(buffer) - nr_read)
            if not got:  # connection closed: what arrived, as pynetdicom returns
                break
            nr_read += got
        del buffer[nr_read:]
        return buffer


class EventDrivenAssociation(Association):
    """pynetdicom's Association whose reactor waits on an event instead of sleeping."""

    def __init__(self, ae: Any, mode: str) -> None:
        self._wake = threading.Event()
        super().__init__(ae, mode)
        self.dul = EventDrivenDUL(self, self._wake.set)
        self.dimse.msg_queue = _NotifyingQueue(self._wake.set)
        self._reactor_checkpoint = _Checkpoint(self._wake, self._mark_paused)
        # pynetdicom's timeout setters configure the DUL's timers: apply them again
        # to the DUL that replaced the one built in Association.__init__.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

    def _mark_paused(self, paused: bool) -> None:
        self._is_paused = paused

    def kill(self) -> None:
        super().kill()
        self._wake.set()  # the reactor sees _kill now, not after its bounded wait

    def _run_reactor(self) -> None:
        """pynetdicom's ``Association._run_reactor`` with the 1 ms sleep replaced by a
        wait for work; each pass after the wait is pynetdicom's."""
        self._is_paused = False
        while not self._kill:
            self._wake.wait(IDLE_WAIT_S)
            self._wake.clear()

            # As pynetdicom: a sender may hold the reactor here while it exchanges
            # messages itself.
            self._reactor_checkpoint.hold()

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
                self._wake.set()  # another message may already be queued

            # Looked at before the abort check: a DUL that ends after queueing the
            # peer's A-ABORT must not look like one that ended without a word.
            dul_ended = not self.dul.is_alive()

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if dul_ended:
                self.kill()
                return

            if self.dul.idle_timer_expired():
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


@contextlib.contextmanager
def reactor_paused(assoc: EventDrivenAssociation) -> Iterator[None]:
    """Hold the association's reactor while the caller exchanges messages itself, as
    pynetdicom's ``send_*`` methods do, but woken by the reactor instead of polling
    with 0.1 ms sleeps. Raises RuntimeError if the association ends first."""
    checkpoint = cast(_Checkpoint, assoc._reactor_checkpoint)
    checkpoint.clear()
    try:
        if not checkpoint.wait_until_held(lambda: bool(assoc._kill)):
            raise RuntimeError("the association ended before its reactor paused")
        yield
    finally:
        checkpoint.set()


_installed = False
_lock = threading.Lock()


def install() -> None:
    """Make pynetdicom build :class:`EventDrivenAssociation` for every association,
    accepted or requested, in this process, on a :class:`WholeReadSocket`.
    Idempotent."""
    global _installed
    with _lock:
        if _installed:
            return
        pynetdicom.association.Association = EventDrivenAssociation  # type: ignore[misc]
        pynetdicom.ae.Association = EventDrivenAssociation  # type: ignore[misc]
        pynetdicom.transport.AssociationSocket = WholeReadSocket  # type: ignore[misc]
        pynetdicom.ae.AssociationSocket = WholeReadSocket  # type: ignore[misc]
        _installed = True
