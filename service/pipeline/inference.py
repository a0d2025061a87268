"""Run a loaded bundle on a volume and bring the answer back to the source geometry.

The volume enters the bundle's preprocessing as ``LoadImaged`` would have delivered it
(see :func:`volume_to_metatensor`), and leaves the postprocessing as a
:class:`~service.pipeline.result.PipelineResult` whose arrays have the volume's layout
(``[slice, row, column]``) and grid. The batch is built and split with MONAI's own
``list_data_collate`` / ``decollate_batch``, as MONAI's ``SupervisedEvaluator`` does, so
``Invertd`` finds the transform trace it expects.

A bundle whose postprocessing does not invert its spatial preprocessing (no ``Invertd``)
still gives a result in the source grid: radnode resamples the output onto the source
(nearest neighbour for labels, linear for images) and notes that it did.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.errors import RadnodeError
from service.pipeline.bundle import BundleSpec, LoadedBundle
from service.pipeline.paging import page_out
from service.pipeline.result import PipelineResult, StageTimings, TaskKind
from service.pipeline.volume import Volume


class PipelineFailed(RadnodeError):
    """A bundle raised or returned something radnode cannot use; the message says which."""


class InputMismatch(RadnodeError):
    """The series is not the kind of input the bundle expects (modality, 2D/3D)."""


@dataclass(frozen=True)
class PreparedInput:
    """The volume as the bundle's preprocessing expects it, and the geometry reference."""

    item: dict[str, Any]
    reference: Any  # MetaTensor (1, x, y[, z]) of the source grid, for resampling back


def check_input(bundle: LoadedBundle, volume: Volume) -> None:
    """Refuse a series a bundle was not made for, with a reason an operator can act on."""
    spec = bundle.spec
    if spec.modalities and volume.modality.upper() not in spec.modalities:
        raise InputMismatch(
            f"pipeline {spec.name} expects modality {'/'.join(spec.modalities)}, the series"
            f" is {volume.modality or 'without Modality'}; check the route's Modality condition"
        )
    if spec.dimensions == 3 and (volume.is_2d or volume.is_single_slice):
        raise InputMismatch(
            f"pipeline {spec.name} needs a 3D volume; the series has a single image; route"
            " only multi-slice series to it (e.g. ImageCount = { min = 20 })"
        )
    if spec.dimensions == 3 and spec.min_extent_mm:  # a 2D series was refused above
        extent = volume.array.shape[0] * float(volume.spacing[2])
        if extent < spec.min_extent_mm:
            raise InputMismatch(
                f"pipeline {spec.name} was trained on scans covering at least"
                f" {spec.min_extent_mm:.0f} mm; the series covers {extent:.0f} mm"
                " (part of the body only), where it would report organs that are not there;"
                " send the whole series, or raise study.completion_timeout_s if it arrives"
                " in parts"
            )
    if spec.dimensions == 2 and volume.array.shape[0] != 1:
        raise InputMismatch(
            f"pipeline {spec.name} takes one 2D image; the series has"
            f" {volume.array.shape[0]} images"
        )


