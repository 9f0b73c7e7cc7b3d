"""The losses of the SimCLR family, each an object built once from the run's config with its own settings.

`REGISTRY` maps a `--loss` name to its class, a frozen dataclass whose fields are named as the flags
that set them (simclr.flags declares each once); `build_loss(config)` builds the run's loss from
those flags. A loss is called as `loss(z, labels, anchors)` on the projections of the whole batch:
z (2N, d) = [view 1; view 2], labels (N,) of the images (-1: unlabeled; None: no labels), anchors
the rows whose mean it returns (None: every row; under torchrun, this process's own). The step
never sees a loss's settings, and a loss never sees how the batch was gathered.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

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
    pairs of sim(pair) / sigma (pairs that are already alike weigh less). The weight is a
    coefficient of each positive term, as the paper defines it: no gradient flows through it.
    fp32, averaged over the anchor rows (every row by default).
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
            # detached: through the weight the gradient would push the best-aligned pairs apart, the
            # opposite of a weight that eases off on them (docs/experiments/losses.md: DCLW's weight)
            pair_sim = (z[:n] * z[n:]).sum(dim=1).detach()                           # (N,) every pair's similarity
            weight = (2 - n * torch.softmax(pair_sim / sigma, dim=0))[rows % n]      # (A,)
        return (-weight * positive / temperature + negatives).mean()


def label_ids(labels: torch.Tensor) -> torch.Tensor:
    """The positive id of each view of [view 1; view 2] of images with these labels (N,), -1 unlabeled -> (2N,).

    The label; an unlabeled image gets an id of its own, -1 - its position in the batch, so its only
    positive is its other view (a batch without labels is NT-Xent exactly).
    """
    position = torch.arange(labels.shape[0], device=labels.device)
    ids = torch.where(labels >= 0, labels, -1 - position)                           # (N,)
    return torch.cat([ids, ids])                                                     # (2N,)


# ----------------------------------------------------------------------------- the losses of --loss

class Loss(Protocol):
    """What the step calls: z (2N, d) = [view 1; view 2], labels (N,) or None, anchors (A,) or None -> scalar."""

    def __call__(self, z: torch.Tensor, labels: torch.Tensor | None = None,
                 anchors: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class NTXent:
    """NT-Xent (SimCLR): each view's one positive is the other view of its image."""
    temperature: float

    def __call__(self, z: torch.Tensor, labels: torch.Tensor | None = None,
                 anchors: torch.Tensor | None = None) -> torch.Tensor:
        return nt_xent(z, self.temperature, anchors=anchors)


@dataclass(frozen=True)
class SupCon:
    """Supervised contrastive loss (Khosla et al. 2020, the L_out form): the views of one label are each
    other's positives; an unlabeled image's only positive is its other view (no labels: NT-Xent). With
    supcon_base_temperature, scaled by temperature / supcon_base_temperature as SupContrast's code is."""
    temperature: float
    supcon_base_temperature: float | None = None

    def __call__(self, z: torch.Tensor, labels: torch.Tensor | None = None,
                 anchors: torch.Tensor | None = None) -> torch.Tensor:
        loss = nt_xent(z, temperature=self.temperature, ids=None if labels is None else label_ids(labels),
                       anchors=anchors)
        if self.supcon_base_temperature is None:
            return loss
        return loss * (self.temperature / self.supcon_base_temperature)


@dataclass(frozen=True)
class DCL:
    """Decoupled contrastive loss (Yeh et al. 2022): the positive left out of the denominator; with
    dcl_sigma, DCLW's weight on each positive term."""
    temperature: float
    dcl_sigma: float | None = None

    def __call__(self, z: torch.Tensor, labels: torch.Tensor | None = None,
                 anchors: torch.Tensor | None = None) -> torch.Tensor:
        return dcl(z, temperature=self.temperature, sigma=self.dcl_sigma, anchors=anchors)


# --loss NAME -> its class; the names are simclr.flags.LOSSES (a test holds the two equal)
REGISTRY: dict[str, type] = {"ntxent": NTXent, "supcon": SupCon, "dcl": DCL}


def build_loss(config) -> Loss:
    """The loss that config.loss names, built with its settings: config's value of the flag of each of its fields."""
    kind = REGISTRY[config.loss]
    return kind(**{field.name: getattr(config, field.name) for field in dataclasses.fields(kind)})
