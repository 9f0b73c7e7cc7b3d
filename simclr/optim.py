"""Optimizers and the learning-rate schedule: Adam, SGD, LARS; linear warm-up then constant or cosine."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .flags import LR_SCALINGS, OPTIMIZERS, SCHEDULES  # noqa: F401 (re-exported)



class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as SimCLR uses it: SGD with momentum whose step for each weight
    tensor is scaled by trust = eta * ||w|| / ||g + wd * w||.

    Parameter groups with `lars_exclude=True` (biases, BatchNorm) get neither weight decay nor the
    trust ratio: a plain momentum step. As in the paper's TensorFlow code, the learning rate goes
    into the momentum buffer: v = m * v + lr * trust * (g + wd * w); w = w - v.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, lars_exclude: bool = False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=lars_exclude)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["lars_exclude"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    # trust ratio 1 where either norm is zero (fresh zero-init weights); no host sync
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["eta"] * w_norm / g_norm.clamp_min(1e-30), torch.ones_like(w_norm))
                    grad = grad * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(grad, alpha=group["lr"])
                p.sub_(buf)
        return loss


def split_decay_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, excluded): biases and normalisation parameters (all 1-d tensors) are excluded."""
    weights, excluded = [], []
    for param in model.parameters():
        if param.requires_grad:
            (excluded if param.ndim <= 1 else weights).append(param)
    return weights, excluded


def scaled_lr(lr: float, batch_size: int, scaling: str) -> float:
    """Base learning rate after batch-size scaling: none, linear (lr*B/256) or sqrt (lr*sqrt(B/256))."""
    if scaling == "linear":
        return lr * batch_size / 256
    if scaling == "sqrt":
        return lr * math.sqrt(batch_size / 256)
    return lr


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                    momentum: float = 0.9, nesterov: bool = False) -> torch.optim.Optimizer:
    """Adam (the original tool's, L2 weight decay on every parameter), SGD with momentum (Nesterov's if asked), or LARS."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov)
    if name == "lars":
        weights, excluded = split_decay_groups(model)
        return LARS([{"params": weights}, {"params": excluded, "lars_exclude": True, "weight_decay": 0.0}],
                    lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up to base_lr, then constant
    or cosine decay towards 0 over the remaining steps. Stepped per batch, not per epoch."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate (a host-side float: no device work)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass(frozen=True)
class Schedule:
    """The learning rate of every optimizer step of a run: warm-up, then constant or cosine (see lr_at)."""
    base_lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int = 0
    kind: str = "constant"          # one of SCHEDULES

    def lr(self, step: int) -> float:
        """Learning rate of the 0-based global step `step`."""
        return lr_at(step, base_lr=self.base_lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                     schedule=self.kind)
