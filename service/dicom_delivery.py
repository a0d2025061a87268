"""DICOM delivery: the outbox's :class:`~service.delivery.Deliverer` for a Storage SCP.

One delivery is one job's results folder (``payload_ref``: the folder of PS3.10 files
that :func:`service.writers.dicom.write_dicom_results` wrote), sent to one destination
in one association by :func:`dicom_nodes.scu.send_files`. What came back decides:

=============================================  ==========  ==============================
what the peer did                              outcome     why
=============================================  ==========  ==============================
every file 0000 or Bxxx (warning)              DELIVERED   the peer has every object
association rejected, aborted, refused,        RETRY       the PACS or network is down,
connect/DIMSE timeout, a file not answered                 busy or being reconfigured
a file A7xx (out of resources)                 RETRY       transient on the peer's side
every file not acknowledged failed for good    REJECTED    sending the same bytes again
(A9xx, Cxxx, 01xx, other failures; or no                   would be refused again: the
presentation context accepted for its class),              rest is delivered, the
whether or not others were acknowledged                    refused ones are dead letters
folder missing, empty, or holds no DICOM       REJECTED    nothing that could ever be sent
=============================================  ==========  ==============================

Only what the peer has not acknowledged is sent again: the files it acknowledged are
listed next to the results (``.acknowledged-<destination>``), so a re-send after a
partial failure, or an operator's retry once the PACS takes SEG, sends the rest only.
Sending the whole folder again relied on the PACS replacing what it had; an archive
that refuses a duplicate SOP Instance (0111) made a delivered result a dead letter
(acceptance pass). A refusal for good no longer waits out the retries either: one
Segmentation a PACS does not take held every later result to that PACS for the three
hours of the default back-off (acceptance pass), as deliveries to a destination go in
order.

``DicomDestinationSettings`` is the configuration of one ``type = "dicom"`` destination.
Log events ``dicom.attempt`` carry delivery and job ids, counts and status codes; never
patient data.
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl
from pathlib import Path
from typing import Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from dicom_nodes.scu import (
    AssociationState,
    FileOutcome,
    FileState,
    SendReport,
    StorageDestination,
    send_files,
    sop_class_name,
)
from dicom_nodes.tls import client_context
from service.delivery import Delivery, DeliveryOutcome, RetryPolicy

log = structlog.get_logger("service.dicom_delivery")

#: Suffix of the files sent from a results folder (what the writers produce).
RESULT_SUFFIX = ".dcm"

ObjectKind = Literal["sr", "seg", "sc", "derived"]

_SR_CLASSES = "1.2.840.10008.5.1.4.1.1.88."
_SEG_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")
_SC_CLASSES = "1.2.840.10008.5.1.4.1.1.7"


def object_kind(sop_class_uid: str) -> ObjectKind:
    """The kind of result object a SOP class is (``objects`` of a destination)."""
    if sop_class_uid.startswith(_SR_CLASSES):
        return "sr"
    if sop_class_uid in _SEG_CLASSES:
        return "seg"
    if sop_class_uid == _SC_CLASSES or sop_class_uid.startswith(_SC_CLASSES + "."):
        return "sc"
    return "derived"


def _kind_of_file(path: Path) -> ObjectKind | None:
    """From the file meta alone; None when it cannot be read (sent, and reported)."""
    try:
        meta = read_file_meta_info(path)
    except (OSError, InvalidDicomError):
        return None
    uid = meta.get("MediaStorageSOPClassUID")
    return object_kind(str(uid)) if uid else None


class DicomDestinationSettings(BaseModel):
    """One PACS (or other Storage SCP) that takes results (``[[destinations]]``, type dicom)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    type: Literal["dicom"] = "dicom"
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    #: Called AE title: the PACS's.
    ae_title: str = Field(min_length=1, max_length=16)
    #: Calling AE title: how the PACS knows radnode; ``node.ae_title`` when not set.
    calling_ae_title: str | None = Field(None, min_length=1, max_length=16)
    connect_timeout_s: float = Field(10.0, gt=0)
    #: Longest wait for one C-STORE response (and for association negotiation).
    dimse_timeout_s: float = Field(60.0, gt=0)
    #: Attempts before a delivery is dead-lettered (network and A7xx failures retry).
    max_attempts: int = Field(20, ge=1)
    backoff_s: float = Field(5.0, ge=0)
    max_backoff_s: float = Field(900.0, ge=0)
    #: Also send an SR saying "AI analysis not performed: <reason>" for a series that a
    #: route sent to a pipeline and the pipeline refused (slices missing, not what the
    #: model takes), so a radiologist tells "nothing found" from "not run". Off by
    #: default: the PACS then gets results only.
    send_not_analyzed: bool = False
    #: Which kinds of result object this destination gets: ``sr`` (the reports),
    #: ``seg`` (DICOM Segmentation), ``sc`` (Secondary Captures: overlays, heat maps)
    #: and ``derived`` (derived image series, e.g. a denoised CT). Many PACS do not take
    #: DICOM SEG: ``objects = ["sr", "sc", "derived"]`` sends the rest without a dead
    #: letter for every segmentation.
    objects: tuple[ObjectKind, ...] = Field(("sr", "seg", "sc", "derived"), min_length=1)
    #: DICOM TLS (BCP 195) to this destination. The destination's certificate is always
    #: verified: against ``tls_ca``, else the system's trust store. ``tls_cert`` and
    #: ``tls_key`` are this node's client certificate, for a PACS that requires one.
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_key_password: SecretStr | None = None
    #: Also check that the certificate names ``host`` (off: PACS are usually addressed
    #: by IP address and their certificates often do not list it).
    tls_check_hostname: bool = False

    @model_validator(mode="after")
    def _check_tls(self) -> DicomDestinationSettings:
        given = [
            name
            for name in ("tls_ca", "tls_cert", "tls_key", "tls_key_password")
            if getattr(self, name) is not None
        ]
        if self.tls_check_hostname:
            given.append("tls_check_hostname")
        if given and not self.tls:
            raise ValueError(f"{', '.join(given)} need tls = true on this destination")
        return self

    def tls_context(self) -> ssl.SSLContext | None:
        """The client TLS context, or None without TLS. Raises
        :class:`~dicom_nodes.tls.TlsError` (what is wrong with which file) when it
        cannot be built: the node and ``radnode config check`` call this at start."""
        if not self.tls:
            return None
        password = self.tls_key_password.get_secret_value() if self.tls_key_password else None
        return client_context(
            self.tls_ca,
            self.tls_cert,
            self.tls_key,
            key_password=password,
            check_hostname=self.tls_check_hostname,
        )

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _check_ae_title(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value != value.strip() or "\\" in value or not value.isprintable():
            raise ValueError("an AE title is printable, without backslash or edge spaces")
        return value

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            backoff_s=self.backoff_s,
            max_backoff_s=self.max_backoff_s,
        )

    def storage_destination(self) -> StorageDestination:
        return StorageDestination(
            tls=self.tls_context(),
            tls_server_name=self.host if self.tls_check_hostname else None,
            host=self.host,
            port=self.port,
            ae_title=self.ae_title,
            calling_ae_title=self.calling_ae_title or "RADNODE",
            connect_timeout_s=self.connect_timeout_s,
            acse_timeout_s=self.dimse_timeout_s,
            dimse_timeout_s=self.dimse_timeout_s,
            network_timeout_s=self.dimse_timeout_s,
        )


