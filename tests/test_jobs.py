"""From a complete study to finished jobs, through the real node, queue and worker.

``radnode serve`` runs as a child process with routes in its environment, bundles that
the tests write (seeded weights: the geometry, not the quality, is under test here),
and one local worker process. Studies arrive by DCMTK storescu.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread

from service.testing import write_ct_series, write_radiograph
from tests.conftest import dcmtk_env, require_tool, storescu
from tests.support.bundles import (
    write_classifier_bundle,
    write_threshold_bundle,
    write_zoo_spleen_bundle,
)

pytestmark = pytest.mark.integration

ROUTES = [
    {"name": "ct-bone", "pipeline": "bone_threshold", "match": {"Modality": "CT"}},
    {"name": "ct-spleen", "pipeline": "spleen_ct_segmentation",
     "match": {"Modality": "CT", "InstanceCount": {"min": 100}}},
    {"name": "cxr", "pipeline": "cxr_test_classifier", "match": {"Modality": ["DX", "CR"]}},
]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_threshold_bundle(root)
    write_zoo_spleen_bundle(root)
    write_classifier_bundle(root)
    return root


def node_env(models: Path) -> dict[str, str]:
    return {"RADNODE_MODELS__DIR": str(models), "RADNODE_ROUTES": json.dumps(ROUTES)}


def jobs_table(data_dir: Path) -> list[tuple]:
    with sqlite3.connect(data_dir / "index.sqlite3") as db:
        return db.execute(
            "SELECT pipeline, state, attempts, result_dir, error FROM jobs ORDER BY pipeline"
        ).fetchall()


def echo(port: int) -> bool:
    result = subprocess.run(
        [require_tool("echoscu"), "-aec", "RADNODE", "127.0.0.1", str(port)],
        env=dcmtk_env(), capture_output=True, timeout=30,
    )  # fmt: skip
    return result.returncode == 0


def test_complete_study_runs_the_routed_pipelines(
    radnode_factory, models: Path, tmp_path: Path
) -> None:
    node = radnode_factory(**node_env(models)).start()
    ct = write_ct_series(tmp_path / "ct", slices=30, rows=96, columns=96,
                         pixel_spacing=(3.0, 3.0), slice_thickness=3.0)  # fmt: skip
    cxr = write_radiograph(tmp_path / "cxr" / "cxr.dcm", rows=600, columns=500)
    assert storescu(node.port, [*ct, cxr]).returncode == 0
    finished = node.wait_for_event("job.recorded", count=2, timeout=120)
    assert {e["pipeline"] for e in finished} == {"bone_threshold", "cxr_test_classifier"}
    assert all(e["state"] == "done" for e in finished), finished
    assert {e["worker"] for e in finished} == {e["worker"] for e in node.events("job.started")}
    queued = node.events("job.queued")
    assert len(queued) == 2  # the 30-slice series is too short for ct-spleen
    rows = jobs_table(node.data_dir)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("bone_threshold", "done", 1),
        ("cxr_test_classifier", "done", 1),
    ]
    for _pipeline, _state, _attempts, result_dir, _error in rows:
        summary = json.loads((Path(result_dir) / "result.json").read_text())
        assert summary["not_for_diagnostic_use"] is True
    bone = json.loads((Path(rows[0][3]) / "result.json").read_text())
    assert bone["segments"][0]["label"] == "bone" and bone["segments"][0]["volume_ml"] > 0
    # the status API shows the jobs with their timings, and the node is ready
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/api/jobs") as response:
        api_jobs = json.loads(response.read())["jobs"]
    assert sorted(j["state"] for j in api_jobs) == ["done", "done"]
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/readyz") as response:
        assert response.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics") as response:
        metrics = response.read().decode()
    assert 'radnode_jobs{pipeline="bone_threshold",state="done"} 1.0' in metrics
    # no patient data in any log line
    log_text = "\n".join(node.lines)
    assert "PHANTOM" not in log_text and "RADNODE-PHANTOM" not in log_text


def test_scp_answers_while_a_model_runs_and_unfinished_jobs_survive_a_crash(
    radnode_factory, models: Path, tmp_path: Path
) -> None:
    env = node_env(models)
    node = radnode_factory(**env).start()
    ct = write_ct_series(tmp_path / "ct", slices=120, rows=160, columns=160,
                         pixel_spacing=(2.0, 2.0), slice_thickness=2.0)  # fmt: skip
    assert storescu(node.port, ct).returncode == 0
    node.wait_for_event("job.queued", count=2, timeout=60)
    started = node.wait_for_event("job.started", timeout=60)
    assert echo(node.port), "C-ECHO must be answered while a model runs"
    # SIGKILL the node (its worker dies with it) while jobs are unfinished
    node.kill()
    before = {r[0]: r[1] for r in jobs_table(node.data_dir)}
    assert any(state in ("queued", "running") for state in before.values()), before
    restarted = radnode_factory(**env).start()
    requeued = restarted.wait_for_event("jobs.requeued", timeout=30)
    assert requeued[0]["jobs"]
    restarted.wait_for_event("job.recorded", count=2, timeout=240)
    rows = jobs_table(restarted.data_dir)
    assert {r[0]: r[1] for r in rows} == {
        "bone_threshold": "done",
        "spleen_ct_segmentation": "done",
    }
    assert max(r[2] for r in rows) >= 1
    assert started  # the job had started before the crash


def test_result_reaches_the_ris_as_a_strict_oru_over_mllp(
    radnode_factory, models: Path, tmp_path: Path, listener_factory
) -> None:
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    ris = listener_factory("AE", "AA", error_text="busy")  # one refusal, then accepted
    routes = [{"name": "cxr", "pipeline": "cxr_test_classifier",
               "match": {"Modality": "DX"}, "destinations": ["ris"]}]  # fmt: skip
    destinations = [{"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": ris.port,
                     "backoff_s": 0.2, "receiving_application": "RIS"}]  # fmt: skip
    node = radnode_factory(
        RADNODE_MODELS__DIR=str(models),
        RADNODE_ROUTES=json.dumps(routes),
        RADNODE_DESTINATIONS=json.dumps(destinations),
    ).start()
    cxr = write_radiograph(tmp_path / "cxr.dcm", rows=400, columns=400,
                           patient_name="O'BRIEN^ANNE^&CO", accession_number="ACC-77")  # fmt: skip
    assert storescu(node.port, [cxr]).returncode == 0
    node.wait_for_event("hl7.sent", timeout=120)
    assert len(ris.received) == 2  # AE, then the same message again, accepted
    assert ris.received[0] == ris.received[1]
    message = parse_message(ris.received[1], validation_level=VALIDATION_LEVEL.STRICT)
    message.validate()
    text = ris.received[1]
    assert "O'BRIEN^ANNE^\\T\\CO" in text and "ACC-77" in text
    assert "Pulmonary nodule" in text
    probabilities = [o for o in text.split("\r") if o.startswith("OBX|") and "|NM|" in o]
    assert len(probabilities) == 1 and "|%^percent^UCUM|" in probabilities[0]
    assert 0.0 <= float(probabilities[0].split("|")[5]) <= 100.0
    assert "O'BRIEN" not in "\n".join(node.lines)


def test_a_result_the_ris_cannot_take_is_the_jobs_error_not_only_a_log_line(
    radnode_factory, models: Path, tmp_path: Path, listener_factory
) -> None:
    """A radiograph with an empty Patient ID: PID-3 is required, so no ORU^R01 can be
    built. The acceptance run found the job "done" with no error and no delivery: the
    RIS never got the result and nothing but a log line said so. The reason is now the
    job's error in /api/jobs (and so in ``radnode status``)."""
    ris = listener_factory("AA")
    routes = [{"name": "cxr", "pipeline": "cxr_test_classifier",
               "match": {"Modality": "DX"}, "destinations": ["ris"]}]  # fmt: skip
    destinations = [{"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": ris.port}]
    node = radnode_factory(
        RADNODE_MODELS__DIR=str(models),
        RADNODE_ROUTES=json.dumps(routes),
        RADNODE_DESTINATIONS=json.dumps(destinations),
    ).start()
    cxr = write_radiograph(tmp_path / "cxr.dcm", rows=256, columns=256, patient_id="")
    assert storescu(node.port, [cxr]).returncode == 0
    node.wait_for_event("job.recorded", timeout=120)
    url = f"http://127.0.0.1:{node.http_port}/api/jobs"
    with urllib.request.urlopen(url, timeout=10) as answer:
        (job,) = json.loads(answer.read())["jobs"]
    assert job["state"] == "done" and job["deliveries"] == []
    assert job["error"].startswith("ris: HL7 result not built") and "PatientID" in job["error"]
    assert ris.received == []


