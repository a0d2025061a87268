"""Storage SCP and Verification SCP.

The SCP binds C-ECHO and C-STORE, hands the received bytes of each instance to one
:class:`Receiver` and returns the status the receiver chose. It never decodes pixel
data and never decides what "stored" means: the receiver does, and only answers
Success once the instance is durable.

C-STOREs are served on each association's DUL thread as their PDUs arrive
(:mod:`dicom_nodes.inline_store`: no hand-over to pynetdicom's DIMSE layer and
association thread); C-ECHO, and a C-STORE the inline reader does not take, go
through pynetdicom's event handlers as before, to the same receiver.

One log event per association state change (opened, rejected, closed) carries the
peer AE title, address, instance and byte counts and the duration; instances
themselves are logged by the receiver, which knows which study they belong to.

Who may associate is the :class:`~dicom_nodes.policy.AssociationPolicy`'s: the peer
address allowlist is checked when the A-ASSOCIATE-RQ arrives (``EVT_REQUESTED``), the
calling/called AE titles and the association limit by pynetdicom's own negotiation;
each refusal is an A-ASSOCIATE-RJ and one ``association.rejected`` line naming the
reason.

DICOM TLS (:mod:`dicom_nodes.tls`): with ``policy.tls_cert`` set and no ``tls_port``,
the one listening port speaks TLS only. With ``tls_port`` too, ``port`` stays plain and
``tls_port`` speaks TLS (e.g. 11112 and 2762 during a migration). The TLS handshake
runs on the connection's own thread with the ACSE timeout as its deadline, never in
the accept loop, so a peer that connects and stays silent blocks nobody else; a failed
handshake is one ``tls.handshake_failed`` line with the reason.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import os
import secrets
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import structlog
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_nodes import negotiation, reactor
from dicom_nodes.c_store import StoreRequest
from dicom_nodes.implementation import identify
from dicom_nodes.inline_store import InlineStoreReader
from dicom_nodes.policy import AssociationPolicy
from dicom_nodes.status import EchoStatus, StoreStatus
from dicom_nodes.tls import describe_handshake_error

log = structlog.get_logger("dicom_nodes.scp")

#: How long an association's close line waits for a store in flight to be counted.
_STORE_WAIT_S = 30.0

#: Names each association of this process; with the pid, unique in the node (its
#: receiver processes share one index).
_association_serial = itertools.count(1)


#: Told apart from an earlier run's (a container's radnode is pid 1 at every start).
_RUN = secrets.token_hex(4)


def _association_name() -> str:
    return f"{os.getpid()}-{_RUN}-{next(_association_serial)}"


@dataclass(frozen=True)
class ReceivedInstance:
    """One C-STORE request as it came off the wire, data set still encoded."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    #: The encoded data set exactly as received (no file meta, no preamble).
    dataset: bytes
    calling_ae: str
    called_ae: str
    peer_address: str
    #: Names the association the instance came on, unique in this node while it is
    #: open ("" when not known): what the receiver may hold a study open by until
    #: ``on_association_end`` is called with it.
    association: str = ""


class Receiver(Protocol):
    """What the SCP hands each received instance to."""

    def store(self, instance: ReceivedInstance) -> StoreStatus:
        """Make ``instance`` durable and return the status to send back."""
        ...


#: A-ASSOCIATE-RJ (result, source, reason) -> (what the log says, what to do); PS3.8 9.3.4.
_REJECTIONS: dict[tuple[int, int, int], tuple[str, str]] = {
    (1, 1, 1): (
        "peer address not in node.allowed_peer_addresses",
        "add the peer's address or network to node.allowed_peer_addresses if it is expected",
    ),
    (1, 1, 3): (
        "calling AE title not recognized",
        "add the calling AE title to node.allowed_calling_aets if it is expected",
    ),
    (1, 1, 7): (
        "called AE title not recognized",
        "configure the peer to call this node's AE title (node.ae_title), or set "
        "node.require_called_aet = false",
    ),
    (2, 3, 2): (
        "local limit exceeded: too many concurrent associations",
        "the peer should retry; raise node.max_associations if this is normal load",
    ),
    (2, 2, 1): (
        "user identity not accepted",
        "check the peer's user identity negotiation",
    ),
}


