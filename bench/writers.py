"""Writing a job's results: the DICOM objects and NIfTI copies, without the model.

    .venv/bin/python bench/writers.py [--slices 300] [--rows 512] [--repeats 3] [--enhanced]

What a worker spends after the forward pass, on the CPU, for results made up in the
shapes the reference pipelines give (no model runs, so the figures do not depend on
one): a segmentation of a CT (four labelled blocks: SEG, Comprehensive 3D SR, up to
five Secondary Captures), a reconstruction of the same CT (a derived image per source
image, or one derived Enhanced image with ``--enhanced``, plus an SR) and the NIfTI
copies each job keeps (``label_map.nii.gz``, ``image.nii``). Prints the median of
``--repeats`` runs of each, in seconds, and per source image. Prints; never asserts.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from pydicom import dcmread  # noqa: E402

from service.pipeline.result import (  # noqa: E402
    BundleIdentity,
    Label,
    PipelineResult,
    StageTimings,
    TaskKind,
)
from service.pipeline.volume import load_series  # noqa: E402
from service.publish import write_dicom  # noqa: E402
from service.testing import make_enhanced_ct, write_ct_series  # noqa: E402
from service.warmup import warm_up_writers  # noqa: E402
from service.writers.files import write_result_files  # noqa: E402


def _segmentation(shape: tuple[int, int, int]) -> PipelineResult:
    slices, rows, columns = shape
    label_map = np.zeros(shape, dtype=np.uint8)
    for value in range(1, 5):
        z0 = slices * value // 6
        label_map[z0 : z0 + slices // 4, rows // 4 : rows // 2, value * columns // 6 :][
            :, :, : columns // 8
        ] = value
    return PipelineResult(
        bundle=BundleIdentity("ct_abdomen_segmentation", "bench", TaskKind.SEGMENTATION),
        labels=tuple(Label(v, f"organ {v}") for v in range(1, 5)),
        device="cpu",
        timings=StageTimings(),
        label_map=label_map,
    )


def _reconstruction(array: np.ndarray) -> PipelineResult:
    return PipelineResult(
        bundle=BundleIdentity("ct_lowdose_denoising", "bench", TaskKind.RECONSTRUCTION),
        labels=(),
        device="cpu",
        timings=StageTimings(),
        image=array.astype(np.float32) * 0.9 + 4.0,
    )


def _median_s(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--enhanced", action="store_true", help="one Enhanced CT instance")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="radnode-writers-"))
    try:
        files = write_ct_series(work / "ct", slices=args.slices, rows=args.rows, columns=args.rows)
        if args.enhanced:
            enhanced = make_enhanced_ct([dcmread(p) for p in files])
            for path in files:
                path.unlink()
            files = [work / "ct" / "enhanced.dcm"]
            enhanced.save_as(files[0], enforce_file_format=True)
        volume = load_series(files)
        warm_up_writers()
        form = "one Enhanced CT instance" if args.enhanced else "single-frame CT"
        print(f"{args.slices} x {args.rows}^2, {form}; median of {args.repeats} (CPU)")
        for name, result in (
            ("segmentation", _segmentation(volume.array.shape)),
            ("reconstruction", _reconstruction(volume.array)),
        ):
            out = work / name

            def dicom(result=result, out=out) -> None:
                shutil.rmtree(out, ignore_errors=True)
                write_dicom(result, volume, files, out / "dicom")

            def nifti(result=result, out=out) -> None:
                write_result_files(result, volume, out / "files")

            for what, run in (("DICOM results", dicom), ("NIfTI copies + result.json", nifti)):
                seconds = _median_s(args.repeats, run)
                per_image = 1000.0 * seconds / args.slices
                print(f"  {name:15s} {what:27s} {seconds:6.2f} s ({per_image:5.2f} ms a slice)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
