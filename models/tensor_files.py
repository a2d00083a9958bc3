"""Safetensors files whose bytes depend only on what they hold.

The safetensors writer keeps the header's metadata in a hash map whose order changes from one process
to the next, so the same tensors and metadata written twice gave files of different SHA-256 (a bundle's
digests, issue "One detector spec"). The header is rewritten here as JSON with sorted keys; tensor data
offsets are relative to the end of the header, so the data is kept byte for byte.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

# The safetensors format pads the header with spaces to a multiple of 8 bytes.
_ALIGN = 8


def write_tensor_file(path: Path, serialised: bytes) -> Path:
    """Write `serialised` (the bytes of `safetensors.numpy.save` or `safetensors.torch.save`) to `path`
    with its header's keys sorted."""
    size = struct.unpack("<Q", serialised[:8])[0]
    header = json.loads(serialised[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % _ALIGN)
    path = Path(path)
    path.write_bytes(struct.pack("<Q", len(text)) + text + serialised[8 + size:])
    return path
