"""The style-distillation network (SDN) of OE-SDN: more capacity than the autoencoder it imitates.

Choices (the paper publishes no layer details):
- A U-Net: three stride-2 stages (width w, 2w, 4w, down to 1/8 of the side) and a decoder that
  concatenates the encoder feature of the same scale, plus the input image itself at full size.
  The skips give it far more capacity than the AE's dense bottleneck: it can copy its input
  pixel for pixel, which the outlier-exposure term asks of it on rotated images, and it can also
  learn the AE's blur on good images, which the distillation term asks.
- So on a good image it outputs what the AE outputs, and on anything unlike the training images it
  falls back towards copying; where the two differ, |SDN(x) − AE(x)| lights up.
- Stride-2 convolutions instead of full-size ones, and the input skip instead of a full-size
  feature map, keep the cost close to the AE's on CPU.
- No normalisation layers and a sigmoid output, as in the autoencoder.
"""

from __future__ import annotations

import torch
from torch import nn

DOWNSAMPLING = 8


def _conv(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    # padding 1 keeps the size for 3×3 stride 1 and halves it exactly for 4×4 stride 2.
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=1),
                         nn.LeakyReLU(0.2, inplace=True))


def _upsample(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1),
                         nn.LeakyReLU(0.2, inplace=True))


class StyleDistillationNetwork(nn.Module):
    """(N, channels, S, S) in [0, 1] → an image of the same shape; S % 8 == 0."""

    def __init__(self, channels: int, base_width: int, image_size: int) -> None:
        super().__init__()
        if image_size % DOWNSAMPLING:
            raise ValueError(f"image_size must be a multiple of {DOWNSAMPLING} for the SDN, got {image_size}")
        self.hyperparameters = {"channels": channels, "base_width": base_width, "image_size": image_size}
        w = base_width
        self.down1 = nn.Sequential(_conv(channels, w, 4, 2), _conv(w, w))
        self.down2 = nn.Sequential(_conv(w, 2 * w, 4, 2), _conv(2 * w, 2 * w))
        self.down3 = nn.Sequential(_conv(2 * w, 4 * w, 4, 2), _conv(4 * w, 4 * w))
        self.up3 = _upsample(4 * w, 2 * w)
        self.merge2 = _conv(4 * w, 2 * w)
        self.up2 = _upsample(2 * w, w)
        self.merge1 = _conv(2 * w, w)
        self.up1 = _upsample(w, w // 2)
        self.head = nn.Sequential(_conv(w // 2 + channels, w // 2), nn.Conv2d(w // 2, channels, 3, padding=1), nn.Sigmoid())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        half = self.down1(images)
        quarter = self.down2(half)
        eighth = self.down3(quarter)
        quarter = self.merge2(torch.cat([self.up3(eighth), quarter], dim=1))
        half = self.merge1(torch.cat([self.up2(quarter), half], dim=1))
        return self.head(torch.cat([self.up1(half), images], dim=1))
