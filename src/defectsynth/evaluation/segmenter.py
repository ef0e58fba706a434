"""The downstream segmentation U-Net: DRAEM's discriminative sub-network, trained with DRAEM's focal loss.

This is the detector of the AnomalyDiffusion protocol (paper 000): a per-product U-Net trained on normal
images plus generated image-mask pairs, tested on held-out real defects. The architecture follows the
released DRAEM code (``DiscriminativeSubNetwork``): an encoder of ``depth`` blocks, each two
conv3x3-BN-ReLU, with 2x2 max-pooling between them and widths ``base_width x (1, 2, 4, 8, 8, 8)``; a
decoder that upsamples bilinearly, applies conv3x3-BN-ReLU, concatenates the encoder skip and applies two
more conv3x3-BN-ReLU; and a final conv3x3 to two channels (normal, anomalous logits). With
``base_width=64, depth=6`` the layer shapes are DRAEM's exactly; the default here is ``base_width=16`` so the
demo trains on a CPU.

DRAEM feeds this network the concatenation of the image and its reconstruction (6 channels). There is no
reconstructive sub-network here, so ``in_channels`` defaults to 3 (the image alone); DiffusionAD passes 6.
Images are float RGB in [0, 1], not ImageNet-normalised (as in DRAEM).

The model is a plain ``nn.Module`` with one return type, :class:`SegmentationOutput`, in train and eval mode
alike; :func:`training_step` and :func:`predict` are the thin fit/inference wrappers. Training-loop
orchestration (Ray Train, checkpoints, validation-based selection) lives in ``defectsynth.jobs``.

Example:
    >>> import torch
    >>> model = build_segmenter(SegmenterConfig(base_width=4))
    >>> out = predict(model, torch.rand(2, 3, 32, 32))
    >>> tuple(out.anomaly_map.shape), tuple(out.pred_score.shape)
    ((2, 1, 32, 32), (2,))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

SCORE_KERNEL = 21  # DRAEM / AnomalyDiffusion: image score = max of the 21x21 average-pooled map
TRAIN_FIELDS = ("image", "mask")  # the batch fields training_step reads
_WIDTH_FACTORS_CAP = 8  # widths grow x2 per level up to 8 x base_width, then stay (DRAEM)


class SegmenterConfig(BaseModel):
    """Hyper-parameters of the segmentation U-Net and its training, DRAEM's values unless noted.

    The architecture fields rebuild the model exactly (:func:`build_segmenter`); the training fields are read
    by the training job (:func:`configure_optimizer`, :func:`training_step`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_channels: int = Field(3, ge=1, description="3 = the image alone; DRAEM uses 6 (image + reconstruction)")
    base_width: int = Field(16, ge=1, description="width of the first encoder block; DRAEM uses 64")
    # The bottleneck is H / 2**(depth-1): keep it at 2 x 2 or more (64 px and up at depth 6), or BN statistics
    # of a few values per channel make eval-mode (running-average) maps unreliable.
    depth: int = Field(6, ge=2, le=8, description="encoder blocks (DRAEM: 6); input sides divide by 2**(depth-1)")
    score_kernel: int = Field(SCORE_KERNEL, ge=1, description="odd side of the average pool behind pred_score")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate (DRAEM)")
    batch_size: int = Field(8, ge=1, description="DRAEM: 8")
    epochs: int = Field(200, ge=1, description="DRAEM: 200")
    lr_milestones: tuple[float, ...] = Field((0.8, 0.9), description="MultiStepLR milestones as epoch fractions")
    lr_gamma: float = Field(0.2, gt=0, description="MultiStepLR decay factor (DRAEM)")
    focal_gamma: float = Field(2.0, ge=0, description="focal exponent (DRAEM's FocalLoss default)")
    focal_alpha: float | None = Field(None, ge=0, le=1, description="anomalous-class weight; None = 1 for both")
    focal_smooth: float = Field(1e-5, ge=0, lt=0.5, description="label smoothing and log floor (DRAEM)")


@dataclass(frozen=True)
class SegmentationOutput:
    """What the segmenter returns, in training and evaluation alike (anomalib's ``InferenceBatch`` fields).

    Attributes:
        anomaly_map: ``B x 1 x H x W`` softmax probability of the anomalous class.
        pred_score: ``B`` image scores, the max of the ``score_kernel``-average-pooled map.
        logits: ``B x 2 x H x W`` raw (normal, anomalous) logits, the input of :func:`focal_loss`. Kept on the
            output so the loss is computed from ``model(images)``, which is what a DDP-wrapped model needs.
    """

    anomaly_map: Tensor
    pred_score: Tensor
    logits: Tensor


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class _DoubleConv(nn.Sequential):
    """(conv3x3-BN-ReLU) x 2, DRAEM's block."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(*_conv_bn_relu(in_channels, out_channels), *_conv_bn_relu(out_channels, out_channels))


class _Up(nn.Sequential):
    """x2 bilinear upsampling then conv3x3-BN-ReLU, DRAEM's ``up*`` layers."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            *_conv_bn_relu(in_channels, out_channels),
        )