class _AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake moved off the accept loop.

    pynetdicom wraps each accepted socket (handshake included) in ``get_request``, on
    the one thread that accepts connections, with no deadline: a single silent peer
    would stop the port. Here ``get_request`` only accepts, and the connection's own
    thread does the handshake with a deadline before the association starts.
    """

    tls_context: ssl.SSLContext | None = None
    handshake_timeout_s: float = 30.0
    #: Longest wait for the rest of a PDU once it has begun (or for a write to drain).
    #: pynetdicom leaves accepted sockets without one: a peer that sent half an
    #: A-ASSOCIATE-RQ or half a P-DATA-TF PDU held its thread and an association slot
    #: for ever, from any address, and the node could not exit (found by review).
    read_timeout_s: float | None = None
    on_handshake_failed: Callable[[Any, BaseException], None] | None = None
    #: A listening socket this process shares with other receiver processes (set on a
    #: subclass by :func:`_server_class`): adopt it instead of binding a new one.
    shared_socket: socket.socket | None = None

    def server_bind(self) -> None:
        if self.shared_socket is None:
            super().server_bind()
            return
        assert self.socket is not None
        self.socket.close()
        self.socket = self.shared_socket.dup()
        self.socket.setblocking(False)  # see get_request
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.shared_socket is None:
            super().server_activate()
        # a shared socket is listening already

    def server_close(self) -> None:
        if self.shared_socket is None:
            super().server_close()
            return
        # pynetdicom's server_close shuts the socket down, which would stop every
        # process accepting on it; close only this process's descriptor.
        assert self.socket is not None
        self.socket.close()

    def service_actions(self) -> None:
        """Nothing. pynetdicom's runs a full ``gc.collect()`` every 60 turns of the
        accept loop (each connection and each idle half second), "for whatever reason
        dead Association threads aren't being garbage collected". In the node's process
        (150 000 objects) that is a 70 ms stop of every thread, GIL held: profiled, it
        was the slowest association (92 ms against a median of 4 ms) and the worst
        C-ECHO under load. Association cycles are collected by Python's own collector;
        the socket is closed when the association ends, not by the collector."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # Several processes may wait on a shared socket; all of them wake and only one
        # gets the connection. The others see BlockingIOError (an OSError, which
        # socketserver treats as "no request") instead of blocking in accept.
        assert self.socket is not None
        client, address = self.socket.accept()
        client.setblocking(True)
        return client, address

    def process_request(self, request: Any, client_address: Any) -> None:
        """A plain connection's association is made on the accepting thread; only a TLS
        connection gets a thread of its own for its handshake (which waits on the peer).

        Why: socketserver starts a thread per connection only for it to build the
        Association and start the association's own thread, then end. Building it here
        (0.3 ms of Python, nothing that waits on the peer) saves a thread start and a
        hand-over per association: profiled, association set-up was most of what
        radnode added to a C-ECHO on a new association.
        """
        if self.tls_context is None:
            self.process_request_thread(request, client_address)
        else:
            super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.tls_context is not None:
            try:
                request.settimeout(self.handshake_timeout_s)
                request = self.tls_context.wrap_socket(request, server_side=True)
            except (OSError, ValueError) as exc:
                if self.on_handshake_failed is not None:
                    self.on_handshake_failed(client_address, exc)
                self.shutdown_request(request)
                return
        # The DUL reads only once select() says bytes are there: an idle association
        # is left to pynetdicom's network timeout; this bounds a PDU that stops midway.
        request.settimeout(self.read_timeout_s)
        super().process_request_thread(request, client_address)


