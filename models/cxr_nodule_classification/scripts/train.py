"""Train (and evaluate) the cxr_nodule_classification bundle on chest radiograph phantoms.

Run from the repository root:

    .venv/bin/python models/cxr_nodule_classification/scripts/train.py

Images come from ``service.testing.make_radiograph(vary_anatomy=True)``: random chest
anatomy, exposure, noise, matrix (non-square, 256-768 px), bits stored (10-16) and
photometric interpretation, half of them with a nodule (small and faint to clear).
Each is fed as radnode feeds a radiograph (MONOCHROME1 inverted, axes x=column,
y=row, float32) through the bundle's own preprocessing. Evaluation runs the bundle's
inference config on held-out seeds at 1024x1024 and writes ``docs/metrics.json``.

    .venv/bin/python models/cxr_nodule_classification/scripts/train.py --evaluate-only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

BUNDLE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE.parents[1]))  # the repository root, for service.testing

from monai.metrics import ROCAUCMetric  # noqa: E402
from monai.utils import set_determinism  # noqa: E402

THREADS = 2

from service.pipeline.bundle import LoadedBundle, load_bundle, read_bundle_spec  # noqa: E402
from service.pipeline.inference import run_bundle, volume_to_metatensor  # noqa: E402
from service.pipeline.volume import Volume  # noqa: E402
from service.testing import make_radiograph, phantom_volume  # noqa: E402

TRAIN_SEEDS = range(0, 2000)
EVAL_SEEDS = range(100000, 100300)


def radiograph_volume(ds) -> Volume:
    """A radiograph as radnode reads it: MONOCHROME1 inverted so that bright = dense."""
    pixels = ds.pixel_array.astype(np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        pixels = float(2**ds.BitsStored - 1) - pixels
    sy, sx = (float(v) for v in ds.PixelSpacing)
    return phantom_volume(pixels[None], (sx, sy, 1.0), modality=ds.Modality, is_2d=True)


def sample(seed: int, size: tuple[int, int] | None = None):
    """(dataset, has_nodule): even seeds have a nodule; everything else random."""
    rng = np.random.default_rng(seed + 12345)
    rows, columns = size or (int(rng.integers(256, 769)), int(rng.integers(256, 769)))
    ds = make_radiograph(
        rows=rows,
        columns=columns,
        bits_stored=int(rng.integers(10, 17)),
        photometric="MONOCHROME1" if rng.random() < 0.5 else "MONOCHROME2",
        with_nodule=seed % 2 == 0,
        vary_anatomy=True,
        seed=seed,
        study_uid="1.2.3",
        series_uid="1.2.3.4",
    )
    return ds, seed % 2 == 0


def bundle(trained: bool = True) -> LoadedBundle:
    """The bundle as radnode loads it (file I/O swapped for identities); fresh or trained."""
    spec = read_bundle_spec(BUNDLE, require_weights=trained)
    return load_bundle(spec, "cpu", weights=trained)


def evaluate(seeds=EVAL_SEEDS) -> dict:
    trained = bundle()
    probs, truth = [], []
    for seed in seeds:
        ds, nodule = sample(seed, size=(1024, 1024))
        result = run_bundle(trained, radiograph_volume(ds))
        assert result.probabilities is not None
        probs.append(result.probabilities[0])
        truth.append(float(nodule))
    auc = ROCAUCMetric()
    auc(torch.tensor(probs)[:, None], torch.tensor(truth)[:, None])
    p, t = np.array(probs), np.array(truth)
    summary = {
        "held_out_seeds": f"{seeds.start}..{seeds.stop - 1} (1024x1024, half with nodule)",
        "auc": round(float(auc.aggregate()), 4),
        "accuracy_at_0.5": round(float(((p > 0.5) == (t > 0.5)).mean()), 4),
        "sensitivity_at_0.5": round(float((p[t > 0.5] > 0.5).mean()), 4),
        "specificity_at_0.5": round(float((p[t < 0.5] <= 0.5).mean()), 4),
    }
    print(json.dumps(summary, indent=2))
    return summary


def train(epochs: int, batch_size: int = 16) -> None:
    set_determinism(seed=0)
    torch.set_num_threads(THREADS)
    fresh = bundle(trained=False)
    net, pre = fresh.network, fresh.preprocessing
    started = time.time()
    images, labels = [], []
    for seed in TRAIN_SEEDS:
        ds, nodule = sample(seed)
        fed = volume_to_metatensor(radiograph_volume(ds), 2)
        images.append(pre({"image": fed})["image"].as_tensor())
        labels.append(float(nodule))
    x = torch.stack(images)
    y = torch.tensor(labels)[:, None]
    print(f"{len(x)} training images ready in {time.time() - started:.0f} s", flush=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    steps = epochs * (len(x) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(0)
    net.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for b in range(len(x) // batch_size):
            index = order[b * batch_size : (b + 1) * batch_size]
            batch = x[index]
            # light intensity augmentation: contrast and brightness jitter
            gain = 1.0 + 0.1 * (torch.rand(len(index), 1, 1, 1, generator=generator) - 0.5)
            shift = 0.05 * (torch.rand(len(index), 1, 1, 1, generator=generator) - 0.5)
            batch = batch * gain + shift
            # left-right mirroring: a nodule stays in a lung, the heart changes side
            mirror = torch.rand(len(index), generator=generator) < 0.5
            batch = torch.where(mirror[:, None, None, None], batch.flip(2), batch)
            optimizer.zero_grad()
            loss = loss_fn(net(batch), y[index])
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
        print(
            f"epoch {epoch}/{epochs} loss {total / (len(x) // batch_size):.4f} "
            f"({time.time() - started:.0f} s)",
            flush=True,
        )
    out = BUNDLE / "models" / "model.pt"
    torch.save(net.state_dict(), out)
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--evaluate-only", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (speed only)")
    args = parser.parse_args(argv)
    global THREADS
    THREADS = args.threads
    torch.set_num_threads(THREADS)
    if not args.evaluate_only:
        train(args.epochs)
    summary = evaluate()
    (BUNDLE / "docs").mkdir(exist_ok=True)
    (BUNDLE / "docs" / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
