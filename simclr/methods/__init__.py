"""The methods of --method, one file each: what a method adds to the SimCLR model, its loss, and its state.

`METHODS` maps a `--method` name to its class. A method class has:
  - `modules(config) -> dict[str, nn.Module]` (static): the extra modules it trains beside the encoder f and
    head g (nnclr: a `predictor`), built from the run config and attached to the SimCLR model under their
    names, so the optimizer trains them, NAME_model.pth holds them and every reader that rebuilds the
    model from NAME_config.json (checkpoint.model_from_config) loads them strictly;
  - `build(config, model, device)` (class method): built once per run, with its loss and its state;
  - `loss(z, labels, anchors) -> scalar`: the step's loss on the (gathered) projections, as simclr.loss's;
  - `after_step(z)`: called with the step's detached (gathered) projections after the optimizer step;
  - `state_dict() -> dict` / `load_state_dict(saved)`: the state it carries across steps, saved in
    NAME_last.pth and put back exactly on resume (load_state_dict raises ValueError on a misfit).
A new method = one file here + one line in METHODS + its flags in simclr.flags (declared with method=NAME).
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .nnclr import NNCLR
from .simclr import SimCLRMethod


class Method(Protocol):
    """What the step and the job call (see the module docstring)."""

    def loss(self, z: torch.Tensor, labels: torch.Tensor | None = None,
             anchors: torch.Tensor | None = None) -> torch.Tensor: ...

    def after_step(self, z: torch.Tensor) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, saved: dict) -> None: ...


# --method NAME -> its class; the names are simclr.flags.TRAIN_METHODS (a test holds the two equal)
METHODS: dict[str, type] = {"simclr": SimCLRMethod, "nnclr": NNCLR}


def method_name(config) -> str:
    """The method of a run config (a dict or a TrainConfig); a config without one (older runs) is simclr."""
    value = config.get("method", "simclr") if isinstance(config, dict) else config.method
    if value not in METHODS:
        raise ValueError(f"method {value!r} is none of {', '.join(METHODS)}")
    return value


def attach_modules(model: nn.Module, config) -> nn.Module:
    """Add the config's method's extra modules to a SimCLR model (in place); returns the model."""
    for name, module in METHODS[method_name(config)].modules(config).items():
        model.add_module(name, module)
    return model


def build_method(config, model: nn.Module, device: torch.device) -> Method:
    """The run's method object, built once from its config (the model already holds its modules)."""
    return METHODS[method_name(config)].build(config, model, device)
