"""Generation-quality metrics that need pretrained feature networks: IS, IC-LPIPS and KID.

The networks are NVlabs' TorchScript metric networks, the files StyleGAN2-ADA (and DFMGAN, which paper 000
compares against) downloads for its metrics. This module never downloads them: the user gives local paths
(``evaluate.quality.inception_weights``, ``evaluate.quality.lpips_weights``) and :meth:`QualityNetworks.load`
reads them with ``torch.jit.load``. :class:`QualityNetworks` has no other constructor, so a score can never come
from a randomly initialised network; without a file the metric is not computed and :func:`not_computed_reason`
gives the sentence a report prints instead.

- ``inception-2015-12-05.pt`` (the TF Inception-v3 graph translated to TorchScript):
  ``forward(img, return_features=False, use_fp16=False, no_output_bias=False)``. ``img`` is ``N x 3 x H x W``
  in the 0-255 range (StyleGAN2-ADA feeds ``uint8``); the network converts to float, resizes to 299 x 299
  itself (bilinear ``grid_sample``) and normalises with ``(x - 128) / 128``. ``return_features=True`` gives the
  ``N x 2048`` pool features (KID); ``no_output_bias=True`` gives ``N x 1008`` softmax probabilities without the
  output bias, as the original IS code (IS).
- ``vgg16.pt`` (VGG-16 with the LPIPS layer weights): ``forward(img, resize_images=True, return_lpips=False)``,
  ``img`` in the 0-255 range. With ``resize_images=False, return_lpips=True`` it returns ``N x D`` normalised,
  weighted features whose squared Euclidean distance is the LPIPS distance (StyleGAN2-ADA's PPL:
  ``(f0 - f1).square().sum(1)``). Images are compared at their own resolution, as in PPL.

Definitions and choices:

- **IS** (Salimans et al. 2016; paper 000 Sec. 4): ``exp(E_x KL(p(y|x) || p(y)))``, StyleGAN2-ADA's
  ``compute_is``: the probabilities are cut into ``splits`` consecutive parts, the score of a part is
  ``exp(mean_x sum_y p log(p / mean p))`` and IS is the mean over parts. Here ``0 log 0 = 0`` (StyleGAN2-ADA
  would give NaN on an exact zero, which the Inception softmax never outputs). Default ``splits=1``: paper 000
  scores 1000 images per defect type and states no split count.
- **KID** (Binkowski et al. 2018): StyleGAN2-ADA's ``compute_kid``: over ``num_subsets`` random subsets of
  ``m = min(n_gen, n_real, max_subset_size)`` items of each set (without replacement), the unbiased MMD² with
  the kernel ``k(x, y) = (x.y / d + 1)^3``, averaged. The subsets come from ``numpy.random.default_rng(seed)``
  (StyleGAN2-ADA uses the global NumPy state) and the sums are in float64. Paper 000 rejects KID for few-shot
  data ("the overfitted model tends to yield better scores"); it is here for comparison with StyleGAN-family
  baselines and is only meaningful with more than a handful of real images.
- **IC-LPIPS** (Ojha et al. 2021): each generated image joins the cluster of its nearest target (the real
  training defects) by LPIPS, ties going to the first target. The papers differ on what is averaged inside a
  cluster. The default, ``mode="pairwise"``, is Ojha et al.'s and the metric's name (Intra-Cluster pairwise
  LPIPS): the mean LPIPS over the unordered pairs of members of a cluster, then the mean over clusters. As
  Ojha et al.'s code, at most ``max_per_cluster=50`` members (drawn at random, seeded) enter a cluster's pairs,
  and a cluster with fewer than 2 members has no pair and is left out of the mean (Ojha's NaN-skipping mean;
  DFMGAN's ``clpips`` counts such a cluster as 0, its ``clpips_rz`` leaves it out like here).
  ``mode="to_target"`` is the wording of paper 000's supplement ("average mean LPIPS distances to
  corresponding target samples within each cluster"): a cluster's value is the mean LPIPS of its members to
  its target, over all its members (linear cost, so no cap), and empty clusters are left out. The LPIPS
  network is NVlabs' VGG-16 LPIPS (Ojha et al. use ``lpips`` VGG, DFMGAN ``lpips`` AlexNet, neither available
  here as TorchScript), so values are comparable in kind, not digit for digit, with the published ones.

A metric whose inputs cannot define it raises :class:`~defectsynth.evaluation.metrics.UndefinedMetricError`;
:func:`generation_quality` then leaves its key out and logs a warning, as ``score_detection`` does.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from defectsynth.evaluation.metrics import UndefinedMetricError

logger = logging.getLogger(__name__)

INCEPTION_WEIGHTS_KEY = "evaluate.quality.inception_weights"  # config key named by not_computed_reason
LPIPS_WEIGHTS_KEY = "evaluate.quality.lpips_weights"
IC_LPIPS_MAX_PER_CLUSTER = 50  # Ojha et al.'s feat_cluster.py: 50 random members per cluster
KID_NUM_SUBSETS = 100  # StyleGAN2-ADA's kid50k_full
KID_MAX_SUBSET_SIZE = 1000
#: Keyword arguments each NVlabs network's ``forward`` must take; checked at load so swapped files fail early.
_INCEPTION_ARGS = ("return_features", "no_output_bias")
_LPIPS_ARGS = ("resize_images", "return_lpips")
_PROB_SUM_TOLERANCE = 1e-3  # rows of IS probabilities must sum to 1 within this
_LOAD_TOKEN = object()  # only QualityNetworks.load holds it, so no network can be built another way

ICLpipsMode = Literal["pairwise", "to_target"]
Distance = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------- networks


def _load_script(path: str | Path, role: str, needed: Sequence[str]) -> torch.jit.ScriptModule:
    """Load one TorchScript network on the CPU, in eval mode, checking its ``forward`` takes ``needed``."""
    path = Path(path)
    if not path.exists():
        msg = f"{role} weights not found: {path}"
        raise FileNotFoundError(msg)
    if not path.is_file():
        msg = f"{role} weights {path} is not a file"
        raise ValueError(msg)
    try:
        with warnings.catch_warnings():
            # torch 2.x deprecates TorchScript; the NVlabs networks exist only in that format.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as error:
        msg = f"{role} weights {path} are not a TorchScript archive (torch.jit.load failed: {error})"
        raise ValueError(msg) from error
    try:
        arguments = {argument.name for argument in module.forward.schema.arguments}
    except AttributeError as error:
        msg = f"{role} weights {path} have no scripted forward()"
        raise ValueError(msg) from error
    missing = [name for name in needed if name not in arguments]
    if missing:
        msg = (
            f"{role} weights {path}: forward() takes no {', '.join(missing)} argument; "
            f"expected NVlabs' TorchScript {role} network (forward(img, {', '.join(needed)}, ...))"
        )
        raise ValueError(msg)
    for parameter in module.parameters():  # ScriptModule has no requires_grad_()
        parameter.requires_grad_(False)
    return module.eval()


class QualityNetworks:
    """The pretrained metric networks a user supplied, each ``None`` where no file was given.

    Build it with :meth:`load` only: the constructor refuses any other caller, so the metrics can never run
    on a network that was not read from a pretrained file.

    Attributes:
        inception: NVlabs' ``inception-2015-12-05.pt`` TorchScript module, or None.
        lpips: NVlabs' ``vgg16.pt`` TorchScript module, or None.
        inception_path: the file ``inception`` was loaded from.
        lpips_path: the file ``lpips`` was loaded from.
    """

    def __init__(
        self,
        *,
        inception: torch.jit.ScriptModule | None,
        lpips: torch.jit.ScriptModule | None,
        inception_path: Path | None,
        lpips_path: Path | None,
        _token: object = None,
    ) -> None:
        if _token is not _LOAD_TOKEN:
            msg = "QualityNetworks are built by QualityNetworks.load(inception, lpips) from pretrained files"
            raise TypeError(msg)
        self.inception = inception
        self.lpips = lpips
        self.inception_path = inception_path
        self.lpips_path = lpips_path

    @classmethod
    def load(cls, inception: str | Path | None, lpips: str | Path | None) -> QualityNetworks:
        """Load the networks from local TorchScript files, on the CPU.

        Args:
            inception: path of ``inception-2015-12-05.pt`` (IS, KID), or None to skip those metrics.
            lpips: path of ``vgg16.pt`` (IC-LPIPS), or None to skip it.

        Returns:
            The loaded networks, in eval mode.

        Raises:
            FileNotFoundError: a path does not exist (the message names it).
            ValueError: a file is not TorchScript, or its ``forward`` lacks the NVlabs keyword arguments.
        """
        inception_path = None if inception is None else Path(inception)
        lpips_path = None if lpips is None else Path(lpips)
        return cls(
            inception=None if inception_path is None else _load_script(inception_path, "inception", _INCEPTION_ARGS),
            lpips=None if lpips_path is None else _load_script(lpips_path, "lpips", _LPIPS_ARGS),
            inception_path=inception_path,
            lpips_path=lpips_path,
            _token=_LOAD_TOKEN,
        )

    def to(self, device: torch.device | str) -> QualityNetworks:
        """Move the loaded networks to ``device`` (in place) and return self."""
        for module in (self.inception, self.lpips):
            if module is not None:
                module.to(device)
        return self

    def _require(self, module: torch.jit.ScriptModule | None, role: str) -> torch.jit.ScriptModule:
        if module is None:
            msg = f"no {role} network loaded"
            raise ValueError(msg)
        return module

    @torch.no_grad()
    def inception_outputs(self, images: Tensor, *, features: bool, batch_size: int = 64) -> np.ndarray:
        """Inception pool features (``N x 2048``) or bias-free softmax probabilities (``N x 1008``).

        Args:
            images: ``N x 3 x H x W`` uint8 images (any size; the network resizes to 299 itself).
            features: True for the KID features, False for the IS probabilities.
            batch_size: images per forward pass.

        Returns:
            float64 array, one row per image.
        """
        network = self._require(self.inception, "inception")
        kwargs = {"return_features": True} if features else {"no_output_bias": True}
        device = _module_device(network)
        rows = [
            network(images[start : start + batch_size].to(device), **kwargs).float().cpu()
            for start in range(0, len(images), batch_size)
        ]
        return torch.cat(rows).numpy().astype(np.float64)

    @torch.no_grad()
    def lpips_features(self, images: Tensor) -> Tensor:
        """LPIPS features (``N x D``, float32) of ``N x 3 x H x W`` images in the 0-255 range, not resized."""
        network = self._require(self.lpips, "lpips")
        device = _module_device(network)
        return network(images.to(device, torch.float32), resize_images=False, return_lpips=True).float().flatten(1)

    def lpips_distance(self, a: Tensor, b: Tensor) -> Tensor:
        """The ``len(a) x len(b)`` matrix of LPIPS distances between 0-255 images (the ``ic_lpips`` distance)."""
        fa, fb = self.lpips_features(a), self.lpips_features(b)
        # Direct differences, not the |a|^2 + |b|^2 - 2ab expansion, which cancels for near-identical images.
        return torch.cdist(fa, fb, compute_mode="donot_use_mm_for_euclid_dist").square().cpu()


def _module_device(module: torch.jit.ScriptModule) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def not_computed_reason(inception: str | Path | None, lpips: str | Path | None) -> str | None:
    """The sentence a report prints for the quality metrics that cannot run, or None when all can.

    Args:
        inception: the configured inception weights (``evaluate.quality.inception_weights``), or None.
        lpips: the configured LPIPS weights (``evaluate.quality.lpips_weights``), or None.

    Returns:
        E.g. ``"IS, KID not computed: no evaluate.quality.inception_weights given"``; None when both are set.
    """
    metrics, keys = [], []
    if inception is None:
        metrics += ["IS", "KID"]
        keys.append(INCEPTION_WEIGHTS_KEY)
    if lpips is None:
        metrics.append("IC-LPIPS")
        keys.append(LPIPS_WEIGHTS_KEY)
    if not metrics:
        return None
    return f"{', '.join(metrics)} not computed: no {' or '.join(keys)} given"


# ---------------------------------------------------------------- metrics


def inception_score(probs: np.ndarray, splits: int = 1) -> float:
    """Inception Score, StyleGAN2-ADA's formula: the mean over splits of ``exp(mean_x KL(p(y|x) || p(y)))``.

    Args:
        probs: ``N x C`` class probabilities (rows sum to 1), e.g. the bias-free Inception softmax.
        splits: consecutive parts the rows are cut into (``part i = rows[i N / s : (i+1) N / s]``).

    Returns:
        The score, between 1 (every image gets the same distribution) and ``C``.

    Raises:
        ValueError: ``probs`` is not a 2-D array of probabilities, or ``splits`` is not in ``[1, N]``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        msg = f"probs must be a non-empty N x C array, got shape {probs.shape}"
        raise ValueError(msg)
    if not np.isfinite(probs).all() or (probs < 0).any():
        msg = "probs must be finite and non-negative"
        raise ValueError(msg)
    if np.abs(probs.sum(axis=1) - 1.0).max() > _PROB_SUM_TOLERANCE:
        msg = "probs rows must sum to 1 (pass softmax probabilities, not logits or features)"
        raise ValueError(msg)
    n = probs.shape[0]
    if not 1 <= splits <= n:
        msg = f"splits must be in [1, {n}], got {splits}"
        raise ValueError(msg)
    scores = []
    for i in range(splits):
        part = probs[i * n // splits : (i + 1) * n // splits]
        marginal = part.mean(axis=0, keepdims=True)
        positive = part > 0  # 0 log 0 = 0; p(y) > 0 wherever p(y|x) > 0
        ratio = np.log(np.where(positive, part, 1.0)) - np.log(np.where(positive, marginal, 1.0))
        kl = np.where(positive, part * ratio, 0.0).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores))


