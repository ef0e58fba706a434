"""Generation-quality metrics: IS, KID and IC-LPIPS by hand, and the NVlabs TorchScript loading contract."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from defectsynth.evaluation.metrics import UndefinedMetricError
from defectsynth.evaluation.quality import (
    QualityNetworks,
    generation_quality,
    ic_lpips,
    inception_score,
    kernel_inception_distance,
    not_computed_reason,
)

# the fixtures are TorchScript, which torch 2.x deprecates; the NVlabs networks exist only in that format
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

# ---------------------------------------------------------------- IS


def test_inception_score_one_hot_uniform_is_number_of_classes():
    assert inception_score(np.eye(5)) == pytest.approx(5.0)


def test_inception_score_identical_rows_is_one():
    probs = np.tile([0.2, 0.5, 0.3], (7, 1))
    assert inception_score(probs) == pytest.approx(1.0)


def test_inception_score_splits_average_the_parts():
    # part 1: two one-hot rows over 2 classes -> 2; part 2: identical rows -> 1
    probs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.3, 0.3, 0.4], [0.3, 0.3, 0.4]])
    assert inception_score(probs, splits=2) == pytest.approx(1.5)
    assert inception_score(probs, splits=1) > 1.5


def test_inception_score_matches_stylegan_formula_on_positive_probs():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 10))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(4):
        part = probs[i * 10 : (i + 1) * 10]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    assert inception_score(probs, splits=4) == pytest.approx(float(np.mean(scores)), rel=1e-12)


@pytest.mark.parametrize(
    ("probs", "splits"),
    [(np.array([[2.0, -1.0]]), 1), (np.array([[0.5, 0.6]]), 1), (np.eye(3), 4), (np.ones(3) / 3, 1)],
)
def test_inception_score_rejects_bad_input(probs, splits):
    with pytest.raises(ValueError):
        inception_score(probs, splits=splits)


# ---------------------------------------------------------------- KID


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.mean())


def test_kid_equals_unbiased_mmd2_when_subsets_are_the_whole_sets():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 6)), rng.normal(0.5, 1.0, size=(12, 6))
    expected = _unbiased_mmd2(x, y)
    # a subset of all m items is a permutation, and the estimator does not depend on the order
    assert kernel_inception_distance(x, y, num_subsets=1) == pytest.approx(expected, rel=1e-10)
    assert kernel_inception_distance(x, y, num_subsets=5, seed=3) == pytest.approx(expected, rel=1e-10)
    assert expected > 0


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    same = kernel_inception_distance(x, y, num_subsets=20, max_subset_size=100)
    shifted = kernel_inception_distance(x + 1.0, y, num_subsets=20, max_subset_size=100)
    assert abs(same) < 0.05 * shifted
    assert kernel_inception_distance(x, y, num_subsets=20, max_subset_size=100, seed=0) == same  # seeded


def test_kid_undefined_with_one_item_and_rejects_mismatched_features():
    rng = np.random.default_rng(3)
    with pytest.raises(UndefinedMetricError):
        kernel_inception_distance(rng.normal(size=(5, 4)), rng.normal(size=(1, 4)))
    with pytest.raises(ValueError, match="features"):
        kernel_inception_distance(rng.normal(size=(5, 4)), rng.normal(size=(5, 3)))


# ---------------------------------------------------------------- IC-LPIPS


def _l1(a: Tensor, b: Tensor) -> Tensor:
    return torch.cdist(a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double(), p=1)


TARGETS = torch.tensor([[0.0], [10.0], [100.0], [50.0]])
# cluster 0 (target 0): 1, 2, 4 and the tie 5; cluster 1 (target 10): 9, 11, 7; cluster 2: none; cluster 3: 49
GENERATED = torch.tensor([[1.0], [9.0], [2.0], [11.0], [4.0], [7.0], [49.0], [5.0]])


def test_ic_lpips_pairwise_by_hand():
    # cluster 0 {1, 2, 4, 5}: pairs 1 3 4 2 3 1 -> 14 / 6; cluster 1 {9, 11, 7}: 2 2 4 -> 8 / 3
    # cluster 2 is empty and cluster 3 a singleton: both left out
    expected = (14 / 6 + 8 / 3) / 2
    for batch_size in (1, 2, 32):
        assert ic_lpips(GENERATED, TARGETS, _l1, batch_size=batch_size) == pytest.approx(expected)


def test_ic_lpips_to_target_by_hand():
    # cluster 0: (1 + 2 + 4 + 5) / 4; cluster 1: (1 + 1 + 3) / 3; cluster 3: 1; cluster 2 empty
    expected = (12 / 4 + 5 / 3 + 1.0) / 3
    assert ic_lpips(GENERATED, TARGETS, _l1, "to_target", batch_size=3) == pytest.approx(expected)


def test_ic_lpips_caps_cluster_members_at_random():
    generated = torch.tensor([[1.0], [2.0], [4.0], [8.0]])
    targets = torch.tensor([[0.0]])
    full = ic_lpips(generated, targets, _l1, max_per_cluster=None)
    assert full == pytest.approx((1 + 3 + 7 + 2 + 6 + 4) / 6)
    pair_values = {1.0, 3.0, 7.0, 2.0, 6.0, 4.0}
    capped = [ic_lpips(generated, targets, _l1, max_per_cluster=2, seed=seed) for seed in range(8)]
    assert set(capped) <= pair_values and len(set(capped)) > 1
    assert ic_lpips(generated, targets, _l1, max_per_cluster=2, seed=3) == capped[3]


def test_ic_lpips_undefined_when_every_cluster_is_a_singleton():
    generated, targets = torch.tensor([[1.0], [9.0]]), torch.tensor([[0.0], [10.0]])
    with pytest.raises(UndefinedMetricError):
        ic_lpips(generated, targets, _l1)
    assert ic_lpips(generated, targets, _l1, "to_target") == pytest.approx(1.0)


def test_ic_lpips_checks_the_distance_shape_and_mode():
    with pytest.raises(ValueError, match="len\\(a\\) x len\\(b\\)"):
        ic_lpips(GENERATED, TARGETS, lambda a, b: (a - b[:1]).abs().sum(1))
    with pytest.raises(ValueError, match="mode"):
        ic_lpips(GENERATED, TARGETS, _l1, "nearest")  # type: ignore[arg-type]


# ---------------------------------------------------------------- NVlabs-shaped TorchScript fixtures


class TinyInception(nn.Module):
    """Same call signature and input convention as NVlabs' inception-2015-12-05.pt."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(4, 7, generator=generator))
        self.bias = nn.Parameter(torch.randn(7, generator=generator))

    def forward(
        self, img: Tensor, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False
    ) -> Tensor:
        assert img.dtype == torch.uint8  # StyleGAN2-ADA feeds uint8 images
        assert img.shape[1] == 3
        x = F.interpolate(img.to(torch.float32), size=(4, 4), mode="bilinear", align_corners=False)
        features = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(1, 2, 3)).unsqueeze(1)], dim=1)  # 0-255 scale
        if return_features:
            return features
        logits = ((features - 128) / 32) @ self.weight
        if not no_output_bias:
            logits = logits + self.bias
        return torch.softmax(logits, dim=1)


