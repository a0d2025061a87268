"""Read a node's outbox (deliveries to the PACS and the RIS) from outside, as ops would."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from service.publish import OUTBOX_FILE


def delivery_states(data_dir: Path, job_id: str | None = None) -> list[str]:
    """The state of each delivery (of ``job_id``, or all); empty before any is enqueued."""
    path = data_dir / OUTBOX_FILE
    if not path.exists():
        return []
    query, args = "SELECT state FROM deliveries", ()
    if job_id is not None:
        query, args = query + " WHERE job_id = ?", (job_id,)
    with sqlite3.connect(path) as db:
        return [state for (state,) in db.execute(query, args)]
