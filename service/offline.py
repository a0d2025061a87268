"""``radnode run`` and ``radnode route``: the node's path on a folder, without a network.

A folder of DICOM files (any layout, searched recursively), or one DICOM file, is
grouped into series by header alone; routing and the pipelines then run exactly as in
the node (same routes, same bundles, same series-to-volume checks), so an administrator
can try a route or a model on a study before the PACS sends one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.config import Settings
from service.errors import RadnodeError
from service.headers import header_from_dataset
from service.pipeline.inference import InputMismatch, PipelineFailed, check_input, run_bundle
from service.pipeline.volume import SeriesRefused, load_series
from service.publish import DICOM_FOLDER, write_dicom
from service.records import InstanceHeader, SeriesInfo
from service.routing import plan
from service.worker import PipelineCache
from service.writers.files import write_result_files


@dataclass
class FolderScan:
    """Instances of a folder grouped by series (header facts only)."""

    series: dict[str, list[tuple[Path, InstanceHeader]]] = field(default_factory=dict)
    unreadable: list[Path] = field(default_factory=list)

    def series_infos(self) -> list[SeriesInfo]:
        infos = []
        for series_uid, items in self.series.items():
            # As the index does: the first image that is not a localizer describes it.
            headers = [header for _, header in items]
            first = next((h for h in headers if "LOCALIZER" not in h.image_type), headers[0])
            infos.append(
                SeriesInfo(
                    study_uid=first.study_uid,
                    series_uid=series_uid,
                    modality=first.modality,
                    body_part=first.body_part,
                    series_description=first.series_description,
                    sop_class_uid=first.sop_class_uid,
                    series_number=first.series_number,
                    instance_count=len(items),
                    image_count=sum(max(h.frame_count, 1) for h in headers),
                    slice_thickness=first.slice_thickness,
                    image_type=first.image_type,
                    image_orientation=first.image_orientation,
                    manufacturer=first.manufacturer,
                    manufacturer_model_name=first.manufacturer_model_name,
                    view_position=first.view_position,
                    lossy_compressed=first.lossy_compressed,
                )
            )
        return infos


def _files(folder: Path) -> Iterator[Path]:
    """Every file under ``folder``, or ``folder`` itself when it is one file.

    One file is a folder of one: ``radnode run cxr.dcm`` found "no DICOM series" because
    walking a file yields nothing (acceptance test).
    """
    if folder.is_file():
        yield folder
        return
    for root, _dirs, files in os.walk(folder):
        for name in sorted(files):
            yield Path(root) / name


def scan_folder(folder: Path) -> FolderScan:
    """Read every file's header under ``folder`` (or the one file ``folder`` names);
    files that are not DICOM are listed."""
    scan = FolderScan()
    for path in _files(folder):
        try:
            header = header_from_dataset(dcmread(path, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError):
            scan.unreadable.append(path)
            continue
        if header.series_uid:
            scan.series.setdefault(header.series_uid, []).append((path, header))
    return scan


def no_series_message(folder: Path, scan: FolderScan) -> str:
    """Why ``scan`` of ``folder`` has nothing to run on, and what to give instead."""
    if not folder.exists():
        return f"{folder}: no such file or folder"
    not_dicom = f" ({len(scan.unreadable)} file(s) were not DICOM)" if scan.unreadable else ""
    return (
        f"{folder}: no DICOM series found{not_dicom}; give a folder of DICOM files "
        "(searched recursively) or one DICOM file"
    )


@dataclass(frozen=True)
class OfflineOutcome:
    series_label: str
    pipeline: str
    state: str  # done / refused / failed / skipped
    detail: str


def _series_label(info: SeriesInfo, index: int) -> str:
    """``01-s3-CT``: position in the folder, SeriesNumber, Modality (never free text)."""
    number = info.series_number if info.series_number is not None else "x"
    return f"{index:02d}-s{number}-{info.modality or 'XX'}"


def run_folder(folder: Path, out: Path, settings: Settings, *, pipeline: str | None = None) -> int:
    """Run the routed (or the named) pipeline on every series; return the failure count."""
    console = Console(stderr=True)
    scan = scan_folder(folder)
    if not scan.series:
        raise RadnodeError(no_series_message(folder, scan))
    infos = sorted(scan.series_infos(), key=lambda s: (s.series_number or 0, s.series_uid))
    labels = {info.series_uid: _series_label(info, i + 1) for i, info in enumerate(infos)}
    if pipeline is not None:
        work = [(info.series_uid, pipeline) for info in infos]
    else:
        if not settings.routes:
            raise RadnodeError("no [[routes]] configured; name a pipeline with --pipeline")
        work = [(job.series_uid, job.pipeline) for job in plan(infos, settings.routes).jobs()]
    cache = PipelineCache(settings.models.dir, settings.models.device)
    outcomes: list[OfflineOutcome] = []
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
               "{task.total}"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("pipelines", total=len(work))
        for series_uid, name in work:
            label = labels[series_uid]
            progress.update(task, description=f"{name} on {label}")
            outcomes.append(_run_one(cache, scan, series_uid, name, label, out))
            progress.advance(task)
    _print_outcomes(console, outcomes, out, len(scan.unreadable))
    return sum(o.state == "failed" for o in outcomes)


def _run_one(
    cache: PipelineCache, scan: FolderScan, series_uid: str, name: str, label: str, out: Path
) -> OfflineOutcome:
    try:
        bundle = cache.get(name)
        started = time.perf_counter()
        volume = load_series([path for path, _ in scan.series[series_uid]])
        load_s = time.perf_counter() - started
        try:
            check_input(bundle, volume)
        except InputMismatch as exc:
            return OfflineOutcome(label, name, "skipped", str(exc))
        result = run_bundle(bundle, volume, load_s=load_s)
        target = out / label / name
        write_result_files(result, volume, target)
        write_dicom(result, volume, [str(p) for p, _ in scan.series[series_uid]],
                    target / DICOM_FOLDER)  # fmt: skip
    except SeriesRefused as exc:
        return OfflineOutcome(label, name, "refused", exc.reason)
    except (PipelineFailed, RadnodeError) as exc:
        return OfflineOutcome(label, name, "failed", str(exc))
    t = result.timings
    detail = f"{target}  ({t.total_s:.2f} s, inference {t.inference_s:.2f} s, {result.device})"
    return OfflineOutcome(label, name, "done", detail)


def _print_outcomes(
    console: Console, outcomes: list[OfflineOutcome], out: Path, unreadable: int
) -> None:
    table = Table(title=f"radnode run -> {out}")
    for column in ("series", "pipeline", "state", "result"):
        table.add_column(column)
    styles = {"done": "green", "skipped": "dim", "refused": "yellow", "failed": "red"}
    for o in outcomes:
        table.add_row(o.series_label, o.pipeline, f"[{styles[o.state]}]{o.state}", o.detail)
    console.print(table)
    if unreadable:
        console.print(f"{unreadable} file(s) were not DICOM and were ignored")
