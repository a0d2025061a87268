"""Peak memory of one job: a worker's resident set while it runs a large CT study.

    .venv/bin/python bench/memory.py [--slices 1000] [--rows 512] [--slice-spacing MM]
                                     [--pipeline ct_abdomen_segmentation] [--keep DIR]

Writes a phantom abdomen CT (``service.testing``) as DICOM, then runs one job on it in
a fresh process exactly as a worker does (``JobRunner`` with the shipped bundle from
``models/``: read the series, MONAI pre/inference/postprocessing, result files, SEG,
SR and SC). The process's resident set is read from ``/proc/self/status``: once the
bundle is loaded (Python, torch, MONAI and the network: "the model"), and its peak
(VmHWM, reset after the model load) while the job runs. Issue 11's target: peak for a
1000-slice study <= 3x the decoded volume plus the model. The decoded volume is the
array radnode reads the series into (int16 for CT). Prints; never asserts.

The phantom's slice spacing is drawn from 2-5 mm unless ``--slice-spacing`` sets it
(the default seed draws 4.3 mm: 1000 slices then span 4.3 m, and the bundle's 3 mm
grid is three times what a 1000-slice thin-slice study of a body gives). ``--keep
DIR`` writes the series to DIR once and reuses it on the next run (writing a
1000-slice phantom takes minutes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MIB = 1024 * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(series_dir: Path, pipeline: str, out: Path) -> None:
    """Run one job as a worker would and write the memory figures to ``out``."""
    from service.config import Settings
    from service.publish import ResultPublisher
    from service.records import JobState, JobTicket
    from service.worker import JobRunner, PipelineCache

    settings = Settings()
    cache = PipelineCache(REPO / "models", device="cpu")
    cache.get(pipeline)
    model_kib = _status_kib("VmRSS")
    reset = _reset_peak()
    runner = JobRunner(settings, cache, ResultPublisher(settings))
    paths = tuple(str(p) for p in sorted(series_dir.glob("*.dcm")))
    ticket = JobTicket(
        job_id="bench-memory",
        study_key="bench",
        pipeline=pipeline,
        series_paths=paths,
        result_dir=str(out.parent / "result"),
        destinations=(),
        attempt=1,
    )
    started = time.perf_counter()
    report = runner.run(ticket)
    seconds = time.perf_counter() - started
    if report.state is not JobState.DONE:
        raise SystemExit(f"the job did not finish: {report.state.value}: {report.error}")
    out.write_text(
        json.dumps(
            {
                "model_kib": model_kib,
                "peak_kib": _status_kib("VmHWM"),
                "peak_reset": reset,
                "seconds": seconds,
                "timings": report.timings,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--pipeline", default="ct_abdomen_segmentation")
    parser.add_argument("--slice-spacing", type=float, help="mm (default: drawn, 2-5 mm)")
    parser.add_argument("--keep", type=Path, help="write the series here once, reuse it")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.pipeline, args.out)
        return

    from service.testing import make_ct_phantom, write_ct_phantom

    work = Path(tempfile.mkdtemp(prefix="radnode-bench-memory-"))
    series = args.keep or work / "ct"
    try:
        if not (series.is_dir() and len(list(series.glob("*.dcm"))) == args.slices):
            phantom = make_ct_phantom(
                seed=10500, rows=args.rows, slices=args.slices, slice_spacing=args.slice_spacing
            )
            write_ct_phantom(series, phantom)
            del phantom
        out = work / "figures.json"
        child_args = ["--child", str(series), "--pipeline", args.pipeline, "--out", str(out)]
        subprocess.run([sys.executable, __file__, *child_args], check=True)
        figures = json.loads(out.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    decoded = args.slices * args.rows * args.rows * 2  # int16, as load_series reads CT
    model = figures["model_kib"] * 1024
    peak = figures["peak_kib"] * 1024
    budget = 3 * decoded + model
    print(f"study: {args.slices} x {args.rows}x{args.rows} CT; pipeline {args.pipeline}")
    print(f"  decoded volume (int16)       {decoded / MIB:8.0f} MiB")
    print(f"  model (RSS once loaded)      {model / MIB:8.0f} MiB")
    print(f"  peak RSS during the job      {peak / MIB:8.0f} MiB"
          f"{'' if figures['peak_reset'] else '  (peak not reset after model load)'}")  # fmt: skip
    print(f"  job above the model          {(peak - model) / MIB:8.0f} MiB"
          f" = {(peak - model) / decoded:.2f}x the decoded volume")  # fmt: skip
    print(f"  target (3x decoded + model)  {budget / MIB:8.0f} MiB:"
          f" {'met' if peak <= budget else 'NOT met'} (issue 11)")  # fmt: skip
    print(f"  job time {figures['seconds']:.1f} s; stages {figures['timings']}")


if __name__ == "__main__":
    main()