class TinyVgg(nn.Module):
    """Same call signature as NVlabs' vgg16.pt; LPIPS = 0.01 x squared L2 of the [0, 1] images."""

    def forward(self, img: Tensor, resize_images: bool = True, return_lpips: bool = False) -> Tensor:
        x = img.to(torch.float32) / 255
        if resize_images:
            x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        if return_lpips:
            return x.flatten(1) * 0.1
        return x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    inception, vgg = folder / "inception-2015-12-05.pt", folder / "vgg16.pt"
    torch.jit.save(torch.jit.script(TinyInception()), str(inception))
    torch.jit.save(torch.jit.script(TinyVgg()), str(vgg))
    return inception, vgg


def _quantised(images: Tensor) -> Tensor:
    return (images * 255).round().to(torch.uint8)


def test_generation_quality_end_to_end(weights):
    inception, vgg = weights
    networks = QualityNetworks.load(inception, vgg)
    rng = torch.Generator().manual_seed(4)
    generated, real = torch.rand(9, 3, 8, 8, generator=rng), torch.rand(3, 3, 8, 8, generator=rng)

    result = generation_quality(generated, real, networks, batch_size=4, num_subsets=10)
    assert set(result) == {"is", "kid", "ic_lpips"}

    module = networks.inception  # the loaded module, called directly
    gen_q, real_q = _quantised(generated), _quantised(real)
    probs = module(gen_q, no_output_bias=True).double().numpy()
    assert result["is"] == pytest.approx(inception_score(probs), rel=1e-6)
    gen_f = module(gen_q, return_features=True).double().numpy()
    real_f = module(real_q, return_features=True).double().numpy()
    # the features are channel means of the 0-255 images (halving 8 x 8 keeps the mean): the conversion is right
    np.testing.assert_allclose(gen_f[:, :3], gen_q.double().mean(dim=(2, 3)).numpy(), rtol=1e-4)
    assert result["kid"] == pytest.approx(kernel_inception_distance(gen_f, real_f, num_subsets=10), rel=1e-5)

    def lpips(a: Tensor, b: Tensor) -> Tensor:
        return 0.01 * torch.cdist(a.flatten(1).double() / 255, b.flatten(1).double() / 255).square()

    assert result["ic_lpips"] == pytest.approx(ic_lpips(gen_q, real_q, lpips), rel=1e-5)
    to_target = generation_quality(generated, real, networks, ic_lpips_mode="to_target")["ic_lpips"]
    assert to_target == pytest.approx(ic_lpips(gen_q, real_q, lpips, "to_target"), rel=1e-5)


