"""Train (and evaluate) the ct_abdomen_segmentation bundle on randomised CT phantoms.

Run from the repository root:

    .venv/bin/python models/ct_abdomen_segmentation/scripts/train.py

Training data are numpy volumes from ``service.testing.make_ct_phantom`` (seeds
0..N-1), fed exactly as radnode feeds a series to the bundle (channel-less MetaTensor,
axes x=column, y=row, z=slice, RAS affine), then through the same spatial and intensity
steps as ``configs/inference.json``. Evaluation runs the bundle's own inference config
on held-out phantoms (seeds from 10000) and writes ``docs/metrics.json``.
Everything is seeded; on CPU with 2 threads it takes a few minutes.

    .venv/bin/python models/ct_abdomen_segmentation/scripts/train.py --evaluate-only
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

from monai.losses import DiceCELoss  # noqa: E402
from monai.transforms import (  # noqa: E402
    ClassesToIndicesd,
    Compose,
    EnsureChannelFirstd,
    Identityd,
    Orientationd,
    RandCropByLabelClassesd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
)
from monai.utils import set_determinism  # noqa: E402

from service.pipeline.bundle import LoadedBundle, load_bundle, read_bundle_spec  # noqa: E402
from service.pipeline.inference import run_bundle, volume_to_metatensor  # noqa: E402
from service.testing import CT_PHANTOM_LABELS, make_ct_phantom, phantom_volume  # noqa: E402

TRAIN_SEEDS = range(0, 60)
EVAL_SEEDS = range(10000, 10010)
PIXDIM = (3.0, 3.0, 3.0)  # as Spacingd in configs/inference.json
HU_WINDOW = (-200.0, 300.0)  # as ScaleIntensityRanged in configs/inference.json
ROI = (64, 64, 64)


def phantom(seed: int):
    """Training phantoms vary matrix (96-160) and so pixel spacing, slice spacing, length."""
    rng = np.random.default_rng(seed + 777)
    return make_ct_phantom(seed=seed, rows=int(rng.integers(96, 161)))


def training_item(seed: int, transform: Compose) -> dict:
    p = phantom(seed)
    item = {
        "image": volume_to_metatensor(phantom_volume(p.hu, p.spacing), 3),
        "label": volume_to_metatensor(phantom_volume(p.labels.astype(np.float32), p.spacing), 3),
    }
    return transform(item)


def bundle(trained: bool = True) -> LoadedBundle:
    """The bundle as radnode loads it (file I/O swapped for identities); fresh or trained."""
    spec = read_bundle_spec(BUNDLE, require_weights=trained)
    return load_bundle(spec, "cpu", weights=trained)


def dice(pred: np.ndarray, truth: np.ndarray, value: int) -> float:
    a, b = pred == value, truth == value
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def evaluate(seeds=EVAL_SEEDS) -> dict:
    trained = bundle()
    scores: dict[str, list[float]] = {name: [] for name in CT_PHANTOM_LABELS.values()}
    for seed in seeds:
        p = make_ct_phantom(seed=seed, rows=192)  # finer than training: 1.8-2.3 mm pixels
        pred = run_bundle(trained, phantom_volume(p.hu, p.spacing)).label_map
        assert pred is not None and pred.shape == p.labels.shape
        for value, name in CT_PHANTOM_LABELS.items():
            scores[name].append(dice(pred, p.labels, value))
    summary = {
        "held_out_seeds": f"{seeds.start}..{seeds.stop - 1}",
        "dice_mean": {k: round(float(np.mean(v)), 4) for k, v in scores.items()},
        "dice_min": {k: round(float(np.min(v)), 4) for k, v in scores.items()},
    }
    print(json.dumps(summary, indent=2))
    return summary


def train(iterations: int, lr: float = 3e-3, resume: bool = False, small_organs: int = 1) -> None:
    set_determinism(seed=0)
    torch.set_num_threads(2)
    prepare = Compose(
        [
            Identityd(keys=["image", "label"]),  # LoadImaged in the bundle
            EnsureChannelFirstd(keys=["image", "label"]),
            Orientationd(keys=["image", "label"], axcodes="RAS"),
            Spacingd(keys=["image", "label"], pixdim=PIXDIM, mode=("bilinear", "nearest")),
            ScaleIntensityRanged(
                keys="image",
                a_min=HU_WINDOW[0],
                a_max=HU_WINDOW[1],
                b_min=0.0,
                b_max=1.0,
                clip=True,
            ),
            # where each class is, once: cropping then needs no pass over the volume
            ClassesToIndicesd(keys="label", num_classes=5),
        ]
    )
    started = time.time()
    cache = [training_item(seed, prepare) for seed in TRAIN_SEEDS]
    print(f"{len(cache)} training phantoms ready in {time.time() - started:.0f} s", flush=True)
    augment = Compose(
        [
            RandCropByLabelClassesd(
                keys=["image", "label"],
                label_key="label",
                spatial_size=ROI,
                num_classes=5,
                ratios=[1, 1, small_organs, small_organs, small_organs],
                num_samples=2,
                allow_smaller=True,
                indices_key="label_cls_indices",
            ),
            RandScaleIntensityd(keys="image", factors=0.05, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.03, prob=0.5),
        ]
    )
    augment.set_random_state(seed=0)
    from monai.transforms import SpatialPadd

    pad = SpatialPadd(keys=["image", "label"], spatial_size=ROI)

    # --resume continues from the shipped weights (a second, lower-lr stage)
    net = bundle(trained=resume).network
    net.train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations)
    rng = np.random.default_rng(0)
    net.train()
    for it in range(1, iterations + 1):
        crops = []
        for index in rng.choice(len(cache), size=2, replace=False):
            crops += [pad(c) for c in augment(cache[index])]
        image = torch.stack([c["image"].as_tensor() for c in crops])
        label = torch.stack([c["label"].as_tensor() for c in crops])
        optimizer.zero_grad()
        loss = loss_fn(net(image), label)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if it % 25 == 0:
            print(
                f"iteration {it}/{iterations} loss {loss.item():.4f} "
                f"({time.time() - started:.0f} s)",
                flush=True,
            )
    out = BUNDLE / "models" / "model.pt"
    torch.save(net.state_dict(), out)
    print(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=1600)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--resume", action="store_true", help="start from models/model.pt")
    parser.add_argument(
        "--small-organs", type=int, default=1, help="crop weight of spleen and kidneys"
    )
    parser.add_argument("--evaluate-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.evaluate_only:
        train(args.iterations, args.lr, args.resume, args.small_organs)
    summary = evaluate()
    (BUNDLE / "docs").mkdir(exist_ok=True)
    (BUNDLE / "docs" / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
