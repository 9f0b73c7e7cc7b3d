"""The contrastive loss: NT-Xent (SimCLR Eq. 1), where views that share an id are positives.

By default the positives are the two views of an image (rows i and i + N of z); an id per view
(an image index, or a label) generalises that, so a loss that uses labels is one argument away.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged (the loss is never computed in half precision)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def view_ids(n2: int, device: torch.device | None = None) -> torch.Tensor:
    """The default positive ids of z = [view 1; view 2] with n2 rows: the image index, (n2,) = [0..N-1, 0..N-1]."""
    return torch.arange(n2, device=device) % (n2 // 2)


def nt_xent(z: torch.Tensor, temperature: float, ids: torch.Tensor | None = None,
            anchors: torch.Tensor | None = None) -> torch.Tensor:
    """NT-Xent of z: (V, d), each row one view; rows with the same id are positives of each other.

    ids: (V,) int64, one id per view; None means the two views of an image (V = 2N, rows i and
    i + N). Rows are L2-normalised, logits = z z^T / temperature in fp32 (also inside an autocast
    region) with the self-similarity masked out; each anchor's loss is the cross-entropy of each of
    its positives against all other views, averaged over its positives (with one positive per
    anchor, exactly SimCLR's loss). Returns the mean over the anchor rows (every row by default; a
    subset when each process owns part of a gathered batch). Every anchor must have a positive.
    """
    n2 = z.shape[0]
    if ids is None and n2 % 2:
        raise ValueError(f"nt_xent needs an even number of rows (two views per image), got {n2}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = F.normalize(at_least_fp32(z), dim=1)
        rows = torch.arange(n2, device=z.device) if anchors is None else anchors
        logits = z[rows] @ z.T / temperature                                        # (A, V)
        # a row's similarity with itself is always the largest; it is not a negative. masked_fill
        # takes -inf as a scalar argument: no host-to-device copy, so no sync in the step
        itself = rows[:, None] == torch.arange(n2, device=z.device)[None, :]       # (A, V)
        logits = logits.masked_fill(itself, float("-inf"))
        if ids is None:
            partner = (rows + n2 // 2) % n2                                         # (A,): the other view
            return F.cross_entropy(logits, partner)
        positive = (ids[rows][:, None] == ids[None, :]) & ~itself                  # (A, V)
        log_prob = logits.log_softmax(dim=1).masked_fill(~positive, 0.0)           # -inf * 0 avoided
        per_anchor = -log_prob.sum(dim=1) / positive.sum(dim=1)                    # (A,): mean over positives
        return per_anchor.mean()


def dcl(z: torch.Tensor, temperature: float, sigma: float | None = None,
        anchors: torch.Tensor | None = None) -> torch.Tensor:
    """Decoupled contrastive loss (Yeh et al. 2022) of z: (2N, d) = [view 1; view 2].

    For each anchor: -w * sim(anchor, partner) / temperature + log sum over the other 2N - 2 views
    (neither itself nor its partner) of exp(sim / temperature); the positive is not in the
    denominator. w = 1 (DCL), or with sigma the DCLW weight 2 - N * softmax over the batch's N
    pairs of sim(pair) / sigma (pairs that are already alike weigh less). fp32, averaged over the
    anchor rows (every row by default).
    """
    n2 = z.shape[0]
    if n2 % 2:
        raise ValueError(f"dcl needs an even number of rows (two views per image), got {n2}")
    n = n2 // 2
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = F.normalize(at_least_fp32(z), dim=1)
        rows = torch.arange(n2, device=z.device) if anchors is None else anchors
        partner = (rows + n) % n2                                                    # (A,)
        sim = z[rows] @ z.T                                                          # (A, 2N) cosine
        columns = torch.arange(n2, device=z.device)[None, :]
        left_out = (columns == rows[:, None]) | (columns == partner[:, None])        # itself and its positive
        negatives = (sim / temperature).masked_fill(left_out, float("-inf")).logsumexp(dim=1)   # (A,)
        positive = sim.gather(1, partner[:, None]).squeeze(1)                        # (A,)
        if sigma is None:
            weight = torch.ones_like(positive)
        else:
            pair_sim = (z[:n] * z[n:]).sum(dim=1)                                    # (N,) every pair's similarity
            weight = (2 - n * torch.softmax(pair_sim / sigma, dim=0))[rows % n]      # (A,)
        return (-weight * positive / temperature + negatives).mean()


def positive_ids(loss: str, labels: torch.Tensor, offset: int = 0) -> torch.Tensor | None:
    """The positive id of each view of a batch [view 1; view 2] of images with these labels (b,), -1 unlabeled.

    ntxent and dcl: None (the two views of an image). supcon: the label; an unlabeled image gets an id
    of its own, -1 - its position in the global batch (offset: this process's first position), so
    its only positive is its other view, and a batch without labels is NT-Xent exactly.
    """
    if loss != "supcon":
        return None
    position = torch.arange(labels.shape[0], device=labels.device) + offset
    ids = torch.where(labels >= 0, labels, -1 - position)                           # (b,)
    return torch.cat([ids, ids])                                                     # (2b,)


def contrastive_loss(z: torch.Tensor, temperature: float, loss: str = "ntxent", ids: torch.Tensor | None = None,
                     anchors: torch.Tensor | None = None, dcl_sigma: float | None = None) -> torch.Tensor:
    """The loss named by --loss on z (V, d): ntxent and supcon (NT-Xent over the positives of `ids`), or dcl."""
    if loss == "dcl":
        return dcl(z, temperature, dcl_sigma, anchors)
    if loss not in ("ntxent", "supcon"):
        raise ValueError(f"unknown loss {loss!r}; choose ntxent, supcon or dcl")
    return nt_xent(z, temperature, ids, anchors)
