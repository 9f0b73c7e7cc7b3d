"""Several processes (torchrun): process group set-up, global BatchNorm, the gathered batch and features.

Everything here is a no-op in a single process, so the training code has one path.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from .loss import at_least_fp32
from .model import PerViewStatistics, swap_batchnorm


@dataclass(frozen=True)
class World:
    """This process's place: rank among world_size processes, local_rank on its machine."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(device_name: str) -> World:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not device_name.startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return World(rank, world_size, local_rank)


def close_world(world: World) -> None:
    """Leave the process group (if any)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are taken over the batches of all processes.

    Used on CPUs, where torch's SyncBatchNorm does not run. Sums and sums of squares are
    all-reduced with a differentiable collective, so gradients flow across processes exactly as
    through one BatchNorm over the global batch. Same parameters and buffers as BatchNorm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {x.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = at_least_fp32(x)
        count = torch.full((1,), x.numel() / x.shape[1], device=x.device, dtype=xf.dtype)  # no host copy
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])        # (2C+1,)
        stats = dist_nn.all_reduce(stats)
        channels = x.shape[1]
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0)   # biased, for normalising
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:  # none: a BatchNorm without a shift (SimCLRv2's last head layer)
            y = y + self.bias.view(shape)
        return y.to(x.dtype)


class PerViewGlobalBatchNorm(PerViewStatistics, GlobalBatchNorm):
    """GlobalBatchNorm per view: each process's input is [view 1 (b); view 2 (b)], and each view is
    normalised with that view's statistics over every process (one all-reduce per view)."""


class PerViewSyncBatchNorm(PerViewStatistics, nn.SyncBatchNorm):
    """torch's SyncBatchNorm per view (GPUs): as PerViewGlobalBatchNorm, with torch's fused kernels."""


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm compute global-batch statistics: SyncBatchNorm on GPUs, GlobalBatchNorm on
    CPUs, each in its per-view form where the BatchNorm was per view (model.PerViewStatistics)."""
    def make(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module | None:
        if isinstance(bn, (GlobalBatchNorm, nn.SyncBatchNorm)):
            return None  # already global
        per_view = isinstance(bn, PerViewStatistics)
        if device.type == "cuda":
            kind = PerViewSyncBatchNorm if per_view else nn.SyncBatchNorm
        else:
            kind = PerViewGlobalBatchNorm if per_view else GlobalBatchNorm
        return kind(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
    return swap_batchnorm(module, make)


def gather_views(z: torch.Tensor, labels: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """This process's projections z (2b, d) = [view 1; view 2] of b images with labels (b,) -> the whole
    batch a loss takes: (z (2bW, d), labels (bW,), anchors (2b,)).

    The projections of every process are gathered with a gradient-carrying all-gather and laid out as
    [view 1 of all; view 2 of all] (the single-process layout), the labels (no gradient) in the same
    order; anchors are the rows of this process's own views, over which its loss averages. DDP's
    gradient averaging over processes then gives exactly the gradient of the single-process loss over
    the global batch. In a single process: (z, labels, None).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, labels, None
    world, rank = dist.get_world_size(), dist.get_rank()
    b = z.shape[0] // 2
    parts = dist_nn.all_gather(z.contiguous())                                 # world x (2b, d)
    z_all = torch.cat([p[:b] for p in parts] + [p[b:] for p in parts])        # (2bW, d)
    labels_all = None
    if labels is not None:
        label_parts = [torch.empty_like(labels) for _ in range(world)]
        dist.all_gather(label_parts, labels.contiguous())                     # labels carry no gradient
        labels_all = torch.cat(label_parts)                                   # (bW,)
    mine = torch.arange(rank * b, (rank + 1) * b, device=z.device)
    return z_all, labels_all, torch.cat([mine, mine + b * world])


def _share(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """(start, size) of rank's share of n items: sizes differ by at most one, none empty when n >= world."""
    base, extra = divmod(n, world_size)
    return rank * base + min(rank, extra), base + (rank < extra)


def shard(n: int, world: World) -> slice:
    """This process's contiguous share of n items."""
    start, size = _share(n, world.world_size, world.rank)
    return slice(start, start + size)


def gather_rows(x: torch.Tensor, n: int, world: World) -> torch.Tensor:
    """Reassemble, on every process, the shards of an (n, d) tensor split with `shard`."""
    if not world.distributed:
        return x
    sizes = [_share(n, world.world_size, r)[1] for r in range(world.world_size)]
    padded = torch.zeros(max(sizes), *x.shape[1:], dtype=x.dtype, device=x.device)  # all_gather wants equal sizes
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world.world_size)]
    dist.all_gather(out, padded)
    return torch.cat([part[:size] for part, size in zip(out, sizes)])


def in_turn(fn, world: World):
    """Run fn() on rank 0 first, then on each machine's first process, then on the rest.

    For work that fills a shared cache (a download, the decoded-image cache): the first process
    builds it, later ones find it, whether the ranks share one file system or not.
    """
    if not world.distributed:
        return fn()
    result = None
    for turn in range(3):
        mine = 0 if world.rank == 0 else (1 if world.local_rank == 0 else 2)
        if mine == turn:
            result = fn()
        dist.barrier()
    return result


def mean_over_ranks(x: torch.Tensor, world: World) -> torch.Tensor:
    """Average of a tensor over all processes (itself in a single process)."""
    if not world.distributed:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world.world_size


def any_rank(flags: list[bool | torch.Tensor], world: World, device: torch.device) -> list[bool]:
    """For each flag, True on every process when it is true on any one (one collective, one sync)."""
    t = torch.stack([torch.as_tensor(f, device=device).float().reshape(()) for f in flags])
    if world.distributed:
        dist.all_reduce(t)
    return [v > 0 for v in t.tolist()]
