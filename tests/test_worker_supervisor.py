"""Local worker processes run at a lower CPU priority than the node (real processes)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from service.config import Settings
from service.supervisor import ProcessSupervisor


def _nice_of(pid: int) -> int:
    # /proc/<pid>/stat: field 19 is the nice value (after the parenthesised command)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])


def _spawned_nice(niceness: int) -> int:
    supervisor = ProcessSupervisor(
        1, [sys.executable, "-c", "import time; time.sleep(60)"], niceness=niceness
    )
    supervisor.start()
    try:
        (pid,) = supervisor.pids()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the child is niced before exec
            if Path(f"/proc/{pid}/stat").exists():
                return _nice_of(pid)
            time.sleep(0.05)
        raise AssertionError("worker process did not appear")
    finally:
        supervisor.stop(timeout_s=5)


def test_local_workers_run_niced_by_default_and_zero_keeps_the_node_priority() -> None:
    own = os.nice(0)
    default = Settings().queue.local_worker_niceness
    assert default > 0
    assert _spawned_nice(default) == min(19, own + default)
    assert _spawned_nice(0) == own


def test_a_child_that_keeps_dying_at_start_is_restarted_ever_more_slowly() -> None:
    """A worker killed while loading a bundle was restarted 23 times in 100 s, every
    pipeline down with it (acceptance pass). Each quick death doubles the wait."""
    import structlog

    supervisor = ProcessSupervisor(
        1, [sys.executable, "-c", "raise SystemExit(3)"], restart_delay_s=0.2
    )
    with structlog.testing.capture_logs() as events:
        supervisor.start()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if len([e for e in events if e["event"] == "worker.died"]) >= 4:
                break
            time.sleep(0.1)
        supervisor.stop(timeout_s=5)
    delays = [e["restart_in_s"] for e in events if e["event"] == "worker.died"][:4]
    assert delays == [0.2, 0.4, 0.8, 1.6]
    assert all(e["exit_code"] == 3 for e in events if e["event"] == "worker.died")


def test_a_job_past_its_time_limit_ends_the_worker_which_says_why() -> None:
    """A bundle that hung held its worker, every other pipeline's jobs waiting with
    nothing saying why (acceptance pass). Past queue.job_timeout_s the worker logs
    job.timed_out and exits; it is restarted and the job tried again."""
    import json
    import subprocess
    import textwrap

    script = textwrap.dedent(
        """
        import time
        from service.observability import configure_logging
        from service.records import JobTicket
        from service.worker import _time_limit
        configure_logging()
        with _time_limit(0.3, JobTicket("j1", "k", "hangs", (), "/tmp/x", (), 1)):
            time.sleep(30)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=20,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    from service.worker import TIMED_OUT_EXIT

    assert done.returncode == TIMED_OUT_EXIT, done.stderr
    (line,) = [json.loads(x) for x in done.stdout.splitlines() if "job.timed_out" in x]
    assert (line["job"], line["pipeline"]) == ("j1", "hangs")
    assert "queue.job_timeout_s" in line["action"]


def test_a_bundle_whose_loading_killed_the_worker_twice_is_refused_and_others_load(
    tmp_path: Path,
) -> None:
    """A bundle that killed its worker while loading (out of memory) kept it in a
    restart loop, every pipeline down with it (acceptance pass). The load is marked
    while it runs; a mark left by a dead process counts, and after two the bundle is
    refused with what to do, while the other bundles load."""
    import shutil

    import pytest

    from service.pipeline.bundle import BundleError
    from service.worker import PipelineCache
    from tests.support.bundles import write_threshold_bundle

    models = tmp_path / "models"
    write_threshold_bundle(models, "crashes")
    write_threshold_bundle(models, "fine")
    marks = tmp_path / "workers"
    cache = PipelineCache(models, "cpu", crash_marks=marks)
    cache.get("fine")
    assert not list(marks.iterdir())  # a load that returned leaves no mark
    (mark,) = [cache._mark("crashes")]
    marks.mkdir(exist_ok=True)
    mark.write_text("2")  # what two processes that died loading it left
    with pytest.raises(BundleError, match=r"quarantined.*delete .*loading-"):
        PipelineCache(models, "cpu", crash_marks=marks).get("crashes")
    mark.write_text("1")  # one death is forgiven by a load that returns
    PipelineCache(models, "cpu", crash_marks=marks).get("crashes")
    assert not mark.exists()
    shutil.rmtree(marks)


