"""DICOM TLS: SSL contexts for the Storage SCP and SCU (PS3.15 Annex B, BCP 195).

radnode follows the *Non-downgrading BCP 195 TLS Secure Transport Connection Profile*
(PS3.15 B.10), DCMTK's default: TLS 1.2 or later only (never SSL, TLS 1.0 or 1.1),
forward-secret ECDHE key exchange and AES-GCM for TLS 1.2 (the BCP 195 / RFC 7525
recommended suites), and OpenSSL's TLS 1.3 suites (all AEAD). No TLS compression, no
renegotiation.

* :func:`server_context` for the SCP: certificate and private key, optionally a CA
  file that client certificates must chain to (``require_client_cert``).
* :func:`client_context` for the SCU: the CA file that the peer's certificate must
  chain to, and optionally our own certificate and key when the peer asks for one.

Every mistake in the files raises :class:`TlsError`, whose message names the file and
what to fix (missing, not PEM, encrypted without a password, wrong password, key does
not belong to the certificate). Passwords never appear in messages.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from pathlib import Path

#: TLS 1.2 cipher suites of BCP 195 (RFC 7525 section 4.2) with ECDHE key exchange,
#: in OpenSSL names; TLS 1.3 suites are configured by OpenSSL (all AEAD).
BCP195_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
    )
)
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

PathLike = str | os.PathLike[str]


class TlsError(ValueError):
    """A TLS certificate, key or CA file cannot be used; the message says what to fix."""


def server_context(
    cert: PathLike,
    key: PathLike | None = None,
    *,
    ca_file: PathLike | None = None,
    require_client_cert: bool = False,
    key_password: str | None = None,
) -> ssl.SSLContext:
    """The SSLContext for a DICOM TLS listener.

    ``key`` may be omitted when ``cert`` holds the private key too. With ``ca_file``,
    a client certificate is verified against it when one is sent; with
    ``require_client_cert`` a client without a valid certificate is refused during the
    handshake (mutual TLS), which needs ``ca_file``.
    """
    if require_client_cert and ca_file is None:
        raise TlsError(
            "client certificates are required but no CA file is set: set tls_ca to the "
            "PEM file of the CA that issues the peers' certificates"
        )
    context = _base_context(ssl.PROTOCOL_TLS_SERVER)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_cert_chain(context, cert, key, key_password)
    if ca_file is not None:
        _load_ca(context, ca_file)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(
    ca_file: PathLike | None,
    cert: PathLike | None = None,
    key: PathLike | None = None,
    *,
    key_password: str | None = None,
    check_hostname: bool = False,
) -> ssl.SSLContext:
    """The SSLContext for a DICOM TLS association we open (Storage SCU).

    The peer's certificate is always verified: against ``ca_file`` when given, else
    against the system's trust store. ``cert``/``key`` are our client certificate, for
    peers that require one. DICOM peers are usually addressed by IP address, so the
    host name is checked only with ``check_hostname``. With pynetdicom:
    ``ae.associate(host, port, tls_args=(context, None))``, or
    ``tls_args=(context, hostname)`` when ``check_hostname`` is on (never ``""``:
    Python refuses an empty server name).
    """
    context = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if ca_file is not None:
        _load_ca(context, ca_file)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert is not None:
        _load_cert_chain(context, cert, key, key_password)
    elif key is not None:
        raise TlsError(f"a TLS key ({key}) is set without its certificate: set the certificate")
    return context


def describe_handshake_error(exc: BaseException) -> tuple[str, str]:
    """``(reason, action)`` for a failed server-side handshake, for one log line."""
    if isinstance(exc, TimeoutError | ssl.SSLZeroReturnError | ConnectionError):
        return (
            f"the peer did not complete the TLS handshake ({type(exc).__name__})",
            "check that the peer uses TLS on this port (e.g. storescu +tls)",
        )
    reason = getattr(exc, "reason", None) or type(exc).__name__
    verify = getattr(exc, "verify_message", None)
    known = {
        "WRONG_VERSION_NUMBER": (
            "the peer did not speak TLS (plain DICOM on the TLS port?)",
            "configure the peer for DICOM TLS, or point it at the plain port",
        ),
        "HTTP_REQUEST": (
            "the peer sent HTTP, not TLS",
            "point the peer at the DICOM TLS port",
        ),
        "UNSUPPORTED_PROTOCOL": (
            "the peer offered only TLS versions older than 1.2",
            "enable TLS 1.2 or 1.3 on the peer (BCP 195); TLS 1.0/1.1 are refused",
        ),
        "NO_SHARED_CIPHER": (
            "the peer offered no BCP 195 cipher suite",
            "enable ECDHE with AES-GCM (or TLS 1.3) on the peer",
        ),
        "PEER_DID_NOT_RETURN_A_CERTIFICATE": (
            "the peer sent no client certificate, and one is required",
            "give the peer a certificate issued by the CA in tls_ca",
        ),
        "TLSV1_ALERT_UNKNOWN_CA": (
            "the peer does not trust this node's certificate (unknown CA)",
            "add the CA that issued tls_cert to the peer's trusted certificates",
        ),
        "SSLV3_ALERT_BAD_CERTIFICATE": (
            "the peer rejected this node's certificate",
            "check tls_cert's validity dates, key usage and the CA the peer trusts",
        ),
        "CERTIFICATE_VERIFY_FAILED": (
            f"the peer's certificate was not accepted ({verify or 'verification failed'})",
            "issue the peer's certificate from the CA in tls_ca, or add its CA there",
        ),
    }
    if reason in known:
        return known[reason]
    return (
        f"TLS handshake failed ({reason})",
        "check the peer's TLS settings: TLS 1.2+, BCP 195 cipher suites, trusted certificates",
    )


def describe_client_handshake_error(exc: BaseException) -> tuple[str, str]:
    """``(reason, action)`` for a failed handshake with a destination (we are the
    client): the server side's wording, with the peer's roles turned round."""
    reason = getattr(exc, "reason", None)
    verify = getattr(exc, "verify_message", None)
    if reason == "CERTIFICATE_VERIFY_FAILED":
        return (
            f"the destination's certificate was not accepted ({verify or 'not trusted'})",
            "set the destination's tls_ca to the CA that issued its certificate",
        )
    if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE"):
        return (
            "the destination refused this node's client certificate",
            "set the destination's tls_cert/tls_key to a certificate it trusts",
        )
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        return (
            "the destination requires a client certificate",
            "set the destination's tls_cert and tls_key",
        )
    if reason == "WRONG_VERSION_NUMBER" or isinstance(exc, ssl.SSLEOFError | ConnectionError):
        return (
            "the destination did not speak TLS on this port",
            "point the destination at the PACS's DICOM TLS port, or set tls = false",
        )
    return describe_handshake_error(exc)


# --------------------------------------------------------------------------- internals


def _base_context(protocol: int) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _readable(path: PathLike, what: str) -> tuple[Path, str]:
    file = Path(path)
    if not file.is_file():
        raise TlsError(f"{what} {file} does not exist or is not a file: check the path")
    try:
        text = file.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise TlsError(
            f"{what} {file} cannot be read ({exc.strerror}): let the radnode user read it"
        ) from exc
    return file, text


def _load_cert_chain(
    context: ssl.SSLContext, cert: PathLike, key: PathLike | None, password: str | None
) -> None:
    cert_file, cert_text = _readable(cert, "TLS certificate file")
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        raise TlsError(
            f"TLS certificate file {cert_file} holds no PEM certificate "
            "('-----BEGIN CERTIFICATE-----'): convert it to PEM, e.g. "
            "openssl x509 -inform der -in cert.der -out cert.pem"
        )
    key_file, key_text = (cert_file, cert_text) if key is None else _readable(key, "TLS key file")
    if "PRIVATE KEY-----" not in key_text:
        raise TlsError(
            f"TLS key file {key_file} holds no PEM private key ('-----BEGIN ... PRIVATE "
            "KEY-----'): set the key file, or put the key in the certificate file"
        )
    encrypted = "ENCRYPTED" in key_text
    if encrypted and not password:
        raise TlsError(
            f"TLS key file {key_file} is encrypted and no password is set: set "
            "tls_key_password (e.g. through the environment), or store the key unencrypted "
            "with file permissions 0600"
        )
    try:
        context.load_cert_chain(cert_file, key_file, password=_password(password))
    except ssl.SSLError as exc:
        raise _chain_error(exc, cert_file, key_file, encrypted) from None


def _password(password: str | None) -> Callable[[], str]:
    # Always a callable: OpenSSL's default would prompt on the terminal of a service.
    return lambda: password or ""


def _chain_error(exc: ssl.SSLError, cert: Path, key: Path, encrypted: bool) -> TlsError:
    reason = (exc.reason or "").upper()
    # Same key type: KEY_VALUES_MISMATCH; another type (EC key, RSA certificate):
    # the key finds no certificate to pair with.
    if "KEY_VALUES_MISMATCH" in reason or "NO_CERTIFICATE_ASSIGNED" in reason:
        return TlsError(
            f"TLS key file {key} does not belong to the certificate in {cert}: set the key "
            "the certificate was issued for (compare 'openssl x509 -noout -pubkey -in CERT' "
            "with 'openssl pkey -pubout -in KEY')"
        )
    if encrypted or "BAD_DECRYPT" in reason or "BAD_PASSWORD" in reason:
        return TlsError(f"TLS key file {key} could not be decrypted: check tls_key_password")
    if "EE_KEY_TOO_SMALL" in reason or "CA_MD_TOO_WEAK" in reason:
        return TlsError(
            f"TLS certificate {cert} or key {key} is too weak for OpenSSL's security level "
            f"({exc.reason}): issue a certificate with an RSA key of at least 2048 bits or "
            "an EC key, signed with SHA-256 or better"
        )
    return TlsError(
        f"TLS certificate {cert} and key {key} cannot be loaded ({exc.reason or exc}): "
        "check that both are PEM and belong together"
    )


def _load_ca(context: ssl.SSLContext, ca_file: PathLike) -> None:
    file, text = _readable(ca_file, "TLS CA file")
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise TlsError(
            f"TLS CA file {file} holds no PEM certificate: set the PEM file of the CA "
            "certificate(s) that issue the peers' certificates"
        )
    try:
        context.load_verify_locations(cafile=file)
    except ssl.SSLError as exc:
        raise TlsError(
            f"TLS CA file {file} cannot be loaded ({exc.reason or exc}): check that it is "
            "a PEM file of CA certificates"
        ) from None
