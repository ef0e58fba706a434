"""The torchvision-compatible ResNet, its checkpoint loader, and the anomaly-type classifier."""

from __future__ import annotations

import time

import pytest
import torch
from pydantic import ValidationError

from defectsynth.core.resnet import ResNet, load_backbone_weights, resnet
from defectsynth.evaluation.classifier import (
    ClassifierConfig,
    DefectClassifier,
    augment_batch,
    build_classifier,
    classification_loss,
    configure_optimizer,
    predict_types,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- torchvision layout ---------------------------------------------------------------------------------------
# Written independently of the implementation, from torchvision/models/resnet.py (ResNet.__init__, _make_layer,
# BasicBlock, Bottleneck): the stem, then per stage a Sequential of blocks, a downsample (conv1x1, BN) on block 0
# when the stride or the width changes, then fc.

_TORCHVISION = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3))}
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _torchvision_shapes(depth: int, num_classes: int = 1000, width: int = 64) -> dict[str, tuple[int, ...]]:
    block, layers = _TORCHVISION[depth]
    expansion = 1 if block == "basic" else 4
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cout, cin, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k)

    def bn(name, c):
        for field in _BN:
            shapes[f"{name}.{field}"] = () if field == "num_batches_tracked" else (c,)

    conv("conv1", width, 3, 7)
    bn("bn1", width)
    inplanes = width
    for stage, blocks in enumerate(layers):
        planes = width * 2**stage
        stride = 1 if stage == 0 else 2
        for i in range(blocks):
            prefix = f"layer{stage + 1}.{i}"
            if block == "basic":
                conv(f"{prefix}.conv1", planes, inplanes, 3)
                bn(f"{prefix}.bn1", planes)
                conv(f"{prefix}.conv2", planes, planes, 3)
                bn(f"{prefix}.bn2", planes)
            else:
                conv(f"{prefix}.conv1", planes, inplanes, 1)
                bn(f"{prefix}.bn1", planes)
                conv(f"{prefix}.conv2", planes, planes, 3)
                bn(f"{prefix}.bn2", planes)
                conv(f"{prefix}.conv3", planes * 4, planes, 1)
                bn(f"{prefix}.bn3", planes * 4)
            if i == 0 and (stride != 1 or inplanes != planes * expansion):
                conv(f"{prefix}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{prefix}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    shapes["fc.weight"] = (num_classes, inplanes)
    shapes["fc.bias"] = (num_classes,)
    return shapes


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_state_dict_matches_torchvision(depth):
    model = resnet(depth)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = _torchvision_shapes(depth)
    assert list(ours) == list(expected)  # same names, same order
    assert ours == expected


def test_torchvision_counts_and_names():
    sd18, sd34, sd50 = (resnet(d).state_dict() for d in (18, 34, 50))
    assert (len(sd18), len(sd34), len(sd50)) == (122, 218, 320)
    # parameter counts torchvision reports for resnet18 / resnet34 / resnet50
    params = [sum(p.numel() for p in resnet(d).parameters()) for d in (18, 34, 50)]
    assert params == [11_689_512, 21_797_672, 25_557_032]
    assert tuple(sd18["layer4.1.bn2.running_var"].shape) == (512,)
    assert tuple(sd18["layer3.0.downsample.1.weight"].shape) == (256,)
    assert tuple(sd18["layer2.0.downsample.0.weight"].shape) == (128, 64, 1, 1)
    assert "layer1.0.downsample.0.weight" not in sd18
    assert tuple(sd50["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(sd50["layer4.2.conv3.weight"].shape) == (2048, 512, 1, 1)
    assert tuple(sd50["layer4.2.bn3.num_batches_tracked"].shape) == ()
    assert tuple(sd50["fc.weight"].shape) == (1000, 2048)
    assert "fc.weight" not in resnet(50, num_classes=None).state_dict()


def test_bottleneck_strides_in_the_3x3_conv():
    model = resnet(50, width=8)
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)  # v1.5, as torchvision
    assert block.downsample[0].stride == (2, 2)


def test_init_and_zero_init_residual():
    torch.manual_seed(0)
    model = resnet(18, width=8)
    assert torch.all(model.bn1.weight == 1) and torch.all(model.bn1.bias == 0)
    zeroed = resnet(50, width=8, zero_init_residual=True)
    assert torch.all(zeroed.layer1[0].bn3.weight == 0) and torch.all(zeroed.layer1[0].bn2.weight == 1)
    assert torch.all(resnet(18, width=8, zero_init_residual=True).layer3[1].bn2.weight == 0)


@pytest.mark.parametrize(("depth", "channels"), [(18, (8, 16, 32, 64)), (50, (32, 64, 128, 256))])
def test_features_shapes_and_strides(depth, channels):
    torch.manual_seed(0)
    model = resnet(depth, num_classes=None, width=8)
    assert model.out_channels == channels
    maps = model.features(torch.rand(2, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [
        (2, c, 64 // s, 96 // s) for c, s in zip(channels, (4, 8, 16, 32), strict=True)
    ]


def test_forward_logits_and_backbone_errors():
    torch.manual_seed(0)
    assert tuple(resnet(34, num_classes=7, width=4)(torch.rand(2, 3, 32, 32)).shape) == (2, 7)
    with pytest.raises(RuntimeError, match="num_classes=None"):
        resnet(18, num_classes=None, width=4)(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="101"):
        resnet(101)
    with pytest.raises(ValueError, match="four positive"):
        ResNet("basic", (2, 2, 2))
    with pytest.raises(ValueError, match="B x 3"):
        resnet(18, width=4).features(torch.rand(2, 1, 32, 32))


# --- checkpoint loading ---------------------------------------------------------------------------------------


def test_load_round_trip(tmp_path):
    torch.manual_seed(0)
    source = resnet(18, width=8)
    path = tmp_path / "resnet18-test.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    target = resnet(18, width=8)
    assert load_backbone_weights(target, path) == []
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key
    # a {"state_dict": ...} wrapper and a str path also load
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")
    assert load_backbone_weights(resnet(18, width=8), str(tmp_path / "wrapped.pth")) == []


def test_load_skips_a_foreign_head(tmp_path):
    torch.manual_seed(0)
    source = resnet(18, width=8)  # a 1000-way head, as torchvision's files
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    classifier = resnet(18, num_classes=3, width=8)
    fc_before = classifier.fc.weight.detach().clone()
    assert load_backbone_weights(classifier, path) == ["fc.weight", "fc.bias"]
    assert torch.equal(classifier.fc.weight, fc_before)
    assert torch.equal(classifier.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    backbone = resnet(18, num_classes=None, width=8)
    assert load_backbone_weights(backbone, path) == ["fc.weight", "fc.bias"]
    # a saved backbone (no fc.* at all) loads into a classifier, whose head keeps its initialisation
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    assert load_backbone_weights(resnet(18, num_classes=3, width=8), tmp_path / "backbone.pth") == []


def test_load_tolerates_missing_batch_counters(tmp_path):
    torch.manual_seed(0)
    source = resnet(18, width=4)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    target = resnet(18, width=4)
    assert load_backbone_weights(target, tmp_path / "old.pth") == []
    assert torch.equal(target.bn1.running_var, source.bn1.running_var)


def test_load_errors_name_the_file_and_keys(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_backbone_weights(resnet(18, width=4), tmp_path / "nowhere.pth")

    wide = tmp_path / "wide.pth"
    torch.save(resnet(18, width=8).state_dict(), wide)
    with pytest.raises(ValueError, match=r"wide\.pth.*shape mismatches.*conv1\.weight"):
        load_backbone_weights(resnet(18, width=4), wide)

    deeper = tmp_path / "resnet34.pth"
    torch.save(resnet(34, width=4).state_dict(), deeper)
    with pytest.raises(ValueError, match=r"resnet34\.pth.*unexpected keys: layer1\.2\.conv1\.weight"):
        load_backbone_weights(resnet(18, width=4), deeper)

    partial = tmp_path / "partial.pth"
    state = resnet(18, width=4).state_dict()
    del state["layer4.1.bn2.running_var"]
    torch.save(state, partial)
    with pytest.raises(ValueError, match=r"partial\.pth.*missing keys: layer4\.1\.bn2\.running_var"):
        load_backbone_weights(resnet(18, width=4), partial)

    not_a_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(ValueError, match=r"tensor\.pth"):
        load_backbone_weights(resnet(18, width=4), not_a_dict)


# --- the classifier -------------------------------------------------------------------------------------------

_TYPES = ["crack", "hole", "stain"]


def _patterns(per_class: int = 8, side: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy grey images with a class-specific mark: a red square, a black square, or green stripes."""
    g = torch.Generator().manual_seed(seed)
    images = 0.4 + 0.2 * torch.rand(3 * per_class, 3, side, side, generator=g)
    labels = torch.arange(3).repeat_interleave(per_class)
    for i, label in enumerate(labels.tolist()):
        y, x = torch.randint(0, side - 12, (2,), generator=g).tolist()
        if label == 0:
            images[i, :, y : y + 10, x : x + 10] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)
        elif label == 1:
            images[i, :, y : y + 10, x : x + 10] = 0.0
        else:
            images[i, 1, :, ::4] = 0.95
    return images, labels


def test_config_validation():
    cfg = ClassifierConfig()
    assert (cfg.depth, cfg.width, cfg.lr, cfg.weight_decay, cfg.pretrained_path, cfg.augment) == (
        18,
        64,
        1e-3,
        1e-4,
        None,
        True,
    )
    assert ClassifierConfig(depth=34).depth == 34
    for bad in ({"depth": 50}, {"width": 3}, {"lr": 0.0}, {"weight_decay": -1.0}, {"epochs": 3}):
        with pytest.raises(ValidationError):
            ClassifierConfig(**bad)
    with pytest.raises(ValidationError):
        cfg.width = 8  # frozen


def test_build_and_class_names():
    torch.manual_seed(0)
    model = build_classifier(_TYPES, ClassifierConfig(width=4))
    assert isinstance(model, DefectClassifier) and model.class_names == _TYPES and model.num_classes == 3
    assert model.training
    assert all(key.startswith("resnet.") for key in model.state_dict())  # no buffers of our own, no names
    assert len(build_classifier(_TYPES, ClassifierConfig(depth=34, width=4)).resnet.layer3) == 6
    with pytest.raises(ValueError, match="got 1"):
        build_classifier(["crack"], ClassifierConfig(width=4))
    with pytest.raises(ValueError, match="crack"):
        build_classifier(["crack", "crack"], ClassifierConfig(width=4))
    with pytest.raises(ValueError, match="B x 3"):
        model(torch.rand(2, 32, 32))


def test_build_with_pretrained_path(tmp_path):
    torch.manual_seed(0)
    source = resnet(18, width=8)
    path = tmp_path / "resnet18-local.pth"
    torch.save(source.state_dict(), path)
    model = build_classifier(_TYPES, ClassifierConfig(width=8, pretrained_path=str(path)))
    assert torch.equal(model.resnet.conv1.weight, source.conv1.weight)
    assert tuple(model.resnet.fc.weight.shape) == (3, 64)
    with pytest.raises(ValueError, match="resnet18-local.pth"):
        build_classifier(_TYPES, ClassifierConfig(width=4, pretrained_path=str(path)))
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        build_classifier(_TYPES, ClassifierConfig(width=8, pretrained_path=str(tmp_path / "absent.pth")))


def test_normalisation_is_imagenet():
    model = build_classifier(_TYPES, ClassifierConfig(width=4)).eval()
    images = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model.resnet((images - mean) / std))


def test_augment_is_deterministic_and_a_square_symmetry():
    images = torch.rand(16, 3, 8, 8)
    first = augment_batch(images, torch.Generator().manual_seed(0))
    assert first.shape == images.shape
    assert torch.equal(first, augment_batch(images, torch.Generator().manual_seed(0)))
    assert not torch.equal(first, augment_batch(images, torch.Generator().manual_seed(1)))
    symmetries = []
    for k in range(4):
        symmetries += [torch.rot90(images, k, dims=(-2, -1)), torch.rot90(images.flip(-1), k, dims=(-2, -1))]
    for i in range(16):
        assert any(torch.equal(first[i], s[i]) for s in symmetries)  # one of the 8, and per sample
    assert len({tuple(first[i].flatten()[:4].tolist()) for i in range(16)}) > 1
    rect = torch.rand(8, 3, 8, 12)
    assert augment_batch(rect, torch.Generator().manual_seed(0)).shape == rect.shape


def test_classification_loss():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    labels = torch.tensor([0, 2])
    torch.testing.assert_close(classification_loss(logits, labels), torch.nn.functional.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match="labels"):
        classification_loss(logits, torch.tensor([0]))


def test_tiny_classifier_overfits_three_types():
    torch.manual_seed(0)
    images, labels = _patterns()
    cfg = ClassifierConfig(width=8, lr=3e-3)
    model = build_classifier(_TYPES, cfg)
    optimizer = configure_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["weight_decay"] == 1e-4
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model.train()
    for _ in range(40):
        batch = augment_batch(images, generator) if cfg.augment else images
        loss = classification_loss(model(batch), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    predicted = predict_types(model, images, batch_size=10)
    elapsed = time.perf_counter() - start
    accuracy = sum(p == _TYPES[label] for p, label in zip(predicted, labels.tolist(), strict=True)) / len(predicted)
    assert accuracy >= 0.9, (accuracy, loss.item())
    assert elapsed < 10.0


def test_predict_types_restores_mode():
    torch.manual_seed(0)
    model = build_classifier(_TYPES, ClassifierConfig(width=4))
    images = torch.rand(5, 3, 32, 32)
    model.train()
    names = predict_types(model, images, batch_size=2)
    assert len(names) == 5 and set(names) <= set(_TYPES) and model.training
    model.eval()
    assert predict_types(model, images, batch_size=3) == names and not model.training
    assert predict_types(model, images[:0]) == []
    with pytest.raises(ValueError, match="batch_size"):
        predict_types(model, images, batch_size=0)
