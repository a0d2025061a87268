"""Measure the bundle on Colin27 as radnode runs it, and write ``docs/metrics.json``.

Run from the repository root (after ``scripts/install_weights.py``; needs Debian's
``mricron-data`` for Colin27 and its reference brain extraction ``ch2bet``):

    .venv/bin/python models/mr_brain_extraction/scripts/evaluate.py

Colin27 is written as a DICOM MR series (``service.testing_mr``), read back by
radnode's series reader and run through ``load_bundle``/``run_bundle`` on the CPU with
2 threads: exactly what a worker does. The label map comes back in the DICOM series'
grid and is compared with ``ch2bet > 0`` voxel by voxel.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BUNDLE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE.parents[1]))  # the repository root

from service.pipeline.bundle import load_bundle, read_bundle_spec  # noqa: E402
from service.pipeline.inference import run_bundle  # noqa: E402
from service.pipeline.volume import load_series  # noqa: E402
from service.testing_mr import COLIN27, COLIN27_BRAIN, write_mr_series  # noqa: E402


def main() -> int:
    import nibabel as nib

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_mr_series(COLIN27, tmp)
        started = time.perf_counter()
        volume = load_series(paths)
        read_s = time.perf_counter() - started
    bundle = load_bundle(read_bundle_spec(BUNDLE), "cpu")
    started = time.perf_counter()
    run_bundle(bundle, volume)  # TorchScript optimises its graphs during the first calls
    first_run_s = time.perf_counter() - started
    started = time.perf_counter()
    result = run_bundle(bundle, volume)
    run_s = time.perf_counter() - started
    # [slice, row, column] -> the canonical RAS grid of the NIfTI (see service.testing_mr)
    brain = result.label_map.transpose(2, 1, 0)[::-1, ::-1, :] == 1
    truth = np.asarray(nib.as_closest_canonical(nib.load(str(COLIN27_BRAIN))).dataobj) > 0
    dice = float(2 * (brain & truth).sum() / (brain.sum() + truth.sum()))
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    metrics = {
        "data": "Colin27 T1 (mricron-data ch2.nii.gz) as a DICOM MR series of"
        f" {len(paths)} images; reference ch2bet.nii.gz > 0",
        "dice_vs_ch2bet": round(dice, 4),
        "brain_volume_ml": round(float(brain.sum()) * voxel_ml, 1),
        "reference_volume_ml": round(float(truth.sum()) * voxel_ml, 1),
        "cpu_threads": 2,
        "read_series_s": round(read_s, 2),
        "first_run_bundle_s": round(first_run_s, 2),
        "run_bundle_s": round(run_s, 2),
        "stages_s": {k: round(v, 2) for k, v in vars(result.timings).items()},
    }
    (BUNDLE / "docs" / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
