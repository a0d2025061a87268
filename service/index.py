"""The study index: SQLite (WAL) rows for studies, series and instances.

The spool's files are the record of what was received; the index is what the rest of
radnode reads to decide what to do. Both are written before Success is returned. The
index runs with ``synchronous=NORMAL``: an application crash loses nothing, and the
few transactions a power cut may lose are rebuilt from the spool at start
(:meth:`StudyIndex.missing_from` + :meth:`StudyIndex.add_instance`).

No patient identity is stored here: studies are found by UID and named in logs and
the API by their ``study_key``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import structlog

from service.errors import StudyPurging
from service.records import (
    FRONTAL_VIEWS,
    IndexOutcome,
    JobRecord,
    JobState,
    SeriesInfo,
    StoredInstance,
    StudyState,
    StudySummary,
    is_localizer_type,
)
from service.sqlite_tx import add_column, immediate_transaction
from service.uids import study_key

log = structlog.get_logger("service.index")

SCHEMA_VERSION = 9

#: Jobs made before / after another, by (created_at, job_id): a strict order, so two
#: jobs made in the same instant never each wait for the other.
_BEFORE = "(j.created_at < ? OR (j.created_at = ? AND j.job_id < ?))"
_AFTER = "(j.created_at > ? OR (j.created_at = ? AND j.job_id > ?))"


#: SQL placeholders for :data:`FRONTAL_VIEWS`.
_FRONTAL_MARKS = ", ".join("?" * len(FRONTAL_VIEWS))


def _order_of(job: JobRecord) -> tuple[float, float, str]:
    return (job.created_at, job.created_at, job.job_id)


_JOBS_TABLE = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL REFERENCES studies (study_uid),
    series_uid TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    -- the series' instance count when routed: a series that grows gets a new job
    instance_count INTEGER NOT NULL,
    routes TEXT NOT NULL,
    destinations TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT,
    result_dir TEXT,
    timings TEXT,
    -- host:pid of the worker running it, so a dead worker's job can be put back
    worker TEXT,
    -- the queue's id of the current run; NULL until it is enqueued
    task_id TEXT,
    -- made while its study had an instance lost in transit: its result is preliminary
    preliminary INTEGER NOT NULL DEFAULT 0,
    -- one job per series, size and pipeline, and a final one after a preliminary one
    -- (the lost instance came, the series did not grow: version 9)
    UNIQUE (series_uid, pipeline, instance_count, preliminary)
)"""
_JOBS_INDEXES = (
    "CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at)",
    "CREATE INDEX IF NOT EXISTS jobs_by_study ON jobs (study_uid)",
)

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    study_key TEXT NOT NULL,
    state TEXT NOT NULL,
    instance_count INTEGER NOT NULL DEFAULT 0,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    completed_at REAL,
    -- instances refused because the study would pass node.max_study_mb
    refused_too_large INTEGER NOT NULL DEFAULT 0
);
-- instances lost in transit: an association ended in the middle of their data set, and
-- they are not stored (a row goes when its instance is). Charged to the study the
-- association was sending; while it has a row, its results are preliminary.
CREATE TABLE IF NOT EXISTS lost_in_transit (
    sop_instance_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL
);
-- instances refused while the disk was full and not stored since (a row goes when its
-- instance is stored: the sender's retry brought it)
CREATE TABLE IF NOT EXISTS refused_no_space (
    sop_instance_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS refused_no_space_by_study ON refused_no_space (study_uid);
CREATE INDEX IF NOT EXISTS studies_by_state ON studies (state, last_received_at);
CREATE INDEX IF NOT EXISTS studies_by_key ON studies (study_key);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL REFERENCES studies (study_uid),
    modality TEXT NOT NULL,
    body_part TEXT NOT NULL,
    series_description TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    series_number INTEGER,
    instance_count INTEGER NOT NULL DEFAULT 0,
    -- frames summed: an Enhanced CT/MR series is one instance of many frames
    image_count INTEGER NOT NULL DEFAULT 0,
    slice_thickness REAL,
    image_type TEXT NOT NULL,
    image_orientation TEXT,
    manufacturer TEXT NOT NULL,
    manufacturer_model_name TEXT NOT NULL,
    view_position TEXT NOT NULL DEFAULT '',
    -- Lossy Image Compression 01 (so a DERIVED, PRIMARY series is an acquired one)
    lossy_compressed INTEGER NOT NULL DEFAULT 0,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS series_by_study ON series (study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL REFERENCES series (series_uid),
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    instance_number INTEGER,
    path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances (series_uid);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances (study_uid);
"""
    + ";\n".join((_JOBS_TABLE, *_JOBS_INDEXES))
    + """;
-- an open association and the series its last instance belonged to: that series and
-- its study are held open (not completed) while the association is, within a bound
-- (complete_quiet_studies, quiet_series); interrupted_at: when the association was
-- aborted, or found cut by the node's start, and the PACS may send the rest again
CREATE TABLE IF NOT EXISTS delivering (
    association TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    interrupted_at REAL
);
"""
)


#: SQL (``st`` the study; parameters: two job states, a time): a job of the study that
#: is queued or running, or was created or finished at or after the time.
_RECENT_OR_UNFINISHED_JOB = (
    "SELECT 1 FROM jobs j WHERE j.study_uid = st.study_uid"
    " AND (j.state IN (?, ?) OR MAX(j.created_at, COALESCE(j.finished_at, 0)) >= ?)"
)


def _holds(last_received: str) -> str:
    """SQL (``d`` a delivering row; parameters: now, hold_s, now, interrupted_s): the
    row still holds what received its last instance at ``last_received``. An open
    association holds for ``hold_s`` from that instance, an interrupted one for
    ``interrupted_s`` from the interruption (review: from the last instance, a node down
    longer than that completed every cut study the moment it started)."""
    return (
        f"CASE WHEN d.interrupted_at IS NULL THEN {last_received} > ? - ?"
        " ELSE d.interrupted_at > ? - ? END"
    )


#: SQL (the study UID's expression to fill in): a lost instance charged to the study.
_LOST_IN_TRANSIT = "SELECT 1 FROM lost_in_transit l WHERE l.study_uid = {}"

#: SQL: an Image Type (values joined by backslashes) with the value LOCALIZER.
_LOCALIZER = "('\\' || COALESCE({}, '') || '\\') LIKE '%\\LOCALIZER\\%'"


def _join(values: Iterable[object] | None) -> str | None:
    return None if values is None else "\\".join(str(v) for v in values)


class StudyIndex:
    """Thread-safe access to the index database of one node.

    One connection guarded by a lock: every write is a short transaction, and the
    Storage SCP's associations (each storing on its own DUL thread) share it.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=10000")
        with self._lock:
            self._db.executescript(_SCHEMA)  # idempotent; executescript commits itself
            self._upgrade()
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _upgrade(self) -> None:
        """Bring an index written by an older radnode up to :data:`SCHEMA_VERSION`.

        Version 3 added ``series.image_count``; the series already indexed count one
        image per instance (what routing saw before). Version 4 added
        ``series.view_position``; series indexed before have none (""). Version 5 added
        ``studies.refused_too_large``, version 6 the ``refused_no_space`` table and
        version 7 the ``delivering`` table (both made by the schema script, which
        creates what is missing). Version 8 added the ``lost_in_transit`` table and
        ``jobs.preliminary``: no job indexed before was preliminary (0). Version 9 made
        ``preliminary`` part of the jobs' unique key (:meth:`_rebuild_jobs_unique_key`)
        and added ``series.lossy_compressed`` (series indexed before: 0, as routed then).
        """
        add_column(
            self._db,
            "series",
            "image_count INTEGER NOT NULL DEFAULT 0",
            then="UPDATE series SET image_count = instance_count;",
        )
        add_column(self._db, "series", "view_position TEXT NOT NULL DEFAULT ''")
        add_column(self._db, "studies", "refused_too_large INTEGER NOT NULL DEFAULT 0")
        add_column(self._db, "delivering", "interrupted_at REAL")
        add_column(self._db, "jobs", "preliminary INTEGER NOT NULL DEFAULT 0")
        add_column(self._db, "series", "lossy_compressed INTEGER NOT NULL DEFAULT 0")
        self._rebuild_jobs_unique_key()

    def _rebuild_jobs_unique_key(self) -> None:
        """Version 9: ``jobs`` unique by series, pipeline, size *and* preliminary, so a
        series whose study lost an instance in transit gets its final job when that
        instance comes, though the series itself did not grow (the key cannot be
        altered in SQLite: the table is made again and the rows copied)."""

        def current() -> bool:
            (sql,) = self._db.execute(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'"
            ).fetchone()
            return "instance_count, preliminary)" in sql

        if current():
            return
        with immediate_transaction(self._db) as db:
            if current():  # another process of the node did it meanwhile
                return
            columns = ", ".join(row[1] for row in db.execute("PRAGMA table_info(jobs)"))
            db.execute("ALTER TABLE jobs RENAME TO jobs_before_9")
            db.execute(_JOBS_TABLE)
            db.execute(f"INSERT INTO jobs ({columns}) SELECT {columns} FROM jobs_before_9")
            db.execute("DROP TABLE jobs_before_9")  # and its indexes, made again:
            for statement in _JOBS_INDEXES:
                db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, immediate_transaction(self._db) as db:
            yield db

    # -- receive path ---------------------------------------------------------

    def instance_path(self, sop_instance_uid: str) -> str | None:
        """The spool file of a stored instance, or None if it was never stored."""
        with self._lock:
            row = self._db.execute(
                "SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        return None if row is None else str(row[0])

    def refused_too_large(self, study_uid: str) -> None:
        """Count an instance of the study refused for node.max_study_mb (a study that
        is not indexed yet has nothing stored, hence nothing to report on)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE studies SET refused_too_large = refused_too_large + 1 WHERE study_uid = ?",
                (study_uid,),
            )

    def refused_no_space(self, study_uid: str, sop_instance_uid: str) -> None:
        """Note an instance refused while the disk was full, until it is stored
        (acceptance pass: a study cut short by a full disk got a job on half its
        slices). Best effort: on a disk that full the index may not take the note."""
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT OR IGNORE INTO refused_no_space (sop_instance_uid, study_uid)"
                    " VALUES (?, ?)",
                    (sop_instance_uid, study_uid),
                )
        except sqlite3.Error:
            log.warning(
                "index.refusal_not_noted",
                study=study_key(study_uid),
                action="free disk space; the study may be processed without this instance",
            )

    def forget_refused_too_large(self, study_uid: str | None = None) -> None:
        """Forget the refusals (of one study, or all: at start, when node.max_study_mb
        may have been raised), so the study's jobs run on what it then holds. An
        operator's retry of one study forgets its full-disk refusals too."""
        where, params = ("WHERE study_uid = ?", (study_uid,)) if study_uid else ("", ())
        with self._transaction() as db:
            db.execute(f"UPDATE studies SET refused_too_large = 0 {where}", params)
            if study_uid:
                db.execute("DELETE FROM refused_no_space WHERE study_uid = ?", (study_uid,))

    def instances_refused(self, study_uid: str) -> tuple[int, int]:
        """Instances of the study refused for node.max_study_mb, and for a full disk."""
        with self._lock:
            row = self._db.execute(
                "SELECT refused_too_large FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone()
            (no_space,) = self._db.execute(
                "SELECT COUNT(*) FROM refused_no_space WHERE study_uid = ?", (study_uid,)
            ).fetchone()
        return (int(row[0]) if row else 0, int(no_space))

    def study_bytes(self, study_uid: str) -> int:
        """Bytes of the study's stored instances (spool files, file meta included)."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(size_bytes), 0) FROM instances WHERE study_uid = ?",
                (study_uid,),
            ).fetchone()
        return int(row[0])

    def add_instance(self, stored: StoredInstance, now: float | None = None) -> IndexOutcome:
        """Record a durable instance; a study that was complete is reopened."""
        now = time.time() if now is None else now
        h = stored.header
        with self._transaction() as db:
            row = db.execute(
                "SELECT state FROM studies WHERE study_uid = ?", (h.study_uid,)
            ).fetchone()
            if row is not None and row[0] == StudyState.PURGING:
                raise StudyPurging("the study is being removed by retention; retry shortly")
            new_study = row is None
            reopened = row is not None and row[0] != StudyState.RECEIVING
            if new_study:
                db.execute(
                    "INSERT INTO studies (study_uid, study_key, state, first_received_at,"
                    " last_received_at) VALUES (?, ?, ?, ?, ?)",
                    (h.study_uid, study_key(h.study_uid), StudyState.RECEIVING, now, now),
                )
            db.execute(
                "INSERT INTO series (series_uid, study_uid, modality, body_part,"
                " series_description, sop_class_uid, series_number, slice_thickness,"
                " image_type, image_orientation, manufacturer, manufacturer_model_name,"
                " view_position, lossy_compressed, first_received_at, last_received_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                # Routing reads these from the series' first instance; a localizer
                # that came first (a scout inside the axial series) would route the
                # series as a localizer: the first other image describes it instead.
                " ON CONFLICT (series_uid) DO UPDATE SET modality = excluded.modality,"
                " body_part = excluded.body_part,"
                " series_description = excluded.series_description,"
                " sop_class_uid = excluded.sop_class_uid,"
                " series_number = excluded.series_number,"
                " slice_thickness = excluded.slice_thickness,"
                " image_type = excluded.image_type,"
                " image_orientation = excluded.image_orientation,"
                " manufacturer = excluded.manufacturer,"
                " manufacturer_model_name = excluded.manufacturer_model_name,"
                " view_position = excluded.view_position,"
                " lossy_compressed = excluded.lossy_compressed"
                f" WHERE {_LOCALIZER.format('series.image_type')}"
                f" AND NOT {_LOCALIZER.format('excluded.image_type')}",
                (
                    h.series_uid,
                    h.study_uid,
                    h.modality,
                    h.body_part,
                    h.series_description,
                    h.sop_class_uid,
                    h.series_number,
                    h.slice_thickness,
                    _join(h.image_type),
                    _join(h.image_orientation),
                    h.manufacturer,
                    h.manufacturer_model_name,
                    h.view_position,
                    h.lossy_compressed,
                    now,
                    now,
                ),
            )
            frontal = h.view_position.strip().upper() in FRONTAL_VIEWS
            if frontal and not is_localizer_type(h.image_type):
                # PA and lateral sent in one series, lateral first: routed as a lateral,
                # the series was never read (acceptance pass). A frontal image in it
                # makes it a frontal series, whose 2D pipeline reads that image; a
                # localizer describes no series (review).
                db.execute(
                    "UPDATE series SET view_position = ? WHERE series_uid = ?"
                    f" AND UPPER(TRIM(view_position)) NOT IN ({_FRONTAL_MARKS})",
                    (h.view_position, h.series_uid, *FRONTAL_VIEWS),
                )
            inserted = db.execute(
                "INSERT INTO instances (sop_instance_uid, series_uid, study_uid,"
                " sop_class_uid, transfer_syntax_uid, instance_number, path, size_bytes,"
                " calling_ae, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (sop_instance_uid) DO NOTHING",
                (
                    h.sop_instance_uid,
                    h.series_uid,
                    h.study_uid,
                    h.sop_class_uid,
                    stored.transfer_syntax_uid,
                    h.instance_number,
                    stored.path,
                    stored.size_bytes,
                    stored.calling_ae,
                    now,
                ),
            ).rowcount
            added = 1 if inserted else 0
            db.execute(
                "UPDATE series SET instance_count = instance_count + ?,"
                " image_count = image_count + ?, last_received_at = ? WHERE series_uid = ?",
                (added, added * max(h.frame_count, 1), now, h.series_uid),
            )
            db.execute(
                "UPDATE studies SET instance_count = instance_count + ?, last_received_at = ?,"
                " state = ?, completed_at = NULL WHERE study_uid = ?",
                (added, now, StudyState.RECEIVING, h.study_uid),
            )
            for table in ("refused_no_space", "lost_in_transit"):
                db.execute(f"DELETE FROM {table} WHERE sop_instance_uid = ?", (h.sop_instance_uid,))
        return IndexOutcome(
            new_instance=bool(inserted), new_study=new_study, reopened_study=reopened
        )

    def touch_study_of(
        self, sop_instance_uid: str, now: float | None = None
    ) -> tuple[str, str, bool] | None:
        """A known instance arrived again: note the activity, reopen its study.

        Returns its study's and series' UIDs and whether the study was complete and is
        now receiving again; None when the instance is not indexed (any more: retention
        may have removed it since).
        """
        now = time.time() if now is None else now
        with self._transaction() as db:
            row = db.execute(
                "SELECT s.study_uid, s.state, i.series_uid FROM instances i JOIN studies s"
                " ON s.study_uid = i.study_uid WHERE i.sop_instance_uid = ?",
                (sop_instance_uid,),
            ).fetchone()
            if row is None:
                return None
            if row[1] == StudyState.PURGING:
                raise StudyPurging("the study is being removed by retention; retry shortly")
            db.execute(
                "UPDATE studies SET last_received_at = ?, state = ?, completed_at = NULL"
                " WHERE study_uid = ?",
                (now, StudyState.RECEIVING, row[0]),
            )
        return row[0], row[2], row[1] != StudyState.RECEIVING

    # -- retention ------------------------------------------------------------

    def purgeable_studies(
        self, before: float, limit: int = 20, after: tuple[float, str] = (0.0, "")
    ) -> list[tuple[str, float]]:
        """(Study UID, last received at) of complete studies with no activity since
        ``before``: nothing received, not completed, no job unfinished, created or
        finished since; oldest first, after the ``after`` (last received at, UID) cursor.
        Whether their deliveries went out is the outbox's to say."""
        with self._lock:
            rows = self._db.execute(
                "SELECT st.study_uid, st.last_received_at FROM studies st"
                " WHERE st.state = ? AND st.last_received_at < ?"
                " AND COALESCE(st.completed_at, st.last_received_at) < ?"
                " AND (st.last_received_at, st.study_uid) > (?, ?)"
                f" AND NOT EXISTS ({_RECENT_OR_UNFINISHED_JOB})"
                " ORDER BY st.last_received_at, st.study_uid LIMIT ?",
                (
                    StudyState.COMPLETE,
                    before,
                    before,
                    *after,
                    JobState.QUEUED,
                    JobState.RUNNING,
                    before,
                    limit,
                ),
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def studies_purging(self) -> list[str]:
        """Studies whose purge a stop interrupted."""
        with self._lock:
            rows = self._db.execute(
                "SELECT study_uid FROM studies WHERE state = ?", (StudyState.PURGING,)
            ).fetchall()
        return [r[0] for r in rows]

    def job_ids_of(self, study_uid: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id FROM jobs WHERE study_uid = ?", (study_uid,)
            ).fetchall()
        return [r[0] for r in rows]

    def begin_purge(self, study_uid: str, last_received_at: float, before: float) -> bool:
        """Mark the study purging if it is still complete and untouched since it was
        chosen (no instance, no job queued, run or finished since ``before``); from
        then on its instances are refused (:class:`StudyPurging`) and its jobs can be
        neither created nor queued again."""
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE studies AS st SET state = ? WHERE study_uid = ? AND state = ?"
                f" AND last_received_at = ? AND NOT EXISTS ({_RECENT_OR_UNFINISHED_JOB})",
                (
                    StudyState.PURGING,
                    study_uid,
                    StudyState.COMPLETE,
                    last_received_at,
                    JobState.QUEUED,
                    JobState.RUNNING,
                    before,
                ),
            ).rowcount
        return changed == 1

    @staticmethod
    def _purging(db: sqlite3.Connection, study_uid: str) -> bool:
        row = db.execute("SELECT state FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
        return row is not None and row[0] == StudyState.PURGING

    def cancel_purge(self, study_uid: str) -> None:
        """A purge that must not go on (see :mod:`service.retention`): complete again."""
        with self._transaction() as db:
            db.execute(
                "UPDATE studies SET state = ? WHERE study_uid = ? AND state = ?",
                (StudyState.COMPLETE, study_uid, StudyState.PURGING),
            )

    def purge_files(self, study_uid: str) -> tuple[list[str], list[str]]:
        """(instance files, job result folders) of a study."""
        with self._lock:
            paths = self._db.execute(
                "SELECT path FROM instances WHERE study_uid = ?", (study_uid,)
            ).fetchall()
            dirs = self._db.execute(
                "SELECT result_dir FROM jobs WHERE study_uid = ? AND result_dir IS NOT NULL",
                (study_uid,),
            ).fetchall()
        return [r[0] for r in paths], [r[0] for r in dirs]

    def finish_purge(self, study_uid: str) -> int:
        """Delete a purging study's rows (its files are gone); the instances it had."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT instance_count FROM studies WHERE study_uid = ? AND state = ?",
                (study_uid, StudyState.PURGING),
            ).fetchone()
            if row is None:
                return 0
            db.execute("DELETE FROM instances WHERE study_uid = ?", (study_uid,))
            # A Series Instance UID sent in two studies (it happens) keeps its one row
            # for the other study's instances.
            db.execute(
                "UPDATE series SET study_uid = (SELECT i.study_uid FROM instances i"
                " WHERE i.series_uid = series.series_uid LIMIT 1) WHERE study_uid = ?"
                " AND EXISTS (SELECT 1 FROM instances i WHERE i.series_uid = series.series_uid)",
                (study_uid,),
            )
            for table in (
                "series",
                "jobs",
                "studies",
                "refused_no_space",
                "delivering",
                "lost_in_transit",
            ):
                db.execute(f"DELETE FROM {table} WHERE study_uid = ?", (study_uid,))
        return int(row[0])

    # -- completion -----------------------------------------------------------

    def hold_while_delivering(self, association: str, study_uid: str, series_uid: str) -> None:
        """``association``'s last instance belonged to ``series_uid`` of ``study_uid``:
        hold both open while the association is (see :meth:`complete_quiet_studies`
        and :meth:`quiet_series`)."""
        with self._transaction() as db:
            # the PACS took the study up again: an interrupted sending waits no longer
            db.execute(
                "DELETE FROM delivering WHERE study_uid = ? AND interrupted_at IS NOT NULL",
                (study_uid,),
            )
            db.execute(
                "INSERT OR REPLACE INTO delivering (association, study_uid, series_uid)"
                " VALUES (?, ?, ?)",
                (association, study_uid, series_uid),
            )

    def end_delivery(
        self, association: str, *, aborted: bool = False, lost_instance: str | None = None
    ) -> None:
        """``association`` closed. Released: the study it was delivering is held no
        longer. Aborted: it is held as interrupted (see :meth:`complete_quiet_studies`).
        ``lost_instance``: the SOP Instance UID of the instance it ended in the middle
        of. Unless stored already (a re-send cut short), it is lost in transit, charged
        to the study the association was sending (its data set never came, so the
        study it belongs to is not known): that study's results are preliminary until
        the instance is stored (:meth:`add_instance`)."""
        with self._transaction() as db:
            if lost_instance:
                db.execute(
                    "INSERT OR IGNORE INTO lost_in_transit (sop_instance_uid, study_uid)"
                    " SELECT ?, study_uid FROM delivering WHERE association = ? AND NOT EXISTS"
                    " (SELECT 1 FROM instances WHERE sop_instance_uid = ?)",
                    (lost_instance, association, lost_instance),
                )
            if aborted:
                db.execute(
                    "UPDATE delivering SET interrupted_at = ? WHERE association = ?",
                    (time.time(), association),
                )
            else:
                db.execute("DELETE FROM delivering WHERE association = ?", (association,))

    def interrupt_deliveries(self, pid: int | None = None) -> None:
        """The associations of process ``pid`` (a receiver process that died), or at
        the node's start of every process, were cut: their PACS may send the rest
        again. Association names begin with their process id."""
        with self._transaction() as db:
            now = time.time()
            if pid is None:
                db.execute(
                    "UPDATE delivering SET interrupted_at = ? WHERE interrupted_at IS NULL", (now,)
                )
            else:
                db.execute(
                    "UPDATE delivering SET interrupted_at = ?"
                    " WHERE interrupted_at IS NULL AND association LIKE ?",
                    (now, f"{pid}-%"),
                )

    def complete_quiet_studies(
        self,
        quiet_s: float,
        now: float | None = None,
        *,
        hold_s: float = 0.0,
        interrupted_s: float = 0.0,
    ) -> list[StudySummary]:
        """Mark complete every receiving study quiet for ``quiet_s``; return them.

        A study an open association is still delivering (its last instance was of the
        study) waits for the association to close, at most ``hold_s`` from its last
        instance: a longer silence is an association the node closes as idle anyway,
        or the row of a receiver process that was killed. One whose association was
        aborted, or cut by the node stopping, waits ``interrupted_s`` from the
        interruption for the PACS to send the rest (a new association on it ends that
        wait); it completes marked ``interrupted`` if none came.
        """
        now = time.time() if now is None else now
        with self._transaction() as db:
            rows = db.execute(
                "UPDATE studies SET state = ?, completed_at = ?"
                " WHERE state = ? AND last_received_at <= ? AND NOT EXISTS"
                " (SELECT 1 FROM delivering d WHERE d.study_uid = studies.study_uid"
                f" AND {_holds('studies.last_received_at')}) RETURNING study_uid",
                (
                    StudyState.COMPLETE,
                    now,
                    StudyState.RECEIVING,
                    now - quiet_s,
                    now,
                    hold_s,
                    now,
                    interrupted_s,
                ),
            ).fetchall()
            uids = [uid for (uid,) in rows]
            interrupted = {
                uid
                for uid in uids
                if db.execute(
                    "SELECT 1 FROM delivering WHERE study_uid = ? AND interrupted_at IS NOT NULL",
                    (uid,),
                ).fetchone()
            }
            for uid in interrupted:  # waited out; an open association's row stays until
                # it closes (deleted here, its receiver would not write it again: review)
                db.execute(
                    "DELETE FROM delivering WHERE study_uid = ? AND interrupted_at IS NOT NULL",
                    (uid,),
                )
        studies = [s for s in (self.study(uid) for uid in uids) if s is not None]
        return [replace(s, interrupted=s.study_uid in interrupted) for s in studies]

    def next_quiet_at(
        self, quiet_s: float, *, hold_s: float = 0.0, interrupted_s: float = 0.0
    ) -> float | None:
        """When the next receiving study becomes quiet (a held one: when its hold
        runs out), or None."""
        with self._lock:
            (due,) = self._db.execute(
                "SELECT MIN(MAX(st.last_received_at + ?, COALESCE((SELECT MAX(CASE WHEN"
                " d.interrupted_at IS NULL THEN st.last_received_at + ?"
                " ELSE d.interrupted_at + ? END) FROM delivering d"
                " WHERE d.study_uid = st.study_uid), 0)))"
                " FROM studies st WHERE st.state = ?",
                (quiet_s, hold_s, interrupted_s, StudyState.RECEIVING),
            ).fetchone()
        return None if due is None else float(due)

    # -- queries --------------------------------------------------------------

    _STUDY_COLUMNS = (
        "st.study_uid, st.study_key, st.state, st.instance_count,"
        " (SELECT COUNT(*) FROM series se WHERE se.study_uid = st.study_uid),"
        " st.first_received_at, st.last_received_at, st.completed_at,"
        f" EXISTS ({_LOST_IN_TRANSIT.format('st.study_uid')})"
    )

    @staticmethod
    def _study_from_row(row: tuple) -> StudySummary:
        return StudySummary(
            study_uid=row[0],
            study_key=row[1],
            state=StudyState(row[2]),
            instance_count=row[3],
            series_count=row[4],
            first_received_at=row[5],
            last_received_at=row[6],
            completed_at=row[7],
            instance_lost=bool(row[8]),
        )

    def study(self, study_uid: str) -> StudySummary | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._STUDY_COLUMNS} FROM studies st WHERE st.study_uid = ?",
                (study_uid,),
            ).fetchone()
        return None if row is None else self._study_from_row(row)

    def recent_studies(self, limit: int = 50) -> list[StudySummary]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._STUDY_COLUMNS} FROM studies st"
                " ORDER BY st.last_received_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [self._study_from_row(r) for r in rows]

    def series_of(self, study_uid: str) -> list[SeriesInfo]:
        with self._lock:
            rows = self._db.execute(
                "SELECT study_uid, series_uid, modality, body_part, series_description,"
                " sop_class_uid, series_number, instance_count, slice_thickness, image_type,"
                " image_orientation, manufacturer, manufacturer_model_name, image_count,"
                " view_position, lossy_compressed FROM series"
                " WHERE study_uid = ? ORDER BY series_number, series_uid",
                (study_uid,),
            ).fetchall()
        return [
            SeriesInfo(
                study_uid=r[0],
                series_uid=r[1],
                modality=r[2],
                body_part=r[3],
                series_description=r[4],
                sop_class_uid=r[5],
                series_number=r[6],
                instance_count=r[7],
                slice_thickness=r[8],
                image_type=tuple(r[9].split("\\")) if r[9] else (),
                image_orientation=tuple(float(v) for v in r[10].split("\\")) if r[10] else None,
                manufacturer=r[11],
                manufacturer_model_name=r[12],
                # 0: a row an older radnode wrote after the upgrade: one per instance
                image_count=r[13] or None,
                view_position=r[14],
                lossy_compressed=bool(r[15]),
            )
            for r in rows
        ]

    def instance_paths(self, series_uid: str, first: int | None = None) -> list[str]:
        """The files of a series, in instance number order; with ``first``, only the
        ``first`` instances that arrived (what a job was made for: a re-run after the
        series grew must not become the later job's run)."""
        limit = -1 if first is None else first
        with self._lock:
            rows = self._db.execute(
                "SELECT path FROM (SELECT path, instance_number FROM instances"
                " WHERE series_uid = ? ORDER BY rowid LIMIT ?) ORDER BY instance_number, path",
                (series_uid, limit),
            ).fetchall()
        return [r[0] for r in rows]

    def instance_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    def missing_from(self, sop_instance_uids: Iterable[str]) -> set[str]:
        """Which of ``sop_instance_uids`` the index does not know (start-up reconcile)."""
        with self._lock:
            known = {r[0] for r in self._db.execute("SELECT sop_instance_uid FROM instances")}
        return set(sop_instance_uids) - known

    # -- completion units other than the quiet study ----------------------------

    def quiet_series(
        self,
        quiet_s: float,
        now: float | None = None,
        *,
        hold_s: float = 0.0,
        interrupted_s: float = 0.0,
    ) -> list[SeriesInfo]:
        """Series of still-receiving studies that have been quiet for ``quiet_s``; a
        series an open or interrupted association was delivering waits as a study
        does (:meth:`complete_quiet_studies`)."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT se.study_uid, se.series_uid FROM series se JOIN studies st"
                " ON st.study_uid = se.study_uid WHERE st.state = ? AND se.last_received_at <= ?"
                " AND NOT EXISTS (SELECT 1 FROM delivering d WHERE d.series_uid = se.series_uid"
                f" AND {_holds('se.last_received_at')})",
                (StudyState.RECEIVING, now - quiet_s, now, hold_s, now, interrupted_s),
            ).fetchall()
        wanted = {series_uid for _, series_uid in rows}
        studies = sorted({study_uid for study_uid, _ in rows})
        return [s for uid in studies for s in self.series_of(uid) if s.series_uid in wanted]

    def receiving_since(self, seconds: float, now: float | None = None) -> list[StudySummary]:
        """Studies still receiving whose first instance came ``seconds`` ago or more."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._STUDY_COLUMNS} FROM studies st"
                " WHERE st.state = ? AND st.first_received_at <= ?",
                (StudyState.RECEIVING, now - seconds),
            ).fetchall()
        return [self._study_from_row(r) for r in rows]

    # -- jobs -------------------------------------------------------------------

    _JOB_COLUMNS = (
        "j.job_id, j.study_uid, st.study_key, j.series_uid, j.pipeline, j.routes,"
        " j.destinations, j.state, j.attempts, j.created_at, j.started_at, j.finished_at,"
        " j.error, j.result_dir, j.timings, j.task_id, j.worker, j.instance_count,"
        " j.preliminary"
    )

    @staticmethod
    def _job_from_row(row: tuple) -> JobRecord:
        return JobRecord(
            job_id=row[0],
            study_uid=row[1],
            study_key=row[2],
            series_uid=row[3],
            pipeline=row[4],
            routes=tuple(json.loads(row[5])),
            destinations=tuple(json.loads(row[6])),
            state=JobState(row[7]),
            attempts=row[8],
            created_at=row[9],
            started_at=row[10],
            finished_at=row[11],
            error=row[12],
            result_dir=row[13],
            timings=json.loads(row[14]) if row[14] else None,
            task_id=row[15],
            worker=row[16],
            instance_count=row[17],
            preliminary=bool(row[18]),
        )

    def add_job(
        self,
        study_uid: str,
        series_uid: str,
        pipeline: str,
        routes: Iterable[str],
        destinations: Iterable[str],
        now: float | None = None,
    ) -> JobRecord | None:
        """Create a queued job, or return None if this series, at its current size, already
        has one for this pipeline (whatever triggered the routing again). The job is
        preliminary while an instance lost in transit is charged to its study.

        A final job follows a preliminary one of the same size: the lost instance came
        (it lifted the mark) but was of another series, and this one's preliminary
        result must become final all the same. A preliminary job never follows a final
        one of the same size: that result is whole already.
        """
        now = time.time() if now is None else now
        job_id = uuid.uuid4().hex[:12]
        with self._transaction() as db:
            count = db.execute(
                "SELECT instance_count FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
            if count is None or self._purging(db, study_uid):
                return None
            inserted = db.execute(
                "INSERT OR IGNORE INTO jobs (job_id, study_uid, series_uid, pipeline,"
                " instance_count, routes, destinations, state, created_at, preliminary)"
                " SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, lost.preliminary"
                f" FROM (SELECT EXISTS ({_LOST_IN_TRANSIT.format('?')}) AS preliminary) lost"
                " WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = ?"
                " AND j.pipeline = ? AND j.instance_count = ?"
                " AND j.preliminary <= lost.preliminary)",
                (
                    job_id,
                    study_uid,
                    series_uid,
                    pipeline,
                    count[0],
                    json.dumps(list(routes)),
                    json.dumps(list(destinations)),
                    JobState.QUEUED,
                    now,
                    study_uid,
                    series_uid,
                    pipeline,
                    count[0],
                ),
            ).rowcount
        return self.job(job_id) if inserted else None

    def job(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._JOB_COLUMNS} FROM jobs j JOIN studies st"
                " ON st.study_uid = j.study_uid WHERE j.job_id = ?",
                (job_id,),
            ).fetchone()
        return None if row is None else self._job_from_row(row)

    def replaced_by(self, job: JobRecord) -> JobRecord | None:
        """The job whose result ``job``'s replaces: the latest ``done`` job of the same
        series and pipeline made before ``job`` (the series grew since). None for a
        series' first result, and when the earlier jobs were refused or failed: then
        nothing was sent that ``job`` could correct.

        Asked when ``job`` is submitted, which :meth:`earlier_unfinished` holds back
        until every earlier job of its series and pipeline has finished: the answer is
        final, and the earlier result's deliveries are in the outbox before this one's.
        """
        return self._sibling(job, (JobState.DONE,), later=False, newest=True)

    def refused_before(self, job: JobRecord, since: JobRecord | None = None) -> list[JobRecord]:
        """The refused jobs of ``job``'s series and pipeline made before it (and after
        ``since``), oldest first: their "not analyzed" SRs, where they went out, are
        what ``job``'s result supersedes."""
        after = f" AND {_AFTER}" if since is not None else ""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._JOB_COLUMNS} FROM jobs j JOIN studies st"
                " ON st.study_uid = j.study_uid WHERE j.series_uid = ? AND j.pipeline = ?"
                f" AND j.state = ? AND {_BEFORE}{after} ORDER BY j.created_at, j.job_id",
                (job.series_uid, job.pipeline, JobState.REFUSED, *_order_of(job),
                 *(_order_of(since) if since is not None else ())),
            ).fetchall()  # fmt: skip
        return [self._job_from_row(r) for r in rows]

    def earlier_unfinished(self, job: JobRecord) -> JobRecord | None:
        """An earlier job of the same series and pipeline that is still queued or running.

        Why: ``job`` must wait for it. Run side by side (several workers), the earlier,
        partial result could finish last and reach the PACS and the RIS after the
        revision, leaving the partial one as the last word (review).
        """
        return self._sibling(job, (JobState.QUEUED, JobState.RUNNING), later=False, newest=False)

    def superseded_by(self, job: JobRecord) -> JobRecord | None:
        """A later job of the same series and pipeline that made, or is making, a result
        (``done``, ``running`` or ``queued``): ``job``'s result is out of date, and run
        or sent again it would arrive after the newer one."""
        states = (JobState.DONE, JobState.RUNNING, JobState.QUEUED)
        return self._sibling(job, states, later=True, newest=True)

    def _sibling(
        self, job: JobRecord, states: Sequence[JobState], *, later: bool, newest: bool
    ) -> JobRecord | None:
        """A job of ``job``'s series and pipeline in one of ``states``, made before it
        (``later``: after it), by (created_at, job_id); the newest such, or the oldest."""
        order = "DESC" if newest else "ASC"
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._JOB_COLUMNS} FROM jobs j JOIN studies st"
                " ON st.study_uid = j.study_uid WHERE j.series_uid = ? AND j.pipeline = ?"
                f" AND j.state IN ({', '.join('?' * len(states))})"
                f" AND {_AFTER if later else _BEFORE}"
                f" ORDER BY j.created_at {order}, j.job_id {order} LIMIT 1",
                (job.series_uid, job.pipeline, *states, *_order_of(job)),
            ).fetchone()
        return None if row is None else self._job_from_row(row)

    def resolved_by(self, job: JobRecord) -> JobRecord | None:
        """For a failed or refused ``job``: the first later job of its series and
        pipeline that made a result (the series came again whole, say); None if none
        has. An operator's list of failed and refused jobs kept showing a refusal long
        after its series was analysed (acceptance pass)."""
        return self._sibling(job, (JobState.DONE,), later=True, newest=False)

    def recent_jobs(self, limit: int = 50, state: JobState | None = None) -> list[JobRecord]:
        where = "" if state is None else "WHERE j.state = ?"
        params: tuple = (limit,) if state is None else (state, limit)
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._JOB_COLUMNS} FROM jobs j JOIN studies st"
                f" ON st.study_uid = j.study_uid {where} ORDER BY j.created_at DESC LIMIT ?",
                params,
            ).fetchall()
        return [self._job_from_row(r) for r in rows]

    def unfinished_jobs(self) -> list[JobRecord]:
        """Queued or running jobs, oldest first: after a restart they run again."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._JOB_COLUMNS} FROM jobs j JOIN studies st"
                " ON st.study_uid = j.study_uid WHERE j.state IN (?, ?) ORDER BY j.created_at",
                (JobState.QUEUED, JobState.RUNNING),
            ).fetchall()
        return [self._job_from_row(r) for r in rows]

    def running_jobs(self) -> list[JobRecord]:
        """Jobs a worker has started and not yet reported on."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._JOB_COLUMNS} FROM jobs j JOIN studies st"
                " ON st.study_uid = j.study_uid WHERE j.state = ? ORDER BY j.created_at",
                (JobState.RUNNING,),
            ).fetchall()
        return [self._job_from_row(r) for r in rows]

    def running_jobs_of(self, worker: str) -> list[str]:
        """Ids of the jobs a worker (``host:pid``) was running."""
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id FROM jobs WHERE state = ? AND worker = ?",
                (JobState.RUNNING, worker),
            ).fetchall()
        return [r[0] for r in rows]

    def jobs_by_pipeline_state(self) -> dict[tuple[str, str], int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT pipeline, state, COUNT(*) FROM jobs GROUP BY pipeline, state"
            ).fetchall()
        return {(pipeline, state): count for pipeline, state, count in rows}

    def jobs_by_state(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: count for state, count in rows}

    def start_job(
        self, job_id: str, worker: str = "", now: float | None = None
    ) -> JobRecord | None:
        """Mark a job running (one more attempt); None if it is unknown or finished."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            updated = db.execute(
                "UPDATE jobs SET state = ?, started_at = ?, attempts = attempts + 1,"
                " error = NULL, worker = ? WHERE job_id = ? AND state IN (?, ?)",
                (JobState.RUNNING, now, worker, job_id, JobState.QUEUED, JobState.RUNNING),
            ).rowcount
        return self.job(job_id) if updated else None

    def finish_job(
        self,
        job_id: str,
        state: JobState,
        *,
        error: str | None = None,
        result_dir: str | None = None,
        timings: dict[str, float] | None = None,
        now: float | None = None,
    ) -> None:
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, error = ?, result_dir = ?,"
                " timings = ? WHERE job_id = ?",
                (
                    state,
                    now,
                    error,
                    result_dir,
                    json.dumps(timings) if timings else None,
                    job_id,
                ),
            )

    def set_task(self, job_id: str, task_id: str | None) -> None:
        """Record the queue's id of the job's current run (None: it has none)."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET task_id = ? WHERE job_id = ?", (task_id, job_id))

    def back_to_queue(self, job_id: str, *, count_run: bool = False) -> None:
        """A job whose run was lost waits in the queue again.

        ``count_run``: the lost run never reported starting (no heartbeat), so
        :meth:`start_job` did not count it; it is counted here, so the next run has a
        number of its own. Reusing it, a lost run that was only slow to start would
        share a number with its successor, and neither would see the other holding the
        result folder (:mod:`service.run_claim`).
        """
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, worker = NULL, task_id = NULL,"
                " attempts = attempts + ? WHERE job_id = ?",
                (JobState.QUEUED, 1 if count_run else 0, job_id),
            )

    def requeue_job(self, job_id: str) -> JobRecord | None:
        """An operator's retry: a finished job becomes queued again; None if not finished
        (or its study is being purged)."""
        with self._transaction() as db:
            updated = db.execute(
                "UPDATE jobs SET state = ?, finished_at = NULL, error = NULL, task_id = NULL"
                " WHERE job_id = ? AND state IN (?, ?, ?) AND study_uid NOT IN"
                " (SELECT study_uid FROM studies WHERE state = ?)",
                (
                    JobState.QUEUED,
                    job_id,
                    JobState.DONE,
                    JobState.FAILED,
                    JobState.REFUSED,
                    StudyState.PURGING,
                ),
            ).rowcount
        return self.job(job_id) if updated else None
