"""Storage SCP and Verification SCP.

The SCP binds C-ECHO and C-STORE, hands the received bytes of each instance to one
:class:`Receiver` and returns the status the receiver chose. It never decodes pixel
data and never decides what "stored" means: the receiver does, and only answers
Success once the instance is durable.

One log event per association state change (opened, rejected, closed) carries the
peer AE title, address, instance and byte counts and the duration; instances
themselves are logged by the receiver, which knows which study they belong to.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_nodes.policy import AssociationPolicy
from dicom_nodes.status import EchoStatus, StoreStatus

log = structlog.get_logger("dicom_nodes.scp")


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


class Receiver(Protocol):
    """What the SCP hands each received instance to."""

    def store(self, instance: ReceivedInstance) -> StoreStatus:
        """Make ``instance`` durable and return the status to send back."""
        ...


@dataclass
class _AssociationStats:
    calling_ae: str
    address: str
    started: float = field(default_factory=time.monotonic)
    instances: int = 0
    failures: int = 0
    bytes: int = 0


class StorageSCP:
    """A Storage and Verification SCP bound to one address and port."""

    def __init__(
        self,
        policy: AssociationPolicy,
        receiver: Receiver,
        host: str = "0.0.0.0",
        port: int = 11112,
        on_association: Callable[[str], None] | None = None,
    ) -> None:
        """``on_association`` is called with ``accepted``, ``rejected``, ``released`` or
        ``aborted`` for each association event (the node counts them as metrics; this
        package knows nothing of metrics). It runs on the association's thread and
        must be quick and not raise.
        """
        self._policy = policy
        self._receiver = receiver
        self._on_association = on_association
        self._host = host
        self._port = port
        self._server: ThreadedAssociationServer | None = None
        self._stats: dict[int, _AssociationStats] = {}
        self._stats_lock = threading.Lock()
        # pynetdicom's "standard" handlers format a log record for every PDU and
        # DIMSE message (slow) and can print identifiers (PHI); radnode logs its own
        # events instead.
        _config.LOG_HANDLER_LEVEL = "none"
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False

    @property
    def port(self) -> int:
        """The port actually bound (useful when configured as 0)."""
        if self._server is None:
            return self._port
        return int(self._server.server_address[1])

    @property
    def listening(self) -> bool:
        return self._server is not None

    def _make_ae(self) -> AE:
        policy = self._policy
        ae = AE(ae_title=policy.ae_title)
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
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        ae = self._make_ae()
        self._server = ae.start_server((self._host, self._port), block=False, evt_handlers=handlers)
        log.info(
            "scp.listening",
            ae_title=self._policy.ae_title,
            host=self._host,
            port=self.port,
            allowed_calling_aets=list(self._policy.allowed_calling_aets),
        )

    def stop(self) -> None:
        """Stop accepting associations and close the ones still open."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            log.info("scp.stopped")

    # -- handlers -------------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return EchoStatus.SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        request: Any = event.request
        assoc: Association = event.assoc
        requestor = assoc.requestor
        stream = request.DataSet.getvalue()
        instance = ReceivedInstance(
            sop_class_uid=str(request.AffectedSOPClassUID or ""),
            sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            dataset=stream,
            calling_ae=requestor.ae_title.strip(),
            called_ae=assoc.acceptor.ae_title.strip(),
            peer_address=str(requestor.address),
        )
        try:
            status = self._receiver.store(instance)
        except Exception:
            # The receiver translates every failure it expects into a status; this is
            # the one place an unexpected one is caught, so the peer gets an answer
            # and the association (and every other one) keeps being served.
            log.exception("store.unexpected_error", action="report this as a bug")
            status = StoreStatus.PROCESSING_FAILURE
        stats = self._stats.get(id(assoc))
        if stats is not None:
            if status == StoreStatus.SUCCESS:
                stats.instances += 1
                stats.bytes += len(stream)
            else:
                stats.failures += 1
        return int(status)

    def _on_established(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        stats = _AssociationStats(
            calling_ae=requestor.ae_title.strip(), address=str(requestor.address)
        )
        with self._stats_lock:
            self._stats[id(event.assoc)] = stats
        log.info("association.opened", peer_ae=stats.calling_ae, peer_address=stats.address)
        self._notify("accepted")

    def _on_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        log.warning(
            "association.rejected",
            peer_ae=requestor.ae_title.strip(),
            peer_address=str(requestor.address),
            reason="calling or called AE title not accepted",
            action="add the calling AE title to node.allowed_calling_aets if it is expected",
        )
        self._notify("rejected")

    def _on_closed(self, event: evt.Event) -> None:
        with self._stats_lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        outcome = "released" if event.event is evt.EVT_RELEASED else "aborted"
        log.info(
            "association.closed",
            outcome=outcome,
            peer_ae=stats.calling_ae,
            peer_address=stats.address,
            instances=stats.instances,
            failures=stats.failures,
            bytes=stats.bytes,
            duration_s=round(time.monotonic() - stats.started, 3),
        )
        self._notify(outcome)

    def _notify(self, outcome: str) -> None:
        if self._on_association is not None:
            self._on_association(outcome)