def volume_to_metatensor(volume: Volume, dimensions: int, axcodes: str | None = None) -> Any:
    """The volume as ``LoadImaged`` gives an image: channel-less, spatial (x, y[, z]).

    3D: the affine is the volume's RAS affine, so ``Orientationd``/``Spacingd`` see the
    patient geometry. 2D (a projection radiograph): axes (x=column, y=row) with a plain
    scaling affine, as MONAI's readers give for a 2D picture, so ``Orientationd`` does
    not flip it.

    ``axcodes`` (3D only): hand the volume over already in those axes (the bundle's own
    ``Orientationd`` target, see :func:`input_axcodes`), with the affine that says so.
    ``Orientationd`` then has nothing to do and returns the same tensor, instead of a
    second float32 copy of the whole volume; the voxels and geometry it sees are the
    ones it would have produced itself.
    """
    import torch
    from monai.data import MetaTensor

    original = affine = _grid_affine(volume, dimensions)
    if dimensions == 2:
        array = np.ascontiguousarray(volume.array[0].T, dtype=np.float32)
        tensor = torch.from_numpy(array)
    else:
        # (slice, row, column) -> (x, y, z), reoriented, int -> float32
        source = torch.from_numpy(volume.array).permute(2, 1, 0)
        flips: list[int] = []
        if axcodes is not None:
            source, affine, flips = _reorient(source, affine, axcodes)
        # The first slab written touches every page of the float32 copy (z is its
        # fastest axis), so the decoded slices are paged out before the copy and each
        # slab again after it (axial: a slab is a run of slices): never both volumes
        # resident at once. Faulting them back from the page cache costs ~0.1 s.
        done = None
        if source.stride(2) == volume.array[0].size and page_out(volume.array):
            done = lambda start, stop: page_out(volume.array[start:stop])  # noqa: E731
        tensor = _float32_copy(source, flips, done=done)
    meta = {
        "affine": torch.as_tensor(affine, dtype=torch.float64),
        "original_affine": torch.as_tensor(original, dtype=torch.float64),
        "spatial_shape": np.asarray(tensor.shape),
        "original_channel_dim": float("nan"),
        "space": "RAS",
        "filename_or_obj": f"series-{volume.series_uid[-12:]}",
    }
    return MetaTensor(tensor, meta=meta)


#: Direction cosines within this of an axis (0.057 degrees) are taken as that axis.
AXIS_SNAP = 1e-3


def _grid_affine(volume: Volume, dimensions: int) -> NDArray[np.float64]:
    if dimensions == 2:
        sx, sy, _ = volume.spacing
        return np.diag([sx, sy, 1.0, 1.0])
    return snapped_to_axes(volume.affine_ras(), volume.spacing)


def snapped_to_axes(
    affine: NDArray[np.float64], spacing: tuple[float, float, float]
) -> NDArray[np.float64]:
    """``affine`` with direction cosines that round to the axes made exact.

    Why: scanners write an axial ImageOrientationPatient as ``0.99999994\\-0\\0.000001
    \\0\\0.99999988\\-0.00034``. To MONAI's ``Spacingd`` any off-diagonal term makes
    the image oblique: it fits the output grid to the rotated corners, which moved it
    0.67 mm against the exactly axial image, and the reference CT model's kidney
    volumes by up to 13 % (acceptance pass). Snapped, the image is resampled as the
    axial image it is. The model's output comes back through the same affine, so it
    lies on the source voxels either way; only the model's view of a 0.06-degree tilt
    is dropped. Anything further from an axis is left to MONAI as an oblique image.
    The snapped axes are scaled by ``spacing`` (x, y, z) itself, not by the length of
    the header's slightly short direction cosines.
    """
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    nearest = np.argmax(np.abs(directions), axis=0)
    if len(set(nearest.tolist())) != 3:
        return affine
    snapped = np.zeros((3, 3))
    for column, axis in enumerate(nearest):
        if np.abs(np.delete(directions[:, column], axis)).max() > AXIS_SNAP:
            return affine
        snapped[axis, column] = np.sign(directions[axis, column])
    result = affine.copy()
    result[:3, :3] = snapped * np.asarray(spacing, dtype=np.float64)
    return result


def _reorient(
    source: Any, affine: NDArray[np.float64], axcodes: str
) -> tuple[Any, NDArray[np.float64], list[int]]:
    """``source`` (x, y, z) with its axes permuted towards ``axcodes`` (a view), the
    affine of the fully reoriented grid, and the axes of the permuted view still to be
    reversed: :func:`_float32_copy` does that (torch has no negative strides)."""
    from nibabel import orientations

    current = orientations.io_orientation(affine)
    transform = orientations.ornt_transform(current, orientations.axcodes2ornt(axcodes))
    shape = tuple(source.shape)
    new_affine = affine @ orientations.inv_ornt_aff(transform, shape)
    order = [0, 0, 0]
    for axis, (target, _) in enumerate(transform):
        order[int(target)] = axis
    flips = [int(target) for target, direction in transform if direction < 0]
    return source.permute(*order), new_affine, flips


