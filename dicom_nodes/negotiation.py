"""Presentation contexts accepted in the transfer syntax the requestor prefers.

pynetdicom accepts, in each presentation context, the first transfer syntax of the
*acceptor's* list that the requestor proposed: radnode's list starts with the
uncompressed syntaxes, so a PACS proposing JPEG 2000 first, with Explicit VR Little
Endian as its fallback, had to decompress every instance, and a sender that cannot
decompress (DCMTK's ``storescu`` with JPEG 2000) failed outright (acceptance pass).
PS3.8 leaves the choice to the acceptor; the requestor lists its syntaxes in its order
of preference, and a Storage SCP that keeps instances as they arrive should take that
order: the instance is then stored exactly as the PACS holds it, and no one transcodes.

pynetdicom has no hook for the choice, so :func:`install` replaces the negotiation
function its ACSE calls with one that runs pynetdicom's own (roles, rejections, result
codes) and then, for each accepted context, picks the first proposed syntax that the
acceptor supports.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import pynetdicom.acse
from pynetdicom.presentation import PresentationContext
from pynetdicom.presentation import negotiate_as_acceptor as _pynetdicom_negotiate

_lock = threading.Lock()
_installed = False


def negotiate_in_requestor_order(
    rq_contexts: list[PresentationContext],
    ac_contexts: list[PresentationContext],
    roles: dict | None = None,
) -> tuple[list[PresentationContext], list]:
    """pynetdicom's ``negotiate_as_acceptor``, then each accepted context's transfer
    syntax: the first one the requestor proposed that the acceptor supports."""
    result, reply_roles = _pynetdicom_negotiate(rq_contexts, ac_contexts, roles)
    supported = {cx.abstract_syntax: set(cx.transfer_syntax) for cx in ac_contexts}
    proposed = {cx.context_id: cx.transfer_syntax for cx in rq_contexts}
    for context in result:
        if context.result != 0x00:
            continue
        choices = supported.get(context.abstract_syntax, set())
        first = _first_in(proposed.get(context.context_id, ()), choices)
        if first is not None:
            context.transfer_syntax = [first]
    return result, reply_roles


def _first_in(offered: Iterable[str], choices: set[str]) -> str | None:
    return next((syntax for syntax in offered if syntax in choices), None)


def install() -> None:
    """Make pynetdicom's ACSE negotiate with :func:`negotiate_in_requestor_order` in
    this process. Idempotent."""
    global _installed
    with _lock:
        if not _installed:
            pynetdicom.acse.negotiate_as_acceptor = negotiate_in_requestor_order  # type: ignore[assignment]
            _installed = True
