"""Pipeline host overhead: each stage of a job next to the bare MONAI inference.

    .venv/bin/python bench/pipeline.py [--slices 300] [--repeats 3] [--ct-bundle DIR ...]
                                       [--cxr-bundle DIR] [--device cpu|cuda]

For a synthetic CT series (512x512, ``--slices`` slices) and one 2000x2000 12-bit
radiograph, prints the median seconds of: DICOM to volume, preprocessing, inference,
postprocessing (incl. Invertd / GradCAM), and the bare MONAI inference (the bundle's
own inferer and network on the same preprocessed tensor, nothing else). The service
overhead is everything the node adds around the forward pass, as a share of the whole.

Defaults use the test bundles with the model zoo's shapes (spleen UNet at 1.5x1.5x2 mm
with a 96^3 sliding window; DenseNet121 at 224^2): timings do not depend on weights.
Pass ``--ct-bundle models/ct_abdomen_segmentation`` (repeatable) and ``--cxr-bundle
models/cxr_nodule_classification`` to time the shipped bundles.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from monai.data import list_data_collate  # noqa: E402

from service.pipeline.bundle import load_bundle, read_bundle_spec  # noqa: E402
from service.pipeline.inference import prepare, run_bundle  # noqa: E402
from service.pipeline.volume import load_series  # noqa: E402
from service.testing import write_ct_series, write_radiograph  # noqa: E402
from tests.support.bundles import write_classifier_bundle, write_zoo_spleen_bundle  # noqa: E402


def bare_inference_s(bundle, volume) -> float:
    """The bundle's inferer and network on the preprocessed tensor: MONAI alone."""
    item = bundle.preprocessing(prepare(bundle, volume).item)
    batch = list_data_collate([item])[bundle.spec.input_key].to(bundle.device)
    started = time.perf_counter()
    with torch.no_grad():
        bundle.inferer(batch, bundle.network)
    if bundle.device.type == "cuda":
        torch.cuda.synchronize(bundle.device)
    return time.perf_counter() - started


def measure(name: str, bundle_dir: Path, files: list[Path], repeats: int, device) -> None:
    bundle = load_bundle(read_bundle_spec(bundle_dir), device)
    rows = []
    for _ in range(repeats + 1):  # the first run warms up caches and lazy imports
        started = time.perf_counter()
        volume = load_series(files)
        load_s = time.perf_counter() - started
        result = run_bundle(bundle, volume, load_s=load_s)
        t = result.timings
        rows.append((t.load_s, t.preprocess_s, t.inference_s, t.postprocess_s, t.total_s,
                     bare_inference_s(bundle, volume)))  # fmt: skip
    rows = rows[1:]
    med = [statistics.median(column) for column in zip(*rows, strict=True)]
    load_s, pre_s, inf_s, post_s, total_s, bare_s = med
    print(f"\n{name}: {bundle.spec.name} on {volume.array.shape} ({result.device}), "
          f"median of {repeats}")  # fmt: skip
    for label, value in (
        ("DICOM to volume", load_s),
        ("preprocessing", pre_s),
        ("inference (host)", inf_s),
        ("postprocessing", post_s),
        ("total", total_s),
        ("bare MONAI inference", bare_s),
    ):
        print(f"  {label:<22} {value:8.3f} s")
    print(f"  service overhead: {total_s - bare_s:.3f} s = {(total_s - bare_s) / total_s:.0%} "
          f"of the total; total / bare = {total_s / bare_s:.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ct-bundle", type=Path, action="append", help="repeatable")
    parser.add_argument("--cxr-bundle", type=Path)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ct_bundles = args.ct_bundle or [write_zoo_spleen_bundle(root / "models")]
        cxr_bundle = args.cxr_bundle or write_classifier_bundle(root / "models")
        ct = write_ct_series(root / "ct", slices=args.slices)
        cxr = [write_radiograph(root / "cxr.dcm", rows=2000, columns=2000, bits_stored=12)]
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
        for ct_bundle in ct_bundles:
            measure("CT", Path(ct_bundle), ct, args.repeats, device)
        measure("Radiograph classification", Path(cxr_bundle), cxr, args.repeats, device)


if __name__ == "__main__":
    main()
