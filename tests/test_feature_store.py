"""The Zarr feature store on real disk: round trip, incremental writes, and a writer killed mid-run."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from patchline.storage.feature_store import (
    FeatureStore, FeatureStoreDamagedError, config_hash, data_fingerprint, feature_key)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"backbone": "efficientnet-lite0", "layers": [4, 10], "image_size": 256}


def image_features(image_id: str, patches: int = 6, dim: int = 5) -> np.ndarray:
    """Deterministic features per id, so any process can regenerate what should be stored."""
    seed = int.from_bytes(image_id.encode()[-4:].rjust(4, b"\0"), "big")
    return np.random.default_rng(seed).standard_normal((patches, dim)).astype(np.float32)


def batch(ids: list[str], patches: int = 6, dim: int = 5) -> np.ndarray:
    return np.stack([image_features(i, patches, dim) for i in ids]) if ids else np.empty((0, patches, dim))


IDS = [f"img{i:04d}" for i in range(11)]


def test_round_trip_in_any_order_and_through_dask(tmp_path: Path) -> None:
    store = FeatureStore.open(f"file://{tmp_path}", "line-a", CONFIG, block_images=4)
    assert store.write_batch(IDS[:6], batch(IDS[:6])) == 6
    assert store.write_batch(IDS[6:], batch(IDS[6:])) == 5
    assert len(store) == 11 and store.ids == IDS and store.patch_shape == (6, 5)

    reopened = FeatureStore.open(tmp_path, "line-a", CONFIG, read_only=True)
    assert reopened.ids == IDS and reopened.config == CONFIG and reopened.block_images == 4
    shuffled = [IDS[i] for i in np.random.default_rng(0).permutation(len(IDS))]
    np.testing.assert_array_equal(reopened.read(shuffled), batch(shuffled))

    table = reopened.as_dask_array()
    # One chunk per block: 6 images → blocks of 4 + 2, then 5 → 4 + 1.
    assert table.chunks[0] == (4, 2, 4, 1)
    np.testing.assert_array_equal(table.compute(), batch(IDS))
    subset = [IDS[9], IDS[2], IDS[3], IDS[4]]
    np.testing.assert_array_equal(reopened.as_dask_array(subset).compute(), batch(subset))


def test_a_damaged_chunk_is_refused_naming_the_store_and_its_images(tmp_path: Path) -> None:
    """64 bytes flipped in a committed chunk (issue 35's probe) decoded to other features before."""
    store = FeatureStore.open(tmp_path, "line-a", CONFIG, block_images=4)
    store.write_batch(IDS[:8], batch(IDS[:8]))
    chunks = sorted(path for path in (tmp_path / "line-a" / config_hash(CONFIG) / "features" / "c").rglob("*")
                    if path.is_file())
    raw = bytearray(chunks[1].read_bytes())
    raw[20:84] = bytes(b ^ 0xFF for b in raw[20:84])
    chunks[1].write_bytes(bytes(raw))
    reopened = FeatureStore.open(tmp_path, "line-a", CONFIG, read_only=True)
    np.testing.assert_array_equal(reopened.read(IDS[:4]), batch(IDS[:4]))  # the other chunk reads as before
    with pytest.raises(FeatureStoreDamagedError, match=r"line-a/.*: the chunk of stored images 4..7 \(e.g. id "
                                                       r"'img0004'\) failed its checksum"):
        reopened.read([IDS[5]])


def flip_chunk(folder: Path, index: int) -> None:
    chunks = sorted(path for path in (folder / "features" / "c").rglob("*") if path.is_file())
    raw = bytearray(chunks[index].read_bytes())
    raw[20:84] = bytes(b ^ 0xFF for b in raw[20:84])
    chunks[index].write_bytes(bytes(raw))


def test_a_damaged_block_is_found_and_rewritten_whole(tmp_path: Path) -> None:
    store = FeatureStore.open(tmp_path, "line-a", CONFIG, block_images=4)
    store.write_batch(IDS[:10], batch(IDS[:10]))
    flip_chunk(tmp_path / "line-a" / config_hash(CONFIG), 1)
    store = FeatureStore.open(tmp_path, "line-a", CONFIG)
    assert store.damaged(IDS[:4]) == {} and store.damaged(IDS[:10]) == {1: IDS[4:8]}
    with pytest.raises(ValueError, match=r"block 1 stores 4 images"):
        store.rewrite_block(1, IDS[4:7], batch(IDS[4:7]))
    store.rewrite_block(1, IDS[4:8], batch(IDS[4:8]))
    reopened = FeatureStore.open(tmp_path, "line-a", CONFIG, read_only=True)
    assert reopened.damaged(IDS[:10]) == {}
    np.testing.assert_array_equal(reopened.read(IDS[:10]), batch(IDS[:10]))


def test_a_rebuild_extracts_a_damaged_chunk_again_and_builds_the_same_bank(home, tmp_path: Path) -> None:
    """Issue 35's probe: a forced rebuild reused a damaged chunk's features and promoted what it built."""
    from patchline.flows.rebuild import rebuild_product_line
    from patchline.storage.line_config import load_line
    from patchline.storage.paths import patchline_home
    from patchline.storage.tag_names import BANK_TAG
    from patchline.storage.tracking import configure_mlflow
    from patchline.tasks.patchcore import feature_key as line_feature_key
    from tests.conftest import write_line_config, write_mvtec_line

    root = write_mvtec_line(tmp_path / "line", train=12)
    config = load_line(write_line_config(tmp_path / "chunks.yaml", root, name="chunks", detectors=("patchcore",)))
    first = rebuild_product_line(config)
    folder = patchline_home() / "features" / "chunks" / config_hash(line_feature_key(config))
    flip_chunk(folder, 0)
    second = rebuild_product_line(config, force=True, full=True)
    client = configure_mlflow()
    assert client.get_run(second.run_id).data.tags[BANK_TAG] == client.get_run(first.run_id).data.tags[BANK_TAG]
    store = FeatureStore.open(patchline_home() / "features", "chunks", line_feature_key(config), read_only=True)
    assert store.damaged(store.ids) == {}


def test_second_write_of_the_same_ids_writes_nothing(tmp_path: Path) -> None:
    store = FeatureStore.open(tmp_path, "line-a", CONFIG, block_images=4)
    store.write_batch(IDS[:8], batch(IDS[:8]))
    chunk_files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())

    again = FeatureStore.open(tmp_path, "line-a", CONFIG)
    assert again.missing(IDS) == IDS[8:]
    assert again.write_batch(IDS[:8], batch(IDS[:8])) == 0
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == chunk_files

    # A mixed batch stores only the new images.
    assert again.write_batch(IDS[5:], batch(IDS[5:])) == 3
    assert again.missing(IDS) == [] and len(again) == 11
    np.testing.assert_array_equal(again.read(IDS), batch(IDS))


