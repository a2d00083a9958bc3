"""The one guarded reader of image files: every failure becomes a `BadImageError` naming the file and why.

Input files come from users' folders and from `patchline score` arguments, so anything may sit there:
links that lead nowhere, named pipes, folders called `x.png`, files this process may not read, and
decompression bombs (a few hundred bytes of PNG that claim billions of pixels). The pixel count is
checked from the header, before any pixel is decoded, against `PATCHLINE_MAX_IMAGE_PIXELS`.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS_ENV = "PATCHLINE_MAX_IMAGE_PIXELS"
# Well above the largest inspection cameras' frames (a 10,000 x 10,000 line-scan tile decodes to
# 300 MB of RGB); a bomb claims far more.
DEFAULT_MAX_PIXELS = 100_000_000

# This module enforces its own limit before decoding; PIL's global one would fire first (and as a
# warning below twice its value) for a user who raises ours.
Image.MAX_IMAGE_PIXELS = None


class BadImageError(ValueError):
    """An image or mask file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def max_image_pixels() -> int:
    """The pixel-count limit of one image: `$PATCHLINE_MAX_IMAGE_PIXELS`, else the default."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(value.replace("_", ""))
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(f"{MAX_PIXELS_ENV}={value!r}: expected a positive whole number of pixels")
    return limit


def folder_entries(folder: Path) -> list[str]:
    """The names in `folder`, sorted; a `BadImageError` naming the folder when it cannot be listed."""
    try:
        return sorted(os.listdir(folder))
    except PermissionError:
        raise BadImageError(folder, "permission denied: the folder cannot be listed") from None
    except OSError as error:
        raise BadImageError(folder, f"the folder cannot be listed ({error.strerror or error})") from None


def entry_problem(path: Path) -> str | None:
    """Why the folder entry `path` cannot be read as an image file, or None when it is a regular file."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return f"broken symbolic link (to {os.readlink(path)})" if path.is_symlink() else "file not found"
    except PermissionError:
        return "permission denied"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"cannot read ({error.strerror or error})"
    if stat.S_ISDIR(info.st_mode):
        return "a folder, not an image file"
    if not stat.S_ISREG(info.st_mode):
        kind = "a named pipe" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) \
            else "a device"
        return f"not a regular file ({kind})"
    if info.st_size == 0:
        return "empty file (0 bytes)"
    return None


def decode_image(path: Path) -> np.ndarray:
    """Decode an image file fully into uint8 (H, W, 1) or (H, W, 3) pixels."""
    problem = entry_problem(path)
    if problem is not None:
        raise BadImageError(path, problem)
    try:
        with path.open("rb") as handle:
            return _decode(handle, path)
    except PermissionError:
        raise BadImageError(path, "permission denied") from None
    except OSError as error:
        raise BadImageError(path, f"cannot read ({error.strerror or error})") from None


def decode_image_bytes(data: bytes, name: str) -> np.ndarray:
    """Decode an encoded image (the bytes of a PNG, JPEG, … file) as `decode_image` does; `name` is for errors."""
    if not data:
        raise BadImageError(name, "empty image (0 bytes)")
    return _decode(io.BytesIO(data), name)


def encoded_image_pixels(data: bytes, name: str) -> int:
    """Width x height of an encoded image, from its header alone (nothing is decoded)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except UnidentifiedImageError:
        raise BadImageError(name, "not an image (unrecognised format)") from None
    except Exception as error:  # noqa: BLE001  a malformed header can make PIL raise almost anything
        raise BadImageError(name, f"truncated or corrupt image ({type(error).__name__}: {error})") from None
    return width * height


def _decode(file: BinaryIO, name: Path | str) -> np.ndarray:
    limit = max_image_pixels()
    try:
        with Image.open(file) as image:
            width, height = image.size
            if width * height > limit:
                raise BadImageError(name, f"image too large: {width}x{height} is {width * height:,} pixels, above "
                                          f"the limit of {limit:,} (set {MAX_PIXELS_ENV} to allow more)")
            # load() forces a full decode: Image.open alone reads only the header and misses truncation.
            image.load()
            pixels = _to_uint8(image)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(name, "not an image (unrecognised format)") from None
    except MemoryError:
        raise BadImageError(name, "image too large to decode in this process's memory") from None
    except Exception as error:  # noqa: BLE001  a malformed file can make PIL's decoders raise almost anything
        raise BadImageError(name, f"truncated or corrupt image ({type(error).__name__}: {error})") from None
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise BadImageError(name, f"image has no pixels (size {pixels.shape[1]}x{pixels.shape[0]})")
    return pixels


def decode_mask(path: Path) -> np.ndarray:
    """Decode a ground-truth mask into a boolean (H, W) array (any non-zero pixel is defective)."""
    pixels = decode_image(path)
    return pixels.max(axis=2) > 0


_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I")


def bits_per_sample(path: Path) -> int:
    """8, or 16 for an image stored with more than 8 bits per pixel (which `decode_image` scales to 8)."""
    with Image.open(path) as image:
        return 16 if image.mode in _WIDE_MODES else 8


def _to_uint8(image: Image.Image) -> np.ndarray:
    if image.mode in _WIDE_MODES:
        # 16-bit inspection cameras are common; scale to 8 bits so every detector sees one range.
        wide = np.asarray(image, dtype=np.float64)
        span = wide.max() - wide.min()
        scaled = (wide - wide.min()) / span * 255.0 if span else np.zeros_like(wide)
        return scaled.round().astype(np.uint8)[:, :, None]
    if image.mode in ("L", "1"):
        return np.asarray(image.convert("L"), dtype=np.uint8)[:, :, None]
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
