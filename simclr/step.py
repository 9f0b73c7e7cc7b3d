"""One training step of a method (SimCLR, NNCLR), read top to bottom in the order it runs: main.py's job
calls it for every batch, bench.py times it.

Below it, the backward pass and optimizer step it shares with finetune.py's step.
"""
from __future__ import annotations

import torch

from .distributed import gather_views
from .engine import Runtime


def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, views: torch.Tensor,
               labels: torch.Tensor | None = None, *, method, runtime: Runtime,
               scaler: torch.amp.GradScaler | None = None, probe=None, passes: int = 1) -> torch.Tensor:
    """One step on views (2b, 3, S, S) = [view 1; view 2] of b images with labels (b,) (-1: unlabeled; None: none).

    method: a simclr.methods object (it holds its loss with its settings, its modules and its state);
    probe: the online probe (None: none), which trains on the step's encoder features after the
    encoder's step; passes: 1, the network runs over both views at once, or 2, a view a pass (its per-view
    BatchNorm told so: model.one_view_per_pass). Returns the detached loss, left on the device (no sync):
    what the monitor records.
    """
    with runtime.autocast():                                  # the network in the run's precision and memory format
        if passes == 1:                                       # one pass over both views: h (2b, width), z (2b, d)
            h, z = net(runtime.prepare(views))
        else:                                                 # a view a pass, then h (2b, width), z (2b, d) as above
            h, z = map(torch.cat, zip(*(net(view) for view in runtime.prepare(views).chunk(2))))
    z, batch_labels, anchors = gather_views(z, labels)        # under torchrun every process's views: z (2bW, d)
    # simclr: its --loss on z; nnclr: the predictions of z against z's nearest neighbours in its queue
    value = method.loss(z, batch_labels, anchors)             # fp32, the mean over this process's own views
    apply_gradients(value, optimizer, scaler)                 # backward (fp16: through the scaler), optimizer step
    method.after_step(z.detach())                             # nnclr: its queue takes view 1's projections
    if probe is not None:
        probe.step(h.detach(), labels)                        # detached: nothing flows back into the encoder
    return value.detach()


def apply_gradients(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None = None) -> None:
    """Backward and one optimizer step; fp16 goes through the loss scaler (bf16 and fp32 need none)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
