"""A MONAI Bundle becomes a pipeline: what it says about itself, and its loaded parts.

Why the bundle's own config is the pipeline: a model is only correct with the exact
preprocessing it was trained with. So radnode reads ``configs/inference.json|yaml`` with
``monai.bundle.ConfigParser`` and uses the bundle's ``network_def``, ``preprocessing``,
``inferer`` and ``postprocessing`` as shipped. It changes only what cannot work inside
a DICOM node:

* every ``LoadImage``/``LoadImaged`` becomes an identity: the node hands the
  preprocessing an in-memory volume exactly as ``LoadImaged`` would have produced it
  (a channel-less ``MetaTensor`` whose affine carries the DICOM geometry), so
  ``Orientationd``, ``Spacingd`` and ``Invertd`` work as the author intended
  (``LoadImaged`` becomes :class:`service.pipeline.handover.HandOverd`, which lets
  the input volume go once it is resampled);
* every ``SaveImage``/``SaveImaged`` (and classification ``AsDiscrete``, which would
  turn probabilities into a one-hot vector) becomes an identity: results go to the
  DICOM writers instead of files;
* ``AsDiscrete``/``AsDiscreted`` of a segmentation or reconstruction bundle become
  :mod:`service.pipeline.argmax`'s, which give the same labels from a faster argmax
  (torch's own took a sixth of a 300-slice CT job);
* MONAI's affine resampling (``Spacingd``, ``Invertd``) samples its output a slab at
  a time (:mod:`service.pipeline.resample`): the same voxels without a grid for the
  whole output in memory;
* ``pretrained`` switches in ``network_def`` are turned off (a bundle must never
  download), ``bundle_root`` points at the bundle folder and ``device`` at the device
  radnode chose.

Bundle configs evaluate Python expressions (``$...``): the ``models/`` folder is trusted
code, like a plugin directory, and must be writable only by the administrator.

``configs/metadata.json`` is the bundle's own file. MONAI's keys say the version and the
``network_data_format``; a documented ``radnode`` section adds what DICOM outputs need
(task kind, expected input, coded labels)::

    "radnode": {
      "task": "segmentation",
      "input": {"modalities": ["CT"], "dimensions": 3, "min_extent_mm": 200},
      "labels": [{"value": 1, "name": "liver",
                  "finding": {"value": "10200004", "scheme": "SCT", "meaning": "Liver"},
                  "category": {"value": "123037004", "scheme": "SCT",
                               "meaning": "Anatomical Structure"}}],
      "heatmap": {"target_layer": "class_layers.relu"}
    }

``min_extent_mm`` (optional, 3D): the shortest scanned length along the slice axis the
model was trained on; a series that covers less is refused before the model runs.

A classifier says how its outputs become probabilities with ``"activation"``:
``softmax`` (mutually exclusive classes: the most probable is present), ``sigmoid``
(independent findings, each present at its label's ``threshold``, 0.5 by default) or
``none`` (the outputs are probabilities already: a network that ends in its own
softmax says ``"exclusive": true`` beside it). A label with ``"normal": true`` is a
normal class ("no finding"): present, it is no abnormal result. Without
``activation``, an activation in the bundle's postprocessing says it; failing that,
radnode guesses from the values and says so in the job's notes.

A bundle without that section (an unmodified model-zoo bundle) still runs: the task kind
and the label names come from ``network_data_format`` (``outputs.pred.format`` /
``type`` and ``channel_def``), with no codes.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import RadnodeError
from service.pipeline.result import BundleIdentity, CodedConcept, Label, TaskKind

#: Transforms that read or write files; radnode swaps them for identities.
_LOADERS = frozenset({"LoadImage", "LoadImaged", "LoadImageD", "LoadImageDict"})
_SAVERS = frozenset(
    {"SaveImage", "SaveImaged", "SaveImageD", "SaveImageDict", "SaveClassification",
     "SaveClassificationd", "SaveClassificationD"}
)  # fmt: skip
#: Transforms that turn classification probabilities into labels; radnode keeps probabilities.
_DISCRETISERS = frozenset({"AsDiscrete", "AsDiscreted", "AsDiscreteD", "AsDiscreteDict"})
_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
_WEIGHT_NAMES = ("model.pt", "model.ts")


class BundleError(RadnodeError):
    """A bundle cannot be used: its folder, metadata, config or weights are wrong.

    The message names the bundle and the file, and says what to fix.
    """


@dataclass(frozen=True)
class BundleSpec:
    """What a bundle folder says about itself, read without importing torch.

    ``name`` is the folder name: routes name pipelines by it.
    """

    name: str
    path: Path
    config_file: Path
    weights_file: Path
    identity: BundleIdentity
    labels: tuple[Label, ...]
    #: Modalities the bundle expects (empty: any).
    modalities: tuple[str, ...]
    #: 2 for single images (radiographs), 3 for volumes.
    dimensions: int
    #: Shortest scanned length (mm, along the slice axis) the model was trained on: a
    #: shorter series is refused, not run (None: any).
    min_extent_mm: float | None = None
    #: Dotted module path inside the network for GradCAM (classification only).
    heatmap_layer: str | None = None
    #: Whether metadata.json has a ``radnode`` section (else everything was inferred).
    has_radnode_section: bool = False
    #: Classification: ``radnode.activation`` (softmax, sigmoid, none), None if not said.
    activation: str | None = None
    #: Classification: ``radnode.exclusive``, whether the classes are mutually exclusive
    #: (None: as the activation says, softmax yes).
    exclusive: bool | None = None
    input_key: str = "image"
    output_key: str = "pred"


def find_weights(path: Path) -> Path | None:
    """The bundle's weights file (``models/model.pt`` or ``models/model.ts``), if present."""
    candidates = (path / "models" / name for name in _WEIGHT_NAMES)
    return next((weights for weights in candidates if weights.is_file()), None)


