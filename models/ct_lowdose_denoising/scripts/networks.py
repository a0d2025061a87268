"""The generator: a small MONAI UNet plus a full-resolution head that estimates the noise.

Why this shape:

* Residual: a low-dose slice is already almost the answer. The network estimates the
  noise and subtracts it, so flat regions keep their HU; the last layer starts at zero,
  so training starts from the identity (the low-dose image) and only improves on it.
* The UNet (MONAI, strided from its first layer) sees the context that tells streaks
  from edges; the head (two 3x3 convolutions on the input and the UNet's features at
  full resolution) places the estimate pixel by pixel, which a strided UNet alone
  cannot: low-dose noise lives at the finest scale.
* Small: 300 slices of 512 x 512 in well under a minute on two CPU cores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import UNet


class ResidualDenoiser(torch.nn.Module):
    """``x - head(x, UNet(x))`` for single-channel 2D slices scaled as the bundle scales them."""

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        num_res_units: int = 1,
        features: int = 16,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.context = UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=features,
            channels=channels,
            strides=strides,
            num_res_units=num_res_units,
            norm=norm,
        )
        self.head = torch.nn.Sequential(
            torch.nn.Conv2d(features + 1, features, kernel_size=3, padding=1),
            torch.nn.PReLU(features),
            torch.nn.Conv2d(features, 1, kernel_size=3, padding=1),
        )
        torch.nn.init.zeros_(self.head[-1].weight)
        torch.nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = self.head(torch.cat([x, self.context(x)], dim=1))
        return x - noise
