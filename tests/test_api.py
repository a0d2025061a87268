"""The HTTP API over real loopback requests, and the status view that reads it.

Studies come from a real :class:`StudyIndex` filled through the real receive path
(:class:`Ingest`), with a data set that carries distinctive patient data, so that a
leak of it into any response would be caught. Jobs come from a small in-test
:class:`StatusSource`: the study index has no job table yet, and the API's job is to
show jobs and pass retries on, not to decide which states are retryable.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from rich.console import Console

from dicom_nodes.status import StoreStatus
from service.api import (
    ROUTES,
    ApiServer,
    DeadLetter,
    DeliveryView,
    RetryOutcome,
    disk_space_check,
)
from service.errors import StartupError
from service.index import StudyIndex
from service.ingest import Ingest
from service.metrics import Metrics
from service.records import JobRecord, JobState, StudySummary, WorkerView
from service.spool import Spool
from service.status_view import StatusUnavailable, fetch_status, render_snapshot, render_status
from service.uids import study_key
from tests.conftest import free_port
from tests.test_receive_path import ct_small, received

TOKEN = "test-token-1f8e2c"
PHI = ("Doe^Jane", "PID-4711-XY", "19700101", "ACC-0815-XY")


def with_phi(ds: Dataset) -> Dataset:
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-4711-XY"
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = "ACC-0815-XY"
    return ds


@dataclass
class FakeNode:
    """StatusSource: studies from the real index, jobs held in memory."""

    index: StudyIndex
    jobs: dict[str, JobRecord] = field(default_factory=dict)
    letters: list[DeadLetter] = field(default_factory=list)
    delivered: dict[str, list[DeliveryView]] = field(default_factory=dict)
    seen_workers: list[WorkerView] = field(default_factory=list)
    superseded: set[str] = field(default_factory=set)
    #: failed or refused job -> the later job that made its result
    resolved: dict[str, str] = field(default_factory=dict)
    checks: dict[str, bool | str] = field(
        default_factory=lambda: {"scp_listening": True, "queue": True, "disk": True}
    )
    fail_with: Exception | None = None

    def recent_studies(self, limit: int) -> list[StudySummary]:
        if self.fail_with is not None:
            raise self.fail_with
        return self.index.recent_studies(limit)

    def recent_jobs(self, limit: int, state: JobState | None = None) -> list[JobRecord]:
        jobs = sorted(self.jobs.values(), key=lambda j: j.created_at, reverse=True)
        return [j for j in jobs if state is None or j.state == state][:limit]

    def dead_letters(self, limit: int) -> list[DeadLetter]:
        return self.letters[:limit]

    def workers(self) -> list[WorkerView]:
        return list(self.seen_workers)

    def deliveries(self, job_ids: Sequence[str]) -> dict[str, list[DeliveryView]]:
        return {j: self.delivered[j] for j in job_ids if j in self.delivered}

    def resolved_by(self, jobs: Sequence[JobRecord]) -> dict[str, str]:
        return {j.job_id: self.resolved[j.job_id] for j in jobs if j.job_id in self.resolved}

    def retry_job(self, job_id: str) -> RetryOutcome:
        job = self.jobs.get(job_id)
        if job is None:
            return RetryOutcome.UNKNOWN_JOB
        if job_id in self.superseded:
            return RetryOutcome.SUPERSEDED
        if job.state is not JobState.FAILED:
            return RetryOutcome.NOT_RETRYABLE
        self.jobs[job_id] = replace(job, state=JobState.QUEUED, error=None)
        return RetryOutcome.RETRIED

    def discard_dead_letters(self, job_id: str) -> list[str] | None:
        if job_id not in self.jobs:
            return None
        dropped = sorted({letter.destination for letter in self.letters if letter.job_id == job_id})
        self.letters = [letter for letter in self.letters if letter.job_id != job_id]
        return dropped

    def resend_dead_letters(self, destination: str | None) -> tuple[list[str], list[str]] | None:
        if destination is not None and destination not in {d.destination for d in self.letters}:
            return None
        jobs = [d.job_id for d in self.letters if destination in (None, d.destination)]
        self.letters = [d for d in self.letters if d.job_id not in jobs]
        return jobs, []

    def readiness(self) -> dict[str, bool | str]:
        return dict(self.checks)


@dataclass
class Stack:
    node: FakeNode
    api: ApiServer
    metrics: Metrics
    studies: list[Dataset]


def job(job_id: str, ds: Dataset, state: JobState, created_at: float, **extra: Any) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        study_uid=str(ds.StudyInstanceUID),
        study_key=study_key(str(ds.StudyInstanceUID)),
        series_uid=str(ds.SeriesInstanceUID),
        pipeline="chest-xray",
        routes=("ct-chest",),
        destinations=("pacs",),
        state=state,
        attempts=1,
        created_at=created_at,
        result_dir=f"/data/results/{ds.StudyInstanceUID}",
        **extra,
    )


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    def job_counts() -> Counter[tuple[str, str]]:  # what the index counts for a node
        return Counter((j.pipeline, j.state.value) for j in node.jobs.values())

    metrics = Metrics(data_dir=tmp_path, job_counts=job_counts)
    index = StudyIndex(tmp_path / "index.sqlite3")
    ingest = Ingest(Spool(tmp_path), index, ae_title="RADNODE", min_free_bytes=0, metrics=metrics)
    first, second = with_phi(ct_small()), with_phi(ct_small())
    second.StudyInstanceUID = generate_uid()
    second.SeriesInstanceUID = generate_uid()
    second.SOPInstanceUID = generate_uid()
    more = with_phi(ct_small())
    more.SOPInstanceUID = generate_uid()
    for ds in (first, more, second):
        assert ingest.store(received(ds)) == StoreStatus.SUCCESS
    node = FakeNode(index)
    node.jobs = {
        "j-done": job(
            "j-done",
            first,
            JobState.DONE,
            1_700_000_000.0,
            started_at=1_700_000_010.0,
            finished_at=1_700_000_040.5,
            timings={"load_s": 1.5, "inference_s": 20.25},
        ),
        "j-failed": job(
            "j-failed", second, JobState.FAILED, 1_700_000_001.0, error="bundle raised RuntimeError"
        ),
        "j-running": job(
            "j-running", first, JobState.RUNNING, 1_700_000_002.0, started_at=1_700_000_020.0
        ),
    }
    node.jobs["j-no-hl7"] = job(
        "j-no-hl7", second, JobState.DONE, 1_700_000_003.0,
        error="ris: HL7 result not built: source instance has no PatientID (PID-3 is required)",
    )  # fmt: skip
    node.delivered = {
        "j-done": [
            DeliveryView("pacs", "dicom", "pending", 3, 1_700_000_300.0, "connection refused"),
            DeliveryView("ris", "hl7", "sent", 1, None, None),
        ]
    }
    node.letters = [
        DeadLetter("j-done", study_key(str(first.StudyInstanceUID)), "chest-xray", "pacs", 5,
                   "association rejected by PACS", 1_700_000_100.0)
    ]  # fmt: skip
    node.seen_workers = [
        WorkerView("gpu-1:4242", "cuda:0", {"chest-xray": "1.2.0"}, 1_700_000_000.0,
                   1_700_000_190.0, alive=True),
        WorkerView("gpu-2:77", "cuda:0", {}, 1_700_000_000.0, 1_700_000_050.0, alive=False),
    ]  # fmt: skip
    api = ApiServer(node, metrics, host="127.0.0.1", port=0, token=TOKEN)
    api.start()
    yield Stack(node, api, metrics, [first, second])
    api.stop()
    index.close()


def call(
    api: ApiServer, path: str, method: str = "GET", token: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    req = urllib.request.Request(api.url + path, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_json(api: ApiServer, path: str, **kw: Any) -> tuple[int, Any]:
    status, _headers, body = call(api, path, **kw)
    return status, json.loads(body)


def test_healthz_answers_alive(stack: Stack) -> None:
    status, body = get_json(stack.api, "/healthz")
    assert status == 200
    assert body["status"] == "alive"


def test_readyz_is_200_only_when_every_check_passes(stack: Stack) -> None:
    status, body = get_json(stack.api, "/readyz")
    assert (status, body["ready"], body["failed"]) == (200, True, [])
    stack.node.checks["disk"] = "12 MB free, below node.min_free_disk_mb (1024 MB)"
    stack.node.checks["scp_listening"] = False
    status, body = get_json(stack.api, "/readyz")
    assert status == 503
    assert body["ready"] is False
    assert body["failed"] == ["disk", "scp_listening"]
    assert body["checks"]["disk"] == {
        "ok": False,
        "detail": "12 MB free, below node.min_free_disk_mb (1024 MB)",
    }
    assert body["checks"]["queue"] == {"ok": True}


def test_readyz_stays_200_with_the_queue_down_and_lists_it_as_degraded(stack: Stack) -> None:
    """Review: with Redis down /readyz answered 503, so a Kubernetes readiness probe took
    the node out of service and the PACS stopped sending, although the node still
    receives and keeps everything while the queue is away."""
    stack.node.checks["queue"] = "the job queue cannot be read; check queue.url"
    status, body = get_json(stack.api, "/readyz")
    assert (status, body["ready"], body["failed"]) == (200, True, [])
    assert body["degraded"] == ["queue"]
    assert body["checks"]["queue"]["ok"] is False
    stack.node.checks["disk"] = "12 MB free"
    status, body = get_json(stack.api, "/readyz")
    assert (status, body["failed"], body["degraded"]) == (503, ["disk"], ["queue"])


def test_readyz_is_503_when_the_checks_themselves_raise(stack: Stack) -> None:
    def broken() -> dict[str, bool | str]:
        raise RuntimeError("queue database vanished")

    stack.node.readiness = broken  # type: ignore[method-assign]
    status, body = get_json(stack.api, "/readyz")
    assert status == 503
    assert body["failed"] == ["readiness"]


def test_disk_space_check_uses_the_receive_threshold(tmp_path: Path) -> None:
    assert disk_space_check(tmp_path, 0) is True
    verdict = disk_space_check(tmp_path, 2**62)
    assert isinstance(verdict, str) and "node.min_free_disk_mb" in verdict
    assert isinstance(disk_space_check(tmp_path / "missing", 0), str)


def test_a_full_disk_is_not_ready_even_with_no_threshold(tmp_path: Path, monkeypatch) -> None:
    """A full file system cannot be made here without root (a tmpfs mount), so the
    free-space reading is replaced: with ``min_free_disk_mb = 0`` a full disk read as
    ready while every C-STORE failed (failure pass)."""
    full = shutil.disk_usage(tmp_path)._replace(free=0)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: full)
    verdict = disk_space_check(tmp_path, 0)
    assert isinstance(verdict, str) and "full" in verdict


def test_studies_are_listed_by_key_with_counts(stack: Stack) -> None:
    status, body = get_json(stack.api, "/api/studies")
    assert status == 200
    by_key = {s["study_key"]: s for s in body["studies"]}
    first, second = stack.studies
    assert set(by_key) == {study_key(first.StudyInstanceUID), study_key(second.StudyInstanceUID)}
    first_view = by_key[study_key(first.StudyInstanceUID)]
    assert first_view["instance_count"] == 2
    assert first_view["series_count"] == 1
    assert first_view["state"] == "receiving"
    assert first_view["completed_at"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first_view["last_received_at"])
    assert "study_uid" not in first_view
    status, body = get_json(stack.api, "/api/studies?limit=1")
    assert len(body["studies"]) == 1


def test_jobs_show_state_timings_and_error(stack: Stack) -> None:
    status, body = get_json(stack.api, "/api/jobs")
    assert status == 200
    jobs = {j["job_id"]: j for j in body["jobs"]}
    assert set(jobs) == {"j-done", "j-failed", "j-running", "j-no-hl7"}
    done = jobs["j-done"]
    assert done["state"] == "done"
    assert done["wait_s"] == 10.0 and done["run_s"] == 30.5
    assert done["timings"] == {"load_s": 1.5, "inference_s": 20.25}
    assert done["series_key"] == study_key(stack.studies[0].SeriesInstanceUID)
    assert jobs["j-failed"]["error"] == "bundle raised RuntimeError"
    assert not {"study_uid", "series_uid", "result_dir"} & set(done)
    _, failed = get_json(stack.api, "/api/jobs?state=failed")
    assert [j["job_id"] for j in failed["jobs"]] == ["j-failed"]


def test_jobs_show_where_each_result_stands(stack: Stack) -> None:
    """A done job whose results wait for a PACS that is down, or whose HL7 result could
    not be built, said nothing of it in the API (acceptance run): its deliveries, their
    tries and last error are on the job now, and the reason a result was not made is
    its error."""
    jobs = {j["job_id"]: j for j in get_json(stack.api, "/api/jobs")[1]["jobs"]}
    pacs, ris = jobs["j-done"]["deliveries"]
    assert (pacs["destination"], pacs["state"], pacs["attempts"]) == ("pacs", "pending", 3)
    assert pacs["error"] == "connection refused" and pacs["next_attempt_at"].startswith("2023")
    assert (ris["state"], ris["next_attempt_at"], ris["error"]) == ("sent", None, None)
    assert jobs["j-running"]["deliveries"] == []
    assert "no PatientID" in jobs["j-no-hl7"]["error"]


@pytest.mark.parametrize(
    "query",
    ["/api/jobs?state=lost", "/api/jobs?limit=0", "/api/jobs?limit=x", "/api/studies?limit=9999"],
)
def test_bad_query_parameters_get_400_with_an_action(stack: Stack, query: str) -> None:
    status, body = get_json(stack.api, query)
    assert status == 400
    assert body["error"] and body["action"]


def test_dead_letters_are_listed(stack: Stack) -> None:
    status, body = get_json(stack.api, "/api/dead-letters")
    assert status == 200
    (letter,) = body["dead_letters"]
    assert letter["destination"] == "pacs" and letter["attempts"] == 5


def test_workers_are_listed_with_what_they_run_and_whether_alive(stack: Stack) -> None:
    status, body = get_json(stack.api, "/api/workers")
    assert status == 200 and body["alive"] == 1
    first, second = body["workers"]
    assert first["name"] == "gpu-1:4242" and first["alive"] is True
    assert first["pipelines"] == {"chest-xray": "1.2.0"} and first["device"] == "cuda:0"
    assert first["last_seen"].startswith("2023-11-14T22:16:30")
    assert second["alive"] is False


def test_no_patient_data_or_uid_in_any_response(stack: Stack) -> None:
    secrets = list(PHI)
    for ds in stack.studies:
        secrets += [str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)]
    bodies = []
    for route in ROUTES:
        if route.method == "GET":
            bodies.append(call(stack.api, route.template)[2].decode())
    bodies.append(call(stack.api, "/api/jobs/j-failed/retry", "POST", TOKEN)[2].decode())
    bodies.append(call(stack.api, "/api/jobs/j-failed/discard", "POST", TOKEN)[2].decode())
    bodies.append(call(stack.api, "/api/dead-letters/resend", "POST", TOKEN)[2].decode())
    assert len(bodies) == len(ROUTES)
    for body in bodies:
        for secret in secrets:
            assert secret not in body


def test_retry_needs_the_bearer_token(stack: Stack) -> None:
    status, headers, _ = call(stack.api, "/api/jobs/j-failed/retry", "POST")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    status, _, _ = call(stack.api, "/api/jobs/j-failed/retry", "POST", token="wrong")
    assert status == 403
    assert stack.node.jobs["j-failed"].state is JobState.FAILED  # nothing happened


def test_retry_answers_404_for_unknown_and_409_for_unretryable_jobs(stack: Stack) -> None:
    assert call(stack.api, "/api/jobs/nope/retry", "POST", TOKEN)[0] == 404
    assert call(stack.api, "/api/jobs/j-running/retry", "POST", TOKEN)[0] == 409
    status, body = get_json(stack.api, "/api/jobs/j-done/retry", method="POST", token=TOKEN)
    assert status == 409 and "retryable" in body["error"]


def test_retry_of_a_job_a_later_one_replaces_is_refused_with_what_to_do(stack: Stack) -> None:
    stack.node.superseded.add("j-failed")
    status, body = get_json(stack.api, "/api/jobs/j-failed/retry", method="POST", token=TOKEN)
    assert status == 409 and "later job" in body["error"]
    assert "latest job of the series" in body["action"]
    assert stack.node.jobs["j-failed"].state is JobState.FAILED


def test_retry_queues_a_failed_job_again(stack: Stack) -> None:
    status, body = get_json(stack.api, "/api/jobs/j-failed/retry", method="POST", token=TOKEN)
    assert status == 202
    assert body == {"job_id": "j-failed", "outcome": "retried"}
    _, jobs = get_json(stack.api, "/api/jobs?state=queued")
    assert [j["job_id"] for j in jobs["jobs"]] == ["j-failed"]


def test_without_a_configured_token_retry_is_refused(stack: Stack) -> None:
    api = ApiServer(stack.node, stack.metrics, port=0, token=None)
    api.start()
    try:
        status, body = get_json(api, "/api/jobs/j-failed/retry", method="POST", token="")
        assert status == 403
        assert "http.token" in body["action"]
    finally:
        api.stop()
    assert stack.node.jobs["j-failed"].state is JobState.FAILED


def test_unknown_paths_get_404_and_wrong_methods_405(stack: Stack) -> None:
    status, _, body = call(stack.api, "/api/patients")
    assert status == 404 and b"openapi.json" in body
    status, headers, _ = call(stack.api, "/api/jobs/j-failed/retry")
    assert status == 405 and headers["Allow"] == "POST"
    assert call(stack.api, "/healthz", "POST")[0] == 405
    # methods no endpoint takes: JSON too, not http.server's HTML 501 (acceptance pass)
    for method in ("DELETE", "PUT", "PATCH"):
        status, headers, body = call(stack.api, "/api/jobs", method, TOKEN)
        assert status == 405 and headers["Allow"] == "GET", method
        assert json.loads(body)["action"].startswith("use GET")


def test_an_unexpected_error_is_a_500_and_the_api_keeps_serving(stack: Stack) -> None:
    stack.node.fail_with = RuntimeError("boom")
    status, body = get_json(stack.api, "/api/studies")
    assert status == 500
    assert "api.unexpected_error" in body["action"]
    assert call(stack.api, "/healthz")[0] == 200


def test_metrics_are_prometheus_text_and_count_the_received_instances(stack: Stack) -> None:
    status, headers, body = call(stack.api, "/metrics")
    assert status == 200
    assert headers["Content-Type"] == stack.metrics.content_type
    assert headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    stored = [
        s.value
        for s in families["radnode_instances_received"].samples
        if s.name.endswith("_total") and s.labels == {"outcome": "stored"}
    ]
    assert stored == [3.0]
    assert "radnode_disk_free_bytes" in families


def test_openapi_document_describes_every_route(stack: Stack) -> None:
    status, doc = get_json(stack.api, "/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"] and doc["info"]["version"]
    documented = {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops}
    assert documented == {(r.method, r.template) for r in ROUTES}
    text = json.dumps(doc)
    for ref in re.findall(r'"\$ref": "#/components/schemas/(\w+)"', text):
        assert ref in doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert op["responses"], f"{path} documents no response"
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"\{(\w+)\}", path))


def test_a_taken_port_is_a_startup_error_naming_the_key(stack: Stack) -> None:
    other = ApiServer(stack.node, stack.metrics, host="127.0.0.1", port=stack.api.port)
    with pytest.raises(StartupError, match=r"http\.port"):
        other.start()


def test_status_view_fetches_and_renders_without_patient_data(stack: Stack) -> None:
    snapshot = fetch_status(stack.api.url, timeout=5)
    assert [j["job_id"] for j in snapshot.failed_jobs] == ["j-failed"]
    console = Console(record=True, width=220, color_system=None)
    console.print(render_snapshot(snapshot, now=1_700_000_200.0))
    screen = console.export_text()
    assert "Jobs by state" in screen and "Recent studies" in screen
    assert "Node: ready" in screen  # /readyz, read with the rest
    assert "Workers (1 alive)" in screen and "gpu-1:4242" in screen and "silent" in screen
    assert study_key(stack.studies[1].StudyInstanceUID) in screen
    assert "bundle raised RuntimeError" in screen
    assert "association rejected by PACS" in screen
    assert "Results not delivered yet" in screen
    assert "retrying" in screen and "connection refused" in screen
    assert "not sent" in screen and "no PatientID" in screen
    (row,) = [line for line in screen.splitlines() if "not sent" in line]
    assert "│ ris " in row and "HL7 result not built" in row  # its destination, its reason
    for secret in (*PHI, str(stack.studies[0].StudyInstanceUID)):
        assert secret not in screen


def test_a_refusal_a_later_job_made_good_says_so_in_the_api_and_the_status_view(
    stack: Stack,
) -> None:
    _, body = get_json(stack.api, "/api/jobs")
    assert {j["job_id"]: j["resolved_by"] for j in body["jobs"]}["j-failed"] is None
    stack.node.resolved["j-failed"] = "j-done"
    _, body = get_json(stack.api, "/api/jobs?state=failed")
    assert [(j["job_id"], j["resolved_by"]) for j in body["jobs"]] == [("j-failed", "j-done")]
    console = Console(record=True, width=220, color_system=None)
    console.print(render_snapshot(fetch_status(stack.api.url, timeout=5), now=1_700_000_200.0))
    (row,) = [line for line in console.export_text().splitlines() if "│ j-failed " in line]
    assert "resolved: job j-done made the result. bundle raised RuntimeError" in row


def test_status_view_counts_every_job_the_node_holds_not_the_last_few(stack: Stack) -> None:
    """The queue table counted the last 20 jobs and disagreed with /metrics (acceptance
    pass: done 14 against 17): it counts what ``radnode_jobs`` counts."""
    snapshot = fetch_status(stack.api.url, timeout=5, limit=1)
    assert len(snapshot.jobs) == 1
    _, _, body = call(stack.api, "/metrics")
    families = text_string_to_metric_families(body.decode())
    (family,) = [f for f in families if f.name == "radnode_jobs"]
    expected = {(s.labels["pipeline"], s.labels["state"]): int(s.value) for s in family.samples}
    assert snapshot.job_counts == expected and sum(expected.values()) > 1
    console = Console(record=True, width=220, color_system=None)
    console.print(render_snapshot(snapshot, now=1_700_000_200.0))
    assert "Jobs by state (all the node holds)" in console.export_text()


def test_status_view_measures_ages_on_the_nodes_clock(stack: Stack) -> None:
    """From a workstation whose clock is off, every age and the "waiting" rows were
    wrong (review): ages are taken from the node's clock (the API's Date header)."""
    import time

    snapshot = fetch_status(stack.api.url, timeout=5)
    assert snapshot.node_time is not None and abs(snapshot.node_time - time.time()) < 5
    # the node's clock three days after the dead letter (1_700_000_100), this one's 2026
    console = Console(record=True, width=220, color_system=None)
    console.print(render_snapshot(replace(snapshot, node_time=1_700_000_100.0 + 3 * 86400)))
    assert "3d ago" in console.export_text()


def test_status_view_says_what_to_check_when_the_node_is_down() -> None:
    with pytest.raises(StatusUnavailable, match="radnode serve"):
        fetch_status(f"http://127.0.0.1:{free_port()}", timeout=2)


@pytest.mark.parametrize("url", ["nonsense", "127.0.0.1:8080"])
def test_status_view_asks_for_an_http_address(url: str) -> None:
    """A traceback for "nonsense", "is radnode serve running" for a missing scheme
    (acceptance pass)."""
    with pytest.raises(StatusUnavailable, match=r"not an HTTP address.*http://HOST:PORT"):
        fetch_status(url, timeout=2)


def test_the_api_token_never_reaches_the_log(radnode_factory) -> None:
    secret = "tok-7f3a9c-never-log-me"
    node = radnode_factory(RADNODE_HTTP__TOKEN=secret).start()
    node.wait_for_event("api.listening")
    url = f"http://127.0.0.1:{node.http_port}/api/jobs/no-such-job/retry"
    for token in (secret, secret + "-wrong"):
        request = urllib.request.Request(
            url, method="POST", headers={"Authorization": f"Bearer {token}"}
        )
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=10)
        assert answer.value.code in (403, 404)
    node.stop()
    assert node.lines and not [line for line in node.lines if secret in line]


def test_status_view_shows_a_degraded_queue_and_a_failing_check(stack: Stack) -> None:
    """Acceptance pass: `radnode status` showed nothing wrong through a Redis outage."""
    stack.node.checks["queue"] = "the job queue cannot be read; check queue.url"
    stack.node.checks["disk"] = "12 MB free, below node.min_free_disk_mb (1024 MB)"
    console = Console(record=True, width=200, color_system=None)
    console.print(render_snapshot(fetch_status(stack.api.url, timeout=5)))
    screen = console.export_text()
    assert "Node: NOT READY (degraded: queue)" in screen
    (queue,) = [line for line in screen.splitlines() if "│ queue" in line]
    assert "degraded" in queue and "check queue.url" in queue
    (disk,) = [line for line in screen.splitlines() if "│ disk" in line]
    assert "failing" in disk


def test_status_view_keeps_job_ids_whole_on_a_narrow_terminal(stack: Stack) -> None:
    """Piped or at 80 columns a job id wrapped ("efd0f23e6" / "160") and could not be
    copied into the retry URL (acceptance pass)."""
    long_id = "efd0f23e6160"
    failed = {"job_id": long_id, "study_key": "0123456789abcdef", "pipeline": "p" * 30,
              "state": "failed", "attempts": 3, "error": "x " * 200}  # fmt: skip
    console = Console(record=True, width=80, color_system=None)
    console.print(render_status([], [failed], now=1_700_000_200.0))
    screen = console.export_text()
    assert long_id in screen
    assert "0123456789abcdef" in screen


def test_status_view_marks_a_study_that_lost_an_instance_in_transit() -> None:
    """Review: its results are preliminary until the PACS sends the instance again, which
    the operator arranges; the screen showed such a study as any complete one."""
    studies = [
        {"study_key": f"{n:016x}", "state": "complete", "instance_lost": lost}
        for n, lost in ((1, True), (2, False))
    ]
    console = Console(record=True, width=120, color_system=None)
    console.print(render_status(studies, [], now=1_700_000_200.0))
    rows = {line.split("│")[1].strip(): line for line in console.export_text().splitlines()
            if line.startswith("│") and "complete" in line}  # fmt: skip
    assert "instance lost" in rows[f"{1:016x}"]
    assert "instance lost" not in rows[f"{2:016x}"]


def test_status_view_shows_results_waiting_behind_a_retrying_one() -> None:
    """Acceptance pass: a radiograph's results waited, untried, behind a CT's delivery
    being retried, and the status screen listed only the CT. A delivery just made is
    not listed (it goes out within the second)."""
    now = 1_700_000_200.0

    def job(job_id: str, attempts: int, due_s_ago: float) -> dict:
        due = datetime.fromtimestamp(now - due_s_ago, tz=UTC).isoformat()
        error = "association aborted" if attempts else None
        delivery = {"destination": "pacs", "state": "pending", "attempts": attempts,
                    "next_attempt_at": due, "error": error}  # fmt: skip
        return {"job_id": job_id, "study_key": "0123456789abcdef", "pipeline": "p",
                "state": "done", "deliveries": [delivery]}  # fmt: skip

    jobs = [job("ct0000000001", 2, 10), job("cxr000000001", 0, 120), job("new000000001", 0, 1)]
    console = Console(record=True, width=200, color_system=None)
    console.print(render_status([], jobs, now=now))
    rows = {line.split("│")[1].strip(): line for line in console.export_text().splitlines()
            if line.startswith("│") and "pacs" in line}  # fmt: skip
    assert "retrying" in rows["ct0000000001"]
    assert "waiting" in rows["cxr000000001"] and "behind an earlier" in rows["cxr000000001"]
    assert "new000000001" not in rows


def test_an_operator_can_give_up_a_jobs_dead_letters_for_good(
    radnode_factory, tmp_path: Path
) -> None:
    """A dead letter for a destination that no longer exists can never be resent, and it
    kept its study (patient data) past study.keep_days (acceptance pass). Discarding it
    needs the token, says which destinations lose the result, and drops it everywhere."""
    from service.testing import write_ct_series
    from tests.conftest import storescu
    from tests.support.bundles import write_threshold_bundle

    write_threshold_bundle(tmp_path / "models")
    secret = "discard-token"
    node = radnode_factory(
        RADNODE_HTTP__TOKEN=secret,
        RADNODE_MODELS__DIR=str(tmp_path / "models"),
        RADNODE_STUDY__COMPLETION_TIMEOUT_S="1",
        RADNODE_ROUTES=json.dumps([{"name": "bone", "pipeline": "bone_threshold",
                                    "match": {"Modality": "CT"}, "destinations": ["pacs"]}]),
        RADNODE_DESTINATIONS=json.dumps([{"name": "pacs", "type": "dicom",
                                          "host": "127.0.0.1", "port": free_port(),
                                          "ae_title": "GONE", "max_attempts": 1}]),
    ).start()  # fmt: skip
    files = write_ct_series(tmp_path / "ct", slices=8, rows=16, columns=16)
    assert storescu(node.port, files).returncode == 0
    (dead,) = node.wait_for_event("dicom.dead_letter", timeout=120)
    base = f"http://127.0.0.1:{node.http_port}"

    def post(job: str, token: str | None = secret) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(
            f"{base}/api/jobs/{job}/discard", method="POST", headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as refused:
            return refused.code, json.loads(refused.read())

    assert post(dead["job"], token=None)[0] == 401
    assert post("no-such-job")[0] == 404
    assert post(dead["job"]) == (200, {"job_id": dead["job"], "discarded": ["pacs"]})
    assert post(dead["job"])[0] == 409  # nothing left to discard
    with urllib.request.urlopen(f"{base}/api/dead-letters", timeout=10) as answer:
        assert json.loads(answer.read())["dead_letters"] == []
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as answer:
        assert 'radnode_dead_letters_open{destination="pacs"} 0.0' in answer.read().decode()
    (said,) = node.wait_for_event("delivery.discarded")
    assert (said["job"], said["destination"]) == (dead["job"], "pacs")


def test_an_operator_resends_every_dead_letter_of_a_destination_at_once(
    radnode_factory, tmp_path: Path
) -> None:
    """Acceptance pass: after a PACS outage longer than the retries, every result was a
    dead letter and had to be resent job by job. One call resends them all, oldest
    first; the PACS (DCMTK storescp, started once they are dead) gets every result."""
    import subprocess

    from service.testing import write_ct_series
    from tests.conftest import dcmtk_env, require_tool, storescu, wait_for_port
    from tests.support.bundles import write_threshold_bundle

    write_threshold_bundle(tmp_path / "models")
    secret = "resend-token"
    pacs_port = free_port()
    node = radnode_factory(
        RADNODE_HTTP__TOKEN=secret,
        RADNODE_MODELS__DIR=str(tmp_path / "models"),
        RADNODE_STUDY__COMPLETION_TIMEOUT_S="1",
        RADNODE_ROUTES=json.dumps([{"name": "bone", "pipeline": "bone_threshold",
                                    "match": {"Modality": "CT"}, "destinations": ["pacs"]}]),
        RADNODE_DESTINATIONS=json.dumps([{"name": "pacs", "type": "dicom",
                                          "host": "127.0.0.1", "port": pacs_port,
                                          "ae_title": "PACS", "max_attempts": 1}]),
    ).start()  # fmt: skip
    for n in range(2):
        files = write_ct_series(tmp_path / f"ct{n}", slices=8, rows=16, columns=16, seed=n)
        assert storescu(node.port, files).returncode == 0
    dead = node.wait_for_event("dicom.dead_letter", timeout=120, count=2)
    received = tmp_path / "pacs"
    received.mkdir()
    pacs = subprocess.Popen(
        [require_tool("storescp"), "-aet", "PACS", "-od", str(received), str(pacs_port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(pacs_port, proc=pacs)
        url = f"http://127.0.0.1:{node.http_port}/api/dead-letters/resend?destination=pacs"
        refused = urllib.request.Request(url, method="POST")
        with pytest.raises(urllib.error.HTTPError) as no_token:
            urllib.request.urlopen(refused, timeout=10)
        assert no_token.value.code == 401
        typo = urllib.request.Request(
            url.replace("=pacs", "=pcas"),
            method="POST",
            headers={"Authorization": f"Bearer {secret}"},
        )
        with pytest.raises(urllib.error.HTTPError) as unknown:
            urllib.request.urlopen(typo, timeout=10)
        assert unknown.value.code == 404  # a typo is not "nothing to resend"
        request = urllib.request.Request(
            url, method="POST", headers={"Authorization": f"Bearer {secret}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 202
            body = json.loads(answer.read())
        assert body["resent"] == [d["job"] for d in dead] and body["superseded"] == []
        sent = node.wait_for_event("dicom.sent", timeout=60, count=2)
        assert [e["job"] for e in sent] == body["resent"]  # in the order they were made
        assert len(list(received.iterdir())) >= 2
    finally:
        pacs.kill()
        pacs.wait(timeout=10)