def read_bundle_spec(path: Path, *, require_weights: bool = True) -> BundleSpec:
    """Read a bundle folder's metadata; raise :class:`BundleError` saying what is wrong.

    ``require_weights=False`` is for training: the weights file may not exist yet
    (``weights_file`` is then ``models/model.pt``, where training writes it).
    """
    path = Path(path)
    configs = path / "configs"
    meta_file = configs / "metadata.json"
    if not meta_file.is_file():
        raise BundleError(f"bundle {path.name}: {meta_file} is missing; is this a MONAI Bundle?")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle {path.name}: cannot read {meta_file}: {exc}") from exc
    config_file = next((configs / n for n in _CONFIG_NAMES if (configs / n).is_file()), None)
    if config_file is None:
        raise BundleError(
            f"bundle {path.name}: no configs/inference.json or .yaml; radnode runs a bundle's"
            " inference config"
        )
    weights = find_weights(path)
    if weights is None and not require_weights:
        weights = path / "models" / "model.pt"
    if weights is None:
        installer = path / "scripts" / "install_weights.py"
        remedy = (
            f"install them once with: python {installer}"
            if installer.is_file()
            else "train the bundle or copy its weights there"
        )
        raise BundleError(
            f"bundle {path.name}: no models/model.pt or models/model.ts; {remedy}"
            " (radnode never downloads weights at run time)"
        )
    section = meta.get("radnode") or {}
    kind = _task_kind(path.name, meta, section)
    identity = BundleIdentity(
        name=path.name,
        version=str(meta.get("version", "0")),
        kind=kind,
        description=str(meta.get("description", "")),
        authors=str(meta.get("authors", "")),
    )
    inputs = section.get("input", {})
    image_format = _data_format(meta, "inputs", "image")
    modalities = inputs.get("modalities") or (
        [image_format["modality"]] if image_format.get("modality") else []
    )
    dimensions = int(inputs.get("dimensions") or len(image_format.get("spatial_shape", [0] * 3)))
    if dimensions not in (2, 3):
        raise BundleError(f"bundle {path.name}: input dimensions must be 2 or 3, not {dimensions}")
    heatmap = section.get("heatmap") or {}
    return BundleSpec(
        name=path.name,
        path=path,
        config_file=config_file,
        weights_file=weights,
        identity=identity,
        labels=_labels(path.name, meta, section, kind),
        modalities=tuple(str(m).upper() for m in modalities),
        dimensions=dimensions,
        min_extent_mm=_optional_number(
            path.name,
            inputs.get("min_extent_mm"),
            "radnode.input.min_extent_mm",
            lambda x: x > 0,
            "a positive number",
        ),
        heatmap_layer=heatmap.get("target_layer"),
        has_radnode_section=bool(section),
        activation=_declared_activation(path.name, section),
        exclusive=None if section.get("exclusive") is None else bool(section["exclusive"]),
        input_key=_only_key(meta, "inputs", "image"),
        output_key=_only_key(meta, "outputs", "pred"),
    )


