"""A worker writes every kind of result once, for a tiny synthetic study, before its
first job.

Why: the first job in a worker process paid for one-time work that has nothing to do
with the study: highdicom reads its IOD and module tables (JSON) on first use, pydicom
and hl7apy import and build what they need on first use. Measured on a 300-slice CT
(two jobs in one process): the first job's writing took 1.61 s, the second's 1.15 s,
and reading the series 0.88 s against 0.63 s. A radiologist waits for the first study
after every restart; the worker does that work before it takes one.

The study is a 4-slice 16 x 16 CT phantom and a 16 x 16 radiograph from
:mod:`service.testing` (no patient), written to a temporary folder that is removed
afterwards; nothing is sent anywhere and no model runs. A failure is logged and the
worker goes on: the same code runs again, with its real error, in the first job.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog

log = structlog.get_logger("service.warmup")


def warm_up_writers() -> float:
    """Read, write and encode one segmentation and one classification result; return
    the seconds it took (also logged as ``worker.warmed_up``)."""
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="radnode-warmup-") as folder:
            _write_results(Path(folder))
    except Exception as exc:  # never fatal: the first job meets the same error
        log.warning(
            "worker.warm_up_failed",
            reason=f"{type(exc).__name__}: {exc}",
            action="none needed; the first job may be slower and will report any error",
        )
    seconds = time.perf_counter() - started
    log.info("worker.warmed_up", seconds=round(seconds, 3))
    return seconds


def _write_results(folder: Path) -> None:
    from service.hl7 import Hl7DestinationSettings
    from service.pipeline.result import TaskKind
    from service.pipeline.volume import load_series
    from service.testing import write_ct_series, write_radiograph
    from service.writers.dicom import write_dicom_results
    from service.writers.files import write_result_files
    from service.writers.oru import build_oru

    hl7 = Hl7DestinationSettings(name="warm-up", host="localhost", port=2575)
    ct = load_series(write_ct_series(folder / "ct", slices=4, rows=16, columns=16))
    label_map = np.zeros(ct.array.shape, dtype=np.uint8)
    label_map[1:3, 4:12, 4:12] = 1
    radiograph = load_series([write_radiograph(folder / "dx.dcm", rows=16, columns=16)])
    heatmap = np.zeros(radiograph.array.shape, dtype=np.float32)
    results = [
        (ct, _result(TaskKind.SEGMENTATION, 1, label_map=label_map)),
        (radiograph, _result(TaskKind.CLASSIFICATION, 0, probabilities=(0.5,), heatmap=heatmap)),
    ]
    for number, (volume, result) in enumerate(results):
        out = folder / f"out{number}"
        write_result_files(result, volume, out)
        write_dicom_results(result, volume, list(volume.source_headers), out / "dicom")
        build_oru(result, volume.source_headers[0], volume.spacing, hl7).to_bytes()


def _result(kind: Any, label_value: int, **outputs: Any) -> Any:
    from service.pipeline.result import BundleIdentity, Label, PipelineResult, StageTimings

    return PipelineResult(
        bundle=BundleIdentity("warm_up", "0.0.0", kind),
        labels=(Label(label_value, "warm-up"),),
        device="cpu",
        timings=StageTimings(),
        **outputs,
    )
