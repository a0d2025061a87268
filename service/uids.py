"""UID checks, run before a UID is ever used as part of a path.

A DICOM UID (PS3.5 section 9.1) is at most 64 characters of digits and dots, made of
components without leading zeros. Anything else, in particular ``/``, ``..`` or a
NUL byte, is refused before it reaches the spool, so a hostile sender can never write
outside it.
"""

from __future__ import annotations

import hashlib
import re

from service.errors import InvalidUID

UID_MAX_LENGTH = 64
_UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def uid_problem(uid: str) -> str | None:
    """Return why ``uid`` is not a valid DICOM UID, or ``None`` if it is."""
    if not uid:
        return "missing"
    if len(uid) > UID_MAX_LENGTH:
        return f"longer than {UID_MAX_LENGTH} characters ({len(uid)})"
    if not _UID_PATTERN.match(uid):
        return "not a dotted sequence of numbers without leading zeros"
    return None


def require_uid(uid: str, what: str) -> str:
    """Return ``uid`` if valid, else raise :class:`InvalidUID` naming ``what``.

    The message never repeats the UID itself: a hostile value does not belong in a
    log line, and a valid one is not needed to explain the problem.
    """
    problem = uid_problem(uid)
    if problem is not None:
        raise InvalidUID(f"{what} is {problem}")
    return uid


def study_key(study_uid: str) -> str:
    """A short, stable, non-reversible name for a study, used in logs and the API.

    Study Instance UIDs can embed dates or site identifiers; logs carry this hash
    instead so a study can be followed across log lines without disclosing it.
    """
    return hashlib.sha256(study_uid.encode("ascii", "replace")).hexdigest()[:16]
