"""The anomaly-type classifier of paper 000's Table 4 (the DFMGAN protocol), a ResNet over defect types.

Protocol: for each product, a ResNet is trained to tell its anomaly types apart using **generated** defect
images only, then tested on the **real** held-out defect images (the 2/3 of each type not used to train the
generator); the metric is classification accuracy, averaged over products. Paper 000 is inconsistent about
the network: its text says ResNet-34, its Table 4 caption ResNet-18. The default here is ResNet-18
(``ClassifierConfig.depth=18``); ``depth=34`` gives the text's variant.

The platform trains from scratch by default (``pretrained_path=None``); a local torchvision ImageNet
checkpoint (e.g. ``resnet18-f37072fd.pth``) can be given instead and is loaded by :func:`build_classifier`
(its 1000-way ``fc`` is skipped and the head starts fresh). Nothing is ever downloaded. Inputs are float RGB
in [0, 1]; the model applies ImageNet mean/std itself, so pretrained weights see what they were trained on.

The model is a plain ``nn.Module`` returning logits; :func:`classification_loss`, :func:`augment_batch`,
:func:`configure_optimizer` and :func:`predict_types` are the pieces a training job assembles (the job reads
``cfg.augment`` and calls :func:`augment_batch` on each training batch).

Example:
    >>> import torch
    >>> model = build_classifier(["crack", "hole", "scratch"], ClassifierConfig(width=4))
    >>> predict_types(model, torch.rand(2, 3, 32, 32))[0] in model.class_names
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from defectsynth.core.resnet import ResNet, load_backbone_weights, resnet
from defectsynth.evaluation.settings import ClassifierConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet normalisation, what its checkpoints expect
IMAGENET_STD = (0.229, 0.224, 0.225)
_ROTATIONS = 4  # quarter turns drawn by augment_batch


class DefectClassifier(nn.Module):
    """A ResNet-18/34 that maps ``[0, 1]`` RGB images to logits over a product's anomaly types.

    ``class_names`` is fixed at construction and is **not** part of ``state_dict()`` (which holds only the
    ResNet's tensors, under ``resnet.*``; the normalisation constants are non-persistent buffers). To rebuild
    a trained model, store the class names and the config next to the weights and call
    ``DefectClassifier(class_names, cfg).load_state_dict(...)``. Construction never reads files; use
    :func:`build_classifier` to apply ``cfg.pretrained_path``.

    Args:
        class_names: the anomaly types, in label order (label ``i`` is ``class_names[i]``); at least two,
            distinct.
        cfg: the hyper-parameters; the defaults when omitted.

    Example:
        >>> import torch
        >>> model = DefectClassifier(["crack", "hole"], ClassifierConfig(width=4))
        >>> tuple(model(torch.rand(3, 3, 32, 32)).shape)
        (3, 2)
    """

    def __init__(self, class_names: Sequence[str], cfg: ClassifierConfig | None = None) -> None:
        super().__init__()
        names = _check_class_names(class_names)
        self.cfg = cfg or ClassifierConfig()
        self.class_names: list[str] = names
        self.resnet: ResNet = resnet(self.cfg.depth, num_classes=len(names), width=self.cfg.width)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        """How many anomaly types the head separates."""
        return len(self.class_names)

    def forward(self, images: Tensor) -> Tensor:
        """Classify a batch.

        Args:
            images: ``B x 3 x H x W`` float RGB in [0, 1] (sides of 32 px and up).

        Returns:
            ``B x num_classes`` logits, in the order of :attr:`class_names`.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            msg = f"expected images of shape B x 3 x H x W, got {tuple(images.shape)}"
            raise ValueError(msg)
        return self.resnet((images - self.mean) / self.std)


def _check_class_names(class_names: Sequence[str]) -> list[str]:
    if isinstance(class_names, str):
        msg = f"class_names must be a sequence of names, not the single string {class_names!r}"
        raise TypeError(msg)
    names = list(class_names)
    if len(names) < 2:
        msg = f"a type classifier needs at least 2 anomaly types (accuracy over one is meaningless), got {len(names)}"
        raise ValueError(msg)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        msg = f"class names must be distinct; repeated: {duplicates}"
        raise ValueError(msg)
    return names


def build_classifier(class_names: Sequence[str], cfg: ClassifierConfig | None = None) -> DefectClassifier:
    """Build the classifier a config describes (seed torch beforehand), loading ``cfg.pretrained_path`` if set.

    With a pretrained file, every backbone tensor comes from it (the file must match ``depth`` and ``width``:
    torchvision's are width 64) and the head is freshly initialised when its shape differs (ImageNet's 1000
    classes); see :func:`defectsynth.core.resnet.load_backbone_weights`.

    Args:
        class_names: the anomaly types in label order; at least two.
        cfg: the hyper-parameters; the defaults (ResNet-18, from scratch) when omitted.

    Returns:
        The model, in training mode.

    Raises:
        ValueError: with fewer than two (or repeated) class names, or a checkpoint that does not fit.
        FileNotFoundError: when ``cfg.pretrained_path`` names no file.
    """
    cfg = cfg or ClassifierConfig()
    model = DefectClassifier(class_names, cfg)
    if cfg.pretrained_path is not None:
        load_backbone_weights(model.resnet, cfg.pretrained_path)
    return model


def augment_batch(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random horizontal flip, vertical flip and quarter turn, drawn independently for each sample.

    Each sample is flipped left-right with probability 1/2, up-down with probability 1/2, then rotated by
    ``k * 90`` degrees with ``k`` uniform in {0, 1, 2, 3}; together these reach all 8 symmetries of the square.
    Non-square images get ``k`` rounded down to 0 or 2 (half turns only), so the shape is always kept. The
    draws come from ``generator`` only (on its own device), so a seeded generator repeats the batch exactly.

    Args:
        images: ``B x C x H x W``.
        generator: the source of randomness.

    Returns:
        A new ``B x C x H x W`` tensor; ``images`` is not modified.

    Example:
        >>> x = torch.rand(4, 3, 8, 8)
        >>> a = augment_batch(x, torch.Generator().manual_seed(0))
        >>> torch.equal(a, augment_batch(x, torch.Generator().manual_seed(0)))
        True
    """
    if images.ndim != 4:
        msg = f"expected images of shape B x C x H x W, got {tuple(images.shape)}"
        raise ValueError(msg)
    batch = images.shape[0]
    draws = torch.randint(0, 2 * 2 * _ROTATIONS, (batch,), generator=generator, device=generator.device)
    draws = draws.to(images.device)
    flip_h = (draws % 2).bool().view(-1, 1, 1, 1)
    flip_v = (draws // 2 % 2).bool().view(-1, 1, 1, 1)
    turns = draws // 4
    if images.shape[-2] != images.shape[-1]:
        turns = turns // 2 * 2  # a quarter turn would swap H and W
    out = torch.where(flip_h, images.flip(-1), images)
    out = torch.where(flip_v, out.flip(-2), out)
    rotated = out.clone()
    for k in range(1, _ROTATIONS):
        chosen = turns == k
        if bool(chosen.any()):
            rotated[chosen] = torch.rot90(out[chosen], k, dims=(-2, -1))
    return rotated


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy, averaged over the batch.

    Args:
        logits: ``B x num_classes`` raw scores.
        labels: ``B`` integer labels (indices into ``class_names``).

    Returns:
        The scalar mean loss.
    """
    if logits.ndim != 2 or labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        msg = f"expected logits B x K and labels B, got {tuple(logits.shape)} and {tuple(labels.shape)}"
        raise ValueError(msg)
    return F.cross_entropy(logits, labels.to(device=logits.device, dtype=torch.long))


def configure_optimizer(model: nn.Module, cfg: ClassifierConfig) -> torch.optim.Adam:
    """Adam at ``cfg.lr`` with ``cfg.weight_decay`` as a classic (coupled) L2 penalty on all parameters.

    Plain Adam rather than AdamW: with the ResNet-recipe ``weight_decay=1e-4``, AdamW's decoupled decay
    (``lr * wd`` per step) would be negligible, while the L2 form regularises as the recipe intends. No
    schedule: the job's epoch count is short and the paper gives none.

    Args:
        model: the classifier (or its DDP wrapper).
        cfg: the hyper-parameters.

    Returns:
        The optimiser.
    """
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def predict_types(model: nn.Module, images: Tensor, batch_size: int = 32) -> list[str]:
    """Predict the anomaly type of each image, in eval mode without autograd; the model's mode is restored.

    Args:
        model: a :class:`DefectClassifier`, possibly DDP-wrapped (its ``module`` then supplies the names).
        images: ``B x 3 x H x W`` float in [0, 1]; moved to the model's device batch by batch.
        batch_size: images per forward pass.

    Returns:
        ``B`` class names, the argmax of the logits.
    """
    if batch_size < 1:
        msg = f"batch_size must be at least 1, got {batch_size}"
        raise ValueError(msg)
    class_names: list[str] = getattr(model, "module", model).class_names
    if images.shape[0] == 0:
        return []
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            indices = [
                model(chunk.to(device, dtype=torch.float32)).argmax(dim=1).cpu() for chunk in images.split(batch_size)
            ]
    finally:
        model.train(was_training)
    return [class_names[i] for i in torch.cat(indices).tolist()]
