"""A trained run's encoder with its data, for the scripts that look at its features (neighbors, embed)."""
from __future__ import annotations

import dataclasses
from typing import Callable

from .checkpoint import MODEL_CONFIG_KEYS, data_location, open_run
from .data import DataBundle, evaluable, load_dataset
from .engine import Runtime, make_runtime
from .model import SimCLR


def open_for_features(model_path: str, config: str | None, dataset: str | None, data_root: str | None,
                      image_size: int | None, device: str, threads: int,
                      log: Callable[[str], None]) -> tuple[SimCLR, dict, Runtime, DataBundle]:
    """(model in eval mode, run config, runtime, data) of the run whose weights are model_path.

    The encoder is loaded strictly (the head is not used); the data is the run's unless the flags
    name another (the original tool's weights: CIFAR-10 normalised as it did); the runtime computes in fp32, so that similarities are compared to within
    rounding, not to bf16 noise.
    """
    model, saved = open_run(model_path, config, needs=MODEL_CONFIG_KEYS, encoder_only=True)
    runtime = make_runtime(device, "fp32", channels_last=False, threads=threads)
    if device == "auto" and runtime.device.type == "cpu":
        log("note: no CUDA GPU found, computing features on the CPU")
    where = data_location(saved, dataset=dataset, data_root=data_root, image_size=image_size)
    bundle = evaluable(load_dataset(**where, log=log), where["root"])
    if saved.get("original_tool") is True and bundle.name == saved["dataset"]:  # its inputs' normalisation
        bundle = dataclasses.replace(bundle, mean=tuple(saved["mean"]), std=tuple(saved["std"]))
    return model, saved, runtime, bundle
