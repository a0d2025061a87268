"""What the configuration's syntax cannot tell: whether its files and addresses work.

Pydantic checks that a TLS certificate path is a path and a host a string; only
opening the files and resolving the names says whether ``serve`` can start. Run by
``radnode config check`` and by ``radnode serve`` before anything else is opened, so
both answer the same problems, one line each, with exit status 2 (acceptance pass: a
check said OK for a key that did not belong to its certificate, and for
``node.host = "not-an-ip"``; serve then failed with a hint about the port).
"""

from __future__ import annotations

import socket

from dicom_nodes.tls import TlsError
from service.config import Settings
from service.dicom_delivery import DicomDestinationSettings
from service.receivers import association_policy


def startup_problems(settings: Settings) -> list[str]:
    """Every problem found, as ``key: what is wrong; what to do``; empty when none."""
    problems = []
    node = settings.node
    try:
        association_policy(settings).tls_context()  # as the Storage SCP builds it
    except TlsError as exc:
        problems.append(f"node.tls_cert: {exc}")
    for key, host in (("node.host", node.host), ("http.host", settings.http.host)):
        problem = _address_problem(host)
        if problem:
            problems.append(f"{key}: {problem}")
    for number, destination in enumerate(settings.destinations):
        if isinstance(destination, DicomDestinationSettings):
            try:
                destination.tls_context()
            except TlsError as exc:
                problems.append(f"destinations[{number}] ({destination.name}): {exc}")
    return problems


def _address_problem(host: str) -> str:
    """Why ``host`` cannot be listened on ('' when it can be resolved)."""
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        return (
            f"{host!r} cannot be resolved to an address ({reason}); give one of this machine's"
            " IP addresses, 0.0.0.0 (every IPv4 address) or :: (every address)"
        )
    return ""