def result_files(folder: Path) -> list[Path]:
    """The files of one results folder that are sent, in a stable order (SR first)."""
    files = sorted(p for p in folder.glob(f"*{RESULT_SUFFIX}") if p.is_file())
    return sorted(files, key=lambda p: (not p.name.startswith("SR_"), p.name))


def _is_transient(status: int | None) -> bool:
    return status is not None and 0xA700 <= status <= 0xA7FF


def _refused_for_good(outcome: FileOutcome) -> bool:
    """The peer refused it and would again. A file radnode could not read is not: on
    shared storage it may not be there yet (review)."""
    return outcome.state is FileState.NO_CONTEXT or (
        outcome.state is FileState.FAILED and not _is_transient(outcome.status)
    )


def outcome_of(report: SendReport, earlier: int = 0) -> DeliveryOutcome:
    """Map one association's report to DELIVERED / RETRY / REJECTED (see module doc).

    ``earlier``: files of the folder acknowledged by earlier attempts (not sent again).
    """
    if report.association in (
        AssociationState.REJECTED,
        AssociationState.CONNECT_FAILED,
        AssociationState.TIMEOUT,
    ):
        return DeliveryOutcome.retry(f"association {report.association.value}: {report.reason}")
    if report.association is AssociationState.NOT_ATTEMPTED:
        return DeliveryOutcome.rejected(f"nothing sendable: {report.reason}")
    if report.all_acknowledged:
        return DeliveryOutcome.delivered()
    failed = [o for o in report.outcomes if not o.acknowledged]
    summary = _summary(report, earlier)
    if all(_refused_for_good(o) for o in failed):
        if earlier or len(failed) < len(report.outcomes):
            return DeliveryOutcome.rejected(f"refused for good: {summary}")
        return DeliveryOutcome.rejected(f"every object refused: {summary}")
    return DeliveryOutcome.retry(summary)


def _summary(report: SendReport, earlier: int = 0) -> str:
    """e.g. ``5/6 acknowledged; failed: no_context x1 (Segmentation Storage (1.2...))``,
    ``0/2 acknowledged; failed: not_acknowledged x2; no C-STORE response within ...``:
    which SOP classes failed, for the PACS administrator to look up."""
    acked = earlier + sum(1 for o in report.outcomes if o.acknowledged)
    parts = [f"{acked}/{earlier + len(report.outcomes)} acknowledged"]
    failures: dict[str, tuple[int, dict[str, None]]] = {}
    for o in report.outcomes:
        if o.acknowledged:
            continue
        key = f"{o.status:04X}" if o.status is not None else o.state.value
        count, classes = failures.get(key, (0, {}))
        if o.sop_class_uid:
            classes[sop_class_name(o.sop_class_uid)] = None
        failures[key] = (count + 1, classes)
    if failures:
        parts.append(
            "failed: "
            + ", ".join(
                f"{key} x{count}" + (f" ({', '.join(classes)})" if classes else "")
                for key, (count, classes) in sorted(failures.items())
            )
        )
    if report.association is AssociationState.ABORTED:
        parts.append(report.reason or "association aborted")
    return "; ".join(parts)


