"""SimCLR model: a ResNet encoder f with a CIFAR stem, a projection head g, and the NT-Xent loss.

The saved `state_dict` has the encoder under `f.*` (torchvision ResNet names, no `fc`) and the
head under `g.*`; `SimCLR(...).load_state_dict(torch.load(path, weights_only=True))` restores it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

ARCHS = ("resnet18", "resnet34", "resnet50")
STEMS = ("cifar", "imagenet")


def resnet_encoder(arch: str, stem: str = "cifar") -> tuple[torchvision.models.ResNet, int]:
    """A randomly initialised torchvision ResNet without its classifier; returns (encoder, feature width)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    if stem == "cifar":
        # 32x32 inputs: a 7x7 stride-2 conv plus max-pool would throw away 15/16 of the pixels
        # before the first block, which costs several points of accuracy on CIFAR.
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    width = net.fc.in_features
    del net.fc  # no classifier: keeps `f.fc.*` out of the saved weights
    return net, width


class SimCLR(nn.Module):
    """Encoder f and projection head g; forward(x) returns (h, z)."""

    def __init__(self, arch: str = "resnet50", feature_dim: int = 128, proj_hidden_dim: int = 512,
                 stem: str = "cifar", grad_checkpoint: bool = False):
        super().__init__()
        self.f, self.feature_width = resnet_encoder(arch, stem)
        self.g = nn.Sequential(
            nn.Linear(self.feature_width, proj_hidden_dim, bias=False),  # bias is redundant before BN
            nn.BatchNorm1d(proj_hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(proj_hidden_dim, feature_dim, bias=True),
        )
        self.grad_checkpoint = grad_checkpoint

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features h: (N, 3, S, S) -> (N, feature_width)."""
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        return resnet_features(self.f, x, recompute)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, S, S) -> h (N, feature_width), z (N, feature_dim)."""
        h = self.encode(x)
        return h, self.g(h)


def resnet_features(f: torchvision.models.ResNet, x: torch.Tensor, recompute: bool = False) -> torch.Tensor:
    """Features of a ResNet without its classifier: (N, 3, S, S) -> (N, width); recompute: gradient checkpointing."""
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


FROM_LAYERS = ("encoder", "head1")


class Classifier(nn.Module):
    """A SimCLR encoder f, optionally the head's first layer (Linear + BatchNorm1d + ReLU of g, from which
    SimCLRv2 fine-tunes), and a new Linear classifier; forward(x) returns logits (N, num_classes).

    The state_dict holds `f.*`, `head.*` (g.0 and g.1 as head.0 and head.1; empty for from_layer
    'encoder') and `fc.*`.
    """

    def __init__(self, simclr: SimCLR, from_layer: str, num_classes: int):
        super().__init__()
        if from_layer not in FROM_LAYERS:
            raise ValueError(f"unknown from_layer {from_layer!r}; choose one of {', '.join(FROM_LAYERS)}")
        self.f = simclr.f
        # the same module objects as in `simclr`: their loaded weights are the starting point
        self.head = nn.Sequential(*simclr.g[:3]) if from_layer == "head1" else nn.Sequential()
        width = simclr.g[0].out_features if from_layer == "head1" else simclr.feature_width
        self.fc = nn.Linear(width, num_classes)
        # a zero classifier starts every run from the same function of the features, whatever the seed
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> logits (N, num_classes)."""
        return self.fc(self.head(resnet_features(self.f, x)))


def _once_updating_bn(block: nn.Module):
    """`block` for checkpoint(): the backward-time recomputation must not update BatchNorm's
    running statistics a second time (it still normalises with the same batch statistics)."""
    calls = 0

    def run(x: torch.Tensor) -> torch.Tensor:
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


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged (the loss is never computed in half precision)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def nt_xent(z: torch.Tensor, temperature: float, anchors: torch.Tensor | None = None) -> torch.Tensor:
    """NT-Xent (SimCLR Eq. 1) for z: (2N, d) where rows i and i+N are two views of one image.

    Rows are L2-normalised, logits = z z^T / temperature in fp32 (also inside an autocast region)
    with the self-similarity masked out, and each anchor's target is its partner view; returns the
    cross-entropy averaged over the anchor rows (every row by default; a subset when each process
    owns part of the batch).
    """
    n2 = z.shape[0]
    if n2 % 2:
        raise ValueError(f"nt_xent needs an even number of rows (two views per image), got {n2}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = F.normalize(at_least_fp32(z), dim=1)
        rows = torch.arange(n2, device=z.device) if anchors is None else anchors
        logits = z[rows] @ z.T / temperature                                        # (A, 2N)
        # a row's similarity with itself is always the largest; it is not a negative. masked_fill
        # takes -inf as a scalar argument: no host-to-device copy, so no sync in the step
        itself = rows[:, None] == torch.arange(n2, device=z.device)[None, :]       # (A, 2N)
        logits = logits.masked_fill(itself, float("-inf"))
        partner = (rows + n2 // 2) % n2
        return F.cross_entropy(logits, partner)


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The reference NT-Xent, written the seed's way: exp of all similarities, then -log(positive / sum).

    z1, z2: (N, d) projections of view 1 and view 2 of the same N images -> scalar loss averaged
    over the 2N anchors. It overflows at small temperatures (which `nt_xent` does not); the tests
    and bench.py's naive step use it as the independent formulation to compare against.
    """
    out = F.normalize(torch.cat([z1, z2]), dim=1)                              # (2N, d)
    n2 = out.shape[0]
    sim = torch.exp(out @ out.T / temperature)                                 # (2N, 2N)
    off_diagonal = ~torch.eye(n2, dtype=torch.bool, device=out.device)
    denominator = sim.masked_select(off_diagonal).view(n2, n2 - 1).sum(dim=1)  # partner and negatives
    positive = torch.exp((F.normalize(z1, dim=1) * F.normalize(z2, dim=1)).sum(dim=1) / temperature)
    positive = torch.cat([positive, positive])                                 # (2N,)
    return (-torch.log(positive / denominator)).mean()
