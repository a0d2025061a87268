"""Orthanc as the PACS, both ways: it auto-routes a study to radnode, gets the results back.

The study is uploaded to a real Orthanc, which is asked over its REST API to send it to
radnode (as a PACS's auto-routing rule would). radnode runs a segmentation (the
threshold test bundle: SEG, SR, Secondary Capture) and the shipped low-dose CT
reconstruction (a derived CT series, SR) and sends everything back, for a series of
single-frame images and for the same series as one Enhanced CT instance. What arrived is
read back through Orthanc's REST API. A second test keeps the PACS down while results
are ready, then starts it: everything arrives, once.
"""

from __future__ import annotations

import io
import json
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

import hl7 as python_hl7
import pytest
from pydicom import dcmread

from service.publish import OUTBOX_FILE
from service.testing import make_enhanced_ct, write_ct_series
from tests.conftest import free_port, storescu
from tests.support.bundles import write_threshold_bundle
from tests.support.cut_sender import send_then_cut
from tests.support.mllp import MllpListener
from tests.support.orthanc import orthanc_get, running_orthanc
from tests.support.outbox import delivery_states

pytestmark = pytest.mark.integration

REPO_MODELS = Path(__file__).resolve().parents[1] / "models"
STUDY_UID = "1.2.826.0.1.3680043.8.498.4242"


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_threshold_bundle(root)
    (root / "ct_lowdose_denoising").symlink_to(REPO_MODELS / "ct_lowdose_denoising")
    return root


