"""Training OE-SDN (Chung et al. 2020): the autoencoder on good images, then the SDN against the frozen AE.

Stage 1 minimises d(x, AE(x)); stage 2 minimises J = (1 − λ)·d(SDN(x), AE(x)) + λ·d(x_rot, SDN(x_rot)),
with d = DSSIM + MSE and x_rot each image turned by 90°, 180° or 270°. λ = 0 gives the plain SDN baseline.
Both stages hold out a slice of the good images and stop when its loss has not improved by
`min_improvement` for `patience` epochs or at the epoch cap, whichever comes first, and keep the best
epoch's weights: what a network learns is a function of the images, the config and the seed, never of
how busy the machine was. `max_train_seconds`, when set, is a guard, not a budget: training that
passes it fails (`TrainingOverrunError`) rather than keeping weights that a quieter machine would
have trained further.

What was measured to matter (figures: benchmarks/README.md, sections "OE-SDN" and "Figures behind
settings in the code"):
- Training to convergence and no flips, changed together, put OE-SDN above the plain AE on ELPV mono
  cells and on the digits protocol, where it had been below; ten epochs, the old fixed budget, stopped
  the networks while their held-out loss still fell.
- No flips by default. A horizontal plus a vertical flip is a 180° turn, so with flips on a third of
  the "outliers" were ordinary augmented normals given the opposite target (x instead of AE(x)). A
  line config whose flips compose to an outlier-exposure turn is rejected (`OeSdnConfig`).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from patchline.models.config import OeSdnConfig
from patchline.models.images import images_to_tensor, pick_device
from patchline.models.oesdn.autoencoder import ConvAutoencoder
from patchline.models.oesdn.sdn import StyleDistillationNetwork
from patchline.models.oesdn.ssim import dssim_mse

logger = logging.getLogger(__name__)

History = dict[str, list[float]]
# The loss of one batch: named parts, "loss" being the one to minimise.
BatchLoss = Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]]


class TrainingOverrunError(RuntimeError):
    """A network's training passed the line's `oesdn.max_train_seconds` guard; the message says how far it got."""


def rotate_batch(batch: torch.Tensor, generator: torch.Generator,
                 quarter_turns: Sequence[int] = (1, 2, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (C, S, S) image turned by k·90°, k drawn per image from `quarter_turns` → (rotated batch, k per image)."""
    if batch.ndim != 4 or batch.shape[-1] != batch.shape[-2]:
        raise ValueError(f"rotate_batch needs a (N, C, S, S) batch of square images, got {tuple(batch.shape)}")
    if not quarter_turns or not set(quarter_turns) <= {1, 2, 3}:
        raise ValueError(f"quarter_turns must be a non-empty choice from 1, 2, 3, got {tuple(quarter_turns)}")
    choices = torch.tensor(sorted(set(quarter_turns)))
    turns = choices[torch.randint(len(choices), (len(batch),), generator=generator)]
    rotated = batch.clone()
    for k in choices.tolist():
        chosen = (turns == k).to(batch.device)
        rotated[chosen] = torch.rot90(batch[chosen], k, dims=(2, 3))
    return rotated, turns


def train_autoencoder(images: Sequence[np.ndarray], config: OeSdnConfig,
                      device: torch.device | None = None) -> tuple[ConvAutoencoder, History]:
    """Uint8 good images → the trained autoencoder (eval mode, on `device`) and its per-epoch losses."""
    device = device or pick_device()
    with _seeded(config.seed):
        model = ConvAutoencoder(config.channels, config.ae_base_width, config.ae_latent_dim, config.image_size)

    def batch_loss(batch: torch.Tensor, _: torch.Generator) -> dict[str, torch.Tensor]:
        return {"loss": dssim_mse(model(batch), batch)}

    history = _fit(model, batch_loss, _as_batch(images, config), config, config.epochs, device, "autoencoder")
    return model, history


