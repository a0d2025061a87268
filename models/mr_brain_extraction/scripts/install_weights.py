"""Put deepbet's two published TorchScript networks into this bundle's ``models/``.

Run once at install time, from anywhere (radnode never downloads anything at run time):

    .venv/bin/python models/mr_brain_extraction/scripts/install_weights.py

Why an install step and not files in the repository: the weights are deepbet's (MIT
licence, © 2023 Medical Machine Learning Lab, University of Münster), published in its
PyPI wheel; taking them from the pinned release keeps the provenance checkable. Why not
``pip install deepbet``: its wheel puts a top-level ``data/`` folder into site-packages
and pulls dependencies the networks do not need. So this script fetches the wheel alone
(``pip download --no-deps deepbet==1.0.2``, or ``--wheel`` a copy you have), checks the
SHA-256 of both networks and writes them as ``models/model.ts`` (the main network) and
``models/bbox_model.ts`` (the first stage). Running it again does nothing when both are
already there and intact.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[1]
RELEASE = "deepbet==1.0.2"
#: wheel member -> (file in models/, SHA-256 of the member)
FILES = {
    "data/models/model.pt": (
        "model.ts",
        "de8ee7c69654d0dd3935dc4a5d84571d8ecf4637a6bfc01df399c4c2bc86e0fd",
    ),
    "data/models/bbox_model.pt": (
        "bbox_model.ts",
        "39a7b2b5f799faa1391ea97bfcdc0b9299f20d84f2316a4ff8918dc4685e40aa",
    ),
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def installed(models_dir: Path = BUNDLE / "models") -> bool:
    """True when both networks are in place with the published content."""
    for name, digest in FILES.values():
        path = models_dir / name
        if not path.is_file() or _sha256(path.read_bytes()) != digest:
            return False
    return True


def _download_wheel(into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), RELEASE]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(into.glob("deepbet-*.whl"))
    if result.returncode != 0 or not wheels:
        raise SystemExit(
            f"could not download {RELEASE} ({result.stderr.strip()[-500:]}); on a machine"
            " without a package index, copy the wheel here and pass --wheel PATH"
        )
    return wheels[0]


def install(wheel: Path, models_dir: Path = BUNDLE / "models") -> None:
    """Extract and verify both networks from ``wheel``; write each atomically."""
    models_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        for member, (name, digest) in FILES.items():
            data = archive.read(member)
            if _sha256(data) != digest:
                raise SystemExit(
                    f"{wheel.name}: {member} has SHA-256 {_sha256(data)}, expected {digest};"
                    f" use the {RELEASE} wheel"
                )
            partial = models_dir / f".{name}.partial"
            partial.write_bytes(data)
            os.replace(partial, models_dir / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help=f"a downloaded {RELEASE} wheel")
    args = parser.parse_args(argv)
    if installed():
        print(f"mr_brain_extraction: deepbet networks already installed in {BUNDLE / 'models'}")
        return 0
    if args.wheel is not None:
        install(args.wheel)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            install(_download_wheel(Path(tmp)))
    print(f"mr_brain_extraction: installed deepbet networks ({RELEASE}) in {BUNDLE / 'models'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