#: ``radnode.activation`` of a classifier: how its outputs become probabilities.
ACTIVATIONS = ("softmax", "sigmoid", "none")


def _declared_activation(name: str, section: dict[str, Any]) -> str | None:
    value = section.get("activation")
    if value is None:
        return None
    if str(value).lower() not in ACTIVATIONS:
        raise BundleError(
            f"bundle {name}: radnode.activation {value!r} is not one of {', '.join(ACTIVATIONS)}"
        )
    return str(value).lower()


def _optional_number(
    name: str, value: object, where: str, valid: Callable[[float], bool], must_be: str
) -> float | None:
    """A number of the ``radnode`` section, None when absent; refused unless ``valid``."""
    if value is None:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")  # fails every check
    if not valid(number):
        raise BundleError(f"bundle {name}: {where} must be {must_be}")
    return number


def discover_bundles(models_dir: Path) -> tuple[dict[str, BundleSpec], dict[str, str]]:
    """Every bundle under ``models_dir``: (specs by name, problems by folder name).

    A broken bundle does not hide the others; its problem is reported by name.
    """
    specs: dict[str, BundleSpec] = {}
    problems: dict[str, str] = {}
    if not Path(models_dir).is_dir():
        return specs, {str(models_dir): f"models folder {models_dir} does not exist"}
    for folder in sorted(Path(models_dir).iterdir()):
        if not folder.is_dir() or folder.name.startswith((".", "_")):
            continue
        if not (folder / "configs").is_dir():
            continue
        try:
            specs[folder.name] = read_bundle_spec(folder)
        except BundleError as exc:
            problems[folder.name] = str(exc)
    return specs, problems


def bundle_identity(models_dir: Path, name: str) -> BundleIdentity:
    """Who bundle ``name`` is (name, version, task) without loading it; for a bundle
    that cannot be found here (the edge of workers on other machines), its name and
    version "unknown": enough to sign a "not analyzed" report."""
    try:
        specs, _ = discover_bundles(Path(models_dir))
    except OSError:
        specs = {}
    if name in specs:
        return specs[name].identity
    return BundleIdentity(name, "unknown", TaskKind.CLASSIFICATION)


def _only_key(meta: dict[str, Any], direction: str, default: str) -> str:
    """The data key of the bundle's one input (or output), as its metadata names it
    (``network_data_format``); ``default`` (MONAI's own convention) otherwise. A bundle
    written for ``img``/``seg`` failed with a message about a transform, not the key
    (found by review)."""
    found = meta.get("network_data_format", {}).get(direction, {})
    if isinstance(found, dict) and len(found) == 1:
        (key,) = found
        return str(key)
    return default


def _data_format(meta: dict[str, Any], direction: str, key: str) -> dict[str, Any]:
    found = meta.get("network_data_format", {}).get(direction, {})
    entry = found.get(key) or (next(iter(found.values())) if found else {})
    return entry if isinstance(entry, dict) else {}


def _task_kind(name: str, meta: dict[str, Any], section: dict[str, Any]) -> TaskKind:
    if "task" in section:
        try:
            return TaskKind(str(section["task"]).lower())
        except ValueError:
            choices = ", ".join(k.value for k in TaskKind)
            raise BundleError(
                f"bundle {name}: radnode.task {section['task']!r} is not one of {choices}"
            ) from None
    out = _data_format(meta, "outputs", "pred")
    fmt = str(out.get("format", "")).lower()
    kind = str(out.get("type", "")).lower()
    if "segment" in fmt or "label" in fmt:
        return TaskKind.SEGMENTATION
    if kind in ("probabilities", "probability", "classes", "class") or fmt in ("classes",):
        return TaskKind.CLASSIFICATION
    if kind == "image":
        return TaskKind.RECONSTRUCTION
    raise BundleError(
        f"bundle {name}: cannot tell the task from network_data_format.outputs; add"
        ' "radnode": {"task": "segmentation|classification|reconstruction"} to metadata.json'
    )