def test_a_process_killed_while_loading_a_bundle_leaves_the_mark_that_counts(
    tmp_path: Path,
) -> None:
    """The same with real deaths: a network_def that ends the process as it is built."""
    import json
    import subprocess
    import textwrap

    from tests.support.bundles import write_threshold_bundle

    bundle = write_threshold_bundle(tmp_path / "models", "dies")
    config = bundle / "configs" / "inference.json"
    data = json.loads(config.read_text())
    data["network_def"] = "$__import__('os')._exit(9)"
    config.write_text(json.dumps(data))
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from service.worker import PipelineCache
        PipelineCache(Path({str(tmp_path / "models")!r}), "cpu",
                      crash_marks=Path({str(tmp_path / "marks")!r})).get("dies")
        """
    )
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-c", script]
    codes = [
        subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120)
        for _ in range(3)
    ]
    assert [c.returncode for c in codes[:2]] == [9, 9]
    assert codes[2].returncode == 1 and "quarantined" in codes[2].stderr


def test_a_worker_that_cannot_read_the_spool_fails_the_job_instead_of_refusing_it(
    tmp_path: Path,
) -> None:
    """Acceptance pass: a remote worker with the spool unmounted refused every study it
    took ("fix the series"): final, no alert, nothing sent. It is this machine's fault."""
    from service.publish import ResultPublisher
    from service.records import JobState, JobTicket
    from service.testing import write_ct_series
    from service.worker import JobRunner, PipelineCache

    settings = Settings.model_validate({"node": {"data_dir": str(tmp_path / "data")}})
    series = write_ct_series(tmp_path / "spool", slices=3, rows=16, columns=16)
    series[1].unlink()  # as seen from a machine that does not mount the spool
    runner = JobRunner(settings, PipelineCache(tmp_path / "models"), ResultPublisher(settings))
    ticket = JobTicket("j1", "key", "bone_threshold", tuple(map(str, series)),
                       str(tmp_path / "r"), (), 1)  # fmt: skip
    report = runner.run(ticket)
    assert report.state is JobState.FAILED
    assert "cannot read input item 1" in (report.error or "")
    assert "mounted" in (report.error or "")


def test_a_disk_that_fills_while_results_are_written_says_free_disk_space(
    tmp_path: Path, monkeypatch
) -> None:
    """Acceptance pass: a full disk gave "check the pipeline's bundle" and "report this
    with the job id"; ENOSPC is the disk's, fixed by freeing space and a retry."""
    import errno

    import structlog

    from service import worker as worker_module
    from service.publish import ResultPublisher
    from service.records import JobState, JobTicket
    from service.testing import write_ct_series
    from service.worker import JobRunner, PipelineCache
    from tests.support.bundles import write_threshold_bundle

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(worker_module, "write_result_files", full)
    settings = Settings.model_validate({"node": {"data_dir": str(tmp_path / "data")}})
    write_threshold_bundle(tmp_path / "models")
    series = write_ct_series(tmp_path / "spool", slices=8, rows=16, columns=16)
    runner = JobRunner(settings, PipelineCache(tmp_path / "models"), ResultPublisher(settings))
    ticket = JobTicket("j1", "key", "bone_threshold", tuple(map(str, series)),
                       str(tmp_path / "r"), (), 1)  # fmt: skip
    with structlog.testing.capture_logs() as events:
        report = runner.run(ticket)
    assert report.state is JobState.FAILED
    assert "no space left" in (report.error or "")
    (finished,) = [e for e in events if e["event"] == "job.finished"]
    assert "free disk space" in finished["action"]
    assert not [e for e in events if e["event"] == "job.crashed"]


def test_a_run_taken_for_lost_writes_nothing_once_a_later_run_has_started(
    tmp_path: Path, monkeypatch
) -> None:
    """Acceptance pass: a worker paused for 30 s came back after its job had been run
    again and delivered, and rewrote the job's results folder under the delivery."""
    from service import worker as worker_module
    from service.publish import ResultPublisher
    from service.records import JobState, JobTicket
    from service.run_claim import CLAIM_FILE
    from service.testing import write_ct_series
    from service.worker import JobRunner, PipelineCache
    from tests.support.bundles import write_threshold_bundle

    settings = Settings.model_validate({"node": {"data_dir": str(tmp_path / "data")}})
    write_threshold_bundle(tmp_path / "models")
    series = tuple(map(str, write_ct_series(tmp_path / "spool", slices=8, rows=16, columns=16)))
    runner = JobRunner(settings, PipelineCache(tmp_path / "models"), ResultPublisher(settings))
    out = tmp_path / "results" / "j1"
    real_run_bundle = worker_module.run_bundle

    def paused_meanwhile(*args, **kwargs):  # run 2 starts while run 1 is in the model
        result = real_run_bundle(*args, **kwargs)
        (out / CLAIM_FILE).write_text("2")
        return result

    monkeypatch.setattr(worker_module, "run_bundle", paused_meanwhile)
    report = runner.run(JobTicket("j1", "key", "bone_threshold", series, str(out), (), 1))
    assert report.state is JobState.FAILED and "run 2 has started" in (report.error or "")
    assert not (out / "result.json").exists() and not (out / "dicom").exists()

    monkeypatch.setattr(worker_module, "run_bundle", real_run_bundle)
    stale = runner.run(JobTicket("j1", "key", "bone_threshold", series, str(out), (), 1))
    assert stale.state is JobState.FAILED  # a ticket older than the folder's run
    current = runner.run(JobTicket("j1", "key", "bone_threshold", series, str(out), (), 3))
    assert current.state is JobState.DONE
    assert (out / "result.json").exists()


