"""Decoding image files with errors that say which file is wrong and how."""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class BadImageError(ValueError):
    """An image or mask file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def decode_image(path: Path) -> np.ndarray:
    """Decode an image file fully into uint8 (H, W, 1) or (H, W, 3) pixels."""
    if not path.is_file():
        raise BadImageError(path, "file not found")
    if path.stat().st_size == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    return _decode(path, path)


def decode_image_bytes(data: bytes, name: str) -> np.ndarray:
    """Decode an encoded image (the bytes of a PNG, JPEG, … file) as `decode_image` does; `name` is for errors."""
    if not data:
        raise BadImageError(name, "empty image (0 bytes)")
    return _decode(io.BytesIO(data), name)


def _decode(file: Path | BinaryIO, name: Path | str) -> np.ndarray:
    try:
        with Image.open(file) as image:
            # load() forces a full decode: Image.open alone reads only the header and misses truncation.
            image.load()
            pixels = _to_uint8(image)
    except UnidentifiedImageError:
        raise BadImageError(name, "not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImageError(name, f"truncated or corrupt image ({error})") from None
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise BadImageError(name, f"image has no pixels (size {pixels.shape[1]}x{pixels.shape[0]})")
    return pixels


def decode_mask(path: Path) -> np.ndarray:
    """Decode a ground-truth mask into a boolean (H, W) array (any non-zero pixel is defective)."""
    pixels = decode_image(path)
    return pixels.max(axis=2) > 0


def _to_uint8(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit inspection cameras are common; scale to 8 bits so every detector sees one range.
        wide = np.asarray(image, dtype=np.float64)
        span = wide.max() - wide.min()
        scaled = (wide - wide.min()) / span * 255.0 if span else np.zeros_like(wide)
        return scaled.round().astype(np.uint8)[:, :, None]
    if image.mode in ("L", "1"):
        return np.asarray(image.convert("L"), dtype=np.uint8)[:, :, None]
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
