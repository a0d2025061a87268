"""With no routes configured, the reference bundles in models/ run on what arrives.

This is what a new user sees the first time a study reaches ``radnode serve`` on its
embedded defaults: real, trained models (not test doubles), results under the data dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from service.config import load_settings
from service.testing import make_ct_phantom, write_ct_phantom, write_radiograph
from tests.conftest import storescu

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_reference_routes_apply_only_when_no_routes_are_configured(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("RADNODE_ROUTES", raising=False)
    monkeypatch.setenv("RADNODE_MODELS__DIR", str(MODELS))
    assert {r.pipeline for r in load_settings().routes} == {
        "ct_abdomen_segmentation",
        "ct_lowdose_denoising",
        "cxr_nodule_classification",
        "mr_brain_extraction",  # installed by the README's test command
    }
    explicit = tmp_path / "none.toml"
    explicit.write_text("routes = []\n")
    assert load_settings(explicit).routes == []
    monkeypatch.setenv("RADNODE_MODELS__DIR", str(tmp_path))  # no bundles installed there
    assert load_settings().routes == []


def test_serve_on_defaults_runs_the_reference_models_on_a_phantom_study(
    radnode_factory, tmp_path: Path
) -> None:
    node = radnode_factory(RADNODE_ROUTES=None, RADNODE_MODELS__DIR=str(MODELS)).start()
    phantom = make_ct_phantom(seed=10300, rows=128)  # held out: training used seeds < 10000
    ct = write_ct_phantom(tmp_path / "ct", phantom, study_uid="1.2.826.0.1.3680043.8.498.7")
    cxr = write_radiograph(tmp_path / "cxr.dcm", rows=1024, columns=1024, with_nodule=True,
                           seed=5, study_uid="1.2.826.0.1.3680043.8.498.8")  # fmt: skip
    (active,) = node.events("routes.active")
    assert active["source"] == "reference bundles" and len(active["routes"]) == 4
    assert storescu(node.port, [*ct, cxr]).returncode == 0

    finished = node.wait_for_event("job.recorded", count=2, timeout=300)
    assert {e["pipeline"]: e["state"] for e in finished} == {
        "ct_abdomen_segmentation": "done",
        "cxr_nodule_classification": "done",
    }
    results = {}
    for path in (node.data_dir / "results").rglob("result.json"):
        summary = json.loads(path.read_text())
        results[summary["pipeline"]] = (path.parent, summary)
    seg_dir, seg = results["ct_abdomen_segmentation"]
    volumes = {s["label"].lower(): s["volume_ml"] for s in seg["segments"]}
    voxel_ml = float(np.prod(phantom.spacing)) / 1000.0
    true_liver_ml = float((phantom.labels == 1).sum()) * voxel_ml
    assert abs(volumes["liver"] - true_liver_ml) < 0.15 * true_liver_ml, (volumes, true_liver_ml)
    assert {"spleen", "right kidney", "left kidney"} <= set(volumes)
    cxr_dir, cxr_result = results["cxr_nodule_classification"]
    assert 0.0 <= cxr_result["findings"][0]["probability"] <= 1.0
    modalities = {p.name.split("_")[0] for p in seg_dir.glob("dicom/*.dcm")}
    assert {"SEG", "SR"} <= modalities
    assert {"SR", "OT"} <= {p.name.split("_")[0] for p in cxr_dir.glob("dicom/*.dcm")}
