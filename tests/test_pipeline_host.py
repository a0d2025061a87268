"""The pipeline host runs MONAI Bundles as shipped, on DICOM series, in the source geometry.

The model-zoo style bundle's weights are seeded random values (nothing can be downloaded
here), so its correctness is checked against MONAI's own file path: the same bundle with
its own LoadImaged reading the same DICOM folder (MONAI's PydicomReader). A 1x1x1
threshold network in the same bundle layout checks the geometry against a known
synthetic structure (the phantom's bone).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import decollate_batch, list_data_collate

from service.pipeline.bundle import BundleError, load_bundle, read_bundle_spec
from service.pipeline.inference import InputMismatch, PipelineFailed, run_bundle
from service.pipeline.result import TaskKind
from service.pipeline.volume import SeriesRefused, load_series
from service.testing import write_ct_series, write_radiograph
from tests.support.bundles import (
    SPLEEN_METADATA,
    THRESHOLD,
    spleen_inference_config,
    write_bundle,
    write_classifier_bundle,
    write_threshold_bundle,
    write_zoo_spleen_bundle,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_zoo_spleen_bundle(root)
    write_threshold_bundle(root)
    write_classifier_bundle(root)
    return root


def small_ct(out: Path, orientation: str = "axial") -> list[Path]:
    return write_ct_series(
        out, slices=40, rows=96, columns=96, pixel_spacing=(3.0, 3.0), slice_thickness=3.0,
        orientation=orientation,
    )  # fmt: skip


def monai_reference(bundle_dir: Path, series_dir: Path) -> np.ndarray:
    """The bundle run the way MONAI itself runs it: LoadImaged reads the DICOM folder."""
    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "inference.json"))
    config = parser.get()
    config["preprocessing"]["transforms"][0]["reader"] = "PydicomReader"
    config["postprocessing"]["transforms"].pop()  # SaveImaged: nothing to write here
    parser.set(config)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle_dir / "models" / "model.pt"))
    network.eval()
    item = parser.get_parsed_content("preprocessing")({"image": str(series_dir)})
    batch = list_data_collate([item])
    with torch.no_grad():
        batch["pred"] = parser.get_parsed_content("inferer")(batch["image"], network)
    (output,) = decollate_batch(batch)
    return parser.get_parsed_content("postprocessing")(output)["pred"][0].numpy()


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal"])
def test_zoo_bundle_runs_unmodified_and_matches_monai_own_reader(
    models: Path, tmp_path: Path, orientation: str
) -> None:
    series = small_ct(tmp_path / "ct", orientation)
    spec = read_bundle_spec(models / "spleen_ct_segmentation")
    assert not spec.has_radnode_section
    assert spec.identity.kind is TaskKind.SEGMENTATION
    assert [label.name for label in spec.labels] == ["spleen"]
    bundle = load_bundle(spec, torch.device("cpu"))
    assert type(bundle.preprocessing.transforms[0]).__name__ == "HandOverd"
    assert set(bundle.swapped) == {
        "preprocessing:LoadImaged",
        "postprocessing:SaveImaged",
        "postprocessing:AsDiscreted:argmax",  # service.pipeline.argmax: same labels
    }
    volume = load_series(series)
    result = run_bundle(bundle, volume)
    assert result.label_map is not None
    assert result.label_map.shape == volume.array.shape
    ours = result.label_map.transpose(2, 1, 0)  # back to MONAI's (x, y, z)
    reference = monai_reference(models / "spleen_ct_segmentation", tmp_path / "ct")
    assert reference.shape == ours.shape
    assert (reference == ours).mean() > 0.999


@pytest.mark.parametrize("orientation", ["axial", "sagittal"])
def test_mask_lands_on_the_known_structure_in_source_geometry(
    models: Path, tmp_path: Path, orientation: str
) -> None:
    volume = load_series(small_ct(tmp_path / "ct", orientation))
    result = run_bundle(load_bundle(read_bundle_spec(models / "bone_threshold")), volume)
    scaled = np.clip((volume.array.astype(np.float64) + 57) / 221, 0, 1)
    truth = scaled > THRESHOLD
    predicted = result.label_map == 1

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    assert truth.sum() > 1000
    assert dice(predicted, truth) > 0.85
    # a geometry mistake (a flipped axis) would match far worse, on every axis along
    # which the structure is not symmetric (the phantom's spine runs the whole length)
    asymmetric = [axis for axis in range(3) if dice(np.flip(truth, axis), truth) < 0.7]
    assert asymmetric
    for axis in asymmetric:
        assert dice(np.flip(predicted, axis), truth) < 0.7


@pytest.mark.parametrize(
    "options",
    [
        {"argmax": True},
        {"argmax": True, "to_onehot": 4},
        {"argmax": True, "keepdim": False, "dtype": torch.uint8},
        {"threshold": 0.5},  # no argmax: MONAI's path as it is
    ],
)
def test_radnode_as_discrete_gives_monai_output(options: dict) -> None:
    from monai.data import MetaTensor
    from monai.transforms import AsDiscrete as MonaiAsDiscrete
    from monai.transforms import AsDiscreted as MonaiAsDiscreted

    from service.pipeline.argmax import AsDiscrete, AsDiscreted

    generator = torch.Generator().manual_seed(7)
    logits = torch.randint(0, 3, (4, 9, 8, 7), generator=generator).float()  # many ties
    logits[:, 0, 0, 0] = 1.0  # every channel equal: the first one wins in both
    affine = torch.diag(torch.tensor([0.7, 0.8, 2.5, 1.0], dtype=torch.float64))
    image = MetaTensor(logits, affine=affine)
    for ours, theirs in (
        (AsDiscrete(**options)(image), MonaiAsDiscrete(**options)(image)),
        (
            AsDiscreted("pred", **options)({"pred": image})["pred"],
            MonaiAsDiscreted("pred", **options)({"pred": image})["pred"],
        ),
    ):
        assert type(ours) is type(theirs)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert torch.equal(ours, theirs)
        assert torch.equal(ours.affine, theirs.affine)
    as_numpy = logits.numpy()
    assert np.array_equal(AsDiscrete(**options)(as_numpy), MonaiAsDiscrete(**options)(as_numpy))


def test_classifier_runs_on_a_large_monochrome1_radiograph(models: Path, tmp_path: Path) -> None:
    path = write_radiograph(
        tmp_path / "cxr.dcm", rows=2000, columns=1800, bits_stored=12, photometric="MONOCHROME1"
    )
    volume = load_series([path])
    spec = read_bundle_spec(models / "cxr_test_classifier")
    bundle = load_bundle(spec)
    assert "postprocessing:AsDiscreted" in bundle.swapped  # probabilities are kept
    result = run_bundle(bundle, volume)
    assert result.kind is TaskKind.CLASSIFICATION
    assert result.probabilities is not None and len(result.probabilities) == 1
    assert 0.0 <= result.probabilities[0] <= 1.0
    assert result.labels[0].finding is not None and result.labels[0].finding.scheme == "SCT"
    assert result.heatmap is not None, result.notes
    assert result.heatmap.shape == volume.array.shape == (1, 2000, 1800)
    assert result.heatmap.min() >= 0.0 and result.heatmap.max() <= 1.0


def test_series_the_bundle_was_not_made_for_is_refused_with_a_reason(
    models: Path, tmp_path: Path
) -> None:
    radiograph = load_series([write_radiograph(tmp_path / "cxr.dcm", rows=256, columns=256)])
    spleen = load_bundle(read_bundle_spec(models / "spleen_ct_segmentation"))
    with pytest.raises(InputMismatch, match="expects modality CT"):
        run_bundle(spleen, radiograph)
    single = load_series(small_ct(tmp_path / "ct")[:1])
    with pytest.raises(InputMismatch, match="needs a 3D volume"):
        run_bundle(spleen, single)


def test_inconsistent_series_is_refused_with_its_reason(tmp_path: Path) -> None:
    series = small_ct(tmp_path / "ct")
    with pytest.raises(SeriesRefused) as refused:
        load_series(series[:10] + series[11:])  # a missing slice
    assert "missing" in refused.value.reason.lower() or "spacing" in refused.value.reason.lower()


def test_broken_bundles_are_named_with_what_to_fix(models: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(models / "spleen_ct_segmentation", broken)
    (broken / "models" / "model.pt").unlink()
    with pytest.raises(BundleError, match=r"no models/model\.pt"):
        read_bundle_spec(broken)
    shutil.copy(models / "cxr_test_classifier" / "models" / "model.pt", broken / "models")
    with pytest.raises(BundleError, match=r"does not fit network_def \((Missing|Unexpected) key"):
        load_bundle(read_bundle_spec(broken))


# --- bringing a coarse label map back to the source grid ----------------------------


def _grids(rotate: bool = False):
    from monai.data import MetaTensor

    rng = np.random.default_rng(1)
    coarse = np.diag([3.0, 3.0, 3.0, 1.0])
    coarse[:3, 3] = [-60.213, -55.731, -40.117]  # no sample falls on a tie
    labels = rng.integers(0, 5, (1, 40, 38, 30)).astype(np.float32)
    source = np.diag([-0.7, -0.7, 1.25, 1.0])  # an axial series: x and y flipped in RAS
    source[:3, 3] = [59.031, 60.347, -45.009]
    if rotate:
        c, s = np.cos(0.3), np.sin(0.3)
        source[:3, :3] = source[:3, :3] @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    prediction = MetaTensor(torch.as_tensor(labels), affine=torch.as_tensor(coarse))
    reference = MetaTensor(torch.zeros(1, 171, 165, 90), affine=torch.as_tensor(source))
    return prediction, reference


def test_nearest_resampling_by_index_equals_monai_on_an_aligned_grid() -> None:
    from monai.transforms import ResampleToMatch

    from service.pipeline.inference import _nearest_on_aligned_grid

    prediction, reference = _grids()
    expected = ResampleToMatch(mode="nearest", padding_mode="zeros")(prediction, reference)
    fast = _nearest_on_aligned_grid(prediction, reference)
    assert fast is not None
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(expected))
    assert 0 < float((np.asarray(fast) == 0).mean()) < 1  # part of the source is outside


def test_nearest_resampling_shrinks_an_axis_before_it_grows_another() -> None:
    """A 3 mm grid 1433 slices long brought back to 1000 x 512 x 512 (4.3 mm slices):
    z goes down to 1000 before y goes up to 512, so the job never holds the 1433 x 512 x
    512 intermediate (issue 11's memory target); x, the single-voxel gather, first."""
    from service.pipeline.inference import _take_order

    order = _take_order((1433, 120, 120), [1000, 512, 512])
    assert order.index(0) < order.index(1)
    assert order[0] == 2
    # and growing z (thin slices), every order holds the output: x is still first
    assert _take_order((267, 120, 120), [1000, 512, 512])[0] == 2


def test_nearest_resampling_by_index_declines_a_rotated_grid() -> None:
    from service.pipeline.inference import _nearest_on_aligned_grid

    assert _nearest_on_aligned_grid(*_grids(rotate=True)) is None


# --- handing the volume over in the bundle's own axes -------------------------------


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal"])
def test_volume_handed_over_in_bundle_axes_is_what_orientationd_makes(
    tmp_path: Path, orientation: str
) -> None:
    from monai.transforms import EnsureChannelFirstd, Orientationd

    from service.pipeline.inference import source_grid, volume_to_metatensor

    volume = load_series(small_ct(tmp_path / "ct", orientation))
    to_ras = Orientationd(keys="image", axcodes="RAS")
    channel = EnsureChannelFirstd(keys="image")
    expected = to_ras(channel({"image": volume_to_metatensor(volume, 3)}))["image"]
    handed = channel({"image": volume_to_metatensor(volume, 3, "RAS")})["image"]
    np.testing.assert_array_equal(handed.numpy(), expected.numpy())
    np.testing.assert_allclose(handed.affine.numpy(), expected.affine.numpy(), atol=1e-6)
    # MONAI's Orientationd then has nothing to do: same storage, no second copy
    assert to_ras({"image": handed})["image"].data_ptr() == handed.data_ptr()

    from service.pipeline.inference import _reoriented_exactly

    back = _reoriented_exactly(handed, source_grid(volume, 3))
    assert back is not None
    np.testing.assert_array_equal(back[0].numpy(), volume.array.transpose(2, 1, 0))


@pytest.mark.parametrize("flips", [[], [0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2]])
def test_the_slab_wise_float32_copy_is_the_flipped_volume(flips: list[int]) -> None:
    """Slabs of 3 planes over 10 (the last one short), every combination of flips:
    the same voxels as one ``flip`` and ``float`` of the whole view."""
    import torch

    from service.pipeline.inference import _float32_copy

    stored = torch.arange(10 * 6 * 7, dtype=torch.int16).reshape(10, 6, 7) - 200
    view = stored.permute(2, 1, 0)  # (x, y, z) over the (z, y, x) array, as handed over
    plane = 7 * 6 * 2
    copied = _float32_copy(view, flips, chunk_bytes=3 * plane)
    expected = (view.flip(flips) if flips else view).to(torch.float32)
    assert copied.dtype == torch.float32 and copied.is_contiguous()
    assert torch.equal(copied, expected)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_slab_wise_resampling_gives_monais_voxels(
    monkeypatch: pytest.MonkeyPatch, align_corners: bool, mode: str
) -> None:
    """An oblique, anisotropic resample in slabs of 7 output rows (the last one short):
    every voxel equal to MONAI's own AffineTransform, and Spacingd through the installed
    class equal to MONAI's Spacingd, geometry included (bilinear Spacingd of an image
    without rotation is separable: equal to float rounding, see the next test)."""
    import monai.transforms.spatial.functional as functional
    import torch
    from monai.data import MetaTensor
    from monai.networks.layers import AffineTransform
    from monai.transforms import Spacingd

    from service.pipeline import resample

    monkeypatch.setattr(resample, "SLAB_GRID_BYTES", 16 * 90 * 40 * 7)
    image = torch.randn(1, 1, 60, 50, 40, generator=torch.Generator().manual_seed(3))
    theta = torch.tensor(
        [[0.9, 0.05, 0.0, 3.0], [0.0, 1.1, 0.1, -2.0], [0.02, 0.0, 2.5, 1.0], [0, 0, 0, 1]]
    )
    options = {"normalized": False, "mode": mode, "padding_mode": "zeros",
               "align_corners": align_corners, "reverse_indexing": True}  # fmt: skip
    expected = AffineTransform(**options)(image, theta, spatial_size=(130, 90, 40))
    got = resample.SlabAffineTransform(**options)(image, theta, spatial_size=(130, 90, 40))
    assert torch.equal(got, expected)

    volume = MetaTensor(image[0], affine=torch.diag(torch.tensor([0.7, 0.8, 2.5, 1.0])))
    spacing = Spacingd(keys="image", pixdim=(0.5, 0.6, 0.9), mode=mode)
    monai_own = spacing({"image": volume.clone()})["image"]
    monkeypatch.setattr(functional, "AffineTransform", resample.SlabAffineTransform)
    slab_wise = spacing({"image": volume.clone()})["image"]
    if mode == "nearest":
        assert torch.equal(slab_wise.as_tensor(), monai_own.as_tensor())
    else:
        torch.testing.assert_close(slab_wise.as_tensor(), monai_own.as_tensor())
    assert torch.equal(slab_wise.affine, monai_own.affine)


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("align_corners", [True, False])
def test_axis_aligned_bilinear_resampling_is_separable_and_equal_to_grid_sample(
    monkeypatch: pytest.MonkeyPatch, padding: str, align_corners: bool
) -> None:
    """Scales, shifts and flips per axis (what Spacingd and Invertd do to an image in
    RAS), up and down, reaching past the input's edges: the separable path gives
    grid_sample's voxels to float rounding; it is taken where the output is not much
    smaller than the input (up, same size), the grid where it is (down)."""
    import torch
    from monai.networks.layers import AffineTransform

    from service.pipeline import resample

    monkeypatch.setattr(resample, "SEPARABLE_SLAB_BYTES", 4 * 2 * 29 * 40 * 3)  # 3-row slabs
    generator = torch.Generator().manual_seed(7)
    options = {"normalized": False, "mode": "bilinear", "padding_mode": padding,
               "align_corners": align_corners, "reverse_indexing": True}  # fmt: skip
    taken = []
    separable = resample._resample_separable
    monkeypatch.setattr(
        resample, "_resample_separable", lambda *a: taken.append(1) or separable(*a)
    )
    for case, size in enumerate([(39, 29, 40), (11, 12, 9), (23, 31, 17)]):
        image = torch.randn(1, 2, 23, 31, 17, generator=generator)
        theta = torch.eye(4)
        scales = torch.rand(3, generator=generator) * 2 + 0.3
        scales[case] = -scales[case]  # a flip
        theta[0, 0], theta[1, 1], theta[2, 2] = scales
        theta[:3, 3] = torch.randn(3, generator=generator) * 3
        expected = AffineTransform(**options)(image, theta, spatial_size=size)
        got = resample.SlabAffineTransform(**options)(image, theta, spatial_size=size)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(taken) == 2  # not for (11, 12, 9): the grid samples fewer voxels


def test_the_loader_hands_the_input_over_so_it_can_be_freed() -> None:
    """``LoadImaged`` becomes HandOverd: the preprocessing gets the item, the caller's
    dictionary is emptied, so the float32 input goes as soon as Spacingd replaces it."""
    import gc
    import weakref

    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose, EnsureChannelFirstd, Spacingd

    from service.pipeline.handover import HandOverd

    image = MetaTensor(torch.ones(40, 40, 40), affine=torch.eye(4))
    image.meta["original_channel_dim"] = float("nan")
    alive = weakref.ref(image)
    item = {"image": image, "other": 1}
    del image
    preprocessing = Compose(
        [HandOverd(keys="image"), EnsureChannelFirstd(keys="image"),
         Spacingd(keys="image", pixdim=(2.0, 2.0, 2.0))]
    )  # fmt: skip
    out = preprocessing(item)
    gc.collect()
    assert item == {}
    assert out["other"] == 1 and tuple(out["image"].shape) == (1, 20, 20, 20)
    assert alive() is None  # nothing holds the input any more


def test_exact_reorientation_declines_grids_that_are_not_a_permutation() -> None:
    from service.pipeline.inference import _reoriented_exactly

    prediction, reference = _grids()  # 3 mm against 0.7 mm: a resampling, not a reorientation
    assert _reoriented_exactly(prediction, reference) is None


def test_only_an_orientation_before_any_grid_change_is_done_while_converting(
    models: Path,
) -> None:
    from monai.transforms import Compose, Orientationd, Spacingd

    from service.pipeline.inference import input_axcodes

    bundle = load_bundle(read_bundle_spec(models / "spleen_ct_segmentation"))
    assert input_axcodes(bundle) == "RAS"
    spacing_first = Compose(
        [Spacingd(keys="image", pixdim=(2.0, 2.0, 2.0)), Orientationd(keys="image", axcodes="RAS")]
    )
    object.__setattr__(bundle, "preprocessing", spacing_first)
    assert input_axcodes(bundle) is None


def test_a_model_that_outputs_nan_fails_instead_of_reporting_nothing_found(
    tmp_path: Path,
) -> None:
    """NaN weights (a broken checkpoint, fp16 overflow): argmax made it an empty label
    map, reported as "0 mL" (found by review). The job fails and says why."""
    conv = torch.nn.Conv3d(1, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.fill_(float("nan"))
        conv.bias.fill_(float("nan"))
    network = {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1}
    bundle_dir = write_bundle(
        tmp_path / "models", "nan_seg", SPLEEN_METADATA, spleen_inference_config(network), conv
    )
    bundle = load_bundle(read_bundle_spec(bundle_dir))
    with pytest.raises(PipelineFailed, match="NaN or infinite"):
        run_bundle(bundle, load_series(small_ct(tmp_path / "ct")))


def test_a_failing_transform_names_its_cause(models: Path, tmp_path: Path) -> None:
    """MONAI wraps a transform's error as "applying transform <object at 0x...>"; the
    operator needs the cause (here: the bundle names a key the data does not have)."""
    bundle = load_bundle(read_bundle_spec(models / "spleen_ct_segmentation"))
    broken = bundle.preprocessing.transforms[-1]
    broken.keys = ("missing_key",)
    try:
        with pytest.raises(PipelineFailed) as failed:
            run_bundle(bundle, load_series(small_ct(tmp_path / "ct")))
    finally:
        bundle.preprocessing.transforms[-1].keys = ("image",)
    message = str(failed.value)
    assert "preprocessing failed" in message and "KeyError" in message, message
    assert "missing_key" in message and "object at 0x" not in message, message


def test_a_loader_that_adds_the_channel_itself_is_honoured(models: Path, tmp_path: Path) -> None:
    """``LoadImaged(ensure_channel_first=True)`` and no ``EnsureChannelFirstd`` (common
    in zoo bundles): radnode's hand-over dropped the option and the spatial transforms
    took x for the channel axis (found by review). Same mask as the two-transform form."""
    import json
    import shutil

    variant = tmp_path / "models" / "bone_threshold_ecf"
    shutil.copytree(models / "bone_threshold", variant)
    config_path = variant / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    transforms = config["preprocessing"]["transforms"]
    assert [t["_target_"] for t in transforms[:2]] == ["LoadImaged", "EnsureChannelFirstd"]
    transforms[0] = {**transforms[0], "ensure_channel_first": True, "image_only": True}
    del transforms[1]
    config_path.write_text(json.dumps(config))

    volume = load_series(small_ct(tmp_path / "ct"))
    expected = run_bundle(load_bundle(read_bundle_spec(models / "bone_threshold")), volume)
    got = run_bundle(load_bundle(read_bundle_spec(variant)), volume)
    assert got.label_map is not None and expected.label_map is not None
    assert got.label_map.any()
    np.testing.assert_array_equal(got.label_map, expected.label_map)


def test_a_bundle_with_its_own_data_keys_runs(models: Path, tmp_path: Path) -> None:
    """A bundle written for ``img`` in and ``seg`` out (its metadata names them) failed
    with "applying transform <...>" (found by review). Same mask as image/pred."""
    import json
    import shutil

    variant = tmp_path / "models" / "bone_threshold_keys"
    shutil.copytree(models / "bone_threshold", variant)
    for name in ("inference.json", "metadata.json"):
        path = variant / "configs" / name
        text = path.read_text().replace('"image"', '"img"').replace('"pred"', '"seg"')
        path.write_text(text)
    meta = json.loads((variant / "configs" / "metadata.json").read_text())
    assert list(meta["network_data_format"]["inputs"]) == ["img"]

    volume = load_series(small_ct(tmp_path / "ct"))
    expected = run_bundle(load_bundle(read_bundle_spec(models / "bone_threshold")), volume)
    got = run_bundle(load_bundle(read_bundle_spec(variant)), volume)
    assert got.label_map is not None and expected.label_map is not None
    np.testing.assert_array_equal(got.label_map, expected.label_map)


def test_an_axial_series_with_rounded_direction_cosines_is_resampled_as_axial(tmp_path) -> None:
    """Scanners write axial orientations as 0.99999994\\-0\\0.000001\\0\\0.99999988\\-0.00034.
    MONAI's Spacingd took that for an oblique image and fitted its grid to the rotated
    corners, 0.67 mm off the exactly axial one: the reference CT model's kidney volumes
    moved by 13 % (acceptance pass). The same pixels must give the same model input."""
    import pydicom
    from monai.transforms import Spacingd

    from service.pipeline.inference import volume_to_metatensor

    exact = write_ct_series(tmp_path / "exact", slices=12, rows=32, columns=32)
    rounded = []
    for path in exact:
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [0.99999994, -0.0, 0.000001, 0.0, 0.99999988, -0.00034]
        (tmp_path / "rounded").mkdir(exist_ok=True)
        rounded.append(tmp_path / "rounded" / path.name)
        ds.save_as(rounded[-1])
    spacing = Spacingd(keys="image", pixdim=(1.5, 1.5, 2.0), mode="bilinear")
    inputs = [
        spacing({"image": volume_to_metatensor(load_series(files), 3)[None]})["image"]
        for files in (exact, rounded)
    ]
    assert torch.equal(inputs[0].affine, inputs[1].affine)
    assert torch.allclose(inputs[0].as_tensor(), inputs[1].as_tensor(), atol=1e-3)
    # a real obliquity (10 degrees) stays oblique
    from service.pipeline.inference import snapped_to_axes

    turn = np.radians(10)
    oblique = np.eye(4)
    oblique[:2, :2] = [[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]]
    assert np.array_equal(snapped_to_axes(oblique, (1.0, 1.0, 1.0)), oblique)


def test_transforms_given_by_reference_are_rewritten_as_inline_ones(tmp_path) -> None:
    """MONAI's own segmentation_template gives its lists by reference
    (``transforms: $@preprocessing_transforms + ...``). Only inline lists were
    rewritten: LoadImaged failed every job and SaveImaged wrote into the bundle folder
    (acceptance pass). The referenced items are rewritten too; the result is the same
    as the inline bundle's."""
    from monai.networks.nets import UNet

    from tests.support.bundles import SPLEEN_METADATA, spleen_inference_config, write_bundle

    config = spleen_inference_config()
    config["preprocessing_transforms"] = config["preprocessing"]["transforms"][:1]
    config["more_transforms"] = config["preprocessing"]["transforms"][1:]
    config["preprocessing"]["transforms"] = "$@preprocessing_transforms + @more_transforms"
    config["postprocessing_transforms"] = config["postprocessing"]["transforms"]
    config["postprocessing"]["transforms"] = "@postprocessing_transforms"
    torch.manual_seed(0)
    net = UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="batch")
    by_reference = write_bundle(tmp_path / "models", "by_reference", SPLEEN_METADATA, config, net)
    bundle = load_bundle(read_bundle_spec(by_reference), "cpu")
    assert {"preprocessing_transforms:LoadImaged", "postprocessing_transforms:SaveImaged"} <= set(
        bundle.swapped
    )
    inline = load_bundle(read_bundle_spec(write_zoo_spleen_bundle(tmp_path / "inline")), "cpu")
    volume = load_series(small_ct(tmp_path / "ct"))
    result = run_bundle(bundle, volume)
    assert np.array_equal(result.label_map, run_bundle(inline, volume).label_map)
    assert not (by_reference / "eval").exists()  # nothing written beside the weights


def test_a_loader_built_by_an_expression_radnode_cannot_follow_is_refused_at_load(
    tmp_path,
) -> None:
    from monai.networks.nets import UNet

    from tests.support.bundles import SPLEEN_METADATA, spleen_inference_config, write_bundle

    config = spleen_inference_config()
    config["preprocessing"]["transforms"] = "$[monai.transforms.LoadImaged(keys='image')]"
    net = UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="batch")
    bundle = write_bundle(tmp_path, "hidden_loader", SPLEEN_METADATA, config, net)
    with pytest.raises(BundleError, match=r"hidden_loader.*still include LoadImaged"):
        load_bundle(read_bundle_spec(bundle), "cpu")


