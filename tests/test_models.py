"""The reference bundles in ``models/`` load, run as radnode runs them, and still work.

Each shipped bundle runs exactly as a radnode worker runs it (``load_bundle`` then
``run_bundle``) on held-out synthetic data written as DICOM by ``service.testing`` and
read back by ``service.pipeline.volume``. Thresholds sit a little below the figures in
each model card, which were measured on more held-out data.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.pipeline.bundle import load_bundle, read_bundle_spec
from service.pipeline.inference import run_bundle
from service.pipeline.result import PipelineResult
from service.pipeline.volume import Volume, load_series
from service.testing import (
    CT_PHANTOM_LABELS,
    CTPhantom,
    make_ct_phantom,
    make_radiograph,
    write_ct_phantom,
    write_radiograph,
)

MODELS = Path(__file__).resolve().parents[1] / "models"
BUNDLES = (
    "ct_abdomen_segmentation",
    "cxr_nodule_classification",
    "ct_lowdose_denoising",
    "mr_brain_extraction",
)
SNOMED = {
    "10200004": "Liver",
    "78961009": "Spleen",
    "9846003": "Right kidney",
    "18639004": "Left kidney",
    "64033007": "Kidney",
    "123037004": "Anatomical Structure",
    "427359005": "Solitary nodule of lung",
    "786838002": "Pulmonary nodule",
    "404684003": "Finding",
    "128319008": "Intracranial structure",
}


def run(name: str, volume: Volume) -> PipelineResult:
    """The shipped bundle on a volume, exactly as a radnode worker runs it."""
    return run_bundle(load_bundle(read_bundle_spec(MODELS / name), "cpu"), volume)


@pytest.fixture(scope="module", params=BUNDLES)
def metadata(request: pytest.FixtureRequest) -> dict[str, Any]:
    return json.loads((MODELS / request.param / "configs" / "metadata.json").read_text())


def test_metadata_has_monai_keys_and_a_radnode_section_with_valid_codes(
    metadata: dict[str, Any],
) -> None:
    for key in ("version", "changelog", "monai_version", "pytorch_version", "name", "task"):
        assert metadata[key], key
    assert "channel_def" in metadata["network_data_format"]["inputs"]["image"]
    assert "channel_def" in metadata["network_data_format"]["outputs"]["pred"]
    section = metadata["radnode"]
    assert section["task"] in ("segmentation", "classification", "reconstruction")
    assert section["input"]["dimensions"] in (2, 3)
    assert section["input"]["modalities"]
    for label in section["labels"]:
        for concept in (label["finding"], label["category"]):
            assert concept["scheme"] == "SCT"
            assert SNOMED[concept["value"]].lower() == concept["meaning"].lower()
    if section["task"] == "segmentation":
        values = [label["value"] for label in section["labels"]]
        assert values == list(range(1, len(values) + 1))
    if section["task"] == "classification":
        assert section["heatmap"]["target_layer"]


# --- the labelled phantom the CT models learn from -----------------------------------


def test_ct_phantom_is_seeded_varied_and_written_with_its_geometry(tmp_path: Path) -> None:
    a, b = make_ct_phantom(seed=3, rows=64), make_ct_phantom(seed=3, rows=64)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.labels, b.labels)
    other = make_ct_phantom(seed=4, rows=64)
    assert a.spacing != other.spacing or a.hu.shape != other.hu.shape
    for value, (low, high) in {1: (50, 70), 2: (40, 57), 3: (23, 41), 4: (23, 41)}.items():
        assert low < float(np.median(a.clean[a.labels == value])) < high, value
    # Perirenal fat: most of each kidney's in-plane rim is fat, as in a real abdomen.
    for kidney in (3, 4):
        inside = a.labels == kidney
        rim = np.zeros_like(inside)
        for axis in (1, 2):
            for shift in (-1, 1):
                rim |= np.roll(inside, shift, axis=axis)
        rim &= ~inside & (a.labels == 0)
        assert np.mean(a.clean[rim] < -50) > 0.5, kidney

    volume = load_series(write_ct_phantom(tmp_path, a))
    assert volume.array.shape == a.hu.shape
    np.testing.assert_allclose(volume.spacing, a.spacing, rtol=1e-5)
    stored = np.rint(np.clip(a.hu, -1024, 3071) + 1024)  # intercept -1024, as written
    np.testing.assert_array_equal(volume.array, stored - 1024)


# --- segmentation ----------------------------------------------------------------------


def dice(pred: np.ndarray, truth: np.ndarray, value: int) -> float:
    a, b = pred == value, truth == value
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def test_segmentation_finds_the_organs_of_a_held_out_dicom_phantom(tmp_path: Path) -> None:
    phantom = make_ct_phantom(seed=10100, rows=160)  # seeds >= 10000 are never trained on
    volume = load_series(write_ct_phantom(tmp_path, phantom))

    labels = run("ct_abdomen_segmentation", volume).label_map

    assert labels is not None and labels.shape == phantom.labels.shape
    scores = {name: dice(labels, phantom.labels, v) for v, name in CT_PHANTOM_LABELS.items()}
    assert min(scores.values()) >= 0.90, scores  # the project's target, per organ


def test_segmentation_refuses_a_series_covering_part_of_the_abdomen(tmp_path: Path) -> None:
    """On the lower 150 mm of an abdomen the model marked liver and spleen in the pelvis
    and the node reported them as final (second acceptance pass). It was trained on
    200-380 mm; its metadata says so, and a shorter series is refused with the reason
    before the model runs. The same phantom over 250 mm passes the check."""
    from types import SimpleNamespace

    from service.pipeline.inference import InputMismatch, check_input

    spec = read_bundle_spec(MODELS / "ct_abdomen_segmentation")
    assert spec.min_extent_mm == 200
    bundle = SimpleNamespace(spec=spec)
    for slices, refused in ((60, True), (100, False)):
        phantom = make_ct_phantom(seed=10101, rows=64, slices=slices, slice_spacing=2.5)
        volume = load_series(write_ct_phantom(tmp_path / str(slices), phantom))
        if refused:
            with pytest.raises(InputMismatch, match=r"at least 200 mm; the series covers 150 mm"):
                check_input(bundle, volume)  # type: ignore[arg-type]
        else:
            check_input(bundle, volume)  # type: ignore[arg-type]


# --- classification --------------------------------------------------------------------


def test_nodule_classifier_separates_held_out_radiographs() -> None:
    bundle = load_bundle(read_bundle_spec(MODELS / "cxr_nodule_classification"), "cpu")
    probabilities, truth = [], []
    for seed in range(200000, 200024):  # held out: training used 0..1999
        with_nodule = seed % 2 == 0
        ds = make_radiograph(
            rows=384, columns=320, seed=seed, with_nodule=with_nodule, vary_anatomy=True
        )
        result = run_bundle(bundle, load_series([ds]))
        assert result.probabilities is not None and len(result.probabilities) == 1
        probabilities.append(result.probabilities[0])
        truth.append(with_nodule)
    p, t = np.array(probabilities), np.array(truth)
    assert ((p >= 0) & (p <= 1)).all()
    # AUC as the chance that a nodule image outranks a clear one
    auc = float(np.mean(p[t][:, None] > p[~t][None, :]))
    assert auc >= 0.95, (auc, p.round(2).tolist())


def test_classifier_takes_a_full_size_monochrome1_radiograph_and_gives_a_heatmap(
    tmp_path: Path,
) -> None:
    path = write_radiograph(
        tmp_path / "xr.dcm", photometric="MONOCHROME1", with_nodule=True, seed=7, bits_stored=12
    )
    volume = load_series([path])
    assert volume.array.shape == (1, 2000, 2000)

    result = run("cxr_nodule_classification", volume)

    assert result.probabilities is not None and 0.0 <= result.probabilities[0] <= 1.0
    assert result.heatmap is not None and result.heatmap.shape == (1, 2000, 2000)
    assert np.isfinite(result.heatmap).all() and result.heatmap.max() > 0
    # The heatmap is hot where the nodule is (MONAI's default CAM postprocessing had
    # flipped it: the acceptance run found it coldest on the nodule).
    clear = load_series([write_radiograph(tmp_path / "clear.dcm", photometric="MONOCHROME1",
                                          seed=7, bits_stored=12)])  # fmt: skip
    nodule = np.abs(volume.array - clear.array) > 0
    assert nodule.any()
    at_nodule = float(np.mean(result.heatmap[nodule]))
    assert at_nodule > np.percentile(result.heatmap, 90), at_nodule


# --- reconstruction (denoising) --------------------------------------------------------


def _lowdose_module() -> Any:
    path = MODELS / "ct_lowdose_denoising" / "scripts" / "lowdose.py"
    spec = importlib.util.spec_from_file_location("radnode_lowdose", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bilateral(volume: np.ndarray, spacing, *, domain_mm: float, range_hu: float) -> np.ndarray:
    """SimpleITK's bilateral filter slice by slice: the classical filter to beat."""
    import SimpleITK as sitk

    out = np.empty_like(volume)
    for k, plane in enumerate(volume):
        image = sitk.GetImageFromArray(plane)
        image.SetSpacing((float(spacing[0]), float(spacing[1])))
        filtered = sitk.Bilateral(image, domainSigma=domain_mm, rangeSigma=range_hu)
        out[k] = sitk.GetArrayFromImage(filtered)
    return out


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    a, b = (np.clip(x, -1000, 1000) for x in (image, reference))
    return float(10 * np.log10(2000.0**2 / np.mean((a - b) ** 2)))


