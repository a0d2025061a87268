"""One SQLite write transaction, ended cleanly whatever failed inside it; and the
column migrations of the node's SQLite files, made in one."""

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


def add_column(db: sqlite3.Connection, table: str, definition: str, then: str = "") -> None:
    """Add the column ``definition`` names to ``table`` unless it is there, and run the
    single statement ``then`` in the same transaction (a file made by an older version
    gets the column at open).

    Looked for again under the write lock: several processes open the same file (the
    node, receiver processes, workers), and the second to get there finds it added.
    """
    column = definition.split()[0]

    def present() -> bool:
        return column in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}

    if present():
        return
    with immediate_transaction(db):
        if present():
            return
        db.execute(f"ALTER TABLE {table} ADD COLUMN {definition}")
        if then:
            db.execute(then)
