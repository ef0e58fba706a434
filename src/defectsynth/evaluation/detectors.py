"""The three downstream detectors behind one interface, so ``jobs.evaluate`` trains, selects and tests them alike.

A :class:`Detector` says what one training batch is (built from real normals and a stream of synthetic
pairs), how its loss reads the model's output, which validation metric selects its checkpoint, and how it
predicts on real images. The job looks detectors up in :data:`DETECTORS` and never branches on a name.

- ``segmenter``: DRAEM's discriminative U-Net on real normals plus synthetic pairs (paper 000's protocol).
- ``classifier``: a ResNet defect-type classifier trained on synthetic defects only (paper 000, Table 4).
- ``diffusionad``: DiffusionAD (paper 003). It also trains without any platform data (method ``none``) on
  its own Perlin + foreground anomalies, which is the "no synthetic data" baseline row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from defectsynth.evaluation import classifier as cls
from defectsynth.evaluation import diffusionad as dad
from defectsynth.evaluation.data import RealImages
from defectsynth.evaluation.metrics import score_detection
from defectsynth.evaluation.segmenter import SegmenterConfig, build_segmenter, focal_loss, predict
from defectsynth.evaluation.segmenter import learning_rate_factor as segmenter_rate_factor
from defectsynth.evaluation.settings import ClassifierConfig, DiffusionADConfig

NO_SYNTHETIC = "none"  # the method name of a detector trained without platform data


@dataclass(frozen=True)
class SyntheticPair:
    """One generated sample as a detector trains on it."""

    image: Tensor  # 3 x H x W float in [0, 1]
    mask: Tensor  # 1 x H x W float in {0, 1}
    defect_type: str


@dataclass(frozen=True)
class DetectorContext:
    """What every detector of one product's fit shares."""

    resolution: int
    defect_types: list[str]  # the product's defect types, in a fixed order (the classifier's classes)
    batch_size: int
    synthetic_fraction: float  # share of a mixed batch that is synthetic


@dataclass(frozen=True)
class TrainingBatch:
    """``inputs`` go through ``engine(*inputs)``; ``targets`` are what the loss reads besides the output."""

    inputs: tuple[Tensor, ...]
    targets: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Predictions:
    """A detector's outputs on a set of real images (anomalib's field names)."""

    anomaly_maps: np.ndarray | None = None  # N x H x W
    image_scores: np.ndarray | None = None  # N
    pred_types: list[str | None] | None = None  # N, None where the detector did not classify

    def score(self, real: RealImages, *, per_type: bool = True) -> dict[str, float]:
        """The stable metrics these predictions support, against the images' ground truth."""
        return score_detection(
            anomaly_maps=self.anomaly_maps,
            gt_masks=None if self.anomaly_maps is None else real.masks[:, 0].numpy() > 0.5,
            image_scores=self.image_scores,
            labels=real.labels,
            defect_types=real.defect_types,
            pred_types=self.pred_types,
            per_type=per_type,
        )


class Detector(Protocol):
    """What ``jobs.evaluate`` needs of a downstream detector."""

    name: ClassVar[str]
    trains_without_synthetic: ClassVar[bool]  # True: also trained on method "none" (no platform data)
    selection_metric: ClassVar[str]  # validation metric that picks the checkpoint

    @staticmethod
    def unavailable(defect_types: list[str]) -> str | None:
        """Why this detector cannot run on a product with these defect types, or None when it can."""
        ...

    def build(self) -> nn.Module:
        """A freshly initialised model (seed torch beforehand)."""
        ...

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimiser of the paper's protocol."""
        ...

    def learning_rate_factor(self, step: int, max_steps: int) -> float:
        """The share of the optimiser's rate at ``step`` (1-based) of ``max_steps``: the protocol's schedule."""
        ...

    def training_batch(
        self, normals: RealImages, synthetic: Iterator[SyntheticPair] | None, rng: np.random.Generator
    ) -> TrainingBatch:
        """One batch; ``synthetic`` is None for method "none"."""
        ...

    def loss(self, output: Any, batch: TrainingBatch) -> Tensor:
        """The scalar loss of ``output = model(*batch.inputs)``."""
        ...

    def predict(self, model: nn.Module, real: RealImages) -> Predictions:
        """Predictions on real images, in eval mode, without gradients."""
        ...


