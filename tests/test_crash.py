"""SIGKILL at random moments loses nothing that was acknowledged, and sends once.

During receive: the sender is DCMTK's storescu; its -v output says which files got
Success. The node is killed at a random moment while the series streams in, restarted
on the same data dir, and every acknowledged instance must be on disk, byte-identical,
and in the index (the restart reconciles the index with the spool).

During inference and during delivery: a complete study is routed to a pipeline whose
results go to a real Orthanc and a real MLLP listener; the node (and with it its
worker, which dies with its parent) is killed a random moment after the job starts or
after its result is recorded, and restarted. The study must still end ``done``, every
result object must be in Orthanc once (a re-run writes the same UIDs, so a re-send
replaces rather than duplicates), and every HL7 message the RIS got must be the same
message (same MSH-10).
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from service.testing import write_ct_series
from tests.conftest import acknowledged_files, dcmtk_env, require_tool, storescu
from tests.support.bundles import write_threshold_bundle
from tests.support.orthanc import orthanc_get
from tests.support.outbox import delivery_states

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("crash"), slices=120, rows=256, columns=256)


@pytest.mark.parametrize("run", range(3))
def test_sigkill_during_receive_loses_no_acknowledged_instance(
    radnode_factory, series: list[Path], run: int
) -> None:
    kill_after = random.Random(run).randint(5, 100)
    node = radnode_factory().start()

    def storescu_cmd(port: int) -> list[str]:
        return [require_tool("storescu"), "-v", "-aec", "RADNODE", "127.0.0.1", str(port)]

    sender = subprocess.Popen(
        [*storescu_cmd(node.port), *map(str, series)],
        env=dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    killed = threading.Event()

    def watch() -> None:
        assert sender.stdout is not None
        for line in sender.stdout:
            output.append(line)
            if not killed.is_set() and len(acknowledged_files("".join(output))) >= kill_after:
                node.kill()
                killed.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    sender.wait(timeout=120)
    watcher.join(timeout=30)
    assert killed.is_set(), "the transfer ended before the kill point"
    acked = acknowledged_files("".join(output))
    assert kill_after <= len(acked) < len(series)

    restarted = radnode_factory().start()  # same data dir
    restarted.wait_for_event("spool.reconciled")
    with sqlite3.connect(restarted.data_dir / "index.sqlite3") as db:
        indexed = {r[0] for r in db.execute("SELECT sop_instance_uid FROM instances")}
    for source in map(Path, acked):
        original = dcmread(source)
        assert original.SOPInstanceUID in indexed
        stored = (
            restarted.data_dir
            / "spool"
            / original.StudyInstanceUID
            / original.SeriesInstanceUID
            / f"{original.SOPInstanceUID}.dcm"
        )
        assert dcmread(stored).PixelData == original.PixelData
    assert not list((restarted.data_dir / "spool" / "incoming").iterdir())
    if run == 0:
        # the kill cut the association: the study waits study.interrupted_wait_s for
        # the rest, not the 2 s quiet period (acceptance pass: a final result on 457 of
        # 600 slices went out five seconds after the restart)
        time.sleep(3)
        assert restarted.events("study.complete") == []
    # the rest of the series can be sent again and the study completes whole
    resend = subprocess.run(
        [*storescu_cmd(restarted.port), *map(str, series)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resend.returncode == 0
    (complete,) = restarted.wait_for_event("study.complete")
    assert complete["instances"] == len(series)


@pytest.mark.parametrize(
    ("moment", "run"), [("inference", 0), ("inference", 1), ("delivery", 0), ("delivery", 1)]
)
def test_sigkill_during_inference_or_delivery_still_delivers_once(
    radnode_factory, orthanc, listener_factory, tmp_path: Path, moment: str, run: int
) -> None:
    rng = random.Random(f"{moment}-{run}")
    models = tmp_path / "models"
    write_threshold_bundle(models)
    ris = listener_factory("AA")
    study_uid = f"1.2.826.0.1.3680043.8.498.{61 + 2 * run + (moment == 'delivery')}"
    env = {
        "RADNODE_MODELS__DIR": str(models),
        "RADNODE_QUEUE__HEARTBEAT_S": "0.5",
        "RADNODE_ROUTES": json.dumps(
            [{"name": "ct", "pipeline": "bone_threshold", "match": {"Modality": "CT"},
              "destinations": ["pacs", "ris"]}]
        ),
        "RADNODE_DESTINATIONS": json.dumps(
            [{"name": "pacs", "type": "dicom", "host": "127.0.0.1", "port": orthanc["port"],
              "ae_title": "ORTHANC", "backoff_s": 0.2},
             {"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": ris.port,
              "backoff_s": 0.2}]
        ),
    }  # fmt: skip
    ct = write_ct_series(tmp_path / "ct", slices=30, rows=96, columns=96, study_uid=study_uid,
                         pixel_spacing=(3.0, 3.0), slice_thickness=3.0)  # fmt: skip
    node = radnode_factory(**env).start()
    assert storescu(node.port, ct).returncode == 0
    node.wait_for_event("job.started" if moment == "inference" else "job.recorded", timeout=120)
    time.sleep(rng.uniform(0.0, 0.4))
    node.kill()

    restarted = radnode_factory(**env).start()  # same data dir
    deadline = time.monotonic() + 180
    while set(delivery_states(restarted.data_dir)) != {"sent"}:
        assert time.monotonic() < deadline, "\n".join(restarted.lines[-20:])
        time.sleep(0.2)
    with sqlite3.connect(restarted.data_dir / "index.sqlite3") as db:
        jobs = db.execute("SELECT state FROM jobs").fetchall()
        stored = db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
    assert jobs == [("done",)]
    assert stored == len(ct)
    written = {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in (restarted.data_dir / "results").glob("*/dicom/*.dcm")
    }
    assert len(written) == 3  # SEG, SR and Secondary Capture, whatever ran twice
    (study,) = [s for s in orthanc_get(orthanc["http"], "/studies?expand")
                if s["MainDicomTags"]["StudyInstanceUID"] == study_uid]  # fmt: skip
    in_pacs = {
        orthanc_get(orthanc["http"], f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
        for series in study["Series"]
        for i in orthanc_get(orthanc["http"], f"/series/{series}")["Instances"]
    }
    assert in_pacs == written
    control_ids = {message.split("\r")[0].split("|")[9] for message in ris.received}
    assert len(ris.received) >= 1 and len(control_ids) == 1, ris.received


def test_an_unreadable_spool_file_is_quarantined_at_start_and_named_by_no_uid(
    radnode_factory,
) -> None:
    """A file in the spool that is not DICOM was reported at every start by its name,
    which is its SOP Instance UID (PHI audit). It is moved to ``quarantine/`` under a
    hash, and the line names the study by its key."""
    node = radnode_factory()
    study, series, sop = "1.2.826.0.1.3680043.8.498.77", "1.2.826.0.1.3680043.8.498.78", "1.2.9"
    junk = node.data_dir / "spool" / study / series / f"{sop}.dcm"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"not a DICOM file at all")
    node.start()
    (event,) = node.wait_for_event("spool.unreadable_file")
    node.wait_for_event("spool.reconciled")
    assert not junk.exists()
    moved = Path(event["quarantined"])
    assert moved.parent == node.data_dir / "quarantine"
    assert moved.read_bytes() == b"not a DICOM file at all"
    line = json.dumps(event)
    assert study not in line and series not in line and f"{sop}.dcm" not in line
    assert event["study"] and "resend" in event["action"]


def test_a_spool_file_that_cannot_be_read_at_all_stays_where_it_is(radnode_factory) -> None:
    """Permissions or a stale mount are the environment's fault, not the file's: moving
    such files out would strip a whole spool of its layout (review). A folder where a
    file should be stands in for one that cannot be opened (tests run as root)."""
    node = radnode_factory()
    odd = node.data_dir / "spool" / "1.2.826.0.1.77" / "1.2.826.0.1.78" / "1.2.9.dcm"
    odd.mkdir(parents=True)
    node.start()
    (event,) = node.wait_for_event("spool.unreadable_file")
    assert event["quarantined"] is None and "permissions" in event["action"]
    assert odd.is_dir() and not (node.data_dir / "quarantine").exists()


def test_a_killed_local_worker_is_gone_and_replaced_not_reported_silent(
    radnode_factory, tmp_path: Path
) -> None:
    """A local worker killed (out of memory, a job past its time limit) was reported
    ``worker.silent``, "a job it was running is queued again", a few beats after the
    node had already started its replacement (acceptance pass)."""
    import os
    import signal

    models = tmp_path / "models"
    write_threshold_bundle(models)
    node = radnode_factory(
        RADNODE_MODELS__DIR=str(models),
        RADNODE_QUEUE__HEARTBEAT_S="0.25",  # silent after 1 s
        RADNODE_ROUTES=json.dumps(
            [{"name": "ct", "pipeline": "bone_threshold", "match": {"Modality": "CT"}}]
        ),
    ).start()
    (seen,) = node.wait_for_event("worker.seen", timeout=120)
    (spawned,) = node.events("worker.spawned")
    os.kill(spawned["pid"], signal.SIGKILL)
    (gone,) = node.wait_for_event("worker.gone", timeout=30)
    assert gone["worker"] == seen["worker"]
    node.wait_for_event("worker.seen", timeout=120, count=2)  # its replacement
    time.sleep(2.0)  # past four beats of the dead one
    assert node.events("worker.silent") == []
    (died,) = node.events("worker.died")
    assert "unless it has had queue.max_attempts runs" in died["action"]


def test_a_worker_stopped_mid_run_by_its_nodes_death_leaves_only_json_lines(
    radnode_factory, tmp_path: Path
) -> None:
    """The node killed during a CT segmentation: its worker stops (SIGTERM from
    the kernel as its parent dies), and Python's teardown under the run's torch threads
    wrote "terminate called without an active exception" amid the JSON log
    (acceptance pass). Runs the reference CT model: the message needs torch's threads."""
    from service.testing import make_ct_phantom, write_ct_phantom
    from tests.conftest import REPO

    node = radnode_factory(RADNODE_ROUTES=None, RADNODE_MODELS__DIR=str(REPO / "models"))
    node.start()
    phantom = write_ct_phantom(tmp_path / "ct", make_ct_phantom(seed=10400, rows=256, slices=120))
    assert storescu(node.port, phantom).returncode == 0
    node.wait_for_event("job.started", timeout=180)
    time.sleep(0.5)
    node.kill()
    deadline = time.monotonic() + 60
    while not node.events("worker.stopped"):
        assert time.monotonic() < deadline, "\n".join(node.lines[-20:])
        time.sleep(0.2)
    time.sleep(3.0)  # the worker's last words, if any, after its stop line
    assert [line for line in node.lines if not line.startswith("{")] == []
