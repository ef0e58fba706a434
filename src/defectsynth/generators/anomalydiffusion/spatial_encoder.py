"""AnomalyDiffusion's spatial encoder E: an anomaly mask in, ``n`` text-embedding tokens ``e_s`` out.

Paper 000 conditions the frozen LDM on ``e = concat(e_a, e_s)``: ``e_a`` are ``k = 8`` learned tokens per
anomaly type (appearance), ``e_s = E(m)`` are ``n = 4`` tokens computed from the mask (location), and ``E`` is
shared by every anomaly type and trained jointly with all ``e_a``. The paper describes E as ResNet-50
multi-layer features fused by an FPN, followed by one fully connected head per output token.

This module builds that: a torchvision-layout ResNet (:mod:`defectsynth.core.resnet`, depth 18/34/50,
channel scale ``width``) gives C2..C5 (strides 4-32); an FPN (Lin et al. 2017: 1x1 lateral convs to
``fpn_channels``, nearest-neighbour top-down upsampling and addition, a 3x3 smoothing conv per level) gives
P2..P5; each level is average-pooled to a ``pool_size x pool_size`` grid and the levels are averaged into one
``fpn_channels * pool_size**2`` vector, layer-normalised; ``tokens`` separate ``nn.Linear`` heads each map it
to one ``embedding_dim`` token.

Where the released code (``sjtuplayer/anomalydiffusion``, ``EmbeddingManager.prepare_spatial_encoder`` ->
pSp's ``GradualStyleEncoder(text_num=4)``) differs, and what was chosen here:

- Backbone: the release uses pSp's IR-ResNet-50 (3x3 stride-1 stem, PReLU, three stages used); here it is a
  torchvision ResNet so ImageNet checkpoints load unchanged (``pretrained_path``), all four stages feed the FPN.
- FPN: the release upsamples bilinearly, uses 512 channels and has no smoothing convs; here it is the standard
  FPN (nearest upsampling, 3x3 smoothing), ``fpn_channels`` (256 at paper scale, FPN's usual width).
- Heads: in the release all four heads read the finest level (its ``coarse_ind = middle_ind = 0``), each head
  a stack of stride-2 3x3 convs with LeakyReLU down to 1 x 1 followed by an equalised linear layer (about 80M
  parameters per head at 1280 channels). Here the heads share one pooled vector and are single linear layers.
  The pooling keeps a coarse grid rather than a global average because a global average of a translation-
  equivariant CNN is nearly translation invariant: two masks that differ only by a shift would get almost the
  same tokens, yet location is what E exists to encode (``pool_size=1`` gives the global average).
- Levels are averaged (not concatenated) after pooling, so the head width does not grow with the pyramid;
  the top-down pathway already mixes the levels.
- Output scale: a LayerNorm on the fused vector and head weights ~ N(0, init_scale**2 / fan_in), zero biases,
  give initial tokens with per-element std ``init_scale`` whatever the mask or backbone init, comparable to
  CLIP token embeddings (std about 0.014-0.02), so the untrained encoder does not swamp the text condition.
  The release has no such normalisation (its equalised linear layers start with unit-scale outputs).
- Input: masks in [0, 1] are replicated to 3 channels and mapped to [-1, 1] as in the release
  (``input_norm="signed"``); ``"imagenet"`` applies ImageNet's mean/std instead, the statistics torchvision
  checkpoints were trained with. Masks of any size work (the pooling is adaptive); the release uses 256 px.

Parameter counts (``embedding_dim=768``, SD's CLIP width; LDM's BERT uses 1280 as in the release):
the paper configuration (depth 50, width 64, fpn_channels 256, pool_size 4, 4 tokens) has 39,446,592
parameters: backbone 23,508,032, FPN 3,344,384, LayerNorm 8,192, heads 12,585,984. The demo configuration
(depth 50, width 8, fpn_channels 32, pool_size 4, ``embedding_dim=64``) has 558,984.

Example:
    >>> import torch
    >>> encoder = build_spatial_encoder(SpatialEncoderSettings(depth=18, width=8, fpn_channels=16), 32)
    >>> tuple(encoder(torch.rand(2, 1, 64, 64)).shape)
    (2, 4, 32)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from defectsynth.core.resnet import ResNet, load_backbone_weights, resnet

# (mean, std) per RGB channel applied to the 3-channel replicated mask
INPUT_NORMS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "signed": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # [0, 1] -> [-1, 1], the released code's ``x * 2 - 1``
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision checkpoints' statistics
}


class SpatialEncoderSettings(BaseModel):
    """Hyper-parameters of the spatial encoder E; the paper's values unless noted.

    The fields rebuild the encoder exactly (:func:`build_spatial_encoder`) together with ``embedding_dim``, which
    is the text encoder's token width and so belongs to the diffusion model, not to these settings.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: int = Field(4, ge=1, description="n, the number of spatial tokens e_s (paper: 4)")
    depth: Literal[18, 34, 50] = Field(50, description="ResNet depth (paper: 50)")
    width: int = Field(64, ge=1, description="ResNet channel scale (torchvision: 64; demos use 8-16)")
    fpn_channels: int = Field(256, ge=1, description="channels of every FPN level (FPN's usual 256)")
    pool_size: int = Field(
        4, ge=1, description="side of the grid each FPN level is average-pooled to; 1 = global average pooling"
    )
    init_scale: float = Field(0.02, gt=0, description="per-element std of the initial tokens (CLIP-like scale)")
    input_norm: Literal["signed", "imagenet"] = Field(
        "signed", description="'signed': masks to [-1, 1] (released code); 'imagenet': ImageNet mean/std"
    )
    pretrained_path: str | None = Field(
        None, min_length=1, description="local torchvision ResNet checkpoint of this depth and width; None = scratch"
    )


