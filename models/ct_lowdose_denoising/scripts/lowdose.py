"""Low-dose CT simulation in the projection domain (parallel beam, torch only).

``simulate_low_dose(hu, pixel_mm, photons, seed)`` takes axial slices in HU, forward
projects them (a Radon transform: rotate with bilinear interpolation, sum along rays),
turns line integrals into detector counts ``I0 * exp(-p)``, draws Poisson counts at
``photons`` per ray, takes the log again and reconstructs with filtered back-projection
(Ram-Lak filter built in the spatial domain, linear interpolation on the detector).
``reconstruct_clean`` is the same reconstruction without noise: the full-dose target.

Water attenuation is taken as 0.0192 /mm (about 70 keV effective); HU = 1000 (mu/mu_w - 1).
This is the textbook model (no beam hardening, scatter, electronic noise or fan beam),
enough to give low-dose CT its streaky, spatially correlated, attenuation-dependent noise.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MU_WATER_PER_MM = 0.0192


def _angles(count: int) -> torch.Tensor:
    return torch.arange(count, dtype=torch.float64) * (math.pi / count)


def _detector(n: int) -> int:
    return math.ceil(n * math.sqrt(2)) // 2 * 2 + 1


_CHUNK = 32  # views per grid_sample call: bounds memory, keeps calls large


def forward_project(mu: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """(B, N, N) attenuation per pixel -> (B, A, D) line integrals; D covers the diagonal.

    Each view samples the image (bilinear, zero outside) on a rotated D x D grid of unit
    steps and sums along the rays.
    """
    b, n, _ = mu.shape
    d = _detector(n)
    steps = torch.arange(d, dtype=torch.float64) - (d - 1) / 2  # pixels from the centre
    ray, bin_ = torch.meshgrid(steps, steps, indexing="ij")  # along the ray, detector bin
    out = []
    for first in range(0, len(angles), _CHUNK):
        chunk = angles[first : first + _CHUNK]
        c, s = torch.cos(chunk)[:, None, None], torch.sin(chunk)[:, None, None]
        x = bin_ * c - ray * s  # pixel coordinates of every sample, (a, D, D)
        y = bin_ * s + ray * c
        scale = 2.0 / (n - 1)
        grid = torch.stack([x * scale, y * scale], dim=-1).float().reshape(1, -1, d, 2)
        sampled = F.grid_sample(mu[None], grid, mode="bilinear", align_corners=True)
        out.append(sampled[0].reshape(b, len(chunk), d, d).sum(dim=2))
    return torch.cat(out, dim=1)


def _ramp(d: int) -> torch.Tensor:
    size = 1 << math.ceil(math.log2(2 * d))
    n = torch.cat([torch.arange(1, size // 2 + 1, 2), torch.arange(size // 2 - 1, 0, -2)])
    h = torch.zeros(size, dtype=torch.float64)
    h[0] = 0.25
    h[1::2] = -1.0 / (math.pi * n.double()) ** 2
    return 2 * torch.fft.fft(h).real


def back_project(sino: torch.Tensor, angles: torch.Tensor, n: int) -> torch.Tensor:
    """Filtered back-projection of (B, A, D) line integrals onto (B, N, N) pixels."""
    b, a, d = sino.shape
    ramp = _ramp(d)
    filtered = (
        torch.fft.ifft(
            torch.fft.fft(F.pad(sino.double(), (0, ramp.numel() - d)), dim=-1) * ramp, dim=-1
        )
        .real[..., :d]
        .float()
    )
    coords = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    image = torch.zeros(b, n * n)
    for first in range(0, a, _CHUNK):
        chunk = angles[first : first + _CHUNK]
        # detector position (pixels from the centre) of the ray through each pixel
        t = xx[None] * torch.cos(chunk)[:, None, None] + yy[None] * torch.sin(chunk)[:, None, None]
        gx = (t / ((d - 1) / 2)).reshape(1, len(chunk), n * n)
        gy = 2 * torch.arange(first, first + len(chunk), dtype=torch.float64) / (a - 1) - 1
        grid = torch.stack([gx, gy[None, :, None].expand_as(gx)], dim=-1).float()
        sampled = F.grid_sample(filtered[None], grid, mode="bilinear", align_corners=True)
        image += sampled[0].sum(dim=1)
    return (image * (math.pi / (2 * a))).reshape(b, n, n)


def _to_mu(hu: torch.Tensor, pixel_mm: float) -> torch.Tensor:
    return (hu / 1000.0 + 1.0).clamp(min=0.0) * MU_WATER_PER_MM * pixel_mm


def _to_hu(mu: torch.Tensor, pixel_mm: float) -> torch.Tensor:
    return (mu / (MU_WATER_PER_MM * pixel_mm) - 1.0) * 1000.0


def _views(n: int) -> int:
    return n  # N views over 180 degrees: a little under-sampled, cheap


def reconstruct_clean(hu: np.ndarray, pixel_mm: float) -> np.ndarray:
    """(B, N, N) HU -> noise-free FBP reconstruction in HU (the full-dose reference)."""
    with torch.no_grad():
        mu = _to_mu(torch.as_tensor(hu, dtype=torch.float32), pixel_mm)
        angles = _angles(_views(mu.shape[-1]))
        sino = forward_project(mu, angles)
        return _to_hu(back_project(sino, angles, mu.shape[-1]), pixel_mm).numpy()


def simulate_low_dose(
    hu: np.ndarray, pixel_mm: float, photons: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(B, N, N) HU -> (low-dose FBP, noise-free FBP), both in HU, float32.

    ``photons`` is the unattenuated count per ray and view (I0): 1e4-1e5 is low dose
    for an adult abdomen at these matrix sizes.
    """
    with torch.no_grad():
        mu = _to_mu(torch.as_tensor(hu, dtype=torch.float32), pixel_mm)
        n = mu.shape[-1]
        angles = _angles(_views(n))
        sino = forward_project(mu, angles)
        generator = torch.Generator().manual_seed(seed)
        counts = torch.poisson(photons * torch.exp(-sino), generator=generator).clamp(min=1.0)
        noisy = -torch.log(counts / photons)
        low = _to_hu(back_project(noisy, angles, n), pixel_mm)
        clean = _to_hu(back_project(sino, angles, n), pixel_mm)
        return low.numpy().astype(np.float32), clean.numpy().astype(np.float32)
