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
        self.spool_root = Path(spool_root).resolve()
        self.results_root = Path(data_dir).resolve() / "results"
        # the spool or the results may be links to other disks: their targets count
        self._roots = (self.spool_root, self.results_root.resolve())
        self.keep_s = keep_s
        self.check_s = check_s
        self._on_purged = on_purged
        self._clock = clock
        self._next_pass = 0.0
        self._warned: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self.keep_s > 0

    def resume(self) -> int:
        """Finish the purges a stop interrupted; how many. Never raises: a study left
        purging is tried again at the next pass."""
        try:
            interrupted = self.index.studies_purging()
        except Exception as exc:
            self._failed(exc, None)
            return 0
        return sum(self._purge(study_uid, resumed=True) for study_uid in interrupted)

    def poll(self) -> int:
        """Run a pass when one is due; how many studies it removed. Never raises."""
        now = self._clock()
        if not self.enabled or now < self._next_pass:
            return 0
        self._next_pass = now + self.check_s
        try:
            return self.run_once(now)
        except Exception as exc:
            self._failed(exc, None)
            return 0

    def run_once(self, now: float | None = None) -> int:
        """One pass: purge every study past ``keep_s`` whose deliveries all went out.

        Candidates come oldest first, page after page, so studies kept for a pending
        or dead delivery never hide the ones after them."""
        now = self._clock() if now is None else now
        before = now - self.keep_s
        purged = self.resume()  # one a failed pass left
        cursor = (0.0, "")
        while page := self.index.purgeable_studies(before, BATCH, after=cursor):
            for study_uid, last_received_at in page:
                cursor = (last_received_at, study_uid)
                purged += self._try(study_uid, last_received_at, before)
        return purged

    def _try(self, study_uid: str, last_received_at: float, before: float) -> int:
        """Purge one candidate if nothing holds it; 1 if it went."""
        try:
            job_ids = self.index.job_ids_of(study_uid)
            if self.outbox.unsent(job_ids):
                return 0  # a delivery is pending or dead: its files are still needed
            if not self.index.begin_purge(study_uid, last_received_at, before):
                return 0  # an instance arrived or a job ran since it was chosen
            if self.outbox.unsent(job_ids):  # a dead letter resent in between
                self.index.cancel_purge(study_uid)
                return 0
        except Exception as exc:
            self._failed(exc, study_uid)
            return 0
        return self._purge(study_uid)

    def _purge(self, study_uid: str, *, resumed: bool = False) -> int:
        """Delete a purging study's files, then its rows; 1 if it went. Never raises: a
        study that fails stays purging (its instances refused) and is tried again at
        the next pass, and the other studies go on."""
        try:
            paths, result_dirs = self.index.purge_files(study_uid)
            job_ids = self.index.job_ids_of(study_uid)
            # Every job's folder: a failed or refused job records none, but may have
            # left scratch pages or partial results there.
            folders = {Path(d) for d in result_dirs}
            folders |= {self.results_root / job_id for job_id in job_ids}
            outside = [p for p in (*map(Path, paths), *folders) if not self._inside(p)]
            if outside:
                self.index.cancel_purge(study_uid)
                if study_uid in self._warned:
                    return 0  # said once per run, not at every pass
                self._warned.add(study_uid)
                log.warning(
                    "retention.outside_data_dir",
                    study=study_key(study_uid),
                    files=len(outside),
                    action="the study is kept: its index names files outside"
                    " node.data_dir (moved spool or results?); move them back under it",
                )
                return 0
            freed = sum(self._remove_file(Path(p)) for p in paths)
            for folder in {Path(p).parent for p in paths}:
                self._remove_empty(folder)  # the series folder, then the study's
                self._remove_empty(folder.parent)
            freed += sum(self._remove_tree(folder) for folder in folders)
            self.outbox.forget_jobs(job_ids)
            instances = self.index.finish_purge(study_uid)
        except Exception as exc:
            self._failed(exc, study_uid)
            return 0
        self._on_purged(freed)
        log.info(
            "study.purged",
            study=study_key(study_uid),
            instances=instances,
            results=len(result_dirs),
            freed_bytes=freed,
            resumed=resumed,
        )
        return 1

    @staticmethod
    def _failed(exc: Exception, study_uid: str | None) -> None:
        log.error(
            "retention.failed",
            study=None if study_uid is None else study_key(study_uid),
            reason=f"{type(exc).__name__}: {exc}",
            action="see the reason; the study stays and the next pass tries again",
        )

    def _inside(self, path: Path) -> bool:
        """Only what lies in the spool or the results, wherever they are mounted, is
        ever deleted (a row naming anything else is not trusted)."""
        try:
            resolved = path.resolve()
        except OSError:
            return False
        return any(resolved.is_relative_to(root) for root in self._roots)

    def _remove_file(self, path: Path) -> int:
        try:
            size = path.stat().st_size
            path.unlink()
            return size
        except FileNotFoundError:
            return 0

    def _remove_tree(self, folder: Path) -> int:
        folder = folder.resolve()  # a results folder may be a link to another disk
        if not folder.is_dir():
            return 0
        size = sum(
            (Path(root) / name).stat().st_size
            for root, _, names in os.walk(folder)
            for name in names
        )
        shutil.rmtree(folder)
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