def test_a_not_analyzed_report_is_kept_apart_from_the_results_folder(tmp_path: Path) -> None:
    """Review: written into dicom/, the "not analyzed" SR of a refused run would have
    gone to the PACS with the results of a later, successful run of the same job."""
    from service.publish import DICOM_FOLDER, NOT_ANALYZED_FOLDER, ResultPublisher
    from service.records import JobState, JobTicket
    from service.testing import write_ct_series
    from service.worker import JobRunner, PipelineCache
    from tests.support.bundles import write_threshold_bundle

    settings = Settings.model_validate({
        "node": {"data_dir": str(tmp_path / "data")},
        "destinations": [{"name": "pacs", "type": "dicom", "host": "127.0.0.1", "port": 104,
                          "ae_title": "PACS", "send_not_analyzed": True}],
    })  # fmt: skip
    write_threshold_bundle(tmp_path / "models")
    series = write_ct_series(tmp_path / "spool", slices=12, rows=16, columns=16)
    gappy = tuple(str(p) for i, p in enumerate(series) if i not in (4, 5))
    runner = JobRunner(settings, PipelineCache(tmp_path / "models"), ResultPublisher(settings))
    out = tmp_path / "results" / "j1"
    report = runner.run(JobTicket("j1", "key", "bone_threshold", gappy, str(out), ("pacs",), 1))
    assert report.state is JobState.REFUSED
    (deliverable,) = report.deliverables
    assert deliverable.path == str(out / NOT_ANALYZED_FOLDER)
    assert [p.name[:3] for p in (out / NOT_ANALYZED_FOLDER).iterdir()] == ["SR_"]
    assert not (out / DICOM_FOLDER).exists()
    # the series has a result already (it came again unusable): that result stands, and
    # no "not analyzed" report goes beside it (acceptance pass)
    later = tmp_path / "results" / "j2"
    ticket = JobTicket("j2", "key", "bone_threshold", gappy, str(later), ("pacs",), 1,
                       replaces=str(tmp_path / "results" / "j0"))  # fmt: skip
    report = runner.run(ticket)
    assert report.state is JobState.REFUSED and report.deliverables == ()
    assert not (later / NOT_ANALYZED_FOLDER).exists()


def test_a_preliminary_job_says_so_in_its_files_and_its_refusal(tmp_path: Path) -> None:
    """Review: ``result.json`` did not say that a result was preliminary (the SR and the
    ORU did), and a preliminary job refused for a missing slice said to fix the series,
    where the PACS sending the study again (the lost instance) is what mends it."""
    import structlog

    from service.publish import ResultPublisher
    from service.records import JobState, JobTicket
    from service.testing import write_ct_series
    from service.worker import JobRunner, PipelineCache
    from tests.support.bundles import write_threshold_bundle

    settings = Settings.model_validate({"node": {"data_dir": str(tmp_path / "data")}})
    write_threshold_bundle(tmp_path / "models")
    series = tuple(map(str, write_ct_series(tmp_path / "spool", slices=12, rows=16, columns=16)))
    runner = JobRunner(settings, PipelineCache(tmp_path / "models"), ResultPublisher(settings))
    for job_id, preliminary in (("j1", True), ("j2", False)):
        out = tmp_path / "results" / job_id
        ticket = JobTicket(job_id, "key", "bone_threshold", series, str(out), (), 1,
                           preliminary=preliminary)  # fmt: skip
        assert runner.run(ticket).state is JobState.DONE
        assert json.loads((out / "result.json").read_text())["preliminary"] is preliminary

    gappy = tuple(p for i, p in enumerate(series) if i != 5)
    messages = {}
    for job_id, preliminary in (("j3", True), ("j4", False)):
        ticket = JobTicket(job_id, "key", "bone_threshold", gappy,
                           str(tmp_path / "results" / job_id), (), 1,
                           preliminary=preliminary)  # fmt: skip
        with structlog.testing.capture_logs() as events:
            report = runner.run(ticket)
        (finished,) = [e for e in events if e["event"] == "job.finished"]
        assert report.state is JobState.REFUSED
        messages[preliminary] = (report.error or "", finished["action"])
    assert "lost in transit" in messages[True][0] and "send the study again" in messages[True][1]
    assert "lost in transit" not in messages[False][0]
    assert "fix the series" in messages[False][1] and "send" not in messages[False][1]


def test_a_run_that_claims_a_results_folder_forgets_what_a_pacs_acknowledged_of_it(
    tmp_path: Path,
) -> None:
    """Review: a run writing into a folder an earlier run's results were delivered from
    would have had its new files taken as acknowledged, and none sent."""
    from service.dicom_delivery import acknowledged_record
    from service.run_claim import claim

    record = acknowledged_record(tmp_path / "job" / "dicom", "pacs", "PACS@h:104")
    record.parent.mkdir(parents=True)
    record.write_text("SR_1.2.3.dcm\n")
    claim(tmp_path / "job", 2)
    assert not record.exists()
