"""A published network on a real scan, through the whole node: deepbet on Colin27.

The Colin27 T1 head MR (Debian's ``mricron-data``) is written as a DICOM MR series and
sent to ``radnode serve`` on its default (reference) routes, with a real Orthanc as the
PACS and python-hl7's MLLP server as the RIS. The SEG that reaches Orthanc is read back
and placed into the NIfTI grid using only the SEG's own geometry (Image Position and
Orientation of each frame, Pixel Spacing), then compared with ``ch2bet``, the brain
extraction that ships with Colin27. Needs the deepbet networks installed in the bundle
(``models/mr_brain_extraction/scripts/install_weights.py``, part of the README's test
command); without them the test fails and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from service.testing_mr import COLIN27, COLIN27_BRAIN, write_mr_series
from tests.conftest import require_tool, storescu
from tests.support.orthanc import orthanc_get

pytestmark = pytest.mark.integration

MODELS = Path(__file__).resolve().parents[1] / "models"
BUNDLE = MODELS / "mr_brain_extraction"
STUDY_UID = "1.2.826.0.1.3680043.8.498.27"


@pytest.fixture(scope="module")
def colin27(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    assert COLIN27.is_file() and COLIN27_BRAIN.is_file(), (
        "Colin27 is missing: apt-get install mricron-data (.ci/install-system-packages)"
    )
    assert (BUNDLE / "models" / "model.ts").is_file(), (
        f"deepbet networks not installed: python {BUNDLE}/scripts/install_weights.py"
    )
    return write_mr_series(COLIN27, tmp_path_factory.mktemp("colin27"), study_uid=STUDY_UID,
                           accession_number="ACC-BRAIN-1")  # fmt: skip


def test_colin27_series_puts_every_voxel_where_the_nifti_has_it(colin27: list[Path]) -> None:
    import nibabel as nib

    from service.pipeline.volume import load_series

    volume = load_series(colin27)
    nifti = nib.as_closest_canonical(nib.load(str(COLIN27)))
    # [slice, row, column] with columns to the patient's left, rows to posterior
    assert np.array_equal(volume.array.transpose(2, 1, 0)[::-1, ::-1, :], nifti.get_fdata())
    assert volume.spacing == pytest.approx(nifti.header.get_zooms()[:3])
    assert volume.modality == "MR"
    corner = nifti.affine @ [0, 0, 0, 1]  # RAS of voxel (0, 0, 0): last row, last column
    first = dcmread(colin27[0], stop_before_pixels=True)
    far = np.array(first.ImagePositionPatient, float) + np.array(
        [(first.Columns - 1) * 1.0, (first.Rows - 1) * 1.0, 0.0]
    )
    assert far == pytest.approx([-corner[0], -corner[1], corner[2]])


def mask_from_seg(seg_path: Path, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The SEG's brain frames placed into a NIfTI grid by the SEG's own geometry."""
    seg = dcmread(seg_path)
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    row_spacing, column_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    r, c = np.mgrid[0 : seg.Rows, 0 : seg.Columns]
    to_voxel = np.linalg.inv(affine)
    mask = np.zeros(shape, dtype=bool)
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        identification = group if "SegmentIdentificationSequence" in group else shared
        assert identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber == 1
        position = np.array(group.PlanePositionSequence[0].ImagePositionPatient, float)
        hits = frame > 0
        lps = (
            position[:, None]
            + orientation[:3, None] * (c[hits] * column_spacing)[None]
            + orientation[3:, None] * (r[hits] * row_spacing)[None]
        )
        ras = np.vstack([-lps[0], -lps[1], lps[2], np.ones(lps.shape[1])])
        ijk = np.rint(to_voxel @ ras)[:3].astype(int)
        mask[ijk[0], ijk[1], ijk[2]] = True
    return mask


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120
    )
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


def test_colin27_brain_is_extracted_and_delivered_to_pacs_and_ris(
    radnode_factory, orthanc, listener_factory, colin27: list[Path], tmp_path: Path
) -> None:
    import nibabel as nib

    ris = listener_factory("AA")
    destinations = [
        {"name": "pacs", "type": "dicom", "host": "127.0.0.1", "port": orthanc["port"],
         "ae_title": "ORTHANC", "backoff_s": 0.2},
        {"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": ris.port, "backoff_s": 0.2},
    ]  # fmt: skip
    reference = json.dumps(
        [{"name": "mr-brain", "pipeline": "mr_brain_extraction",
          "match": {"Modality": "MR"}, "destinations": ["pacs", "ris"]}]
    )  # fmt: skip
    node = radnode_factory(
        RADNODE_MODELS__DIR=str(MODELS),
        RADNODE_ROUTES=reference,
        RADNODE_DESTINATIONS=json.dumps(destinations),
    ).start()
    assert storescu(node.port, colin27).returncode == 0
    (finished,) = node.wait_for_event("job.recorded", timeout=300)
    assert finished["state"] == "done", finished
    node.wait_for_event("dicom.sent", timeout=120)
    node.wait_for_event("hl7.sent", timeout=120)

    # What reached the PACS: the results, in Colin27's study.
    (study,) = [s for s in orthanc_get(orthanc["http"], "/studies?expand")
                if s["MainDicomTags"]["StudyInstanceUID"] == STUDY_UID]  # fmt: skip
    files: dict[str, Path] = {}
    for series in study["Series"]:
        info = orthanc_get(orthanc["http"], f"/series/{series}")
        modality = info["MainDicomTags"]["Modality"]
        instance = info["Instances"][0]
        path = tmp_path / f"{modality}.dcm"
        with urllib.request.urlopen(f"{orthanc['http']}/instances/{instance}/file") as answer:
            path.write_bytes(answer.read())
        files[modality] = path
    assert {"SEG", "SR", "OT"} <= set(files), files

    source = nib.load(str(COLIN27))
    truth = np.asarray(nib.load(str(COLIN27_BRAIN)).dataobj) > 0
    brain = mask_from_seg(files["SEG"], source.shape, source.affine)
    dice = 2 * (brain & truth).sum() / (brain.sum() + truth.sum())
    assert dice >= 0.90, f"Dice {dice:.3f} against ch2bet"

    # The SR's brain volume is the SEG's, in mL (1 mm voxels).
    sr = dcmread(files["SR"])
    volumes = [
        item
        for item in _walk(sr.ContentSequence)
        if getattr(item, "ValueType", "") == "NUM"
        and item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "mL"
    ]
    assert volumes, "no volume in mL in the SR"
    volume_ml = float(volumes[0].MeasuredValueSequence[0].NumericValue)
    assert volume_ml == pytest.approx(brain.sum() / 1000.0, rel=0.01)

    for modality in ("SEG", "SR", "OT"):
        assert dciodvfy_errors(files[modality]) == [], modality

    # The RIS got the same result as text.
    (message,) = ris.received
    assert STUDY_UID in message and "ACC-BRAIN-1" in message
    assert any(line.startswith("OBX|") and "mL^milliliter^UCUM" in line
               for line in message.split("\r")), message  # fmt: skip


def _walk(items):
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def test_default_routes_send_a_t1_head_series_to_brain_extraction(colin27: list[Path]) -> None:
    from tests.conftest import RADNODE

    env = {k: v for k, v in os.environ.items() if k != "RADNODE_ROUTES"}
    shown = subprocess.run(
        [str(RADNODE), "route", str(colin27[0].parent)],
        env={**env, "RADNODE_MODELS__DIR": str(MODELS)}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "+ mr-brain-extraction: run mr_brain_extraction" in shown.stdout, shown.stdout
    assert "+ ct-abdomen-organs" not in shown.stdout
