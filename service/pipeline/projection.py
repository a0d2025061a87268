"""Which image of a series of radiographs a 2D pipeline reads: the frontal one.

A chest examination is often sent as one series holding the PA (or AP) and the
lateral view. A 2D pipeline reads one image, and a series of several projections
cannot be stacked in space, so the series was refused ("route each instance on its
own", which no setting allows) and the PA was never read (acceptance pass). This picks
the image a reader of the pipeline's input would pick: a frontal view, PA before AP,
the last taken of several (a repeat exposure replaces the first). A series with no
frontal view is refused with that reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pydicom

from service.pipeline.volume import PROJECTION_MODALITIES, SeriesRefused
from service.records import FRONTAL_VIEWS


@dataclass(frozen=True)
class _View:
    path: str
    modality: str
    view: str
    instance_number: int


def frontal_projection(paths: Sequence[str]) -> list[str]:
    """``paths`` as they are, or the one frontal radiograph among them.

    Only a series of several radiographs (every image a projection modality) is
    narrowed; anything else is left for the volume loader to judge. Raises
    :class:`SeriesRefused` when such a series has no PA or AP image.
    """
    if len(paths) < 2:
        return list(paths)
    try:
        views = [_read(path) for path in paths]
    except Exception:  # pydicom raises many types: the volume loader says what is wrong
        return list(paths)
    if not all(v.modality in PROJECTION_MODALITIES for v in views):
        return list(paths)
    for wanted in FRONTAL_VIEWS:
        frontal = [v for v in views if v.view == wanted]
        if frontal:
            return [max(frontal, key=lambda v: v.instance_number).path]
    seen = sorted({v.view or "none" for v in views})
    raise SeriesRefused(
        f"the series holds {len(views)} radiographs and none is a frontal view (View"
        f" Position PA or AP; found: {', '.join(seen)}); the pipeline reads one frontal"
        " image",
        code="no_frontal_view",
    )


def _read(path: str) -> _View:
    header = pydicom.dcmread(
        path, stop_before_pixels=True, specific_tags=["Modality", "ViewPosition", "InstanceNumber"]
    )
    try:
        number = int(header.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    return _View(
        path=path,
        modality=str(header.get("Modality", "") or "").upper(),
        view=str(header.get("ViewPosition", "") or "").strip().upper(),
        instance_number=number,
    )
