"""The one entry point that turns a pipeline result into DICOM objects on disk.

:func:`write_dicom_results` writes, as PS3.10 files in one folder, every object the
task kind calls for:

==============  ==============================================================
kind            objects (each a new series in the source study)
==============  ==============================================================
segmentation    SEG (if any label has a voxel) + Comprehensive 3D SR + SC key slices
classification Comprehensive 3D SR + SC (radiograph with heatmap and findings)
reconstruction  derived image series (same SOP class as the source) + SR note
==============  ==============================================================

All objects join the source study (same Study Instance UID, patient and study modules
copied from the source headers by highdicom), carry the algorithm's provenance
(:mod:`service.writers.provenance`) and have deterministic UIDs, so writing the same job
again gives the same files names and SOP Instance UIDs. File names are
``<modality>_<SOP Instance UID>.dcm``; the folder holds nothing else of ours, so it
can be the ``payload_ref`` of one outbox delivery (:mod:`service.dicom_delivery`).

2D images (radiographs: no Frame of Reference, no Image Position) are fine: SC needs
neither and SEG is not written for classification. A series of several Enhanced
instances of many frames each gets no SEG either (highdicom builds one over a single
multi-frame image or single-frame images; one-frame Enhanced instances count as the
latter), nor do images without a Frame of Reference UID: their SR and SC still carry
the result, and ``results.seg_not_written`` says why.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from service.beside import beside
from service.pipeline.result import BundleIdentity, PipelineResult, TaskKind
from service.pipeline.volume import Volume
from service.writers.clock import ResultTime, result_time
from service.writers.derived import derived_series_info, iter_derived_series
from service.writers.provenance import Provenance
from service.writers.sc import build_sc_images
from service.writers.seg import SegResult, build_seg
from service.writers.sources import seg_problem
from service.writers.sr import build_not_analyzed_sr, build_sr, segment_stats

log = structlog.get_logger("service.writers")

#: Suffix of every result file; the SCU sends ``*.dcm`` of a results folder.
SUFFIX = ".dcm"


@dataclass(frozen=True)
class WrittenObject:
    """One file written: where, and what it is (for logs and the outbox)."""

    path: Path
    modality: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


def write_dicom_results(
    result: PipelineResult,
    volume: Volume,
    source_headers: list[Dataset],
    out_dir: Path,
    *,
    predecessor: Dataset | None = None,
    revised: bool = False,
    not_analyzed: Sequence[Dataset] = (),
    preliminary: bool = False,
) -> list[Path]:
    """Write the DICOM objects of ``result`` into ``out_dir``; return their paths.

    ``source_headers`` are the source instances' headers (pixel data not needed), in
    ``volume.sources`` order. ``predecessor`` is the SR this result replaces (its
    study, series, class and instance UIDs are enough), named in the new SR's
    Predecessor Documents Sequence; ``revised`` marks a result that replaces one even
    when that SR could not be read. ``not_analyzed`` are "not analyzed" SRs of the
    series that this first real result makes obsolete: named as predecessors too, so a
    viewer shows which report stands (acceptance pass), without making the result a
    revision. ``preliminary``: the study lacks an instance lost in transit (SR
    Preliminary Flag PRELIMINARY, Completion Flag PARTIAL, "preliminary" in every Series
    Description). The SR is always the first path returned: its SOP Instance UID is a
    good outbox ``message_id`` for the job.
    """
    written = write_dicom_objects(
        result, volume, source_headers, out_dir, predecessor=predecessor, revised=revised,
        not_analyzed=not_analyzed, preliminary=preliminary,
    )  # fmt: skip
    return [obj.path for obj in written]


def write_dicom_objects(
    result: PipelineResult,
    volume: Volume,
    source_headers: Sequence[Dataset],
    out_dir: Path,
    *,
    predecessor: Dataset | None = None,
    revised: bool = False,
    not_analyzed: Sequence[Dataset] = (),
    preliminary: bool = False,
) -> list[WrittenObject]:
    """:func:`write_dicom_results` with what each file is (SR first)."""
    _check_sources(volume, source_headers)
    _fill_empty_type2(source_headers)
    provenance = _provenance(
        result,
        volume,
        # images, not instances: one Enhanced instance holds them all
        revised_from=volume.array.shape[0] if revised or predecessor is not None else 0,
        preliminary=preliminary,
    )
    previous = [*([predecessor] if predecessor is not None else []), *not_analyzed] or None
    datasets: list[Dataset] = []
    if result.kind is TaskKind.SEGMENTATION:
        voxels = result.voxel_counts()  # counted once, before the statistics' thread
        # The CT means are numpy passes over the label map (no GIL), the SEG is
        # highdicom's Python: side by side 0.21 s instead of 0.29 s for 300 slices.
        with beside("segment-stats", segment_stats, result, volume) as pending_stats:
            seg = _seg_if_possible(result, volume, source_headers, provenance, voxels)
            stats = pending_stats.result()
        overlays = build_sc_images(result, volume, source_headers, provenance, stats=stats)
        sr = build_sr(result, volume, source_headers, provenance, seg=seg, stats=stats,
                      previous=previous, overlays=overlays)  # fmt: skip
        datasets.append(sr)
        if seg is not None:
            datasets.append(seg.dataset)
        datasets.extend(overlays)
    elif result.kind is TaskKind.CLASSIFICATION:
        overlays = build_sc_images(result, volume, source_headers, provenance)
        datasets.append(build_sr(result, volume, source_headers, provenance, previous=previous,
                                 overlays=overlays))  # fmt: skip
        datasets.extend(overlays)
    out_dir.mkdir(parents=True, exist_ok=True)
    # One Series Date/Time for every object of this result (highdicom stamps each SC
    # image with its own now(); review found two times in one series).
    stamp = result_time(source_headers[0])
    if result.kind is TaskKind.RECONSTRUCTION:
        # Saved one by one as they are made: a long series is never in memory twice.
        derived = [
            _save(ds, out_dir)
            for ds in iter_derived_series(result, volume, source_headers, provenance, stamp)
        ]
        info = derived_series_info(
            provenance, [(obj.sop_class_uid, obj.sop_instance_uid) for obj in derived]
        )
        sr = build_sr(result, volume, source_headers, provenance, derived=info, previous=previous)
        return [_save(_stamped(sr, stamp), out_dir), *derived]
    return [_save(_stamped(ds, stamp), out_dir) for ds in datasets]


def _seg_if_possible(
    result: PipelineResult,
    volume: Volume,
    source_headers: Sequence[Dataset],
    provenance: Provenance,
    voxels: dict[int, int],
) -> SegResult | None:
    """The SEG of ``result``, or None where these sources cannot have one (said in
    ``results.seg_not_written``)."""
    problem = seg_problem(volume, source_headers)
    if problem is not None:
        # The SR still reports every segment's volume and the SC shows them: the
        # reading is complete without the SEG, which cannot reference these images.
        log.warning(
            "results.seg_not_written",
            reason=problem,
            action="have the modality send the series as single-frame images or as"
            " one Enhanced instance to get a DICOM SEG",
        )
        return None
    if volume.is_2d and len(source_headers) != 1:
        return None
    return build_seg(result, volume, source_headers, provenance, voxels)


def write_not_analyzed_report(
    bundle: BundleIdentity, source_headers: Sequence[Dataset], reason: str, out_dir: Path
) -> WrittenObject:
    """Write the SR saying ``bundle`` did not analyse this series, and why
    (:func:`~service.writers.sr.build_not_analyzed_sr`); ``source_headers`` are the
    series' readable headers, in any order."""
    headers = list(source_headers)
    _fill_empty_type2(headers)
    provenance = Provenance.of(
        bundle, str(headers[0].SeriesInstanceUID), [str(h.SOPInstanceUID) for h in headers]
    )
    sr = build_not_analyzed_sr(headers, provenance, reason)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _save(_stamped(sr, result_time(headers[0])), out_dir)


