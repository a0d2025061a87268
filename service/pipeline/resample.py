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

**Axis-aligned bilinear resampling is separable.** When the normalised matrix maps
each output axis to the same input axis (a scale and a shift per axis, no rotation:
what ``Spacingd`` and its inverse do to an image already in RAS) and the mode is
bilinear, trilinear interpolation is one linear interpolation along each axis in turn.
:func:`_resample_separable` does that, a slab at a time: two input rows and two weights
per output index and axis, computed from the same grid coordinates ``grid_sample``
would use, with the same border / zero padding. No grid of the output is built and no
voxel is looked up eight times. On a (2, 220, 220, 168) softmax inverted to 300 x 512 x
512 (``Invertd`` of the model zoo's spleen bundle) that is 0.9 s instead of 3.5 s; the
values equal ``grid_sample``'s to float rounding (the sums run in another order, ~1e-7
relative). It is taken only where it does less work than the grid
(:func:`_separable_pays`): resampling down to a coarse model grid samples few output
voxels, and the grid is faster there. Oblique matrices, nearest and other modes keep
the grid.
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
#: Bytes of output per slab of the separable path (float32 voxels): a slab also holds
#: the input planes it is blended from, and each slab interpolates one or two planes
#: its neighbour does too, so slabs are larger than the grid path's.
SEPARABLE_SLAB_BYTES = 16 * 1024 * 1024


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
        padding = str(self.padding_mode)
        if (
            str(self.mode) == "bilinear"
            and padding in ("zeros", "border")
            and _axis_aligned(theta)
            and _separable_pays(tuple(src.shape), dst_size)
        ):
            return _resample_separable(src, theta[0], dst_size, self.align_corners, padding)
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


def _axis_aligned(theta: torch.Tensor) -> bool:
    """True when the (1, 3, 4) normalised matrix scales and shifts each axis alone."""
    square = theta[0, :, :3]
    return bool(torch.count_nonzero(square - torch.diag(torch.diagonal(square))) == 0)


def _separable_pays(src_size: tuple[int, ...], dst_size: tuple[int, ...]) -> bool:
    """Whether the separable path does less work than the grid: it interpolates every
    input plane it needs along columns and rows, so it wins when the output is at least
    about as large as the input (``Invertd`` back to the source grid, upsampling) and
    loses when it is much smaller (``Spacingd`` to a coarse model grid), where the grid
    samples only the few output voxels. Measured on 2 cores: a grid voxel costs about
    eight times a separable step (see the module docstring)."""
    in_d, in_h, _in_w = src_size[2:]
    depth, height, width = dst_size[2:]
    planes = min(in_d, 2 * depth)
    steps = planes * in_h * width + planes * height * width + depth * height * width
    return steps <= 3 * depth * height * width


def _taps(
    scale: torch.Tensor,
    shift: torch.Tensor,
    out_n: int,
    in_n: int,
    align_corners: bool,
    border: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one axis: for each output index, the two input indices around its source
    coordinate and their weights (a neighbour outside the input weighs 0 with zero
    padding). The coordinate is ATen's: the grid value ``linspace * scale + shift``,
    unnormalised as ``grid_sampler_compute_source_index`` does."""
    grid = _linspace_from_neg_one(out_n, align_corners, scale) * scale + shift
    source = (grid + 1) / 2 * (in_n - 1) if align_corners else ((grid + 1) * in_n - 1) / 2
    if border:
        source = source.clamp(0, in_n - 1)
    low = torch.floor(source)
    w_high = source - low
    w_low = 1 - w_high
    low_i = low.long()
    high_i = low_i + 1
    w_low = torch.where((low_i >= 0) & (low_i < in_n), w_low, torch.zeros_like(w_low))
    w_high = torch.where((high_i >= 0) & (high_i < in_n), w_high, torch.zeros_like(w_high))
    return low_i.clamp(0, in_n - 1), high_i.clamp(0, in_n - 1), w_low, w_high


def _lerp(
    tensor: torch.Tensor, dim: int, taps: tuple[torch.Tensor, ...], rows: slice = slice(None)
) -> torch.Tensor:
    """Linear interpolation of ``tensor`` along ``dim`` at the ``rows`` of ``taps``."""
    low, high, w_low, w_high = (t[rows] for t in taps)
    shape = [1] * tensor.dim()
    shape[dim] = -1
    out = tensor.index_select(dim, low) * w_low.to(tensor.dtype).view(shape)
    return out.addcmul_(tensor.index_select(dim, high), w_high.to(tensor.dtype).view(shape))


def _resample_separable(
    src: torch.Tensor,
    theta: torch.Tensor,
    dst_size: tuple[int, ...],
    align_corners: bool,
    padding: str,
) -> torch.Tensor:
    """Bilinear resampling for an axis-aligned ``theta`` (3, 4), a slab of output depth
    at a time: the input planes the slab needs are interpolated along columns, then
    rows (lookups along the last axis on the smallest arrays), then the slab's planes
    are blended from them (whole-plane copies). See the module docstring."""
    border = padding == "border"
    channels, depth, height, width = dst_size[1:]
    in_d, in_h, in_w = src.shape[2:]
    # grid components (x, y, z) index (width, height, depth): theta's rows 0, 1, 2
    taps_w = _taps(theta[0, 0], theta[0, 3], width, in_w, align_corners, border)
    taps_h = _taps(theta[1, 1], theta[1, 3], height, in_h, align_corners, border)
    low, high, w_low, w_high = _taps(theta[2, 2], theta[2, 3], depth, in_d, align_corners, border)
    dst = torch.empty(dst_size, dtype=src.dtype, device=src.device)
    step = max(1, SEPARABLE_SLAB_BYTES // (4 * channels * height * width))
    for start in range(0, depth, step):
        rows = slice(start, min(start + step, depth))
        first = int(torch.minimum(low[rows], high[rows]).min())
        last = int(torch.maximum(low[rows], high[rows]).max())
        planes = _lerp(_lerp(src[:, :, first : last + 1], 4, taps_w), 3, taps_h)
        local = (low[rows] - first, high[rows] - first, w_low[rows], w_high[rows])
        dst[:, :, rows] = _lerp(planes, 2, local)
    return dst


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
