"""SimCLR model: an encoder f from the encoder table (ResNets with a CIFAR stem), a projection head g.

The saved `state_dict` has the encoder under `f.*` (torchvision ResNet names, no `fc`) and the
head under `g.*`; `SimCLR(...).load_state_dict(torch.load(path, weights_only=True))` restores it.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .encoders import ARCHS, STEMS, build_encoder, encoder_spec, resnet_features  # noqa: F401 (re-exported)
from .flags import BN_STATS, FROM_LAYERS, HEADS
from .loss import at_least_fp32, nt_xent  # noqa: F401 (re-exported)


def projection_head(width: int, hidden: int, feature_dim: int, layers: int = 2, head: str = "original") -> nn.Sequential:
    """The head g: `layers` Linear layers, each hidden one followed by BatchNorm1d and ReLU.

    head original, layers=2 is the original tool's Linear(width, hidden, no bias) - BatchNorm1d - ReLU -
    Linear(hidden, feature_dim), keys g.0, g.1, g.3; each further layer adds Linear - BatchNorm1d - ReLU
    before the last Linear. head v2 ends as SimCLRv2's: Linear(hidden, feature_dim, no bias) - BatchNorm1d
    with a scale and no shift, no ReLU. Hidden layer K is g[:3K], where finetune.py's `--from_layer headK` sits.
    """
    if layers < 1:
        raise ValueError(f"the projection head needs at least one layer, got {layers}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    blocks, inputs = [], width
    for _ in range(layers - 1):
        # bias is redundant before BatchNorm
        blocks += [nn.Linear(inputs, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        inputs = hidden
    if head == "v2":
        return nn.Sequential(*blocks, nn.Linear(inputs, feature_dim, bias=False), unshifted_batchnorm(feature_dim))
    return nn.Sequential(*blocks, nn.Linear(inputs, feature_dim, bias=True))


def unshifted_batchnorm(features: int) -> nn.BatchNorm1d:
    """BatchNorm1d with a learned scale and no shift (TensorFlow's center=False): keys weight and the running
    statistics, no bias. SimCLRv2's last head layer (a shift there only moves every z the same way)."""
    bn = nn.BatchNorm1d(features)
    bn.register_parameter("bias", None)
    return bn


class SimCLR(nn.Module):
    """Encoder f and projection head g; forward(x) returns (h, z).

    bn_stats: joint (plain torchvision BatchNorm, the default here: what evaluation and your own
    code load) or per_view (training input x = [view 1; view 2], each view normalised with its own
    batch statistics; the same parameters, buffers and state_dict keys).
    """

    def __init__(self, arch: str = "resnet50", feature_dim: int = 128, proj_hidden_dim: int = 512,
                 stem: str = "cifar", grad_checkpoint: bool = False, bn_stats: str = "joint", proj_layers: int = 2,
                 head: str = "original"):
        super().__init__()
        if bn_stats not in BN_STATS:
            raise ValueError(f"unknown bn_stats {bn_stats!r}; choose one of {', '.join(BN_STATS)}")
        self.arch = arch
        self.f, self.feature_width = build_encoder(arch, stem)
        self.g = projection_head(self.feature_width, hidden=proj_hidden_dim, feature_dim=feature_dim,
                                 layers=proj_layers, head=head)
        self.grad_checkpoint = grad_checkpoint
        if bn_stats == "per_view":
            # forward(x) gets x = [view 1; view 2]: each view is normalised with its own batch statistics,
            # as when the views ran through the network one after the other
            per_view_batchnorm(self)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features h: (N, 3, S, S) -> (N, feature_width)."""
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        return encoder_spec(self.arch).features(self.f, x, recompute)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, S, S) -> h (N, feature_width), z (N, feature_dim)."""
        h = self.encode(x)
        return h, self.g(h)




class FeatureEncoder(nn.Module):
    """The encoder f of a SimCLR model on its own: forward(x) is SimCLR.encode, (N, 3, S, S) -> h (N, feature_width).

    Its state_dict holds `f.*`, the encoder keys of NAME_model.pth as they are.
    """

    def __init__(self, simclr: SimCLR):
        super().__init__()
        self.f, self.arch, self.feature_width = simclr.f, simclr.arch, simclr.feature_width
        self.train(simclr.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> h (N, feature_width)."""
        return encoder_spec(self.arch).features(self.f, x)


def head_depth(from_layer: str) -> int:
    """encoder -> 0, headK -> K: how many hidden layers of the head a classifier keeps."""
    return 0 if from_layer == "encoder" else int(from_layer[len("head"):])


def hidden_layers(simclr: "SimCLR") -> int:
    """Hidden layers of a SimCLR model's head (its Linear layers but the last)."""
    return sum(isinstance(m, nn.Linear) for m in simclr.g) - 1


class Classifier(nn.Module):
    """A SimCLR encoder f, optionally the first K hidden layers of its head g (`from_layer` headK: each
    Linear + BatchNorm1d + ReLU; SimCLRv2 fine-tunes from head1), and a new Linear classifier;
    forward(x) returns logits (N, num_classes).

    The state_dict holds `f.*`, `head.*` (g[:3K] under the same indices; empty for from_layer
    'encoder') and `fc.*`.
    """

    def __init__(self, simclr: SimCLR, from_layer: str, num_classes: int):
        super().__init__()
        layers = hidden_layers(simclr)
        if from_layer not in FROM_LAYERS or head_depth(from_layer) > layers:
            choices = ["encoder"] + [f"head{k}" for k in range(1, layers + 1)]
            raise ValueError(f"from_layer {from_layer!r} does not fit a head with {layers} hidden layer(s); "
                             f"choose one of {', '.join(choices)}")
        self.f, self.arch = simclr.f, simclr.arch
        depth = head_depth(from_layer)
        # the same module objects as in `simclr`: their loaded weights are the starting point
        self.head = nn.Sequential(*simclr.g[:3 * depth])
        width = simclr.g[3 * depth - 3].out_features if depth else simclr.feature_width
        self.fc = nn.Linear(width, num_classes)
        # a zero classifier starts every run from the same function of the features, whatever the seed
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> logits (N, num_classes)."""
        return self.fc(self.head(encoder_spec(self.arch).features(self.f, x)))


class PerViewStatistics:
    """BatchNorm mixin: in training, rows [0, N/2) and [N/2, N) of the input (two views) are normalised
    with their own batch statistics, by the base class's forward once per half.

    Running statistics are therefore updated exactly as by two forward passes, view 1 then view 2
    (momentum applied twice, `num_batches_tracked` counted twice, `momentum=None` averaging over
    both). In eval mode the running statistics normalise the whole input at once. Parameters and
    buffers are the base class's, so the `state_dict` is a plain BatchNorm's.
    """

    one_view = False  # True: every input is one view (the step runs a view a pass), so plain BatchNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _uses_batch_statistics(self) or self.one_view:
            return super().forward(x)
        _check_two_views(x)
        # chunks along the batch dimension are views, contiguous or channels-last alike. chunk(), not
        # two slices: the gradient of two slices is two zero-filled full-size tensors added together
        view1, view2 = x.chunk(2)
        return torch.cat([super().forward(view1), super().forward(view2)])


class PerViewBatchNorm(PerViewStatistics, nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d/2d with per-view batch statistics (see PerViewStatistics); input (N, C, ...).

    Eager training runs torch's BatchNorm kernels on each view's rows, writing into one output
    (_PerViewBatchNormFunction): the concatenation of the generic path costs a copy of every
    BatchNorm output, about 3% of a CPU ResNet-18 step (bench.py). Under torch.compile the generic
    path is used, and the compiler fuses the concatenation away.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {x.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not _uses_batch_statistics(self) or not self.affine or self.one_view
                or torch.compiler.is_compiling()):
            return super().forward(x)
        _check_two_views(x)
        factors = (self._next_average_factor(), self._next_average_factor())  # view 1's update, then view 2's
        tracked = self.track_running_stats
        return _PerViewBatchNormFunction.apply(x, self.weight, self.bias, self.running_mean if tracked else None,
                                               self.running_var if tracked else None, factors, self.eps)

    def _next_average_factor(self) -> float:
        """Count one batch and return its weight in the running statistics, as _BatchNorm.forward does."""
        if not self.track_running_stats:
            return 0.0
        self.num_batches_tracked.add_(1)
        return self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)


def _uses_batch_statistics(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """True where torch's BatchNorm normalises with the batch's statistics: training, or no running ones."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _check_two_views(x: torch.Tensor) -> None:
    if x.shape[0] % 2:
        raise ValueError(f"per-view BatchNorm needs an even number of rows (two views), got {x.shape[0]}")


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-d channels-last tensor, else the ordinary contiguous format."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _PerViewBatchNormFunction(torch.autograd.Function):
    """Training BatchNorm of x (2B, C, ...) with separate statistics for rows [0, B) and [B, 2B).

    Each view goes through aten's own batch-norm kernels (the ones F.batch_norm runs), writing into
    its rows of a single output and gradient, so the result and the running-statistic updates
    are those of two stock BatchNorm calls, without concatenating their outputs.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor | None,
                running_var: torch.Tensor | None, factors: tuple[float, float], eps: float) -> torch.Tensor:
        memory_format = _memory_format(x)
        x = x.contiguous(memory_format=memory_format)
        y = torch.empty_like(x)                                       # same layout as x
        # the kernels keep their statistics in fp32 for half-precision inputs (autocast)
        stat_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        mean = torch.empty(2, x.shape[1], dtype=stat_dtype, device=x.device)      # (2, C): per view
        invstd = torch.empty_like(mean)
        for v, (x_v, y_v) in enumerate(zip(x.chunk(2), y.chunk(2))):
            torch.ops.aten.native_batch_norm.out(x_v, weight, bias, running_mean, running_var, True, factors[v], eps,
                                                 out=y_v, save_mean=mean[v], save_invstd=invstd[v])
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.memory_format, ctx.eps, ctx.has_bias = memory_format, eps, bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_y = grad_y.contiguous(memory_format=ctx.memory_format)
        grad_x = torch.empty_like(x)
        grad_weight = torch.empty(2, x.shape[1], dtype=weight.dtype, device=weight.device)  # (2, C): per view
        grad_bias = torch.empty_like(grad_weight)
        for v, (grad_y_v, x_v, grad_x_v) in enumerate(zip(grad_y.chunk(2), x.chunk(2), grad_x.chunk(2))):
            torch.ops.aten.native_batch_norm_backward.out(
                grad_y_v, x_v, weight, None, None, mean[v], invstd[v], True, ctx.eps, [True, True, True],
                out0=grad_x_v, out1=grad_weight[v], out2=grad_bias[v])
        return grad_x, grad_weight.sum(0), grad_bias.sum(0) if ctx.has_bias else None, None, None, None, None


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
        return PerViewBatchNorm(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                                track_running_stats=bn.track_running_stats, device="meta")
    return swap_batchnorm(module, make)


def one_view_per_pass(module: nn.Module, on: bool = True) -> nn.Module:
    """Tell every per-view BatchNorm below `module` that its input is one view (on) or two (off). With a view a
    pass (train_step's passes=2) plain BatchNorm over each pass gives each view its own statistics, the running
    statistics updated with view 1 and then view 2: what per-view BatchNorm computes over both at once."""
    for child in module.modules():
        if isinstance(child, PerViewStatistics):
            child.one_view = on
    return module