def _draem_init(module: nn.Module) -> None:
    """DRAEM's ``weights_init``: conv weights ~ N(0, 0.02), BN scale ~ N(1, 0.02), BN shift 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DiscriminativeUNet(nn.Module):
    """DRAEM's discriminative sub-network: a U-Net mapping images to two-class (normal, anomalous) logits.

    Encoder level ``i`` has width ``base_width * min(2**i, 8)``. Decoder level ``k`` upsamples to the width of
    encoder level ``k - 1`` (``base_width`` at the top), concatenates encoder level ``k`` and fuses; this is
    DRAEM's ``DecoderDiscriminative`` generalised over ``depth``.

    Args:
        in_channels: input channels (3 for images; 6 for DRAEM's image + reconstruction).
        base_width: width of the first encoder block (DRAEM: 64).
        depth: number of encoder blocks (DRAEM: 6). Input sides must be multiples of ``2 ** (depth - 1)``.
        score_kernel: odd side of the average pool behind ``pred_score`` (DRAEM: 21).

    Example:
        >>> import torch
        >>> out = DiscriminativeUNet(base_width=4, depth=3)(torch.rand(1, 3, 8, 8))
        >>> tuple(out.logits.shape)
        (1, 2, 8, 8)
    """

    def __init__(
        self, *, in_channels: int = 3, base_width: int = 16, depth: int = 6, score_kernel: int = SCORE_KERNEL
    ) -> None:
        super().__init__()
        if depth < 2 or base_width < 1 or in_channels < 1:
            msg = f"need depth >= 2, base_width >= 1, in_channels >= 1; got {depth}, {base_width}, {in_channels}"
            raise ValueError(msg)
        _check_kernel(score_kernel)
        self.hparams = {
            "in_channels": in_channels,
            "base_width": base_width,
            "depth": depth,
            "score_kernel": score_kernel,
        }
        widths = [base_width * min(2**i, _WIDTH_FACTORS_CAP) for i in range(depth)]
        self.down = nn.ModuleList(
            _DoubleConv(in_channels if i == 0 else widths[i - 1], widths[i]) for i in range(depth)
        )
        self.pool = nn.MaxPool2d(2)
        # Decoder level k (depth-2 .. 0) outputs the width of encoder level k-1, or base_width at the top.
        out_widths = [widths[k - 1] if k > 0 else base_width for k in range(depth - 1)]
        in_widths = [out_widths[k + 1] if k < depth - 2 else widths[-1] for k in range(depth - 1)]
        self.up = nn.ModuleList(_Up(in_widths[k], out_widths[k]) for k in range(depth - 1))
        self.fuse = nn.ModuleList(_DoubleConv(out_widths[k] + widths[k], out_widths[k]) for k in range(depth - 1))
        self.head = nn.Conv2d(base_width, 2, kernel_size=3, padding=1)
        self.apply(_draem_init)

    @property
    def in_channels(self) -> int:
        """Channels the network expects."""
        return self.hparams["in_channels"]

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (self.hparams["depth"] - 1)

    def forward(self, images: Tensor) -> SegmentationOutput:
        """Segment a batch.

        Args:
            images: ``B x in_channels x H x W`` float, H and W multiples of :attr:`size_multiple`.

        Returns:
            The anomaly map (softmax of the anomalous class), the image scores and the raw logits.
        """
        self._check_input(images)
        # 1. encoder: skips at full, 1/2, 1/4, ... resolution
        skips: list[Tensor] = []
        x = images
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        # 2. decoder: from the deepest skip back up to full resolution
        for k in reversed(range(len(self.up))):
            x = self.fuse[k](torch.cat((self.up[k](x), skips[k]), dim=1))
        # 3. head and post-processing
        logits = self.head(x)
        anomaly_map = logits.softmax(dim=1)[:, 1:]
        pred_score = image_score_from_map(anomaly_map, kernel=self.hparams["score_kernel"])
        return SegmentationOutput(anomaly_map=anomaly_map, pred_score=pred_score, logits=logits)

    def _check_input(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            msg = f"expected images of shape B x {self.in_channels} x H x W, got {tuple(images.shape)}"
            raise ValueError(msg)
        height, width = images.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            depth = self.hparams["depth"]
            msg = f"image sides must be multiples of {self.size_multiple} (depth {depth}), got {height}x{width}"
            raise ValueError(msg)


def build_segmenter(cfg: SegmenterConfig | None = None) -> DiscriminativeUNet:
    """Build the U-Net a config describes, with DRAEM's weight initialisation (seed torch beforehand).

    Args:
        cfg: the hyper-parameters; the defaults when omitted.

    Returns:
        A freshly initialised model in training mode.
    """
    cfg = cfg or SegmenterConfig()
    return DiscriminativeUNet(
        in_channels=cfg.in_channels, base_width=cfg.base_width, depth=cfg.depth, score_kernel=cfg.score_kernel
    )


def configure_optimizer(model: nn.Module, cfg: SegmenterConfig) -> tuple[torch.optim.Adam, LambdaLR]:
    """DRAEM's optimiser: Adam at ``cfg.lr`` and its MultiStepLR over ``cfg.epochs``, stepped once per epoch.

    Args:
        model: the segmenter (or its DDP wrapper).
        cfg: the training hyper-parameters.

    Returns:
        The optimiser and its scheduler; call ``scheduler.step()`` at the end of each epoch.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return optimizer, LambdaLR(optimizer, lambda epoch: learning_rate_factor(cfg, epoch + 1, cfg.epochs))


def learning_rate_factor(cfg: SegmenterConfig, step: int, total: int) -> float:
    """DRAEM's MultiStepLR as a share of ``cfg.lr`` at ``step`` (1-based) of ``total``.

    The rate falls by ``cfg.lr_gamma`` past each of ``cfg.lr_milestones`` (fractions of ``total``; DRAEM: x0.2
    past 80 % and again past 90 %), for epochs or steps alike.
    """
    milestones = {max(1, round(total * fraction)) for fraction in cfg.lr_milestones}
    return cfg.lr_gamma ** sum(step > milestone for milestone in milestones)


def _check_kernel(kernel: int) -> None:
    if kernel < 1 or kernel % 2 == 0:
        msg = f"the pooling kernel must be a positive odd number, got {kernel}"
        raise ValueError(msg)


def _as_map_batch(anomaly_map: Tensor) -> Tensor:
    if anomaly_map.ndim == 3:
        return anomaly_map.unsqueeze(1)
    if anomaly_map.ndim == 4 and anomaly_map.shape[1] == 1:
        return anomaly_map
    msg = f"expected an anomaly map of shape B x 1 x H x W or B x H x W, got {tuple(anomaly_map.shape)}"
    raise ValueError(msg)


def image_score_from_map(anomaly_map: Tensor, kernel: int = SCORE_KERNEL) -> Tensor:
    """Image score as in DRAEM's test code: the max of the ``kernel x kernel`` average-pooled map.

    The pool has stride 1 and zero padding ``kernel // 2`` counted in the average (PyTorch's
    ``count_include_pad=True``, as DRAEM), so the pooled map has the input's size.

    Args:
        anomaly_map: ``B x 1 x H x W`` or ``B x H x W`` pixel scores.
        kernel: odd pooling side (21 in DRAEM and AnomalyDiffusion).

    Returns:
        ``B`` image scores.

    Example:
        >>> m = torch.zeros(1, 1, 32, 32)
        >>> m[0, 0, 10:13, 10:13] = 1.0
        >>> round(float(image_score_from_map(m)[0]) * 441)
        9
    """
    _check_kernel(kernel)
    pooled = F.avg_pool2d(_as_map_batch(anomaly_map), kernel, stride=1, padding=kernel // 2)
    return pooled.amax(dim=(1, 2, 3))


def top_k_mean_score(anomaly_map: Tensor, k: int = 50) -> Tensor:
    """Image score as in DiffusionAD: the mean of the ``k`` highest pixel scores of each map.

    Args:
        anomaly_map: ``B x 1 x H x W`` or ``B x H x W`` pixel scores.
        k: how many pixels to average (DiffusionAD: 50); capped at the map size.

    Returns:
        ``B`` image scores.
    """
    if k < 1:
        msg = f"k must be at least 1, got {k}"
        raise ValueError(msg)
    flat = _as_map_batch(anomaly_map).flatten(1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(dim=1)


def focal_loss(
    logits: Tensor,
    target_mask: Tensor,
    *,
    gamma: float = 2.0,
    alpha: float | None = None,
    smooth: float = 1e-5,
) -> Tensor:
    """DRAEM's focal loss over the two-class softmax, averaged over pixels.

    Follows DRAEM's released ``FocalLoss`` as it is called in ``train_DRAEM.py`` (``FocalLoss()`` on the
    softmax output): ``gamma=2``, no class weighting (``alpha=None`` gives both classes weight 1), and
    ``smooth=1e-5``, which clamps the one-hot target to ``[smooth, 1 - smooth]`` and adds ``smooth`` to the
    true-class probability ``p_t`` before the log. Per pixel the loss is ``-w * (1 - p_t) ** gamma * log(p_t)``.

    With ``alpha`` given, ``w`` is ``alpha`` on anomalous pixels and ``1 - alpha`` on normal ones (the
    RetinaNet convention; DRAEM's code would weight the *normal* class with a float alpha, but never does).
    ``gamma=0, smooth=0, alpha=None`` is plain cross-entropy.

    Args:
        logits: ``B x 2 x H x W`` (normal, anomalous) logits.
        target_mask: ``B x 1 x H x W`` or ``B x H x W``; values above 0.5 are anomalous.
        gamma: focusing exponent (DRAEM: 2).
        alpha: anomalous-class weight in [0, 1], or None for no weighting (DRAEM).
        smooth: label smoothing and log floor (DRAEM: 1e-5).

    Returns:
        The scalar mean loss.
    """
    if logits.ndim != 4 or logits.shape[1] != 2:
        msg = f"expected logits of shape B x 2 x H x W, got {tuple(logits.shape)}"
        raise ValueError(msg)
    target = _as_map_batch(target_mask).to(logits.device)
    if target.shape[0] != logits.shape[0] or target.shape[-2:] != logits.shape[-2:]:
        msg = f"mask shape {tuple(target_mask.shape)} does not match logits {tuple(logits.shape)}"
        raise ValueError(msg)
    anomalous = (target > 0.5).to(logits.dtype)  # B x 1 x H x W
    one_hot = torch.cat((1.0 - anomalous, anomalous), dim=1).clamp(smooth, 1.0 - smooth)
    p_t = (one_hot * logits.softmax(dim=1)).sum(dim=1, keepdim=True) + smooth
    loss = -((1.0 - p_t).clamp(min=0.0) ** gamma) * torch.log(p_t)
    if alpha is not None:
        loss = loss * (alpha * anomalous + (1.0 - alpha) * (1.0 - anomalous))
    return loss.mean()


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def training_step(
    model: nn.Module, batch: Mapping[str, Tensor], *, gamma: float = 2.0, alpha: float | None = None
) -> Tensor:
    """Forward one batch and return the focal loss; the caller does ``backward`` and the optimiser step.

    The model's mode is left as it is (call ``model.train()`` first). Works on a DDP-wrapped model, since the
    loss comes from ``model(images)``.

    Args:
        model: the segmenter, possibly wrapped (DDP).
        batch: ``{"image": B x C x H x W float in [0, 1], "mask": B x 1 x H x W in {0, 1}}``; both required.
        gamma: focal exponent (``SegmenterConfig.focal_gamma``).
        alpha: focal class weight (``SegmenterConfig.focal_alpha``).

    Returns:
        The scalar loss, attached to the graph.

    Raises:
        ValueError: when a field is missing or the shapes disagree.
    """
    missing = [name for name in TRAIN_FIELDS if name not in batch]
    if missing:
        msg = f"the training batch lacks the fields {missing}; training_step reads {list(TRAIN_FIELDS)}"
        raise ValueError(msg)
    device = _model_device(model)
    out: SegmentationOutput = model(batch["image"].to(device, dtype=torch.float32))
    return focal_loss(out.logits, batch["mask"].to(device), gamma=gamma, alpha=alpha)


def predict(model: nn.Module, images: Tensor) -> SegmentationOutput:
    """Segment images in eval mode (BN running statistics) without autograd; the model's mode is restored.

    Args:
        model: the segmenter.
        images: ``B x C x H x W`` float in [0, 1]; moved to the model's device.

    Returns:
        The outputs, detached, on the model's device.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(images.to(_model_device(model), dtype=torch.float32))
    finally:
        model.train(was_training)
