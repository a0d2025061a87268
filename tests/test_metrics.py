"""Prometheus metrics: the receive path, the SCP and completion count what happened.

Each test uses its own :class:`Metrics` (its own registry), so counts start at zero
and tests do not see each other. The SCP test talks to a real Storage SCP over
loopback with pynetdicom as the peer.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_nodes.policy import AssociationPolicy
from dicom_nodes.scp import StorageSCP
from dicom_nodes.status import StoreStatus
from service.completion import CompletionMonitor
from service.index import StudyIndex
from service.ingest import Ingest
from service.metrics import DURATION_BUCKETS, FinishedJobRecorder, Metrics
from service.records import JobRecord, JobState
from service.spool import Spool
from tests.test_receive_path import ct_small, received

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def metrics(tmp_path: Path) -> Metrics:
    return Metrics(data_dir=tmp_path)


@pytest.fixture
def ingest(tmp_path: Path, metrics: Metrics) -> Iterator[Ingest]:
    index = StudyIndex(tmp_path / "index.sqlite3")
    yield Ingest(Spool(tmp_path), index, ae_title="RADNODE", min_free_bytes=0, metrics=metrics)
    index.close()


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def wait_for(metrics: Metrics, name: str, expected: float, **labels: str) -> float:
    """Poll a sample: SCP event handlers run on the association's own thread."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if value(metrics, name, **labels) >= expected:
            break
        time.sleep(0.02)
    return value(metrics, name, **labels)


def test_ingest_counts_stored_duplicate_and_refused_instances(ingest, metrics) -> None:
    ds = ct_small()
    first = received(ds)
    assert ingest.store(first) == StoreStatus.SUCCESS
    assert ingest.store(first) == StoreStatus.SUCCESS
    bad = ct_small()
    bad.SOPInstanceUID = "1.2.03"  # leading zero: refused with C001
    assert ingest.store(received(bad)) == StoreStatus.INVALID_UID

    for outcome in ("stored", "duplicate", "refused"):
        assert value(metrics, "radnode_instances_received_total", outcome=outcome) == 1
    assert value(metrics, "radnode_received_bytes_total", outcome="stored") == len(first.dataset)
    assert value(
        metrics, "radnode_store_refusals_total", status="0xC001", reason="invalid_uid"
    ) == (1)


def test_an_instance_another_association_stored_first_counts_as_duplicate(
    ingest, metrics, monkeypatch
) -> None:
    """Two associations storing the same instance at once both pass the "already held?"
    look before either records it; both were counted stored (541 for 256 instances in
    the acceptance pass). The race is made here by hiding the first one from that look;
    the index's own insert then says it was not new."""
    ds = received(ct_small())
    assert ingest.store(ds) == StoreStatus.SUCCESS
    monkeypatch.setattr(ingest._index, "instance_path", lambda uid: None)
    assert ingest.store(ds) == StoreStatus.SUCCESS
    assert value(metrics, "radnode_instances_received_total", outcome="stored") == 1
    assert value(metrics, "radnode_instances_received_total", outcome="duplicate") == 1


def test_mismatch_refusal_is_counted_with_its_own_status(ingest, metrics) -> None:
    ds = ct_small()
    assert ingest.store(received(ds, sop_instance_uid=generate_uid())) == (
        StoreStatus.SOP_INSTANCE_MISMATCH
    )
    assert value(
        metrics,
        "radnode_store_refusals_total",
        status="0xC002",
        reason="sop_instance_mismatch",
    ) == (1)
    assert value(metrics, "radnode_instances_received_total", outcome="stored") == 0


def test_scp_reports_accepted_released_rejected_and_aborted_associations(
    tmp_path: Path, ingest, metrics
) -> None:
    policy = AssociationPolicy(allowed_calling_aets=("PACS",))
    scp = StorageSCP(policy, ingest, host="127.0.0.1", port=0, on_association=metrics.association)
    scp.start()
    try:
        for calling, end in (("PACS", "release"), ("PACS", "abort"), ("INTRUDER", None)):
            ae = AE(ae_title=calling)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="RADNODE")
            if end is None:
                assert assoc.is_rejected
                continue
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0
            if end == "release":
                assoc.release()
            else:
                assoc.abort()
        name = "radnode_associations_total"
        assert wait_for(metrics, name, 2, outcome="accepted") == 2
        assert wait_for(metrics, name, 1, outcome="released") == 1
        assert wait_for(metrics, name, 1, outcome="aborted") == 1
        assert wait_for(metrics, name, 1, outcome="rejected") == 1
    finally:
        scp.stop()


def test_completion_counts_each_completed_study(tmp_path: Path, ingest, metrics) -> None:
    index = StudyIndex(tmp_path / "index.sqlite3")
    monitor = CompletionMonitor(index, quiet_s=0.01, metrics=metrics)
    assert ingest.store(received(ct_small())) == StoreStatus.SUCCESS
    time.sleep(0.05)
    assert len(monitor.check_now()) == 1
    assert monitor.check_now() == []
    assert value(metrics, "radnode_studies_completed_total") == 1
    index.close()


