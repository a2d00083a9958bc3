"""The style-distillation network (SDN) of OE-SDN: more capacity than the autoencoder it imitates.

Choices (the paper publishes no layer details):
- A shallow U-Net: `depth` stride-2 stages (widths w, 2w, ...) and a decoder that concatenates the
  encoder feature of the same scale, plus the input image itself at full size. The skips give it far
  more capacity than the AE's dense bottleneck: it can copy its input pixel for pixel, which the
  outlier-exposure term asks of it on rotated images, and it can learn the AE's blur, which the
  distillation term asks on good images.
- Shallow on purpose (`depth` 2 by default: each output pixel sees a 34-pixel square). An SDN whose
  view spans the whole image learns the AE's whole mapping rather than its style: on ELPV at 64 px
  a depth-3 SDN painted a large dark defect over with a normal-looking cell, just as the AE does,
  so |SDN(x) − AE(x)| went blind there. Measured image AUROC of OE-SDN there, under the old fixed
  10-epoch training: depth 1 0.714, depth 2 0.735, depth 3 0.726 (benchmarks/oesdn.py).
- The input skip at the head stays: with it the SDN can copy a rotated image as the outlier-exposure
  term asks. Whether it also copies defects is what the protocols test: with training run to
  convergence and no flips, OE-SDN beats the plain AE on digits, on ELPV mono cells (by less than
  on digits) and in pixel AUROC on brick and gravel, not on grass (benchmarks/README.md, section OE-SDN).
- Stride-2 convolutions instead of full-size ones, and the input skip instead of a full-size
  feature map, keep the cost close to the AE's on CPU.
- No normalisation layers and a sigmoid output, as in the autoencoder.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    # padding 1 keeps the size for 3×3 stride 1 and halves it exactly for 4×4 stride 2.
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=1),
                         nn.LeakyReLU(0.2, inplace=True))


def _upsample(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1),
                         nn.LeakyReLU(0.2, inplace=True))


class StyleDistillationNetwork(nn.Module):
    """(N, channels, S, S) in [0, 1] → an image of the same shape; S must be a multiple of 2**depth."""

    def __init__(self, channels: int, base_width: int, image_size: int, depth: int) -> None:
        super().__init__()
        if depth < 1 or image_size % 2**depth:
            raise ValueError(f"SDN depth must be ≥ 1 with image_size a multiple of 2**depth, "
                             f"got depth {depth} and image_size {image_size}")
        self.hyperparameters = {"channels": channels, "base_width": base_width,
                                "image_size": image_size, "depth": depth}
        widths = [base_width * 2**stage for stage in range(depth)]
        self.downs = nn.ModuleList(
            nn.Sequential(_conv(before, after, 4, 2), _conv(after, after))
            for before, after in zip([channels, *widths], widths))
        self.ups = nn.ModuleList(_upsample(after, before) for before, after in zip(widths, widths[1:]))
        self.merges = nn.ModuleList(_conv(2 * width, width) for width in widths[:-1])
        self.top = _upsample(widths[0], base_width // 2)
        self.head = nn.Sequential(_conv(base_width // 2 + channels, base_width // 2),
                                  nn.Conv2d(base_width // 2, channels, 3, padding=1), nn.Sigmoid())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        skips = []
        features = images
        for down in self.downs:
            features = down(features)
            skips.append(features)
        for up, merge, skip in zip(reversed(self.ups), reversed(self.merges), reversed(skips[:-1])):
            features = merge(torch.cat([up(features), skip], dim=1))
        return self.head(torch.cat([self.top(features), images], dim=1))
