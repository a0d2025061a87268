"""Results become deliverables (worker side) and deliveries (edge side).

The worker, which has the result in memory, builds what each destination of the job's
routes takes and writes it under the job's result folder: an ORU^R01 per HL7
destination (and the DICOM objects per DICOM destination). It reports them as
:class:`~service.records.Deliverable` items. The edge, the only sender, puts them in
its durable outbox, from which the delivery thread sends them with retries. So a
result produced just before a crash is still sent after the restart, and a destination
that is down gets it when it is back. Enqueueing is idempotent per (job, destination):
a job that runs again does not send twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from service.config import Settings
from service.delivery import Outbox
from service.dicom_delivery import DicomDestinationSettings
from service.errors import ResultsNotWritten, out_of_space
from service.hl7 import Hl7DestinationSettings, Hl7Error
from service.observability import redact_quoted
from service.pipeline.result import BundleIdentity, PipelineResult
from service.pipeline.volume import Volume, read_headers
from service.records import Deliverable, JobReport, JobTicket
from service.writers.dicom import (
    result_sr_uid,
    write_dicom_results,
    write_not_analyzed_report,
)
from service.writers.oru import build_oru, control_id_for

log = structlog.get_logger("service.publish")

OUTBOX_FILE = "outbox.sqlite3"
#: Sub-folder of a job's results that holds its DICOM objects (what a PACS is sent).
DICOM_FOLDER = "dicom"
#: Sub-folder that holds a refused job's "not analyzed" SR, apart from any results.
NOT_ANALYZED_FOLDER = "not-analyzed"


def outbox_path(settings: Settings) -> Path:
    return Path(settings.node.data_dir) / OUTBOX_FILE


@dataclass(frozen=True)
class Publication:
    """What the worker made of a result for the job's destinations: the deliverables,
    and for each destination that gets none, why (operator-facing, no patient data).
    The reasons become the job's error, so a result the RIS never gets shows on the job
    in ``/api/jobs`` and ``radnode status``, not only in a log line."""

    deliverables: tuple[Deliverable, ...]
    not_sent: tuple[str, ...] = ()


class ResultPublisher:
    """Worker side: build each destination's payload from a finished job's result."""

    def __init__(self, settings: Settings) -> None:
        self.destinations = {d.name: d for d in settings.destinations}

    def prepare(self, ticket: JobTicket, result: PipelineResult, volume: Volume) -> Publication:
        deliverables: list[Deliverable] = []
        not_sent: list[str] = []
        header = None
        if volume.source_headers:
            _say_if_undecodable(volume.source_headers[0], ticket.job_id)
        out_dir = Path(ticket.result_dir)
        revised = ticket.replaces is not None
        repeats: Path | None = None  # the result folder of the result this one repeats
        predecessor = replaced_report(ticket)
        if predecessor is not None and predecessor.SOPInstanceUID == result_sr_uid(
            result, volume, preliminary=ticket.preliminary
        ):
            # Made from the very images of the result it would replace (only a localizer
            # joined the series, say): the same result, not a revision. Marked revised it
            # named itself as its own predecessor and went to the RIS as a correction of
            # nothing new (review).
            log.info("results.same_as_replaced", job=ticket.job_id,
                     action="none: the result is sent again as it was")  # fmt: skip
            predecessor, revised = None, False
            repeats = Path(str(ticket.replaces))
        written = write_dicom(
            result,
            volume,
            list(ticket.series_paths),
            out_dir / DICOM_FOLDER,
            predecessor=predecessor,
            revised=revised,
            # a repeat supersedes nothing the result it repeats did not
            not_analyzed=not_analyzed_reports(ticket) if repeats is None else [],
            preliminary=ticket.preliminary,
        )
        for name in ticket.destinations:
            destination = self.destinations.get(name)
            if destination is None:
                log.error("delivery.unknown_destination", job=ticket.job_id, destination=name,
                          action="add the destination to the configuration")  # fmt: skip
                not_sent.append(f"{name}: not sent: no such destination in this worker's"
                                " configuration")  # fmt: skip
                continue
            if isinstance(destination, Hl7DestinationSettings):
                if header is None:
                    header = (
                        volume.source_headers[0]
                        if volume.source_headers
                        else dcmread(ticket.series_paths[0], stop_before_pixels=True)
                    )
                try:
                    message = build_oru(
                        result,
                        header,
                        volume.spacing,
                        destination,
                        control_id=_sent_control_id(repeats, name)
                        or control_id_for(ticket.job_id, name),
                        correction=revised,
                        preliminary=ticket.preliminary,
                        after_preliminary=ticket.replaces_preliminary,
                    )
                except Hl7Error as exc:
                    log.error(
                        "hl7.not_built",
                        job=ticket.job_id,
                        destination=name,
                        reason=str(exc),
                        action="fix the source header or the destination settings",
                    )
                    not_sent.append(f"{name}: HL7 result not built: {exc}")
                    continue
                path = out_dir / "hl7" / f"{name}.hl7"
                path.parent.mkdir(parents=True, exist_ok=True)
                if not str(header.get("AccessionNumber", "") or "").strip():
                    log.warning(
                        "hl7.no_order_number",
                        job=ticket.job_id,
                        destination=name,
                        action="the study has no Accession Number, so ORC/OBR carry no order"
                        " number and the RIS may not match the result to its order; have the"
                        " modality take the study from the worklist",
                    )
                payload, replaced = message.encoded()
                if replaced:
                    log.warning(
                        "hl7.characters_replaced",
                        job=ticket.job_id,
                        destination=name,
                        characters=replaced,
                        charset=destination.character_set,
                        action='set character_set = "UNICODE UTF-8" on this destination if'
                        " the RIS accepts it; other letters went as their base letter or ?",
                    )
                path.write_bytes(payload)
                deliverables.append(Deliverable(name, "hl7", message.control_id, str(path)))
            elif isinstance(destination, DicomDestinationSettings) and written:
                # the SR's derived UID names the delivery: a re-run job sends nothing new
                sr_uid = str(dcmread(written[0], stop_before_pixels=True).SOPInstanceUID)
                deliverables.append(Deliverable(name, "dicom", sr_uid, str(out_dir / DICOM_FOLDER)))
        return Publication(tuple(deliverables), tuple(not_sent))

    def prepare_not_analyzed(
        self, ticket: JobTicket, identify: Callable[[], BundleIdentity], reason: str
    ) -> Publication:
        """For a refused job: the "not analyzed" SR for each DICOM destination with
        ``send_not_analyzed`` (none by default; never HL7, where a result status could
        cancel the order in a RIS), in a folder of its own: a later run of the job that
        makes results must not send it with them (review). ``identify`` names the
        bundle, asked only when an SR is made. Never raises: a refusal stays a refusal,
        and what could not be made is said in ``not_sent``.

        None where the series already has a result (``ticket.replaces``): the series came
        again unusable (re-sent with new instance UIDs, say), and a "not analyzed" report
        beside the result that stands read as if the AI had never run (acceptance pass).
        """
        if ticket.replaces is not None:
            log.info("results.not_analyzed_skipped", job=ticket.job_id,
                     reason="the series has an earlier result, which stands")  # fmt: skip
            return Publication(())
        names = [
            name
            for name in ticket.destinations
            if isinstance(self.destinations.get(name), DicomDestinationSettings)
            and self.destinations[name].send_not_analyzed
        ]
        if not names:
            return Publication(())
        out_dir = Path(ticket.result_dir) / NOT_ANALYZED_FOLDER
        try:
            headers = _readable_headers(ticket.series_paths)
            if not headers:
                raise ValueError("no source instance could be read")
            sr = write_not_analyzed_report(identify(), headers, reason, out_dir)
        except Exception as exc:
            why = redact_quoted(f"{type(exc).__name__}: {exc}")
            log.exception("results.not_analyzed_not_written", job=ticket.job_id, reason=why,
                          action="report this with the job id; the refusal stands")  # fmt: skip
            return Publication(
                (), tuple(f"{n}: not-analyzed report not made: {why}" for n in names)
            )
        log.info("results.not_analyzed_report", job=ticket.job_id, destinations=names)
        return Publication(
            tuple(Deliverable(n, "dicom", sr.sop_instance_uid, str(out_dir)) for n in names)
        )


def _readable_headers(paths: Sequence[str]) -> list[Dataset]:
    """The headers of the files that can be read and name their instance (a refused
    series may hold damaged ones), of the first series among them."""
    headers = []
    for path in paths:
        try:
            header = dcmread(path, stop_before_pixels=True)
            if header.SOPInstanceUID and header.SeriesInstanceUID and header.StudyInstanceUID:
                headers.append(header)
        except Exception:  # damaged: it is why the series was refused; left out here
            continue
    if headers:
        series = str(headers[0].SeriesInstanceUID)
        headers = [h for h in headers if str(h.SeriesInstanceUID) == series]
    return headers


#: Value representations of text that a Specific Character Set decodes (PS3.5 6.1.2.3).
_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})


def _say_if_undecodable(header: Dataset, job_id: str) -> None:
    """Log once a job when the source's text is not in its declared character set.

    Why: a study declaring ISO_IR 192 (UTF-8) but holding Latin-1 bytes went to the
    PACS and the RIS as "M\ufffdller^J\ufffdrgen", and nothing said why (acceptance pass):
    pydicom replaces what it cannot decode and its warning is not logged (it may quote
    the value). The line names the attributes and the declared term, never a value.
    """
    garbled = sorted(
        element.keyword or str(element.tag)
        for element in header
        if element.VR in _TEXT_VRS and "\ufffd" in str(element.value)
    )
    if garbled:
        log.warning(
            "dicom.text_undecodable",
            job=job_id,
            attributes=garbled,
            character_set=str(header.get("SpecificCharacterSet", "") or "(none: ASCII)"),
            action="the sending system writes text in another character set than its"
            " Specific Character Set (0008,0005) says; fix its setting. The results carry"
            " the text with replacement characters",
        )


#: The attributes that name an SR: what its successor's Predecessor Documents item holds.
_SR_NAME = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _sent_control_id(result_dir: Path | None, destination: str) -> str | None:
    """MSH-10 of the HL7 message the result in ``result_dir`` made for ``destination``.

    Why: a result that repeats the one it would replace (only a localizer joined the
    series) went to the RIS a second time as a final result under a new MSH-10
    (acceptance pass); with the earlier message's, the outbox keeps it once and a RIS
    drops it as a duplicate. Read from the file, so a chain of repeats keeps the first
    message's id (review). None when there is no such message.
    """
    if result_dir is None:
        return None
    try:
        first_segment = (result_dir / "hl7" / f"{destination}.hl7").read_bytes().split(b"\r")[0]
    except OSError:
        return None
    fields = first_segment.split(b"|")
    return fields[9].decode("ascii", "replace") if len(fields) > 9 and fields[9] else None


def replaced_report(ticket: JobTicket) -> Dataset | None:
    """The SR of the result this job's replaces (the UIDs that name it), read from that
    job's result folder; None for a first result, or when that folder is gone."""
    if ticket.replaces is None:
        return None
    return _report_in(Path(ticket.replaces) / DICOM_FOLDER, ticket)


