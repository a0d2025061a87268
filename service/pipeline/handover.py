"""What a bundle's ``LoadImaged`` becomes: the hand-over of radnode's input item.

Why not a plain ``Identityd``: MONAI's dictionary transforms copy the dictionary they
are given, so the item radnode passes to the preprocessing stays alive, holding the
float32 input volume, until the whole preprocessing returns; the volume then outlives
the ``Spacingd`` that made it redundant. On a 1000-slice CT that was 1000 MiB held
through the rest of the preprocessing (``bench/memory.py``). :class:`HandOverd` passes
the item on and empties the caller's dictionary, so the volume is freed as soon as the
transform that replaces it has run.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.transforms import EnsureChannelFirstd, Identityd


class HandOverd(Identityd):
    """``Identityd`` that takes its input: the caller's dictionary is emptied.

    ``ensure_channel_first``: what the replaced ``LoadImaged(ensure_channel_first=True)``
    did, for bundles that have no ``EnsureChannelFirstd`` of their own (without it the
    spatial transforms took x for the channel axis; found by review)."""

    def __init__(
        self, keys: Any, allow_missing_keys: bool = False, ensure_channel_first: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self._channel_first = (
            EnsureChannelFirstd(keys, allow_missing_keys=allow_missing_keys)
            if ensure_channel_first
            else None
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        taken = dict(data)
        if isinstance(data, dict):
            data.clear()
        handed = super().__call__(taken)
        return self._channel_first(handed) if self._channel_first is not None else handed
