"""deepbet's two-stage brain extraction as a MONAI inferer.

deepbet (Fisch et al., MIT licence) runs two TorchScript LinkNet3d networks on a T1
volume in its own voxel grid, reoriented to RAS (``nib.as_closest_canonical``; here
``Orientationd(axcodes="RAS")`` does the same):

1. the whole head, resized to 128³ (nearest-exact), goes through the *bbox* network;
   the largest connected brain component gives a bounding box, widened by 10 % of its
   size on each side;
2. that box, resized to 256³, goes through the main network, and its brain probability
   is resized back into the box.

Both stages normalise with the 0.5 / 99.5 % intensity quantiles of the 128³ image:
``clip((x - q_low) / (q_high - q_low), 0, 1)``, then to zero mean and unit s.d., then
``0.226 * x + 0.449``. Why an inferer and not a network: the crop between the stages
depends on the first stage's answer, which neither a transform chain nor a sliding
window can express, and keeping it here leaves ``network`` the main TorchScript model,
as radnode loads any ``models/model.ts``.

The inferer returns two channels (background, brain probability) in the input grid;
thresholding, the largest component and hole filling are postprocessing transforms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.transforms import KeepLargestConnectedComponent


def normalise(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """deepbet's intensity normalisation (see the module docstring)."""
    x = ((x - low) / (high - low)).clamp(0, 1)
    x = (x - x.mean()) / x.std().clamp_min(1e-6)
    return 0.226 * x + 0.449


def box_with_margin(
    mask: torch.Tensor, shape: Sequence[int], margin: float, threshold: float = 0.02
) -> tuple[slice, ...]:
    """The brain's box in a ``shape`` grid, from its mask in the small grid, widened.

    An axis position belongs to the box where more than ``threshold`` of the plane
    through it is brain, as in deepbet. Raises ``ValueError`` when there is no brain.
    """
    ranges = [
        torch.where(mask.float().mean(dim=dims) > threshold)[0] for dims in ((1, 2), (0, 2), (0, 1))
    ]
    if any(r.numel() == 0 for r in ranges):
        raise ValueError("no brain found in the first stage; is this a T1-weighted head MR series?")
    scale = torch.tensor(shape, dtype=torch.float64) / torch.tensor(mask.shape, dtype=torch.float64)
    box = []
    for r, s, n in zip(ranges, scale, shape, strict=True):
        center = float(((r.max() + 1 + r.min()) / 2) * s)
        size = float(((r.max() + 1) - r.min()) * s * (1 + 2 * margin))
        center, size = round(center), round(size)
        box.append(slice(max(0, int(center - size / 2)), min(int(n), int(center + size / 2))))
    return tuple(box)


class BrainBoxInferer:
    """Whole head at ``small_shape`` through ``bbox_network``, then the box at ``shape``.

    Called by radnode (or a MONAI evaluator) as ``inferer(inputs, network)`` with
    ``inputs`` of shape (B, 1, X, Y, Z); returns (B, 2, X, Y, Z) probabilities.
    """

    def __init__(
        self,
        bbox_network: torch.nn.Module,
        small_shape: Sequence[int] = (128, 128, 128),
        shape: Sequence[int] = (256, 256, 256),
        margin: float = 0.1,
    ) -> None:
        self.bbox_network = bbox_network
        self.small_shape = tuple(small_shape)
        self.shape = tuple(shape)
        self.margin = margin
        self._largest = KeepLargestConnectedComponent()

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        return torch.stack([self._one(image[0], network) for image in inputs])

    def _one(self, x: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        x = torch.nan_to_num(x.as_tensor() if hasattr(x, "as_tensor") else x).float()
        small = F.interpolate(x[None, None], self.small_shape, mode="nearest-exact")[0, 0]
        low, high = small.quantile(0.005), small.quantile(0.995)
        first = self.bbox_network(normalise(small, low, high)[None, None])[0, 1]
        head = self._largest((first > 0.5)[None])[0]
        box = box_with_margin(head, x.shape, self.margin)
        crop = F.interpolate(x[box][None, None], self.shape, mode="nearest-exact")[0, 0]
        brain = network(normalise(crop, low, high)[None, None])[0, 1]
        probability = torch.zeros_like(x)
        probability[box] = F.interpolate(
            brain[None, None], probability[box].shape, mode="nearest-exact"
        )[0, 0]
        return torch.stack([1 - probability, probability])
