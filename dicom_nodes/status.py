"""The DIMSE statuses radnode returns, named.

Storage statuses follow PS3.4 Annex B.2.3: ``A7xx`` refused (out of resources),
``A9xx`` error (data set does not match SOP class), ``Cxxx`` error (cannot
understand). Within the ``Cxxx`` range radnode uses one code per reason so that a
PACS administrator can tell from the sender's log alone why an instance was refused;
the codes are listed in ``docs/conformance-statement.md``.
"""

from __future__ import annotations

from enum import IntEnum


class StoreStatus(IntEnum):
    """C-STORE response statuses sent by radnode's Storage SCP."""

    SUCCESS = 0x0000
    #: The instance could not be made durable (disk full, below the free-space
    #: threshold, or a write error). The sender should retry later.
    OUT_OF_RESOURCES = 0xA700
    #: SOP Class UID in the data set differs from the one in the C-STORE request.
    SOP_CLASS_MISMATCH = 0xA900
    #: The data set could not be parsed (not DICOM, truncated, corrupt).
    CANNOT_UNDERSTAND = 0xC000
    #: A required UID (Study, Series or SOP Instance) is missing or malformed.
    INVALID_UID = 0xC001
    #: SOP Instance UID in the data set differs from the one in the C-STORE request.
    SOP_INSTANCE_MISMATCH = 0xC002
    #: An unexpected internal error; the instance was not stored.
    PROCESSING_FAILURE = 0xC0FF


class EchoStatus(IntEnum):
    """C-ECHO response statuses."""

    SUCCESS = 0x0000
