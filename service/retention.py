"""Retention: remove studies the node is done with, so the spool does not fill the disk.

Why: the node is a processing station next to the PACS, not an archive. Every study
the PACS routes here stays in the spool (hundreds of MB for a CT), and once the disk
guard trips every C-STORE is refused. The PACS holds the study and, once delivered,
its results; after ``study.keep_days`` of quiet the node lets them go.

A study is removed when all of these hold:

* it is complete, and nothing arrived for ``keep_days``;
* none of its jobs is queued or running, and none finished within ``keep_days``;
* every delivery of its jobs was sent. A dead letter keeps the study: resending it
  needs the files (``/api/dead-letters``).

The purge is ordered so that nothing acknowledged is lost and a stop at any point
finishes later: the study is first marked ``purging`` in the index (only if it is
still complete and untouched since it was chosen); from then on an instance of it is
refused with 0xA700, so the sender retries after the purge and the study arrives anew
rather than being acknowledged into a folder that is being deleted. Then its spool
files and result folders are deleted, then the outbox rows of its sent deliveries
(HL7 payloads carry patient data), then its index rows. A study found ``purging`` at
start is finished first (:meth:`Retention.resume`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from service.delivery import Outbox
from service.index import StudyIndex
from service.uids import study_key

log = structlog.get_logger("service.retention")

#: Studies looked at per pass; the next pass takes the rest.
BATCH = 20


class Retention:
    """Purges studies past ``keep_s``; :meth:`poll` from a housekeeping loop."""

    def __init__(
        self,
        index: StudyIndex,
        outbox: Outbox,
        *,
        data_dir: Path,
        spool_root: Path,
        keep_s: float,
        check_s: float,
        on_purged: Callable[[int], None] = lambda size: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.index = index
        self.outbox = outbox
        self.data_dir = Path(data_dir).resolve()
        self.spool_root = Path(spool_root).resolve()
        self.keep_s = keep_s
        self.check_s = check_s
        self._on_purged = on_purged
        self._clock = clock
        self._next_pass = 0.0

    @property
    def enabled(self) -> bool:
        return self.keep_s > 0

    def resume(self) -> int:
        """Finish the purges a stop interrupted; how many. Never raises: a study left
        purging is tried again at the next start, and refuses instances meanwhile."""
        try:
            interrupted = self.index.studies_purging()
            for study_uid in interrupted:
                self._purge(study_uid, resumed=True)
        except Exception as exc:
            log.error(
                "retention.failed",
                reason=f"{type(exc).__name__}: {exc}",
                action="check the disk under node.data_dir; the next start retries",
            )
            return 0
        return len(interrupted)

    def poll(self) -> int:
        """Run a pass when one is due; how many studies it removed. Never raises."""
        now = self._clock()
        if not self.enabled or now < self._next_pass:
            return 0
        self._next_pass = now + self.check_s
        try:
            return self.run_once(now)
        except Exception as exc:
            log.error(
                "retention.failed",
                reason=f"{type(exc).__name__}: {exc}",
                action="check the disk under node.data_dir; the next pass retries",
            )
            return 0

    def run_once(self, now: float | None = None) -> int:
        """One pass: purge every study past ``keep_s`` whose deliveries all went out."""
        now = self._clock() if now is None else now
        purged = 0
        for study_uid in self.index.studies_purging():  # one a failed pass left
            self._purge(study_uid, resumed=True)
            purged += 1
        for study_uid, last_received_at in self.index.purgeable_studies(now - self.keep_s, BATCH):
            if self.outbox.unsent(self.index.job_ids_of(study_uid)):
                continue  # a delivery is pending or dead: its files are still needed
            if not self.index.begin_purge(study_uid, last_received_at):
                continue  # an instance arrived or a job was queued since it was chosen
            self._purge(study_uid)
            purged += 1
        return purged

    def _purge(self, study_uid: str, *, resumed: bool = False) -> None:
        paths, result_dirs = self.index.purge_files(study_uid)
        freed = sum(self._remove_file(Path(p)) for p in paths)
        for folder in {Path(p).parent for p in paths}:
            self._remove_empty(folder)  # the series folder, then the study's
            self._remove_empty(folder.parent)
        freed += sum(self._remove_tree(Path(d)) for d in result_dirs)
        self.outbox.forget_jobs(self.index.job_ids_of(study_uid))
        instances = self.index.finish_purge(study_uid)
        self._on_purged(freed)
        log.info(
            "study.purged",
            study=study_key(study_uid),
            instances=instances,
            results=len(result_dirs),
            freed_bytes=freed,
            resumed=resumed,
        )

    def _inside(self, path: Path) -> bool:
        """Only what lies under node.data_dir is ever deleted (a row naming anything
        else is left alone, not trusted)."""
        try:
            return path.resolve().is_relative_to(self.data_dir)
        except OSError:
            return False

    def _remove_file(self, path: Path) -> int:
        if not self._inside(path):
            log.warning("retention.outside_data_dir", action="none; the file is kept")
            return 0
        try:
            size = path.stat().st_size
            path.unlink()
            return size
        except FileNotFoundError:
            return 0

    def _remove_tree(self, folder: Path) -> int:
        if not self._inside(folder) or not folder.is_dir():
            return 0
        size = sum(
            (Path(root) / name).stat().st_size
            for root, _, names in os.walk(folder)
            for name in names
        )
        shutil.rmtree(folder, ignore_errors=True)
        return size

    def _remove_empty(self, folder: Path) -> None:
        """Remove a series or study folder of the spool once it is empty."""
        try:
            below_spool = folder.resolve().is_relative_to(self.spool_root)
        except OSError:
            return
        if below_spool and folder.resolve() != self.spool_root:
            # not empty (another series, a new arrival) or already gone: kept
            with contextlib.suppress(OSError):
                folder.rmdir()
