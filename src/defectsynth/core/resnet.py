"""ResNet-18/34/50 in plain torch, with torchvision's parameter names, so its checkpoints load unchanged.

The module tree mirrors ``torchvision.models.resnet`` exactly: ``conv1``, ``bn1``, ``layer1`` .. ``layer4``
(``nn.Sequential`` of blocks with ``conv1``/``bn1``/``conv2``/``bn2``, plus ``conv3``/``bn3`` in a
:class:`Bottleneck`, and ``downsample.0`` (1x1 conv) / ``downsample.1`` (BN) on the first block of a stage
that changes shape), then ``fc``. The stem is a 7x7/2 conv, BN, ReLU and a 3x3/2 max-pool; stages 2-4 halve
the resolution in their first block. As in torchvision (ResNet "v1.5"), a :class:`Bottleneck` strides in its
3x3 ``conv2``, not in its first 1x1. Convolutions are Kaiming-normal (``fan_out``, ReLU), BN scales 1 and
shifts 0, ``fc`` keeps PyTorch's default ``nn.Linear`` init; ``zero_init_residual`` zeroes the last BN scale
of each residual branch, as torchvision's flag of that name does.

Two additions over torchvision: ``width`` scales every channel count (torchvision: 64) so tests and demos can
run small models, and ``num_classes=None`` builds a backbone without ``fc`` whose :meth:`ResNet.features`
returns the C2..C5 maps (strides 4, 8, 16, 32) an FPN consumes, with :attr:`ResNet.out_channels` their widths.

Weights are only ever read from a local file (:func:`load_backbone_weights`); nothing here downloads.

Example:
    >>> import torch
    >>> model = resnet(18, num_classes=None, width=8)
    >>> [tuple(f.shape[1:]) for f in model.features(torch.rand(2, 3, 64, 64))]
    [(8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)]
    >>> model.out_channels
    (8, 16, 32, 64)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

# depth -> (block, blocks per stage), torchvision's resnet18 / resnet34 / resnet50
DEPTHS: dict[int, tuple[Literal["basic", "bottleneck"], tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
STAGE_STRIDES = (4, 8, 16, 32)  # output stride of layer1..layer4 (C2..C5)
_HEAD_PREFIX = "fc."
_MAX_NAMED_KEYS = 5  # how many offending keys an error message lists


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and an identity (or ``downsample``) shortcut; ResNet-18/34's block.

    Args:
        in_channels: channels coming in.
        planes: channels of both convolutions and of the output (``expansion`` is 1).
        stride: stride of the first convolution (2 in the first block of stages 2-4).
        downsample: the shortcut projection when the shape changes, else None.
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, "v1.5"), 1x1 expand by 4, and a shortcut; ResNet-50's block.

    Args:
        in_channels: channels coming in.
        planes: channels of the 1x1 and 3x3 convolutions; the output has ``4 * planes``.
        stride: stride of the 3x3 convolution (2 in the first block of stages 2-4).
        downsample: the shortcut projection when the shape changes, else None.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block: ``relu(bn3(conv3(...(x))) + shortcut(x))``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """A torchvision-compatible ResNet: classifier (``fc``) or backbone (``num_classes=None``).

    Args:
        block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50).
        layers: blocks per stage, four positive numbers (ResNet-50: ``(3, 4, 6, 3)``).
        num_classes: outputs of ``fc``; None builds no ``fc`` (a feature backbone).
        width: channels of the stem and of stage 1's convolutions; stage ``i`` uses ``width * 2**i``
            (torchvision: 64; a checkpoint only loads into a model of the width it was trained at).
        zero_init_residual: zero the last BN scale of every block, so each starts as the identity
            (torchvision's flag; off by default, as there).

    Example:
        >>> import torch
        >>> model = ResNet("basic", (1, 1, 1, 1), num_classes=5, width=4)
        >>> tuple(model(torch.rand(2, 3, 32, 32)).shape)
        (2, 5)
    """

    def __init__(
        self,
        block: Literal["basic", "bottleneck"],
        layers: Sequence[int],
        *,
        num_classes: int | None = 1000,
        width: int = 64,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if block not in _BLOCKS:
            msg = f"block must be one of {sorted(_BLOCKS)}, got {block!r}"
            raise ValueError(msg)
        layers = tuple(layers)
        if len(layers) != len(STAGE_STRIDES) or any(n < 1 for n in layers):
            msg = f"layers must be four positive block counts, got {layers}"
            raise ValueError(msg)
        if width < 1 or (num_classes is not None and num_classes < 1):
            msg = f"need width >= 1 and num_classes >= 1 (or None); got width={width}, num_classes={num_classes}"
            raise ValueError(msg)
        block_cls = _BLOCKS[block]
        self.hparams = {"block": block, "layers": layers, "num_classes": num_classes, "width": width}
        self._in_channels = width  # running input width while stages are built, as torchvision's ``inplanes``
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block_cls, width, layers[0])
        self.layer2 = self._make_layer(block_cls, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block_cls, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block_cls, width * 8, layers[3], stride=2)
        channels = width * block_cls.expansion
        self._out_channels = (channels, channels * 2, channels * 4, channels * 8)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self._out_channels[-1], num_classes) if num_classes is not None else None
        self._init_weights(zero_init_residual=zero_init_residual)

    def _make_layer(
        self, block_cls: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        out_channels = planes * block_cls.expansion
        downsample = None
        if stride != 1 or self._in_channels != out_channels:
            downsample = nn.Sequential(_conv1x1(self._in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
        stage = [block_cls(self._in_channels, planes, stride, downsample)]
        self._in_channels = out_channels
        stage.extend(block_cls(out_channels, planes) for _ in range(1, blocks))
        return nn.Sequential(*stage)

    def _init_weights(self, *, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)
                elif isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    @property
    def out_channels(self) -> tuple[int, int, int, int]:
        """Channels of the four stage outputs C2..C5 (ResNet-18/34: 64..512, ResNet-50: 256..2048)."""
        return self._out_channels

    @property
    def num_features(self) -> int:
        """Width of the pooled feature vector that ``fc`` reads (the last of :attr:`out_channels`)."""
        return self._out_channels[-1]

    def features(self, x: Tensor) -> list[Tensor]:
        """The outputs of ``layer1`` .. ``layer4`` (C2..C5), at strides 4, 8, 16 and 32.

        Args:
            x: ``B x 3 x H x W`` images, normalised as the weights expect (ImageNet mean/std for torchvision's).

        Returns:
            Four maps ``B x out_channels[i] x ceil(H / stride_i) x ceil(W / stride_i)``.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            msg = f"expected images of shape B x 3 x H x W, got {tuple(x.shape)}"
            raise ValueError(msg)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps: list[Tensor] = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, x: Tensor) -> Tensor:
        """Classify a batch.

        Args:
            x: ``B x 3 x H x W`` images (H, W of 32 and up keep C5 at least 1 x 1).

        Returns:
            ``B x num_classes`` logits.

        Raises:
            RuntimeError: when the model was built as a backbone (``num_classes=None``).
        """
        if self.fc is None:
            msg = "this ResNet was built without a classifier (num_classes=None); call features() instead"
            raise RuntimeError(msg)
        pooled = torch.flatten(self.avgpool(self.features(x)[-1]), 1)
        return self.fc(pooled)


def resnet(depth: int, *, num_classes: int | None = 1000, width: int = 64, zero_init_residual: bool = False) -> ResNet:
    """Build torchvision's ResNet-18, -34 or -50 layout, randomly initialised (seed torch beforehand).

    Args:
        depth: 18, 34 or 50.
        num_classes: outputs of ``fc``; None for a backbone without it.
        width: channel scale (torchvision: 64).
        zero_init_residual: zero the last BN scale of every residual branch (torchvision's flag).

    Returns:
        The model, in training mode.

    Raises:
        ValueError: for any other depth.

    Example:
        >>> sum(p.numel() for p in resnet(18).parameters())  # torchvision's resnet18
        11689512
    """
    if depth not in DEPTHS:
        msg = f"unsupported ResNet depth {depth!r}; choose one of {sorted(DEPTHS)}"
        raise ValueError(msg)
    block, layers = DEPTHS[depth]
    return ResNet(block, layers, num_classes=num_classes, width=width, zero_init_residual=zero_init_residual)


def _read_state_dict(path: Path) -> Mapping[str, Tensor]:
    if not path.is_file():
        msg = f"no ResNet checkpoint at {path}"
        raise FileNotFoundError(msg)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(k, str) for k in loaded):
        msg = f"{path} does not hold a state dict (a mapping of parameter names to tensors)"
        raise ValueError(msg)
    return loaded


