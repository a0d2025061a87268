"""Bundle folders that tests write and initialise themselves.

``write_zoo_spleen_bundle`` has the shape of the MONAI model zoo's
``spleen_ct_segmentation`` bundle (UNet; LoadImaged, EnsureChannelFirstd, Orientationd,
Spacingd, ScaleIntensityRanged; SlidingWindowInferer; Activationsd, Invertd, AsDiscreted,
SaveImaged), with no ``radnode`` section in its metadata: the host must run it as
shipped. Its weights are seeded random values (no download is possible here), which is
enough to test geometry, not quality.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SPLEEN_METADATA: dict[str, Any] = {
    "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
    "0.8.1/meta_schema_20220324.json",
    "version": "0.5.0",
    "changelog": {"0.5.0": "test bundle with the zoo's layout"},
    "monai_version": "1.6.1",
    "pytorch_version": "2.13.0",
    "name": "Spleen CT segmentation (test shape)",
    "task": "Decathlon spleen segmentation",
    "description": "Random weights in the layout of the zoo's spleen_ct_segmentation",
    "authors": "radnode tests",
    "copyright": "none",
    "network_data_format": {
        "inputs": {
            "image": {
                "type": "image",
                "format": "hounsfield",
                "modality": "CT",
                "num_channels": 1,
                "spatial_shape": [96, 96, 96],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": {"0": "image"},
            }
        },
        "outputs": {
            "pred": {
                "type": "image",
                "format": "segmentation",
                "num_channels": 2,
                "spatial_shape": [96, 96, 96],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": {"0": "background", "1": "spleen"},
            }
        },
    },
}


def spleen_inference_config(network_def: dict[str, Any] | None = None) -> dict[str, Any]:
    """The zoo bundle's inference config, optionally with another ``network_def``."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data/Task09_Spleen",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def
        or {
            "_target_": "UNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 2,
            "channels": [16, 32, 64, 128, 256],
            "strides": [2, 2, 2, 2],
            "num_res_units": 2,
            "norm": "batch",
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {
                    "_target_": "Spacingd",
                    "keys": "image",
                    "pixdim": [1.5, 1.5, 2.0],
                    "mode": "bilinear",
                },
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -57,
                    "a_max": 164,
                    "b_min": 0,
                    "b_max": 1,
                    "clip": True,
                },
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': i} for i in @datalist]",
            "transform": "@preprocessing",
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [96, 96, 96],
            "sw_batch_size": 4,
            "overlap": 0.5,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "seg",
                    "separate_folder": True,
                },
            ],
        },
        "checkpointloader": {
            "_target_": "CheckpointLoader",
            "load_path": "$@bundle_root + '/models/model.pt'",
            "load_dict": {"model": "@network"},
        },
        "initialize": ["$monai.utils.set_determinism(seed=123)"],
        "run": ["$@evaluator.run()"],
    }


def write_bundle(
    root: Path, name: str, metadata: dict[str, Any], config: dict[str, Any], network: Any
) -> Path:
    """Write a bundle folder with ``network``'s state dict as models/model.pt."""
    folder = root / name
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    (folder / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    torch.save(network.state_dict(), folder / "models" / "model.pt")
    return folder


def write_zoo_spleen_bundle(root: Path, name: str = "spleen_ct_segmentation") -> Path:
    """The zoo-shaped spleen bundle with seeded random UNet weights."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="batch")
    return write_bundle(root, name, SPLEEN_METADATA, spleen_inference_config(), net)


#: Scaled intensity above which the threshold network says "class 1" (about 140 HU
#: after the spleen window -57..164 HU): in the CT phantom that is bone (700 HU).
THRESHOLD = 0.9


def write_threshold_bundle(root: Path, name: str = "bone_threshold") -> Path:
    """The zoo spleen layout with a 1x1x1 convolution that thresholds intensity.

    A model whose right answer is known exactly: after the bundle's own Orientationd,
    Spacingd and Invertd, its mask must lie on the source voxels above the threshold.
    """
    conv = torch.nn.Conv3d(1, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1, 0] = 50.0  # logit of class 1 = 50 * (x - THRESHOLD)
        conv.bias[1] = -50.0 * THRESHOLD
    network_def = {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2,
                   "kernel_size": 1}  # fmt: skip
    meta = json.loads(json.dumps(SPLEEN_METADATA))
    meta["network_data_format"]["outputs"]["pred"]["channel_def"] = {"0": "other", "1": "bone"}
    return write_bundle(root, name, meta, spleen_inference_config(network_def), conv)


CLASSIFIER_METADATA: dict[str, Any] = {
    "version": "0.1.0",
    "monai_version": "1.6.1",
    "pytorch_version": "2.13.0",
    "name": "Chest radiograph classifier (test shape)",
    "task": "Nodule classification",
    "description": "Random weights; tests the 2D classification path only",
    "authors": "radnode tests",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "modality": "DX", "num_channels": 1,
                             "spatial_shape": [224, 224]}},
        "outputs": {"pred": {"type": "probabilities", "format": "classes", "num_channels": 2,
                             "channel_def": {"0": "no nodule", "1": "nodule"}}},
    },
    "radnode": {
        "task": "classification",
        "input": {"modalities": ["DX", "CR"], "dimensions": 2},
        "labels": [
            {"value": 1, "name": "lung nodule",
             "finding": {"value": "786838002", "scheme": "SCT", "meaning": "Pulmonary nodule"}}
        ],
        "heatmap": {"target_layer": "class_layers.relu"},
    },
}  # fmt: skip


def write_classifier_bundle(root: Path, name: str = "cxr_test_classifier") -> Path:
    """A 2D DenseNet121 classification bundle (seeded random weights) as a zoo author writes it."""
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    config = {
        "network_def": {"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 1,
                        "out_channels": 2},
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "ScaleIntensityRangePercentilesd", "keys": "image", "lower": 0.5,
                 "upper": 99.5, "b_min": 0.0, "b_max": 1.0, "clip": True},
                {"_target_": "Resized", "keys": "image", "spatial_size": [224, 224]},
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True, "to_onehot": 2},
            ],
        },
    }  # fmt: skip
    return write_bundle(root, name, CLASSIFIER_METADATA, config, net)
