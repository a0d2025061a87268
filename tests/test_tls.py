"""DICOM TLS: the SCP speaks BCP 195 TLS to real peers and refuses everyone else.

Certificates are made per test session with the ``openssl`` CLI (a CA, a server and a
client certificate, and a client certificate from another CA). The SCP runs in process
with a small receiver; the peers are DCMTK's ``echoscu``/``storescu +tls``, pynetdicom
with :func:`dicom_nodes.tls.client_context`, and raw Python ``ssl`` clients for the
protocol-level refusals (TLS 1.1, non-BCP 195 cipher suites, plain DICOM).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_nodes.policy import AssociationPolicy
from dicom_nodes.scp import ReceivedInstance, StorageSCP
from dicom_nodes.scu import send_files
from dicom_nodes.status import StoreStatus
from dicom_nodes.tls import BCP195_CIPHERS, TlsError, client_context, server_context
from service.dicom_delivery import DicomDestinationSettings
from service.testing import write_ct_series
from tests.conftest import (
    RADNODE,
    acknowledged_files,
    dcmtk_env,
    free_port,
    require_tool,
    wait_for_port,
)

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def _openssl(*args: str | Path) -> None:
    result = subprocess.run(
        [require_tool("openssl"), *map(str, args)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _issue(
    folder: Path, name: str, ca: tuple[Path, Path], *, rsa: bool = False
) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    algorithm = ["rsa:2048"] if rsa else ["ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    _openssl(
        "req", "-newkey", *algorithm, "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}"
    )
    ext = folder / f"{name}.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", cert, "-days", "2", "-sha256", "-extfile", ext,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = _make_ca(folder, "radnode-test-ca")
    other_ca = _make_ca(folder, "other-ca")
    server = _issue(folder, "radnode", ca, rsa=True)  # RSA: the ECDHE-RSA suites
    client = _issue(folder, "pacs", ca)
    other_client = _issue(folder, "intruder", other_ca)
    return Pki(ca[0], *server, *client, other_ca[0], *other_client)


# --------------------------------------------------------------------------- the SCP


class Collect:
    """A receiver that keeps what it is given."""

    def __init__(self) -> None:
        self.instances: list[ReceivedInstance] = []
        self._lock = threading.Lock()

    def store(self, instance: ReceivedInstance) -> StoreStatus:
        with self._lock:
            self.instances.append(instance)
        return StoreStatus.SUCCESS


@pytest.fixture
def start_scp() -> Iterator:
    started: list[StorageSCP] = []

    def start(policy: AssociationPolicy, **kwargs: object) -> tuple[StorageSCP, Collect]:
        receiver = Collect()
        scp = StorageSCP(policy, receiver, host="127.0.0.1", port=0, **kwargs)  # type: ignore[arg-type]
        scp.start()
        started.append(scp)
        return scp, receiver

    yield start
    for scp in started:
        scp.stop()


def tls_policy(pki: Pki, *, require_client_cert: bool = True) -> AssociationPolicy:
    return AssociationPolicy(
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_ca=pki.ca,
        tls_require_client_cert=require_client_cert,
        acse_timeout_s=5.0,
    )


def dcmtk(
    tool: str, port: int, *args: str | Path, files: list[Path] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [require_tool(tool), "-v", "-aet", "PACS", "-aec", "RADNODE", *map(str, args)]
    cmd += ["127.0.0.1", str(port), *map(str, files or [])]
    return subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=120)


def dcmtk_tls(pki: Pki, cert: Path | None = None, key: Path | None = None) -> list[str | Path]:
    """DCMTK's TLS options: our client certificate (or none), trusting radnode's CA."""
    identity: list[str | Path] = ["+tls", key, cert] if cert and key else ["+tla"]
    return [*identity, "+cf", pki.ca]


def handshake_failures(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "tls.handshake_failed"]


def wait_for_handshake_failure(events: list[dict]) -> dict:
    """The server logs after the client has given up: wait for that line."""
    for _ in range(200):
        failures = handshake_failures(events)
        if failures:
            return failures[0]
        threading.Event().wait(0.02)
    raise AssertionError(f"no tls.handshake_failed in {events}")


# --------------------------------------------------------------------------- peers that succeed


def test_echo_and_store_over_tls_with_dcmtk(pki: Pki, start_scp, tmp_path: Path) -> None:
    scp, receiver = start_scp(tls_policy(pki))
    files = write_ct_series(tmp_path / "ct", slices=3, rows=16, columns=16)
    tls = dcmtk_tls(pki, pki.client_cert, pki.client_key)

    with structlog.testing.capture_logs() as events:
        echo = dcmtk("echoscu", scp.port, *tls)
        store = dcmtk("storescu", scp.port, *tls, files=files)

    assert echo.returncode == 0, echo.stdout + echo.stderr
    assert store.returncode == 0, store.stdout + store.stderr
    assert len(acknowledged_files(store.stdout + store.stderr)) == 3
    assert sorted(i.sop_instance_uid for i in receiver.instances) == sorted(
        str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files
    )
    opened = [e for e in events if e["event"] == "association.opened"]
    assert opened and all(e["tls"] and e["peer_cert_cn"] == "pacs" for e in opened)
    assert all(e["tls_version"] in ("TLSv1.2", "TLSv1.3") for e in opened)


def test_pynetdicom_scu_with_client_context(pki: Pki, start_scp) -> None:
    scp, _ = start_scp(tls_policy(pki))
    context = client_context(pki.ca, pki.client_cert, pki.client_key)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)

    assoc = ae.associate("127.0.0.1", scp.port, ae_title="RADNODE", tls_args=(context, None))  # type: ignore[arg-type]

    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_client_context_checks_the_server_certificate(pki: Pki, start_scp) -> None:
    scp, _ = start_scp(tls_policy(pki, require_client_cert=False))
    context = client_context(pki.other_ca)  # trusts another CA only

    with (
        socket.create_connection(("127.0.0.1", scp.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(raw)


def test_tls_1_2_negotiates_a_bcp195_suite(pki: Pki, start_scp) -> None:
    scp, _ = start_scp(tls_policy(pki, require_client_cert=False))
    context = client_context(pki.ca)
    context.maximum_version = ssl.TLSVersion.TLSv1_2

    with (
        socket.create_connection(("127.0.0.1", scp.port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        version, cipher = tls.version(), tls.cipher()

    assert version == "TLSv1.2"
    assert cipher is not None and cipher[0] in BCP195_CIPHERS.split(":")


def test_plain_and_tls_ports_side_by_side(pki: Pki, start_scp) -> None:
    tls_port = free_port()
    scp, _ = start_scp(tls_policy(pki), tls_port=tls_port)

    plain = dcmtk("echoscu", scp.port)
    tls = dcmtk("echoscu", tls_port, *dcmtk_tls(pki, pki.client_cert, pki.client_key))

    assert scp.tls_port == tls_port != scp.port
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert tls.returncode == 0, tls.stdout + tls.stderr


# --------------------------------------------------------------------------- peers that are refused


def test_plain_peer_is_refused_on_the_tls_port(pki: Pki, start_scp) -> None:
    scp, _ = start_scp(tls_policy(pki))

    with structlog.testing.capture_logs() as events:
        echo = dcmtk("echoscu", scp.port)
        failure = wait_for_handshake_failure(events)

    assert echo.returncode != 0
    assert "did not speak TLS" in failure["reason"]
    assert failure["peer_address"] == "127.0.0.1" and failure["action"]
    assert not [e for e in events if e["event"] == "association.opened"]


def test_client_without_certificate_is_refused_when_required(pki: Pki, start_scp) -> None:
    scp, _ = start_scp(tls_policy(pki, require_client_cert=True))

    with structlog.testing.capture_logs() as events:
        echo = dcmtk("echoscu", scp.port, *dcmtk_tls(pki))
        failure = wait_for_handshake_failure(events)

    assert echo.returncode != 0
    assert "no client certificate" in failure["reason"]


def test_client_without_certificate_is_served_when_not_required(pki: Pki, start_scp) -> None:
    scp, _ = start_scp(tls_policy(pki, require_client_cert=False))

    echo = dcmtk("echoscu", scp.port, *dcmtk_tls(pki))

    assert echo.returncode == 0, echo.stdout + echo.stderr


def test_client_certificate_from_another_ca_is_refused(pki: Pki, start_scp) -> None:
    scp, _ = start_scp(tls_policy(pki, require_client_cert=False))  # even when optional

    with structlog.testing.capture_logs() as events:
        echo = dcmtk(
            "echoscu", scp.port, *dcmtk_tls(pki, pki.other_client_cert, pki.other_client_key)
        )
        failure = wait_for_handshake_failure(events)

    assert echo.returncode != 0
    assert "certificate was not accepted" in failure["reason"]


def _legacy_client(maximum: ssl.TLSVersion, ciphers: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = maximum
    context.set_ciphers(ciphers)  # @SECLEVEL=0 lets this OpenSSL offer what it would not
    return context


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize(
    ("maximum", "ciphers", "reason"),
    [
        (ssl.TLSVersion.TLSv1_1, "DEFAULT:@SECLEVEL=0", "older than 1.2"),
        (ssl.TLSVersion.TLSv1, "DEFAULT:@SECLEVEL=0", "older than 1.2"),
        (ssl.TLSVersion.TLSv1_2, "AES128-SHA:AES256-SHA256:@SECLEVEL=0", "no BCP 195 cipher"),
    ],
    ids=["tls1.1", "tls1.0", "tls1.2-non-bcp195-suites"],
)
def test_legacy_tls_is_refused(
    pki: Pki, start_scp, maximum: ssl.TLSVersion, ciphers: str, reason: str
) -> None:
    scp, _ = start_scp(tls_policy(pki, require_client_cert=False))
    context = _legacy_client(maximum, ciphers)

    with structlog.testing.capture_logs() as events:
        with (
            socket.create_connection(("127.0.0.1", scp.port), timeout=5) as raw,
            pytest.raises(ssl.SSLError),
        ):
            context.wrap_socket(raw)
        failure = wait_for_handshake_failure(events)

    assert reason in failure["reason"]


def test_silent_peer_does_not_block_the_tls_port(pki: Pki, start_scp) -> None:
    """The handshake runs on the connection's thread: a mute TCP client blocks no one."""
    scp, _ = start_scp(tls_policy(pki))
    with socket.create_connection(("127.0.0.1", scp.port), timeout=5):
        echo = dcmtk("echoscu", scp.port, *dcmtk_tls(pki, pki.client_cert, pki.client_key))
    assert echo.returncode == 0, echo.stdout + echo.stderr


