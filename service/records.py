"""Small typed objects passed between stages.

Frozen dataclasses, so a stage cannot change what an earlier stage handed over.
None of them carries patient identity (name, ID, birth date, accession): those stay
in the DICOM files, never in the index, the logs or the API.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum


def is_localizer_type(image_type: Iterable[object]) -> bool:
    """Image Type has the value LOCALIZER (a scout or topogram; PS3.3 C.8.2.1.1.1)."""
    return any(str(v).strip().upper() == "LOCALIZER" for v in image_type)


#: View Position (0018,5101) of a frontal radiograph, the most wanted first: what the
#: index routes a series by and what a 2D pipeline reads of a series of radiographs.
FRONTAL_VIEWS = ("PA", "AP")


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes of one instance that the index and routing need.

    Read from the data set header at receive time (no pixel data is decoded).
    """

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str = ""
    body_part: str = ""
    series_description: str = ""
    series_number: int | None = None
    instance_number: int | None = None
    slice_thickness: float | None = None
    image_type: tuple[str, ...] = ()
    #: ImageOrientationPatient (six direction cosines) of the instance, if present.
    image_orientation: tuple[float, ...] | None = None
    manufacturer: str = ""
    manufacturer_model_name: str = ""
    #: Number of Frames: 2D images in the instance (1 for a single-frame image).
    frame_count: int = 1
    #: View Position of a projection radiograph (PA, AP, LL, RL, ...), "" if not given.
    view_position: str = ""
    #: Lossy Image Compression (0028,2110) is 01: the image was compressed lossily, by
    #: the modality or on the way (which makes its Image Type DERIVED).
    lossy_compressed: bool = False


@dataclass(frozen=True)
class StoredInstance:
    """An instance that is durable in the spool."""

    header: InstanceHeader
    path: str
    size_bytes: int
    transfer_syntax_uid: str
    calling_ae: str


class StudyState(StrEnum):
    """Where a study is in its life. Stored as text in the study index."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    #: Retention is deleting its files; its rows go last (service.retention).
    PURGING = "purging"


@dataclass(frozen=True)
class SeriesInfo:
    """One series of a study as the index knows it: what routing rules match on."""

    study_uid: str
    series_uid: str
    modality: str
    body_part: str
    series_description: str
    sop_class_uid: str
    series_number: int | None
    instance_count: int
    slice_thickness: float | None
    image_type: tuple[str, ...]
    image_orientation: tuple[float, ...] | None
    manufacturer: str
    manufacturer_model_name: str
    #: 2D images in the series: the instances' frames summed. An Enhanced CT or MR
    #: sends a whole series as one instance of many frames; rules that mean "enough
    #: slices" count these. None: as many as instances (all single-frame).
    image_count: int | None = None
    #: View Position (0018,5101) of a radiograph series: PA, AP, LL, RL... ("" if none);
    #: one of :data:`FRONTAL_VIEWS` when any image of the series is frontal.
    view_position: str = ""
    #: The image describing the series was compressed lossily (Lossy Image Compression
    #: 01): a DERIVED\PRIMARY series so is an acquired one compressed, not a reformat.
    lossy_compressed: bool = False

    @property
    def images(self) -> int:
        return self.instance_count if self.image_count is None else self.image_count


@dataclass(frozen=True)
class StudySummary:
    """A study as the index knows it, without patient data."""

    study_uid: str
    study_key: str
    state: StudyState
    instance_count: int
    series_count: int
    first_received_at: float
    last_received_at: float
    completed_at: float | None
    #: Completed after the association sending it was aborted (or the node stopped)
    #: and the PACS did not send it again within ``study.interrupted_wait_s``.
    interrupted: bool = False
    #: An association sending it ended in the middle of an instance, which has not been
    #: stored since: an instance is missing, its results are preliminary.
    instance_lost: bool = False


@dataclass(frozen=True)
class IndexOutcome:
    """What recording an instance changed in the index."""

    new_instance: bool
    new_study: bool
    reopened_study: bool


class JobState(StrEnum):
    """Where a job (one series through one pipeline) is. Stored as text in the index.

    ``queued`` and ``running`` are unfinished: after a restart they run again.
    ``done`` ran and produced results; ``failed`` raised (the error says why);
    ``refused`` met a series the pipeline cannot use (e.g. uneven spacing).
    """

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    REFUSED = "refused"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.REFUSED)


@dataclass(frozen=True)
class JobRecord:
    """One job as the study index knows it, without patient data.

    ``error`` is an operator-facing reason (never patient data); ``timings`` holds the
    seconds of each stage of the last run (``load_s``, ``preprocess_s``,
    ``inference_s``, ``postprocess_s``, ``write_s``).
    """

    job_id: str
    study_uid: str
    study_key: str
    series_uid: str
    pipeline: str
    routes: tuple[str, ...]
    destinations: tuple[str, ...]
    state: JobState
    attempts: int
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    result_dir: str | None = None
    timings: dict[str, float] | None = None
    #: The queue's id of the job's current run (its report is looked up by it).
    task_id: str | None = None
    #: ``host:pid`` of the worker running it, as its heartbeat says.
    worker: str | None = None
    #: How many instances the series had when the job was made: every run of the job
    #: reads these first ones, whatever arrived since (a later job covers those).
    instance_count: int | None = None
    #: Made while its study had an instance lost in transit (see
    #: :attr:`StudySummary.instance_lost`): its result is marked preliminary.
    preliminary: bool = False


@dataclass(frozen=True)
class JobTicket:
    """Everything a worker needs to run a job: workers are stateless and never read the
    study index. Paths are on storage the edge and the workers share."""

    job_id: str
    study_key: str
    pipeline: str
    series_paths: tuple[str, ...]
    result_dir: str
    destinations: tuple[str, ...]
    attempt: int
    #: The result folder of the job this one's result replaces (see
    #: :meth:`service.index.StudyIndex.replaced_by`), None for a series' first result.
    #: Its SR becomes the new SR's predecessor, and the HL7 result goes as a correction.
    replaces: str | None = None
    #: The result folders of the refused jobs of the series and pipeline since its last
    #: result, whose "not analyzed" SRs (where made) this job's result makes obsolete.
    not_analyzed: tuple[str, ...] = ()
    #: The study had an instance lost in transit: the result is preliminary (SR
    #: Preliminary Flag, HL7 result status P).
    preliminary: bool = False
    #: The result ``replaces`` was preliminary: this one is its final result (HL7 F,
    #: not C), unless preliminary too.
    replaces_preliminary: bool = False


@dataclass(frozen=True)
class Deliverable:
    """A result ready to send: one HL7 message file, or one folder of DICOM objects."""

    destination: str
    kind: str  # "hl7" or "dicom"
    message_id: str
    path: str


@dataclass(frozen=True)
class JobReport:
    """What a worker hands back for the edge to record and deliver."""

    job_id: str
    worker: str
    state: JobState
    error: str | None = None
    result_dir: str | None = None
    timings: dict[str, float] | None = None
    deliverables: tuple[Deliverable, ...] = ()


@dataclass(frozen=True)
class WorkerView:
    """One worker as the status API shows it (no patient data: a host name and pid)."""

    name: str
    device: str
    pipelines: dict[str, str] = field(default_factory=dict)
    started_at: float = 0.0
    last_seen: float = 0.0
    alive: bool = False
