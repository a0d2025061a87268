"""UID validation happens before a UID names a path."""

from __future__ import annotations

import pytest

from service.errors import InvalidUID
from service.uids import require_uid, study_key, uid_problem


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.2", "2.25.0", "1.2.3.0.4", "1" * 64])
def test_valid_uids_pass(uid: str) -> None:
    assert uid_problem(uid) is None


@pytest.mark.parametrize(
    ("uid", "problem"),
    [
        ("", "missing"),
        ("1." + "2" * 63, "longer than 64"),
        ("../../etc/passwd", "dotted sequence"),
        ("1.2.3/../../x", "dotted sequence"),
        ("1.2.03", "dotted sequence"),
        ("1.2.", "dotted sequence"),
        ("1..2", "dotted sequence"),
        ("1.2.3\x00", "dotted sequence"),
        (" 1.2.3", "dotted sequence"),
    ],
)
def test_hostile_or_malformed_uids_are_refused(uid: str, problem: str) -> None:
    assert problem in (uid_problem(uid) or "")
    with pytest.raises(InvalidUID) as caught:
        require_uid(uid, "SOP Instance UID")
    assert "SOP Instance UID" in str(caught.value)
    if uid:
        assert uid not in str(caught.value)  # the value itself is never echoed


def test_study_key_is_short_stable_and_not_the_uid() -> None:
    uid = "1.2.826.0.1.3680043.8.498.12345"
    assert study_key(uid) == study_key(uid)
    assert len(study_key(uid)) == 16
    assert "3680043" not in study_key(uid)
    assert study_key(uid) != study_key(uid + "1")
