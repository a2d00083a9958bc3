"""The self-check: painted copies of held-out goods, the rule that leaves a detector out, and what leaving out does."""

from __future__ import annotations

import numpy as np
import pytest

from patchline.models.scoring.metrics import choose_decision_detector
from patchline.models.scoring.self_check import MIN_IMAGES, judge_self_check, paint_defect, painted_copies
from patchline.tasks.evaluate import fusion_weights_without
from tests.conftest import textured


@pytest.mark.parametrize("shape", [(48, 80), (80, 48, 1), (64, 64, 3)])
@pytest.mark.parametrize("kind", ["scratch", "blob"])
def test_a_painted_defect_lies_inside_any_image_in_a_far_tone(shape, kind):
    image = np.full(shape, 200, np.uint8)
    painted, mask = paint_defect(image, kind, np.random.default_rng(3))
    assert painted.shape == image.shape and painted.dtype == np.uint8 and mask.shape == shape[:2]
    assert 0 < mask.sum() < 0.2 * mask.size
    assert (painted[mask] < 60).all() and (painted[~mask] == 200).all()
    dark = paint_defect(np.full(shape, 40, np.uint8), kind, np.random.default_rng(3))[0]
    assert (dark[mask] > 190).all()  # bright on dark images, in the same place for the same draws


def test_painting_refuses_what_it_cannot_paint():
    with pytest.raises(ValueError, match="unknown painted defect kind 'crack'"):
        paint_defect(np.zeros((8, 8), np.uint8), "crack", np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs a uint8"):
        paint_defect(np.zeros((8, 8), np.float32), "blob", np.random.default_rng(0))


def test_painted_copies_alternate_kinds_and_repeat_for_a_seed():
    goods = [textured(seed) for seed in range(4)]
    first, again, other = painted_copies(goods, 7), painted_copies(goods, 7), painted_copies(goods, 8)
    assert all((a == b).all() for a, b in zip(first, again))
    assert any((a != b).any() for a, b in zip(first, other))
    assert all((copy != good).any() for copy, good in zip(first, goods))


def _scores(separation: float, count: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(0, 1, count), rng.normal(separation, 1, count)


def test_a_detector_at_chance_is_left_out_and_one_that_sees_is_kept():
    (good_ae, painted_ae), (good_oe, painted_oe) = _scores(0.0), _scores(3.0)
    check = judge_self_check({"ae": good_ae, "oesdn": good_oe}, {"ae": painted_ae, "oesdn": painted_oe}, 0.6,
                             ["patchcore", "oesdn", "ae"])
    assert check.aurocs["ae"] < 0.6 < 0.95 < check.aurocs["oesdn"] and check.images == 20
    assert list(check.left_out) == ["ae"]
    assert check.left_out["ae"].startswith(f"left out: self-check image AUROC {check.aurocs['ae']:.3f} < 0.6 on 20")


def test_a_network_that_sees_clearly_worse_than_the_one_it_is_built_on_is_left_out():
    (good_ae, painted_ae), (good_oe, painted_oe) = _scores(3.0), _scores(0.8)
    good, painted = {"ae": good_ae, "oesdn": good_oe}, {"ae": painted_ae, "oesdn": painted_oe}
    check = judge_self_check(good, painted, 0.6, ["patchcore", "oesdn", "ae"], {"oesdn": ("ae",)}, 0.1)
    assert check.aurocs["ae"] - check.aurocs["oesdn"] > 0.1 and check.aurocs["oesdn"] > 0.6
    assert list(check.left_out) == ["oesdn"] and f"below that of ae ({check.aurocs['ae']:.3f})" in check.left_out["oesdn"]
    assert judge_self_check(good, painted, 0.6, ["patchcore", "oesdn", "ae"], {"oesdn": ("ae",)}, 1.0).left_out == {}
    assert judge_self_check(good, painted, 0.6, ["patchcore", "oesdn", "ae"]).left_out == {}  # no baseline named


def test_the_self_check_never_leaves_a_line_without_a_detector_nor_judges_on_a_handful():
    good, painted = _scores(-1.0)
    assert judge_self_check({"ae": good}, {"ae": painted}, 0.6, ["ae"]).left_out == {}
    few = judge_self_check({"ae": good[:MIN_IMAGES - 1]}, {"ae": painted[:MIN_IMAGES - 1]}, 0.6, ["patchcore", "ae"])
    assert few.aurocs == {} and few.left_out == {} and few.images == MIN_IMAGES - 1


def test_a_left_out_detector_weighs_nothing_in_fused_and_auto_never_picks_it():
    left_out = {"oesdn": "left out: ..."}
    assert fusion_weights_without(None, ["patchcore", "oesdn", "ae"], left_out) == {
        "patchcore": 1.0, "oesdn": 0.0, "ae": 1.0}
    assert fusion_weights_without({"patchcore": 1.0, "oesdn": 2.0}, ["patchcore", "oesdn"], left_out) == {
        "patchcore": 1.0, "oesdn": 0.0}
    assert fusion_weights_without({"oesdn": 1.0}, ["patchcore", "oesdn"], left_out) == {"oesdn": 1.0}
    assert fusion_weights_without(None, ["patchcore", "oesdn"], {}) is None
    metrics = {"patchcore": {"image_auroc": 0.8}, "oesdn": {"image_auroc": 0.9}}
    assert choose_decision_detector("auto", metrics, None, left_out)[0] == "patchcore"
    chosen, why = choose_decision_detector("auto", metrics, ("3", "oesdn"), left_out)
    assert chosen == "patchcore" and why.startswith("champion v3's oesdn was left out by the self-check; auto:")
    assert choose_decision_detector("oesdn", metrics, None, left_out)[0] == "oesdn"  # a person's setting stands
