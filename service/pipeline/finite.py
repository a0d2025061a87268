"""Whether a tensor holds only finite values, in one reduction.

Why: ``torch.isfinite(t).all()`` builds a boolean tensor as large as ``t`` and reads
it again; on a CT segmentation's 5-channel output (1 x 5 x 131 x 131 x 485 float32,
166 MB) that took 0.21-0.28 s, and a job checks its model's output three times (the
model's output, before the argmax, after the postprocessing). ``torch.aminmax``
propagates NaN and keeps an infinity at the end it belongs to, so the two values it
returns are finite exactly when every value is: 6 ms for the same tensor.
"""

from __future__ import annotations

from typing import Any

import torch


def all_finite(tensor: Any) -> bool:
    """True when no value of the floating-point ``tensor`` is NaN or infinite (an
    empty tensor, or one of another type, has none)."""
    if not torch.is_tensor(tensor) or not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