def mixed_batch(
    normals: RealImages, synthetic: Iterator[SyntheticPair], context: DetectorContext, rng: np.random.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Real normals (empty masks) then synthetic defects, ``synthetic_fraction`` of the batch synthetic.

    Returns:
        images ``B x 3 x H x W``, masks ``B x 1 x H x W`` and ``anomalous`` (B float, 1 for synthetic).
    """
    n_synthetic = max(1, round(context.batch_size * context.synthetic_fraction))
    picks = rng.integers(len(normals), size=context.batch_size - n_synthetic)
    pairs = [next(synthetic) for _ in range(n_synthetic)]
    images = torch.cat([normals.images[picks], torch.stack([p.image for p in pairs])])
    empty = torch.zeros(len(picks), 1, context.resolution, context.resolution)
    masks = torch.cat([empty, torch.stack([p.mask for p in pairs])])
    anomalous = torch.cat([torch.zeros(len(picks)), torch.ones(n_synthetic)])
    return images, masks, anomalous


def _torch_generator(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(1 << 62)))


def map_predictions(real: RealImages, predict_batch: Callable[[Tensor], Any], batch_size: int = 16) -> Predictions:
    """Run a map-producing ``predict_batch`` (its output has ``anomaly_map`` and ``pred_score``) over ``real``."""
    side = real.images.shape[-1]
    maps, scores = [np.zeros((0, side, side), np.float32)], [np.zeros(0, np.float32)]
    for start in range(0, len(real), batch_size):
        out = predict_batch(real.images[start : start + batch_size])
        maps.append(out.anomaly_map[:, 0].float().cpu().numpy())
        scores.append(out.pred_score.float().cpu().numpy())
    return Predictions(anomaly_maps=np.concatenate(maps), image_scores=np.concatenate(scores))


@dataclass(frozen=True)
class SegmenterDetector:
    """DRAEM's discriminative U-Net with focal loss; image score = max of the 21x21 average-pooled map."""

    settings: SegmenterConfig
    context: DetectorContext

    name: ClassVar[str] = "segmenter"
    trains_without_synthetic: ClassVar[bool] = False
    selection_metric: ClassVar[str] = "pixel_ap"

    @staticmethod
    def unavailable(defect_types: list[str]) -> str | None:
        """Runs on any product."""
        return None

    def build(self) -> nn.Module:
        """DRAEM's U-Net at the configured width."""
        return build_segmenter(self.settings)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Adam at DRAEM's rate."""
        return torch.optim.Adam(model.parameters(), lr=self.settings.lr)

    def learning_rate_factor(self, step: int, max_steps: int) -> float:
        """DRAEM's step decay, its epochs read as the run's steps."""
        return segmenter_rate_factor(self.settings, step, max_steps)

    def training_batch(
        self, normals: RealImages, synthetic: Iterator[SyntheticPair] | None, rng: np.random.Generator
    ) -> TrainingBatch:
        """Normals plus synthetic pairs; the masks are the targets."""
        if synthetic is None:
            msg = "the segmenter needs synthetic pairs: it has no anomalies of its own"
            raise ValueError(msg)
        images, masks, _ = mixed_batch(normals, synthetic, self.context, rng)
        return TrainingBatch(inputs=(images,), targets={"mask": masks})

    def loss(self, output: Any, batch: TrainingBatch) -> Tensor:
        """DRAEM's focal loss on the two-class logits."""
        logits = output.logits.float()
        return focal_loss(logits, batch.targets["mask"].to(logits.device), gamma=self.settings.focal_gamma)

    def predict(self, model: nn.Module, real: RealImages) -> Predictions:
        """Anomaly maps and image scores of every image."""
        return map_predictions(real, lambda images: predict(model, images))


@dataclass(frozen=True)
class ClassifierDetector:
    """A ResNet that names the defect type, trained on synthetic defects only; tested on real defects."""

    settings: ClassifierConfig
    context: DetectorContext

    name: ClassVar[str] = "classifier"
    trains_without_synthetic: ClassVar[bool] = False
    selection_metric: ClassVar[str] = "cls_accuracy"

    @staticmethod
    def unavailable(defect_types: list[str]) -> str | None:
        """Naming the type of a product with one defect type is trivial, so it is not measured."""
        if len(defect_types) < 2:
            return f"one defect type ({', '.join(defect_types) or 'none'}): accuracy would be trivially 1"
        return None

    def build(self) -> nn.Module:
        """A ResNet over the product's defect types."""
        return cls.build_classifier(self.context.defect_types, self.settings)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The classifier's optimiser."""
        return cls.configure_optimizer(model, self.settings)

    def learning_rate_factor(self, step: int, max_steps: int) -> float:
        """A constant rate, as its protocol here trains."""
        return 1.0

    def training_batch(
        self, normals: RealImages, synthetic: Iterator[SyntheticPair] | None, rng: np.random.Generator
    ) -> TrainingBatch:
        """A batch of synthetic defects (flipped and rotated when configured); their types are the targets."""
        if synthetic is None:
            msg = "the classifier needs synthetic defects: it learns defect types from them"
            raise ValueError(msg)
        pairs = [next(synthetic) for _ in range(self.context.batch_size)]
        unknown = sorted({p.defect_type for p in pairs} - set(self.context.defect_types))
        if unknown:
            msg = f"synthetic defect types {unknown} are not types of the product {self.context.defect_types}"
            raise ValueError(msg)
        images = torch.stack([p.image for p in pairs])
        if self.settings.augment:
            images = cls.augment_batch(images, _torch_generator(rng))
        labels = torch.tensor([self.context.defect_types.index(p.defect_type) for p in pairs])
        return TrainingBatch(inputs=(images,), targets={"label": labels})

    def loss(self, output: Any, batch: TrainingBatch) -> Tensor:
        """Cross-entropy over the defect types."""
        return cls.classification_loss(output.float(), batch.targets["label"].to(output.device))

    def predict(self, model: nn.Module, real: RealImages) -> Predictions:
        """Defect types of the anomalous images; normal images are not classified (None)."""
        anomalous = np.flatnonzero(real.labels == 1)
        names = cls.predict_types(model, real.images[anomalous]) if len(anomalous) else []
        pred_types: list[str | None] = [None] * len(real)
        for index, name in zip(anomalous, names, strict=True):
            pred_types[index] = name
        return Predictions(pred_types=pred_types)


@dataclass(frozen=True)
class DiffusionADDetector:
    """DiffusionAD: a pixel DDPM and a segmentation U-Net trained jointly; norm-guided one-step inference."""

    settings: DiffusionADConfig
    context: DetectorContext

    name: ClassVar[str] = "diffusionad"
    trains_without_synthetic: ClassVar[bool] = True
    selection_metric: ClassVar[str] = "pixel_ap"

    @staticmethod
    def unavailable(defect_types: list[str]) -> str | None:
        """Runs on any product."""
        return None

    def build(self) -> nn.Module:
        """The denoiser and the segmentation sub-network."""
        return dad.build_diffusionad(self.settings)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Adam over both sub-networks."""
        return dad.configure_optimizer(model, self.settings)

    def learning_rate_factor(self, step: int, max_steps: int) -> float:
        """A constant rate, as its protocol here trains."""
        return 1.0

    def training_batch(
        self, normals: RealImages, synthetic: Iterator[SyntheticPair] | None, rng: np.random.Generator
    ) -> TrainingBatch:
        """Normals plus anomalies: the platform's pairs, or DiffusionAD's own (Eq. 12) for method "none"."""
        if synthetic is not None:
            images, masks, anomalous = mixed_batch(normals, synthetic, self.context, rng)
        else:
            images, masks, anomalous = self._own_anomalies(normals, rng)
        images, masks = self._to_working_side(images), self._to_working_side(masks, mask=True)
        noise = dad.sample_training_noise(images.shape, _torch_generator(rng), self.settings)
        return TrainingBatch(inputs=(images, masks, anomalous, *noise))

    def _to_working_side(self, batch: Tensor, *, mask: bool = False) -> Tensor:
        """A batch at ``settings.resolution`` (masks: a pixel is set when any pixel it covers is), or unchanged."""
        side = self.settings.resolution
        if side is None or side == batch.shape[-1]:
            return batch
        if mask:
            return F.adaptive_max_pool2d(batch, side)
        return F.interpolate(batch, size=(side, side), mode="bilinear", antialias=True, align_corners=False)

    def _own_anomalies(self, normals: RealImages, rng: np.random.Generator) -> tuple[Tensor, Tensor, Tensor]:
        n_synthetic = max(1, round(self.context.batch_size * self.context.synthetic_fraction))
        picks = rng.integers(len(normals), size=self.context.batch_size)
        images = normals.images[picks]
        foregrounds = None if normals.foregrounds is None else normals.foregrounds[picks[n_synthetic:]]
        made, made_masks = dad.synthesize_anomalies(images[n_synthetic:], foregrounds, rng, self.settings)
        keep = images[: len(picks) - n_synthetic]
        empty = torch.zeros(len(keep), 1, self.context.resolution, self.context.resolution)
        anomalous = torch.cat([torch.zeros(len(keep)), (made_masks.flatten(1).amax(1) > 0).float()])
        return torch.cat([keep, made]), torch.cat([empty, made_masks]), anomalous

    def loss(self, output: Any, batch: TrainingBatch) -> Tensor:
        """L_noise + L_mask, computed inside the model's forward."""
        return output.loss

    def predict(self, model: nn.Module, real: RealImages) -> Predictions:
        """Anomaly maps from the norm-guided reconstruction; image score = mean of the top-k pixels."""

        def predict_batch(images: Tensor) -> dad.DiffusionADPrediction:
            out = dad.predict(model, self._to_working_side(images), seed=0)
            if out.anomaly_map.shape[-1] == images.shape[-1]:
                return out
            side = images.shape[-2:]
            full = F.interpolate(out.anomaly_map, size=side, mode="bilinear", align_corners=False)
            return replace(out, anomaly_map=full)

        return map_predictions(real, predict_batch)


DETECTORS: dict[str, Callable[[Any, DetectorContext], Detector]] = {
    SegmenterDetector.name: SegmenterDetector,
    ClassifierDetector.name: ClassifierDetector,
    DiffusionADDetector.name: DiffusionADDetector,
}


def detector_methods(detector: str, methods: list[str]) -> list[str]:
    """The methods a detector is trained on: every platform method, plus "none" when it can learn without."""
    if detector not in DETECTORS:
        msg = f"unknown detector {detector!r}; known: {sorted(DETECTORS)}"
        raise ValueError(msg)
    trains_alone = DETECTORS[detector].trains_without_synthetic  # type: ignore[attr-defined]
    return ([NO_SYNTHETIC] if trains_alone else []) + list(methods)