def acknowledged_record(folder: Path, destination: str, peer: str = "") -> Path:
    """Where the names of the files ``destination`` acknowledged are kept, next to them
    (a readable name, and a hash of the name and ``peer``: a destination pointed at
    another PACS, or two names that read alike, do not share a record)."""
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", destination)[:40]
    digest = hashlib.sha256(f"{destination}|{peer}".encode()).hexdigest()[:8]
    return folder / f".acknowledged-{readable}-{digest}"


def _read_acknowledged(record: Path) -> set[str]:
    try:
        return set(record.read_text(encoding="utf-8").split())
    except OSError:  # none yet (or unreadable: everything is sent, as before)
        return set()


def _write_acknowledged(record: Path, names: set[str]) -> None:
    """Best effort, atomically: lost, the next attempt sends the whole folder again."""
    partial = record.with_name(f"{record.name}.{os.getpid()}.tmp")
    try:
        partial.write_text("".join(f"{n}\n" for n in sorted(names)), encoding="utf-8")
        partial.replace(record)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        log.warning(
            "dicom.acknowledged_not_recorded",
            reason=str(exc),
            action="check the results folder's disk; the next attempt sends every object",
        )


_WARNINGS = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}


class DicomDeliverer:
    """Sends outbox deliveries of kind ``dicom`` (a results folder) to one Storage SCP."""

    def __init__(self, settings: DicomDestinationSettings) -> None:
        self.settings = settings
        self.destination = settings.storage_destination()

    def deliver(self, item: Delivery) -> DeliveryOutcome:
        ids = {"delivery": item.id, "job": item.job_id, "destination": item.destination}
        if not item.payload_ref:
            return DeliveryOutcome.rejected("DICOM delivery has no payload_ref (results folder)")
        folder = Path(item.payload_ref)
        if not folder.is_dir():
            return DeliveryOutcome.rejected("results folder does not exist")
        files = result_files(folder)
        if not files:
            return DeliveryOutcome.rejected("results folder holds no DICOM files")
        files, left_out = self._wanted(files)
        if not files:  # e.g. only a SEG, and this PACS takes none
            log.info("dicom.attempt", **ids, files=0, left_out=left_out, outcome="delivered")
            return DeliveryOutcome.delivered()
        peer = f"{self.settings.ae_title}@{self.settings.host}:{self.settings.port}"
        record = acknowledged_record(folder, item.destination, peer)
        earlier = _read_acknowledged(record) & {f.name for f in files}
        todo = [f for f in files if f.name not in earlier]
        if not todo:  # acknowledged by an earlier attempt whose outcome was not recorded
            return DeliveryOutcome.delivered()
        report = send_files(self.destination, todo)
        now = {o.path.name for o in report.outcomes if o.acknowledged}
        if now:
            _write_acknowledged(record, earlier | now)
        outcome = outcome_of(report, earlier=len(earlier))
        log.info(
            "dicom.attempt",
            **ids,
            association=report.association.value,
            files=len(report.outcomes),
            acknowledged=len(now),
            acknowledged_before=len(earlier),
            left_out=left_out,
            outcome=outcome.status.value,
            seconds=round(report.seconds, 3),
        )
        self._log_warnings(report, ids)
        return outcome

    def _wanted(self, files: list[Path]) -> tuple[list[Path], int]:
        """The files of the kinds this destination takes (``objects``), and how many
        were left out."""
        wanted = set(self.settings.objects)
        if wanted >= {"sr", "seg", "sc", "derived"}:
            return files, 0
        kept = [f for f in files if _kind_of_file(f) in (*wanted, None)]
        return kept, len(files) - len(kept)

    @staticmethod
    def _log_warnings(report: SendReport, ids: dict[str, object]) -> None:
        """A warning status (B000: the PACS changed attributes, B007, B006) counts as
        stored, and nothing said so (acceptance pass): one line per status and class."""
        seen: dict[tuple[int, str], int] = {}
        for o in report.outcomes:
            if o.state is FileState.WARNING and o.status is not None:
                key = (o.status, o.sop_class_uid)
                seen[key] = seen.get(key, 0) + 1
        for (status, sop_class), count in seen.items():
            log.warning(
                "dicom.store_warning",
                **ids,
                status=f"{status:04X}",
                meaning=_WARNINGS.get(status, "warning"),
                sop_class=sop_class_name(sop_class),
                files=count,
                action="stored all the same; if the PACS changed attributes (B000), check"
                " its coercion rules for objects from this node",
            )