def kernel_inception_distance(
    gen_features: np.ndarray,
    real_features: np.ndarray,
    num_subsets: int = KID_NUM_SUBSETS,
    max_subset_size: int = KID_MAX_SUBSET_SIZE,
    seed: int = 0,
) -> float:
    """KID: the unbiased MMD² with the cubic polynomial kernel, averaged over random subsets (StyleGAN2-ADA).

    With ``d`` features, ``k(x, y) = (x.y / d + 1)^3``, and ``m`` items drawn without replacement from each set,
    a subset contributes ``sum_{i!=j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m-1)) - 2 sum_{i,j} k(x_i, y_j) / m²``.

    Args:
        gen_features: ``N x d`` features of generated images.
        real_features: ``M x d`` features of real images.
        num_subsets: subsets averaged.
        max_subset_size: cap on ``m = min(N, M, max_subset_size)``.
        seed: seed of the subset draws.

    Returns:
        The KID estimate (can be slightly negative: the estimator is unbiased).

    Raises:
        ValueError: the feature arrays are not 2-D with the same width, or the counts are not positive.
        UndefinedMetricError: ``m < 2``.
    """
    x_all = np.asarray(gen_features, dtype=np.float64)
    y_all = np.asarray(real_features, dtype=np.float64)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        msg = f"features must be N x d and M x d, got {x_all.shape} and {y_all.shape}"
        raise ValueError(msg)
    if num_subsets < 1 or max_subset_size < 1:
        msg = f"num_subsets and max_subset_size must be positive, got {num_subsets} and {max_subset_size}"
        raise ValueError(msg)
    if not (np.isfinite(x_all).all() and np.isfinite(y_all).all()):
        msg = "features contain NaN or infinite values"
        raise ValueError(msg)
    d = x_all.shape[1]
    m = min(len(x_all), len(y_all), max_subset_size)
    if m < 2:
        msg = f"KID needs at least 2 generated and 2 real items, got {len(x_all)} and {len(y_all)}"
        raise UndefinedMetricError(msg)
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        total += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(total / num_subsets / m)


