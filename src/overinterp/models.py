"""The project's networks (CIFAR ResNet20, ResNet18, VGG16-BN, a tiny test net, and the ImageNet architectures
by name), ensembles, input dropout, and the model files of the pipeline."""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .utils import DataError, load_torch, save_torch

log = logging.getLogger(__name__)


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; ``shortcut='A'`` is the parameter-free zero-padded identity of He et al."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = 0
        self.project = None
        if stride != 1 or cin != cout:
            if shortcut == "A":
                self.pad = (cout - cin) // 2
            else:
                self.project = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.stride = stride

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.project is not None:
            x = self.project(x)
        elif self.stride != 1 or self.pad:
            x = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + x)


class ResNet(nn.Module):
    def __init__(self, widths: list[int], depths: list[int], shortcut: str, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, widths[0])
        blocks, cin = [], widths[0]
        for stage, (width, depth) in enumerate(zip(widths, depths)):
            for i in range(depth):
                blocks.append(BasicBlock(cin, width, 2 if (i == 0 and stage > 0) else 1, shortcut))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, layout: list, num_classes: int = 10):
        super().__init__()
        layers, cin = [], 3
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_bn(cin, item))
                cin = item
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)  # single linear classifier, as in the reference

    def forward(self, x):
        # 1x1 after the last pooling at 32x32 (the pool is then the identity); larger images are averaged
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class TinyNet(nn.Module):
    """A few thousand parameters: small enough for exact BackSelect in tests and smoke runs."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8, 2), conv_bn(8, 16, 2), conv_bn(16, 16, 2))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def imagenet_architecture(arch: str, num_classes: int = 1000) -> nn.Module:
    """An ImageNet network with fresh weights. Inception v3 has no auxiliary classifier (subset training uses
    the main loss only) and keeps torchvision's input transform, which maps ImageNet-normalised inputs to the
    scaling its pretrained weights expect, so pretrained and retrained models take the same inputs."""
    import torchvision.models as tvm

    from .efficientnet_lite import EfficientNetLite0

    if arch == "inception_v3":
        return tvm.inception_v3(weights=None, num_classes=num_classes, aux_logits=False, transform_input=True,
                                init_weights=True)
    if arch == "resnet50":
        return tvm.resnet50(weights=None, num_classes=num_classes)
    if arch == "efficientnet_lite0":
        return EfficientNetLite0(num_classes)
    raise ValueError(f"unknown ImageNet architecture {arch!r}; choose one of {sorted(IMAGENET_ARCHITECTURES)}")


# The CIFAR networks take 32x32 CIFAR-normalised images; the prefix keeps them apart from torchvision's
# ImageNet networks of the same family (torchvision:resnet18 is another network).
# They take any image size (32x32 and up; VGG needs at least 32x32) and any number of classes.
CIFAR_ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "cifar_resnet20": lambda classes=10: ResNet([16, 32, 64], [3, 3, 3], shortcut="A", num_classes=classes),
    "cifar_resnet18": lambda classes=10: ResNet([64, 128, 256, 512], [2, 2, 2, 2], shortcut="B", num_classes=classes),
    "cifar_vgg16_bn": lambda classes=10: VGG(VGG16_LAYOUT, num_classes=classes),
    "tiny": TinyNet,
}
IMAGENET_ARCHITECTURES = ("inception_v3", "resnet50", "efficientnet_lite0")
ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    **CIFAR_ARCHITECTURES,
    **{arch: (lambda classes=1000, a=arch: imagenet_architecture(a, classes)) for arch in IMAGENET_ARCHITECTURES},
}
# Names of earlier versions, still accepted (model files made with them keep loading).
DEPRECATED_NAMES = {"resnet20": "cifar_resnet20", "resnet18": "cifar_resnet18", "vgg16_bn": "cifar_vgg16_bn"}


def canonical_arch(arch: str) -> str:
    """``arch`` under its current name; an old name is accepted with a deprecation message."""
    if arch in DEPRECATED_NAMES:
        new = DEPRECATED_NAMES[arch]
        log.warning("architecture name %r is deprecated: it means the CIFAR network %r (the prefix tells it "
                    "from torchvision's ImageNet networks); write %r", arch, new, new)
        return new
    return arch


class InputDropout(nn.Module):
    """Replace each pixel (all channels) by ``baseline`` with probability ``p`` while training.

    In eval mode it is the identity, so predictions and SIS stay deterministic (the reference code also
    dropped at test time, which made both random).
    """

    def __init__(self, p: float, baseline: float = 0.0):
        super().__init__()
        self.p, self.baseline = p, baseline

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        drop = torch.rand(x.shape[0], 1, *x.shape[2:], device=x.device) < self.p
        return torch.where(drop, torch.full_like(x, self.baseline), x)


# torchvision networks with an auxiliary classifier: built without it (subset training uses the main loss
# only; pretrained weights are stored without it) and, for Inception v3, with torchvision's input transform,
# which maps ImageNet-normalised inputs to the scaling its pretrained weights expect.
AUXILIARY_HEADS = {"inception_v3": "AuxLogits.", "googlenet": ("aux1.", "aux2.")}


def torchvision_network(name: str, num_classes: int | None = None) -> nn.Module:
    """torchvision's ``name`` with fresh weights (see ``AUXILIARY_HEADS``)."""
    import torchvision.models as tvm

    if name not in tvm.list_models():
        raise ValueError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
    options = {"num_classes": num_classes} if num_classes else {}
    if name in AUXILIARY_HEADS:
        options.update(aux_logits=False, transform_input=True, init_weights=True)
    return tvm.get_model(name, weights=None, **options)


