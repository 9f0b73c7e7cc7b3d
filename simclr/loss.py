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