def _cross_distances(distance: Distance, a: Tensor, b: Tensor, batch_size: int) -> np.ndarray:
    """``len(a) x len(b)`` distances, calling ``distance`` on row blocks of ``a`` and ``b``."""
    out = np.empty((len(a), len(b)), dtype=np.float64)
    for i in range(0, len(a), batch_size):
        for j in range(0, len(b), batch_size):
            block_a, block_b = a[i : i + batch_size], b[j : j + batch_size]
            block = torch.as_tensor(distance(block_a, block_b)).detach().to("cpu", torch.float64)
            if tuple(block.shape) != (len(block_a), len(block_b)):
                msg = (
                    f"distance(a, b) must return the len(a) x len(b) matrix, got {tuple(block.shape)} "
                    f"for {len(block_a)} x {len(block_b)}"
                )
                raise ValueError(msg)
            out[i : i + len(block_a), j : j + len(block_b)] = block.numpy()
    if not np.isfinite(out).all():
        msg = "distance returned NaN or infinite values"
        raise ValueError(msg)
    return out


def _mean_pairwise(distance: Distance, members: Tensor, batch_size: int) -> float:
    """Mean of ``distance(members[i], members[j])`` over ``i < j``, block by block (upper triangle only)."""
    n = len(members)
    total = 0.0
    for i in range(0, n, batch_size):
        for j in range(i, n, batch_size):
            block = _cross_distances(distance, members[i : i + batch_size], members[j : j + batch_size], batch_size)
            rows = np.arange(i, i + block.shape[0])[:, None]
            cols = np.arange(j, j + block.shape[1])[None, :]
            total += float(block[rows < cols].sum())
    return total / (n * (n - 1) / 2)


