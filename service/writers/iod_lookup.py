"""A cache in front of highdicom's "is this attribute in that IOD?" lookup.

Why: highdicom asks ``is_multiframe_image`` of every source image of a SEG (is
Per-Frame Functional Groups Sequence in the image's IOD?), and each answer walks every
module of the IOD in the standard's tables: 0.42 ms a call, 0.13 s of the 1.6 s that
writing a 300-slice CT segmentation's results took (cProfile, issue 11's note). The
answer depends only on the attribute and the SOP class, which the standard tables fix,
so it is computed once per pair. Nothing else of highdicom changes; highdicom is
pinned in ``constraints.txt`` and ``tests/test_writers.py`` checks the cached answers
against highdicom's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

from highdicom import _standard_utils

_uncached = _standard_utils.is_attribute_in_iod


@cache
def _lookup(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
    return _uncached(attribute, sop_class_uid, exclude)


def is_attribute_in_iod(
    attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None
) -> bool:
    """highdicom's ``is_attribute_in_iod``, answered from a cache."""
    exclude = None if exclude_path_elements is None else tuple(exclude_path_elements)
    return _lookup(attribute, str(sop_class_uid), exclude)


def install() -> None:
    """Answer highdicom's own calls (``is_multiframe_image``,
    ``does_iod_have_pixel_data``) from the cache; idempotent."""
    _standard_utils.is_attribute_in_iod = is_attribute_in_iod
