"""Routing: which series of a complete study go to which pipeline, and where results go.

A route (``[[routes]]`` in the TOML configuration) names a pipeline, its destinations
and the conditions a series must meet, one condition per series attribute; all of a
route's conditions must hold (*all* semantics), and each condition's ``any_of`` list
gives *any* semantics within one attribute. Several routes may name the same pipeline
to express "this or that". For example::

    [[routes]]
    name = "ct-abdomen-organs"
    pipeline = "ct_abdomen_segmentation"
    destinations = ["pacs", "ris"]
    [routes.match]
    Modality = "CT"                                   # shorthand for { equals = "CT" }
    BodyPartExamined = ["ABDOMEN", "CHEST_ABDOMEN"]   # shorthand for { any_of = [...] }
    SeriesDescription = { regex = "(?i)abd|liver", not_regex = "(?i)scout|localizer" }
    ImageCount = { min = 40 }
    SliceThickness = { max = 5.0 }
    ImageType = { excludes = ["LOCALIZER"] }
    Orientation = { any_of = ["axial"] }

Condition semantics:

- ``equals`` / ``any_of``: text is compared case-insensitively with surrounding spaces
  ignored; numbers compare as numbers. On ImageType, ``any_of`` means "at least one of
  these values is present" and ``equals`` compares the whole value (``ORIGINAL\\PRIMARY``).
- ``regex`` / ``not_regex``: Python regular expressions, searched anywhere in the value
  (anchor with ``^``/``$``), case-sensitive unless the pattern says ``(?i)``.
- ``min`` / ``max``: inclusive bounds on numeric attributes.
- ``contains`` / ``excludes``: all / none of the listed values present (ImageType);
  ``excludes`` also works on single-valued text ("Modality is none of these").
- ``present``: the attribute has a value (``true``) or has none (``false``).
- An absent value fails every condition except ``not_regex``, ``excludes`` and
  ``present = false``.

``InstanceCount`` counts the series' instances, ``ImageCount`` its 2D images: an
Enhanced CT or MR sends a whole series as one instance of many frames, and its
orientation, slice thickness and anatomy come from its functional groups
(:mod:`service.headers`). "Enough slices" is ``ImageCount``.

Loop safety comes before any rule: a series radnode produced itself
(Manufacturer ``radnode``) never matches, and a derived series (ImageType DERIVED or
SECONDARY) matches only routes that set ``include_derived = true``. An acquired series
that was compressed lossily (Lossy Image Compression 01, ImageType DERIVED\\PRIMARY: a
PACS archiving in JPEG, DCMTK's ``dcmcjpeg``) is not derived in this sense: its images
are the scanner's, and its results say that they were made from lossy images.

When several series of one study match a route, ``pick`` decides which run: ``all``,
or one chosen by ``most_instances`` (most images, frames counted), ``thinnest_slices``
or ``first`` (lowest SeriesNumber). :func:`plan` returns the selections and, for every
series a route did not take, the reason, in words an operator can act on.
SeriesDescription is free text that may hold patient data, so reasons never quote its
value.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from re import Pattern
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from service.records import SeriesInfo

#: Manufacturer written into every object radnode produces; such series never route.
RADNODE_MANUFACTURER = "radnode"

#: ImageType values that mark a series as derived (not acquired).
DERIVED_IMAGE_TYPES = frozenset({"DERIVED", "SECONDARY"})

#: Below this absolute component of the slice normal, a series is "oblique".
OBLIQUE_THRESHOLD = 0.8

ORIENTATIONS = ("axial", "coronal", "sagittal", "oblique")

PickPolicy = Literal["all", "most_instances", "thinnest_slices", "first"]

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


# --------------------------------------------------------------------------- attributes


class AttributeKind(StrEnum):
    TEXT = "text"
    NUMBER = "number"
    MULTI = "multi"  # multi-valued text, such as ImageType


@dataclass(frozen=True)
class _Attribute:
    kind: AttributeKind
    get: Callable[[SeriesInfo], Any]
    #: Free text that may carry patient data: reasons never quote its value.
    free_text: bool = False


def orientation_label(iop: Sequence[float] | None) -> str | None:
    """Name the slice plane of an ImageOrientationPatient (six direction cosines).

    The slice normal is the cross product of the row and column directions; its largest
    component names the plane (x: sagittal, y: coronal, z: axial), and a normal whose
    largest component is below :data:`OBLIQUE_THRESHOLD` is "oblique". Returns None
    when the orientation is missing or degenerate.
    """
    if iop is None or len(iop) != 6:
        return None
    try:
        rx, ry, rz, cx, cy, cz = (float(v) for v in iop)
    except (TypeError, ValueError):
        return None
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    length = math.sqrt(sum(n * n for n in normal))
    if not math.isfinite(length) or length < 1e-6:
        return None
    components = [abs(n) / length for n in normal]
    largest = max(components)
    if largest < OBLIQUE_THRESHOLD:
        return "oblique"
    return ("sagittal", "coronal", "axial")[components.index(largest)]


ATTRIBUTES: dict[str, _Attribute] = {
    "Modality": _Attribute(AttributeKind.TEXT, lambda s: s.modality),
    "BodyPartExamined": _Attribute(AttributeKind.TEXT, lambda s: s.body_part),
    "SeriesDescription": _Attribute(
        AttributeKind.TEXT, lambda s: s.series_description, free_text=True
    ),
    "SOPClassUID": _Attribute(AttributeKind.TEXT, lambda s: s.sop_class_uid),
    "SeriesNumber": _Attribute(AttributeKind.NUMBER, lambda s: s.series_number),
    "InstanceCount": _Attribute(AttributeKind.NUMBER, lambda s: s.instance_count),
    "ImageCount": _Attribute(AttributeKind.NUMBER, lambda s: s.images),
    "SliceThickness": _Attribute(AttributeKind.NUMBER, lambda s: s.slice_thickness),
    "ImageType": _Attribute(AttributeKind.MULTI, lambda s: s.image_type),
    "Manufacturer": _Attribute(AttributeKind.TEXT, lambda s: s.manufacturer),
    "ManufacturerModelName": _Attribute(AttributeKind.TEXT, lambda s: s.manufacturer_model_name),
    "Orientation": _Attribute(AttributeKind.TEXT, lambda s: orientation_label(s.image_orientation)),
    "ViewPosition": _Attribute(AttributeKind.TEXT, lambda s: s.view_position),
}


def attribute_value(series: SeriesInfo, attribute: str) -> Any:
    """The value a rule sees for ``attribute`` (a key of :data:`ATTRIBUTES`)."""
    return ATTRIBUTES[attribute].get(series)


def _norm(text: str) -> str:
    return text.strip().casefold()


def _fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _fmt_list(values: Iterable[str | float]) -> str:
    return "[" + ", ".join(_fmt_number(v) if not isinstance(v, str) else v for v in values) + "]"


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == ""
    if isinstance(value, tuple):
        return not any(str(v).strip() for v in value)
    return False


# --------------------------------------------------------------------------- conditions


class AttributeCondition(BaseModel):
    """One condition on one series attribute; every test given must hold.

    A bare string or number stands for ``{ equals = ... }`` and a bare list for
    ``{ any_of = [...] }``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    equals: str | float | None = None
    any_of: list[str | float] | None = Field(default=None, min_length=1)
    regex: Pattern[str] | None = None
    not_regex: Pattern[str] | None = None
    min: float | None = None
    max: float | None = None
    contains: list[str] | None = Field(default=None, min_length=1)
    excludes: list[str] | None = Field(default=None, min_length=1)
    present: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, bool):
            raise ValueError(
                "a bare true/false is not a condition; write { present = true } or "
                '{ equals = "..." }'
            )
        if isinstance(data, str | int | float):
            return {"equals": data}
        if isinstance(data, list | tuple):
            return {"any_of": list(data)}
        if isinstance(data, dict):
            for key in ("equals", "min", "max"):
                if isinstance(data.get(key), bool):
                    raise ValueError(f"{key} must be text or a number, not true/false")
            values = data.get("any_of")
            if isinstance(values, list) and any(isinstance(v, bool) for v in values):
                raise ValueError("any_of must list text or numbers, not true/false")
        return data

    @field_validator("regex", "not_regex", mode="before")
    @classmethod
    def _compile(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _coherent(self) -> AttributeCondition:
        tests = self.tests()
        if not tests:
            raise ValueError(
                "empty condition; give at least one of equals, any_of, regex, not_regex, "
                "min, max, contains, excludes, present"
            )
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {_fmt_number(self.min)} > max {_fmt_number(self.max)}")
        if self.present is False and len(tests) > 1:
            raise ValueError("present = false cannot be combined with other tests")
        return self

    def tests(self) -> list[str]:
        """The names of the tests this condition sets, in declaration order."""
        return [name for name in type(self).model_fields if getattr(self, name) is not None]

    def problems_for(self, attribute: str, kind: AttributeKind) -> list[str]:
        """Why this condition cannot apply to ``attribute`` (empty when it can)."""
        where = f"match.{attribute}"
        problems: list[str] = []
        if kind is AttributeKind.NUMBER:
            for test in ("regex", "not_regex", "contains", "excludes"):
                if getattr(self, test) is not None:
                    problems.append(f"{where}: {test} does not apply to a numeric attribute")
            values = [self.equals] if self.equals is not None else []
            values += self.any_of or []
            if any(isinstance(v, str) for v in values):
                problems.append(f"{where}: equals/any_of must be numbers")
        else:
            for test in ("min", "max"):
                if getattr(self, test) is not None:
                    problems.append(f"{where}: {test} applies only to numeric attributes")
            values = [self.equals] if self.equals is not None else []
            values += self.any_of or []
            if any(not isinstance(v, str) for v in values):
                problems.append(f'{where}: equals/any_of must be text (write "..." in quotes)')
            if kind is AttributeKind.TEXT and self.contains is not None:
                problems.append(
                    f"{where}: contains applies to multi-valued attributes (ImageType); "
                    "use equals or any_of"
                )
        if attribute == "Orientation":
            for value in values:
                if isinstance(value, str) and _norm(value) not in ORIENTATIONS:
                    problems.append(
                        f"{where}: unknown orientation {value!r}; "
                        f"use one of {', '.join(ORIENTATIONS)}"
                    )
        if attribute == "SOPClassUID":
            for value in values:
                if isinstance(value, str) and _sop_class_uid(value) is None:
                    problems.append(
                        f"{where}: {value!r} is neither a UID nor a known SOP class keyword"
                    )
        return problems

    def failures(self, attribute: str, value: Any) -> list[str]:
        """Why ``value`` of ``attribute`` fails this condition (empty when it holds)."""
        spec = ATTRIBUTES[attribute]
        shown = _shown(attribute, value)
        if _is_missing(value):
            if self.present is False:
                return []
            needs = [t for t in self.tests() if t not in ("not_regex", "excludes")]
            if needs:
                return [f"{attribute} missing (required by {', '.join(needs)})"]
            return []
        if self.present is False:
            return [f"{attribute} {shown} present (present = false)"]

        if spec.kind is AttributeKind.NUMBER:
            return self._number_failures(attribute, float(value), shown)
        if spec.kind is AttributeKind.MULTI:
            values = tuple(str(v) for v in value)
            return self._text_failures(attribute, "\\".join(values), values, shown)
        return self._text_failures(attribute, str(value), (str(value),), shown)

    def _number_failures(self, attribute: str, value: float, shown: str) -> list[str]:
        out: list[str] = []
        if self.equals is not None and not _close(value, float(self.equals)):
            out.append(f"{attribute} {shown} != {_fmt_number(float(self.equals))}")
        if self.any_of is not None and not any(_close(value, float(v)) for v in self.any_of):
            out.append(f"{attribute} {shown} not in {_fmt_list(self.any_of)}")
        if self.min is not None and value < self.min:
            out.append(f"{attribute} {shown} < min {_fmt_number(self.min)}")
        if self.max is not None and value > self.max:
            out.append(f"{attribute} {shown} > max {_fmt_number(self.max)}")
        return out

    def _text_failures(
        self, attribute: str, whole: str, values: tuple[str, ...], shown: str
    ) -> list[str]:
        out: list[str] = []
        present = {_norm(v) for v in values}
        multi = ATTRIBUTES[attribute].kind is AttributeKind.MULTI
        if self.equals is not None and not _text_equal(attribute, whole, str(self.equals)):
            out.append(f"{attribute} {shown} != {self.equals}")
        if self.any_of is not None:
            wanted = [str(v) for v in self.any_of]
            if multi:
                if not present & {_norm(v) for v in wanted}:
                    out.append(f"{attribute} {shown} has none of {_fmt_list(wanted)}")
            elif not any(_text_equal(attribute, whole, v) for v in wanted):
                out.append(f"{attribute} {shown} not in {_fmt_list(wanted)}")
        if self.regex is not None and not self.regex.search(whole):
            out.append(f"{attribute} {shown} does not match regex {self.regex.pattern!r}")
        if self.not_regex is not None and self.not_regex.search(whole):
            out.append(f"{attribute} {shown} matches not_regex {self.not_regex.pattern!r}")
        if self.contains is not None:
            lacking = [v for v in self.contains if _norm(v) not in present]
            if lacking:
                out.append(f"{attribute} {shown} lacks {_fmt_list(lacking)}")
        if self.excludes is not None:
            found = [v for v in self.excludes if _norm(v) in present]
            if found:
                out.append(f"{attribute} {shown} has excluded {_fmt_list(found)}")
        return out


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


@functools.lru_cache(maxsize=256)
def _sop_class_uid(value: str) -> str | None:
    """A SOP Class UID given as a UID or as a pydicom keyword (``CTImageStorage``)."""
    value = value.strip()
    if re.fullmatch(r"[0-9]+(\.[0-9]+)*", value):
        return value
    from pydicom.uid import UID_dictionary

    for uid, entry in UID_dictionary.items():
        if entry[4].casefold() == value.casefold():
            return str(uid)
    return None


def _text_equal(attribute: str, actual: str, wanted: str) -> bool:
    if attribute == "SOPClassUID":
        return actual.strip() == (_sop_class_uid(wanted) or wanted.strip())
    return _norm(actual) == _norm(wanted)


def _shown(attribute: str, value: Any) -> str:
    """How a reason shows a value: never the value of a free-text attribute."""
    if ATTRIBUTES[attribute].free_text:
        return "(value withheld)"
    if value is None:
        return "missing"
    if isinstance(value, tuple):
        return "\\".join(str(v) for v in value) or "missing"
    if isinstance(value, int | float):
        return _fmt_number(float(value))
    return str(value).strip() or "missing"


# --------------------------------------------------------------------------- routes


class RouteRule(BaseModel):
    """One ``[[routes]]`` entry: series that meet ``match`` go to ``pipeline``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME_PATTERN, max_length=64)
    pipeline: str = Field(pattern=_NAME_PATTERN, max_length=128)
    destinations: list[str] = Field(default_factory=list)
    #: Attribute keyword -> condition. All must hold; an empty table matches every series.
    match: dict[str, AttributeCondition] = Field(default_factory=dict)
    #: Which of several matching series of one study run.
    pick: PickPolicy = "most_instances"
    #: Route once the whole study is complete, or as soon as the series is.
    completion: Literal["study", "series"] = "study"
    #: Hard maximum wait after the first instance, in seconds, even if more keep coming.
    max_wait_s: float | None = Field(default=None, gt=0)
    enabled: bool = True
    #: Let derived series (ImageType DERIVED/SECONDARY) match; radnode's own never do.
    include_derived: bool = False

    @field_validator("destinations")
    @classmethod
    def _unique_destinations(cls, values: list[str]) -> list[str]:
        seen: set[str] = set()
        for value in values:
            if not value.strip():
                raise ValueError("destination names must not be empty")
            if value in seen:
                raise ValueError(f"destination {value!r} listed twice")
            seen.add(value)
        return values

    @field_validator("match", mode="before")
    @classmethod
    def _known_attributes(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        problems = []
        for key in value:
            if key in ATTRIBUTES:
                continue
            close = difflib.get_close_matches(str(key), list(ATTRIBUTES), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(
                f"unknown attribute {key!r}{hint}; known attributes: {', '.join(ATTRIBUTES)}"
            )
        if problems:
            # The known attributes' conditions are checked too, so that every problem is
            # listed at once (acceptance pass: a bad regex beside an unknown attribute
            # was said only once the attribute was fixed).
            raise ValueError("; ".join(problems + _condition_problems(value)))
        return value

    @field_validator("match")
    @classmethod
    def _conditions_fit_attributes(
        cls, match: dict[str, AttributeCondition]
    ) -> dict[str, AttributeCondition]:
        problems = _condition_problems(match)
        if problems:
            raise ValueError("; ".join(problems))
        return match

    def mismatches(self, series: SeriesInfo) -> list[str]:
        """Why ``series`` does not meet this route (empty when it does).

        Loop safety comes first: when it rejects the series, its reason is the only one.
        """
        if _norm(series.manufacturer) == RADNODE_MANUFACTURER:
            return [f"radnode's own output (Manufacturer {series.manufacturer.strip()})"]
        derived = derived_marks(series)
        if derived and not self.include_derived:
            return [
                f"derived series (ImageType has {', '.join(derived)}); "
                "the route does not set include_derived"
            ]
        out: list[str] = []
        for attribute, condition in self.match.items():
            out += condition.failures(attribute, attribute_value(series, attribute))
        return out


def derived_marks(series: SeriesInfo) -> list[str]:
    """The values of the series' ImageType that make it derived (DERIVED, SECONDARY),
    less DERIVED where only lossy compression made it so: Image Type DERIVED\\PRIMARY and
    Lossy Image Compression 01, which DCMTK and PACS that archive in JPEG write into
    the scanner's images. A reformat or a MIP is DERIVED\\SECONDARY, and a PACS sending
    lossy archives left every study unprocessed at info level (acceptance pass)."""
    values = [_norm(v).upper() for v in series.image_type]
    marks = set(values) & DERIVED_IMAGE_TYPES
    compressed_only = values[:2] == ["DERIVED", "PRIMARY"] and not set(values) & _REFORMATS
    if series.lossy_compressed and compressed_only:
        marks.discard("DERIVED")
    return sorted(marks)


#: ImageType values of reformats that vendors write as DERIVED\PRIMARY (GE REFORMATTED,
#: Siemens MPR, projections): lossy compression does not make them acquired (review).
_REFORMATS = frozenset(
    {"REFORMATTED", "MPR", "MIP", "MINIP", "PROJECTION", "CURVED", "VOLUME", "CPR", "3D"}
)


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Selection:
    """A series that a route sends to its pipeline."""

    route: str
    pipeline: str
    series_uid: str
    destinations: tuple[str, ...]


@dataclass(frozen=True)
class Rejection:
    """A series that a route did not take, and why, in an operator's words."""

    route: str
    series_uid: str
    reason: str


@dataclass(frozen=True)
class PlannedJob:
    """One job for the queue: a (series, pipeline) pair, whichever routes asked for it."""

    series_uid: str
    pipeline: str
    routes: tuple[str, ...]
    destinations: tuple[str, ...]


@dataclass(frozen=True)
class RoutingPlan:
    """What routing decided for a set of series.

    Ordered by route (as configured), then study, then SeriesNumber (absent last),
    then Series Instance UID.
    """

    selections: tuple[Selection, ...]
    rejections: tuple[Rejection, ...]
    #: Names of routes that are switched off (``enabled = false``); they saw no series.
    disabled_routes: tuple[str, ...] = ()

    @property
    def matched(self) -> bool:
        return bool(self.selections)

    def jobs(self) -> tuple[PlannedJob, ...]:
        """Selections merged to one job per (series, pipeline), destinations united."""
        merged: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
        for sel in self.selections:
            routes, destinations = merged.setdefault((sel.series_uid, sel.pipeline), ([], []))
            routes.append(sel.route)
            destinations += [d for d in sel.destinations if d not in destinations]
        return tuple(
            PlannedJob(series_uid, pipeline, tuple(routes), tuple(destinations))
            for (series_uid, pipeline), (routes, destinations) in merged.items()
        )


def series_order(s: SeriesInfo) -> tuple[str, bool, int, str]:
    """Sort key of series: by study, then Series Number (none last), then UID."""
    return (s.study_uid, s.series_number is None, s.series_number or 0, s.series_uid)


def _pick_key(pick: PickPolicy) -> Callable[[SeriesInfo], tuple[Any, ...]]:
    """Sort key: the first series under it is the one picked."""

    def thickness(s: SeriesInfo) -> float:
        return s.slice_thickness if s.slice_thickness is not None else math.inf

    def number(s: SeriesInfo) -> tuple[bool, int]:
        return (s.series_number is None, s.series_number or 0)

    if pick == "most_instances":
        return lambda s: (-s.images, thickness(s), number(s), s.series_uid)
    if pick == "thinnest_slices":
        return lambda s: (thickness(s), -s.images, number(s), s.series_uid)
    return lambda s: (number(s), -s.images, s.series_uid)


def _not_picked_reason(pick: PickPolicy, winner: SeriesInfo, loser: SeriesInfo) -> str:
    """Name the criterion that decided between ``winner`` and ``loser``."""
    number = winner.series_number if winner.series_number is not None else "-"
    other = f"another series of the study (SeriesNumber {number})"
    w_thick, l_thick = winner.slice_thickness, loser.slice_thickness
    criteria: list[tuple[bool, str]] = [
        (
            winner.images != loser.images,
            f"more images ({winner.images} > {loser.images})",
        ),
        (
            w_thick != l_thick,
            f"thinner slices ({_shown('SliceThickness', w_thick)} < "
            f"{_shown('SliceThickness', l_thick)})",
        ),
        (
            winner.series_number != loser.series_number,
            f"a lower SeriesNumber ({number} < "
            f"{loser.series_number if loser.series_number is not None else '-'})",
        ),
    ]
    if pick == "thinnest_slices":
        criteria[0], criteria[1] = criteria[1], criteria[0]
    elif pick == "first":
        criteria = [criteria[2], criteria[0]]
    for differs, text in criteria:
        if differs:
            return f"{other} matched with {text} (pick={pick})"
    return f"{other} matched and sorts first by Series Instance UID (pick={pick})"


def plan(series: Sequence[SeriesInfo], routes: Sequence[RouteRule]) -> RoutingPlan:
    """Match every series against every enabled route; pick per study as each route says."""
    ordered = sorted(series, key=series_order)
    selections: list[Selection] = []
    rejections: list[Rejection] = []
    for route in routes:
        if not route.enabled:
            continue
        by_study: dict[str, list[SeriesInfo]] = {}
        reasons: dict[str, str] = {}
        for s in ordered:
            failures = route.mismatches(s)
            if failures:
                reasons[s.series_uid] = "; ".join(failures)
            else:
                by_study.setdefault(s.study_uid, []).append(s)
        picked: set[str] = set()
        for candidates in by_study.values():
            if route.pick == "all":
                picked.update(c.series_uid for c in candidates)
                continue
            winner, *losers = sorted(candidates, key=_pick_key(route.pick))
            picked.add(winner.series_uid)
            for loser in losers:
                reasons[loser.series_uid] = _not_picked_reason(route.pick, winner, loser)
        for s in ordered:
            if s.series_uid in picked:
                selections.append(
                    Selection(route.name, route.pipeline, s.series_uid, tuple(route.destinations))
                )
            else:
                rejections.append(Rejection(route.name, s.series_uid, reasons[s.series_uid]))
    disabled = tuple(r.name for r in routes if not r.enabled)
    return RoutingPlan(tuple(selections), tuple(rejections), disabled)


def format_plan(plan: RoutingPlan, series: Sequence[SeriesInfo]) -> str:
    """A plain-text explanation of ``plan``, one block per series (for ``radnode route``).

    Shows no SeriesDescription and no patient data.
    """
    lines: list[str] = []
    for s in sorted(series, key=series_order):
        number = s.series_number if s.series_number is not None else "-"
        thickness = _shown("SliceThickness", s.slice_thickness)
        facts = [
            s.modality.strip() or "?",
            s.body_part.strip() or "-",
            f"{s.instance_count} instances"
            + (f" ({s.images} images)" if s.images != s.instance_count else ""),
            f"{thickness} mm" if s.slice_thickness is not None else "thickness ?",
            orientation_label(s.image_orientation) or "orientation ?",
        ]
        lines.append(f"series {number}  {s.series_uid}")
        lines.append("  " + "  ".join(facts))
        for sel in (x for x in plan.selections if x.series_uid == s.series_uid):
            to = ", ".join(sel.destinations) or "no destinations"
            lines.append(f"  + {sel.route}: run {sel.pipeline} -> {to}")
        for rej in (x for x in plan.rejections if x.series_uid == s.series_uid):
            lines.append(f"  - {rej.route}: {rej.reason}")
    if plan.disabled_routes:
        lines.append(f"disabled routes: {', '.join(plan.disabled_routes)}")
    if not plan.selections:
        lines.append("no route matched")
    return "\n".join(lines)


def _condition_problems(match: dict[Any, Any]) -> list[str]:
    """What is wrong with the conditions of the known attributes in ``match`` (a route's
    ``match`` table, raw or validated), one ``Attribute.test: problem`` per error."""
    problems = []
    for attribute, raw in match.items():
        if attribute not in ATTRIBUTES:
            continue
        try:
            condition = AttributeCondition.model_validate(raw)
        except ValidationError as exc:
            for error in exc.errors():
                where = ".".join(str(part) for part in (attribute, *error["loc"]))
                problems.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
            continue
        problems += condition.problems_for(attribute, ATTRIBUTES[attribute].kind)
    return problems
