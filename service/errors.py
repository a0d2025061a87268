"""One exception tree for radnode.

    RadnodeError
    ├── ConfigError        the configuration is invalid (names each bad key)
    ├── InvalidUID         a UID is missing or malformed; it never reaches a path
    ├── UnreadableDataset  received bytes are not a DICOM data set we can parse
    ├── DatasetMismatch    data set contradicts the C-STORE request (SOP class/instance)
    ├── StorageFull        the spool cannot take more data (disk guard or write error)
    │   └── StudyPurging   the study is being removed by retention: the sender retries
    ├── StartupError       the node cannot start (port in use, data_dir not writable)
    ├── SeriesRefused      a series cannot become a trustworthy volume
    │                      (service.pipeline.volume; carries ``reason`` and ``code``)
    ├── BundleError        a bundle's folder, metadata, config or weights are unusable
    │                      (service.pipeline.bundle)
    ├── InputMismatch      a series is not what a pipeline expects (modality, 2D/3D)
    ├── PipelineFailed     a bundle raised or returned something unusable
    │                      (both service.pipeline.inference)
    ├── ResultsNotWritten  a job's DICOM result objects cannot be made (service.publish)
    ├── Hl7Error           an ORU^R01 cannot be built for a destination (service.hl7)
    │   └── MllpError      the MLLP exchange failed (connect, timeout, framing)
    ├── UnknownDelivery    an operator named a delivery the outbox does not hold
    └── StatusUnavailable  ``radnode status`` cannot read the node's status API

Each is translated once at its boundary: to a DIMSE status at the Storage SCP, to an
exit code and one message at the CLI.
"""

from __future__ import annotations

import errno


class RadnodeError(Exception):
    """Base of every error radnode raises on purpose."""


class ConfigError(RadnodeError):
    """The configuration is invalid. ``problems`` holds one line per mistake."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class InvalidUID(RadnodeError):
    """A UID is missing or is not a valid DICOM UID (PS3.5 9.1)."""


class UnreadableDataset(RadnodeError):
    """The received bytes could not be parsed as a DICOM data set."""


class DatasetMismatch(RadnodeError):
    """The data set does not match the C-STORE request that carried it."""

    def __init__(self, message: str, *, sop_class: bool) -> None:
        self.sop_class = sop_class
        super().__init__(message)


class StorageFull(RadnodeError):
    """The spool cannot take the instance (free-space threshold or write error)."""


class StudyTooLarge(StorageFull):
    """The instance would take its study past ``node.max_study_mb``."""


class StudyPurging(StorageFull):
    """An instance of a study that retention is removing right now: refused with 0xA700
    (the sender retries, and the study then arrives anew), never acknowledged and then
    deleted."""


class SourceUnavailable(RadnodeError):
    """A worker cannot open a spool file of its job (missing here, no permission, I/O
    error): this machine's view of ``node.data_dir`` is at fault, not the study. The
    job fails (alerted, retried by the operator) instead of being refused as if the
    series were bad (acceptance pass: a worker with the spool unmounted refused every
    study it took, with "fix the series")."""


class ResultsNotWritten(RadnodeError):
    """A job's DICOM result objects could not be made: the job fails and nothing of it
    is sent (an HL7 result whose SR, SEG and images never reach the PACS would report
    what nobody can look at, and a job marked done would raise no alert)."""


class StartupError(RadnodeError):
    """The node cannot start; the message says what to change."""


class StatusUnavailable(RadnodeError):
    """The node's status API could not be read; the message says what to check."""


def out_of_space(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from, is "no space left" or "quota
    exceeded": the disk's fault, for the operator to fix by freeing space, not a bug."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
