"""The table of encoders: an architecture name -> how to build the encoder and how to run it.

A new backbone is one entry here: `--arch`, the SimCLR model, the classifier of finetune.py,
hubconf's entry points and bench.py's list all read this table. Importing this module does not
import torch (the flag table and `--help` read the names), so the constructors import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

STEMS = ("cifar", "imagenet")


@dataclass(frozen=True)
class EncoderSpec:
    """One architecture: build(stem) -> (encoder without classifier, feature width), and its forward."""
    name: str
    summary: str
    build: Callable[[str], tuple[Any, int]]
    features: Callable[..., Any]     # (encoder, x (N, 3, S, S), recompute: bool) -> h (N, width)
    width: int                       # the width build returns, known without torch (a head as wide as h)


ENCODERS: dict[str, EncoderSpec] = {}


def encoder_spec(arch: str) -> EncoderSpec:
    """The table's entry for `arch`; ValueError naming the choices when there is none."""
    if arch not in ENCODERS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[arch]


def build_encoder(arch: str, stem: str = "cifar"):
    """A randomly initialised encoder of `arch` with the given stem; returns (encoder, feature width)."""
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    return encoder_spec(arch).build(stem)


# ----------------------------------------------------------------------------- torchvision ResNets

def resnet_encoder(arch: str, stem: str = "cifar"):
    """A randomly initialised torchvision ResNet without its classifier; returns (encoder, feature width)."""
    import torchvision
    from torch import nn
    net = getattr(torchvision.models, arch)(weights=None)
    if stem == "cifar":
        # 32x32 inputs: a 7x7 stride-2 conv plus max-pool would throw away 15/16 of the pixels
        # before the first block, which costs several points of accuracy on CIFAR.
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    width = net.fc.in_features
    del net.fc  # no classifier: keeps `f.fc.*` out of the saved weights
    return net, width


def resnet_features(f, x, recompute: bool = False):
    """Features of a ResNet without its classifier: (N, 3, S, S) -> (N, width); recompute: gradient checkpointing."""
    import torch
    from torch.utils.checkpoint import checkpoint
    x = f.maxpool(f.relu(f.bn1(f.conv1(x))))
    for stage in (f.layer1, f.layer2, f.layer3, f.layer4):
        if not recompute:
            x = stage(x)
            continue
        for block in stage:
            # keep only each residual block's input; its inner activations are recomputed in backward.
            # Compiled, the recomputation is part of the traced backward graph, where buffer updates
            # are applied once by construction; eager, the wrapper keeps them from happening twice.
            fn = block if torch.compiler.is_compiling() else _once_updating_bn(block)
            x = checkpoint(fn, x, use_reentrant=False)
    return torch.flatten(f.avgpool(x), 1)  # (N, width)


def _once_updating_bn(block):
    """`block` for checkpoint(): the backward-time recomputation must not update BatchNorm's
    running statistics a second time (it still normalises with the same batch statistics)."""
    from torch import nn
    calls = 0

    def run(x):
        nonlocal calls
        calls += 1
        if calls == 1:
            return block(x)
        norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
                 for m in norms]
        for m in norms:
            m.momentum = 0.0  # running = 1 * running + 0 * batch: unchanged
        try:
            return block(x)
        finally:
            for m, (momentum, tracked) in zip(norms, saved):
                m.momentum = momentum
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)

    return run


# ----------------------------------------------------------------------------- a tiny CNN for smoke tests

def tiny_encoder(stem: str = "cifar"):
    """Three 3x3 conv blocks (16, 32, 64 channels; BatchNorm, ReLU; the last two stride 2) and a global
    average pool: about 23 k parameters, 64-d features. A run of it takes seconds on a CPU, which is what
    a smoke test of a set-up (or this tool's own test suite) needs; it is not a model for results. The
    imagenet stem makes the first block stride 2 as well."""
    from torch import nn

    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=True))

    first = 2 if stem == "imagenet" else 1
    return nn.Sequential(block(3, 16, first), block(16, 32, 2), block(32, 64, 2), nn.AdaptiveAvgPool2d(1)), 64


def sequential_features(f, x, recompute: bool = False):
    """Features of a Sequential of blocks ending in a pool: (N, 3, S, S) -> (N, width); recompute:
    gradient checkpointing of each block (BatchNorm statistics updated once, as for the ResNets)."""
    import torch
    from torch.utils.checkpoint import checkpoint
    for block in f:
        if recompute and next(block.parameters(), None) is not None:  # the conv blocks, not the pool
            fn = block if torch.compiler.is_compiling() else _once_updating_bn(block)
            x = checkpoint(fn, x, use_reentrant=False)
        else:
            x = block(x)
    return torch.flatten(x, 1)


for _name, _width in (("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)):
    ENCODERS[_name] = EncoderSpec(_name, summary=f"ResNet-{_name[6:]}, {_width}-d features",
                                  build=lambda stem, arch=_name: resnet_encoder(arch,
                                                                                stem), features=resnet_features,
                                                                                width=_width)

ENCODERS["tiny"] = EncoderSpec("tiny",
                               summary="Tiny CNN, 64-d features: 3 conv layers for smoke tests, not for results",
                               build=tiny_encoder, features=sequential_features, width=64)

ARCHS = tuple(ENCODERS)