class _SupportedContexts(list):  # type: ignore[type-arg]
    """The server's presentation contexts, which pynetdicom deep-copies for every
    association it accepts (``RequestHandler._create_association``).

    A generic ``deepcopy`` of radnode's 171 contexts re-validated each of their 2,214
    transfer syntax UIDs and took ~13 ms per association, a quarter of what a peer
    that sends one instance per association waited. The copy made here is the same for
    every use (new context objects with their own transfer syntax lists; the UIDs are
    immutable strings and are shared).
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            duplicate = copy.copy(context)
            duplicate._transfer_syntax = list(context._transfer_syntax)
            copies.append(duplicate)
        return copies


def _server_class(shared_socket: socket.socket | None) -> type[_AssociationServer]:
    """The server class to build: binds a new socket, or adopts a shared one."""
    if shared_socket is None:
        return _AssociationServer
    return type("_SharedSocketServer", (_AssociationServer,), {"shared_socket": shared_socket})


@dataclass(frozen=True)
class SharedListeners:
    """Listening sockets one process bound and other receiver processes accept on.

    The pre-fork model (as in gunicorn or nginx): the kernel gives each new connection
    to one of the processes waiting in ``accept``, so several Python processes serve
    associations on one port with no extra socket option and no port that another
    program could share by mistake.
    """

    port: socket.socket
    tls_port: socket.socket | None = None

    def fds(self) -> tuple[int, ...]:
        return tuple(s.fileno() for s in (self.port, self.tls_port) if s is not None)


@dataclass
class _AssociationStats:
    """One accepted association's counts for its ``association.closed`` line."""

    calling_ae: str
    address: str
    #: Held while a store runs (on the DUL thread): an abort from another thread (stop,
    #: network timeout) logs the counts only once the store in flight is counted.
    storing: threading.RLock = field(default_factory=threading.RLock, repr=False)
    started: float = field(default_factory=time.monotonic)
    name: str = field(default_factory=_association_name)
    #: When the last store ended (monotonic): an abort after network_timeout_s of
    #: nothing is the node closing an idle association, not a delivery cut short.
    last_store: float = field(default_factory=time.monotonic)
    instances: int = 0
    failures: int = 0
    bytes: int = 0
    #: Set when the association ended (its line is logged): a store that had not begun
    #: by then is refused, not stored and acknowledged after the counts were logged.
    closed: bool = False


