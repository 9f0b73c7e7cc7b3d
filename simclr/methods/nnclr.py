"""NNCLR (Dwibedi et al. 2021, "With a little help from my friends"): each view's positive is the nearest
neighbour of its projection in a support queue of earlier projections, against a prediction of the other view.

Follows the paper's pseudo-code (its Algorithm 1): z normalised, NN(z) the top-1 cosine neighbour in the
queue Q, stop-gradient through it, the loss symmetric over the views, L = (InfoNCE(NN(z1), p2) +
InfoNCE(NN(z2), p1)) / 2 with the batch's other predictions as negatives and the temperature of
--temperature, and Q updated after the step with view 1's detached, normalised projections (FIFO).
Two choices the pseudo-code leaves open: the lookup is over the filled slots of Q only (not a random
initialisation, as solo-learn's and lightly's queues start), and before the first update, when Q is
empty, each projection is its own neighbour (detached, as a neighbour is).
Under torchrun the step's projections arrive gathered from every process in rank order
(simclr.distributed.gather_views), so every process looks up the same neighbours and puts the same rows
into its copy of Q: the queues stay equal, filled from every rank.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..loss import at_least_fp32


def predictor(dim: int, hidden: int) -> nn.Sequential:
    """The prediction head on z, as the paper's: Linear, BatchNorm, ReLU, Linear (dim -> hidden -> dim)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


def nearest(zn: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    """The top-1 cosine neighbour in queue (Q, d), rows normalised, of each row of zn (V, d), normalised -> (V, d)."""
    return queue[(zn @ queue.T).argmax(dim=1)]


def nnclr_loss(neighbours: torch.Tensor, p: torch.Tensor, temperature: float,
               anchors: torch.Tensor | None = None) -> torch.Tensor:
    """NNCLR's loss of the neighbours (2N, d) = [NN(z1); NN(z2)] against the predictions p (2N, d) = [p1; p2].

    Anchor row r of view 1 (r < N): cross-entropy of cos(NN(z1)_r, p2_j) / temperature over the N images j,
    its positive j = r; of view 2: NN(z2)_r against p1. The mean over the anchor rows (default every
    row: the mean of the two directions). fp32, also inside an autocast region.
    """
    n = p.shape[0] // 2
    with torch.autocast(device_type=p.device.type, enabled=False):
        q, p = F.normalize(at_least_fp32(neighbours), dim=1), F.normalize(at_least_fp32(p), dim=1)
        rows = torch.arange(2 * n, device=p.device) if anchors is None else anchors
        other = torch.where(rows[:, None] < n, torch.arange(n, 2 * n, device=p.device)[None, :],
                            torch.arange(n, device=p.device)[None, :])                # (A, N): the other view's rows
        logits = (q[rows] @ p.T).gather(1, other) / temperature                        # (A, N)
        return F.cross_entropy(logits, rows % n)


class NNCLR:
    """--method nnclr: a predictor on z, a FIFO support queue of --queue_size normalised projections."""

    @staticmethod
    def modules(config) -> dict[str, nn.Module]:
        get = config.get if isinstance(config, dict) else lambda key: getattr(config, key)
        return {"predictor": predictor(get("feature_dim"), get("pred_hidden_dim"))}

    def __init__(self, predictor: nn.Module, temperature: float, queue_size: int, dim: int, device: torch.device):
        self.predictor, self.temperature = predictor, temperature
        self.queue = torch.zeros(queue_size, dim, device=device)   # fp32, rows normalised
        self.filled, self.pointer = 0, 0   # host ints: slots [0, filled) hold projections; the next write at pointer

    @classmethod
    def build(cls, config, model: nn.Module, device: torch.device) -> "NNCLR":
        return cls(model.predictor, config.temperature, config.queue_size, config.feature_dim, device)

    def loss(self, z: torch.Tensor, labels: torch.Tensor | None = None,
             anchors: torch.Tensor | None = None) -> torch.Tensor:
        """z (2N, d) = [z1; z2] -> the predictions p of z and the neighbours of z in the queue, then nnclr_loss."""
        p = self.predictor(at_least_fp32(z))
        with torch.no_grad():  # stop-gradient: nothing flows through the neighbour
            zn = F.normalize(at_least_fp32(z), dim=1)
            neighbours = zn if self.filled == 0 else nearest(zn, self.queue[:self.filled].to(zn.dtype))
        return nnclr_loss(neighbours, p=p, temperature=self.temperature, anchors=anchors)

    @torch.no_grad()
    def after_step(self, z: torch.Tensor) -> None:
        """Put view 1's normalised projections (the first half of z) into the queue, oldest out first."""
        rows = F.normalize(at_least_fp32(z[: z.shape[0] // 2]), dim=1)[-len(self.queue):]
        slots = (self.pointer + torch.arange(len(rows), device=self.queue.device)) % len(self.queue)
        self.queue[slots] = rows.to(self.queue.dtype)
        self.pointer = (self.pointer + len(rows)) % len(self.queue)
        self.filled = min(self.filled + len(rows), len(self.queue))

    def state_dict(self) -> dict:
        return {"queue": self.queue[:self.filled].cpu().clone(), "pointer": self.pointer}

    def load_state_dict(self, saved: dict) -> None:
        """Put back what state_dict saved; ValueError when it is not a queue of this run's size."""
        queue, pointer = saved.get("queue"), saved.get("pointer")
        if not isinstance(queue, torch.Tensor) or queue.dim() != 2 or queue.shape[1] != self.queue.shape[1] \
                or len(queue) > len(self.queue) or not isinstance(pointer, int) or not 0 <= pointer < len(self.queue):
            raise ValueError(f"not a queue of {len(self.queue)} x {self.queue.shape[1]} with its pointer")
        self.queue.zero_()
        self.queue[:len(queue)] = queue.to(self.queue.device, self.queue.dtype)
        self.filled, self.pointer = len(queue), pointer