# --------------------------------------------------------------------------- configuration errors


@pytest.fixture(scope="module")
def encrypted_key(pki: Pki) -> Path:
    path = pki.server_key.with_name("encrypted.key")
    _openssl("pkey", "-in", pki.server_key, "-aes256", "-passout", "pass:s3cret", "-out", path)
    return path


def test_encrypted_key_loads_with_its_password(pki: Pki, encrypted_key: Path) -> None:
    context = server_context(pki.server_cert, encrypted_key, key_password="s3cret")
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("missing key", "does not exist"),
        ("cert is not PEM", "holds no PEM certificate"),
        ("key is not a key", "holds no PEM private key"),
        ("encrypted, no password", "is encrypted and no password is set"),
        ("wrong password", "could not be decrypted"),
        ("key of another certificate", "does not belong to the certificate"),
        ("client certs without CA", "no CA file is set"),
        ("CA is not PEM", "holds no PEM certificate"),
    ],
)
def test_unusable_tls_files_are_named_with_what_to_fix(
    pki: Pki, encrypted_key: Path, tmp_path: Path, case: str, words: str
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    arguments: dict[str, dict] = {
        "missing key": {"key": tmp_path / "nope.key"},
        "cert is not PEM": {"cert": junk},
        "key is not a key": {"key": pki.ca},
        "encrypted, no password": {"key": encrypted_key},
        "wrong password": {"key": encrypted_key, "key_password": "n0t-this"},
        "key of another certificate": {"key": pki.client_key},
        "client certs without CA": {"require_client_cert": True},
        "CA is not PEM": {"ca_file": junk},
    }
    given = {"cert": pki.server_cert, "key": pki.server_key, **arguments[case]}

    with pytest.raises(TlsError) as error:
        server_context(
            given.pop("cert"),
            given.pop("key"),
            **given,  # type: ignore[arg-type]
        )

    message = str(error.value)
    assert words in message
    assert "s3cret" not in message and "n0t-this" not in message
    if case not in ("client certs without CA",):
        named = {**{"cert": pki.server_cert, "key": pki.server_key}, **arguments[case]}
        assert any(str(v) in message for v in named.values() if isinstance(v, Path))


def test_scp_refuses_to_start_with_an_unusable_key(pki: Pki) -> None:
    policy = AssociationPolicy(tls_cert=pki.server_cert, tls_key=pki.client_key)
    with pytest.raises(TlsError, match="does not belong"):
        StorageSCP(policy, Collect(), port=0)


def test_tls_settings_without_a_certificate_are_a_mistake(pki: Pki) -> None:
    with pytest.raises(ValueError, match="need tls_cert"):
        AssociationPolicy(tls_ca=pki.ca, tls_require_client_cert=True)
    with pytest.raises(ValueError, match="TLS is off"):
        StorageSCP(AssociationPolicy(), Collect(), port=0, tls_port=2762)


def test_the_key_password_is_not_in_the_policy_repr(pki: Pki) -> None:
    policy = AssociationPolicy(tls_cert=pki.server_cert, tls_key_password="s3cret")
    assert "s3cret" not in repr(policy)


@pytest.mark.integration
def test_radnode_serve_speaks_tls_from_its_configuration(pki: Pki, radnode_factory) -> None:
    node = radnode_factory(
        RADNODE_NODE__TLS_CERT=str(pki.server_cert),
        RADNODE_NODE__TLS_KEY=str(pki.server_key),
        RADNODE_NODE__TLS_CA=str(pki.ca),
        RADNODE_NODE__TLS_REQUIRE_CLIENT_CERT="true",
    ).start()
    tls = dcmtk_tls(pki, pki.client_cert, pki.client_key)
    echo = dcmtk("echoscu", node.port, *tls)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    plain = dcmtk("echoscu", node.port)
    assert plain.returncode != 0


@pytest.mark.integration
def test_radnode_serve_refuses_to_start_with_a_broken_tls_setup(
    pki: Pki, radnode_factory, tmp_path: Path
) -> None:
    node = radnode_factory(
        RADNODE_NODE__TLS_CERT=str(pki.server_cert),
        RADNODE_NODE__TLS_KEY=str(tmp_path / "missing.key"),
    )
    proc = subprocess.run(
        [str(RADNODE), "serve"], env=node.env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2  # a configuration that cannot work, as config check says
    assert "node.tls_cert:" in proc.stderr and "missing.key" in proc.stderr


# --------------------------------------------------------------------------- the SCU


@pytest.fixture
def tls_storescp(pki: Pki, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp speaking DICOM TLS, requiring a client certificate from pki.ca."""
    port, received = free_port(), tmp_path / "received"
    received.mkdir()
    proc = subprocess.Popen(
        [require_tool("storescp"), "+tls", str(pki.server_key), str(pki.server_cert),
         "+cf", str(pki.ca), "-rc", "-aet", "PACS", "-od", str(received), str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, proc=proc)
        yield port, received
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _destination(port: int, **tls: object) -> DicomDestinationSettings:
    return DicomDestinationSettings(
        name="pacs", host="127.0.0.1", port=port, ae_title="PACS", connect_timeout_s=5, **tls
    )


def test_results_go_to_a_tls_pacs_over_tls(pki: Pki, tls_storescp, tmp_path: Path) -> None:
    """Acceptance pass: a destination took no TLS settings, so results went back to the
    PACS in plain text even from a TLS-only node."""
    port, received = tls_storescp
    files = write_ct_series(tmp_path / "ct", slices=3, rows=16, columns=16)
    settings = _destination(
        port, tls=True, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key
    )
    report = send_files(settings.storage_destination(), files)
    assert report.all_acknowledged, report
    assert len(list(received.iterdir())) == 3

    plain = send_files(_destination(port).storage_destination(), files)
    assert not plain.all_acknowledged  # the PACS speaks TLS only


@pytest.mark.parametrize(
    ("tls", "says"),
    [
        ({"tls_ca": "other_ca", "tls_cert": "client_cert", "tls_key": "client_key"},
         "certificate was not accepted"),
        ({"tls_ca": "ca"}, "client certificate"),
    ],
)  # fmt: skip
def test_a_tls_destination_that_cannot_be_reached_says_why(
    pki: Pki, tls_storescp, tmp_path: Path, tls: dict, says: str
) -> None:
    port, received = tls_storescp
    files = write_ct_series(tmp_path / "ct", slices=1, rows=16, columns=16)
    settings = _destination(port, tls=True, **{k: getattr(pki, v) for k, v in tls.items()})
    report = send_files(settings.storage_destination(), files)
    assert not report.all_acknowledged
    assert "TLS handshake failed" in report.reason and says in report.reason, report.reason
    assert list(received.iterdir()) == []


def test_tls_keys_on_a_destination_without_tls_are_refused(pki: Pki) -> None:
    with pytest.raises(ValueError, match="need tls = true"):
        _destination(104, tls_ca=pki.ca)
