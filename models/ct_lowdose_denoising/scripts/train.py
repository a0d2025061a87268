"""Train (and evaluate) the ct_lowdose_denoising GAN on simulated low-dose CT phantoms.

Run from the repository root:

    .venv/bin/python models/ct_lowdose_denoising/scripts/train.py

Data: axial slices of ``service.testing.make_ct_phantom`` (256 x 256, 1.3-1.7 mm
pixels, no image noise), forward projected, given Poisson noise at 4e4-3e5 photons per
ray and reconstructed by filtered back-projection (``scripts/lowdose.py``); the target
is the noise-free reconstruction of the same slice. Both go through the bundle's own
preprocessing (as radnode feeds a series: channel-less MetaTensor, x, y, z, RAS affine).

Model: the generator is ``network_def`` (``scripts/networks.py``: input minus a small 2D
MONAI UNet's noise estimate, run slice by slice by ``SliceInferer``); the discriminator
is MONAI's ``PatchDiscriminator``. Loss: L1 +
``--adv-weight`` x least-squares ``PatchAdversarialLoss``. Evaluation runs the bundle's
inference config on held-out phantoms and writes ``docs/metrics.json``.

    .venv/bin/python models/ct_lowdose_denoising/scripts/train.py --evaluate-only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

BUNDLE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE.parents[1]))  # the repository root, for service.testing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lowdose import simulate_low_dose  # noqa: E402
from monai.losses import PatchAdversarialLoss  # noqa: E402
from monai.networks.nets import PatchDiscriminator  # noqa: E402
from monai.utils import set_determinism  # noqa: E402

THREADS = 2

from service.pipeline.bundle import LoadedBundle, load_bundle, read_bundle_spec  # noqa: E402
from service.pipeline.inference import run_bundle, volume_to_metatensor  # noqa: E402
from service.testing import make_ct_phantom, phantom_volume  # noqa: E402

TRAIN_SEEDS = range(0, 30)
EVAL_SEEDS = range(20000, 20004)
SLICES_PER_PHANTOM = 6
PATCH = 96
HU_RANGE = (-1000.0, 1000.0)  # as hu_min/hu_max in configs/inference.json


def low_dose_case(seed: int, slices: int = SLICES_PER_PHANTOM):
    """(low-dose HU, full-dose reference HU, phantom HU, spacing), each (z, y, x)."""
    rng = np.random.default_rng(seed + 4242)
    p = make_ct_phantom(seed=seed, rows=256, noise_hu=0.0, slice_spacing=5.0)
    # slices through the upper abdomen (liver, spleen, kidneys) and below
    body = np.flatnonzero(p.labels.reshape(p.labels.shape[0], -1).max(axis=1) > 0)
    pool = body if body.size >= slices else np.arange(p.clean.shape[0])
    index = np.sort(rng.choice(pool, size=slices, replace=False))
    truth = p.clean[index]
    photons = float(math.exp(rng.uniform(math.log(4e4), math.log(3e5))))
    low, full = simulate_low_dose(truth, p.spacing[0], photons, seed)
    return low, full, truth, p.spacing


def bundle(trained: bool = True) -> LoadedBundle:
    """The bundle as radnode loads it (file I/O swapped for identities); fresh or trained."""
    spec = read_bundle_spec(BUNDLE, require_weights=trained)
    return load_bundle(spec, "cpu", weights=trained)


def as_fed(hu: np.ndarray, spacing) -> torch.Tensor:
    """Slices through the bundle's preprocessing, as radnode feeds a series: (1, x, y, z)."""
    return volume_to_metatensor(phantom_volume(hu, spacing), 3)


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB over the slice, HU clipped to -1000..1000 (data range 2000 HU)."""
    a, b = (np.clip(x, *HU_RANGE) for x in (image, reference))
    return float(10 * np.log10((HU_RANGE[1] - HU_RANGE[0]) ** 2 / np.mean((a - b) ** 2)))


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    from monai.metrics import SSIMMetric

    a, b = (
        torch.from_numpy(np.clip(x, *HU_RANGE) - HU_RANGE[0])[:, None] for x in (image, reference)
    )
    metric = SSIMMetric(spatial_dims=2, data_range=HU_RANGE[1] - HU_RANGE[0])
    return float(metric(a, b).mean())


def body_rmse(image: np.ndarray, reference: np.ndarray, truth: np.ndarray) -> float:
    body = truth > -500
    return float(np.sqrt(np.mean((image[body] - reference[body]) ** 2)))


def classical_filters() -> dict:
    """SimpleITK's edge-preserving filters over a small grid of settings, slice by slice.

    The best setting is chosen on the evaluation images themselves, which favours the
    filters: the comparison with the GAN is conservative.
    """
    import SimpleITK as sitk

    def per_slice(operation):
        def run(volume: np.ndarray, spacing) -> np.ndarray:
            out = np.empty_like(volume)
            for k, plane in enumerate(volume):
                image = sitk.GetImageFromArray(plane.astype(np.float32))
                image.SetSpacing((float(spacing[0]), float(spacing[1])))
                out[k] = sitk.GetArrayFromImage(operation(image))
            return out

        return run

    filters = {}
    for iterations in (5, 10, 20):
        filters[f"curvature flow, {iterations} iterations"] = per_slice(
            lambda im, n=iterations: sitk.CurvatureFlow(im, timeStep=0.0625, numberOfIterations=n)
        )
    for domain_mm in (1.0, 2.0, 3.0):
        for range_hu in (50.0, 100.0, 200.0):
            filters[f"bilateral, {domain_mm:g} mm, {range_hu:g} HU"] = per_slice(
                lambda im, d=domain_mm, r=range_hu: sitk.Bilateral(im, domainSigma=d, rangeSigma=r)
            )
    return filters


def _scores(image: np.ndarray, full: np.ndarray, truth: np.ndarray) -> list[float]:
    return [
        psnr(image, full),
        ssim(image, full),
        body_rmse(image, full, truth),
        body_rmse(image, truth, truth),
    ]


def _summarise(values: list[list[float]]) -> dict:
    m = np.mean(values, axis=0)
    return {
        "psnr_db_vs_full_dose": round(float(m[0]), 2),
        "ssim_vs_full_dose": round(float(m[1]), 4),
        "rmse_hu_in_body_vs_full_dose": round(float(m[2]), 1),
        "rmse_hu_in_body_vs_phantom": round(float(m[3]), 1),
    }


def evaluate(seeds=EVAL_SEEDS) -> dict:
    trained = bundle()
    filters = classical_filters()
    rows: dict[str, list] = {"low_dose": [], "denoised": [], **{name: [] for name in filters}}
    for seed in seeds:
        low, full, truth, spacing = low_dose_case(seed, slices=4)
        out = run_bundle(trained, phantom_volume(low, spacing)).image
        assert out is not None and out.shape == low.shape
        rows["low_dose"].append(_scores(low, full, truth))
        rows["denoised"].append(_scores(out, full, truth))
        for name, run in filters.items():
            rows[name].append(_scores(run(low, spacing), full, truth))
    best = max(filters, key=lambda name: np.mean(rows[name], axis=0)[0])
    summary = {
        "held_out_seeds": f"{seeds.start}..{seeds.stop - 1} (4 slices each)",
        "low_dose": _summarise(rows["low_dose"]),
        "denoised": _summarise(rows["denoised"]),
        "best_classical_filter": {"filter": f"SimpleITK {best}", **_summarise(rows[best])},
    }
    summary["psnr_gain_db"] = round(
        summary["denoised"]["psnr_db_vs_full_dose"] - summary["low_dose"]["psnr_db_vs_full_dose"],
        2,
    )
    print(json.dumps(summary, indent=2))
    return summary


def train(iterations: int, adv_weight: float, phantoms: int, batch_size: int = 16) -> None:
    set_determinism(seed=0)
    torch.set_num_threads(THREADS)
    fresh = bundle(trained=False)
    generator_net, pre = fresh.network, fresh.preprocessing
    started = time.time()
    lows, fulls = [], []
    for seed in TRAIN_SEEDS[:phantoms]:
        low, full, _, spacing = low_dose_case(seed)
        lows.append(pre({"image": as_fed(low, spacing)})["image"].as_tensor())
        fulls.append(pre({"image": as_fed(full, spacing)})["image"].as_tensor())
    # (1, x, y, z) volumes -> (N, 1, x, y) slices
    x = torch.cat([v.permute(3, 0, 1, 2) for v in lows])
    y = torch.cat([v.permute(3, 0, 1, 2) for v in fulls])
    print(f"{len(x)} simulated slice pairs ready in {time.time() - started:.0f} s", flush=True)
    scale = HU_RANGE[1] - HU_RANGE[0]
    print(f"L1 of the low-dose input: {(x - y).abs().mean().item() * scale:.1f} HU", flush=True)

    disc = PatchDiscriminator(
        spatial_dims=2, num_layers_d=3, channels=32, in_channels=1, out_channels=1
    )
    adversarial = PatchAdversarialLoss(criterion="least_squares")
    l1 = torch.nn.L1Loss()
    opt_g = torch.optim.Adam(generator_net.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=5e-4, betas=(0.5, 0.999))
    sched_g = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, T_max=iterations)
    gen = torch.Generator().manual_seed(0)
    size = x.shape[-1]
    for it in range(1, iterations + 1):
        index = torch.randint(len(x), (batch_size,), generator=gen)
        i0, j0 = (int(v) for v in torch.randint(size - PATCH + 1, (2,), generator=gen))
        low = x[index, :, i0 : i0 + PATCH, j0 : j0 + PATCH]
        full = y[index, :, i0 : i0 + PATCH, j0 : j0 + PATCH]
        if torch.rand(1, generator=gen) < 0.5:  # flips keep the noise statistics
            low, full = low.flip(-1), full.flip(-1)
        # generator: L1 to the full-dose slice + fool the discriminator
        opt_g.zero_grad()
        fake = generator_net(low)
        pixel = l1(fake, full)
        fool = adversarial(disc(fake)[-1], target_is_real=True, for_discriminator=False)
        (pixel + adv_weight * fool).backward()
        opt_g.step()
        sched_g.step()
        # discriminator: full-dose patches real, generated ones fake
        opt_d.zero_grad()
        real_loss = adversarial(disc(full)[-1], target_is_real=True, for_discriminator=True)
        fake_loss = adversarial(
            disc(fake.detach())[-1], target_is_real=False, for_discriminator=True
        )
        (0.5 * (real_loss + fake_loss)).backward()
        opt_d.step()
        if it % 50 == 0:
            print(
                f"iteration {it}/{iterations} L1 {pixel.item() * scale:.1f} HU "
                f"G-adv {fool.item():.3f} D {0.5 * (real_loss + fake_loss).item():.3f} "
                f"({time.time() - started:.0f} s)",
                flush=True,
            )
    out = BUNDLE / "models" / "model.pt"
    torch.save(generator_net.state_dict(), out)
    print(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--adv-weight", type=float, default=0.01)
    parser.add_argument("--phantoms", type=int, default=len(TRAIN_SEEDS))
    parser.add_argument("--evaluate-only", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (speed only)")
    args = parser.parse_args(argv)
    global THREADS
    THREADS = args.threads
    torch.set_num_threads(THREADS)
    if not args.evaluate_only:
        train(args.iterations, args.adv_weight, args.phantoms)
    summary = evaluate()
    (BUNDLE / "docs").mkdir(exist_ok=True)
    (BUNDLE / "docs" / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