def test_stores_are_keyed_by_line_and_config(tmp_path: Path) -> None:
    FeatureStore.open(tmp_path, "line-a", CONFIG).write_batch(IDS[:2], batch(IDS[:2]))
    assert len(FeatureStore.open(tmp_path, "line-a", {**CONFIG, "image_size": 320})) == 0
    assert len(FeatureStore.open(tmp_path, "line-b", CONFIG)) == 0
    assert len(FeatureStore.open(tmp_path, "line-a", dict(reversed(list(CONFIG.items()))))) == 2

    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1, "b": [1, 2]}) != config_hash({"a": 2, "b": [1, 2]})
    assert data_fingerprint(["x", "y", "x"]) == data_fingerprint(["y", "x"]) != data_fingerprint(["x"])
    assert feature_key(CONFIG, IDS) == f"{config_hash(CONFIG)}-{data_fingerprint(IDS)}"


def test_an_uncommitted_block_is_invisible_and_gets_overwritten(tmp_path: Path) -> None:
    store = FeatureStore.open(tmp_path, "line-a", CONFIG, block_images=4)
    store.write_batch(IDS[:8], batch(IDS[:8]))
    # What a writer killed between a block's data and its commit marker leaves behind.
    group = zarr.open_group(tmp_path, mode="a", path=f"line-a/{config_hash(CONFIG)}")
    group["features"].resize((16, 6, 5))
    group["ids"].resize((16,))
    group["features"][8:12] = np.full((4, 6, 5), 99.0, dtype=np.float32)
    group["ids"][8:12] = np.array(["ghost0", "ghost1", "ghost2", "ghost3"])

    reopened = FeatureStore.open(tmp_path, "line-a", CONFIG)
    assert len(reopened) == 8 and "ghost0" not in reopened
    assert reopened.as_dask_array().shape == (8, 6, 5)
    with pytest.raises(ValueError, match="no stored features"):
        reopened.read(["ghost1"])

    assert reopened.write_batch(IDS[8:], batch(IDS[8:])) == 3
    final = FeatureStore.open(tmp_path, "line-a", CONFIG, read_only=True)
    assert final.ids == IDS
    np.testing.assert_array_equal(final.as_dask_array().compute(), batch(IDS))


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_feature_store import CONFIG, batch
    from patchline.storage.feature_store import FeatureStore
    store = FeatureStore.open({root!r}, "line-k", CONFIG, block_images=2)
    ids = [f"k{{i:05d}}" for i in range(600)]
    for start in range(0, len(ids), 2):
        store.write_batch(ids[start:start + 2], batch(ids[start:start + 2], 64, 96))
        print(len(store), flush=True)
        time.sleep(0.01)