def test_a_done_job_whose_hl7_result_was_not_built_is_retried_once_the_settings_are_fixed(
    radnode_factory, models: Path, tmp_path: Path, listener_factory
) -> None:
    """An issuer of patient IDs longer than HL7 takes (not an OID): the ORU cannot be
    built and the job is done with that error, which says to set ``issuers =
    "leave_out"``. Acceptance pass: with that set, the retry was answered 409 (the job
    was done), so the RIS could never get the result. The retry now runs it again and the
    RIS gets it, once."""
    import pydicom

    ris = listener_factory("AA")
    token = "retry-token"
    routes = [{"name": "cxr", "pipeline": "cxr_test_classifier",
               "match": {"Modality": "DX"}, "destinations": ["ris"]}]  # fmt: skip

    def node_with(**ris_settings: str):
        destination = {"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": ris.port}
        return radnode_factory(
            RADNODE_MODELS__DIR=str(models),
            RADNODE_HTTP__TOKEN=token,
            RADNODE_ROUTES=json.dumps(routes),
            RADNODE_DESTINATIONS=json.dumps([{**destination, **ris_settings}]),
        ).start()

    def retry(node, job_id: str) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{node.http_port}/api/jobs/{job_id}/retry",
            method="POST", headers={"Authorization": f"Bearer {token}"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as refused:
            return refused.code

    node = node_with()
    cxr = write_radiograph(tmp_path / "cxr.dcm", rows=256, columns=256)
    ds = pydicom.dcmread(cxr)
    ds.IssuerOfPatientID = "Municipal Hospital of the Northern District"
    ds.save_as(cxr)
    assert storescu(node.port, [cxr]).returncode == 0
    node.wait_for_event("job.recorded", timeout=120)
    url = f"http://127.0.0.1:{node.http_port}/api/jobs"
    with urllib.request.urlopen(url, timeout=10) as answer:
        (job,) = json.loads(answer.read())["jobs"]
    assert job["state"] == "done" and "leave_out" in job["error"]
    node.stop()

    node = node_with(issuers="leave_out")
    assert retry(node, job["job_id"]) == 202
    node.wait_for_event("hl7.sent", timeout=120)
    jobs = f"http://127.0.0.1:{node.http_port}/api/jobs"
    with urllib.request.urlopen(jobs, timeout=10) as answer:
        (again,) = json.loads(answer.read())["jobs"]
    assert again["state"] == "done" and not again["error"]
    (message,) = ris.received
    assert "Municipal" not in message
    assert retry(node, job["job_id"]) == 409  # a result for every destination now


def test_results_reach_the_pacs_in_the_source_study(
    radnode_factory, models: Path, tmp_path: Path, orthanc
) -> None:
    from tests.support.orthanc import orthanc_get

    routes = [{"name": "ct", "pipeline": "bone_threshold", "match": {"Modality": "CT"},
               "destinations": ["pacs"]}]  # fmt: skip
    destinations = [{"name": "pacs", "type": "dicom", "host": "127.0.0.1",
                     "port": orthanc["port"], "ae_title": "ORTHANC", "backoff_s": 0.2}]  # fmt: skip
    node = radnode_factory(
        RADNODE_MODELS__DIR=str(models),
        RADNODE_ROUTES=json.dumps(routes),
        RADNODE_DESTINATIONS=json.dumps(destinations),
    ).start()
    ct = write_ct_series(tmp_path / "ct", slices=30, rows=96, columns=96,
                         pixel_spacing=(3.0, 3.0), slice_thickness=3.0)  # fmt: skip
    assert storescu(node.port, ct).returncode == 0
    node.wait_for_event("dicom.sent", timeout=120)
    study_uid = str(dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    (study,) = [s for s in orthanc_get(orthanc["http"], "/studies?expand")
                if s["MainDicomTags"]["StudyInstanceUID"] == study_uid]  # fmt: skip
    modalities = sorted(
        orthanc_get(orthanc["http"], f"/series/{series}")["MainDicomTags"]["Modality"]
        for series in study["Series"]
    )
    assert modalities == ["OT", "SEG", "SR"]  # the results only: the CT went to radnode
    # a PACS that auto-routes everything sends radnode its own results back: no new job
    results = sorted((node.data_dir / "results").glob("*/dicom/*.dcm"))
    assert len(results) == 3
    assert storescu(node.port, results, "-R").returncode == 0
    node.wait_for_event("study.complete", count=2, timeout=60)
    time.sleep(1.0)  # give the dispatcher a chance to (wrongly) queue something
    assert len(node.events("job.queued")) == 1


def test_phi_sentinels_appear_in_no_log_line_and_no_api_response(
    radnode_factory, models: Path, tmp_path: Path, orthanc, listener_factory
) -> None:
    """Issue 5's check: a study with sentinel patient data goes through the whole node
    (receive, routing, a job, SEG/SR/SC to the PACS, ORU^R01 to the RIS); the sentinels
    must reach the PACS and the RIS, and nowhere else."""
    sentinels = ("PHI^SENTINEL", "PHI-ID-0001", "PHI-ACC-0001")
    ris = listener_factory("AA")
    routes = [{"name": "ct", "pipeline": "bone_threshold", "match": {"Modality": "CT"},
               "destinations": ["pacs", "ris"]}]  # fmt: skip
    destinations = [
        {"name": "pacs", "type": "dicom", "host": "127.0.0.1", "port": orthanc["port"],
         "ae_title": "ORTHANC", "backoff_s": 0.2},
        {"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": ris.port, "backoff_s": 0.2},
    ]  # fmt: skip
    node = radnode_factory(
        RADNODE_MODELS__DIR=str(models),
        RADNODE_ROUTES=json.dumps(routes),
        RADNODE_DESTINATIONS=json.dumps(destinations),
        RADNODE_LOG__LEVEL="debug",  # the most verbose logging must not leak either
    ).start()
    ct = write_ct_series(tmp_path / "ct", slices=30, rows=96, columns=96,
                         pixel_spacing=(3.0, 3.0), slice_thickness=3.0,
                         patient_name=sentinels[0], patient_id=sentinels[1],
                         accession_number=sentinels[2])  # fmt: skip
    assert storescu(node.port, ct).returncode == 0
    node.wait_for_event("dicom.sent", timeout=120)
    node.wait_for_event("hl7.sent", timeout=60)

    base = f"http://127.0.0.1:{node.http_port}"
    answers = []
    for path in ("/healthz", "/readyz", "/metrics", "/api/studies", "/api/jobs",
                 "/api/dead-letters", "/openapi.json"):  # fmt: skip
        try:
            with urllib.request.urlopen(base + path, timeout=10) as response:
                answers.append(response.read().decode())
        except urllib.error.HTTPError as error:  # a route that answers 4xx still answers
            answers.append(error.read().decode())
    status = subprocess.run(
        [str(Path(sys.executable).with_name("radnode")), "status", "--url", base],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    node.stop()
    seen = "\n".join([*node.lines, *answers, status.stdout, status.stderr])
    assert [s for s in sentinels if s in seen] == []
    assert sentinels[1] in ris.received[0]  # the RIS does get them: that is its job
    # nor a UID a PACS user could find the patient by: the source's, or the results'
    # (the result SR's SOP Instance UID named DICOM deliveries in clear: acceptance pass)
    headers = [dcmread(path, stop_before_pixels=True) for path in ct]
    headers += [dcmread(path, stop_before_pixels=True)
                for path in (node.data_dir / "results").glob("*/dicom/*.dcm")]  # fmt: skip
    assert len(headers) > len(ct)
    uids = {str(h[keyword].value) for h in headers
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}  # fmt: skip
    logged = "\n".join(node.lines)
    assert [uid for uid in uids if uid in logged] == []


def test_a_node_without_any_pipeline_says_so_once_at_start(radnode_factory, tmp_path) -> None:
    """models.dir missing: the node receives and completes studies and never runs a
    job; it used to say so only as a pipeline.unusable line naming the folder (third
    acceptance pass)."""
    node = radnode_factory(RADNODE_MODELS__DIR=str(tmp_path / "no-models-here")).start()
    (line,) = node.wait_for_event("pipelines.none", timeout=60)[-1:]
    assert line["level"] == "error" and line["models_dir"].endswith("no-models-here")
    assert "install MONAI bundles" in line["action"]
