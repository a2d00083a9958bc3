"""OE-SDN on real ELPV cells: SSIM, training, rotation, scoring and checkpoints (small and fast)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from patchline.models.config import OeSdnConfig
from patchline.models.oesdn.autoencoder import ConvAutoencoder
from patchline.models.oesdn.checkpoint import load_autoencoder, load_sdn, save_network
from patchline.models.oesdn.scoring import image_scores, score_autoencoder, score_oesdn
from patchline.models.oesdn.sdn import StyleDistillationNetwork
from patchline.models.oesdn.ssim import dssim, dssim_mse, ssim_map
from patchline.models.oesdn.training import TrainingOverrunError, rotate_batch, train_autoencoder, train_sdn
from patchline.storage.sources.elpv import elpv_arrays

SIZE = 64
CONFIG = OeSdnConfig(image_size=SIZE, channels=1, ae_base_width=8, ae_latent_dim=32, sdn_base_width=16,
                     epochs=8, sdn_epochs=8, batch_size=8, learning_rate=2e-3, val_fraction=0.1, patience=8,
                     min_improvement=0.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Other jobs share this machine's cores; oversubscribed torch threads run many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cells() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(48 good training cells, 4 other good cells) from the real ELPV set."""
    images, levels, _ = elpv_arrays()
    good = np.flatnonzero(levels == 0)
    return [images[i] for i in good[:48]], [images[i] for i in good[100:104]]


@pytest.fixture(scope="module")
def trained(cells: tuple[list[np.ndarray], list[np.ndarray]]) -> dict:
    train, _ = cells
    device = torch.device("cpu")
    autoencoder, ae_history = train_autoencoder(train, CONFIG, device)
    sdn, sdn_history = train_sdn(train, autoencoder, CONFIG, device=device)
    return {"ae": autoencoder, "sdn": sdn, "ae_history": ae_history, "sdn_history": sdn_history}


def with_crack(cell: np.ndarray) -> np.ndarray:
    """A good cell with a dark diagonal crack and a dark blob painted in, as ELPV defects look."""
    defective = cell.copy()
    for offset in range(-3, 4):
        rows = np.arange(60, 200)
        defective[rows, np.clip(rows + 20 + offset, 0, 299)] = 10
    defective[180:240, 60:120] = 15
    return defective


