"""The receive path: from a C-STORE's bytes to a durable, indexed instance.

:class:`Ingest` is the :class:`dicom_nodes.scp.Receiver` of the node. For each
instance it checks free space, validates the UIDs before they name a path, parses
the header (no pixel decoding), checks the study's size limit, writes the spool file
durably, records it in the index, and only then answers Success. Every refusal gets
its own status and one log line that says what the operator can do, and is counted in
:mod:`service.metrics`.
"""

from __future__ import annotations

import os
import sqlite3
import threading

import structlog

from dicom_nodes.scp import ReceivedInstance
from dicom_nodes.status import StoreStatus
from service.errors import (
    DatasetMismatch,
    InvalidUID,
    StorageFull,
    StudyPurging,
    StudyTooLarge,
    UnreadableDataset,
)
from service.headers import parse_header
from service.index import StudyIndex
from service.metrics import Metrics, ReceiveCounter
from service.records import InstanceHeader, StoredInstance
from service.spool import Spool, file_meta_bytes
from service.uids import require_uid, study_key

log = structlog.get_logger("service.ingest")


class Ingest:
    """Receives instances from the Storage SCP and makes them durable."""

    def __init__(
        self,
        spool: Spool,
        index: StudyIndex,
        *,
        ae_title: str,
        min_free_bytes: int,
        max_study_bytes: int = 0,
        metrics: ReceiveCounter | None = None,
    ) -> None:
        self._spool = spool
        self._index = index
        self._ae_title = ae_title
        self._min_free_bytes = min_free_bytes
        self._max_study_bytes = max_study_bytes
        # Without the node's Metrics (tests, tools) count into a private registry.
        self._metrics: ReceiveCounter = metrics if metrics is not None else Metrics()
        #: association -> (study, series) of its last instance (see _note_delivering)
        self._delivering: dict[str, tuple[str, str]] = {}
        self._delivering_lock = threading.Lock()

    def store(self, instance: ReceivedInstance) -> StoreStatus:
        """Store one instance; the returned status is what the sender sees."""
        try:
            return self._store(instance)
        except InvalidUID as exc:
            return self._refuse(
                instance, StoreStatus.INVALID_UID, f"invalid UID: {exc}",
                "fix the sending system's UIDs; the instance was not stored",
            )  # fmt: skip
        except UnreadableDataset as exc:
            return self._refuse(
                instance, StoreStatus.CANNOT_UNDERSTAND, str(exc),
                "check the file on the sending system; it was not stored",
            )  # fmt: skip
        except DatasetMismatch as exc:
            status = StoreStatus.SOP_INSTANCE_MISMATCH
            if exc.sop_class:
                status = StoreStatus.SOP_CLASS_MISMATCH
            return self._refuse(
                instance, status, str(exc), "the sender's request and data set disagree; not stored"
            )
        except StudyPurging as exc:
            return self._refuse(
                instance, StoreStatus.OUT_OF_RESOURCES, str(exc),
                "none: the sender retries, and the study then arrives anew",
            )  # fmt: skip
        except StudyTooLarge as exc:
            return self._refuse(
                instance, StoreStatus.OUT_OF_RESOURCES, str(exc),
                "raise node.max_study_mb if the study is genuine; not stored",
            )  # fmt: skip
        except StorageFull as exc:
            return self._refuse(
                instance, StoreStatus.OUT_OF_RESOURCES, str(exc),
                "free disk space under node.data_dir; senders will retry", error=True,
            )  # fmt: skip
        except sqlite3.Error as exc:
            # The study index could not record it: on a disk that filled past the
            # min_free_disk_mb guard (something else wrote to it), the COMMIT fails. Out
            # of resources, for the sender to retry; the acceptance pass saw C0FF "report
            # this as a bug", which a PACS may take as final. A spool file written
            # already is indexed at the next start; nothing was acknowledged.
            return self._refuse(
                instance, StoreStatus.OUT_OF_RESOURCES,
                f"the study index could not record the instance: {exc}",
                "check the disk under node.data_dir (free space, I/O errors); senders will"
                " retry", error=True,
            )  # fmt: skip

    def _refuse(
        self,
        instance: ReceivedInstance,
        status: StoreStatus,
        reason: str,
        action: str,
        *,
        error: bool = False,
    ) -> StoreStatus:
        """One ``store.refused`` line (error: the node's fault; warning: the sender's)."""
        (log.error if error else log.warning)(
            "store.refused",
            reason=reason,
            status=f"0x{status:04X}",
            action=action,
            peer_ae=instance.calling_ae,
            peer_address=instance.peer_address,
        )
        self._metrics.instance_refused(status, len(instance.dataset))
        return status

    def _store(self, instance: ReceivedInstance) -> StoreStatus:
        sop_instance_uid = require_uid(instance.sop_instance_uid, "Affected SOP Instance UID")
        require_uid(instance.sop_class_uid, "Affected SOP Class UID")
        known = self._index.instance_path(sop_instance_uid)
        if known is not None and os.path.exists(known):
            touched = self._index.touch_study_of(sop_instance_uid)
            if touched is not None:
                study_uid, touched_series, reopened = touched
                log.debug("instance.duplicate", peer_ae=instance.calling_ae)
                if reopened:
                    log.info(
                        "study.reopened", study=study_key(study_uid), cause="duplicate instance"
                    )
                self._metrics.instance_duplicate(len(instance.dataset))
                self._note_delivering(instance.association, study_uid, touched_series)
                return StoreStatus.SUCCESS
            known = None  # retention removed it in between: stored anew below
        header = parse_header(instance.dataset, instance.transfer_syntax_uid)
        self._check_header(header, instance)
        if self._spool.free_bytes() < self._min_free_bytes:
            self._index.refused_no_space(header.study_uid, sop_instance_uid)
            raise StorageFull("free disk space is below node.min_free_disk_mb")
        self._check_study_size(header.study_uid, len(instance.dataset))
        target = self._spool.path_for(header.study_uid, header.series_uid, sop_instance_uid)
        meta = file_meta_bytes(
            sop_class_uid=instance.sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=instance.transfer_syntax_uid,
            source_ae=self._ae_title,
            sending_ae=instance.calling_ae,
        )
        try:
            size = self._spool.write(target, meta, instance.dataset)
        except StorageFull:  # the disk filled past the guard (something else wrote to it)
            self._index.refused_no_space(header.study_uid, sop_instance_uid)
            raise
        stored = StoredInstance(
            header=header,
            path=str(target),
            size_bytes=size,
            transfer_syntax_uid=instance.transfer_syntax_uid,
            calling_ae=instance.calling_ae,
        )
        try:
            outcome = self._index.add_instance(stored)
        except StudyPurging:
            target.unlink(missing_ok=True)  # not acknowledged: no file left to index later
            raise
        key = study_key(header.study_uid)
        if known is not None:
            # Indexed, but its file was gone (an operator removed the study's folder):
            # acknowledged as a duplicate it would have been lost (found by review).
            # Logged once it is recorded: during a purge it is refused instead, and the
            # line said "restored" of what was removed again (acceptance pass).
            log.info("instance.restored", study=key)
        if outcome.new_study:
            log.info("study.receiving", study=key, peer_ae=instance.calling_ae)
        elif outcome.reopened_study:
            log.info("study.reopened", study=key, cause="new instance after completion")
        if outcome.new_instance:
            self._metrics.instance_stored(len(instance.dataset))
        else:  # another association stored it first (same study sent twice at once)
            self._metrics.instance_duplicate(len(instance.dataset))
        self._note_delivering(instance.association, header.study_uid, header.series_uid)
        return StoreStatus.SUCCESS

    def _note_delivering(self, association: str, study_uid: str, series_uid: str) -> None:
        """Hold the series and its study open while ``association`` is delivering it.

        Why: a PACS that pauses inside an association (a slow archive, a busy
        forwarding queue) for longer than the quiet period got a result on part of the
        study, sent to the RIS as final, then a correction. While the association whose
        last instance belonged to the series is open, neither the series (for routes
        completed by series) nor its study completes (the index bounds the hold by
        ``node.network_timeout_s``, after which an idle association is closed anyway).
        Written only when the association moves to another series: one index write per
        series and association, not per instance.
        """
        delivering = (study_uid, series_uid)
        if not association or self._delivering.get(association) == delivering:
            return  # one association's stores come one at a time, on its own thread
        try:
            self._index.hold_while_delivering(association, study_uid, series_uid)
        except sqlite3.Error as exc:  # stored and indexed: only the hold is missing
            log.warning(
                "study.hold_failed",
                study=study_key(study_uid),
                error=str(exc),
                action="check the disk under node.data_dir; the study may complete"
                " while its association is still open",
            )
            return
        with self._delivering_lock:
            self._delivering[association] = delivering

    def association_ended(
        self, association: str, aborted: bool = False, lost_instance: str | None = None
    ) -> None:
        """The association was released (it holds no study open any more) or aborted
        (its study waits a while for the PACS to send the rest again). ``lost_instance``:
        the SOP Instance UID of the instance it ended in the middle of, which its study
        lacks: the study's results are preliminary until the PACS sends it again."""
        with self._delivering_lock:
            held = self._delivering.pop(association, None)
        if held is not None:
            self._index.end_delivery(association, aborted=aborted, lost_instance=lost_instance)

    def _check_study_size(self, study_uid: str, incoming: int) -> None:
        if not self._max_study_bytes:
            return
        if self._index.study_bytes(study_uid) + incoming > self._max_study_bytes:
            self._index.refused_too_large(study_uid)
            raise StudyTooLarge(
                f"the study would exceed node.max_study_mb"
                f" ({self._max_study_bytes // (1024 * 1024)} MB)"
            )

    @staticmethod
    def _check_header(header: InstanceHeader, instance: ReceivedInstance) -> None:
        require_uid(header.study_uid, "Study Instance UID")
        require_uid(header.series_uid, "Series Instance UID")
        require_uid(header.sop_instance_uid, "SOP Instance UID")
        if header.sop_instance_uid != instance.sop_instance_uid:
            raise DatasetMismatch(
                "SOP Instance UID in the data set differs from the C-STORE request",
                sop_class=False,
            )
        if not header.sop_class_uid:
            # Type 1 in SOP Common (PS3.3 C.12.1); stored, it failed every result later,
            # whose references name their sources' classes (conformance audit).
            raise DatasetMismatch("the data set has no SOP Class UID (0008,0016)", sop_class=True)
        if header.sop_class_uid != instance.sop_class_uid:
            raise DatasetMismatch(
                "SOP Class UID in the data set differs from the C-STORE request", sop_class=True
            )