def ic_lpips(
    generated: Tensor,
    targets: Tensor,
    distance: Distance,
    mode: ICLpipsMode = "pairwise",
    *,
    max_per_cluster: int | None = IC_LPIPS_MAX_PER_CLUSTER,
    seed: int = 0,
    batch_size: int = 32,
) -> float:
    """Intra-cluster LPIPS: cluster the generated images by their nearest target, average within clusters.

    Args:
        generated: ``N`` generated items (images, or anything ``distance`` takes), indexed on dim 0.
        targets: ``K`` targets (the real training defects), indexed on dim 0.
        distance: ``distance(a, b)`` returns the ``len(a) x len(b)`` matrix of distances between the rows of
            ``a`` and of ``b`` (LPIPS: :meth:`QualityNetworks.lpips_distance`). It is called on blocks of at
            most ``batch_size`` rows.
        mode: ``"pairwise"`` (Ojha et al., default): per cluster, the mean distance over unordered pairs of
            members; clusters with fewer than 2 members are skipped. ``"to_target"`` (paper 000's supplement):
            per cluster, the mean distance of the members to the cluster's target; empty clusters are skipped.
        max_per_cluster: pairwise mode only: members drawn at random (``seed``) from a larger cluster before
            its pairs are formed (Ojha et al.: 50); None keeps every member.
        seed: seed of that draw.
        batch_size: rows per ``distance`` call.

    Returns:
        The mean over the clusters kept of their values.

    Raises:
        ValueError: empty inputs, a bad ``mode`` / ``max_per_cluster`` / ``batch_size``, or a distance that
            does not return a finite ``len(a) x len(b)`` matrix.
        UndefinedMetricError: no cluster has a value (pairwise mode: no cluster with 2 members).
    """
    if mode not in ("pairwise", "to_target"):
        msg = f"mode must be 'pairwise' or 'to_target', got {mode!r}"
        raise ValueError(msg)
    if len(generated) == 0 or len(targets) == 0:
        msg = f"need generated items and targets, got {len(generated)} and {len(targets)}"
        raise ValueError(msg)
    if max_per_cluster is not None and max_per_cluster < 2:
        msg = f"max_per_cluster must be None or at least 2, got {max_per_cluster}"
        raise ValueError(msg)
    if batch_size < 1:
        msg = f"batch_size must be positive, got {batch_size}"
        raise ValueError(msg)
    to_targets = _cross_distances(distance, generated, targets, batch_size)  # N x K
    assignment = to_targets.argmin(axis=1)  # ties go to the first target
    rng = np.random.default_rng(seed)
    values = []
    for k in range(len(targets)):
        members = np.flatnonzero(assignment == k)
        if mode == "to_target":
            if len(members) > 0:
                values.append(float(to_targets[members, k].mean()))
            continue
        if len(members) < 2:
            continue
        if max_per_cluster is not None and len(members) > max_per_cluster:
            members = np.sort(rng.choice(members, max_per_cluster, replace=False))
        values.append(_mean_pairwise(distance, generated[torch.as_tensor(members)], batch_size))
    logger.debug("IC-LPIPS cluster sizes: %s", np.bincount(assignment, minlength=len(targets)).tolist())
    if not values:
        msg = "IC-LPIPS (pairwise) is undefined: no cluster has 2 members"
        raise UndefinedMetricError(msg)
    return float(np.mean(values))


