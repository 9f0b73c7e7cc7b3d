"""The library behind the scripts at the repository root: one job per module, nothing runs on import.

A trained run in your own code (after `pip install -e .`, from any folder):

    import simclr
    encoder, preprocess = simclr.load_encoder("results/NAME_model.pth")   # simclr.pretrained
    h = encoder(preprocess(images))

See docs/architecture.md for the modules and the path of a batch from disk to the CSV.
"""
from __future__ import annotations

import importlib

# name -> the module that defines it; imported on first use, so `import simclr` stays free of torch
_EXPORTS = {"load_encoder": "pretrained", "preprocess_for": "pretrained", "Preprocess": "pretrained",
            "SimCLR": "model", "FeatureEncoder": "model"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
