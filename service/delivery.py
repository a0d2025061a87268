"""Durable delivery of results: an outbox in SQLite, retries with back-off, dead letters.

Why this module exists: a result is only useful once the PACS or the RIS has it, and
either may be down for minutes or hours. So a writer never talks to the network itself;
it puts the finished payload in the outbox (:meth:`Outbox.enqueue`) and returns. A
:class:`DeliveryWorker` thread then hands due deliveries to the :class:`Deliverer` of
their destination (the HL7 MLLP client, the DICOM Storage SCU) and records what came back:

* ``DELIVERED``: the peer took it (HL7 ``AA``, DICOM Success) -> state ``sent``.
* ``RETRY(reason)``: a transient failure (no connection, timeout, HL7 ``AE``/``AR``) ->
  stays ``pending`` with ``next_attempt_at`` moved on by the :class:`RetryPolicy`; after
  the last allowed attempt (the outcome may allow fewer: an HL7 refusal) it becomes
  ``dead``.
* ``REJECTED(reason)``: the peer refused it for good (a SOP class the PACS does not
  take) -> ``dead`` at once; sending it again unchanged would be refused again.

A dead delivery keeps its payload and ``last_error``; an operator sends it again with
:meth:`Outbox.resend` or :meth:`Outbox.retry_dead` once the cause is fixed.

Durability and order:

* The outbox is its own SQLite file (WAL, ``synchronous=FULL``): an enqueued delivery
  survives a crash, and pending deliveries continue after a restart.
* Attempts are counted when a delivery is claimed, so a payload that crashes the process
  still reaches its attempt limit instead of looping forever.
* A claim is a lease: ``next_attempt_at`` moves ``lease_s`` ahead while the attempt runs,
  so a crash mid-attempt only delays the delivery, and only until the node starts again
  (:meth:`Outbox.due_now_after_restart`). The price is at-least-once delivery:
  a crash after the peer answered but before ``sent`` is recorded sends it again (HL7
  receivers detect this by MSH-10, DICOM by SOP Instance UID).
* Each destination is a FIFO: only its oldest pending delivery is ever attempted, so a
  later result (e.g. a corrected one) cannot overtake an earlier one while the peer is
  down. A dead delivery leaves the queue, so one poison message does not block the rest.

Log events are named by kind (``hl7.sent``, ``hl7.retry``, ``hl7.dead_letter``, and
``dicom.*`` the same) and carry the delivery id, job id, destination and message id
(HL7 MSH-10, DICOM SOP Instance UID): never patient data.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from os import PathLike, fspath
from typing import Literal, Protocol

import structlog

from service.errors import RadnodeError
from service.metrics import Metrics
from service.sqlite_tx import add_column, immediate_transaction
from service.uids import study_key

log = structlog.get_logger("service.delivery")

DeliveryKind = Literal["hl7", "dicom"]

#: Longest error text kept in the outbox and the log (peers can answer at length).
MAX_ERROR_CHARS = 500


class UnknownDelivery(RadnodeError):
    """No delivery has the id an operator asked for."""


class DeliveryState(StrEnum):
    """Where a delivery is. Stored as text in the outbox."""

    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class OutcomeStatus(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one attempt came to. Build with :meth:`delivered`, :meth:`retry`, :meth:`rejected`.

    ``reason`` is operator-facing text (peer error text, ``connection refused``...); a
    deliverer must keep patient data out of it, as it is logged.
    """

    status: OutcomeStatus
    reason: str = ""
    #: For RETRY: the peer refused (it answered, and said no): a dead letter once it
    #: has refused this many attempts, below the destination's ``max_attempts`` (a
    #: refusal is worth a few tries, not hours of them). Attempts that did not reach
    #: the peer are not counted against it.
    at_most: int | None = None

    @classmethod
    def delivered(cls) -> DeliveryOutcome:
        return cls(OutcomeStatus.DELIVERED)

    @classmethod
    def retry(cls, reason: str, at_most: int | None = None) -> DeliveryOutcome:
        return cls(OutcomeStatus.RETRY, reason, at_most)

    @classmethod
    def rejected(cls, reason: str) -> DeliveryOutcome:
        return cls(OutcomeStatus.REJECTED, reason)