def test_job_timings_feed_stage_and_inference_histograms(metrics) -> None:
    metrics.job_timings("chest-xray", {"load_s": 0.3, "inference_s": 42.0, "write_s": 0.05})
    metrics.end_to_end("chest-xray", 1500.0)
    sample = "radnode_stage_seconds_count"
    assert value(metrics, sample, pipeline="chest-xray", stage="load") == 1
    assert value(metrics, sample, pipeline="chest-xray", stage="write") == 1
    assert value(metrics, "radnode_inference_seconds_sum", pipeline="chest-xray") == 42.0
    # 42 s falls in the 60 s bucket, not the 30 s one
    inference = "radnode_inference_seconds_bucket"
    assert value(metrics, inference, pipeline="chest-xray", le="30.0") == 0
    assert value(metrics, inference, pipeline="chest-xray", le="60.0") == 1
    e2e = "radnode_end_to_end_seconds_bucket"
    assert value(metrics, e2e, pipeline="chest-xray", le="1200.0") == 0
    assert value(metrics, e2e, pipeline="chest-xray", le="1800.0") == 1


def finished_job(job_id: str, finished_at: float | None, state: JobState) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        study_uid="1.2.3",
        study_key="k",
        series_uid="1.2.3.4",
        pipeline="liver-seg",
        routes=(),
        destinations=(),
        state=state,
        attempts=1,
        created_at=100.0,
        started_at=None if finished_at is None else finished_at - 50,
        finished_at=finished_at,
        timings=None if finished_at is None else {"inference_s": 2.0},
    )


def test_runs_finished_by_workers_are_counted_once_from_the_index(metrics) -> None:
    jobs = [finished_job("old", 150.0, JobState.DONE), finished_job("new", None, JobState.RUNNING)]
    recorder = FinishedJobRecorder(metrics, lambda limit: jobs[:limit], lambda uid: 90.0)
    recorder.prime()  # "old" finished before the node started: not counted again
    assert recorder.poll() == 0
    jobs[1] = finished_job("new", 400.0, JobState.FAILED)
    assert recorder.poll() == 1
    assert recorder.poll() == 0
    finished = "radnode_jobs_finished_total"
    assert value(metrics, finished, pipeline="liver-seg", state="failed") == 1
    assert value(metrics, finished, pipeline="liver-seg", state="done") == 0
    assert value(metrics, "radnode_inference_seconds_count", pipeline="liver-seg") == 1
    # a failed (or refused) run made no results: it is no end-to-end latency
    assert value(metrics, "radnode_end_to_end_seconds_count", pipeline="liver-seg") == 0
    jobs[1] = finished_job("new", 900.0, JobState.DONE)  # retried by an operator, ran again
    assert recorder.poll() == 1
    assert value(metrics, finished, pipeline="liver-seg", state="done") == 1
    assert value(metrics, "radnode_end_to_end_seconds_sum", pipeline="liver-seg") == 810.0


def test_buckets_span_a_tenth_of_a_second_to_half_an_hour() -> None:
    assert DURATION_BUCKETS[0] == 0.1
    assert DURATION_BUCKETS[-1] == 30 * 60
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)


def test_job_counts_are_read_at_scrape_and_a_failing_source_spares_the_rest(
    tmp_path: Path,
) -> None:
    counts = {("chest-xray", "queued"): 3}
    metrics = Metrics(job_counts=lambda: counts, queue_depth=lambda: 7)
    assert value(metrics, "radnode_jobs", pipeline="chest-xray", state="queued") == 3
    counts[("chest-xray", "queued")] = 1
    assert value(metrics, "radnode_jobs", pipeline="chest-xray", state="queued") == 1
    assert value(metrics, "radnode_queue_depth") == 7

    def broken() -> dict[tuple[str, str], int]:
        raise OSError("database is locked")

    text = Metrics(job_counts=broken).exposition().decode()
    assert "radnode_instances_received_total" in text
    assert "radnode_jobs{" not in text

    def unreachable() -> int:
        raise ConnectionError("Redis is down")

    # review: the queue-depth gauge raised through the scrape, /metrics answered 500
    text = Metrics(queue_depth=unreachable).exposition().decode()
    assert "radnode_queue_depth NaN" in text
    assert "radnode_instances_received_total" in text


def test_queue_up_is_read_at_scrape() -> None:
    """/readyz no longer fails while the queue is down (the node still receives), so
    this gauge is what an alert watches."""
    answers = [True]
    metrics = Metrics(queue_reachable=lambda: answers[0])
    assert value(metrics, "radnode_queue_up") == 1
    answers[0] = False
    assert value(metrics, "radnode_queue_up") == 0


def test_disk_free_is_read_at_scrape_and_nan_when_the_data_dir_is_gone(tmp_path: Path) -> None:
    assert value(Metrics(data_dir=tmp_path), "radnode_disk_free_bytes") > 0
    gone = Metrics(data_dir=tmp_path / "missing")
    assert math.isnan(value(gone, "radnode_disk_free_bytes"))