def _concept(name: str, raw: Any, where: str) -> CodedConcept | None:
    if raw is None:
        return None
    try:
        return CodedConcept(str(raw["value"]), str(raw["scheme"]), str(raw["meaning"]))
    except (KeyError, TypeError):
        raise BundleError(
            f"bundle {name}: {where} must be an object with value, scheme and meaning"
        ) from None


def _labels(
    name: str, meta: dict[str, Any], section: dict[str, Any], kind: TaskKind
) -> tuple[Label, ...]:
    if section.get("labels"):
        labels = []
        for i, raw in enumerate(section["labels"]):
            where = f"radnode.labels[{i}]"
            if "value" not in raw or "name" not in raw:
                raise BundleError(f"bundle {name}: {where} needs value and name")
            labels.append(
                Label(
                    value=int(raw["value"]),
                    name=str(raw["name"]),
                    finding=_concept(name, raw.get("finding"), f"{where}.finding"),
                    category=_concept(name, raw.get("category"), f"{where}.category"),
                    normal=bool(raw.get("normal", False)),
                    threshold=_optional_number(
                        name,
                        raw.get("threshold"),
                        f"{where}.threshold",
                        lambda x: 0 < x < 1,
                        "a probability in (0, 1)",
                    ),
                )
            )
        return tuple(labels)
    channels = _data_format(meta, "outputs", "pred").get("channel_def") or {}
    labels = [Label(int(k), str(v)) for k, v in sorted(channels.items(), key=lambda i: int(i[0]))]
    if kind is TaskKind.SEGMENTATION:
        labels = [label for label in labels if label.value != 0]
    return tuple(labels)


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedBundle:
    """A bundle's network and transforms, ready to run on one device.

    Not thread-safe: one worker thread uses one LoadedBundle at a time.
    """

    spec: BundleSpec
    device: Any  # torch.device
    network: Any  # torch.nn.Module (or TorchScript module)
    preprocessing: Callable[[Any], Any]
    inferer: Callable[..., Any]
    postprocessing: Callable[[Any], Any] | None
    swapped: tuple[str, ...]
    #: The config's ``amp`` (mixed precision on CUDA); true when it has none.
    amp: bool = True
    #: The activation the bundle's postprocessing applies (softmax, sigmoid), if any.
    applied_activation: str | None = None


def choose_device(preferred: str | None = None) -> Any:
    """``preferred`` if given, else the first CUDA device when torch sees one, else CPU."""
    import torch

    if preferred:
        return torch.device(preferred)
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


_IMPORT_LOCK = threading.Lock()


@contextlib.contextmanager
def _bundle_on_path(path: Path) -> Iterator[None]:
    """Let the config import the bundle's own ``scripts`` package, and only this one's."""
    with _IMPORT_LOCK:
        stale = [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]
        for module in stale:
            del sys.modules[module]
        sys.path.insert(0, str(path))
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):
                sys.path.remove(str(path))


def load_bundle(spec: BundleSpec, device: Any = None, *, weights: bool = True) -> LoadedBundle:
    """Parse the inference config, swap file I/O for identities, load the weights.

    ``weights=False`` leaves ``network_def`` freshly initialised (and in training mode):
    the bundle's training scripts train exactly the network and transforms radnode runs.
    Raises :class:`BundleError` with the bundle name and what to fix.
    """
    import torch
    from monai.bundle import ConfigParser

    from service.pipeline import resample

    resample.install()
    device = torch.device(device) if device is not None else choose_device()
    parser = ConfigParser()
    try:
        parser.read_config(str(spec.config_file))
        parser.read_meta(str(spec.path / "configs" / "metadata.json"))
    except Exception as exc:
        raise BundleError(
            f"bundle {spec.name}: cannot read {spec.config_file.name}: {exc}"
        ) from exc
    for key in ("network_def", "preprocessing", "inferer"):
        if key not in parser:
            raise BundleError(
                f"bundle {spec.name}: {spec.config_file.name} has no '{key}'; radnode runs"
                " network_def, preprocessing, inferer and postprocessing"
            )
    parser["bundle_root"] = str(spec.path)
    parser["device"] = f"$torch.device('{device}')"
    swapped: list[str] = []
    config = parser.get()
    for key in _transform_keys(config):
        _swap_io(config[key], spec.identity.kind, swapped, key)
    _no_pretrained(config.get("network_def"), swapped)
    parser.set(config)

    with _bundle_on_path(spec.path):
        try:
            preprocessing = parser.get_parsed_content("preprocessing", instantiate=True)
            inferer = parser.get_parsed_content("inferer", instantiate=True)
            postprocessing = (
                parser.get_parsed_content("postprocessing", instantiate=True)
                if "postprocessing" in parser
                else None
            )
            amp = bool(parser.get_parsed_content("amp")) if "amp" in parser else True
            network = (
                _load_network(spec, parser, device, torch)
                if weights
                else parser.get_parsed_content("network_def", instantiate=True).to(device)
            )
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(
                f"bundle {spec.name}: its inference config does not instantiate: {exc}"
            ) from exc
    _check_no_file_io(spec, spec.identity.kind, preprocessing, postprocessing)
    applied = _applied_activation(postprocessing)
    if weights:
        network.eval()
    return LoadedBundle(
        spec=spec,
        device=device,
        network=network,
        preprocessing=preprocessing,
        inferer=inferer,
        postprocessing=postprocessing,
        swapped=tuple(swapped),
        amp=amp,
        applied_activation=applied,
    )