@dataclass(frozen=True)
class Delivery:
    """One payload for one destination, as the outbox holds it.

    ``payload`` holds the bytes to send where they are small (an HL7 message);
    ``payload_ref`` names where they are otherwise (e.g. a result file or folder for
    DICOM). ``message_id`` is what the peer knows the payload by: MSH-10 for HL7, the
    SOP Instance UID for DICOM; it makes enqueueing idempotent.
    """

    id: int
    job_id: str
    destination: str
    kind: DeliveryKind
    message_id: str
    payload: bytes | None
    payload_ref: str | None
    state: DeliveryState
    attempts: int
    created_at: float
    next_attempt_at: float
    finished_at: float | None
    last_error: str | None
    #: Attempts the peer answered with a refusal (:attr:`DeliveryOutcome.at_most`).
    refusals: int = 0


class Deliverer(Protocol):
    """Sends one delivery to its peer. Must not raise for network or peer failures:
    those are outcomes (``RETRY`` or ``REJECTED``)."""

    def deliver(self, item: Delivery) -> DeliveryOutcome: ...


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how far apart a delivery is attempted.

    The wait after attempt *n* (1-based) is ``backoff_s * multiplier ** (n - 1)``, at
    most ``max_backoff_s``. The defaults (5 s doubling up to 15 min, 20 attempts) keep
    trying for about three hours, long enough for a RIS maintenance window, before a
    delivery is dead-lettered.
    """

    max_attempts: int = 20
    backoff_s: float = 5.0
    multiplier: float = 2.0
    max_backoff_s: float = 900.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("back-off must be >= 0 and the multiplier >= 1")

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait after the ``attempt``-th attempt failed."""
        return float(min(self.max_backoff_s, self.backoff_s * self.multiplier ** (attempt - 1)))


@dataclass(frozen=True)
class DeliveryTarget:
    """A destination as the worker sees it: who sends, and how patiently."""

    deliverer: Deliverer
    policy: RetryPolicy