def _float32_copy(
    source: Any,
    flips: list[int],
    chunk_bytes: int = 16 * 1024 * 1024,
    done: Callable[[int, int], Any] | None = None,
) -> Any:
    """A contiguous float32 copy of the (x, y, z) view ``source`` with ``flips`` axes
    reversed, made a slab of z at a time; ``done(start, stop)`` is told of each slab
    copied (the caller pages the decoded slices out: they are not needed until the
    writers run, see :mod:`service.pipeline.paging`).

    The view is a full transposition of the decoded array (its z is the array's
    slowest axis), which one ``copy_`` walks with a stride across the whole volume:
    1.0-1.4 s for 300 x 512^2 here, flips included. Slab by slab the source slab is
    contiguous and the flip is done on it, in its own type, before it is widened:
    0.4 s, and the only memory besides the output is one slab.
    """
    import torch

    tensor = torch.empty(source.shape, dtype=torch.float32)
    depth = source.shape[2]
    plane_bytes = source.shape[0] * source.shape[1] * source.element_size()
    step = max(1, chunk_bytes // max(plane_bytes, 1))
    for start in range(0, depth, step):
        stop = min(start + step, depth)
        slab = source[:, :, start:stop]
        if flips:
            slab = slab.flip(flips)
        if 2 in flips:  # the slab goes to the mirrored place along z
            tensor[:, :, depth - stop : depth - start].copy_(slab)
        else:
            tensor[:, :, start:stop].copy_(slab)
        if done is not None:
            done(start, stop)
    return tensor


def input_axcodes(bundle: LoadedBundle) -> str | None:
    """The axes the bundle's preprocessing reorients its input to, when radnode can do it
    while converting the volume (see :func:`volume_to_metatensor`); else None.

    Only when ``Orientationd`` on the input key comes before any transform that changes
    the grid (intensity and type transforms commute with reorientation; ``Spacingd``
    before ``Orientationd`` would see other axes).
    """
    from monai.transforms import (
        CastToTyped,
        EnsureChannelFirstd,
        EnsureTyped,
        Identityd,
        Orientationd,
    )

    if bundle.spec.dimensions != 3:
        return None
    harmless = (CastToTyped, EnsureChannelFirstd, EnsureTyped, Identityd)
    for transform in getattr(bundle.preprocessing, "transforms", ()):
        if isinstance(transform, Orientationd):
            orientation = transform.ornt_transform
            keys = tuple(transform.keys)
            labels = orientation.labels
            if bundle.spec.input_key not in keys or labels not in (None, _RAS_LABELS):
                return None
            return "RAS" if orientation.as_closest_canonical else orientation.axcodes
        intensity = type(transform).__module__.startswith("monai.transforms.intensity")
        if not (intensity or isinstance(transform, harmless)):
            return None
    return None


_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def source_grid(volume: Volume, dimensions: int) -> Any:
    """A (1, x, y[, z]) MetaTensor with the source volume's shape and geometry but no
    voxels of its own (one zero, broadcast): what resampling back needs, at no memory
    cost. A copy of the image itself would hold another float32 volume through the
    whole job."""
    import torch
    from monai.data import MetaTensor

    shape = volume.array.shape[:0:-1] if dimensions == 2 else volume.array.shape[::-1]
    grid = torch.zeros(1, dtype=torch.float32).expand(1, *shape)
    return MetaTensor(grid, affine=torch.as_tensor(_grid_affine(volume, dimensions)))


def prepare(bundle: LoadedBundle, volume: Volume) -> PreparedInput:
    dimensions = bundle.spec.dimensions
    image = volume_to_metatensor(volume, dimensions, input_axcodes(bundle))
    return PreparedInput(
        item={bundle.spec.input_key: image}, reference=source_grid(volume, dimensions)
    )


def run_bundle(bundle: LoadedBundle, volume: Volume, *, load_s: float = 0.0) -> PipelineResult:
    """Preprocess, infer, postprocess; the result is in the source volume's grid.

    Raises :class:`InputMismatch` for a series the bundle was not made for and
    :class:`PipelineFailed` when the bundle itself fails.
    """
    import torch
    from monai.data import decollate_batch, list_data_collate

    check_input(bundle, volume)
    spec = bundle.spec
    key, out_key = spec.input_key, spec.output_key
    started = time.perf_counter()  # preprocessing includes radnode's own conversion
    prepared = prepare(bundle, volume)
    # The bundle works on its float32 copy from here: the decoded series may leave
    # memory until the writers read it again (service.pipeline.paging).
    page_out(volume.array)
    reference, item = prepared.reference, prepared.item
    # The float32 input volume is as large as everything else together and not needed
    # once resampled (Invertd works from the trace): only ``item`` holds it, and the
    # bundle's loader (HandOverd) empties that, so it goes when it is replaced.
    del prepared
    try:
        item = bundle.preprocessing(item)
    except Exception as exc:
        raise PipelineFailed(
            f"pipeline {spec.name}: preprocessing failed: {_innermost(exc)}"
        ) from exc
    preprocessed = time.perf_counter()
    batch = list_data_collate([item])
    try:
        with torch.no_grad(), _autocast(bundle.device, bundle.amp):
            batch[out_key] = bundle.inferer(batch[key].to(bundle.device), bundle.network)
        if bundle.device.type == "cuda":
            torch.cuda.synchronize(bundle.device)
    except Exception as exc:
        raise PipelineFailed(f"pipeline {spec.name}: inference failed: {exc}") from exc
    _require_finite(spec.name, batch[out_key])
    if spec.identity.kind is TaskKind.SEGMENTATION:
        _require_channels_for_labels(spec, batch[out_key])
    inferred = time.perf_counter()
    try:
        (output,) = decollate_batch(batch)
        if bundle.postprocessing is not None:
            output = bundle.postprocessing(output)
        prediction = output[out_key]
        _require_finite(spec.name, prediction, "its postprocessing's output")
        notes: dict[str, Any] = {"swapped": list(bundle.swapped)}
        result = _interpret(bundle, volume, prediction, reference, notes)
    except (PipelineFailed, InputMismatch):
        raise
    except Exception as exc:
        raise PipelineFailed(
            f"pipeline {spec.name}: postprocessing failed: {_innermost(exc)}"
        ) from exc
    if spec.identity.kind is TaskKind.CLASSIFICATION and spec.heatmap_layer:
        result["heatmap"] = _heatmap(bundle, item, reference, volume, notes)
    finished = time.perf_counter()
    timings = StageTimings(
        load_s=load_s,
        preprocess_s=preprocessed - started,
        inference_s=inferred - preprocessed,
        postprocess_s=finished - inferred,
    )
    return PipelineResult(
        bundle=spec.identity,
        labels=spec.labels,
        device=str(bundle.device),
        timings=timings,
        notes=notes,
        **result,
    )


def _require_finite(name: str, output: Any, what: str = "the model's output") -> None:
    """Refuse a model output with NaN or infinite values: argmax and rounding turn them
    into a plausible label map or image (a segmentation of "0 mL", a derived series of
    -32768), reported as a normal result (found by review). One pass over the output;
    also catches fp16 overflow under CUDA autocast. Checked again after the bundle's
    postprocessing, which can make them too (acceptance pass: "bone 0.0 mL")."""
    from service.pipeline.finite import all_finite

    if not all_finite(output):
        raise PipelineFailed(
            f"pipeline {name}: {what} has NaN or infinite values; check its weights,"
            " transforms and the input's intensities (nothing was written)"
        )


def _require_channels_for_labels(spec: BundleSpec, output: Any) -> None:
    """Refuse a segmentation whose labels the network cannot give: a label value needs
    a channel of its own (value v: channel v; one channel: a binary mask, value 1).
    With 4 labels declared for 2 channels the job was done and the RIS got "spleen:
    0.00 mL" for organs the network never segments (acceptance pass)."""
    if getattr(output, "ndim", 0) < 3:  # not a batch of channel-first images: unknown
        return
    channels = int(output.shape[1])
    highest = max(channels - 1, 1)
    beyond = [label for label in spec.labels if label.value > highest]
    if beyond:
        names = ", ".join(f"{label.name} ({label.value})" for label in beyond)
        raise PipelineFailed(
            f"pipeline {spec.name}: the network gives {channels} channel(s), label values"
            f" 0-{highest}, but metadata.json declares {names}; make its labels"
            " (radnode.labels or channel_def) match the network's outputs"
        )


def _innermost(exc: BaseException) -> str:
    """What went wrong, not only where: MONAI wraps a transform's error as "applying
    transform <object at 0x...>", the cause (a missing key, a shape) inside it."""
    where = str(exc).split(" object at 0x")[0].replace("<", "").strip()
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if cause is exc:
        return f"{type(exc).__name__}: {exc}"
    return f"{where}: {type(cause).__name__}: {cause}"


def _autocast(device: Any, amp: bool = True) -> Any:
    """fp16 autocast on CUDA unless the bundle's config says ``amp: false`` (a network
    that overflows in fp16; it was ignored: acceptance pass, from the code)."""
    import contextlib

    import torch

    if device.type == "cuda" and amp:
        return torch.autocast("cuda")
    return contextlib.nullcontext()


def _interpret(
    bundle: LoadedBundle, volume: Volume, prediction: Any, reference: Any, notes: dict[str, Any]
) -> dict[str, Any]:
    """Turn the bundle's ``pred`` into the typed field of its task kind."""
    import torch

    from service.pipeline.argmax import channel_argmax  # imports MONAI: not at node start

    kind = bundle.spec.identity.kind
    prediction = prediction.detach().cpu() if torch.is_tensor(prediction) else prediction
    if kind is TaskKind.CLASSIFICATION:
        probabilities, exclusive = _probabilities(bundle, prediction, notes)
        return {"probabilities": probabilities, "exclusive": exclusive}
    if not torch.is_tensor(prediction) or prediction.ndim != reference.ndim:
        shape = tuple(getattr(prediction, "shape", ()))
        raise PipelineFailed(
            f"pipeline {bundle.spec.name}: expected an image output of {reference.ndim - 1}"
            f" spatial dimensions with a channel first, got shape {shape}"
        )
    if kind is TaskKind.SEGMENTATION:
        if prediction.shape[0] > 1 and bundle.applied_activation == "sigmoid":
            # one label per voxel: an argmax over overlapping channels drops one from
            # every result without a word (acceptance pass: "Tumor core" vanished)
            raise PipelineFailed(
                f"pipeline {bundle.spec.name}: a multi-label segmentation ({prediction.shape[0]}"
                " channels after a sigmoid, which may overlap, e.g. tumour sub-regions)"
                " cannot be reported: radnode reports one label per voxel. Give the bundle"
                " a softmax (or argmax) output of one class per voxel"
            )
        if prediction.shape[0] > 1:
            prediction = _keep_meta(prediction, channel_argmax(prediction, 0, keepdim=True))
            notes["argmax_by_radnode"] = True
        # labels as the narrowest integers before they are mapped back to the source's
        # (large) grid: an inverted label map often comes back as float32
        prediction = _keep_meta(prediction, _as_label_integers(prediction))
        prediction = _to_source_grid(prediction, reference, "nearest", notes)
        labels = _to_volume_layout(prediction, volume)
        if not np.issubdtype(labels.dtype, np.integer):
            labels = np.rint(labels)
        highest = int(labels.max(initial=0))
        top = max((label.value for label in bundle.spec.labels), default=highest)
        dtype = np.uint8 if max(top, highest) < 256 else np.uint16
        return {"label_map": labels.astype(dtype, copy=False)}
    prediction = prediction.float() if torch.is_tensor(prediction) else prediction
    prediction = _to_source_grid(prediction[:1], reference, "bilinear", notes)
    return {"image": _to_volume_layout(prediction, volume).astype(np.float32)}


def _probabilities(
    bundle: LoadedBundle, prediction: Any, notes: dict[str, Any]
) -> tuple[tuple[float, ...], bool]:
    """The classifier's probabilities, one per label, and whether its classes are
    mutually exclusive (a softmax: the most probable is present).

    How outputs become probabilities: the activation the bundle's postprocessing applies;
    else ``radnode.activation``, applied here; else a guess from the values (logits
    outside [0, 1]: softmax, or sigmoid for one output; values in [0, 1] that sum to 1:
    exclusive probabilities), said in the notes. The guess took independent findings'
    logits for exclusive classes, and logits within [0, 1] for probabilities
    (acceptance pass): a bundle should say its activation.
    """
    import torch

    name = bundle.spec.name
    values = torch.as_tensor(prediction, dtype=torch.float32).flatten()
    if values.numel() == 0 or not torch.isfinite(values).all():
        raise PipelineFailed(f"pipeline {name}: the classifier gave no usable output")
    declared, applied = bundle.spec.activation, bundle.applied_activation
    if applied is not None:
        exclusive = (declared or applied) == "softmax"
        if declared not in (None, "none", applied):
            notes["activation_declared_differs"] = f"{declared} declared, {applied} applied"
    elif declared in ("softmax", "sigmoid"):
        exclusive = declared == "softmax" and values.numel() > 1
        values = _activated(values, exclusive, notes)
    elif declared == "none":
        exclusive = False
    elif values.min() < 0 or values.max() > 1:  # logits: the bundle has no activation
        exclusive = values.numel() > 1
        values = _activated(values, exclusive, notes)
        notes["activation_guessed"] = True
    else:
        exclusive = values.numel() > 1 and abs(float(values.sum()) - 1.0) < 0.01
        notes["activation_guessed"] = True
    if values.min() < 0 or values.max() > 1:
        raise PipelineFailed(
            f"pipeline {name}: probabilities outside [0, 1] although the bundle says"
            f" activation {declared or applied}; correct radnode.activation in metadata.json"
        )
    if bundle.spec.exclusive is not None:
        exclusive = bundle.spec.exclusive and values.numel() > 1
    labels = bundle.spec.labels
    if labels and len(labels) != values.numel():
        if len(labels) == 1 and values.numel() == 2:
            values = values[labels[0].value : labels[0].value + 1]
        else:
            raise PipelineFailed(
                f"pipeline {name}: {values.numel()} outputs but {len(labels)} labels in"
                " metadata.json; make its labels (radnode.labels or network_data_format"
                " outputs channel_def) match the network's outputs"
            )
    return tuple(float(v) for v in values), exclusive


def _activated(values: Any, exclusive: bool, notes: dict[str, Any]) -> Any:
    """``values`` through a softmax (exclusive classes) or a sigmoid, said in the notes."""
    import torch

    notes["activation_by_radnode"] = "softmax" if exclusive else "sigmoid"
    return torch.softmax(values, 0) if exclusive else torch.sigmoid(values)


def _as_label_integers(prediction: Any) -> Any:
    """A label tensor as uint8 (or int32 beyond 255), rounded if it came as floats."""
    import torch

    tensor = prediction.as_tensor() if hasattr(prediction, "as_tensor") else prediction
    if not tensor.is_floating_point():
        return tensor
    tensor = torch.round(tensor)
    small = tensor.numel() == 0 or (tensor.min() >= 0 and tensor.max() < 256)
    return tensor.to(torch.uint8 if small else torch.int32)


def _keep_meta(source: Any, tensor: Any) -> Any:
    from monai.data import MetaTensor

    if isinstance(source, MetaTensor):
        return MetaTensor(tensor, meta=dict(source.meta))
    return tensor


def _to_source_grid(prediction: Any, reference: Any, mode: str, notes: dict[str, Any]) -> Any:
    """Resample onto the source grid unless the bundle already inverted its transforms."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch

    same_shape = tuple(prediction.shape[1:]) == tuple(reference.shape[1:])
    affine = getattr(prediction, "affine", None)
    same_affine = affine is not None and torch.allclose(
        torch.as_tensor(affine, dtype=torch.float64),
        torch.as_tensor(reference.affine, dtype=torch.float64),
        atol=1e-3,
    )
    if same_shape and (same_affine or not isinstance(prediction, MetaTensor)):
        return prediction
    if not isinstance(prediction, MetaTensor):
        raise PipelineFailed(
            "the bundle's output is not in the source grid and carries no affine to map it"
            " back; add Invertd to its postprocessing"
        )
    exact = _reoriented_exactly(prediction, reference)
    if exact is not None:
        return exact
    notes["resampled_by_radnode"] = True
    if mode == "nearest":
        fast = _nearest_on_aligned_grid(prediction, reference)
        if fast is not None:
            return fast
    return ResampleToMatch(mode=mode, padding_mode="zeros")(prediction.float(), reference)


def _index_map(prediction: Any, reference: Any) -> NDArray[np.float64]:
    """The affine from the reference grid's voxel indices to the prediction's."""
    return np.linalg.inv(np.asarray(prediction.affine, dtype=np.float64)) @ np.asarray(
        reference.affine, dtype=np.float64
    )


def _reoriented_exactly(prediction: Any, reference: Any) -> Any:
    """The prediction in the reference grid when the two grids hold the same voxels in
    another axis order or direction (what ``Orientation`` does), else None.

    Why: radnode hands a bundle its input already in the bundle's ``Orientationd`` axes
    (:func:`volume_to_metatensor`), so an inverted output comes back in those axes.
    Undoing that is a permutation and a flip: no interpolation, no coordinates.
    """
    import torch
    from monai.data import MetaTensor

    if prediction.ndim != 4 or reference.ndim != 4:
        return None
    to_prediction = _index_map(prediction, reference)
    linear, offset = to_prediction[:3, :3], to_prediction[:3, 3]
    signed = np.rint(linear)
    if not np.allclose(linear, signed, atol=1e-4) or not np.array_equal(
        np.abs(signed).sum(0), np.ones(3)
    ):
        return None
    order, flips = [], []
    for axis, size in enumerate(reference.shape[1:]):
        source_axis = int(np.argmax(np.abs(signed[:, axis])))
        sign = signed[source_axis, axis]
        if prediction.shape[1 + source_axis] != size:
            return None
        expected = 0.0 if sign > 0 else size - 1.0
        if abs(offset[source_axis] - expected) > 1e-3:
            return None
        order.append(1 + source_axis)
        if sign < 0:
            flips.append(1 + axis)
    tensor = prediction.as_tensor() if hasattr(prediction, "as_tensor") else prediction
    tensor = tensor.permute(0, *order)
    tensor = tensor.flip(flips) if flips else tensor.contiguous()
    return MetaTensor(tensor, affine=torch.as_tensor(reference.affine))


def _nearest_on_aligned_grid(prediction: Any, reference: Any) -> Any:
    """Nearest-neighbour resampling by index arithmetic, or None when it does not apply.

    Why: a label map from a bundle that worked on a coarser grid (3 mm) has to come back
    to a 512 x 512 x 300 series; a general resampler builds a coordinate for every
    output voxel (seconds and gigabytes). When each axis of the source grid maps onto
    one axis of the prediction's grid (scaled, shifted, flipped: the usual Spacing and
    Orientation), the nearest voxel along each axis is a rounded linear function of the
    index, and the output is one fancy-indexing step. Voxels that fall outside the
    prediction are 0, as with ``padding_mode="zeros"``.
    """
    import torch
    from monai.data import MetaTensor

    if prediction.ndim != 4 or reference.ndim != 4:
        return None
    to_prediction = _index_map(prediction, reference)
    linear = to_prediction[:3, :3]
    if not np.allclose(linear, np.diag(np.diag(linear)), atol=1e-6):
        return None
    indices, inside = [], []
    for axis, size in enumerate(reference.shape[1:]):
        position = to_prediction[axis, axis] * np.arange(size) + to_prediction[axis, 3]
        index = np.rint(position).astype(np.int64)  # ties to even, as torch rounds
        valid = (index >= 0) & (index < prediction.shape[axis + 1])
        indices.append(np.clip(index, 0, prediction.shape[axis + 1] - 1))
        inside.append(valid)
    # labels arrive as the narrowest integers (_as_label_integers): index the small grid
    source = np.asarray(prediction.detach().cpu().numpy()[0])
    # Built in the volume's own (z, y, x) order, one axis at a time: each np.take
    # copies whole runs (0.02 s for 300 x 512^2, where one np.ix_ index took 0.24 s),
    # and _to_volume_layout then has no transposition left to do (0.29 s).
    out = np.ascontiguousarray(source.transpose(2, 1, 0))
    by_axis = indices[::-1]  # (z, y, x), the layout of ``out``
    for axis in _take_order(out.shape, [len(index) for index in by_axis]):
        out = np.take(out, by_axis[axis], axis=axis)
    x, y, z = inside  # outside the prediction: 0, set in place (no second volume)
    out[~z] = 0
    out[:, ~y] = 0
    out[:, :, ~x] = 0
    tensor = torch.from_numpy(out).permute(2, 1, 0).unsqueeze(0)
    return MetaTensor(tensor, affine=reference.affine)


def _take_order(shape: tuple[int, ...], sizes: list[int]) -> tuple[int, ...]:
    """The order in which to resample the axes of a (z, y, x) array to ``sizes``: the
    one that holds the least memory at once (an axis's input and output), then the one
    that gathers single voxels (x) on the smallest array.

    Why: x, y, z in turn held a 3 mm grid resized in-plane to 512 x 512 but not yet
    along z (1433 slices for a 1000-slice study at 4.3 mm) next to the output: 608 MiB
    at the job's peak, where x, z, y holds 309 MiB and is faster (0.12 s against 0.19 s;
    issue 11's memory target, docs/performance.md).
    """

    def cost(order: tuple[int, ...]) -> tuple[int, int]:
        current, peak = list(shape), 0
        for axis in order:
            before = int(np.prod(current))
            current[axis] = sizes[axis]
            peak = max(peak, before + int(np.prod(current)))
        return peak, order.index(2)

    return min(itertools.permutations(range(len(shape))), key=cost)


def _to_volume_layout(prediction: Any, volume: Volume) -> NDArray[Any]:
    """(1, x, y[, z]) channel-first MONAI layout -> the volume's [slice, row, column]."""
    import torch

    if hasattr(prediction, "detach"):
        tensor = prediction.detach().cpu()
        tensor = tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor  # MetaTensor
    else:
        tensor = torch.as_tensor(np.asarray(prediction))
    tensor = tensor[0]
    if tensor.ndim == 2:
        return np.ascontiguousarray(tensor.numpy().T[np.newaxis])
    # as in volume_to_metatensor: torch's strided copy is the faster transpose
    return tensor.permute(2, 1, 0).contiguous().numpy()


def _as_computed(activation_map: Any) -> Any:
    """GradCAM postprocessing that leaves the upsampled map as it is."""
    return activation_map


def _heatmap(
    bundle: LoadedBundle,
    item: dict[str, Any],
    reference: Any,
    volume: Volume,
    notes: dict[str, Any],
) -> NDArray[np.float32] | None:
    """GradCAM of the predicted class on the network's input, mapped to the source grid.

    A heatmap is an aid for the overlay image; when it cannot be made the result still
    stands, and the note says why.
    """
    import torch
    from monai.data import MetaTensor
    from monai.visualize import GradCAM

    try:
        image = item[bundle.spec.input_key]
        batch = image.unsqueeze(0).to(bundle.device).as_tensor().requires_grad_(True)
        # MONAI's default postprocessing maps (min, max) to (1, 0): it flips the map, so
        # the overlay was hottest everywhere but the finding (acceptance run). The map
        # is taken as computed and scaled to 0..1 below, high where the class is.
        cam = GradCAM(
            nn_module=bundle.network,
            target_layers=bundle.spec.heatmap_layer,
            postprocessing=_as_computed,
        )
        with torch.enable_grad():
            heat = cam(x=batch)[0].detach().float().cpu()  # (1, spatial...) in input space
        mapped = MetaTensor(heat, meta=dict(image.meta))
        mapped.applied_operations = list(getattr(image, "applied_operations", []))
        inverted = bundle.preprocessing.inverse({bundle.spec.input_key: mapped})
        heat = _to_source_grid(inverted[bundle.spec.input_key], reference, "bilinear", notes)
        array = _to_volume_layout(heat, volume)
        low, high = float(array.min()), float(array.max())
        return ((array - low) / (high - low if high > low else 1.0)).astype(np.float32)
    except Exception as exc:  # the heatmap is optional; the classification stands
        notes["heatmap_error"] = f"{type(exc).__name__}: {exc}"
        return None
