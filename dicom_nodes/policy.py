"""Association policy: who may connect, what they may send, how long we wait.

One frozen object holds every rule the Storage SCP applies at association time, so
that the conformance statement, the config and the code read from the same place.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

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

from dicom_nodes.tls import server_context

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


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def network_problem(value: str) -> str | None:
    """Return why ``value`` is not an IP address or CIDR network, or ``None``."""
    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError as exc:
        return f"{value!r} is not an IP address or CIDR network ({exc})"
    return None


def _networks(values: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    problems = [p for p in (network_problem(v) for v in values) if p]
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values)


@dataclass(frozen=True)
class AssociationPolicy:
    """What the Storage SCP accepts.

    Who may associate, checked when the A-ASSOCIATE-RQ arrives; a refusal is an
    A-ASSOCIATE-RJ (PS3.8 9.3.4) and one ``association.rejected`` log line:

    * ``allowed_peer_addresses``: IP addresses and CIDR networks (``10.1.2.3``,
      ``10.1.0.0/16``, ``fd00::/8``); empty means any address. Refused: permanent,
      DICOM UL service-user, reason 1 "no reason given" (PS3.8 has no address reason;
      the peer learns nothing about the list).
    * ``allowed_calling_aets``: empty means any calling AE title (the node logs a
      warning at start). Refused: permanent, service-user, reason 3 "calling AE title
      not recognized".
    * ``require_called_aet``: the called AE title must be ``ae_title``. Refused:
      permanent, service-user, reason 7 "called AE title not recognized".
    * ``max_associations``: more concurrent associations are refused: transient,
      service-provider (presentation), reason 2 "local limit exceeded".

    ``max_pdu_bytes`` is the Maximum Length we announce for PDUs we receive (0 means
    unlimited); larger PDUs mean fewer Python iterations per instance.

    DICOM TLS is on when ``tls_cert`` is set (see :mod:`dicom_nodes.tls`): ``tls_key``
    is the private key (None: it is in ``tls_cert``), ``tls_key_password`` its password
    if encrypted (never logged, not in ``repr``), ``tls_ca`` the CA file client
    certificates must chain to, and ``tls_require_client_cert`` refuses clients without
    one (mutual TLS). Which port speaks TLS is the SCP's ``tls_port`` argument.
    """

    ae_title: str = "RADNODE"
    allowed_calling_aets: tuple[str, ...] = ()
    allowed_peer_addresses: tuple[str, ...] = ()
    require_called_aet: bool = True
    max_associations: int = 16
    max_pdu_bytes: int = 1_048_576
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    transfer_syntaxes: tuple[str, ...] = STORAGE_TRANSFER_SYNTAXES
    sop_classes: tuple[str, ...] = STORAGE_SOP_CLASSES
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_key_password: str | None = field(default=None, repr=False)
    tls_ca: Path | None = None
    tls_require_client_cert: bool = False

    def __post_init__(self) -> None:
        _networks(self.allowed_peer_addresses)  # a bad entry fails here, named
        if self.tls_cert is None and (
            self.tls_key is not None or self.tls_ca is not None or self.tls_require_client_cert
        ):
            raise ValueError(
                "tls_key, tls_ca and tls_require_client_cert need tls_cert: set the "
                "certificate to turn DICOM TLS on"
            )

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    def tls_context(self) -> ssl.SSLContext | None:
        """The listener's TLS context, None with TLS off. Raises
        :class:`dicom_nodes.tls.TlsError` (what to fix in which file) when the
        certificate, key or CA cannot be used: the SCP at start, and ``radnode config
        check`` before it, build it here."""
        if self.tls_cert is None:
            return None
        return server_context(
            self.tls_cert,
            self.tls_key,
            ca_file=self.tls_ca,
            require_client_cert=self.tls_require_client_cert,
            key_password=self.tls_key_password,
        )

    @cached_property
    def peer_networks(self) -> tuple[IPNetwork, ...]:
        return _networks(self.allowed_peer_addresses)

    def calling_ae_allowed(self, calling_ae: str) -> bool:
        """True when ``calling_ae`` may open an association."""
        if not self.allowed_calling_aets:
            return True
        return calling_ae.strip() in self.allowed_calling_aets

    def address_allowed(self, address: str) -> bool:
        """True when a peer at ``address`` may open an association.

        IPv4 peers seen on an IPv6 socket (``::ffff:10.1.2.3``) match IPv4 entries.
        Anything that is not an IP address is refused when a list is set.
        """
        if not self.allowed_peer_addresses:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.peer_networks)