def _threshold_variant(root: Path, name: str, change) -> Path:
    """The threshold bundle with its metadata or config changed by ``change``."""
    import json

    bundle = write_threshold_bundle(root, name)
    for file in ("metadata.json", "inference.json"):
        path = bundle / "configs" / file
        data = json.loads(path.read_text())
        change(file, data)
        path.write_text(json.dumps(data))
    return bundle


def test_nan_made_by_postprocessing_fails_the_job_as_nan_from_the_network_does(tmp_path):
    """Checked only on the network's output, NaN from a postprocessing step became an
    empty label map, "bone 0.0 mL", sent as a result (acceptance pass)."""

    nan = {"_target_": "Lambdad", "keys": "pred", "func": "$lambda x: x * float('nan')"}

    def nan_before_argmax(file: str, data: dict) -> None:
        if file == "inference.json":
            data["postprocessing"]["transforms"].insert(0, nan)

    def nan_last(file: str, data: dict) -> None:
        if file == "inference.json":
            data["postprocessing"]["transforms"] = [nan]

    volume = load_series(small_ct(tmp_path / "ct"))
    bundle = load_bundle(read_bundle_spec(_threshold_variant(tmp_path, "last", nan_last)))
    with pytest.raises(PipelineFailed, match="postprocessing's output has NaN"):
        run_bundle(bundle, volume)
    made = _threshold_variant(tmp_path, "before_argmax", nan_before_argmax)
    bundle = load_bundle(read_bundle_spec(made))
    with pytest.raises(PipelineFailed, match=r"postprocessing failed.*NaN"):
        run_bundle(bundle, volume)


