"""Encoder features and what is computed on them: cosine top-k search, weighted kNN accuracy; the
batched no-gradient forward pass that computes features (and a classifier's logits).

The search, the kNN scorer and the neighbour lookup share one chunked cosine top-k, and all of
it is computed in fp32 even when a caller sits inside an autocast region.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .augment import normalize
from .distributed import World, gather_rows, shard


def _fp32(device: torch.device):
    """A region where autocast is off: similarities are compared to within rounding, not bf16 noise."""
    return torch.autocast(device_type=device.type, enabled=False)


@torch.no_grad()
def cosine_topk(query: torch.Tensor, bank: torch.Tensor, k: int,
                chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """query (n, d), bank (N, d) -> similarities (n, k) fp32 descending, indices (n, k) int64 into bank.

    Rows are L2-normalised; chunks of queries bound the (chunk, N) similarity matrix for a large bank.
    """
    with _fp32(bank.device):
        bank = F.normalize(bank.float(), dim=1)
        sims, indices = [], []
        for start in range(0, query.shape[0], chunk_size):
            q = F.normalize(query[start:start + chunk_size].to(bank.device).float(), dim=1)
            sim, idx = (q @ bank.T).topk(k, dim=1)                   # (c, N) -> (c, k)
            sims.append(sim)
            indices.append(idx)
    if not sims:
        return torch.zeros(0, k, device=bank.device), torch.zeros(0, k, dtype=torch.long, device=bank.device)
    return torch.cat(sims), torch.cat(indices)


def nearest_neighbors(query: torch.Tensor, bank: torch.Tensor, k: int,
                      chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k: query (n, d), bank (N, d) -> indices (n, k) int64, similarities (n, k) fp32, descending."""
    if not 0 < k <= bank.shape[0]:
        raise ValueError(f"k must be in 1..{bank.shape[0]} (the bank size), got {k}")
    sims, indices = cosine_topk(query, bank=bank, k=k, chunk_size=chunk_size)
    return indices, sims


@torch.no_grad()
def knn_scores(test_features: torch.Tensor, bank_features: torch.Tensor, bank_labels: torch.Tensor,
               num_classes: int, k: int, temperature: float, chunk_size: int = 1024) -> torch.Tensor:
    """Weighted kNN class scores (InstDisc): (T, d), (N, d), (N,) -> (T, C) fp32.

    Each test feature's k most cosine-similar bank features vote for their labels with weight
    exp(similarity / temperature).
    """
    k = min(k, bank_features.shape[0])
    sims, indices = cosine_topk(test_features, bank=bank_features, k=k, chunk_size=chunk_size)   # (T, k)
    labels = bank_labels.to(sims.device)
    with _fp32(sims.device):
        weights = (sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes, device=sims.device)
        votes.scatter_add_(1, labels[indices], weights)                         # (T, C)
    return votes


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """How many rows of scores (T, C) have their label (T,) among the top-k, for each k (k capped at C):
    a float tensor (len(ks),) on the scores' device, so that a training loop can sum it without a sync."""
    labels = labels.to(scores.device)
    order = scores.argsort(dim=1, descending=True)
    hits = order == labels[:, None]                              # (T, C)
    return torch.stack([hits[:, :min(k, scores.shape[1])].any(dim=1).sum() for k in ks]).float()


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[float]:
    """Percent of rows whose label is among the top-k scores, for each k (k capped at C)."""
    if scores.shape[0] == 0:
        return [float("nan")] * len(ks)
    n = scores.shape[0]
    return [percent(hits, n) for hits in topk_hits(scores, labels, ks).tolist()]


def percent(hits: float, n: int) -> float:
    """100 x hits / n from whole counts, in double precision: 106 of 500 is 21.2, not 21.199999749660492."""
    return 100 * round(hits) / n


def knn_accuracy(test_features: torch.Tensor, test_labels: torch.Tensor, bank_features: torch.Tensor,
                 bank_labels: torch.Tensor, num_classes: int, k: int, temperature: float,
                 chunk_size: int = 1024) -> tuple[float, float]:
    """Weighted kNN top-1 and top-5 accuracy in percent."""
    scores = knn_scores(test_features, bank_features=bank_features, bank_labels=bank_labels, num_classes=num_classes,
                        k=k, temperature=temperature, chunk_size=chunk_size)
    top1, top5 = topk_accuracy(scores, test_labels, (1, 5))
    return top1, top5


@torch.no_grad()
def forward_in_batches(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                       to_input: Callable[[torch.Tensor], torch.Tensor], runtime, batch_size: int = 1024,
                       progress: Callable[[Iterable], Iterable] | None = None) -> torch.Tensor:
    """fn over uint8 images (N, H, W, 3) one batch at a time, without gradients -> fp32 (N, ...) on the
    runtime's device: an encoder's features, a classifier's logits.

    `to_input` turns a uint8 batch already on the device into the network's float input.
    """
    starts = range(0, images.shape[0], batch_size)
    if progress is not None:
        starts = progress(starts)
    out = []
    for start in starts:
        batch = images[start:start + batch_size].to(runtime.device, non_blocking=True)
        with runtime.autocast():
            y = fn(runtime.prepare(to_input(batch)))
        out.append(y.float())
    return torch.cat(out) if out else torch.zeros(0, 0, device=runtime.device)


def extract_features(encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                     to_input: Callable[[torch.Tensor], torch.Tensor], runtime,
                     batch_size: int = 1024, progress: Callable[[Iterable], Iterable] | None = None) -> torch.Tensor:
    """Encoder features of uint8 images (N, H, W, 3) -> fp32 (N, d): forward_in_batches of `encode`."""
    return forward_in_batches(encode, images=images, to_input=to_input, runtime=runtime, batch_size=batch_size,
                              progress=progress)


def sharded_features(encode, images: torch.Tensor, to_input, runtime, batch_size: int, world: World,
                     progress: Callable[[Iterable], Iterable] | None = None) -> torch.Tensor:
    """forward_in_batches with the images shared out over the processes and the rows gathered back on each."""
    n = images.shape[0]
    if n < world.world_size:  # too few to share out: every rank does all (no empty shards)
        return forward_in_batches(encode, images=images, to_input=to_input, runtime=runtime, batch_size=batch_size)
    local = forward_in_batches(encode, images=images[shard(n, world)], to_input=to_input, runtime=runtime,
                               batch_size=batch_size, progress=progress)
    return gather_rows(local, n, world)


def encoder_features(model: torch.nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                     runtime, batch_size: int = 256,
                     progress: Callable[[Iterable], Iterable] | None = None) -> torch.Tensor:
    """Encoder features h of uint8 images (N, H, W, 3), normalised with mean/std -> fp32 (N, d), in eval mode."""
    model.eval()  # BatchNorm running statistics, as in the kNN evaluation
    to_input = lambda batch: normalize(batch, mean, std)  # noqa: E731
    return forward_in_batches(model.encode, images=images, to_input=to_input, runtime=runtime, batch_size=batch_size,
                              progress=progress)
