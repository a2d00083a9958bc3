"""A Zarr v3 store of patch features (image x patch x dim), one per product line and backbone config.

Layout under `<root>/<line>/<config hash>/`: `features` (float32, one chunk per block of images,
Blosc-compressed), `ids` (the image id of every row) and `rows` (one chunk per block: how many images
the block holds, 0 = not committed). A block's features and ids are written first and its `rows`
entry last, so the `rows` entry is the commit marker: a writer killed at any point leaves at most an
uncommitted block, which readers never see and the next writer overwrites. On local directories
(`file://` URLs included) and object stores every chunk write replaces a whole object (an atomic
rename, a single PUT), so no torn chunk can be read either; other fsspec filesystems may tear one.
Writers of a local store take turns, batch by batch, under a file lock (`writer.lock`), so two
processes writing one store never overwrite each other's blocks; on an object store one writer at a
time is the caller's to keep.

The store is keyed by the backbone config alone, so it keeps growing night after night and only new
images (by content hash) are extracted; `feature_key` identifies one training set's features in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
import zarr.codecs
import zarr.errors
import zarr.storage

from patchline.storage.locks import exclusive_lock

log = logging.getLogger(__name__)

FORMAT = "patchline-features/1"
# Beside a local store's arrays: the lock its writers take, and how many blocks were committed when the
# last writer let go, so a writer reloads the index only when another one wrote in between.
WRITER_LOCK, COMMITTED_BLOCKS = "writer.lock", "committed_blocks"
# A block (one chunk) of about this size keeps reads efficient and a writer's memory small.
_BLOCK_BYTES = 32 * 2**20
_COMPRESSOR = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
# A CRC-32C of each compressed chunk, checked on every read: flipped bytes in a chunk otherwise decode to
# other features, silently (stores written before it have none, and are read unchecked).
_CHECKSUM = zarr.codecs.Crc32cCodec()


class FeatureStoreDamagedError(ValueError):
    """A chunk of stored features failed its checksum; the message names the store and the images."""


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable 16-hex-digit hash of a JSON-serialisable config (key order does not matter)."""
    try:
        text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    except TypeError as error:
        raise ValueError(f"feature config must be JSON-serialisable: {error}") from error
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_fingerprint(image_ids: Iterable[str]) -> str:
    """Stable 16-hex-digit hash of a set of image ids (order and repeats do not matter)."""
    digest = hashlib.sha256()
    for image_id in sorted(set(image_ids)):
        digest.update(image_id.encode() + b"\n")
    return digest.hexdigest()[:16]


def feature_key(config: Mapping[str, Any], image_ids: Iterable[str]) -> str:
    """`<config hash>-<data fingerprint>`: names the features of exactly these images under this config."""
    return f"{config_hash(config)}-{data_fingerprint(image_ids)}"


