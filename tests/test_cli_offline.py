"""`radnode route` and `radnode run` on a folder: the node's path without a network."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from service.testing import write_ct_series, write_radiograph
from tests.conftest import RADNODE
from tests.support.bundles import write_classifier_bundle, write_threshold_bundle

ROUTES = [
    {"name": "ct-bone", "pipeline": "bone_threshold", "match": {"Modality": "CT"}},
    {"name": "cxr", "pipeline": "cxr_test_classifier", "match": {"Modality": ["DX", "CR"]}},
]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study")
    write_ct_series(root / "ct", slices=20, rows=64, columns=64,
                    pixel_spacing=(4.0, 4.0), slice_thickness=4.0)  # fmt: skip
    write_radiograph(root / "cxr.dcm", rows=300, columns=300)
    (root / "notes.txt").write_text("not DICOM")
    return root


def radnode(*args: str, models: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RADNODE_MODELS__DIR": str(models), "RADNODE_ROUTES": json.dumps(ROUTES)}
    return subprocess.run([str(RADNODE), *args], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_route_explains_which_pipeline_runs_on_which_series(study: Path, tmp_path: Path) -> None:
    shown = radnode("route", str(study), models=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "+ ct-bone: run bone_threshold" in shown.stdout
    assert "+ cxr: run cxr_test_classifier" in shown.stdout
    assert "- cxr:" in shown.stdout and "Modality" in shown.stdout  # why the CT is not cxr
    assert "PHANTOM" not in shown.stdout  # no patient data


def test_run_writes_results_and_dicom_objects_for_each_routed_series(
    study: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    write_threshold_bundle(models)
    write_classifier_bundle(models)
    out = tmp_path / "out"
    done = radnode("run", str(study), "--out", str(out), models=models)
    assert done.returncode == 0, done.stdout + done.stderr
    summaries = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/*/result.json")}
    assert set(summaries) == {"bone_threshold", "cxr_test_classifier"}
    assert summaries["bone_threshold"]["segments"][0]["volume_ml"] > 0
    assert 0 <= summaries["cxr_test_classifier"]["findings"][0]["probability"] <= 1
    modalities = sorted(p.name.split("_")[0] for p in out.glob("*/*/dicom/*.dcm"))
    assert modalities == ["OT", "OT", "SEG", "SR", "SR"]
    assert "1 file(s) were not DICOM" in done.stderr


def test_run_with_an_unknown_pipeline_fails_with_its_name(study: Path, tmp_path: Path) -> None:
    failed = radnode("run", str(study), "--out", str(tmp_path / "o"), "--pipeline", "nope",
                     models=tmp_path)  # fmt: skip
    assert failed.returncode == 1
    assert "nope" in failed.stderr
