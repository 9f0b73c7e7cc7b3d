"""Reading back what a run wrote (weights, checkpoints, run configs) without trusting the files.

Weights come from the internet too: every load is `torch.load(..., weights_only=True)`, which
accepts tensors and plain containers only, and every failure becomes one UserError line.
"""
from __future__ import annotations

import json
import os
import pickle
import warnings

import torch
from torch import nn

from utils import UserError


def run_base(path: str) -> str:
    """results/NAME_model.pth or NAME_last.pth -> results/NAME, the stem of the run's other files."""
    for suffix in ("_model.pth", "_last.pth"):
        if path.endswith(suffix) and len(os.path.basename(path)) > len(suffix):
            return path[: -len(suffix)]
    return os.path.splitext(path)[0]


def config_path_for(model_path: str) -> str:
    """The NAME_config.json main.py writes beside NAME_model.pth and NAME_last.pth."""
    return run_base(model_path) + "_config.json"


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), at most 200 characters."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _load_error(path: str, e: Exception) -> UserError:
    """A one-line reason why torch.load(weights_only=True) refused or failed on `path`."""
    text = str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    code = next((line for line in lines if "GLOBAL" in line), None)
    if isinstance(e, pickle.UnpicklingError) and code is not None:
        return UserError(f"{path} refused: unpickling it would run code ({code}); nothing in it was run "
                         f"(weights_only=True accepts only tensors and plain containers)")
    if isinstance(e, EOFError) or "zip archive" in text or "central directory" in text:
        return UserError(f"{path} is truncated or corrupted (not a complete PyTorch file); save or copy it again")
    # torch's message wraps the reason in advice about weights_only=False, which must not be followed here
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch")
    reasons = [line for line in lines if not line.startswith(boilerplate)]
    detail = reasons[0] if reasons else type(e).__name__
    return UserError(f"{path} is not a PyTorch weights file that can be loaded safely ({detail[:160]})")


def load_untrusted(path: str, flag: str = "--model_path"):
    """torch.load(path, weights_only=True) on the CPU; a missing or bad file is a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: keep the error to one line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure of an untrusted file is the user's to fix
        raise _load_error(path, e) from None


def is_training_checkpoint(obj) -> bool:
    """True for a NAME_last.pth dict (model, optimizer, config, ...) rather than a plain state_dict."""
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "optimizer" in obj


def encoder_state(path: str) -> dict[str, torch.Tensor]:
    """The encoder's tensors ('f.' stripped) of a NAME_model.pth or NAME_last.pth of main.py."""
    obj = load_untrusted(path)
    if is_training_checkpoint(obj):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise UserError(f"{path} is not a state_dict (a dict of tensors) of main.py's SimCLR model")
    state = {k[2:]: v for k, v in obj.items() if k.startswith("f.")}
    if not state:
        raise UserError(f"{path} is not a SimCLR state_dict: it has no encoder keys 'f.*'")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path} is not a SimCLR state_dict: f.{bad[0]} is not a tensor")
    return state


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: str, what: str, prefix: str = "f.") -> None:
    """module.load_state_dict(state, strict=True), with a one-line UserError naming what does not fit."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {prefix}{missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {prefix}{unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (e.g. {prefix}{k} {tuple(state[k].shape)} in the file, "
                         f"{tuple(expected[k].shape)} expected)")
        raise UserError(f"{path} does not fit a {what}: {', '.join(parts)}; "
                        f"was it trained with another --arch, --stem or head size?")
    module.load_state_dict(state, strict=True)


def read_run_config(path: str, flag: str = "--config") -> dict:
    """A NAME_config.json of main.py as a dict; a missing or unreadable file is a one-line UserError."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file; pass --config results/NAME_config.json") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable JSON run config ({first_line(e)})") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path} is not a run config of main.py (not a JSON object)")
    return saved