def test_labels_the_network_has_no_channel_for_fail_the_job(tmp_path):
    """Two channels, four labels declared: the job was done and the RIS got "0.00 mL"
    for organs the network cannot segment (acceptance pass)."""

    def more_labels(file: str, data: dict) -> None:
        if file == "metadata.json":
            data["network_data_format"]["outputs"]["pred"]["channel_def"] = {
                "0": "other",
                "1": "bone",
                "2": "spleen",
                "3": "kidney",
            }

    bundle = load_bundle(read_bundle_spec(_threshold_variant(tmp_path, "four", more_labels)))
    with pytest.raises(PipelineFailed, match=r"2 channel\(s\).*spleen \(2\), kidney \(3\)"):
        run_bundle(bundle, load_series(small_ct(tmp_path / "ct")))


def test_a_bundle_written_in_yaml_runs_as_its_json_twin(tmp_path) -> None:
    """Half the zoo writes inference.yaml; pyyaml was not installed and every such
    bundle failed (acceptance pass)."""
    import json

    import yaml

    folder = write_zoo_spleen_bundle(tmp_path / "models", "yaml_spleen")
    config = json.loads((folder / "configs" / "inference.json").read_text())
    (folder / "configs" / "inference.json").unlink()
    (folder / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    twin = load_bundle(read_bundle_spec(write_zoo_spleen_bundle(tmp_path / "json")), "cpu")
    bundle = load_bundle(read_bundle_spec(folder), "cpu")
    volume = load_series(small_ct(tmp_path / "ct"))
    assert np.array_equal(run_bundle(bundle, volume).label_map, run_bundle(twin, volume).label_map)


def test_a_swin_unetr_network_instantiates() -> None:
    """SwinUNETR needs einops; without it the bundle loaded and failed at its first job
    (acceptance pass)."""
    from monai.networks.nets import SwinUNETR

    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=3).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 64, 64, 64)).shape == (1, 2, 64, 64, 64)