class FeatureStore:
    """Patch features of one line and backbone config; open with `FeatureStore.open`."""

    def __init__(self, group: zarr.Group, block_images: int | None) -> None:
        self._group = group
        self._requested_block = block_images
        self._positions: dict[str, int] = {}
        self._order: list[str] = []
        self._blocks: list[int] = []
        # `rows` is created last, so without it any other array is a leftover of an interrupted creation.
        self._arrays: tuple[zarr.Array, zarr.Array, zarr.Array] | None = None
        self._reload()

    @classmethod
    def open(cls, root: str | os.PathLike, line: str, config: Mapping[str, Any], *,
             block_images: int | None = None, read_only: bool = False,
             storage_options: Mapping[str, Any] | None = None) -> FeatureStore:
        """The store for `line` and `config` under `root` (a directory or any fsspec URL), created if absent.

        `block_images` sets images per chunk for a new store (default: about 32 MB per chunk);
        `storage_options` go to fsspec (credentials, endpoints).
        """
        if not line or "/" in line:
            raise ValueError(f"line must be a non-empty name without '/', got {line!r}")
        if block_images is not None and block_images < 1:
            raise ValueError(f"block_images must be >= 1, got {block_images}")
        path = f"{line}/{config_hash(config)}"
        # Zarr's own local store writes by atomic rename and creates folders; fsspec's does neither.
        root = os.fspath(root).removeprefix("file://")
        options = dict(storage_options) if storage_options else None
        if read_only:
            try:
                group = zarr.open_group(root, mode="r", path=path, storage_options=options)
            except FileNotFoundError as error:
                raise ValueError(f"no feature store for line {line!r} and this config under {root}") from error
        else:
            try:
                group = zarr.open_group(root, mode="a", path=path, storage_options=options)
            except zarr.errors.ContainsGroupError:
                # Another writer created the new store between this one's look and its create: open theirs.
                group = zarr.open_group(root, mode="a", path=path, storage_options=options)
            if "config" not in group.attrs:
                group.attrs.update({"format": FORMAT, "line": line, "config": json.loads(json.dumps(config))})
        stored = group.attrs.get("config")
        if group.attrs.get("format") != FORMAT or stored != json.loads(json.dumps(config)):
            raise ValueError(f"{root}/{path} holds a different store (format {group.attrs.get('format')!r}, "
                             f"config {stored!r}); expected this config: {dict(config)!r}")
        return cls(group, block_images)

    @property
    def path(self) -> str:
        """Where the store lives, for messages."""
        return f"{self._group.store}/{self._group.path}"

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._group.attrs["config"])

    @property
    def ids(self) -> list[str]:
        """Committed image ids in storage order (the row order of `as_dask_array()`)."""
        return list(self._order)

    @property
    def patch_shape(self) -> tuple[int, int] | None:
        """(patches per image, dim), or None before the first write."""
        return None if self._arrays is None else tuple(self._arrays[0].shape[1:])

    @property
    def block_images(self) -> int | None:
        """Images per chunk, or None before the first write; write in multiples of it for dense chunks."""
        return None if self._arrays is None else self._arrays[0].chunks[0]

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._positions

    def missing(self, ids: Iterable[str]) -> list[str]:
        """The ids (in the given order, each once) with no committed features yet."""
        return [image_id for image_id in dict.fromkeys(ids) if image_id not in self._positions]

    def write_batch(self, ids: Sequence[str], features: np.ndarray) -> int:
        """Append the features (n, patches, dim) of images `ids`, skipping ids already stored.

        Writes whole blocks of `block_images`, each committed before the next starts; returns how many
        images were written. A batch that is not a multiple of the block leaves a partly filled block.
        """
        if self._group.read_only:
            raise ValueError(f"feature store {self._group.path} was opened read-only; "
                             "open it with read_only=False to write")
        ids = list(ids)
        features = np.asarray(features)
        self._check_batch(ids, features)
        folder = self._local_folder()
        with exclusive_lock(folder / WRITER_LOCK, f"feature store {self._group.path}") if folder else \
                contextlib.nullcontext():
            if folder and _read_int(folder / COMMITTED_BLOCKS) != len(self._blocks):
                # Another writer committed blocks since this store was opened or last wrote.
                self._reload()
            new = [i for i, image_id in enumerate(ids) if image_id not in self._positions]
            if not new:
                return 0
            if self._arrays is None:
                self._create_arrays(features.shape[1:])
            block_images = self.block_images
            for start in range(0, len(new), block_images):
                rows = new[start:start + block_images]
                self._write_block(len(self._blocks), [ids[i] for i in rows], features[rows])
                if folder:
                    (folder / COMMITTED_BLOCKS).write_text(str(len(self._blocks)))
        log.debug("feature store %s: wrote %d images, %d committed", self._group.path, len(new), len(self))
        return len(new)

    def _local_folder(self) -> Path | None:
        """The store's folder when it is a local directory; object stores (fsspec URLs) have no file locks,
        so there one writer per store is the caller's to keep."""
        store = self._group.store
        return Path(store.root) / self._group.path if isinstance(store, zarr.storage.LocalStore) else None

    def _reload(self) -> None:
        self._positions, self._order, self._blocks = {}, [], []
        self._arrays = None
        if "rows" in self._group:
            self._arrays = (self._group["features"], self._group["ids"], self._group["rows"])
            self._load_committed()

    def read(self, ids: Sequence[str]) -> np.ndarray:
        """Features (n, patches, dim) float32 of the given ids, in the given order."""
        ids = list(ids)
        absent = [image_id for image_id in ids if image_id not in self._positions]
        if absent:
            raise ValueError(f"{len(absent)} of {len(ids)} ids have no stored features, e.g. {absent[:3]}")
        shape = self.patch_shape or (0, 0)
        out = np.empty((len(ids), *shape), dtype=np.float32)
        if not ids:
            return out
        array = self._arrays[0]
        block_images = self.block_images
        positions = np.array([self._positions[image_id] for image_id in ids])
        blocks = positions // block_images
        for block in np.unique(blocks):
            wanted = np.flatnonzero(blocks == block)
            start = int(block) * block_images
            try:
                data = array[start:start + self._blocks[block]]
            except ValueError as error:
                if "checksum" not in str(error):
                    raise
                last = start + self._blocks[block] - 1
                raise FeatureStoreDamagedError(
                    f"{self.path}: the chunk of stored images {start}..{last} (e.g. id "
                    f"{self._order[start]!r}) failed its checksum: damaged on disk. Delete that folder; the next "
                    "rebuild extracts the features again") from None
            out[wanted] = data[positions[wanted] - start]
        return out

    def damaged(self, ids: Iterable[str]) -> dict[int, list[str]]:
        """The blocks holding any of `ids` whose chunk fails its checksum, each with every id it stores (in
        storage order): what `rewrite_block` needs to make it whole again."""
        block_images = self.block_images
        blocks = sorted({self._positions[image_id] // block_images for image_id in ids if image_id in self._positions})
        found = {}
        for block in blocks:
            start = block * block_images
            try:
                self._arrays[0][start:start + self._blocks[block]]
            except ValueError as error:
                if "checksum" not in str(error):
                    raise
                found[block] = sorted((image_id for image_id, position in self._positions.items()
                                       if start <= position < start + self._blocks[block]), key=self._positions.get)
        return found

    def rewrite_block(self, block: int, ids: Sequence[str], features: np.ndarray) -> None:
        """Write block `block` again with the features (n, patches, dim) of the ids it stores, in the order
        `damaged` gives them: a whole chunk, so nothing of the damaged one is read."""
        expected = [image_id for image_id, position in sorted(self._positions.items(), key=lambda item: item[1])
                    if position // self.block_images == block]
        if list(ids) != expected:
            raise ValueError(f"block {block} stores {len(expected)} images {expected[:3]}...; rewrite it with exactly "
                             "those, in storage order")
        features = np.asarray(features)
        self._check_batch(list(ids), features)
        padded = np.zeros((self.block_images, *features.shape[1:]), dtype=np.float32)
        padded[:len(ids)] = features
        folder = self._local_folder()
        with exclusive_lock(folder / WRITER_LOCK, f"feature store {self._group.path}") if folder else \
                contextlib.nullcontext():
            start = block * self.block_images
            self._arrays[0][start:start + self.block_images] = padded

    def as_dask_array(self, ids: Sequence[str] | None = None) -> da.Array:
        """Committed features as a Dask array (n, patches, dim), one chunk per block, rows in the order of
        `ids` (default: all committed images, in storage order). `.reshape(-1, dim)` gives patch rows."""
        if not self._order:
            raise ValueError("the feature store holds no committed images yet")
        array = da.from_zarr(self._arrays[0])
        block_images = self.block_images
        if ids is None:
            runs = [(block * block_images, block * block_images + count) for block, count in enumerate(self._blocks)]
        else:
            ids = list(ids)
            absent = [image_id for image_id in ids if image_id not in self._positions]
            if absent or not ids:
                raise ValueError(f"as_dask_array needs stored ids; {len(absent)} of {len(ids)} are not stored, "
                                 f"e.g. {absent[:3]}")
            runs = _contiguous_runs([self._positions[image_id] for image_id in ids], block_images)
        return da.concatenate([array[start:stop] for start, stop in runs], axis=0)

    def _check_batch(self, ids: list[str], features: np.ndarray) -> None:
        if any(not isinstance(image_id, str) or not image_id for image_id in ids):
            raise ValueError("image ids must be non-empty strings")
        if len(set(ids)) != len(ids):
            raise ValueError(f"image ids in one batch must be unique; repeated: "
                             f"{sorted({i for i in ids if ids.count(i) > 1})[:3]}")
        if features.ndim != 3 or len(features) != len(ids):
            raise ValueError(f"features must be (n_images={len(ids)}, patches, dim), got shape {features.shape}")
        if not np.issubdtype(features.dtype, np.floating):
            raise ValueError(f"features must be floating point, got {features.dtype}")
        expected = self.patch_shape
        if expected is not None and features.shape[1:] != expected:
            raise ValueError(f"features have (patches, dim) {features.shape[1:]} but this store holds {expected}")
        if features.shape[1] < 1 or features.shape[2] < 1:
            raise ValueError(f"features must have at least one patch and one dim, got shape {features.shape}")
        finite = np.isfinite(features).reshape(len(features), -1).all(axis=1)
        if not finite.all():
            raise ValueError(f"features of {np.count_nonzero(~finite)} images contain NaN or infinite values, "
                             f"e.g. id {ids[int(np.argmin(finite))]!r}")

    def _create_arrays(self, patch_shape: tuple[int, int]) -> None:
        patches, dim = patch_shape
        block = self._requested_block or max(1, _BLOCK_BYTES // (patches * dim * 4))
        features = self._group.create_array("features", shape=(0, patches, dim), chunks=(block, patches, dim),
                                            dtype="float32", compressors=(_COMPRESSOR, _CHECKSUM), fill_value=0.0,
                                            overwrite=True)
        ids = self._group.create_array("ids", shape=(0,), chunks=(block,), dtype=str, overwrite=True)
        rows = self._group.create_array("rows", shape=(0,), chunks=(1,), dtype="int32", fill_value=0)
        self._arrays = (features, ids, rows)

    def _write_block(self, block: int, ids: list[str], features: np.ndarray) -> None:
        block_images = self.block_images
        self._ensure_capacity(block + 1)
        # Whole chunks: no read-modify-write of whatever an interrupted writer left in this block.
        padded = np.zeros((block_images, *features.shape[1:]), dtype=np.float32)
        padded[:len(ids)] = features
        names = np.full(block_images, "", dtype=object)
        names[:len(ids)] = ids
        start = block * block_images
        features_array, ids_array, rows_array = self._arrays
        features_array[start:start + block_images] = padded
        ids_array[start:start + block_images] = names.astype(str)
        rows_array[block] = len(ids)
        self._blocks.append(len(ids))
        for offset, image_id in enumerate(ids):
            self._positions[image_id] = start + offset
        self._order.extend(ids)

    def _ensure_capacity(self, blocks: int) -> None:
        features, ids, rows = self._arrays
        if rows.shape[0] >= blocks:
            return
        # Geometric growth keeps metadata rewrites rare; `rows` grows last, so a block below its length
        # always fits the other arrays too.
        capacity = max(blocks, 2 * rows.shape[0], 4)
        features.resize((capacity * self.block_images, *features.shape[1:]))
        ids.resize((capacity * self.block_images,))
        rows.resize((capacity,))

    def _load_committed(self) -> None:
        _, ids, rows = self._arrays
        counts = rows[:]
        uncommitted = np.flatnonzero(counts == 0)
        # Blocks are committed in order, so the committed ones are the prefix before the first gap.
        committed = counts[:uncommitted[0]] if len(uncommitted) else counts
        self._blocks = [int(count) for count in committed]
        block_images = self.block_images
        names = ids[:len(committed) * block_images] if len(committed) else np.array([], dtype=str)
        for block, count in enumerate(self._blocks):
            for offset in range(count):
                position = block * block_images + offset
                self._positions[str(names[position])] = position
                self._order.append(str(names[position]))


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _contiguous_runs(positions: list[int], block_images: int) -> list[tuple[int, int]]:
    """Row positions → (start, stop) slices of consecutive rows that stay within one block."""
    runs: list[tuple[int, int]] = []
    for position in positions:
        if runs and runs[-1][1] == position and position % block_images:
            runs[-1] = (runs[-1][0], position + 1)
        else:
            runs.append((position, position + 1))
    return runs
