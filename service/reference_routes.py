"""The routes radnode uses when the configuration names none: the reference bundles.

Why: a new node should show real results the first time a study arrives, before
anyone has written a routing rule. These routes send no results anywhere (no
destinations); results stay under ``<data_dir>/results`` and in the status API until
the operator configures ``[[routes]]``, which replaces all of these. A route whose
bundle folder or weights are missing from ``models.dir`` is left out, so a node with
other models (or without mr_brain_extraction's install step) is not flooded with
failing jobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.pipeline.bundle import find_weights
from service.routing import RouteRule

#: Body parts a CT abdomen model has no business reading (BodyPartExamined).
_NOT_ABDOMEN = "(?i)head|brain|skull|neck|extremity|arm|hand|knee|leg|foot|ankle|shoulder"

#: T1-weighted series descriptions: "T1 3D", "t1_mprage_sag", "SAG FSPGR BRAVO", "3D TFE".
_T1 = r"(?i)(^|[^a-z0-9])t1|mp-?rage|spgr|bravo|(^|[^a-z0-9])tfe([^a-z0-9]|$)"
#: Body parts a brain model has no business reading.
_NOT_HEAD = "(?i)spine|neck|chest|breast|abdomen|pelvis|knee|hip|shoulder|extremity|cardiac"
#: View Positions (PS3.3 C.8.11.5.1.1 defined terms) of non-frontal radiographs.
_LATERAL_OR_OBLIQUE = r"(?i)^\s*(LL|RL|LLO|RLO|LAT|LATERAL)\s*$"
#: Digital X-Ray Image Storage - For Processing (PS3.4 B.5).
_DX_FOR_PROCESSING = r"^1\.2\.840\.10008\.5\.1\.4\.1\.1\.1\.1\.1$"

_REFERENCE: list[dict[str, Any]] = [
    {
        "name": "ct-abdomen-organs",
        "pipeline": "ct_abdomen_segmentation",
        "match": {
            "Modality": {"equals": "CT"},
            "ImageType": {"excludes": ["LOCALIZER"]},
            "ImageCount": {"min": 20},
            "Orientation": {"equals": "axial"},
            "BodyPartExamined": {"not_regex": _NOT_ABDOMEN},
        },
    },
    {
        "name": "ct-low-dose-denoising",
        "pipeline": "ct_lowdose_denoising",
        "match": {
            "Modality": {"equals": "CT"},
            "ImageType": {"excludes": ["LOCALIZER"]},
            "Orientation": {"equals": "axial"},
            "SeriesDescription": {"regex": r"(?i)low.?dose|\bLDCT\b"},
        },
    },
    {
        "name": "mr-brain-extraction",
        "pipeline": "mr_brain_extraction",
        "match": {
            "Modality": {"equals": "MR"},
            "ImageType": {"excludes": ["LOCALIZER"]},
            "ImageCount": {"min": 60},
            "SeriesDescription": {"regex": _T1},
            "BodyPartExamined": {"not_regex": _NOT_HEAD},
        },
    },
    {
        "name": "chest-radiograph-nodule",
        "pipeline": "cxr_nodule_classification",
        "match": {
            "Modality": {"any_of": ["CR", "DX"]},
            # (derived radiographs are left out before any route: include_derived)
            "BodyPartExamined": {"regex": "(?i)chest|thorax|lung"},
            # frontal views only, as the model was trained (a lateral of a two-view
            # study was picked by its lower series number: acceptance pass); a
            # radiograph without View Position still runs
            "ViewPosition": {"not_regex": _LATERAL_OR_OBLIQUE},
            # a DX "for processing" is the detector's raw data, before the processing
            # a reader (and the model's training images) sees (acceptance pass)
            "SOPClassUID": {"not_regex": _DX_FOR_PROCESSING},
        },
    },
]


def _installed(bundle: Path) -> bool:
    """A bundle folder with its weights (mr_brain_extraction's come by an install step)."""
    return (bundle / "configs").is_dir() and find_weights(bundle) is not None


def reference_routes(models_dir: Path) -> list[RouteRule]:
    """The reference routes whose bundle is installed, with weights, in ``models_dir``."""
    return [
        RouteRule.model_validate(route)
        for route in _REFERENCE
        if _installed(models_dir / route["pipeline"])
    ]