def test_a_bundle_that_turns_amp_off_is_run_without_autocast(tmp_path) -> None:
    """On CUDA every bundle ran under fp16 autocast, whatever its config said (review of
    the code in the acceptance pass; no GPU here, so the flag is what is checked)."""
    import torch as _torch

    from service.pipeline.inference import _autocast

    def amp_off(file: str, data: dict) -> None:
        if file == "inference.json":
            data["amp"] = False

    off = load_bundle(read_bundle_spec(_threshold_variant(tmp_path, "amp_off", amp_off)), "cpu")
    on = load_bundle(read_bundle_spec(write_threshold_bundle(tmp_path / "on")), "cpu")
    assert (off.amp, on.amp) == (False, True)
    cuda = _torch.device("cuda")
    assert isinstance(_autocast(cuda, True), _torch.autocast)
    assert not isinstance(_autocast(cuda, False), _torch.autocast)


@pytest.mark.parametrize(
    ("value", "finite"),
    [(0.5, True), (float("nan"), False), (float("inf"), False), (float("-inf"), False)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_all_finite_finds_one_bad_value_anywhere(value: float, finite: bool, dtype) -> None:
    """One reduction (torch.aminmax) instead of isfinite().all() over the whole output:
    a single NaN or infinity, wherever it is, must still be found."""
    from monai.data import MetaTensor

    from service.pipeline.finite import all_finite

    tensor = torch.rand(1, 3, 9, 10, 11, dtype=dtype)
    tensor[0, 2, 8, 3, 10] = value
    assert all_finite(tensor) is finite
    assert all_finite(MetaTensor(tensor)) is finite  # what MONAI's transforms hand on
    assert all_finite(torch.empty(0)) and all_finite(torch.arange(5))  # nothing to check


# --------------------------------------------------------------------------- classification


def _classifier(folder: Path, activation: str | None = None, applied: str | None = None):
    """A loaded classifier as ``_probabilities`` reads it: its spec and the activation its
    postprocessing applies (no network needed)."""
    from dataclasses import replace
    from types import SimpleNamespace

    from service.pipeline.result import Label

    spec = read_bundle_spec(write_classifier_bundle(folder, "c"))
    spec = replace(spec, activation=activation,
                   labels=tuple(Label(i, f"finding {i}") for i in range(3)))  # fmt: skip
    return SimpleNamespace(spec=spec, applied_activation=applied)


@pytest.mark.parametrize(
    ("activation", "applied", "outputs", "expected", "exclusive"),
    [
        # independent findings' logits: sigmoid each (the guess took them for a softmax)
        ("sigmoid", None, [2.0, 1.5, 3.0], [0.881, 0.818, 0.953], False),
        # logits that happen to lie in [0, 1] are not probabilities when declared so
        ("softmax", None, [0.9, 0.8, 0.7], [0.367, 0.332, 0.301], True),
        ("none", None, [0.9, 0.8, 0.7], [0.9, 0.8, 0.7], False),
        # the postprocessing's activation stands; its kind says exclusive or not
        (None, "softmax", [0.5, 0.3, 0.2], [0.5, 0.3, 0.2], True),
        (None, "sigmoid", [0.5, 0.3, 0.9], [0.5, 0.3, 0.9], False),
        # nothing said: logits -> softmax; probabilities summing to 1 -> exclusive
        (None, None, [2.0, 1.5, 3.0], [0.231, 0.140, 0.629], True),
        (None, None, [0.34, 0.33, 0.33], [0.34, 0.33, 0.33], True),
        (None, None, [0.9, 0.8, 0.7], [0.9, 0.8, 0.7], False),
    ],
)
def test_a_classifiers_outputs_become_probabilities_as_the_bundle_says(
    activation, applied, outputs, expected, exclusive, tmp_path: Path
) -> None:
    """Acceptance pass: the activation was guessed from the values alone, so
    independent findings' logits went through a softmax (two present findings became
    absent) and logits within [0, 1] were taken for probabilities."""
    from service.pipeline.inference import _probabilities

    notes: dict = {}
    got, is_exclusive = _probabilities(
        _classifier(tmp_path, activation, applied), torch.tensor(outputs), notes
    )
    assert [round(p, 3) for p in got] == expected
    assert is_exclusive is exclusive
    assert bool(notes.get("activation_guessed")) is (activation is None and applied is None)


def test_a_network_ending_in_its_own_softmax_says_exclusive(tmp_path: Path) -> None:
    """Review: with activation none the classes were independent, so 0.40 / 0.35 / 0.25
    from a network's own softmax had no finding present."""
    from dataclasses import replace

    from service.pipeline.inference import _probabilities

    bundle = _classifier(tmp_path, "none")
    bundle.spec = replace(bundle.spec, exclusive=True)
    got, exclusive = _probabilities(bundle, torch.tensor([0.40, 0.35, 0.25]), {})
    assert exclusive and [round(p, 2) for p in got] == [0.40, 0.35, 0.25]


def test_declared_probabilities_outside_0_1_fail_the_job_with_what_to_fix(tmp_path: Path) -> None:
    from service.pipeline.inference import _probabilities

    with pytest.raises(PipelineFailed, match=r"radnode\.activation"):
        _probabilities(_classifier(tmp_path, "none"), torch.tensor([2.0, -1.0, 0.5]), {})


def test_exclusive_classes_have_one_present_and_a_normal_class_is_no_abnormal_result() -> None:
    """Acceptance pass: three exclusive classes at 34 / 33 / 33 % were each "absent",
    and a "Normal" class present was flagged abnormal (HL7 A)."""
    from service.pipeline.result import BundleIdentity, Label, PipelineResult, StageTimings

    labels = (Label(0, "Normal", normal=True), Label(1, "Pneumothorax"),
              Label(2, "Effusion", threshold=0.3))  # fmt: skip
    identity = BundleIdentity("c", "1", TaskKind.CLASSIFICATION)

    def result(probabilities, exclusive):
        return PipelineResult(identity, labels, "cpu", StageTimings(),
                              probabilities=probabilities, exclusive=exclusive)  # fmt: skip

    normal = result((0.34, 0.33, 0.33), exclusive=True)
    assert normal.findings_present() == (True, False, False)
    assert normal.findings_abnormal() == (False, False, False)
    sick = result((0.2, 0.45, 0.35), exclusive=True)
    assert sick.findings_present() == (False, True, False)
    assert sick.findings_abnormal() == (True, True, False)  # not normal: abnormal
    independent = result((0.1, 0.45, 0.35), exclusive=False)  # each at its threshold
    assert independent.findings_present() == (False, False, True)
    assert independent.findings_abnormal() == (True, False, True)


def test_a_classifiers_activation_comes_from_its_postprocessing(models: Path) -> None:
    bundle = load_bundle(read_bundle_spec(models / "cxr_test_classifier"), "cpu")
    assert bundle.applied_activation == "softmax"


def test_a_multi_label_segmentation_fails_its_job_saying_why(tmp_path: Path) -> None:
    """Acceptance pass: a sigmoid (multi-label, overlapping channels) segmentation was
    argmaxed into one label per voxel and a channel vanished from every result; its job
    fails saying why. A one-channel sigmoid (binary) segmentation still runs (review:
    refusing every sigmoid at load broke it)."""
    import json

    from service.pipeline.inference import _interpret

    folder = write_zoo_spleen_bundle(tmp_path, "multilabel")
    config_file = folder / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    steps = config["postprocessing"]["transforms"]
    steps[0] = {"_target_": "Activationsd", "keys": "pred", "sigmoid": True}
    steps[2] = {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5}
    config_file.write_text(json.dumps(config))
    bundle = load_bundle(read_bundle_spec(folder), "cpu")  # loads: the channels decide
    assert bundle.applied_activation == "sigmoid"
    overlapping = torch.ones(3, 4, 4, 4)
    with pytest.raises(PipelineFailed, match="multi-label"):
        _interpret(bundle, None, overlapping, torch.zeros(1, 4, 4, 4), {})  # type: ignore[arg-type]


def test_a_bundle_whose_files_changed_is_loaded_again_for_the_next_job(tmp_path: Path) -> None:
    """Acceptance pass: a job failed by its bundle said "fix the bundle, then retry the
    job"; the retry ran the bundle the worker had loaded at start."""
    import json
    import os

    from service.worker import PipelineCache

    folder = write_classifier_bundle(tmp_path, "c")
    cache = PipelineCache(tmp_path, "cpu")
    first = cache.get("c")
    assert cache.get("c") is first  # unchanged: the loaded bundle serves
    meta_file = folder / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["version"] = "9.9.9"
    meta_file.write_text(json.dumps(meta))
    later = meta_file.stat().st_mtime_ns + 10**9  # a coarse clock could hide the edit
    os.utime(meta_file, ns=(later, later))
    again = cache.get("c")
    assert again is not first and again.spec.identity.version == "9.9.9"
    assert cache.get("c") is again


@pytest.mark.parametrize("saved_as", ["lightning", "data_parallel"])
def test_weights_saved_by_common_trainers_load(tmp_path: Path, saved_as: str) -> None:
    """Acceptance pass: a Lightning checkpoint ({"state_dict": ...}, keys "model.") and a
    DataParallel state dict (keys "module.") were refused as "another network"."""
    folder = write_classifier_bundle(tmp_path, "c")
    weights = folder / "models" / "model.pt"
    state = torch.load(weights, weights_only=True)
    if saved_as == "lightning":
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}, weights)
    else:
        torch.save({f"module.{k}": v for k, v in state.items()}, weights)
    bundle = load_bundle(read_bundle_spec(folder), "cpu")
    loaded = bundle.network.state_dict()
    assert all(torch.equal(loaded[k].cpu(), v) for k, v in state.items())


def test_a_whole_pickled_module_is_refused_with_how_to_save_the_weights(tmp_path: Path) -> None:
    folder = write_classifier_bundle(tmp_path, "c")
    bundle = load_bundle(read_bundle_spec(folder), "cpu")
    torch.save(bundle.network, folder / "models" / "model.pt")
    with pytest.raises(BundleError, match=r"state_dict\(\)") as refused:
        load_bundle(read_bundle_spec(folder), "cpu")
    assert "add_safe_globals" not in str(refused.value) and "\n" not in str(refused.value)