def test_generation_quality_returns_only_what_it_can(weights, caplog):
    inception, vgg = weights
    generated = torch.rand(4, 3, 8, 8)
    assert generation_quality(generated, None, QualityNetworks.load(None, None)) == {}
    assert set(generation_quality(generated, None, QualityNetworks.load(inception, vgg))) == {"is"}
    assert set(generation_quality(generated, torch.rand(2, 3, 8, 8), QualityNetworks.load(None, vgg))) == {"ic_lpips"}
    with caplog.at_level(logging.WARNING, logger="defectsynth.evaluation.quality"):
        one_real = generation_quality(generated, torch.rand(1, 1, 8, 8), QualityNetworks.load(inception, None))
    assert set(one_real) == {"is"} and "KID" in caplog.text


def test_generation_quality_rejects_unnormalised_images(weights):
    networks = QualityNetworks.load(weights[0], None)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        generation_quality(torch.rand(2, 3, 8, 8) * 255, None, networks)
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        generation_quality(torch.rand(3, 8, 8), None, networks)


def test_networks_only_come_from_files():
    with pytest.raises(TypeError, match="load"):
        QualityNetworks(inception=None, lpips=None, inception_path=None, lpips_path=None)
    with pytest.raises(TypeError, match="QualityNetworks.load"):
        generation_quality(torch.rand(2, 3, 8, 8), None, object())  # type: ignore[arg-type]


def test_load_errors_name_the_file(tmp_path, weights):
    inception, vgg = weights
    missing = tmp_path / "nope" / "inception-2015-12-05.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        QualityNetworks.load(missing, None)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=str(garbage)):
        QualityNetworks.load(None, garbage)
    state_dict = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, state_dict)  # a checkpoint, not TorchScript
    with pytest.raises(ValueError, match=str(state_dict)):
        QualityNetworks.load(state_dict, None)
    with pytest.raises(ValueError, match="return_features"):  # the two files swapped
        QualityNetworks.load(vgg, inception)
    with pytest.raises(ValueError, match="is not a file"):
        QualityNetworks.load(tmp_path, None)


def test_loaded_networks_are_in_eval_mode_and_remember_their_files(weights):
    inception, vgg = weights
    networks = QualityNetworks.load(str(inception), vgg)
    assert networks.inception_path == inception and networks.lpips_path == vgg
    assert not networks.inception.training and not networks.lpips.training
    assert networks.to("cpu") is networks


def test_not_computed_reason():
    assert not_computed_reason("a.pt", "b.pt") is None
    assert not_computed_reason(None, "b.pt") == "IS, KID not computed: no evaluate.quality.inception_weights given"
    assert not_computed_reason("a.pt", None) == "IC-LPIPS not computed: no evaluate.quality.lpips_weights given"
    both = not_computed_reason(None, None)
    assert both is not None and both.startswith("IS, KID, IC-LPIPS not computed")


def test_kid_value_is_finite_for_generation_quality_defaults(weights):
    networks = QualityNetworks.load(weights[0], None)
    kid = generation_quality(torch.rand(5, 3, 8, 8), torch.rand(5, 3, 8, 8), networks)["kid"]
    assert math.isfinite(kid)