def wait_all_sent(node, expected_jobs: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not (
        len(node.events("job.recorded")) >= expected_jobs
        and set(delivery_states(node.data_dir)) == {"sent"}
    ):
        assert time.monotonic() < deadline, "\n".join(node.lines[-15:])
        time.sleep(0.2)


def post(base: str, path: str, body: bytes) -> bytes:
    request = urllib.request.Request(base + path, data=body, method="POST")
    with urllib.request.urlopen(request, timeout=120) as answer:
        return answer.read()


def route_to_radnode(pacs: dict, study_id: str, node, orthanc_dir: Path) -> None:
    """Orthanc's REST call that sends the study to radnode (what an auto-routing rule
    does). On failure, say what both sides logged: a CI run once got HTTP 500 here."""
    try:
        post(pacs["http"], "/modalities/radnode/store", study_id.encode())
    except urllib.error.HTTPError as exc:
        orthanc_log = (orthanc_dir / "orthanc.log").read_text(errors="replace")[-3000:]
        pytest.fail(
            f"Orthanc could not send the study to radnode (HTTP {exc.code}):\n"
            f"{exc.read().decode(errors='replace')[:1000]}\n--- Orthanc log ---\n"
            f"{orthanc_log}\n--- radnode log ---\n" + "\n".join(node.lines[-30:])
        )


def series_in_orthanc(http: str) -> dict[str, list[dict]]:
    """Modality -> [{"uid", "description", "instances": [tags...]}] of the test study."""
    (study,) = [s for s in orthanc_get(http, "/studies?expand")
                if s["MainDicomTags"]["StudyInstanceUID"] == STUDY_UID]  # fmt: skip
    found: dict[str, list[dict]] = {}
    for series_id in study["Series"]:
        info = orthanc_get(http, f"/series/{series_id}")
        tags = info["MainDicomTags"]
        found.setdefault(tags["Modality"], []).append({
            "uid": tags["SeriesInstanceUID"],
            "description": tags.get("SeriesDescription", ""),
            "instances": info["Instances"],
        })  # fmt: skip
    return found


def routes(*pipelines: str) -> str:
    return json.dumps([
        {"name": p, "pipeline": p, "match": {"Modality": "CT"}, "destinations": ["pacs"]}
        for p in pipelines
    ])  # fmt: skip


@pytest.mark.parametrize("form", ["single-frame", "enhanced"])
def test_orthanc_auto_routes_a_study_and_gets_every_result_back(
    radnode_factory, models: Path, tmp_path: Path, form: str
) -> None:
    """``enhanced``: the same series as one Legacy Converted Enhanced CT instance, as a
    scanner that sends multi-frame images would; its derived image is one instance."""
    node = radnode_factory(RADNODE_MODELS__DIR=str(models))  # not started: its port is known
    modalities = {"radnode": ["RADNODE", "127.0.0.1", node.port]}
    (tmp_path / "orthanc").mkdir()
    with running_orthanc(tmp_path / "orthanc", modalities=modalities) as pacs:
        node.extra_env.update(
            RADNODE_ROUTES=routes("bone_threshold", "ct_lowdose_denoising"),
            RADNODE_DESTINATIONS=json.dumps(
                [
                    {
                        "name": "pacs",
                        "type": "dicom",
                        "host": "127.0.0.1",
                        "port": pacs["port"],
                        "ae_title": "ORTHANC",
                        "backoff_s": 0.2,
                    }
                ]
            ),
        )
        node.start()
        ct = write_ct_series(tmp_path / "ct", slices=30, rows=96, columns=96, study_uid=STUDY_UID,
                             pixel_spacing=(3.0, 3.0), slice_thickness=3.0)  # fmt: skip
        if form == "enhanced":
            enhanced = make_enhanced_ct([dcmread(p) for p in ct])
            ct = [tmp_path / "enhanced.dcm"]
            enhanced.save_as(ct[0], enforce_file_format=True)
        for path in ct:
            post(pacs["http"], "/instances", path.read_bytes())
        (study_id,) = orthanc_get(pacs["http"], "/studies")
        route_to_radnode(pacs, study_id, node, tmp_path / "orthanc")  # auto-routing

        wait_all_sent(node, expected_jobs=2)
        found = series_in_orthanc(pacs["http"])
        source_uid = str(dcmread(ct[0], stop_before_pixels=True).SeriesInstanceUID)
        ct_series = {s["uid"]: s for s in found["CT"]}
        assert source_uid in ct_series and len(ct_series) == 2  # source + derived
        (derived,) = [s for uid, s in ct_series.items() if uid != source_uid]
        assert len(derived["instances"]) == len(ct)  # one derived image per source instance
        assert len(found["SEG"]) == 1 and len(found["SEG"][0]["instances"]) == 1
        assert len(found["SR"]) == 2  # one report per pipeline
        assert found["OT"]  # the Secondary Capture overlay
        # The SEG points at the source series, the derived images at their source images.
        seg_id = found["SEG"][0]["instances"][0]
        seg = orthanc_get(pacs["http"], f"/instances/{seg_id}/tags?simplify")
        assert seg["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == source_uid
        first = derived["instances"][0]
        derived_tags = orthanc_get(pacs["http"], f"/instances/{first}/tags?simplify")
    source_uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct}
    if form == "enhanced":  # each frame references its source frame
        frames = derived_tags["PerFrameFunctionalGroupsSequence"]
        (source,) = frames[-1]["DerivationImageSequence"][0]["SourceImageSequence"]
        assert int(source["ReferencedFrameNumber"]) == len(frames) == 30
    else:
        (source,) = derived_tags["SourceImageSequence"]
    assert source["ReferencedSOPInstanceUID"] in source_uids


def test_results_wait_for_a_pacs_that_is_down_and_arrive_once(
    radnode_factory, models: Path, tmp_path: Path
) -> None:
    pacs_port = free_port()  # nothing listens there yet: the PACS is down
    node = radnode_factory(
        RADNODE_MODELS__DIR=str(models),
        RADNODE_ROUTES=routes("bone_threshold"),
        RADNODE_DESTINATIONS=json.dumps(
            [
                {
                    "name": "pacs",
                    "type": "dicom",
                    "host": "127.0.0.1",
                    "port": pacs_port,
                    "ae_title": "ORTHANC",
                    "backoff_s": 0.2,
                }
            ]
        ),
    ).start()
    ct = write_ct_series(tmp_path / "ct", slices=30, rows=96, columns=96, study_uid=STUDY_UID,
                         pixel_spacing=(3.0, 3.0), slice_thickness=3.0)  # fmt: skip
    assert storescu(node.port, ct).returncode == 0
    node.wait_for_event("dicom.retry", count=2, timeout=120)  # tried, and will try again
    assert "sent" not in delivery_states(node.data_dir)
    # The job is done, and the API says where its result is: waiting, and why.
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/api/jobs") as answer:
        (job,) = json.loads(answer.read())["jobs"]
    (waiting,) = job["deliveries"]
    assert (job["state"], waiting["destination"], waiting["state"]) == ("done", "pacs", "pending")
    assert waiting["attempts"] >= 2 and waiting["error"] and waiting["next_attempt_at"]

    (tmp_path / "orthanc").mkdir()
    with running_orthanc(tmp_path / "orthanc", dicom_port=pacs_port) as pacs:
        wait_all_sent(node, expected_jobs=1, timeout=120)
        found = series_in_orthanc(pacs["http"])
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/api/jobs") as answer:
        (sent,) = json.loads(answer.read())["jobs"][0]["deliveries"]
    assert (sent["state"], sent["error"], sent["next_attempt_at"]) == ("sent", None, None)
    written = sorted((node.data_dir / "results").glob("*/dicom/*.dcm"))
    in_pacs = sum(len(s["instances"]) for series in found.values() for s in series)
    assert in_pacs == len(written) == 3  # SEG, SR, Secondary Capture: none lost, none twice
    assert not node.events("dicom.dead_letter")
    with sqlite3.connect(node.data_dir / OUTBOX_FILE) as db:  # a route without HL7 sends none
        kinds = {kind for (kind,) in db.execute("SELECT kind FROM deliveries")}
    assert kinds == {"dicom"}


def bone_node(radnode_factory, models: Path, pacs: dict, ris: MllpListener, **env: str):
    """A node that runs the threshold bundle on CT and sends to ``pacs`` and ``ris``."""
    route = {"name": "bone", "pipeline": "bone_threshold", "match": {"Modality": "CT"},
             "destinations": ["pacs", "ris"]}  # fmt: skip
    destinations = [
        {"name": "pacs", "type": "dicom", "host": "127.0.0.1", "port": pacs["port"],
         "ae_title": "ORTHANC", "backoff_s": 0.2},
        {"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": ris.port},
    ]  # fmt: skip
    return radnode_factory(
        RADNODE_MODELS__DIR=str(models),
        RADNODE_ROUTES=json.dumps([route]),
        RADNODE_DESTINATIONS=json.dumps(destinations),
        **env,
    )


def test_a_series_that_grows_after_its_results_gets_a_new_result_not_a_mixed_one(
    radnode_factory, models: Path, tmp_path: Path
) -> None:
    """The PACS sends half a series, the node reports on it; the rest arrives after the
    quiet period. The second result must not reuse the first result's UIDs: Orthanc
    (as configured by default) keeps the first object it got under a UID, so the PACS
    showed the half series' SR and SEG next to the whole series' HL7 result (found by
    the acceptance run). Now the second SR names the first as its predecessor, and the
    RIS gets the second result as a correction (OBR-25 / OBX-11 = C)."""
    ris = MllpListener(free_port(), "AA").start()
    (tmp_path / "orthanc").mkdir()
    try:
        with running_orthanc(tmp_path / "orthanc") as pacs:
            node = bone_node(radnode_factory, models, pacs, ris).start()
            ct = write_ct_series(tmp_path / "ct", slices=30, rows=96, columns=96,
                                 study_uid=STUDY_UID, pixel_spacing=(3.0, 3.0),
                                 slice_thickness=3.0)  # fmt: skip
            assert storescu(node.port, ct[:15]).returncode == 0
            wait_all_sent(node, expected_jobs=1)
            assert storescu(node.port, ct[15:]).returncode == 0
            wait_all_sent(node, expected_jobs=2)
            found = series_in_orthanc(pacs["http"])
            reports = [orthanc_get(pacs["http"], f"/instances/{i}/tags?simplify")
                       for s in found["SR"] for i in s["instances"]]  # fmt: skip
            segs = [i for s in found["SEG"] for i in s["instances"]]
    finally:
        ris.stop()
    assert len(reports) == 2 and len(segs) == 2  # both results, each whole
    first, second = sorted(reports, key=lambda r: "PredecessorDocumentsSequence" in r)
    (study,) = second["PredecessorDocumentsSequence"]
    (item,) = study["ReferencedSeriesSequence"][0]["ReferencedSOPSequence"]
    assert item["ReferencedSOPInstanceUID"] == first["SOPInstanceUID"]
    statuses = [python_hl7.parse(m)["OBR.F25"] for m in ris.received]
    assert [str(s) for s in statuses] == ["F", "C"]


def test_a_study_that_lost_an_instance_in_transit_gets_preliminary_results_then_final(
    radnode_factory, models: Path, tmp_path: Path
) -> None:
    """The PACS aborts its association in the middle of a slice and sends nothing more:
    the series lacks that slice, so the result is preliminary: the SR says PRELIMINARY
    and PARTIAL, every result series' description says "preliminary", the RIS gets
    result status P. When the PACS sends the study again, the final result follows:
    SR FINAL and COMPLETE naming the preliminary one as its predecessor, HL7 F (a final
    result after a preliminary one; C would say a final one was wrong)."""
    ris = MllpListener(free_port(), "AA").start()
    (tmp_path / "orthanc").mkdir()
    try:
        with running_orthanc(tmp_path / "orthanc") as pacs:
            node = bone_node(
                radnode_factory, models, pacs, ris, RADNODE_STUDY__INTERRUPTED_WAIT_S="1"
            ).start()
            ct = write_ct_series(tmp_path / "ct", slices=20, rows=96, columns=96,
                                 study_uid=STUDY_UID, pixel_spacing=(3.0, 3.0),
                                 slice_thickness=3.0)  # fmt: skip
            assert send_then_cut(node.port, [str(p) for p in ct[:16]]) == 15
            wait_all_sent(node, expected_jobs=1)
            (lost,) = node.events("study.instance_lost")
            api = f"http://127.0.0.1:{node.http_port}/api/jobs"
            (preliminary,) = json.loads(urllib.request.urlopen(api, timeout=10).read())["jobs"]
            assert storescu(node.port, ct).returncode == 0
            wait_all_sent(node, expected_jobs=2)
            found = series_in_orthanc(pacs["http"])
            reports = [orthanc_get(pacs["http"], f"/instances/{i}/tags?simplify")
                       for s in found["SR"] for i in s["instances"]]  # fmt: skip
            descriptions = [s["description"] for s in found["SEG"]]
    finally:
        ris.stop()
    assert lost["instances"] == 15 and "preliminary" in lost["action"]
    assert preliminary["preliminary"] is True
    assert len(reports) == 2
    first, final = sorted(reports, key=lambda r: "PredecessorDocumentsSequence" in r)
    assert (first["PreliminaryFlag"], first["CompletionFlag"]) == ("PRELIMINARY", "PARTIAL")
    assert (final["PreliminaryFlag"], final["CompletionFlag"]) == ("FINAL", "COMPLETE")
    (study,) = final["PredecessorDocumentsSequence"]
    (item,) = study["ReferencedSeriesSequence"][0]["ReferencedSOPSequence"]
    assert item["ReferencedSOPInstanceUID"] == first["SOPInstanceUID"]
    assert "preliminary" in first["SeriesDescription"]
    assert "preliminary" not in final["SeriesDescription"]
    assert sorted(d.endswith("preliminary") for d in descriptions) == [False, True]
    messages = [python_hl7.parse(m) for m in ris.received]
    assert [str(m["OBR.F25"]) for m in messages] == ["P", "F"]
    assert {str(obx[11]) for obx in messages[0].segments("OBX")} == {"P"}
    summary = [" ".join(str(obx[5]) for obx in m.segments("OBX") if str(obx[2]) == "TX")
               for m in messages]  # fmt: skip
    assert "PRELIMINARY: an image of this study was lost" in summary[0]
    assert "PRELIMINARY" not in summary[1]


def test_a_refused_series_gets_a_not_analyzed_report_where_the_destination_asks_for_one(
    radnode_factory, models: Path, tmp_path: Path
) -> None:
    """A series with slices missing is refused. Without a word in the PACS a radiologist
    cannot tell "the AI found nothing" from "the AI did not run" (acceptance passes):
    with ``send_not_analyzed`` the PACS gets one SR that says so and why; the RIS gets
    nothing (a result status there could cancel the order)."""
    node = radnode_factory(RADNODE_MODELS__DIR=str(models))
    ris = MllpListener(free_port(), "AA").start()
    (tmp_path / "orthanc").mkdir()
    with running_orthanc(tmp_path / "orthanc") as pacs:
        node.extra_env.update(
            RADNODE_ROUTES=json.dumps(
                [
                    {
                        "name": "bone",
                        "pipeline": "bone_threshold",
                        "match": {"Modality": "CT"},
                        "destinations": ["pacs", "ris"],
                    }
                ]
            ),
            RADNODE_DESTINATIONS=json.dumps(
                [
                    {
                        "name": "pacs",
                        "type": "dicom",
                        "host": "127.0.0.1",
                        "port": pacs["port"],
                        "ae_title": "ORTHANC",
                        "backoff_s": 0.2,
                        "send_not_analyzed": True,
                    },
                    {"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": ris.port},
                ]
            ),
        )
        node.start()
        ct = write_ct_series(tmp_path / "ct", slices=30, rows=96, columns=96, study_uid=STUDY_UID,
                             pixel_spacing=(3.0, 3.0), slice_thickness=3.0)  # fmt: skip
        gappy = [p for i, p in enumerate(ct) if i not in (11, 12, 20)]
        assert storescu(node.port, gappy).returncode == 0
        wait_all_sent(node, expected_jobs=1)
        (finished,) = node.events("job.finished")
        assert finished["state"] == "refused"
        found = series_in_orthanc(pacs["http"])
        assert set(found) == {"SR"}, found.keys()  # the CT went to radnode only
        (report,) = found["SR"]
        assert report["description"].endswith("not analyzed")
        (sr_id,) = report["instances"]
        with urllib.request.urlopen(f"{pacs['http']}/instances/{sr_id}/file") as answer:
            sr = dcmread(io.BytesIO(answer.read()))
        texts = [str(e.value) for e in sr.iterall() if e.keyword == "TextValue"]
        (note,) = [t for t in texts if t.startswith("AI analysis not performed: ")]
        assert "missing" in note  # the reason, as the job gives it
        assert sr.StudyInstanceUID == STUDY_UID
        assert sr.VerificationFlag == "UNVERIFIED"
        jobs = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{node.http_port}/api/jobs").read())["jobs"]  # fmt: skip
        (job,) = jobs
        assert job["state"] == "refused"
        assert [d["destination"] for d in job["deliveries"]] == ["pacs"]
    ris.stop()
    assert ris.received == []