class StorageSCP:
    """A Storage and Verification SCP bound to one address and port."""

    def __init__(
        self,
        policy: AssociationPolicy,
        receiver: Receiver,
        host: str = "0.0.0.0",
        port: int = 11112,
        on_association: Callable[[str], None] | None = None,
        *,
        on_association_end: Callable[[str, bool, str | None], None] | None = None,
        tls_port: int | None = None,
        shared: SharedListeners | None = None,
    ) -> None:
        """``on_association`` is called with ``accepted``, ``rejected``, ``released`` or
        ``aborted`` for each association event (the node counts them as metrics; this
        package knows nothing of metrics). It runs on the association's thread and
        must be quick and not raise.

        ``on_association_end`` is called with :attr:`ReceivedInstance.association`,
        whether it was aborted and the SOP Instance UID of an instance cut in the middle
        of its data set (it never arrived; None if none), once an accepted association
        is released or aborted,
        after its last store: the receiver lets go of what it held open for it.

        ``tls_port`` (needs ``policy.tls_cert``): a second listener that speaks TLS
        while ``port`` stays plain. Without it and with ``policy.tls_cert``, ``port``
        speaks TLS only. Raises :class:`dicom_nodes.tls.TlsError` when the
        certificate, key or CA file cannot be used (the message says what to fix).

        ``shared``: accept on listening sockets another process bound (see
        :meth:`share_listeners`) instead of binding ``port`` and ``tls_port``.
        """
        if tls_port is not None and not policy.tls_enabled:
            raise ValueError("tls_port is set but TLS is off: set tls_cert (and tls_key)")
        self._policy = policy
        self._receiver = receiver
        self._on_association = on_association
        self._on_association_end = on_association_end
        self._host = host
        self._port = port
        self._tls_port = tls_port
        self._shared = shared
        self._tls_context = policy.tls_context()
        self._server: _AssociationServer | None = None
        self._tls_server: _AssociationServer | None = None
        # By association (weakly: one that ends without a close event is not kept).
        self._stats: weakref.WeakKeyDictionary[Association, _AssociationStats] = (
            weakref.WeakKeyDictionary()
        )
        self._stats_lock = threading.Lock()
        # pynetdicom's "standard" handlers format a log record for every PDU and
        # DIMSE message (slow) and can print identifiers (PHI); radnode logs its own
        # events instead.
        _config.LOG_HANDLER_LEVEL = "none"
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        # Wait on events, not 1 ms sleeps, in pynetdicom's reactors (dicom_nodes.reactor).
        reactor.install()
        # Accept the transfer syntax the requestor prefers (dicom_nodes.negotiation).
        negotiation.install()

    @property
    def port(self) -> int:
        """The port actually bound (useful when configured as 0)."""
        if self._server is None:
            return self._port
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The port that speaks TLS (``port`` itself when it is the only one), or None."""
        if self._tls_context is None:
            return None
        if self._tls_port is None:
            return self.port
        if self._tls_server is None:
            return self._tls_port
        return int(self._tls_server.server_address[1])

    @property
    def listening(self) -> bool:
        return self._server is not None

    def share_listeners(self) -> SharedListeners:
        """The bound listening sockets, for other receiver processes to accept on.

        From now on ``accept`` never blocks here: when several processes wake for one
        connection, the ones that lose go back to waiting.
        """
        if self._server is None or self._server.socket is None:
            raise RuntimeError("start() the SCP before sharing its sockets")
        sockets = [self._server.socket]
        if self._tls_server is not None and self._tls_server.socket is not None:
            sockets.append(self._tls_server.socket)
        for sock in sockets:
            sock.setblocking(False)
        return SharedListeners(*sockets)

    def _make_ae(self) -> AE:
        policy = self._policy
        ae = identify(AE(ae_title=policy.ae_title))
        ae.maximum_associations = policy.max_associations
        ae.maximum_pdu_size = policy.max_pdu_bytes
        ae.acse_timeout = policy.acse_timeout_s
        ae.dimse_timeout = policy.dimse_timeout_s
        ae.network_timeout = policy.network_timeout_s
        ae.require_called_aet = policy.require_called_aet
        if policy.allowed_calling_aets:
            ae.require_calling_aet = list(policy.allowed_calling_aets)
        ae.add_supported_context(Verification)
        for sop_class in policy.sop_classes:
            ae.add_supported_context(sop_class, list(policy.transfer_syntaxes))
        return ae

    def start(self) -> None:
        """Start listening; returns once the socket is bound."""
        ae = self._make_ae()
        only_tls = self._tls_port is None
        shared = self._shared
        self._server = self._serve(
            ae,
            self._port,
            self._tls_context if only_tls else None,
            shared.port if shared is not None else None,
        )
        if not only_tls:
            assert self._tls_port is not None
            try:
                self._tls_server = self._serve(
                    ae,
                    self._tls_port,
                    self._tls_context,
                    shared.tls_port if shared is not None else None,
                )
            except OSError:
                self.stop()
                raise
        policy = self._policy
        if shared is not None:
            return  # the process that bound the sockets logged them
        log.info(
            "scp.listening",
            ae_title=policy.ae_title,
            host=self._host,
            port=self.port,
            tls=self._tls_context is not None,
            tls_port=self.tls_port,
            plain_port=None if only_tls and self._tls_context is not None else self.port,
            tls_require_client_cert=policy.tls_require_client_cert,
            allowed_calling_aets=list(policy.allowed_calling_aets),
            allowed_peer_addresses=list(policy.allowed_peer_addresses),
            require_called_aet=policy.require_called_aet,
            max_associations=policy.max_associations,
        )

    def _serve(
        self,
        ae: AE,
        port: int,
        tls_context: ssl.SSLContext | None,
        shared_socket: socket.socket | None,
    ) -> _AssociationServer:
        """One listener on ``port`` (TLS when ``tls_context``), served on its own thread.

        With ``shared_socket`` the listener accepts on that socket instead of binding.
        """
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        server = cast(
            _AssociationServer,
            ae.make_server(
                (self._host, port),
                evt_handlers=handlers,
                server_class=_server_class(shared_socket),
            ),
        )
        server.contexts = _SupportedContexts(server.contexts)
        server.tls_context = tls_context
        server.handshake_timeout_s = self._policy.acse_timeout_s
        server.read_timeout_s = self._policy.network_timeout_s
        server.on_handshake_failed = self._on_handshake_failed
        thread = threading.Thread(
            target=server.serve_forever, name=f"radnode-scp-{port}", daemon=True
        )
        thread.start()
        # As AE.start_server does: the AE lists its servers (AE.shutdown, and
        # AssociationServer.shutdown removes itself from the list).
        ae._servers.append(server)
        return server

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting associations and close the ones still open.

        pynetdicom's ``shutdown`` only stops accepting: open associations went on
        after the node had stopped, each C-STORE then failing with C0FF on the closed
        index (found by review). They are aborted here (the peer resends what was not
        acknowledged) and waited for, up to ``grace_s``, so that a store in progress
        finishes before the caller closes the index."""
        servers = [server for server in (self._tls_server, self._server) if server is not None]
        self._server = self._tls_server = None
        accepted = [a for server in servers for a in server.active_associations]
        # Only established associations can be storing; a connection still waiting for
        # its A-ASSOCIATE-RQ (a port probe) is closed and not waited for (its thread
        # waits out the ACSE timeout whatever is done to it).
        open_associations = [a for a in accepted if a.is_established]
        for server in servers:
            server.shutdown()
        for assoc in accepted:
            if not assoc.is_established:
                _shut_down_connection(assoc)
        for assoc in open_associations:
            assoc.abort(block=False)  # queued for each DUL: all at once, not in turn
        deadline = time.monotonic() + grace_s
        for assoc in open_associations:
            assoc.join(max(0.0, deadline - time.monotonic()))
        for assoc in open_associations:
            if assoc.is_alive():  # its DUL is inside a half-sent PDU: end the connection
                _shut_down_connection(assoc)
                assoc.join(1.0)
        if servers:
            log.info("scp.stopped", associations_aborted=len(open_associations))

    # -- handlers -------------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        """A C-ECHO that came through pynetdicom (the inline reader answers the rest)."""
        return self._echo_inline()

    @staticmethod
    def _echo_inline() -> int:
        return int(EchoStatus.SUCCESS)

    def _on_store(self, event: evt.Event) -> int:
        """A C-STORE that came through pynetdicom: one the inline reader left to it
        (see :mod:`dicom_nodes.inline_store`), or on an association without one."""
        request: Any = event.request
        with self._stats_lock:
            stats = self._stats.get(event.assoc)
        if stats is None:
            # Every accepted association has its counts from A-ASSOCIATE-RQ on, until it
            # closes: this one has closed while its data set came in. Refused as on the
            # inline path (review: it was stored uncounted here), for the peer to resend.
            return int(StoreStatus.OUT_OF_RESOURCES)
        return self._store(
            event.assoc,
            stats,
            str(request.AffectedSOPClassUID or ""),
            str(request.AffectedSOPInstanceUID or ""),
            str(event.context.transfer_syntax),
            request.DataSet.getvalue(),
        )

    def _store_inline(
        self,
        assoc: Association,
        stats: _AssociationStats,
        request: StoreRequest,
        context: PresentationContext,
        data: bytes,
    ) -> int:
        """A C-STORE served by the association's inline reader, on its DUL thread."""
        (transfer_syntax,) = context.transfer_syntax
        return self._store(
            assoc,
            stats,
            request.sop_class_uid,
            request.sop_instance_uid,
            str(transfer_syntax),
            data,
        )

    def _store(
        self,
        assoc: Association,
        stats: _AssociationStats | None,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        data_set: bytes,
    ) -> int:
        requestor = assoc.requestor
        instance = ReceivedInstance(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            dataset=data_set,
            calling_ae=requestor.ae_title.strip(),
            called_ae=assoc.acceptor.ae_title.strip(),
            peer_address=str(requestor.address),
            association=stats.name if stats is not None else "",
        )
        with stats.storing if stats is not None else contextlib.nullcontext():
            if stats is not None and stats.closed:
                # The association was aborted (stop, timeout) while this data set came
                # in: its line is logged, and the peer sends the instance again on its
                # next association (the acceptance pass saw 24 acknowledged, 23 logged).
                return int(StoreStatus.OUT_OF_RESOURCES)
            try:
                status = self._receiver.store(instance)
            except Exception:
                # The receiver translates every failure it expects into a status; this
                # is the one place an unexpected one is caught, so the peer gets an
                # answer and the association (and every other one) keeps being served.
                log.exception("store.unexpected_error", action="report this as a bug")
                status = StoreStatus.PROCESSING_FAILURE
            if stats is not None:
                stats.last_store = time.monotonic()
                if status == StoreStatus.SUCCESS:
                    stats.instances += 1
                    stats.bytes += len(data_set)
                else:
                    stats.failures += 1
        return int(status)

    def _open_stats(self, assoc: Association) -> _AssociationStats:
        """The association's counts, made once: when its request is accepted by the
        allowlist (before any store can arrive on the DUL thread)."""
        with self._stats_lock:
            stats = self._stats.get(assoc)
            if stats is None:
                stats = _AssociationStats(
                    calling_ae=_calling_ae(assoc), address=str(assoc.requestor.address)
                )
                self._stats[assoc] = stats
            return stats

    def _on_requested(self, event: evt.Event) -> None:
        """A-ASSOCIATE-RQ received: refuse peers outside the address allowlist."""
        assoc: Association = event.assoc
        if self._policy.address_allowed(str(assoc.requestor.address)):
            stats = self._open_stats(assoc)
            if isinstance(assoc.dul, reactor.EventDrivenDUL):  # before any P-DATA
                assoc.dul.p_data_reader = InlineStoreReader(
                    assoc,
                    functools.partial(self._store_inline, assoc, stats),
                    echo=self._echo_inline,
                )
            return
        # PS3.8 has no reason code for addresses: rejected-permanent, service-user,
        # "no reason given" -- the peer learns nothing about the list.
        assoc.acse.send_reject(0x01, 0x01, 0x01)
        self._log_rejected(assoc, (0x01, 0x01, 0x01))
        assoc.kill()

    def _on_established(self, event: evt.Event) -> None:
        stats = self._open_stats(event.assoc)
        log.info(
            "association.opened",
            peer_ae=stats.calling_ae,
            peer_address=stats.address,
            **_tls_fields(event.assoc),
        )
        self._notify("accepted")
        if not event.assoc.accepted_contexts:
            self._log_no_context(event.assoc, stats)

    @staticmethod
    def _log_no_context(assoc: Association, stats: _AssociationStats) -> None:
        """Every presentation context refused: the peer learns "no acceptable
        presentation contexts" and aborts, and the operator saw only opened/aborted
        (acceptance pass). Name what was asked for (SOP classes and transfer syntaxes
        are not patient data)."""
        refused = assoc.rejected_contexts
        log.warning(
            "association.no_acceptable_context",
            peer_ae=stats.calling_ae,
            peer_address=stats.address,
            sop_classes=sorted({_uid_name(c.abstract_syntax) for c in refused}),
            transfer_syntaxes=sorted({_uid_name(t) for c in refused for t in c.transfer_syntax}),
            action="the peer offered only SOP classes or transfer syntaxes radnode does not"
            " take (docs/conformance-statement.md); have it offer a storage SOP class with an"
            " uncompressed transfer syntax",
        )

    def _on_rejected(self, event: evt.Event) -> None:
        with self._stats_lock:
            self._stats.pop(event.assoc, None)
        primitive = event.assoc.acceptor.primitive
        code = (
            int(getattr(primitive, "result", 0) or 0),
            int(getattr(primitive, "result_source", 0) or 0),
            int(getattr(primitive, "diagnostic", 0) or 0),
        )
        self._log_rejected(event.assoc, code)

    def _log_rejected(self, assoc: Association, code: tuple[int, int, int]) -> None:
        reason, action = _REJECTIONS.get(
            code, ("association not accepted", "check the peer's association request")
        )
        rq = assoc.requestor.primitive
        log.warning(
            "association.rejected",
            peer_ae=_calling_ae(assoc),
            called_ae=str(getattr(rq, "called_ae_title", "") or "").strip(),
            peer_address=str(assoc.requestor.address),
            reason=reason,
            result="permanent" if code[0] == 1 else "transient",
            source=code[1],
            diagnostic=code[2],
            action=action,
        )
        self._notify("rejected")

    def _on_handshake_failed(self, client_address: Any, exc: BaseException) -> None:
        reason, action = describe_handshake_error(exc)
        address = client_address[0] if isinstance(client_address, tuple) else client_address
        log.warning("tls.handshake_failed", peer_address=str(address), reason=reason, action=action)

    def _on_closed(self, event: evt.Event) -> None:
        with self._stats_lock:
            stats = self._stats.pop(event.assoc, None)
        if stats is None:
            return
        # An abort from another thread (stop, network timeout) can come while the DUL
        # thread is storing: count that store first (found by review: an instance
        # stored and acknowledged was logged as instances=0).
        counted = stats.storing.acquire(timeout=_STORE_WAIT_S)
        stats.closed = True
        if counted:
            stats.storing.release()
        outcome = "released" if event.event is evt.EVT_RELEASED else "aborted"
        reader = getattr(event.assoc.dul, "p_data_reader", None)
        # an instance the peer had begun to send and never finished: the study lacks it
        # unless the PACS sends it again
        lost = reader.instance_in_transit if isinstance(reader, InlineStoreReader) else None
        log.info(
            "association.closed",
            outcome=outcome,
            instance_cut=lost is not None,
            peer_ae=stats.calling_ae,
            peer_address=stats.address,
            instances=stats.instances,
            failures=stats.failures,
            bytes=stats.bytes,
            duration_s=round(time.monotonic() - stats.started, 3),
        )
        if self._on_association_end is not None:
            try:
                idle_s = time.monotonic() - stats.last_store
                # the node's own idle timeout aborts an association that sent nothing
                # for network_timeout_s: its study is not cut short (review)
                cut = outcome == "aborted" and idle_s < 0.9 * self._policy.network_timeout_s
                self._on_association_end(stats.name, cut, lost)
            except Exception:  # the peer is gone already; never fail the close
                log.exception("association.end_failed", action="report this as a bug")
        self._notify(outcome)

    def _notify(self, outcome: str) -> None:
        if self._on_association is not None:
            self._on_association(outcome)