def _applied_activation(postprocessing: Any) -> str | None:
    """``softmax`` or ``sigmoid`` when an ``Activations``/``Activationsd`` of the
    postprocessing applies one (MONAI keeps its switches as attributes, per key for the
    dictionary form), else None."""
    found: list[str] = []

    def walk(transform: Any) -> None:
        if type(transform).__name__.startswith("Activations"):
            for kind in ("softmax", "sigmoid"):
                switch = getattr(transform, kind, False)
                switches = switch if isinstance(switch, (tuple, list)) else (switch,)
                if any(s is True for s in switches):
                    found.append(kind)
        for inner in getattr(transform, "transforms", ()) or ():
            walk(inner)

    if postprocessing is not None:
        walk(postprocessing)
    return found[0] if found else None


#: A reference to another config item: ``@transforms``, ``$@pre + @extra``, ``@a#0``.
_REFERENCE = re.compile(r"@([A-Za-z_]\w*)")
#: Top-level items never rewritten, whoever references them.
_NOT_TRANSFORMS = frozenset({"network_def", "network", "inferer", "bundle_root", "device"})


def _transform_keys(config: dict[str, Any]) -> list[str]:
    """``preprocessing``, ``postprocessing`` and every top-level item they reference,
    directly or through another reference.

    Why: zoo configs give their lists by reference (MONAI's own segmentation_template:
    ``transforms: $@preprocessing_transforms + @deterministic_transforms``). Only the
    two keys were rewritten, so a LoadImaged failed every job, a SaveImaged wrote into
    the bundle folder and a classifier's AsDiscreted turned 0.52 into 1.0 (acceptance
    pass).
    """
    keys = [key for key in ("preprocessing", "postprocessing") if key in config]
    seen = set(keys)
    pending = list(keys)
    while pending:
        for name in _REFERENCE.findall(json.dumps(config[pending.pop()])):
            if name in config and name not in seen and name not in _NOT_TRANSFORMS:
                seen.add(name)
                keys.append(name)
                pending.append(name)
    return keys


def _check_no_file_io(spec: BundleSpec, kind: TaskKind, *transforms: Any) -> None:
    """Refuse a bundle whose instantiated transforms still load or save files (or, for a
    classifier, discretise): built by an expression radnode could not follow, they would
    fail every job or write beside the weights. Better refused at load, naming them."""
    left: list[str] = []

    def walk(transform: Any) -> None:
        name = type(transform).__name__
        discretiser = kind is TaskKind.CLASSIFICATION and name in _DISCRETISERS
        if name in _LOADERS or name in _SAVERS or discretiser:
            left.append(name)
        for inner in getattr(transform, "transforms", ()) or ():
            walk(inner)

    for transform in transforms:
        if transform is not None:
            walk(transform)
    if left:
        raise BundleError(
            f"bundle {spec.name}: its transforms still include {', '.join(sorted(set(left)))}"
            " after radnode replaced the ones it found; they are built by an expression it"
            " cannot follow. List them in preprocessing/postprocessing (or in items those"
            " reference with @name)"
        )


