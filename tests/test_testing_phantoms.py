"""`python -m service.testing ct`: the CT it writes is the anatomy the reference model knows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from service import testing
from service.pipeline.volume import load_series
from service.testing import (
    CTPhantom,
    cli_ct_phantom,
    main,
    make_ct_phantom,
    organ_volumes_ml,
    write_ct_series,
)


def stored_hu(hu: np.ndarray) -> np.ndarray:
    """HU as the series stores them (clipped, rounded as stored values, intercept -1024)."""
    return np.rint(np.clip(hu, -1024, 3071) + 1024) - 1024


def test_ct_command_writes_the_labelled_phantom_the_reference_model_was_trained_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command wrote a phantom scaled to the image box: on 512 x 512 x 120 the
    reference model found a 1665 mL liver where 595 mL were, and no spleen or kidneys
    (acceptance test). It must write make_ct_phantom's adult anatomy, in mm."""
    out = tmp_path / "ct"
    assert main(["ct", str(out), "--slices", "24", "--rows", "64", "--seed", "123"]) == 0

    volume = load_series(sorted(out.iterdir()))
    expected = cli_ct_phantom(seed=123, rows=64, slices=24)
    np.testing.assert_array_equal(volume.array, stored_hu(expected.hu))
    np.testing.assert_allclose(volume.spacing, expected.spacing, rtol=1e-5)
    # Adult organs over the abdomen the slices cover, whatever the matrix.
    volumes = organ_volumes_ml(expected)
    assert 800 < volumes["liver"] < 2500, volumes
    assert min(volumes.values()) > 30, volumes
    printed = capsys.readouterr().out
    assert "24 CT slices" in printed and f"liver {volumes['liver']:.0f} mL" in printed


def test_only_slices_given_covers_an_abdomen_not_a_metre_of_body() -> None:
    """The seed's 2-5 mm spacing times 300 slices would be 0.6-1.5 m of body."""
    assert cli_ct_phantom(rows=16, slices=300).spacing[2] == pytest.approx(1.0)
    thick = cli_ct_phantom(rows=16, slice_spacing=5.0)
    assert thick.hu.shape[0] == 60
    seeded = cli_ct_phantom(rows=16)  # neither: the seed's own, as in training
    assert 200 <= seeded.hu.shape[0] * seeded.spacing[2] <= 385


def patient_samples(phantom: CTPhantom, ds: pydicom.Dataset) -> np.ndarray:
    """The phantom's HU at the patient position of every pixel of ``ds``."""
    position = np.array(ds.ImagePositionPatient, dtype=float)
    cosines = np.array(ds.ImageOrientationPatient, dtype=float)
    row_step, column_step = (float(v) for v in ds.PixelSpacing)
    r, c = np.mgrid[0 : ds.Rows, 0 : ds.Columns]
    world = (
        position + c[..., None] * column_step * cosines[:3] + r[..., None] * row_step * cosines[3:]
    )
    size = np.array(phantom.hu.shape[::-1])  # x, y, z; the box is centred on the origin
    index = np.rint(world / np.array(phantom.spacing) + (size - 1) / 2).astype(int)
    return phantom.hu[index[..., 2], index[..., 1], index[..., 0]]


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal"])
def test_every_orientation_places_the_phantom_where_its_labels_are(
    tmp_path: Path, orientation: str
) -> None:
    """Reformats are the same volume in the same patient space, so the label map stays
    the ground truth whichever way the series is cut."""
    out = tmp_path / orientation
    args = ["--slices", "10", "--rows", "24", "--columns", "20", "--seed", "5"]
    assert main(["ct", str(out), *args, "--orientation", orientation]) == 0
    phantom = cli_ct_phantom(seed=5, rows=24, columns=20, slices=10)

    files = sorted(out.iterdir())
    assert len(files) == {"axial": 10, "coronal": 24, "sagittal": 20}[orientation]
    for path in files:
        ds = pydicom.dcmread(path)
        written = ds.pixel_array.astype(float) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(written, stored_hu(patient_samples(phantom, ds)))
    assert ("REFORMATTED" in ds.ImageType) == (orientation != "axial")


def test_fixed_phantom_option_keeps_the_scaled_series(tmp_path: Path) -> None:
    """Size and speed tests may still want any matrix in constant memory."""
    out = tmp_path / "fixed"
    assert main(["ct", str(out), "--fixed-phantom", "--slices", "3", "--rows", "32"]) == 0
    reference = write_ct_series(tmp_path / "ref", slices=3, rows=32, columns=32, seed=10000)
    for written, expected in zip(sorted(out.iterdir()), reference, strict=True):
        np.testing.assert_array_equal(
            pydicom.dcmread(written).pixel_array, pydicom.dcmread(expected).pixel_array
        )


@pytest.mark.parametrize("bad", [["--slices", "0"], ["--rows", "-3"], ["--slice-spacing", "0"]])
def test_impossible_sizes_are_refused_with_the_option_named(
    tmp_path: Path, bad: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["ct", str(tmp_path / "x"), *bad])
    assert exited.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_building_in_blocks_keeps_each_seed_s_phantom(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference models were trained on given seeds: building the phantom a block of
    slices at a time (to bound memory) must not change a single voxel."""
    whole = make_ct_phantom(seed=11, rows=40, slices=17)
    monkeypatch.setattr(testing, "_PHANTOM_BLOCK_VOXELS", 3 * 40 * 40)
    blocks = make_ct_phantom(seed=11, rows=40, slices=17)
    for field in ("hu", "clean", "labels"):
        np.testing.assert_array_equal(getattr(whole, field), getattr(blocks, field))