def test_denoiser_improves_a_held_out_low_dose_series_in_hu(tmp_path: Path) -> None:
    lowdose = _lowdose_module()
    phantom = make_ct_phantom(seed=20100, rows=256, noise_hu=0.0, slice_spacing=5.0)
    middle = phantom.clean.shape[0] // 2
    truth = phantom.clean[middle - 1 : middle + 1]
    low, full = lowdose.simulate_low_dose(truth, phantom.spacing[0], 8e4, seed=1)
    series = CTPhantom(hu=low, labels=phantom.labels[:2], clean=truth, spacing=phantom.spacing)
    volume = load_series(write_ct_phantom(tmp_path, series))

    denoised = run("ct_lowdose_denoising", volume).image

    assert denoised is not None and denoised.shape == low.shape
    stored = volume.array.astype(np.float32)  # the low-dose input as written (integer HU)
    gain = psnr(denoised, full) - psnr(stored, full)
    assert gain > 4.0, gain
    filtered = bilateral(stored, phantom.spacing, domain_mm=2.0, range_hu=100.0)
    assert psnr(denoised, full) > psnr(filtered, full), (psnr(denoised, full), psnr(filtered, full))
    body = truth > -500
    assert abs(float(denoised[body].mean() - full[body].mean())) < 15  # HU, not scaled
