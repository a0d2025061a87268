"""After a job: put its results in the outbox for every destination of its routes.

The worker writes results; the node's delivery thread sends them (ARCHITECTURE step 9).
The outbox between them is durable, so a result produced just before a crash is still
sent after the restart, and a destination that is down gets it when it is back.
Enqueueing is idempotent per (job, destination): a job that runs again after a crash
does not send twice.
"""

from __future__ import annotations

from pathlib import Path

import structlog
from pydicom import dcmread

from service.config import Settings
from service.delivery import Outbox
from service.hl7 import Hl7DestinationSettings, Hl7Error
from service.pipeline.result import PipelineResult
from service.pipeline.volume import Volume
from service.records import JobRecord
from service.writers.oru import enqueue_oru

log = structlog.get_logger("service.publish")

OUTBOX_FILE = "outbox.sqlite3"


def outbox_path(settings: Settings) -> Path:
    return Path(settings.node.data_dir) / OUTBOX_FILE


class ResultPublisher:
    """Turns a finished job into deliveries, one per destination of its routes."""

    def __init__(self, settings: Settings, outbox: Outbox) -> None:
        self.destinations = {d.name: d for d in settings.destinations}
        self.outbox = outbox

    def publish(
        self, job: JobRecord, result: PipelineResult, volume: Volume, source_paths: list[str]
    ) -> int:
        """Enqueue the job's deliveries; return how many were enqueued."""
        enqueued = 0
        header = None
        for name in job.destinations:
            destination = self.destinations.get(name)
            if destination is None:
                log.error("delivery.unknown_destination", job=job.job_id, destination=name,
                          action="add the destination to the configuration")  # fmt: skip
                continue
            if isinstance(destination, Hl7DestinationSettings):
                if header is None:
                    header = dcmread(source_paths[0], stop_before_pixels=True)
                try:
                    enqueue_oru(
                        self.outbox,
                        job_id=job.job_id,
                        result=result,
                        source=header,
                        spacing_mm=volume.spacing,
                        destination=destination,
                    )
                except Hl7Error as exc:
                    log.error(
                        "hl7.not_built",
                        job=job.job_id,
                        destination=name,
                        reason=str(exc),
                        action="fix the source header or the destination settings",
                    )
                    continue
                enqueued += 1
        return enqueued