def result_sr_uid(result: PipelineResult, volume: Volume, *, preliminary: bool = False) -> str:
    """The SOP Instance UID that :func:`write_dicom_results` gives the SR of ``result``:
    the same for the same bundle version, source instances and preliminary flag, so a
    caller can tell a result from the one it would replace before writing it."""
    return _provenance(result, volume, preliminary=preliminary).uid("sr")


def _provenance(
    result: PipelineResult, volume: Volume, revised_from: int = 0, preliminary: bool = False
) -> Provenance:
    sources = list(dict.fromkeys(s.sop_instance_uid for s in volume.sources))
    return Provenance.of(result.bundle, volume.series_uid, sources, revised_from=revised_from,
                         preliminary=preliminary)  # fmt: skip


def _stamped(ds: Dataset, stamp: ResultTime) -> Dataset:
    """``ds`` made at ``stamp``, told in the source's time zone (:mod:`.clock`): Series
    Date/Time where it has none (with a revised result next to the one it replaces,
    viewers that list series dates show which is newer), and the Instance Creation and
    Content Date/Time highdicom took from the node's clock."""
    if "SeriesDate" not in ds:
        ds.SeriesDate, ds.SeriesTime = stamp.date, stamp.time
    stamp.apply_to(ds)
    return ds


#: Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1)
#: that every result copies from its source, and highdicom reads without a default.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def _fill_empty_type2(source_headers: Sequence[Dataset]) -> None:
    """Give the job's copies of the source headers an empty value for each of
    :data:`_TYPE2_COPIED` they lack, as a Type 2 attribute without a value is sent.

    Why: a sender that leaves one out (non-conformant, but it happens) made every result
    of the job fail in highdicom ("no attribute 'PatientID'", found by the acceptance
    run); the results now carry it empty, as the source does in effect. Only these
    in-memory headers change; the received files stay as they came.
    """
    for header in source_headers:
        for keyword in _TYPE2_COPIED:
            if keyword not in header:
                setattr(header, keyword, "")
            elif isinstance(value := header.get(keyword), MultiValue):
                # A backslash makes a value two where one is allowed, and highdicom
                # failed the job ("Invalid type for a person name", acceptance pass). A
                # name keeps its first value, as the HL7 result's PID-5 does; any other
                # value (an ID) is written back as it came, the backslash included, so
                # the PACS files the results under the very same patient (review).
                if keyword in _NAMES:
                    kept = str(value[0]) if len(value) else ""
                else:
                    kept = "\\".join(str(v) for v in value)
                setattr(header, keyword, kept if _valid_value(keyword, kept) else "")
            elif not _valid_value(keyword, value):
                # A malformed birth date (7 digits) failed the job in highdicom, whose
                # error quoted it into the log and /api/jobs (acceptance pass). The
                # results carry it empty, as for a missing one; the source file stays.
                setattr(header, keyword, "")