class FeaturePyramid(nn.Module):
    """A feature pyramid network (Lin et al. 2017) over ResNet stages C2..C5.

    Each input map goes through a 1x1 lateral conv to ``channels``; from the coarsest level down, the running
    map is upsampled (nearest neighbour, to the finer level's exact size) and added to the next lateral; every
    merged map then goes through a 3x3 smoothing conv. Convolutions have biases, initialised as torchvision's
    FPN does (Kaiming-uniform with ``a=1``, zero bias).

    Args:
        in_channels: channels of the input maps, finest first (``ResNet.out_channels``).
        channels: channels of every output level.
    """

    def __init__(self, in_channels: tuple[int, ...], channels: int) -> None:
        super().__init__()
        if not in_channels or channels < 1:
            msg = f"need at least one input level and channels >= 1; got {in_channels}, {channels}"
            raise ValueError(msg)
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, kernel_size=1) for c in in_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(channels, channels, kernel_size=3, padding=1) for _ in in_channels)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Fuse ``features`` (finest first) into pyramid levels of the same sizes, finest first."""
        if len(features) != len(self.lateral):
            msg = f"expected {len(self.lateral)} feature maps, got {len(features)}"
            raise ValueError(msg)
        merged = self.lateral[-1](features[-1])
        outputs = [self.smooth[-1](merged)]
        for index in range(len(features) - 2, -1, -1):
            lateral = self.lateral[index](features[index])
            merged = lateral + F.interpolate(merged, size=lateral.shape[-2:], mode="nearest")
            outputs.append(self.smooth[index](merged))
        return outputs[::-1]


class SpatialEncoder(nn.Module):
    """E of AnomalyDiffusion: ``B x 1 x H x W`` masks to ``B x tokens x embedding_dim`` spatial tokens.

    ResNet C2..C5 -> FPN P2..P5 -> each level average-pooled to ``pool_size x pool_size`` -> mean over levels
    -> flatten -> LayerNorm -> ``tokens`` linear heads (see the module docstring for why each step).

    Args:
        settings: the architecture; with ``pretrained_path`` set, the backbone is loaded from that local file.
        embedding_dim: width of the text encoder's token embeddings (SD 1.x CLIP: 768; LDM's BERT: 1280).

    Raises:
        ValueError: for ``embedding_dim < 1``, or a checkpoint that does not fit this depth and width.
        FileNotFoundError: when ``pretrained_path`` is not a file.
    """

    def __init__(self, settings: SpatialEncoderSettings, embedding_dim: int) -> None:
        super().__init__()
        if embedding_dim < 1:
            msg = f"embedding_dim must be at least 1, got {embedding_dim}"
            raise ValueError(msg)
        self.settings = settings
        self.embedding_dim = embedding_dim
        self.backbone: ResNet = resnet(settings.depth, num_classes=None, width=settings.width)
        if settings.pretrained_path is not None:
            load_backbone_weights(self.backbone, settings.pretrained_path)
        self.fpn = FeaturePyramid(self.backbone.out_channels, settings.fpn_channels)
        self.pool = nn.AdaptiveAvgPool2d(settings.pool_size)
        fused = settings.fpn_channels * settings.pool_size**2
        self.norm = nn.LayerNorm(fused)
        self.heads = nn.ModuleList(nn.Linear(fused, embedding_dim) for _ in range(settings.tokens))
        for head in self.heads:
            # With unit-variance LayerNorm outputs, each token element starts with std init_scale.
            nn.init.normal_(head.weight, 0.0, settings.init_scale / fused**0.5)
            nn.init.zeros_(head.bias)
        mean, std = INPUT_NORMS[settings.input_norm]
        self.register_buffer("input_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, masks: Tensor) -> Tensor:
        """Encode masks into spatial tokens.

        Args:
            masks: ``B x 1 x H x W`` anomaly masks, values in [0, 1] (soft masks allowed); any dtype, cast to
                the encoder's.

        Returns:
            ``B x tokens x embedding_dim`` tokens ``e_s``, to concatenate after the anomaly tokens ``e_a``.

        Raises:
            ValueError: when ``masks`` is not ``B x 1 x H x W``.
        """
        if masks.ndim != 4 or masks.shape[1] != 1:
            msg = f"expected masks of shape B x 1 x H x W, got {tuple(masks.shape)}"
            raise ValueError(msg)
        x = masks.to(dtype=self.input_mean.dtype).expand(-1, 3, -1, -1)
        x = (x - self.input_mean) / self.input_std
        pyramid = self.fpn(self.backbone.features(x))
        fused = torch.stack([self.pool(level) for level in pyramid]).mean(dim=0).flatten(1)
        fused = self.norm(fused)
        return torch.stack([head(fused) for head in self.heads], dim=1)


def build_spatial_encoder(settings: SpatialEncoderSettings, embedding_dim: int) -> SpatialEncoder:
    """Build the spatial encoder, randomly initialised (seed torch beforehand) unless ``pretrained_path`` is set.

    Only the backbone is ever loaded from ``pretrained_path``; the FPN, LayerNorm and heads always start fresh.

    Args:
        settings: the architecture and optional local backbone checkpoint.
        embedding_dim: the text encoder's token width.

    Returns:
        The encoder, in training mode.
    """
    return SpatialEncoder(settings, embedding_dim)