def test_deliveries_and_dead_letters_count_per_destination(metrics) -> None:
    metrics.delivery("pacs", "retry")
    metrics.delivery("pacs", "failed")
    metrics.dead_letter("pacs")
    metrics.delivery("ris", "delivered")
    assert value(metrics, "radnode_deliveries_total", destination="pacs", outcome="retry") == 1
    assert value(metrics, "radnode_dead_letters_total", destination="pacs") == 1
    assert value(metrics, "radnode_dead_letters_total", destination="ris") == 0
    with pytest.raises(ValueError, match="outcome must be one of"):
        metrics.delivery("pacs", "lost")
    with pytest.raises(ValueError, match="outcome must be one of"):
        metrics.association("maybe")


def test_alerted_series_exist_at_zero_and_waiting_results_are_a_gauge(tmp_path: Path) -> None:
    """A counter that appears at 1 (or at 125 after a burst inside one scrape) has no
    increase() for an alert: the first dead letter after a restart, a burst of A700s
    went unseen. And "results not delivered for 30 minutes" needs a gauge of what
    waits and since when (acceptance pass)."""
    from service.delivery import Outbox

    now = [1000.0]
    outbox = Outbox(tmp_path / "outbox.sqlite3", clock=lambda: now[0])
    metrics = Metrics(data_dir=tmp_path)
    metrics.start_at_zero(destinations=["pacs", "ris"], pipelines=["seg"])

    def dead() -> dict[str, int]:
        return {name: states.get("dead", 0) for name, states in outbox.counts().items()}

    metrics.watch_deliveries(outbox.waiting, ["pacs", "ris"], clock=lambda: now[0], dead=dead)

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert sample("radnode_dead_letters_total", destination="ris") == 0
    assert sample("radnode_deliveries_total", destination="pacs", outcome="failed") == 0
    assert sample("radnode_jobs_finished_total", pipeline="seg", state="failed") == 0
    assert sample("radnode_store_refusals_total", status="0xA700", reason="out_of_resources") == 0
    assert sample("radnode_deliveries_waiting", destination="pacs") == 0
    outbox.enqueue(job_id="j", destination="pacs", kind="hl7", message_id="m1", payload=b"x")
    now[0] += 90
    outbox.enqueue(job_id="k", destination="pacs", kind="hl7", message_id="m2", payload=b"y")
    now[0] += 30
    assert sample("radnode_deliveries_waiting", destination="pacs") == 2
    assert sample("radnode_deliveries_oldest_waiting_seconds", destination="pacs") == 120
    assert sample("radnode_deliveries_oldest_waiting_seconds", destination="ris") == 0
    # a dead letter stays counted until it is resent, restart or not (acceptance pass:
    # the counter read 0 after a restart while /api/dead-letters listed 2)
    assert sample("radnode_dead_letters_open", destination="pacs") == 0
    first = outbox.claim_next(lease_s=60)
    assert first is not None
    outbox.mark_dead(first.id, error="refused")
    assert sample("radnode_dead_letters_open", destination="pacs") == 1
    assert sample("radnode_dead_letters_open", destination="ris") == 0
    outbox.close()


def test_every_metric_is_prefixed_parseable_and_documented(tmp_path: Path) -> None:
    metrics = Metrics(data_dir=tmp_path, job_counts=lambda: {("p", "done"): 1})
    metrics.watch_deliveries(lambda: {"pacs": (1, 0.0)}, ["pacs"])
    metrics.job_finished("p", "done", {"inference_s": 1.0}, end_to_end_s=1.0)
    metrics.delivery("pacs", "delivered")
    metrics.dead_letter("pacs")
    metrics.instance_refused(StoreStatus.OUT_OF_RESOURCES, 10)
    families = list(text_string_to_metric_families(metrics.exposition().decode()))
    names = {f.name for f in families}
    assert len(names) >= 15
    docs = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`(radnode_[a-z_]+)`", docs))
    for family in families:
        assert family.name.startswith("radnode_"), family.name
        assert family.documentation, f"{family.name} has no HELP text"
        exposed = family.name + ("_total" if family.type == "counter" else "")
        assert exposed in documented, f"{exposed} is not in docs/operations.md"


def test_a_gauge_that_cannot_be_read_is_logged_once_a_minute_not_per_scrape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through a Redis outage each scrape logged two metrics.read_failed lines
    (acceptance pass: ~480 an hour at Prometheus' 15 s)."""
    import structlog

    from service import metrics as metrics_module

    clock = [1000.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(metrics_module, "_READ_FAILURES_SAID", {})

    def unreadable() -> float:
        raise ConnectionError("queue down")

    with structlog.testing.capture_logs() as logs:
        for _ in range(4):  # a minute of scrapes every 15 s
            assert math.isnan(metrics_module._or_nan(unreadable, "radnode_queue_depth"))
            assert math.isnan(metrics_module._or_nan(unreadable, "radnode_queue_up"))
            clock[0] += 15.0
        assert math.isnan(metrics_module._or_nan(unreadable, "radnode_queue_depth"))
    said = [e["metric"] for e in logs if e["event"] == "metrics.read_failed"]
    assert said == ["radnode_queue_depth", "radnode_queue_up", "radnode_queue_depth"]
