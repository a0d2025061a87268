"""Which run of a job owns its results folder: the latest to start.

A run the edge took for lost (its worker paused, or cut off from Redis) is queued
again; when the first worker comes back it finished too, and rewrote the results folder
after the second run's results had been delivered (acceptance pass: SIGSTOP for 30 s).
Each run writes its attempt number into ``<result_dir>/.run`` as it starts and looks
there again before it writes results: a later attempt's number means the folder is
that run's, and this run ends without writing. A file, not the queue: it needs nothing
but the results folder the run writes anyway, on any queue, and retention removes it
with the folder.
"""

from __future__ import annotations

import os
from pathlib import Path

CLAIM_FILE = ".run"


class RunSuperseded(Exception):
    """A later run of the job has started; this one must not write its results."""


def claim(result_dir: Path, attempt: int) -> None:
    """Mark ``result_dir`` as this run's, unless a later attempt already holds it."""
    check(result_dir, attempt)
    result_dir.mkdir(parents=True, exist_ok=True)
    # what a PACS acknowledged of an earlier run's files is not what this run writes
    # (service.dicom_delivery keeps those records in the folder; review)
    for record in result_dir.rglob(".acknowledged-*"):
        record.unlink(missing_ok=True)
    partial = result_dir / f"{CLAIM_FILE}.{attempt}.{os.getpid()}"
    partial.write_text(str(attempt), encoding="ascii")
    os.replace(partial, result_dir / CLAIM_FILE)


def check(result_dir: Path, attempt: int) -> None:
    """Raise :class:`RunSuperseded` when a later attempt holds ``result_dir``."""
    try:
        holder = int((result_dir / CLAIM_FILE).read_text(encoding="ascii").strip() or 0)
    except (FileNotFoundError, ValueError):
        return
    if holder > attempt:
        raise RunSuperseded(
            f"run {attempt} of this job was taken for lost and run {holder} has started;"
            " this run writes nothing"
        )
