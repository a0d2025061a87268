"""A real Orthanc (the PACS of the tests) on free loopback ports, as a fixture."""

from __future__ import annotations

import contextlib
import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import dcmtk_env, free_port, require_tool, wait_for_port


@contextlib.contextmanager
def running_orthanc(
    root: Path, *, dicom_port: int | None = None, modalities: dict[str, list] | None = None
) -> Iterator[dict]:
    """A real Orthanc on loopback ports, its storage under ``root``; for tests and
    benchmarks. Yields ``{"port": DICOM port, "http": REST base URL}``.

    ``modalities``: Orthanc's ``DicomModalities`` (name -> [AE title, host, port]), the
    peers it may send to, e.g. radnode for auto-routing. DCMTK inside Orthanc gets
    ``TCP_NODELAY=1`` as every DCMTK program in these tests does.
    """
    binary = require_tool("Orthanc")
    dicom_port, http_port = dicom_port or free_port(), free_port()
    config = {
        "Name": "radnode-test",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "Plugins": [],
        "DicomModalities": modalities or {},
    }
    path = root / "orthanc.json"
    path.write_text(json.dumps(config))
    log = (root / "orthanc.log").open("w")
    proc = subprocess.Popen(
        [binary, str(path)], stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env()
    )
    try:
        wait_for_port(dicom_port, proc=proc)
        wait_for_port(http_port, proc=proc)
        yield {"port": dicom_port, "http": f"http://127.0.0.1:{http_port}"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> Iterator[dict]:
    """A real Orthanc on free loopback ports with a throw-away storage directory."""
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as peer:
        yield peer


def orthanc_get(base: str, path: str):
    """GET a JSON document from Orthanc's REST API."""
    with urllib.request.urlopen(base + path, timeout=10) as answer:
        return json.loads(answer.read())
