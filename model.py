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
BN_STATS = ("per_view", "joint")


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
                 stem: str = "cifar", grad_checkpoint: bool = False, bn_stats: str = "joint"):
        super().__init__()
        if bn_stats not in BN_STATS:
            raise ValueError(f"unknown bn_stats {bn_stats!r}; choose one of {', '.join(BN_STATS)}")
        self.f, self.feature_width = resnet_encoder(arch, stem)
        self.g = nn.Sequential(
            nn.Linear(self.feature_width, proj_hidden_dim, bias=False),  # bias is redundant before BN
            nn.BatchNorm1d(proj_hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(proj_hidden_dim, feature_dim, bias=True),
        )
        self.grad_checkpoint = grad_checkpoint
        if bn_stats == "per_view":
            # forward(x) gets x = [view 1; view 2]: each view is normalised with its own batch statistics,
            # as when the views ran through the network one after the other
            per_view_batchnorm(self)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features h: (N, 3, S, S) -> (N, feature_width)."""
        f = self.f
        x = f.maxpool(f.relu(f.bn1(f.conv1(x))))
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for stage in (f.layer1, f.layer2, f.layer3, f.layer4):
            if not recompute:
                x = stage(x)
                continue
            for block in stage:
                # keep only each residual block's input; its inner activations are recomputed in backward
                x = checkpoint(_once_updating_bn(block), x, use_reentrant=False)
        return torch.flatten(f.avgpool(x), 1)  # (N, feature_width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, S, S) -> h (N, feature_width), z (N, feature_dim)."""
        h = self.encode(x)
        return h, self.g(h)


class PerViewStatistics:
    """BatchNorm mixin: in training, rows [0, N/2) and [N/2, N) of the input (two views) are normalised
    with their own batch statistics, by the base class's forward once per half.

    Running statistics are therefore updated exactly as by two forward passes, view 1 then view 2
    (momentum applied twice, `num_batches_tracked` counted twice, `momentum=None` averaging over
    both). In eval mode the running statistics normalise the whole input at once. Parameters and
    buffers are the base class's, so the `state_dict` is a plain BatchNorm's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        uses_batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        if not uses_batch_statistics:
            return super().forward(x)
        n = x.shape[0]
        if n % 2:
            raise ValueError(f"per-view BatchNorm needs an even number of rows (two views), got {n}")
        # slices along the batch dimension are views (no copies), contiguous or channels-last alike;
        # the one copy is the concatenation of the two outputs
        return torch.cat([super().forward(x[: n // 2]), super().forward(x[n // 2:])])


class PerViewBatchNorm(PerViewStatistics, nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d/2d with per-view batch statistics (see PerViewStatistics); input (N, C, ...)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {x.dim()}-d")


def swap_batchnorm(module: nn.Module, make) -> nn.Module:
    """Replace, in place, every BatchNorm below `module` by `make(old)` (None: keep it), which receives
    the very same Parameter and buffer objects: an optimizer built before still updates them, the
    `state_dict` keeps its keys and nothing is copied."""
    for name, child in module.named_children():
        if not isinstance(child, nn.modules.batchnorm._BatchNorm):
            swap_batchnorm(child, make)
            continue
        new = make(child)
        if new is None:
            continue
        for key, value in child._parameters.items():
            new._parameters[key] = value
        for key, value in child._buffers.items():
            new._buffers[key] = value
        new.train(child.training)
        setattr(module, name, new)
    return module


def per_view_batchnorm(module: nn.Module) -> nn.Module:
    """Make every BatchNorm below `module` normalise the two halves of its input (two views) separately."""
    def make(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module | None:
        if isinstance(bn, PerViewStatistics):
            return None
        return PerViewBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                                device="meta")
    return swap_batchnorm(module, make)


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

    Rows are L2-normalised, logits = z z^T / temperature in fp32 with the self-similarity masked
    out, and each anchor's target is its partner view; returns the cross-entropy averaged over
    the anchor rows (every row by default; a subset when each process owns part of the batch).
    """
    z = F.normalize(at_least_fp32(z), dim=1)
    n2 = z.shape[0]
    if n2 % 2:
        raise ValueError(f"nt_xent needs an even number of rows (two views per image), got {n2}")
    rows = torch.arange(n2, device=z.device) if anchors is None else anchors
    logits = z[rows] @ z.T / temperature  # (A, 2N)
    # a row's similarity with itself is always the largest; it is not a negative
    logits[torch.arange(rows.numel(), device=z.device), rows] = float("-inf")
    partner = (rows + n2 // 2) % n2
    return F.cross_entropy(logits, partner)
