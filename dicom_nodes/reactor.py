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
import threading
from typing import Any, cast

import pynetdicom.ae
import pynetdicom.association
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

#: Longest blind wait of either loop: how late a timer (ARTIM, network timeout) or a
#: kill may be noticed. Every real event ends the wait at once.
IDLE_WAIT_S = 0.01


class _NotifyingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls ``notify`` after every ``put``."""

    def __init__(self, notify: Any) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class _Checkpoint(threading.Event):
    """The reactor's pause checkpoint; clearing it (a sender wants the reactor
    paused) wakes the reactor so it reaches the pause at once."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake

    def clear(self) -> None:
        super().clear()
        self._wake.set()


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL that waits in ``select`` instead of sleeping."""

    def __init__(self, assoc: Association, on_user_primitive: Any) -> None:
        super().__init__(assoc)
        self._run_loop_delay = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.to_provider_queue = _NotifyingQueue(self._poke)
        self.to_user_queue = _NotifyingQueue(on_user_primitive)

    def _poke(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _drain(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass

    def _is_transport_event(self) -> bool:
        self._wait_for_work()
        return super()._is_transport_event()

    def _wait_for_work(self) -> None:
        """Block until the socket is readable, something is queued to send, or the
        DUL is stopped; at most :data:`IDLE_WAIT_S`."""
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
            select.select([sock, self._wake_r], [], [], IDLE_WAIT_S)
        except (OSError, ValueError):
            return  # closed under us: pynetdicom's own check reports it
        self._drain()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._poke()

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            for end in (self._wake_r, self._wake_w):
                end.close()


class EventDrivenAssociation(Association):
    """pynetdicom's Association whose reactor waits on an event instead of sleeping."""

    def __init__(self, ae: Any, mode: str) -> None:
        self._wake = threading.Event()
        super().__init__(ae, mode)
        self.dul = EventDrivenDUL(self, self._wake.set)
        self.dimse.msg_queue = _NotifyingQueue(self._wake.set)
        self._reactor_checkpoint = _Checkpoint(self._wake)
        self._reactor_checkpoint.set()
        # pynetdicom's timeout setters configure the DUL's timers: apply them again
        # to the DUL that replaced the one built in Association.__init__.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

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
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
                self._wake.set()  # another message may already be queued

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

            if not self.dul.is_alive():
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


_installed = False
_lock = threading.Lock()


def install() -> None:
    """Make pynetdicom build :class:`EventDrivenAssociation` for every association,
    accepted or requested, in this process. Idempotent."""
    global _installed
    with _lock:
        if _installed:
            return
        pynetdicom.association.Association = EventDrivenAssociation  # type: ignore[misc]
        pynetdicom.ae.Association = EventDrivenAssociation  # type: ignore[misc]
        _installed = True