_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id          TEXT NOT NULL,
    destination     TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('hl7', 'dicom')),
    message_id      TEXT NOT NULL,
    payload         BLOB,
    payload_ref     TEXT,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at      REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    finished_at     REAL,
    last_error      TEXT,
    refusals        INTEGER NOT NULL DEFAULT 0,
    UNIQUE (kind, destination, message_id)
);
CREATE INDEX IF NOT EXISTS deliveries_queue ON deliveries (destination, state, id);
CREATE INDEX IF NOT EXISTS deliveries_job ON deliveries (job_id);
"""

_COLUMNS = (
    "id, job_id, destination, kind, message_id, payload, payload_ref, state, attempts, "
    "created_at, next_attempt_at, finished_at, last_error, refusals"
)


def _row_to_delivery(row: tuple) -> Delivery:  # type: ignore[type-arg]
    (
        id_,
        job_id,
        destination,
        kind,
        message_id,
        payload,
        payload_ref,
        state,
        attempts,
        created_at,
        next_attempt_at,
        finished_at,
        last_error,
        refusals,
    ) = row
    return Delivery(
        id=int(id_),
        job_id=job_id,
        destination=destination,
        kind=kind,
        message_id=message_id,
        payload=bytes(payload) if payload is not None else None,
        payload_ref=payload_ref,
        state=DeliveryState(state),
        attempts=int(attempts),
        created_at=float(created_at),
        next_attempt_at=float(next_attempt_at),
        finished_at=float(finished_at) if finished_at is not None else None,
        last_error=last_error,
        refusals=int(refusals),
    )


def logged_message_id(item: Delivery) -> str:
    """How a delivery's message is named in the log.

    HL7: its MSH-10 control id as sent (made from the job id and destination; the RIS
    logs the same). DICOM: the result SR's SOP Instance UID names the delivery, and a
    PACS user could look the patient up by it: hashed, as studies are (acceptance
    pass: 23 result UIDs in clear in one day's log)."""
    return item.message_id if item.kind == "hl7" else study_key(item.message_id)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


class Outbox:
    """The durable queue of deliveries, in its own SQLite file.

    Thread-safe: one connection, used under a lock (SQLite serialises writers anyway).
    Several processes may share the file; claims are made in ``BEGIN IMMEDIATE``
    transactions so two workers never take the same delivery.
    """

    def __init__(self, path: str | PathLike[str], *, clock: Callable[[], float] = time.time):
        self.path = fspath(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        # outboxes made before the column (session 20): their refusals start at 0
        add_column(self._db, "deliveries", "refusals INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writers put work in -----------------------------------------------------------

    def enqueue(
        self,
        *,
        job_id: str,
        destination: str,
        kind: DeliveryKind,
        message_id: str,
        payload: bytes | None = None,
        payload_ref: str | None = None,
    ) -> Delivery:
        """Add a delivery, due now. Enqueueing the same (kind, destination, message_id)
        again returns the existing delivery unchanged, so a re-run job does not send twice.
        """
        if payload is None and payload_ref is None:
            raise ValueError("a delivery needs a payload or a payload_ref")
        now = self._clock()
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO deliveries (job_id, destination, kind, message_id, "
                "payload, payload_ref, state, attempts, created_at, next_attempt_at) "
                "VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?)",
                (job_id, destination, kind, message_id, payload, payload_ref, now, now),
            )
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM deliveries "
                "WHERE kind = ? AND destination = ? AND message_id = ?",
                (kind, destination, message_id),
            ).fetchone()
        return _row_to_delivery(row)

    # -- the worker takes work out -----------------------------------------------------

    def claim_next(
        self, *, lease_s: float, skip: Iterable[str] = (), only: str | None = None
    ) -> Delivery | None:
        """Take the next due delivery that heads its destination's queue, or None.

        The claim counts an attempt and moves ``next_attempt_at`` ``lease_s`` ahead, so
        the delivery is not taken again while (or if the process dies while) it is sent.
        Destinations named in ``skip`` are left alone; with ``only``, every other one.
        """
        now = self._clock()
        skip = tuple(skip)
        which = f"AND d.destination NOT IN ({', '.join('?' * len(skip))}) " if skip else ""
        params = [now, *skip]
        if only is not None:
            which += "AND d.destination = ? "
            params.append(only)
        with self._lock, immediate_transaction(self._db) as db:
            row = db.execute(
                f"SELECT {', '.join('d.' + c for c in _COLUMNS.split(', '))} "
                "FROM deliveries d WHERE d.state = 'pending' AND d.next_attempt_at <= ? "
                "AND d.id = (SELECT MIN(id) FROM deliveries "
                "            WHERE state = 'pending' AND destination = d.destination) "
                f"{which}ORDER BY d.next_attempt_at, d.id LIMIT 1",
                params,
            ).fetchone()
            if row is not None:
                db.execute(
                    "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ? "
                    "WHERE id = ?",
                    (now + lease_s, row[0]),
                )
        if row is None:
            return None
        item = _row_to_delivery(row)
        return replace(item, attempts=item.attempts + 1, next_attempt_at=now + lease_s)

    def mark_sent(self, delivery_id: int) -> None:
        self._update(delivery_id, state=DeliveryState.SENT, finished_at=self._clock())

    def mark_retry(
        self, delivery_id: int, *, error: str, delay_s: float, refusals: int | None = None
    ) -> None:
        """Due again in ``delay_s``; ``refusals``, when given, is the peer's new count."""
        values: dict[str, object] = {} if refusals is None else {"refusals": refusals}
        self._update(
            delivery_id,
            state=DeliveryState.PENDING,
            next_attempt_at=self._clock() + delay_s,
            last_error=_clip(error),
            **values,
        )

    def mark_dead(self, delivery_id: int, *, error: str) -> None:
        self._update(
            delivery_id,
            state=DeliveryState.DEAD,
            finished_at=self._clock(),
            last_error=_clip(error),
        )

    # -- operators look and send again -------------------------------------------------

    def get(self, delivery_id: int) -> Delivery:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM deliveries WHERE id = ?", (delivery_id,)
            ).fetchone()
        if row is None:
            raise UnknownDelivery(f"no delivery with id {delivery_id}")
        return _row_to_delivery(row)

    def list(
        self,
        *,
        state: DeliveryState | None = None,
        destination: str | None = None,
        job_id: str | None = None,
        limit: int = 100,
    ) -> list[Delivery]:
        """Deliveries, newest first, optionally only those in ``state`` / to ``destination``
        / of ``job_id``."""
        where, args = ["1 = 1"], []
        for column, value in (("state", state), ("destination", destination), ("job_id", job_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(str(value))
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM deliveries WHERE {' AND '.join(where)} "
                "ORDER BY id DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [_row_to_delivery(r) for r in rows]

    def counts(self) -> dict[str, dict[DeliveryState, int]]:
        """Deliveries per destination and state, for metrics and the status API."""
        with self._lock:
            rows = self._db.execute(
                "SELECT destination, state, COUNT(*) FROM deliveries GROUP BY destination, state"
            ).fetchall()
        result: dict[str, dict[DeliveryState, int]] = {}
        for destination, state, count in rows:
            result.setdefault(destination, dict.fromkeys(DeliveryState, 0))[
                DeliveryState(state)
            ] = int(count)
        return result

    def waiting(self) -> dict[str, tuple[int, float]]:
        """Per destination: deliveries not sent yet (pending), and when the oldest of
        them was queued (for ``radnode_deliveries_waiting`` and its age)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT destination, COUNT(*), MIN(created_at) FROM deliveries"
                " WHERE state = ? GROUP BY destination",
                (DeliveryState.PENDING,),
            ).fetchall()
        return {destination: (int(count), float(oldest)) for destination, count, oldest in rows}

    def unsent(self, job_ids: Iterable[str]) -> int:
        """Deliveries of these jobs not sent yet: pending or dead (retention keeps their
        study: a dead letter may be resent, and it needs the study's files)."""
        ids = list(job_ids)
        if not ids:
            return 0
        marks = ", ".join("?" * len(ids))
        with self._lock:
            row = self._db.execute(
                f"SELECT COUNT(*) FROM deliveries WHERE job_id IN ({marks}) AND state != 'sent'",
                ids,
            ).fetchone()
        return int(row[0])

    def of_jobs(self, job_ids: Iterable[str]) -> dict[str, list[Delivery]]:
        """The deliveries of these jobs, oldest first, by job id (for the status API)."""
        ids = list(job_ids)
        if not ids:
            return {}
        marks = ", ".join("?" * len(ids))
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM deliveries WHERE job_id IN ({marks}) ORDER BY id", ids
            ).fetchall()
        found: dict[str, list[Delivery]] = {}
        for row in rows:
            delivery = _row_to_delivery(row)
            found.setdefault(delivery.job_id, []).append(delivery)
        return found

    def forget_jobs(self, job_ids: Iterable[str]) -> int:
        """Delete the (sent) deliveries of purged jobs: HL7 payloads hold patient data."""
        ids = list(job_ids)
        if not ids:
            return 0
        marks = ", ".join("?" * len(ids))
        with self._lock:
            count = self._db.execute(
                f"DELETE FROM deliveries WHERE job_id IN ({marks}) AND state = 'sent'", ids
            ).rowcount
        return int(count)

    def discard_dead(self, job_id: str) -> list[Delivery]:
        """Delete the dead letters of ``job_id`` (an operator gave them up); returns them.

        Why delete: a dead letter keeps its study, and so the patient data, past
        ``study.keep_days`` until it is resent, and one for a destination that no
        longer exists can never be (acceptance pass). The log says what was dropped."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM deliveries WHERE job_id = ? AND state = 'dead'",
                (job_id,),
            ).fetchall()
            self._db.execute(
                "DELETE FROM deliveries WHERE job_id = ? AND state = 'dead'", (job_id,)
            )
        return [_row_to_delivery(row) for row in rows]

    def due_now_after_restart(self) -> int:
        """Make every pending delivery due now; returns how many were waiting.

        Called once at start, before any sender runs. Why: a delivery claimed by a process
        that then died keeps its lease (``next_attempt_at`` up to ``lease_s`` ahead) and
        would sit idle for minutes after the restart. The edge is the only sender, so at
        start no claim is alive. Deliveries waiting out a back-off are made due as well:
        one early attempt per restart, which a restart after an outage wants anyway.
        """
        now = self._clock()
        with self._lock:
            count = self._db.execute(
                "UPDATE deliveries SET next_attempt_at = ? "
                "WHERE state = 'pending' AND next_attempt_at > ?",
                (now, now),
            ).rowcount
        return int(count)

    def resend(self, delivery_id: int) -> Delivery:
        """Put a delivery (dead, sent or pending) back in its queue, due now, with a fresh
        attempt count. The payload is sent unchanged (same HL7 message control id)."""
        self.get(delivery_id)
        self._update(
            delivery_id,
            state=DeliveryState.PENDING,
            attempts=0,
            refusals=0,
            next_attempt_at=self._clock(),
            finished_at=None,
        )
        log.info("delivery.resend", delivery=delivery_id)
        return self.get(delivery_id)

    def retry_dead(self, destination: str | None = None) -> int:
        """Resend every dead delivery (of ``destination``, or all); returns how many."""
        now = self._clock()
        sql = (
            "UPDATE deliveries SET state = 'pending', attempts = 0, refusals = 0, "
            "next_attempt_at = ?, finished_at = NULL WHERE state = 'dead'"
        )
        args: tuple[object, ...] = (now,)
        if destination is not None:
            sql += " AND destination = ?"
            args += (destination,)
        with self._lock:
            count = self._db.execute(sql, args).rowcount
        log.info("delivery.retry_dead", destination=destination, count=count)
        return int(count)

    def _update(self, delivery_id: int, **values: object) -> None:
        assignments = ", ".join(f"{column} = ?" for column in values)
        with self._lock:
            self._db.execute(
                f"UPDATE deliveries SET {assignments} WHERE id = ?",
                (*(str(v) if isinstance(v, StrEnum) else v for v in values.values()), delivery_id),
            )


class DeliveryWorker:
    """Hands due deliveries to their destination's deliverer, in background threads.

    ``targets`` maps destination names to their deliverer and retry policy. A delivery
    for a destination that is not (or no longer) configured is dead-lettered with that
    reason, so it shows up for the operator instead of waiting forever.

    Each destination has a thread of its own (a *lane*; one more lane dead-letters the
    unconfigured ones): a PACS that takes a minute to time out, or a long derived
    series going to it, never holds up the RIS's HL7 result or another PACS. Within a
    destination deliveries still go one at a time, in order.

    ``lease_s`` must exceed the longest attempt (connect plus answer timeouts).
    """

    def __init__(
        self,
        outbox: Outbox,
        targets: Mapping[str, DeliveryTarget],
        *,
        poll_interval_s: float = 1.0,
        lease_s: float = 300.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.outbox = outbox
        self.targets = dict(targets)
        self.metrics = metrics if metrics is not None else Metrics()
        self.poll_interval_s = poll_interval_s
        self.lease_s = lease_s
        self._stop = threading.Event()
        #: One wake-up event per lane: None is the lane of unconfigured destinations.
        self._lanes: dict[str | None, threading.Event] = {}
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if self._threads:
            return
        resumed = self.outbox.due_now_after_restart()
        if resumed:
            log.info("delivery.resumed", count=resumed)
        self._stop.clear()
        self._lanes = {name: threading.Event() for name in [*sorted(self.targets), None]}
        for lane in self._lanes:
            thread = threading.Thread(
                target=self._run,
                args=(lane,),
                name=f"radnode-delivery-{lane or 'unconfigured'}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        log.info("delivery.started", destinations=sorted(self.targets))

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the attempts in progress (if any); pending deliveries stay pending."""
        self._stop.set()
        self.wake()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []
        log.info("delivery.stopped")

    def wake(self) -> None:
        """Look for due deliveries now (e.g. right after an enqueue)."""
        for event in self._lanes.values():
            event.set()

    def _run(self, lane: str | None) -> None:
        wake = self._lanes[lane]
        while not self._stop.is_set():
            wake.clear()  # before the pass: a wake-up during it is not lost
            try:
                if lane is None:
                    self.run_once(skip=self.targets)
                else:
                    self.run_once(only=lane)
            except Exception as exc:
                # The outbox unreadable for a moment (locked past its busy timeout, an
                # I/O error): this destination's thread ended for good and nothing was
                # sent until a restart (found by review). Try again after the interval.
                log.error(
                    "delivery.pass_failed",
                    destination=lane or "others",
                    reason=f"{type(exc).__name__}: {exc}",
                    action="check the disk under node.data_dir; deliveries resume by themselves",
                )
            wake.wait(self.poll_interval_s)

    def run_once(self, *, only: str | None = None, skip: Iterable[str] = ()) -> int:
        """Attempt every delivery that is due now (with ``only``, those of that
        destination; never those in ``skip``); returns how many were attempted.

        A destination whose attempt must be retried is skipped for the rest of the pass,
        so a peer that is down is not asked again at once.
        """
        attempted = 0
        waiting: set[str] = set(skip)
        while not self._stop.is_set():
            item = self.outbox.claim_next(lease_s=self.lease_s, skip=waiting, only=only)
            if item is None:
                break
            attempted += 1
            if not self._attempt(item):
                waiting.add(item.destination)
        return attempted

    def _attempt(self, item: Delivery) -> bool:
        """One attempt; True when the destination's queue may move on."""
        ids = {
            "delivery": item.id,
            "job": item.job_id,
            "destination": item.destination,
            "message_id": logged_message_id(item),
            "attempt": item.attempts,
        }
        target = self.targets.get(item.destination)
        if target is None:
            reason = f"destination {item.destination!r} is not configured"
            self._dead(item, reason, ids)
            return True
        try:
            outcome = target.deliverer.deliver(item)
        except Exception as exc:  # a deliverer bug must not stop every other delivery
            outcome = DeliveryOutcome.retry(f"deliverer failed: {type(exc).__name__}")
            log.exception(f"{item.kind}.deliverer_error", **ids)
        if outcome.status is OutcomeStatus.DELIVERED:
            self.outbox.mark_sent(item.id)
            self.metrics.delivery(item.destination, "delivered")
            log.info(f"{item.kind}.sent", **ids)
            return True
        if outcome.status is OutcomeStatus.REJECTED:
            self._dead(item, outcome.reason, ids)
            return True
        refusals = None  # counted only when the peer answered with a refusal
        if outcome.at_most is not None:
            refusals = item.refusals + 1
            if refusals >= outcome.at_most:
                self._dead(item, f"refused {refusals} times: {outcome.reason}", ids)
                return True
        if item.attempts >= target.policy.max_attempts:
            self._dead(item, f"gave up after {item.attempts} attempts: {outcome.reason}", ids)
            return True
        delay = target.policy.delay_s(item.attempts)
        self.outbox.mark_retry(item.id, error=outcome.reason, delay_s=delay, refusals=refusals)
        self.metrics.delivery(item.destination, "retry")
        log.warning(
            f"{item.kind}.retry",
            reason=_clip(outcome.reason),
            retry_in_s=delay,
            action=f"none if it passes: tried again in {delay:g} s; if it lasts, check the"
            f" destination {item.destination!r} (reason) and radnode status",
            **ids,
        )
        return False

    def _dead(self, item: Delivery, reason: str, ids: dict[str, object]) -> None:
        """Give a delivery up: dead-lettered, counted (radnode_dead_letters_total, which
        the documented alert watches; found by review: never counted) and logged."""
        self.outbox.mark_dead(item.id, error=reason)
        self.metrics.delivery(item.destination, "failed")
        self.metrics.dead_letter(item.destination)
        log.error(
            f"{item.kind}.dead_letter",
            reason=_clip(reason),
            action="fix the destination (see reason), then resend: POST"
            " /api/jobs/<job>/retry with the bearer token (set http.token if it is not set)",
            **ids,
        )
