"""Delivery of ORU^R01 over MLLP: the outbox, the retry policy and a real MLLP listener.

The first part drives the outbox and worker with a scripted deliverer (no network). The
integration part starts python-hl7's asyncio MLLP server on loopback as the RIS, answers
with scripted ACK codes, and checks what arrived and what the outbox says.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import hl7 as python_hl7
import pytest
import structlog
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from service.delivery import (
    Delivery,
    DeliveryOutcome,
    DeliveryState,
    DeliveryTarget,
    DeliveryWorker,
    Outbox,
    RetryPolicy,
    UnknownDelivery,
)
from service.hl7 import (
    Hl7Deliverer,
    Hl7DestinationSettings,
    Hl7Error,
    MllpClient,
    MllpError,
    parse_ack,
    without_identifiers,
)
from service.metrics import Metrics
from service.pipeline.result import (
    BundleIdentity,
    CodedConcept,
    Label,
    PipelineResult,
    StageTimings,
    TaskKind,
)
from service.testing import make_ct_series
from service.writers.oru import enqueue_oru
from tests.conftest import free_port

PATIENT_NAME = "SECRET^PATIENT"
PATIENT_ID = "PID-SECRET-77"


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise TimeoutError("condition not met in time")


# ---------------------------------------------------------------------------------------
# Outbox and worker, with a scripted deliverer
# ---------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Scripted:
    """A deliverer that answers from a script; the last answer repeats."""

    def __init__(self, *outcomes: DeliveryOutcome) -> None:
        self.outcomes = list(outcomes)
        self.seen: list[Delivery] = []

    def deliver(self, item: Delivery) -> DeliveryOutcome:
        self.seen.append(item)
        return self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]


def enqueue(outbox: Outbox, message_id: str = "m1", destination: str = "ris") -> Delivery:
    return outbox.enqueue(
        job_id="job-1", destination=destination, kind="hl7", message_id=message_id, payload=b"x"
    )


def test_retry_policy_doubles_the_wait_up_to_its_cap() -> None:
    policy = RetryPolicy(max_attempts=6, backoff_s=2, max_backoff_s=10)
    assert [policy.delay_s(n) for n in range(1, 6)] == [2, 4, 8, 10, 10]


def test_retry_then_dead_after_the_last_attempt(tmp_path: Path) -> None:
    clock = FakeClock()
    outbox = Outbox(tmp_path / "outbox.sqlite3", clock=clock)
    item = enqueue(outbox)
    worker = DeliveryWorker(
        outbox,
        {"ris": DeliveryTarget(Scripted(DeliveryOutcome.retry("AE: busy")), RetryPolicy(3, 5))},
    )
    assert worker.run_once() == 1
    after_one = outbox.get(item.id)
    assert (after_one.state, after_one.attempts, after_one.last_error) == (
        DeliveryState.PENDING,
        1,
        "AE: busy",
    )
    assert after_one.next_attempt_at == clock.now + 5
    assert worker.run_once() == 0  # not due yet
    clock.now += 5
    worker.run_once()
    clock.now += 10
    worker.run_once()
    dead = outbox.get(item.id)
    assert (dead.state, dead.attempts) == (DeliveryState.DEAD, 3)
    assert dead.last_error == "gave up after 3 attempts: AE: busy"


def test_the_worker_counts_every_try_and_dead_letter(tmp_path: Path) -> None:
    """radnode_deliveries_total / radnode_dead_letters_total come from the worker's
    tries (found by review: nothing called them, so the dead-letter alert never
    fired)."""
    metrics = Metrics()
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    enqueue(outbox)
    enqueue(outbox, destination="pacs")
    worker = DeliveryWorker(
        outbox,
        {
            "ris": DeliveryTarget(Scripted(DeliveryOutcome.retry("AE: busy")), RetryPolicy(2, 0)),
            "pacs": DeliveryTarget(Scripted(DeliveryOutcome.delivered()), RetryPolicy(2, 0)),
        },
        metrics=metrics,
    )
    worker.run_once()
    worker.run_once()

    def sample(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    tries = "radnode_deliveries_total"
    assert sample(tries, destination="ris", outcome="retry") == 1
    assert sample(tries, destination="ris", outcome="failed") == 1
    assert sample(tries, destination="pacs", outcome="delivered") == 1
    assert sample("radnode_dead_letters_total", destination="ris") == 1
    assert sample("radnode_dead_letters_total", destination="pacs") == 0


def test_rejected_is_dead_at_once_and_an_operator_can_resend_it(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    item = enqueue(outbox)
    deliverer = Scripted(DeliveryOutcome.rejected("AR: unknown order"), DeliveryOutcome.delivered())
    worker = DeliveryWorker(outbox, {"ris": DeliveryTarget(deliverer, RetryPolicy(10, 0))})
    worker.run_once()
    assert outbox.get(item.id).state is DeliveryState.DEAD
    assert outbox.get(item.id).last_error == "AR: unknown order"
    assert outbox.resend(item.id).state is DeliveryState.PENDING
    worker.run_once()
    assert outbox.get(item.id).state is DeliveryState.SENT
    assert len(deliverer.seen) == 2
    with pytest.raises(UnknownDelivery):
        outbox.resend(999)


def test_retry_dead_requeues_only_the_named_destination(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    a, b = enqueue(outbox, "a", "ris"), enqueue(outbox, "b", "ehr")
    for item in (a, b):
        outbox.claim_next(lease_s=60)
        outbox.mark_dead(item.id, error="AR")
    assert outbox.retry_dead("ris") == 1
    assert (outbox.get(a.id).state, outbox.get(a.id).attempts) == (DeliveryState.PENDING, 0)
    assert outbox.get(b.id).state is DeliveryState.DEAD
    assert outbox.counts()["ehr"][DeliveryState.DEAD] == 1


def test_a_destination_is_a_fifo_while_its_head_waits(tmp_path: Path) -> None:
    clock = FakeClock()
    outbox = Outbox(tmp_path / "outbox.sqlite3", clock=clock)
    first, second = enqueue(outbox, "first"), enqueue(outbox, "second")
    other = enqueue(outbox, "other", destination="ehr")
    deliverer = Scripted(DeliveryOutcome.retry("down"), DeliveryOutcome.delivered())
    worker = DeliveryWorker(
        outbox,
        {
            "ris": DeliveryTarget(deliverer, RetryPolicy(5, 30)),
            "ehr": DeliveryTarget(Scripted(DeliveryOutcome.delivered()), RetryPolicy()),
        },
    )
    worker.run_once()
    assert [d.message_id for d in deliverer.seen] == ["first"]  # second waits behind it
    assert outbox.get(other.id).state is DeliveryState.SENT  # other destinations go on
    clock.now += 30
    worker.run_once()
    assert [d.message_id for d in deliverer.seen] == ["first", "first", "second"]
    assert {outbox.get(first.id).state, outbox.get(second.id).state} == {DeliveryState.SENT}


def test_pending_deliveries_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    clock = FakeClock()
    before = Outbox(path, clock=clock)
    waiting = enqueue(before, "waiting")
    in_flight = enqueue(before, "in-flight", destination="ehr")
    assert before.claim_next(lease_s=120, skip=["ris"]) is not None  # then the process dies
    before.close()

    after = Outbox(path, clock=clock)
    deliverer = Scripted(DeliveryOutcome.delivered())
    worker = DeliveryWorker(
        after,
        {
            "ris": DeliveryTarget(deliverer, RetryPolicy()),
            "ehr": DeliveryTarget(deliverer, RetryPolicy()),
        },
    )
    worker.run_once()
    assert [d.message_id for d in deliverer.seen] == ["waiting"]  # in-flight: leased
    clock.now += 120
    worker.run_once()
    assert after.get(in_flight.id).state is DeliveryState.SENT
    assert after.get(in_flight.id).attempts == 2  # the interrupted attempt counts
    assert after.get(waiting.id).state is DeliveryState.SENT


def test_a_restarted_node_sends_what_a_dead_process_had_claimed_at_once(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    clock = FakeClock()
    before = Outbox(path, clock=clock)
    in_flight = enqueue(before, "in-flight")
    assert before.claim_next(lease_s=300) is not None  # then the process dies
    before.close()

    after = Outbox(path, clock=clock)
    assert after.due_now_after_restart() == 1  # what DeliveryWorker.start() does first
    deliverer = Scripted(DeliveryOutcome.delivered())
    DeliveryWorker(after, {"ris": DeliveryTarget(deliverer, RetryPolicy())}).run_once()
    assert after.get(in_flight.id).state is DeliveryState.SENT  # no 300 s wait
    assert after.due_now_after_restart() == 0


def test_a_delivery_for_an_unconfigured_destination_is_dead_lettered(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    item = enqueue(outbox, destination="gone")
    DeliveryWorker(outbox, {}).run_once()
    assert outbox.get(item.id).state is DeliveryState.DEAD
    assert "not configured" in (outbox.get(item.id).last_error or "")


def test_error_text_loses_birth_date_order_number_uids_and_quoted_values() -> None:
    sent = (
        b"MSH|^~\\&|RADNODE|AI|RIS|H|20260101||ORU^R01|m1|P|2.5.1\r"
        b"PID|1||77^^^HOSP^MR||Lee^Li||19600102|F\rORC|RE|ACC-9\rOBR|1|ACC-9||x\r"
    )
    text = (
        "LI LEE born 1960-01-02 (19600102): order ACC-9 of study 1.2.840.99.1.2 "
        "has 'Lee^Li'; check segment OBR field 2"
    )
    assert without_identifiers(text, sent) == (
        "<redacted> <redacted> born <redacted> (<redacted>): order <redacted> of study "
        "<redacted> has <redacted>; check segment OBR field 2"
    )
    assert without_identifiers("database busy", None) == "database busy"


def test_error_text_loses_what_radnode_did_not_send_but_keeps_what_to_fix() -> None:
    """The receiver may quote another patient, an institution or a description radnode
    never sent (PHI audit): a capitalised word or a long number outside the HL7 error
    vocabulary is redacted; the sentence, field references and codes stay."""
    text = (
        "Unknown patient: order ACC-77 belongs to Smith, John (MRN 4711) at "
        "PHIINSTITUTE, desc Abdomen Lowdose; check PID-3 and OBR-4.1, code 204. "
        "Table value not found"
    )
    assert without_identifiers(text, None) == (
        "Unknown patient: order <redacted> belongs to <redacted>, <redacted> (MRN <redacted>)"
        " at <redacted>, desc <redacted> <redacted>; check PID-3 and OBR-4.1, code 204. "
        "Table value not found"
    )
    # an identifier shaped like a field reference goes (acceptance pass: MRN-550902)
    assert without_identifiers("Unknown patient MRN-550902, DOB.19490102; see PID-3.1", None) == (
        "Unknown patient <redacted>, <redacted>; see PID-3.1"
    )
    assert without_identifiers("PID-555-123-456-789 PID-5.1.2", None) == "<redacted> PID-5.1.2"
    # HL7 terms a RIS quotes back stay; an apostrophe opens no quote; a date goes (review)
    kept = "Message type ORU^R01, version 2.5.1: table 0396 value 99RADNODE not found"
    assert without_identifiers(kept, None) == kept
    assert without_identifiers("patient's record doesn't exist; dob 01/02/1980", None) == (
        "patient's record doesn't exist; dob <redacted>"
    )


def test_parse_ack_reads_code_control_id_and_error_text() -> None:
    raw = (
        b"MSH|^~\\&|RIS||RADNODE||20250101||ACK^R01^ACK|9|P|2.5.1\r"
        b"MSA|AR|abc123|Order \\T\\ patient unknown\r"
        b"ERR|||204^Unknown key identifier^HL70357|E||||unknown order\r"
        b"ERR||||E||||unknown order\r"
    )
    ack = parse_ack(raw)
    assert (ack.code, ack.control_id, ack.accepted) == ("AR", "abc123", False)
    assert ack.text == "Order & patient unknown; Unknown key identifier; unknown order"


# ---------------------------------------------------------------------------------------
# A real MLLP listener (python-hl7's asyncio server) as the RIS
# ---------------------------------------------------------------------------------------


def settings_for(port: int, **overrides: object) -> Hl7DestinationSettings:
    values: dict[str, object] = {
        "name": "ris",
        "host": "127.0.0.1",
        "port": port,
        "receiving_application": "RIS",
        "connect_timeout_s": 1.0,
        "ack_timeout_s": 2.0,
        "max_attempts": 5,
        "backoff_s": 0.05,
        "max_backoff_s": 0.2,
    }
    values.update(overrides)
    return Hl7DestinationSettings(**values)  # type: ignore[arg-type]


def result() -> PipelineResult:
    return PipelineResult(
        bundle=BundleIdentity("chest_pneumothorax", "1.2.0", TaskKind.CLASSIFICATION),
        labels=(Label(0, "Pneumothorax", CodedConcept("36118008", "SCT", "Pneumothorax")),),
        device="cpu",
        timings=StageTimings(),
        probabilities=(0.9,),
    )


@pytest.fixture
def delivery(tmp_path: Path) -> Iterator[Callable[[Hl7DestinationSettings], tuple]]:
    """Enqueue one ORU^R01 for a destination and start a worker for it."""
    workers: list[DeliveryWorker] = []

    def start(dest: Hl7DestinationSettings) -> tuple[Outbox, Delivery, DeliveryWorker]:
        outbox = Outbox(tmp_path / "outbox.sqlite3")
        source = make_ct_series(
            slices=2, rows=16, columns=16, patient_name=PATIENT_NAME, patient_id=PATIENT_ID
        )[0]
        item = enqueue_oru(
            outbox,
            job_id="job-42",
            result=result(),
            source=source,
            spacing_mm=(1.0, 1.0, 1.0),
            destination=dest,
        )
        target = DeliveryTarget(Hl7Deliverer(dest), dest.retry_policy())
        worker = DeliveryWorker(outbox, {dest.name: target}, poll_interval_s=0.02, lease_s=30)
        workers.append(worker)
        worker.start()
        return outbox, item, worker

    yield start
    for worker in workers:
        worker.stop()


def assert_strict(messages: list[str]) -> None:
    for text in messages:
        assert parse_message(text, validation_level=VALIDATION_LEVEL.STRICT).validate()


def assert_no_patient_data(events: list[dict]) -> None:
    flat = repr(events)
    assert PATIENT_ID not in flat and "SECRET" not in flat


@pytest.mark.integration
def test_ae_twice_then_aa_delivers_exactly_once(listener_factory, delivery) -> None:
    listener = listener_factory("AE", "AE", "AA", error_text="database busy")
    with structlog.testing.capture_logs() as events:
        outbox, item, worker = delivery(settings_for(listener.port))
        wait_until(lambda: outbox.get(item.id).state is DeliveryState.SENT)
        worker.stop()
    sent = outbox.get(item.id)
    assert sent.attempts == 3
    assert len(listener.received) == 3
    assert {python_hl7.parse(m)["MSH.F10"] for m in listener.received} == {item.message_id}
    assert_strict(listener.received)
    retries = [e for e in events if e["event"] == "hl7.retry"]
    assert len(retries) == 2 and "database busy" in retries[0]["reason"]
    (done,) = [e for e in events if e["event"] == "hl7.sent"]
    assert (done["job"], done["message_id"], done["delivery"]) == (
        "job-42",
        item.message_id,
        item.id,
    )
    assert_no_patient_data(events)


@pytest.mark.integration
@pytest.mark.parametrize("code", ["AR", "AE"])
def test_a_refusal_is_tried_refused_attempts_times_then_dead_lettered_with_its_text(
    listener_factory, delivery, code: str
) -> None:
    """A RIS that keeps refusing one message (AE or AR: receivers use either) held every
    later result to it for the three hours of max_attempts (acceptance pass): a refusal
    gets ``refused_attempts`` tries, then the message is a dead letter."""
    listener = listener_factory(*[code] * 5, error_text="Unknown placer order number")
    with structlog.testing.capture_logs() as events:
        outbox, item, worker = delivery(settings_for(listener.port, refused_attempts=3))
        wait_until(lambda: outbox.get(item.id).state is DeliveryState.DEAD)
        worker.stop()
    dead = outbox.get(item.id)
    assert dead.attempts == 3 and len(listener.received) == 3  # of max_attempts = 5
    assert code in (dead.last_error or "")
    assert "Unknown placer order number" in (dead.last_error or "")
    (letter,) = [e for e in events if e["event"] == "hl7.dead_letter"]
    assert letter["job"] == "job-42" and letter["message_id"] == item.message_id
    assert "Unknown placer order number" in letter["reason"]
    assert_strict(listener.received)
    assert_no_patient_data(events)


@pytest.mark.integration
def test_attempts_that_found_the_ris_down_are_not_counted_as_refusals(
    listener_factory, delivery
) -> None:
    """A message that waited out a RIS outage for more tries than ``refused_attempts``
    was dead-lettered by the RIS's first AE once it was back (every attempt counted):
    only answered attempts are refusals."""
    port = free_port()  # the RIS is down
    outbox, item, worker = delivery(settings_for(port, refused_attempts=2, max_attempts=50))
    wait_until(lambda: outbox.get(item.id).attempts >= 3)
    assert outbox.get(item.id).refusals == 0
    listener = listener_factory("AE", "AA", port=port, error_text="order not yet on file")
    wait_until(lambda: outbox.get(item.id).state is not DeliveryState.PENDING)
    worker.stop()
    sent = outbox.get(item.id)
    assert sent.state is DeliveryState.SENT, sent.last_error
    assert sent.refusals == 1 and len(listener.received) == 2


def test_an_outbox_made_before_the_refusals_column_gets_it_at_open(tmp_path: Path) -> None:
    """Outboxes of earlier versions have no ``refusals``: it is added when the file is
    opened, their deliveries start at 0 refusals and count from there."""
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path)
    item = outbox.enqueue(job_id="j", destination="ris", kind="hl7", message_id="m", payload=b"x")
    outbox.close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE deliveries DROP COLUMN refusals")
    db.close()
    reopened = Outbox(path)
    assert reopened.get(item.id).refusals == 0
    reopened.mark_retry(item.id, error="AE: no order", delay_s=0, refusals=1)
    assert reopened.get(item.id).refusals == 1
    reopened.close()


@pytest.mark.integration
def test_a_receiver_quoting_the_patient_is_not_echoed_into_logs_or_outbox(
    listener_factory, delivery
) -> None:
    """A RIS that names the patient in its refusal (real interface engines do) must not
    put the name, ID or birth date into the log or the outbox; its reason stays."""
    family, given = PATIENT_NAME.split("^")[:2]
    listener = listener_factory(
        "AR", error_text=f"Patient {given} {family.lower()} MRN {PATIENT_ID} not on file"
    )
    with structlog.testing.capture_logs() as events:
        outbox, item, worker = delivery(settings_for(listener.port))
        wait_until(lambda: outbox.get(item.id).state is DeliveryState.DEAD)
        worker.stop()
    kept = outbox.get(item.id).last_error or ""
    (letter,) = [e for e in events if e["event"] == "hl7.dead_letter"]
    for text in (kept, letter["reason"]):
        assert "not on file" in text and "MRN <redacted>" in text
        assert family.lower() not in text.lower() and given.lower() not in text.lower()
        assert PATIENT_ID not in text
    assert_no_patient_data(events)


@pytest.mark.integration
def test_listener_down_then_up_is_delivered_after_retry(listener_factory, delivery) -> None:
    port = free_port()  # nothing listens here yet
    with structlog.testing.capture_logs() as events:
        outbox, item, worker = delivery(settings_for(port, max_attempts=50))
        wait_until(lambda: outbox.get(item.id).attempts >= 2)
        assert outbox.get(item.id).state is DeliveryState.PENDING
        assert "cannot connect" in (outbox.get(item.id).last_error or "")
        listener = listener_factory("AA", port=port)
        wait_until(lambda: outbox.get(item.id).state is DeliveryState.SENT)
        worker.stop()
    assert len(listener.received) == 1
    assert_strict(listener.received)
    assert any(e["event"] == "hl7.retry" for e in events)
    assert_no_patient_data(events)


@pytest.mark.integration
def test_a_listener_that_never_answers_times_out() -> None:
    # A plain socket that accepts (in its backlog) but never sends an ACK.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = MllpClient(
        "127.0.0.1", server.getsockname()[1], connect_timeout_s=1, ack_timeout_s=0.3
    )
    start = time.monotonic()
    with server, pytest.raises(MllpError, match=r"no answer within 0\.3 s"):
        client.exchange(b"MSH|^~\\&|X\r")
    assert time.monotonic() - start < 2


@pytest.mark.integration
def test_a_service_that_is_not_mllp_on_the_ris_port_is_named_as_such() -> None:
    """Acceptance pass: radnode pointed at another service's port said only "connection
    closed before a complete answer". The peer here is a plain socket that greets with
    an SSH banner and closes, as sshd does to a client that is not SSH (no sshd runs
    here)."""
    server = socket.create_server(("127.0.0.1", 0))

    def greet() -> None:
        connection, _ = server.accept()
        with connection:
            connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
            time.sleep(0.2)

    threading.Thread(target=greet, daemon=True).start()
    client = MllpClient("127.0.0.1", server.getsockname()[1], connect_timeout_s=1, ack_timeout_s=5)
    with (
        server,
        pytest.raises(MllpError, match=r"not MLLP-framed \(it starts with 'SSH-2\.0-Open'\)"),
    ):
        client.exchange(b"MSH|^~\\&|X\r")


def test_an_answer_without_msh_is_said_to_be_no_hl7_message() -> None:
    with pytest.raises(Hl7Error, match="has no MSH segment"):
        parse_ack(b"MSA|AA|abc\r")


@pytest.mark.parametrize(
    "wrapped",
    [
        b"\xef\xbb\xbfMSH|^~\\&|RIS|H|RADNODE|H|20250101||ACK|9|P|2.5.1\rMSA|AA|abc\r",
        b"  \r\nMSH|^~\\&|RIS|H|RADNODE|H|20250101||ACK|9|P|2.5.1\r\nMSA|AA|abc\r\n",
        b"FHS|^~\\&|RIS\rBHS|^~\\&|RIS\rMSH|^~\\&|RIS|H|RADNODE|H|20250101||ACK|9|P|2.5.1\r"
        b"MSA|AA|abc\rBTS|1\rFTS|1\r",
    ],
)
def test_an_ack_with_a_bom_blanks_or_a_batch_around_it_is_read(wrapped: bytes) -> None:
    """Review: refused, such an ACK made the same ORU be sent for three hours."""
    ack = parse_ack(wrapped)
    assert (ack.code, ack.control_id) == ("AA", "abc")


@pytest.mark.integration
def test_an_ack_framed_without_the_final_carriage_return_is_read() -> None:
    """<VT> ack <FS> with no <CR>: seen from some receivers. Waiting for the <CR> timed
    out and an accepted message was resent until the retries ran out (review). The
    receiver here is a plain socket because a library MLLP server frames correctly."""
    server = socket.create_server(("127.0.0.1", 0))
    ack = b"MSH|^~\\&|RIS||RADNODE||20250101||ACK|1|P|2.5.1\rMSA|AA|abc\r"

    def answer() -> None:
        connection, _ = server.accept()
        with connection:
            while b"\x1c\r" not in connection.recv(65536):
                pass
            connection.sendall(b"\x0b" + ack + b"\x1c")  # no <CR>
            time.sleep(1)

    responder = threading.Thread(target=answer, daemon=True)
    responder.start()
    client = MllpClient("127.0.0.1", server.getsockname()[1], connect_timeout_s=1, ack_timeout_s=5)
    with server:
        answer_bytes = client.exchange(b"MSH|^~\\&|X\r")
    assert answer_bytes == ack
    assert parse_ack(answer_bytes).code == "AA"


@pytest.mark.integration
def test_an_ack_for_another_message_is_retried(listener_factory) -> None:
    listener = listener_factory("AA")
    deliverer = Hl7Deliverer(settings_for(listener.port))
    item = Delivery(
        id=1,
        job_id="job",
        destination="ris",
        kind="hl7",
        message_id="not-what-was-sent",
        payload=b"MSH|^~\\&|RADNODE||RIS||20250101||ORU^R01^ORU_R01|other-id|P|2.5.1\r",
        payload_ref=None,
        state=DeliveryState.PENDING,
        attempts=1,
        created_at=0,
        next_attempt_at=0,
        finished_at=None,
        last_error=None,
    )
    outcome = deliverer.deliver(item)
    assert outcome == DeliveryOutcome.retry("ACK answers another message (MSA-2 != MSH-10)")


@pytest.mark.integration
def test_a_hung_pacs_does_not_hold_up_the_ris(listener_factory, tmp_path: Path) -> None:
    """Each destination has its own delivery lane. Real peers: python-hl7's MLLP
    listener as the RIS and, as a PACS whose process hangs, a TCP port that takes the
    connection and never answers. The HL7 result goes out while the DICOM attempt is
    still waiting for an answer (one lane for all would wait its 30 s timeout)."""
    from service.dicom_delivery import DicomDeliverer, DicomDestinationSettings
    from service.testing import write_ct_series

    listener = listener_factory("AA")
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    folder = tmp_path / "dicom"
    write_ct_series(folder, slices=1, rows=16, columns=16)
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    pacs = DicomDestinationSettings(
        name="pacs", host="127.0.0.1", port=hung.getsockname()[1], ae_title="PACS",
        connect_timeout_s=30, dimse_timeout_s=30,
    )  # fmt: skip
    ris = settings_for(listener.port)
    dicom_item = outbox.enqueue(
        job_id="job-7", destination="pacs", kind="dicom", message_id="1.2.3",
        payload_ref=str(folder),
    )  # fmt: skip
    source = make_ct_series(slices=2, rows=16, columns=16, patient_id=PATIENT_ID)[0]
    hl7_item = enqueue_oru(
        outbox, job_id="job-7", result=result(), source=source, spacing_mm=(1.0, 1.0, 1.0),
        destination=ris,
    )  # fmt: skip
    targets = {
        "pacs": DeliveryTarget(DicomDeliverer(pacs), pacs.retry_policy()),
        "ris": DeliveryTarget(Hl7Deliverer(ris), ris.retry_policy()),
    }
    worker = DeliveryWorker(outbox, targets, poll_interval_s=0.02, lease_s=120)
    worker.start()
    try:
        wait_until(lambda: outbox.get(dicom_item.id).attempts == 1)  # the PACS lane waits
        wait_until(lambda: outbox.get(hl7_item.id).state is DeliveryState.SENT)
        waiting = outbox.get(dicom_item.id)
        assert waiting.state is DeliveryState.PENDING and waiting.finished_at is None
        assert len(listener.received) == 1
    finally:
        hung.close()  # the PACS "dies": its attempt ends, to be retried
        worker.stop()
    assert outbox.get(dicom_item.id).state is DeliveryState.PENDING


def test_a_delivery_thread_outlives_an_outbox_it_could_not_read(tmp_path: Path) -> None:
    """Another process held the outbox's write lock past its busy timeout: the
    destination's thread died with "database is locked" and nothing more was sent until
    a restart (found by review). It logs the pass and goes on."""
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    deliverer = Scripted(DeliveryOutcome.delivered())
    worker = DeliveryWorker(
        outbox, {"ris": DeliveryTarget(deliverer, RetryPolicy(10, 0))}, poll_interval_s=0.1
    )
    blocker = sqlite3.connect(tmp_path / "outbox.sqlite3", isolation_level=None)
    with structlog.testing.capture_logs() as events:
        worker.start()
        try:
            blocker.execute("BEGIN EXCLUSIVE")  # the passes from now on fail
            time.sleep(5.5)  # the outbox's busy timeout is 5 s
            blocker.execute("ROLLBACK")
            item = enqueue(outbox)
            deadline = time.monotonic() + 10
            while outbox.get(item.id).state is not DeliveryState.SENT:
                assert time.monotonic() < deadline, "the delivery thread did not go on"
                time.sleep(0.05)
        finally:
            worker.stop()
    failed = [e for e in events if e["event"] == "delivery.pass_failed"]
    assert failed and "locked" in failed[0]["reason"]