def _target_name(node: dict[str, Any]) -> str:
    target = node.get("_target_")
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else ""


def _swap_io(node: Any, kind: TaskKind, swapped: list[str], where: str) -> None:
    """Replace loaders and savers (and classification discretisers) in place by identities."""
    if isinstance(node, list):
        for item in node:
            _swap_io(item, kind, swapped, where)
        return
    if not isinstance(node, dict):
        return
    name = _target_name(node)
    replace = name in _LOADERS or name in _SAVERS
    replace |= kind is TaskKind.CLASSIFICATION and name in _DISCRETISERS
    if name in _DISCRETISERS and not replace:
        radnode_class = "AsDiscrete" if name == "AsDiscrete" else "AsDiscreted"
        node["_target_"] = f"service.pipeline.argmax.{radnode_class}"
        swapped.append(f"{where}:{name}:argmax")
    if replace:
        dictionary = "keys" in node
        keys = node.get("keys")
        channel_first = bool(node.get("ensure_channel_first")) and name in _LOADERS
        node.clear()
        node["_target_"] = "Identityd" if dictionary else "Identity"
        if dictionary and name in _LOADERS:
            node["_target_"] = "service.pipeline.handover.HandOverd"
            if channel_first:
                node["ensure_channel_first"] = True
        if dictionary:
            node["keys"] = keys
            node["allow_missing_keys"] = True
        swapped.append(f"{where}:{name}")
        return
    for value in node.values():
        _swap_io(value, kind, swapped, where)


def _no_pretrained(node: Any, swapped: list[str]) -> None:
    if isinstance(node, list):
        for item in node:
            _no_pretrained(item, swapped)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in ("pretrained", "pretrained_weights") and value not in (False, None):
                node[key] = False
                swapped.append(f"network_def:{key}")
            else:
                _no_pretrained(value, swapped)


def _state_dicts_of(checkpoint: Any) -> list[Any]:
    """The network's state dict in a checkpoint as trainers save them, then the same
    without a prefix every key has, to try in turn: MONAI's CheckpointSaver (``{"model":
    ...}``), PyTorch Lightning (``{"state_dict": ...}``, keys ``model.``), DataParallel
    and DistributedDataParallel (keys ``module.``). They were reported as weights of
    "another network" (acceptance pass). As saved comes first: MONAI's UNet has keys
    that all start with ``model.`` of its own."""
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    candidates = [checkpoint]
    if isinstance(checkpoint, dict) and checkpoint:
        for prefix in ("module.", "model."):
            if all(isinstance(k, str) and k.startswith(prefix) for k in checkpoint):
                candidates.append({k[len(prefix) :]: v for k, v in checkpoint.items()})
    return candidates


def _load_network(spec: BundleSpec, parser: Any, device: Any, torch: Any) -> Any:
    if spec.weights_file.suffix == ".ts":
        try:
            return torch.jit.load(str(spec.weights_file), map_location=device)
        except Exception as exc:
            raise BundleError(
                f"bundle {spec.name}: models/model.ts is not a TorchScript file: {exc}"
            ) from exc
    network = parser.get_parsed_content("network_def", instantiate=True)
    try:
        state = torch.load(str(spec.weights_file), map_location=device, weights_only=True)
    except Exception as exc:
        # torch's own text is a page about add_safe_globals (acceptance pass)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(
            f"bundle {spec.name}: cannot read models/model.pt as a state dict ({first[:200]});"
            " save the weights with torch.save(network.state_dict(), 'models/model.pt'),"
            " not the whole module"
        ) from exc
    failures: list[RuntimeError] = []
    for candidate in _state_dicts_of(state):
        try:
            network.load_state_dict(candidate, strict=True)
            return network.to(device)
        except RuntimeError as exc:
            failures.append(exc)
    # torch's first line is only "Error(s) in loading state_dict for Conv3d:"; the lines
    # after it name the parameters and shapes that differ (acceptance pass)
    lines = [line.strip() for line in str(failures[0]).splitlines() if line.strip()]
    detail = "; ".join(lines[1:4]) or lines[0]
    detail = detail if len(detail) <= 400 else detail[:399] + "…"
    raise BundleError(
        f"bundle {spec.name}: models/model.pt does not fit network_def ({detail}); the"
        " weights belong to another network or another version of the config"
    ) from failures[0]
