"""OE-SDN networks as safetensors `state_dict` files that carry the hyper-parameters to rebuild them.

safetensors holds tensors only, so loading never runs pickled code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save
from torch import nn

from patchline.models.images import pick_device
from patchline.models.oesdn.autoencoder import ConvAutoencoder
from patchline.models.oesdn.sdn import StyleDistillationNetwork
from patchline.models.tensor_files import write_tensor_file

_KINDS: dict[str, type[nn.Module]] = {"autoencoder": ConvAutoencoder, "sdn": StyleDistillationNetwork}


def save_network(model: ConvAutoencoder | StyleDistillationNetwork, path: Path) -> Path:
    """Write `model`'s weights and hyper-parameters to `path` (a .safetensors file); returns `path`."""
    kind = next((name for name, cls in _KINDS.items() if isinstance(model, cls)), None)
    if kind is None:
        raise ValueError(f"save_network expects a ConvAutoencoder or StyleDistillationNetwork, got {type(model).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    return write_tensor_file(path, save(tensors, metadata={"kind": kind,
                                                            "hyperparameters": json.dumps(model.hyperparameters)}))


def load_autoencoder(path: Path, device: torch.device | None = None) -> ConvAutoencoder:
    """The autoencoder saved at `path`, in eval mode on `device` (CUDA when present by default)."""
    return _load(Path(path), "autoencoder", device)


def load_sdn(path: Path, device: torch.device | None = None) -> StyleDistillationNetwork:
    """The style-distillation network saved at `path`, in eval mode on `device` (CUDA when present by default)."""
    return _load(Path(path), "sdn", device)


def _load(path: Path, kind: str, device: torch.device | None) -> nn.Module:
    if not path.is_file():
        raise ValueError(f"{path}: checkpoint file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors checkpoint: {error}") from error
    if metadata.get("kind") != kind:
        raise ValueError(f"{path}: holds a {metadata.get('kind', 'unlabelled')!r} network, expected {kind!r}")
    model = _KINDS[kind](**json.loads(metadata["hyperparameters"]))
    model.load_state_dict(tensors)
    return model.to(device or pick_device()).eval()