def _uid_name(uid: object) -> str:
    """A UID with its name where pydicom knows it (``1.2.840.10008.1.2.4.100 (MPEG2
    Main Profile / Main Level)``); an unknown UID as it is."""
    name = getattr(uid, "name", "")
    return f"{uid} ({name})" if name and name != str(uid) else str(uid)


def _calling_ae(assoc: Association) -> str:
    """The peer's AE title from its A-ASSOCIATE-RQ (``requestor.ae_title`` is only set
    once pynetdicom negotiates, after ``EVT_REQUESTED``)."""
    return str(getattr(assoc.requestor.primitive, "calling_ae_title", "") or "").strip()


def _shut_down_connection(assoc: Association) -> None:
    """Shut the association's TCP connection: a read blocked in it returns at once."""
    sock = reactor.connection_of(assoc)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _tls_fields(assoc: Association) -> dict[str, Any]:
    """TLS version, cipher and the peer certificate's subject CN of an association."""
    sock = reactor.connection_of(assoc)
    if not isinstance(sock, ssl.SSLSocket):
        return {"tls": False}
    fields: dict[str, Any] = {"tls": True, "tls_version": sock.version()}
    cipher = sock.cipher()
    if cipher:
        fields["tls_cipher"] = cipher[0]
    try:
        certificate = sock.getpeercert() or {}
    except (OSError, ValueError):
        certificate = {}
    subject = dict(pair for rdn in certificate.get("subject", ()) for pair in rdn)
    if "commonName" in subject:
        fields["peer_cert_cn"] = subject["commonName"]
    return fields