""")


def test_a_writer_killed_mid_run_leaves_only_whole_blocks_and_a_second_writer_finishes(tmp_path: Path) -> None:
    ids = [f"k{i:05d}" for i in range(600)]
    code = WRITER.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        seen = 0
        while seen < 40:
            line = child.stdout.readline()
            assert line, f"writer exited early with code {child.wait()}"
            seen = int(line)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL

    store = FeatureStore.open(tmp_path, "line-k", CONFIG)
    committed = len(store)
    assert seen <= committed < len(ids), "the kill should land mid-run"
    assert committed % 2 == 0, "only whole blocks are visible"
    assert store.ids == ids[:committed]
    np.testing.assert_array_equal(store.read(store.ids), batch(store.ids, 64, 96))

    missing = store.missing(ids)
    assert missing == ids[committed:]
    for start in range(0, len(missing), 50):
        store.write_batch(missing[start:start + 50], batch(missing[start:start + 50], 64, 96))
    final = FeatureStore.open(tmp_path, "line-k", CONFIG, read_only=True)
    assert final.ids == ids
    np.testing.assert_array_equal(final.as_dask_array().compute(), batch(ids, 64, 96))


CONCURRENT_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_feature_store import CONFIG, batch
    from patchline.storage.feature_store import FeatureStore
    store = FeatureStore.open({root!r}, "line-c", CONFIG, block_images=4)
    while not Path({go!r}).exists():
        time.sleep(0.01)
    ids = [f"c{{i:04d}}" for i in range(160)][::{step}]
    for start in range(0, len(ids), 4):
        store.write_batch(ids[start:start + 4], batch(ids[start:start + 4], 16, 8))
""")


def test_two_writers_at_once_on_a_new_store_commit_every_image_once(tmp_path: Path) -> None:
    """Both open the store before it has arrays, then write the same images in opposite orders."""
    go = tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER.format(
        tests=str(Path(__file__).parent), root=str(tmp_path / "store"), go=str(go), step=step)], cwd=REPO_ROOT,
        stderr=subprocess.PIPE, text=True) for step in (1, -1)]
    time.sleep(3)
    go.touch()
    for writer in writers:
        _, errors = writer.communicate(timeout=300)
        assert writer.returncode == 0, errors[-3000:]
    store = FeatureStore.open(tmp_path / "store", "line-c", CONFIG, read_only=True)
    ids = [f"c{i:04d}" for i in range(160)]
    assert sorted(store.ids) == ids, "every image committed exactly once"
    assert "" not in store.ids
    np.testing.assert_array_equal(store.read(ids), batch(ids, 16, 8))


def test_bad_input_is_refused_with_the_reason(tmp_path: Path) -> None:
    store = FeatureStore.open(tmp_path, "line-a", CONFIG, block_images=4)
    with pytest.raises(ValueError, match="holds no committed images"):
        store.as_dask_array()
    with pytest.raises(ValueError, match=r"n_images=2"):
        store.write_batch(IDS[:2], batch(IDS[:3]))
    with pytest.raises(ValueError, match=r"n_images=2"):
        store.write_batch(IDS[:2], np.zeros((2, 30), np.float32))
    with pytest.raises(ValueError, match="floating point"):
        store.write_batch(IDS[:2], np.zeros((2, 6, 5), np.int64))
    with pytest.raises(ValueError, match="unique"):
        store.write_batch([IDS[0], IDS[0]], batch(IDS[:2]))
    with pytest.raises(ValueError, match="non-empty strings"):
        store.write_batch(["", IDS[1]], batch(IDS[:2]))
    poisoned = batch(IDS[:2])
    poisoned[1, 3, 2] = np.nan
    with pytest.raises(ValueError, match=f"NaN.*{IDS[1]}"):
        store.write_batch(IDS[:2], poisoned)
    assert len(store) == 0

    store.write_batch(IDS[:2], batch(IDS[:2]))
    with pytest.raises(ValueError, match=r"\(7, 5\) but this store holds \(6, 5\)"):
        store.write_batch(IDS[2:4], batch(IDS[2:4], patches=7))
    with pytest.raises(ValueError, match="1 of 2 ids have no stored features"):
        store.read([IDS[0], "unknown"])
    with pytest.raises(ValueError, match="read-only"):
        FeatureStore.open(tmp_path, "line-a", CONFIG, read_only=True).write_batch(IDS[2:4], batch(IDS[2:4]))
    with pytest.raises(ValueError, match="no feature store for line 'line-z'"):
        FeatureStore.open(tmp_path, "line-z", CONFIG, read_only=True)
    with pytest.raises(ValueError, match="without '/'"):
        FeatureStore.open(tmp_path, "a/b", CONFIG)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        FeatureStore.open(tmp_path, "line-a", {"weights": Path("x")})