def test_ssim_is_one_for_equal_images_and_dssim_mse_grows_with_difference() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(2, 1, 32, 32, generator=generator)
    noisy = (a + 0.2 * torch.randn(a.shape, generator=generator)).clamp(0, 1)
    assert torch.allclose(ssim_map(a, a), torch.ones_like(a), atol=1e-5)
    assert dssim_mse(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert 0 < dssim_mse(a, (a + 0.05).clamp(0, 1)) < dssim_mse(a, noisy)
    assert 0 < dssim(a, noisy) <= 1
    with pytest.raises(ValueError, match="one shape"):
        ssim_map(a, a[:, :, :16])


def test_ssim_under_bfloat16_autocast_matches_float32() -> None:
    # ssim_map promises float32 under any autocast (OE-SDN once trained under CUDA autocast and lost to it:
    # the variance terms of a near-match cancel in bfloat16). CPU autocast casts the same ops, so this runs anywhere.
    generator = torch.Generator().manual_seed(0)
    a = 0.4 + 0.3 * torch.rand(4, 1, 64, 64, generator=generator)
    b = (a + 0.02 * torch.randn(a.shape, generator=generator)).clamp(0, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, loss = ssim_map(a, b), dssim_mse(a, b)
    assert mixed.dtype == torch.float32
    assert torch.allclose(mixed, ssim_map(a, b), atol=1e-5)
    assert loss.item() == pytest.approx(dssim_mse(a, b).item(), rel=1e-5)


def test_rotated_batch_is_each_image_turned_by_its_drawn_quarter_turns() -> None:
    batch = torch.rand(32, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    rotated, turns = rotate_batch(batch, torch.Generator().manual_seed(2))
    assert set(turns.tolist()) == {1, 2, 3}
    for image, turned, k in zip(batch, rotated, turns.tolist()):
        assert torch.equal(turned, torch.rot90(image, k, dims=(1, 2)))
        assert not torch.equal(turned, image)
    _, odd_turns = rotate_batch(batch, torch.Generator().manual_seed(2), quarter_turns=(1, 3))
    assert set(odd_turns.tolist()) == {1, 3}
    with pytest.raises(ValueError, match="square"):
        rotate_batch(torch.rand(2, 1, 16, 8), torch.Generator())
    with pytest.raises(ValueError, match="quarter_turns"):
        rotate_batch(batch, torch.Generator(), quarter_turns=(4,))


def test_autoencoder_and_sdn_losses_decrease_on_real_cells(trained: dict) -> None:
    for history in (trained["ae_history"], trained["sdn_history"]):
        assert len(history["train_loss"]) == len(history["val_loss"]) == CONFIG.epochs
        assert history["train_loss"][-1] < 0.8 * history["train_loss"][0]
        assert min(history["val_loss"]) < 0.8 * history["val_loss"][0]
    sdn = trained["sdn_history"]
    assert sdn["train_kd"][-1] < sdn["train_kd"][0] and sdn["train_oer"][-1] < sdn["train_oer"][0]


def test_maps_and_scores_come_at_the_input_resolution(trained: dict, cells: tuple) -> None:
    _, others = cells
    for detections in (score_oesdn(trained["ae"], trained["sdn"], others, CONFIG),
                       score_autoencoder(trained["ae"], others, CONFIG, "l2"),
                       score_autoencoder(trained["ae"], others, CONFIG, "ssim")):
        assert detections.scores.shape == (len(others),)
        assert detections.maps.shape == (len(others), SIZE, SIZE)
        assert np.isfinite(detections.maps).all() and (detections.maps >= 0).all()
        top = np.sort(detections.maps.reshape(len(others), -1), axis=1)[:, -round(CONFIG.score_top_fraction * SIZE**2):]
        assert np.allclose(detections.scores, top.mean(axis=1))
    with pytest.raises(ValueError, match="residual"):
        score_autoencoder(trained["ae"], others, CONFIG, "l1")  # type: ignore[arg-type]


def test_oesdn_map_is_larger_on_a_planted_crack_than_on_the_clean_cell(trained: dict, cells: tuple) -> None:
    _, others = cells
    clean = others
    cracked = [with_crack(cell) for cell in others]
    clean_found = score_oesdn(trained["ae"], trained["sdn"], clean, CONFIG)
    cracked_found = score_oesdn(trained["ae"], trained["sdn"], cracked, CONFIG)
    assert (cracked_found.scores > clean_found.scores).all()
    # The extra response sits on the painted blob (rows 180-240, cols 60-120 of 300 → ~38-51, 13-26 of 64).
    blob = (slice(39, 50), slice(14, 25))
    assert (cracked_found.maps[:, blob[0], blob[1]].mean(axis=(1, 2))
            > 2 * clean_found.maps[:, blob[0], blob[1]].mean(axis=(1, 2))).all()


def test_image_score_rules() -> None:
    maps = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    assert np.allclose(image_scores(maps, "top_k_mean", 3 / 16), [14.0, 30.0])
    assert np.allclose(image_scores(maps), [15.0, 31.0])
    assert np.allclose(image_scores(maps, "mean"), [7.5, 23.5])
    with pytest.raises(ValueError, match="top_fraction"):
        image_scores(maps, "top_k_mean", 1.5)
    with pytest.raises(ValueError, match="rule"):
        image_scores(maps, "median")


def test_checkpoint_round_trip_gives_identical_outputs(trained: dict, tmp_path) -> None:
    batch = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    ae_path = save_network(trained["ae"], tmp_path / "ae.safetensors")
    sdn_path = save_network(trained["sdn"], tmp_path / "sdn.safetensors")
    autoencoder = load_autoencoder(ae_path, torch.device("cpu"))
    sdn = load_sdn(sdn_path, torch.device("cpu"))
    assert isinstance(autoencoder, ConvAutoencoder) and isinstance(sdn, StyleDistillationNetwork)
    with torch.no_grad():
        assert torch.equal(autoencoder(batch), trained["ae"](batch))
        assert torch.equal(sdn(batch), trained["sdn"](batch))
    with pytest.raises(ValueError, match="expected 'sdn'"):
        load_sdn(ae_path, torch.device("cpu"))
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_autoencoder(tmp_path / "broken.safetensors", torch.device("cpu"))


def test_bad_inputs_raise_clear_errors(cells: tuple) -> None:
    train, _ = cells
    with pytest.raises(ValueError, match="at least 2 good images"):
        train_autoencoder(train[:1], CONFIG, torch.device("cpu"))
    with pytest.raises(ValueError, match="multiple of 16"):
        ConvAutoencoder(1, 8, 16, image_size=72)
    with pytest.raises(ValueError, match="multiple of 2\\*\\*depth"):
        StyleDistillationNetwork(1, 8, image_size=68, depth=3)
    with pytest.raises(ValueError, match="oe_lambda"):
        train_sdn(train, ConvAutoencoder(1, 8, 16, SIZE), CONFIG, oe_lambda=1.5)


def test_early_stopping_triggers_and_keeps_the_best_epoch(cells: tuple) -> None:
    train, _ = cells
    # A learning rate this high makes the held-out loss stop improving within a few epochs.
    config = CONFIG.model_copy(update={"epochs": 40, "patience": 2, "min_improvement": 0.05, "learning_rate": 1e-2})
    _, history = train_autoencoder(train, config, torch.device("cpu"))
    losses = history["val_loss"]
    assert len(losses) < 40
    # The last epoch that beat the best so far by min_improvement, then `patience` epochs that did not.
    best, last_improved = float("inf"), -1
    for epoch, loss in enumerate(losses):
        if loss < best * (1 - config.min_improvement):
            best, last_improved = loss, epoch
    assert len(losses) == last_improved + 1 + config.patience


def test_the_wall_clock_guard_fails_training_instead_of_stopping_it(cells: tuple) -> None:
    train, _ = cells
    config = CONFIG.model_copy(update={"epochs": 50, "max_train_seconds": 1e-3})
    with pytest.raises(TrainingOverrunError, match=r"autoencoder: .*guard of 0.001 s .* after 1 of at most 50 epochs"):
        train_autoencoder(train, config, torch.device("cpu"))


def test_augmentations_that_compose_to_an_outlier_turn_are_rejected() -> None:
    assert OeSdnConfig().augmentations == ()
    assert OeSdnConfig(augmentations=("hflip",)).augmentations == ("hflip",)
    with pytest.raises(ValueError, match="180°"):
        OeSdnConfig(augmentations=("hflip", "vflip"))
    # Without the 180° turn, both flips are allowed; without outlier exposure, any flips are.
    assert OeSdnConfig(augmentations=("hflip", "vflip"), oe_quarter_turns=(1, 3)).oe_quarter_turns == (1, 3)
    assert OeSdnConfig(augmentations=("hflip", "vflip"), oe_lambda=0.0).oe_lambda == 0.0
    with pytest.raises(ValueError, match="augmentations"):
        OeSdnConfig(augmentations=("rot90",))


def test_configs_of_models_registered_before_augmentations_still_load() -> None:
    # What a bundle's config.yaml said before augmentations and image_score existed.
    old = OeSdnConfig.model_validate({"image_size": 64, "hflip": True, "vflip": True, "score_top_k": 41})
    assert old.augmentations == () and old.image_score == "top_k_mean"
    assert round(old.score_top_fraction * 64**2) == 41
    assert OeSdnConfig.model_validate({"hflip": True, "vflip": True, "score_top_k": None}).image_score == "max"