def build_model(arch: str, input_dropout: float = 0.0, baseline: float = 0.0, num_classes: int | None = None) -> nn.Module:
    """A fresh ``arch`` with ``num_classes`` outputs (default: 10 for the CIFAR networks, 1,000 for ImageNet's);
    ``torchvision:NAME`` is torchvision's network of that name."""
    arch = canonical_arch(arch)
    if arch.startswith("torchvision:"):
        net = torchvision_network(arch.removeprefix("torchvision:"), num_classes)
    elif arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)} or torchvision:NAME")
    else:
        net = ARCHITECTURES[arch]() if num_classes is None else ARCHITECTURES[arch](num_classes)
    if input_dropout > 0:
        net = nn.Sequential(InputDropout(input_dropout, baseline), net)
    return net


class Ensemble(nn.Module):
    """Mean of the members' logits (softmax is taken after averaging)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        return torch.stack([m(x) for m in self.members]).mean(0)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("ensemble", help="combine trained models into one ensemble model file")
    p.add_argument("--out", required=True, help="ensemble model file (.pt)")
    p.add_argument("members", nargs="+", help="member model files (.pt)")
    p.set_defaults(handler=lambda a: save_ensemble(a.out, a.members))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(path, model: nn.Module, arch: str, **meta) -> None:
    """``meta`` should record the input convention (``normalize``: mean/std; ``resize``/``crop``) so that later
    stages and audits need not be told again."""
    save_torch(path, {"arch": canonical_arch(arch), "state_dict": model.state_dict(), "meta": meta})


def save_ensemble(path, member_paths) -> None:
    """An ensemble file holds its members' model files, so it loads and runs like any single model."""
    members = [load_torch(p) for p in member_paths]
    save_torch(path, {"arch": "ensemble", "members": members, "meta": {"members": [str(p) for p in member_paths]}})


def _from_blob(blob: dict) -> nn.Module:
    if blob["arch"] == "ensemble":
        return Ensemble([_from_blob(member) for member in blob["members"]])
    meta = blob.get("meta", {})
    model = build_model(blob["arch"], meta.get("input_dropout", 0.0), meta.get("baseline", 0.0), meta.get("num_classes"))
    model.load_state_dict(blob["state_dict"])
    return model


def load_model(path, device: torch.device | str = "cpu") -> nn.Module:
    """Load a model or ensemble file, in eval mode, channels_last, on ``device``."""
    blob = load_torch(path, map_location=device)
    if not isinstance(blob, dict) or "arch" not in blob:
        raise DataError(f"{path} is not a model file of this pipeline (no 'arch' entry); make it with "
                        "`overinterp train` or `overinterp ensemble`")
    try:
        return _from_blob(blob).to(device, memory_format=torch.channels_last).eval()
    except (KeyError, RuntimeError) as err:
        raise DataError(f"{path}: its weights do not fit its architecture {blob.get('arch')!r} "
                        f"({str(err).splitlines()[0]}); delete it and rerun the rule that makes it") from None
