"""SimCLR (Chen et al. 2020) and its family: the loss of --loss (ntxent, supcon, dcl) on the projections;
no extra modules and no state across steps."""
from __future__ import annotations

import torch
from torch import nn

from ..loss import Loss, build_loss


class SimCLRMethod:
    """--method simclr: the step's loss is simclr.loss's --loss, built with its own settings."""

    @staticmethod
    def modules(config) -> dict[str, nn.Module]:
        return {}

    def __init__(self, loss: Loss):
        self.loss = loss

    @classmethod
    def build(cls, config, model: nn.Module, device: torch.device) -> "SimCLRMethod":
        return cls(build_loss(config))  # with its own settings (temperature, dcl_sigma, ...)

    def after_step(self, z: torch.Tensor) -> None:
        """Nothing: SimCLR carries nothing from one step to the next."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, saved: dict) -> None:
        """Nothing to put back."""
