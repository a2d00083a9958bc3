"""The convolutional autoencoder of OE-SDN, trained on good images and then frozen.

Choices (the paper publishes no layer details):
- Four stride-2 stages (width w, 2w, 4w, 8w) take the image to 1/16 of its side, then a fully
  connected bottleneck of `latent_dim` numbers. A dense latent this small (64 for a 128 px image of
  16,384 pixels) cannot carry fine structure, so the reconstruction is the smooth, blurry image of a
  typical good part: anomalies are not reproduced, and edges come out soft. That blur is the "style"
  the SDN learns to imitate.
- No skip connections: any skip would let detail (and defects) bypass the bottleneck.
- No normalisation layers: batches are small and scoring runs one image at a time, so batch
  statistics would make training and scoring behave differently.
- A sigmoid output, because targets are images in [0, 1] and DSSIM assumes that range.
"""

from __future__ import annotations

import torch
from torch import nn

DOWNSAMPLING = 16


def _down(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
    )


def _up(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
    )


class ConvAutoencoder(nn.Module):
    """(N, channels, S, S) in [0, 1] → its reconstruction through a `latent_dim` bottleneck; S % 16 == 0."""

    def __init__(self, channels: int, base_width: int, latent_dim: int, image_size: int) -> None:
        super().__init__()
        if image_size % DOWNSAMPLING:
            raise ValueError(f"image_size must be a multiple of {DOWNSAMPLING} for the autoencoder, got {image_size}")
        self.hyperparameters = {"channels": channels, "base_width": base_width,
                                "latent_dim": latent_dim, "image_size": image_size}
        w = base_width
        self._grid = image_size // DOWNSAMPLING
        self._deepest = 8 * w
        flat = self._deepest * self._grid**2
        self.encoder = nn.Sequential(_down(channels, w), _down(w, 2 * w), _down(2 * w, 4 * w), _down(4 * w, 8 * w),
                                     nn.Flatten(), nn.Linear(flat, latent_dim))
        self.expand = nn.Sequential(nn.Linear(latent_dim, flat), nn.LeakyReLU(0.2, inplace=True))
        self.decoder = nn.Sequential(_up(8 * w, 4 * w), _up(4 * w, 2 * w), _up(2 * w, w),
                                     nn.ConvTranspose2d(w, channels, 4, stride=2, padding=1), nn.Sigmoid())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        latent = self.encoder(images)
        grid = self.expand(latent).view(-1, self._deepest, self._grid, self._grid)
        return self.decoder(grid)