_DATES = ("PatientBirthDate", "StudyDate")
#: The copied Type 2 attributes that are person names (PN).
_NAMES = ("PatientName", "ReferringPhysicianName")


def _valid_value(keyword: str, value: object) -> bool:
    """Whether a copied Type 2 value is one highdicom takes: a real date, a time, a sex."""
    text = str(value or "").strip()
    if not text:
        return True
    if keyword in _DATES:
        try:
            return len(text) == 8 and datetime.strptime(text, "%Y%m%d") is not None
        except ValueError:
            return False
    if keyword == "StudyTime":
        return bool(_DICOM_TIME.fullmatch(text))
    if keyword == "PatientSex":
        return text in ("M", "F", "O")
    return True


#: TM (PS3.5 6.2): HH, HHMM, HHMMSS, HHMMSS.F{1,6}, hours 00-23, minutes/seconds 00-59 (60).
_DICOM_TIME = re.compile(r"([01]\d|2[0-3])([0-5]\d([0-5]\d|60)?)?(\.\d{1,6})?")


def _check_sources(volume: Volume, source_headers: Sequence[Dataset]) -> None:
    expected = list(dict.fromkeys(s.sop_instance_uid for s in volume.sources))
    given = [str(h.SOPInstanceUID) for h in source_headers]
    if given != expected:
        raise ValueError(
            "source_headers must be the volume's source instances in volume.sources order "
            f"({len(given)} given, {len(expected)} expected)"
        )


def _save(ds: Dataset, out_dir: Path) -> WrittenObject:
    modality = str(ds.get("Modality", "OT"))
    path = out_dir / f"{modality}_{ds.SOPInstanceUID}{SUFFIX}"
    tmp = path.with_suffix(".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)
    return WrittenObject(
        path=path,
        modality=modality,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
    )