# ---------------------------------------------------------------- all together


def _as_uint8_images(images: Tensor, name: str) -> Tensor:
    """``B x 3 x H x W`` uint8 (0-255) from float images in [0, 1]; one channel is repeated to three."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        msg = f"{name} must be a B x 3 x H x W (or B x 1 x H x W) tensor, got {shape}"
        raise ValueError(msg)
    if not images.is_floating_point():
        msg = f"{name} must be float images in [0, 1], got {images.dtype}"
        raise ValueError(msg)
    if len(images) > 0 and (not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1):
        msg = f"{name} must hold finite values in [0, 1]"
        raise ValueError(msg)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    # The NVlabs networks were evaluated on 8-bit images; generated samples are stored as 8-bit PNGs anyway.
    return (images.detach().cpu() * 255).round().to(torch.uint8)


def generation_quality(
    generated: Tensor,
    real: Tensor | None,
    networks: QualityNetworks,
    *,
    ic_lpips_mode: ICLpipsMode = "pairwise",
    max_per_cluster: int | None = IC_LPIPS_MAX_PER_CLUSTER,
    is_splits: int = 1,
    num_subsets: int = KID_NUM_SUBSETS,
    max_subset_size: int = KID_MAX_SUBSET_SIZE,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, float]:
    """IS, IC-LPIPS and KID of a set of generated images, for whichever the loaded networks allow.

    - ``"is"`` needs the inception network.
    - ``"kid"`` needs the inception network and at least 2 real images.
    - ``"ic_lpips"`` needs the LPIPS network and the real images as cluster targets (the training defects).

    A metric the inputs leave undefined (e.g. pairwise IC-LPIPS with every cluster a singleton) is omitted
    with a warning. The networks run on the device they are on (:meth:`QualityNetworks.to`).

    Args:
        generated: ``B x 3 x H x W`` float images in [0, 1] (one defect type's generated set).
        real: ``M x 3 x H' x W'`` float images in [0, 1], the real training defects; None or empty to skip
            KID and IC-LPIPS. IC-LPIPS needs ``H' x W' = H x W``.
        networks: the pretrained networks from :meth:`QualityNetworks.load`.
        ic_lpips_mode: see :func:`ic_lpips`.
        max_per_cluster: see :func:`ic_lpips`.
        is_splits: see :func:`inception_score`.
        num_subsets: see :func:`kernel_inception_distance`.
        max_subset_size: see :func:`kernel_inception_distance`.
        seed: seed of the KID subsets and the IC-LPIPS member draw.
        batch_size: images per network call.

    Returns:
        The computed metrics among ``"is"``, ``"ic_lpips"`` and ``"kid"``.

    Raises:
        TypeError: ``networks`` is not a :class:`QualityNetworks`.
        ValueError: malformed images.
    """
    if not isinstance(networks, QualityNetworks):
        msg = f"networks must be QualityNetworks.load(...), got {type(networks).__name__}"
        raise TypeError(msg)
    gen = _as_uint8_images(generated, "generated")
    targets = None if real is None or len(real) == 0 else _as_uint8_images(real, "real")
    if len(gen) == 0:
        msg = "no generated images"
        raise ValueError(msg)
    results: dict[str, float] = {}

    if networks.inception is not None:
        probs = networks.inception_outputs(gen, features=False, batch_size=batch_size)
        results["is"] = inception_score(probs, splits=is_splits)
        if targets is not None:
            gen_features = networks.inception_outputs(gen, features=True, batch_size=batch_size)
            real_features = networks.inception_outputs(targets, features=True, batch_size=batch_size)
            try:
                results["kid"] = kernel_inception_distance(
                    gen_features, real_features, num_subsets=num_subsets, max_subset_size=max_subset_size, seed=seed
                )
            except UndefinedMetricError as error:
                logger.warning("KID left out: %s", error)

    if networks.lpips is not None and targets is not None:
        if targets.shape[2:] != gen.shape[2:]:
            sizes = f"generated {tuple(gen.shape[2:])}, real {tuple(targets.shape[2:])}"
            msg = f"IC-LPIPS compares images of one size: {sizes}"
            raise ValueError(msg)
        try:
            results["ic_lpips"] = ic_lpips(
                gen,
                targets,
                networks.lpips_distance,
                ic_lpips_mode,
                max_per_cluster=max_per_cluster,
                seed=seed,
                batch_size=batch_size,
            )
        except UndefinedMetricError as error:
            logger.warning("IC-LPIPS left out: %s", error)
    return results
