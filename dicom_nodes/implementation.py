"""How radnode names itself in DICOM: its Implementation Class UID and Version Name.

Sent in every A-ASSOCIATE-RQ and -AC (PS3.7 D.3.3.2) and written in the file meta of
every spooled instance (PS3.10 7.1), so a peer's log and a file name the same
implementation. One place for both: the acceptor announced pynetdicom's own
(``PYNETDICOM_304``) while the requestor and the files said radnode (conformance audit).
"""

from __future__ import annotations

from typing import Any

from pydicom.uid import UID

#: radnode's Implementation Class UID (a UUID-derived 2.25 UID; never changes).
IMPLEMENTATION_CLASS_UID = UID("2.25.186415519836318406418423104426519003785")
#: ``RADNODE_`` and the release without dots (SH, 16 characters at most); a test keeps
#: it in step with ``service.__version__``.
IMPLEMENTATION_VERSION_NAME = "RADNODE_010"


def identify(ae: Any) -> Any:
    """Make a pynetdicom ``AE`` announce radnode, as requestor and as acceptor."""
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return ae