def not_analyzed_reports(ticket: JobTicket) -> list[Dataset]:
    """The "not analyzed" SRs of the refused jobs before this one (the UIDs that name
    them), which this job's result makes obsolete; none where no such SR was made."""
    reports = (_report_in(Path(f) / NOT_ANALYZED_FOLDER, ticket) for f in ticket.not_analyzed)
    return [report for report in reports if report is not None]


def _report_in(folder: Path, ticket: JobTicket) -> Dataset | None:
    """The UIDs that name the SR in ``folder``; None when there is none to read."""
    for path in sorted(folder.glob("SR_*.dcm")):
        try:
            sr = dcmread(path, stop_before_pixels=True, specific_tags=list(_SR_NAME))
            named = Dataset()
            for keyword in _SR_NAME:
                setattr(named, keyword, sr[keyword].value)
            return named
        except (OSError, InvalidDicomError, KeyError) as exc:
            log.warning(
                "results.predecessor_unreadable",
                job=ticket.job_id,
                reason=type(exc).__name__,
                action="none: the new SR names no predecessor",
            )
    return None


def write_dicom(
    result: PipelineResult,
    volume: Volume,
    series_paths: list[str],
    out_dir: Path,
    *,
    predecessor: Dataset | None = None,
    revised: bool = False,
    not_analyzed: Sequence[Dataset] = (),
    preliminary: bool = False,
) -> list[Path]:
    """Write the job's DICOM result objects (SR first); ``revised``: they replace an
    earlier result, whose SR ``predecessor`` is (when it could be read);
    ``not_analyzed``: "not analyzed" SRs they make obsolete; ``preliminary``: the study
    lacks an instance lost in transit. Raises
    :class:`ResultsNotWritten` if they cannot be made (the reason logged with its
    traceback): the job then fails and nothing is sent."""
    try:
        headers = volume.source_headers or read_headers(series_paths)
        by_uid = {str(h.SOPInstanceUID): h for h in headers}
        order = dict.fromkeys(source.sop_instance_uid for source in volume.sources)
        sources = [by_uid[uid] for uid in order]
        return write_dicom_results(
            result, volume, sources, out_dir, predecessor=predecessor, revised=revised,
            not_analyzed=not_analyzed, preliminary=preliminary,
        )  # fmt: skip
    except Exception as exc:  # a writer bug: the job fails, visibly, with its reason
        if out_of_space(exc):
            # the disk, not the writer: the worker says to free space, no bug report
            raise ResultsNotWritten("the DICOM results could not be written: no space") from exc
        reason = redact_quoted(f"{type(exc).__name__}: {exc}")
        log.exception(
            "dicom.not_written",
            pipeline=result.bundle.name,
            reason=reason,
            action="report this with the job id; nothing of the job was sent",
        )
        raise ResultsNotWritten(f"the DICOM results could not be made ({reason})") from exc


def enqueue_deliverables(outbox: Outbox, report: JobReport) -> int:
    """Edge side: put a report's deliverables in the outbox; return how many."""
    for item in report.deliverables:
        if item.kind == "hl7":
            outbox.enqueue(
                job_id=report.job_id,
                destination=item.destination,
                kind="hl7",
                message_id=item.message_id,
                payload=Path(item.path).read_bytes(),
            )
        else:
            outbox.enqueue(
                job_id=report.job_id,
                destination=item.destination,
                kind="dicom",
                message_id=item.message_id,
                payload_ref=item.path,
            )
    return len(report.deliverables)