def train_sdn(images: Sequence[np.ndarray], autoencoder: ConvAutoencoder, config: OeSdnConfig,
              oe_lambda: float | None = None,
              device: torch.device | None = None) -> tuple[StyleDistillationNetwork, History]:
    """Uint8 good images and the trained AE → the SDN (eval mode, on `device`) and its per-epoch losses.

    `oe_lambda` overrides `config.oe_lambda`; 0 trains the SDN without outlier exposure.
    """
    oe_lambda = config.oe_lambda if oe_lambda is None else oe_lambda
    if not 0.0 <= oe_lambda <= 1.0:
        raise ValueError(f"oe_lambda must lie in [0, 1], got {oe_lambda}")
    device = device or pick_device()
    autoencoder = autoencoder.to(device).eval().requires_grad_(False)
    with _seeded(config.seed + 1):
        model = StyleDistillationNetwork(config.channels, config.sdn_base_width, config.image_size, config.sdn_depth)

    def batch_loss(batch: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            target = autoencoder(batch)
        if oe_lambda == 0.0:
            kd = dssim_mse(model(batch), target)
            return {"loss": kd, "kd": kd}
        rotated, _ = rotate_batch(batch, generator, config.oe_quarter_turns)
        # One forward pass over both halves: fewer, larger convolutions run faster than two small ones.
        distilled, passed = model(torch.cat([batch, rotated])).chunk(2)
        kd, oer = dssim_mse(distilled, target), dssim_mse(passed, rotated)
        return {"loss": (1 - oe_lambda) * kd + oe_lambda * oer, "kd": kd, "oer": oer}

    label = "oe-sdn" if oe_lambda else "sdn"
    history = _fit(model, batch_loss, _as_batch(images, config), config, config.sdn_epochs, device, label)
    return model, history


# A network's initial weights come from torch's one global generator; two trainings in threads at once
# (a nightly's lines) would interleave their draws on it. The lock keeps each seeded construction whole.
_GLOBAL_GENERATOR = threading.Lock()


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with _GLOBAL_GENERATOR, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _as_batch(images: Sequence[np.ndarray], config: OeSdnConfig) -> torch.Tensor:
    if len(images) < 2:
        raise ValueError(f"OE-SDN training needs at least 2 good images, got {len(images)}")
    return images_to_tensor(images, config.image_size, config.channels)


_FLIP_DIMS = {"hflip": 3, "vflip": 2}


def _augment(batch: torch.Tensor, config: OeSdnConfig, generator: torch.Generator) -> torch.Tensor:
    """Each image flipped by each of the line's augmentations with probability 1/2 (none by default)."""
    if not config.augmentations:
        return batch
    batch = batch.clone()
    for name in config.augmentations:
        flip = (torch.rand(len(batch), generator=generator) < 0.5).to(batch.device)
        batch[flip] = batch[flip].flip(_FLIP_DIMS[name])
    return batch


def _fit(model: nn.Module, batch_loss: BatchLoss, data: torch.Tensor, config: OeSdnConfig,
         epochs: int, device: torch.device, label: str) -> History:
    """Adam on `batch_loss` until the held-out loss stops improving or for `epochs`; leaves the best epoch's
    weights in `model`. Passing `config.max_train_seconds` raises `TrainingOverrunError`."""
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(data), generator=generator)
    held_out = min(len(data) - 1, round(len(data) * config.val_fraction)) if config.val_fraction else 0
    train, val = data[order[held_out:]], data[order[:held_out]]
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    # float32 on every device: on an H200 bfloat16 autocast trained these small networks no faster and
    # no better (benchmarks/README.md, section CUDA).
    history: History = {}
    # The weights kept are those of the last epoch that lowered the held-out loss by `min_improvement`.
    best_loss, best_state, stale = float("inf"), copy.deepcopy(model.state_dict()), 0
    started = time.monotonic()
    stop = f"epoch cap {epochs}"
    progress = tqdm(range(epochs), desc=f"train {label}", disable=None, leave=False)
    for epoch in progress:
        model.train()
        sums: dict[str, float] = {}
        shuffled = train[torch.randperm(len(train), generator=generator)]
        for rows in _batch_slices(len(train), config.batch_size):
            batch = _augment(shuffled[rows], config, generator).to(device)
            parts = batch_loss(batch, generator)
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            optimizer.step()
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value.item() * len(batch)
        for name, total in sums.items():
            history.setdefault(f"train_{name}", []).append(total / len(train))
        shown = {"train": history["train_loss"][-1]}
        if len(val):
            for name, value in _evaluate(model, batch_loss, val, config.batch_size, device, config.seed).items():
                history.setdefault(f"val_{name}", []).append(value)
            shown["val"] = history["val_loss"][-1]
            if shown["val"] < best_loss * (1 - config.min_improvement):
                best_loss, best_state, stale = shown["val"], copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
        progress.set_postfix({name: f"{value:.4g}" for name, value in shown.items()})
        if stale >= config.patience:
            stop = f"no improvement for {stale} epochs"
            break
        guard = config.max_train_seconds
        if guard is not None and epoch + 1 < epochs and time.monotonic() - started > guard:
            raise TrainingOverrunError(
                f"{label}: training passed its guard of {guard:g} s (oesdn.max_train_seconds) after {epoch + 1} of "
                f"at most {epochs} epochs; stopping there would make the weights depend on how busy the machine "
                "is. Raise or remove the guard, or lower the epoch caps (oesdn.epochs, oesdn.sdn_epochs)")
    progress.close()
    if len(val):
        model.load_state_dict(best_state)
    logger.info("%s: stopped after %d epochs (%s) in %.0f s; best val %.4g", label, len(history["train_loss"]),
                stop, time.monotonic() - started, best_loss)
    model.eval()
    return history


def _batch_slices(count: int, size: int) -> list[slice]:
    """`count` rows in batches of `size`, a last batch of a single row joined to the one before: on a CPU with
    more than one thread, PyTorch's backward pass of the AE on one image sums in an order that varies from
    process to process, so the same images, config and seed would not give the same weights."""
    starts = list(range(0, count, size))
    if len(starts) > 1 and count - starts[-1] == 1:
        starts.pop()
    return [slice(start, end) for start, end in zip(starts, [*starts[1:], count])]


def _evaluate(model: nn.Module, batch_loss: BatchLoss, val: torch.Tensor, batch_size: int,
              device: torch.device, seed: int) -> dict[str, float]:
    """Mean loss parts on the held-out images, with the same rotations every epoch so epochs compare."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    with torch.no_grad():
        for start in range(0, len(val), batch_size):
            batch = val[start:start + batch_size].to(device)
            for name, value in batch_loss(batch, generator).items():
                sums[name] = sums.get(name, 0.0) + value.item() * len(batch)
    return {name: total / len(val) for name, total in sums.items()}
