"""The ``radnode`` commands say why nothing would run: missing pipelines, a file given."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from service.cli import app
from service.testing import write_radiograph
from tests.support.bundles import write_classifier_bundle, write_threshold_bundle


@pytest.fixture
def radnode(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """The command line in-process; no RADNODE_* variable of the caller leaks in."""
    for name in [n for n in os.environ if n.startswith("RADNODE_")]:
        monkeypatch.delenv(name)
    return CliRunner()


def invoke(runner: CliRunner, *args: str, **env: str) -> Result:
    return runner.invoke(app, list(args), env={f"RADNODE_{k}": v for k, v in env.items()})


def config_file(tmp_path: Path, models: Path, pipeline: str, extra: str = "") -> Path:
    path = tmp_path / "radnode.toml"
    path.write_text(
        f'[models]\ndir = "{models}"\n{extra}\n'
        f'[[routes]]\nname = "ct"\npipeline = "{pipeline}"\nmatch = {{ Modality = "CT" }}\n'
    )
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_threshold_bundle(root)
    return root


def test_config_check_fails_on_a_route_whose_pipeline_is_not_in_models_dir(
    radnode: CliRunner, models: Path, tmp_path: Path
) -> None:
    """It printed OK; serve then logged route.pipeline_missing and every job failed."""
    checked = invoke(radnode, "config", "check", str(config_file(tmp_path, models, "nope")))

    assert checked.exit_code == 2, checked.output
    assert "routes[0].pipeline: no bundle 'nope'" in checked.stderr
    assert f"models.dir={models}" in checked.stderr
    assert "available: bone_threshold" in checked.stderr
    assert "OK" not in checked.stdout


def test_config_check_names_a_missing_models_dir(radnode: CliRunner, tmp_path: Path) -> None:
    absent = tmp_path / "no-models"
    checked = invoke(radnode, "config", "check", str(config_file(tmp_path, absent, "x")))

    assert checked.exit_code == 2
    assert f"models.dir={absent} does not exist" in checked.stderr


def test_config_check_passes_a_route_whose_bundle_is_there(
    radnode: CliRunner, models: Path, tmp_path: Path
) -> None:
    checked = invoke(
        radnode, "config", "check", str(config_file(tmp_path, models, "bone_threshold"))
    )

    assert checked.exit_code == 0, checked.output
    assert "OK" in checked.stdout and "1 route(s)" in checked.stdout


def test_config_check_loads_the_bundles_as_a_worker_would(
    radnode: CliRunner, models: Path, tmp_path: Path
) -> None:
    """A bundle whose weights do not fit its network passed the check and failed at
    the worker (acceptance pass); --no-load skips loading."""
    import shutil

    broken = tmp_path / "models"
    shutil.copytree(models / "bone_threshold", broken / "bone_threshold")
    config = broken / "bone_threshold" / "configs" / "inference.json"
    config.write_text(config.read_text().replace('"out_channels": 2', '"out_channels": 3'))
    path = config_file(tmp_path, broken, "bone_threshold")
    checked = invoke(radnode, "config", "check", str(path))
    assert checked.exit_code == 2, checked.output
    assert "routes[0].pipeline: bundle bone_threshold: models/model.pt does not fit" in (
        checked.stderr
    )
    assert invoke(radnode, "config", "check", "--no-load", str(path)).exit_code == 0


def test_with_only_remote_workers_a_missing_pipeline_is_a_note(
    radnode: CliRunner, models: Path, tmp_path: Path
) -> None:
    """As serve judges it: the bundles may live on the worker machines alone."""
    remote = '[queue]\nurl = "redis://gpu-host:6379/0"\nlocal_workers = 0\n'
    checked = invoke(radnode, "config", "check", str(config_file(tmp_path, models, "nope", remote)))

    assert checked.exit_code == 0, checked.output
    assert "note: routes[0].pipeline: no bundle 'nope'" in checked.stderr


@pytest.mark.parametrize("models_dir", ["absent", "empty"])
def test_route_says_no_pipelines_were_found_and_where(
    radnode: CliRunner, tmp_path: Path, models_dir: str
) -> None:
    """Only "no route matched" was printed: the operator could not tell why."""
    models = tmp_path / models_dir
    if models_dir == "empty":
        models.mkdir()
    cxr = write_radiograph(tmp_path / "cxr.dcm", rows=64, columns=64)

    shown = invoke(radnode, "route", str(cxr), MODELS__DIR=str(models))

    assert shown.exit_code == 0, shown.output
    assert "no route matched" in shown.stdout
    assert "no pipelines found" in shown.stdout and str(models) in shown.stdout


def test_run_takes_one_file_as_a_folder_of_one(radnode: CliRunner, tmp_path: Path) -> None:
    """``radnode run cxr.dcm -o out`` said "no DICOM series found"."""
    models = tmp_path / "models"
    write_classifier_bundle(models)
    cxr = write_radiograph(tmp_path / "cxr.dcm", rows=128, columns=128)
    out = tmp_path / "out"

    done = invoke(radnode, "run", str(cxr), "-o", str(out), "-p", "cxr_test_classifier",
                  MODELS__DIR=str(models))  # fmt: skip

    assert done.exit_code == 0, done.output
    (summary,) = out.glob("*/cxr_test_classifier/result.json")
    assert 0 <= json.loads(summary.read_text())["findings"][0]["probability"] <= 1


def test_run_on_a_path_that_is_not_there_says_so(radnode: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-study"
    failed = invoke(radnode, "run", str(missing), "-o", str(tmp_path / "out"), "-p", "x")

    assert failed.exit_code == 1
    assert f"{missing}: no such file or folder" in failed.stderr


def test_route_on_a_file_that_is_not_dicom_says_what_to_give(
    radnode: CliRunner, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not DICOM")

    failed = invoke(radnode, "route", str(notes))

    assert failed.exit_code == 1
    assert "1 file(s) were not DICOM" in failed.stderr
    assert "a folder of DICOM files" in failed.stderr


def test_config_check_and_serve_refuse_tls_files_and_hosts_that_do_not_work(
    radnode: CliRunner, models: Path, tmp_path: Path
) -> None:
    """Acceptance pass: the check said OK for a missing certificate and for
    ``node.host = "not-an-ip"``; serve then exited 1 pointing at the port."""
    extra = (
        f'[node]\nhost = "not-an-ip"\ntls_cert = "{tmp_path / "missing.pem"}"\n'
        f'data_dir = "{tmp_path / "data"}"\n'
        '[http]\nhost = "999.1.1.1"\n'
        '[[destinations]]\nname = "pacs"\ntype = "dicom"\nhost = "127.0.0.1"\nport = 104\n'
        f'ae_title = "PACS"\ntls = true\ntls_ca = "{tmp_path / "no-ca.pem"}"\n'
    )
    path = config_file(tmp_path, models, "bone_threshold", extra)
    for command in (("config", "check", "--no-load", str(path)), ("serve", "-c", str(path))):
        answer = invoke(radnode, *command)
        assert answer.exit_code == 2, answer.output
        lines = [line for line in answer.stderr.splitlines() if line.startswith("  - ")]
        assert [line.split(":")[0] for line in lines] == [
            "  - node.tls_cert",
            "  - node.host",
            "  - http.host",
            "  - destinations[0] (pacs)",
        ], answer.stderr
        assert "missing.pem" in lines[0] and "no-ca.pem" in lines[3]
    assert not (tmp_path / "data").exists()  # serve opened nothing


def test_config_check_tells_reference_routes_from_routing_off(
    radnode: CliRunner, models: Path, tmp_path: Path
) -> None:
    """Both printed "0 route(s)": with no [[routes]] the reference routes run, with
    ``routes = []`` nothing does (acceptance pass)."""
    none = tmp_path / "none.toml"
    none.write_text(f'[models]\ndir = "{models}"\n')
    off = tmp_path / "off.toml"
    off.write_text(f'routes = []\n[models]\ndir = "{models}"\n')
    assert "reference route(s)" in invoke(radnode, "config", "check", "--no-load", str(none)).stdout
    assert "no pipeline runs" in invoke(radnode, "config", "check", "--no-load", str(off)).stdout
