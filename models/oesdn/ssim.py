"""Structural similarity (Wang et al. 2004) with an 11-tap Gaussian window, σ = 1.5, for images in [0, 1].

OE-SDN's distance is d = DSSIM + MSE (Chung et al. 2020); the per-pixel SSIM map is the AE-SSIM baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WINDOW_SIZE = 11
WINDOW_SIGMA = 1.5
# Stabilisers from Wang et al. for a data range of 1.
_C1 = 0.01**2
_C2 = 0.03**2


def gaussian_kernel1d(sigma: float, radius: int, device: torch.device | None = None) -> torch.Tensor:
    """A normalised 1-D Gaussian of 2·radius + 1 taps (float32)."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def gaussian_blur(batch: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of a (N, C, H, W) batch; reflect padding keeps H and W."""
    channels = batch.shape[1]
    kernel = gaussian_kernel1d(sigma, radius, batch.device).to(batch.dtype)
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    padded = F.pad(batch, (radius, radius, radius, radius), mode="reflect")
    return F.conv2d(F.conv2d(padded, horizontal, groups=channels), vertical, groups=channels)


def ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM of two (N, C, H, W) batches in [0, 1] → (N, C, H, W), 1 where they agree.

    Computed in float32 whatever the input dtype: the variance terms cancel badly in half precision.
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim_map needs two (N, C, H, W) batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(a.shape[-2:]) <= WINDOW_SIZE // 2:
        raise ValueError(f"ssim_map needs images larger than {WINDOW_SIZE // 2} pixels, got {tuple(a.shape[-2:])}")
    # Autocast would run the blur's convolutions in bfloat16 even on float32 inputs: pixel SSIM then erred
    # by up to 0.49, and an AE and OE-SDN once trained under CUDA autocast scored below chance.
    with torch.autocast(a.device.type, enabled=False):
        a, b = a.float(), b.float()
        blurred = gaussian_blur(torch.cat([a, b, a * a, b * b, a * b], dim=1), WINDOW_SIGMA, WINDOW_SIZE // 2)
        mu_a, mu_b, aa, bb, ab = blurred.chunk(5, dim=1)
        var_a = aa - mu_a**2
        var_b = bb - mu_b**2
        cov = ab - mu_a * mu_b
        numerator = (2 * mu_a * mu_b + _C1) * (2 * cov + _C2)
        denominator = (mu_a**2 + mu_b**2 + _C1) * (var_a + var_b + _C2)
        return numerator / denominator


def dssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural dissimilarity (1 − mean SSIM) / 2, a scalar in [0, 1]."""
    return (1.0 - ssim_map(a, b).mean()) / 2.0


def dssim_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The OE-SDN distance d(a, b) = DSSIM + MSE, a scalar."""
    return dssim(a, b) + F.mse_loss(a.float(), b.float())
