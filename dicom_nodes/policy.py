"""Association policy: who may connect, what they may send, how long we wait.

One frozen object holds every rule the Storage SCP applies at association time, so
that the conformance statement, the config and the code read from the same place.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AllStoragePresentationContexts

#: Transfer syntaxes accepted for every storage SOP class, in order of preference
#: when a requestor proposes several in one presentation context.
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

#: Every storage SOP class pynetdicom knows (including retired ones a PACS may still
#: hold), as abstract syntax UIDs.
STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts if cx.abstract_syntax
)

#: The AE title rules of PS3.5 (VR AE): 1-16 characters of the default repertoire,
#: no backslash, no control characters, not only spaces.
AE_TITLE_MAX_LENGTH = 16


def ae_title_problem(title: str) -> str | None:
    """Return why ``title`` is not a valid AE title, or ``None`` when it is."""
    stripped = title.strip()
    if not stripped:
        return "an AE title must contain at least one character that is not a space"
    if len(title) > AE_TITLE_MAX_LENGTH:
        return f"an AE title is at most {AE_TITLE_MAX_LENGTH} characters (got {len(title)})"
    if "\\" in title or any(ord(c) < 0x20 or ord(c) > 0x7E for c in title):
        return "an AE title may hold only printable ASCII characters and no backslash"
    return None


@dataclass(frozen=True)
class AssociationPolicy:
    """What the Storage SCP accepts.

    ``allowed_calling_aets`` empty means any calling AE title is accepted (the node
    logs a warning at start). ``max_pdu_bytes`` is the Maximum Length we announce
    for PDUs we receive; larger PDUs mean fewer Python iterations per instance.
    """

    ae_title: str = "RADNODE"
    allowed_calling_aets: tuple[str, ...] = ()
    require_called_aet: bool = True
    max_associations: int = 16
    max_pdu_bytes: int = 1_048_576
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    transfer_syntaxes: tuple[str, ...] = STORAGE_TRANSFER_SYNTAXES
    sop_classes: tuple[str, ...] = STORAGE_SOP_CLASSES

    def calling_ae_allowed(self, calling_ae: str) -> bool:
        """True when ``calling_ae`` may open an association."""
        if not self.allowed_calling_aets:
            return True
        return calling_ae.strip() in self.allowed_calling_aets