def _name_some(keys: Sequence[str]) -> str:
    named = ", ".join(keys[:_MAX_NAMED_KEYS])
    more = len(keys) - _MAX_NAMED_KEYS
    return f"{named} (+{more} more)" if more > 0 else named


def load_backbone_weights(model: ResNet, path: str | Path) -> list[str]:
    """Load a local torchvision-format ResNet state dict into ``model``, strictly except for the head.

    The file is what ``torch.save(resnet.state_dict(), path)`` writes (torchvision's released
    ``resnet18-f37072fd.pth`` and the like), or a dict holding one under ``"state_dict"``; it is read with
    ``weights_only=True`` on the CPU. Every key of the model must be in the file with the same shape, and the
    file may hold no other keys, with two exceptions:

    - ``fc.*`` entries are skipped (and returned) when the model has no ``fc`` or their shape differs, e.g.
      ImageNet's 1000-way head loaded into a 5-class classifier; ``fc`` then keeps its fresh initialisation.
      A file without ``fc.*`` entries (a saved backbone) also loads; the model's ``fc`` is left as it is.
    - BN ``num_batches_tracked`` counters absent from the file (older torchvision files) keep the model's.

    Args:
        model: the ResNet to fill in place (same depth and width as the checkpoint).
        path: the local ``.pth`` file.

    Returns:
        The file's keys that were skipped (only ever ``fc.*`` keys).

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        ValueError: on missing or unexpected keys or shape mismatches outside ``fc``, naming the file and the
            first offending keys.
    """
    path = Path(path)
    source = _read_state_dict(path)
    target = model.state_dict()
    skipped = [
        key
        for key in source
        if key.startswith(_HEAD_PREFIX) and (key not in target or tuple(target[key].shape) != _shape(source[key]))
    ]
    kept = {key: value for key, value in source.items() if key not in skipped}
    unexpected = [key for key in kept if key not in target]
    missing = [
        key
        for key in target
        if key not in kept and not key.startswith(_HEAD_PREFIX) and not key.endswith("num_batches_tracked")
    ]
    mismatched = [
        f"{key} {_shape(kept[key])} vs {tuple(target[key].shape)}"
        for key in kept
        if key in target and _shape(kept[key]) != tuple(target[key].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_name_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_name_some(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches (file vs model): {_name_some(mismatched)}")
    if problems:
        width = model.hparams["width"]
        msg = f"{path} does not fit this ResNet (width {width}): " + "; ".join(problems)
        raise ValueError(msg)
    merged = dict(target)
    merged.update(kept)
    model.load_state_dict(merged, strict=True)
    return skipped


def _shape(value: object) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, Tensor) else None
