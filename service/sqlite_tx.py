"""One SQLite write transaction, ended cleanly whatever failed inside it."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator


@contextlib.contextmanager
def immediate_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; on any error, ``ROLLBACK`` unless SQLite
    already has, then the original error.

    Why: a full disk (SQLITE_FULL) rolls the transaction back by itself, and the
    ``ROLLBACK`` that followed raised "no transaction is active" in place of "database
    or disk is full". A ``COMMIT`` that fails leaves the transaction open: every later
    ``BEGIN`` then failed, until a restart (acceptance pass on a full disk).
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # the original error says more
                db.execute("ROLLBACK")
        raise
