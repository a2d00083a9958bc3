"""Turning decoded uint8 images into the float tensors every detector consumes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from patchline.models.image_arrays import colour_channels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def images_to_tensor(images: Sequence[np.ndarray], size: int, channels: int = 3) -> torch.Tensor:
    """Stack uint8 images (H, W) or (H, W, C) into a float (N, channels, size, size) batch in [0, 1].

    Greyscale is replicated when `channels` is 3 and RGB is averaged when it is 1, so one line can
    mix both. Resizing is bilinear with antialiasing, the same as the published ELPV protocol uses.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    tensors = []
    for index, image in enumerate(images):
        # np.array copies: torch must not alias read-only arrays (the cached ELPV set is read-only).
        tensors.append(torch.from_numpy(np.array(colour_channels(image, index))).permute(2, 0, 1))
    if not tensors:
        return torch.empty((0, channels, size, size))
    # Resizing before replicating grey to 3 channels does a third of the work (~40 % of extraction).
    same_shape = len({t.shape for t in tensors}) == 1
    groups = [torch.stack(tensors)] if same_shape else [t[None] for t in tensors]
    resized = [_resize(group.float() / 255.0, size) for group in groups]
    batch = torch.cat([_to_channels(group, channels) for group in resized])
    return batch.clamp_(0.0, 1.0)


def _resize(batch: torch.Tensor, size: int) -> torch.Tensor:
    if batch.shape[2:] == (size, size):
        return batch
    return F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def resize_exportable(batch: torch.Tensor, size: int) -> torch.Tensor:
    """The resize of `images_to_tensor` for exported graphs: for any input size (the identity at `size`,
    so the graph needs no branch on the input's shape), as two matrix products. ONNX's antialiased Resize
    would do, but OpenVINO computes it otherwise (PatchCore's scores moved by 3 %); matrices are the same
    on every runtime."""
    rows = _antialias_weights(batch.shape[2], size, batch.dtype)
    columns = _antialias_weights(batch.shape[3], size, batch.dtype)
    return rows @ batch @ columns.T


def _antialias_weights(cells: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """(size, cells): bilinear resampling of `cells` values to `size` with PyTorch's antialiasing: the
    triangle filter stretched by the scale when shrinking, centred on each output pixel, weights summing to 1."""
    centres = (torch.arange(size, dtype=dtype) + 0.5) * cells / size
    stretch = (torch.ones((), dtype=dtype) * cells / size).clamp_min(1.0)
    taps = torch.arange(cells, dtype=dtype) + 0.5
    weights = (1.0 - (taps[None] - centres[:, None]).abs() / stretch).clamp_min(0.0)
    return weights / weights.sum(1, keepdim=True)


def _to_channels(batch: torch.Tensor, channels: int) -> torch.Tensor:
    if batch.shape[1] == channels:
        return batch
    return batch.mean(1, keepdim=True) if channels == 1 else batch.expand(-1, 3, -1, -1)


def imagenet_normalize(batch: torch.Tensor) -> torch.Tensor:
    """Normalise a (N, 3, H, W) batch in [0, 1] with the ImageNet mean and std."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    return (batch - mean) / std


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
