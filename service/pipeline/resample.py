"""MONAI's affine resampling, computed a slab of the output at a time.

Why: ``Spacingd``, ``Invertd`` and every other MONAI spatial resample end in
``AffineTransform``, which asks torch for the sampling grid of the whole output at
once: ``affine_grid`` builds a base grid of 4 floats per output voxel and multiplies
it into a grid of 3, so for a moment it holds 28 bytes per output voxel next to the
input. Profiled on a 1000-slice CT (``bench/memory.py``), that grid was the peak of
the job: 760 MiB for the bundle's 3 mm grid, more than the decoded series itself.

:class:`SlabAffineTransform` does what MONAI's does (same checks, same normalised
matrix, same ``grid_sample``), but builds the grid and samples the output in slabs
along its first spatial axis, each grid built as torch builds it (the base grid of the
whole output, sliced). Each output voxel depends only on its own grid point, so the
result is the same; ``tests/test_pipeline_host.py`` compares it with MONAI's own.
:func:`install` makes MONAI's resampling functions use it; the transforms, their
traces and ``Invertd`` are untouched.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.layers import AffineTransform
from monai.networks.utils import to_norm_affine
from monai.utils import ensure_tuple
from torch import nn

#: Bytes of base grid per slab (4 floats a voxel): small next to any volume, and under
#: glibc's largest mmap threshold (32 MiB), so each slab's grid goes back to the system.
SLAB_GRID_BYTES = 8 * 1024 * 1024


class SlabAffineTransform(AffineTransform):
    """MONAI's ``AffineTransform``, sampled a slab at a time (see the module docstring)."""

    def forward(
        self,
        src: torch.Tensor,
        theta: torch.Tensor,
        spatial_size: Sequence[int] | int | None = None,
    ) -> torch.Tensor:
        prepared = self._prepare(src, theta, spatial_size)
        if prepared is None:  # not the case this class is for: MONAI's own
            return super().forward(src, theta, spatial_size)
        theta, dst_size = prepared
        src = src.contiguous()
        dst = torch.empty(dst_size, dtype=src.dtype, device=src.device)
        depth, height, width = dst_size[2:]
        step = max(1, SLAB_GRID_BYTES // (16 * height * width))
        coords = [
            _linspace_from_neg_one(n, self.align_corners, theta) for n in (depth, height, width)
        ]
        for start in range(0, depth, step):
            stop = min(start + step, depth)
            grid = _grid(theta, coords[0][start:stop], coords[1], coords[2])
            dst[:, :, start:stop] = nn.functional.grid_sample(
                input=src,
                grid=grid,
                mode=self.mode,
                padding_mode=self.padding_mode,
                align_corners=self.align_corners,
            )
        return dst

    def _prepare(
        self, src: Any, theta: Any, spatial_size: Sequence[int] | int | None
    ) -> tuple[torch.Tensor, tuple[int, ...]] | None:
        """MONAI's normalised, index-reversed ``theta`` and the output size, for one 3D
        image with a 4x4 / 3x4 matrix; None for anything else (2D, batches, odd input),
        which MONAI's own forward handles and checks."""
        if not (isinstance(src, torch.Tensor) and isinstance(theta, torch.Tensor)):
            return None
        if src.dim() != 5 or src.shape[0] != 1 or not torch.is_floating_point(theta):
            return None
        theta = theta[None] if theta.dim() == 2 else theta
        if (
            theta.dim() != 3
            or theta.shape[0] != 1
            or tuple(theta.shape[1:]) not in ((4, 4), (3, 4))
        ):
            return None
        theta = theta.clone()
        if tuple(theta.shape[1:]) == (3, 4):
            pad = torch.tensor([0, 0, 0, 1]).repeat(1, 1, 1).to(theta)
            theta = torch.cat([theta, pad], dim=1)
        src_size = tuple(src.shape)
        dst_size = src_size
        if self.spatial_size is not None:
            dst_size = src_size[:2] + tuple(self.spatial_size)
        if spatial_size is not None:
            dst_size = src_size[:2] + tuple(ensure_tuple(spatial_size))
        dst_size = tuple(int(s) for s in dst_size)
        if not self.normalized:
            theta = to_norm_affine(
                affine=theta,
                src_size=src_size[2:],
                dst_size=dst_size[2:],
                align_corners=self.align_corners,
                zero_centered=self.zero_centered,
            )
        if self.reverse_indexing:
            reverse = torch.as_tensor(range(2, -1, -1), device=src.device)
            theta[:, :3] = theta[:, reverse]
            theta[:, :, :3] = theta[:, :, reverse]
        return theta[:, :3], dst_size


def _linspace_from_neg_one(steps: int, align_corners: bool | None, like: torch.Tensor) -> Any:
    """torch's own ``linspace_from_neg_one`` (ATen AffineGridGenerator.cpp)."""
    if steps <= 1:
        return torch.zeros(max(steps, 1), dtype=like.dtype, device=like.device)
    values = torch.linspace(-1, 1, steps, dtype=like.dtype, device=like.device)
    if not align_corners:
        values = values * (steps - 1) / steps
    return values


def _grid(theta: torch.Tensor, zs: Any, ys: Any, xs: Any) -> torch.Tensor:
    """``affine_grid`` for the output rows ``zs`` (ATen's 3D generator: base grid
    (x, y, z, 1) per voxel times theta transposed)."""
    depth, height, width = len(zs), len(ys), len(xs)
    base = torch.empty((1, depth, height, width, 4), dtype=theta.dtype, device=theta.device)
    base.select(-1, 0).copy_(xs)
    base.select(-1, 1).copy_(ys.unsqueeze(-1))
    base.select(-1, 2).copy_(zs.unsqueeze(-1).unsqueeze(-1))
    base.select(-1, 3).fill_(1)
    grid = base.view(1, depth * height * width, 4).bmm(theta.transpose(1, 2))
    return grid.view(1, depth, height, width, 3)


_installed = False
_lock = threading.Lock()


def install() -> None:
    """Make MONAI's spatial resampling (``spatial_resample``: ``Spacingd``,
    ``SpatialResampled``, ``Invertd`` of either) use :class:`SlabAffineTransform` in
    this process. Idempotent."""
    global _installed
    with _lock:
        if _installed:
            return
        import monai.transforms.spatial.functional as functional

        functional.AffineTransform = SlabAffineTransform  # type: ignore[misc]
        _installed = True
