"""Both halves of the checkpoint format: writing a run's weights and resume checkpoints, and
reading them (and run configs) back without trusting the files.

Weights come from the internet too: every load is `torch.load(..., weights_only=True)`, which
accepts tensors and plain containers only, and every failure becomes one UserError line. Every
write goes through files.atomic_save (whole file or none) and holds CPU tensors only, so a file
saved on a GPU loads on a machine without one.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import random
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .cli import UserError, first_line
from .files import atomic_save, refuse_to_replace
from .methods import attach_modules
from .flags import TRAIN, run_settings
from .model import ARCHS, STEMS, SimCLR
from .names import RUN_SUFFIXES, config_path_for, run_base, run_name  # noqa: F401 (re-exported)

# Keys of NAME_config.json needed to rebuild the model and reload its data (other keys are ignored).
MODEL_CONFIG_KEYS = ("arch", "stem", "feature_dim", "proj_hidden_dim", "dataset", "data_root", "image_size")


def _load_error(path: str, e: Exception) -> UserError:
    """A one-line reason why torch.load(weights_only=True) refused or failed on `path`."""
    text = str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    code = next((line for line in lines if "GLOBAL" in line), None)
    if isinstance(e, pickle.UnpicklingError) and code is not None:
        return UserError(f"{path} refused: unpickling it would run code ({code}); nothing in it was run "
                         f"(weights_only=True accepts only tensors and plain containers)")
    if (isinstance(e, EOFError) or "zip archive" in text or "central directory" in text
            or "PytorchStreamReader" in text):
        return UserError(f"{path} is truncated or corrupted (not a complete PyTorch file); save or copy it again")
    # torch's message wraps the reason in advice about weights_only=False, which must not be followed here
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch")
    reasons = [line for line in lines if not line.startswith(boilerplate)]
    detail = reasons[0] if reasons else type(e).__name__
    if isinstance(e, (pickle.UnpicklingError, IndexError, KeyError, ValueError, TypeError)) and code is None:
        # the unpickler's own words ("pop from empty list", "Unsupported operand 149") say nothing to a user
        return UserError(f"{path} is not a PyTorch weights file: it is damaged (its data is not the pickled tensors "
                         f"torch.save writes; the reader stopped at: {detail[:80]}); save or copy it again")
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


def model_state(path: str) -> dict[str, torch.Tensor]:
    """Every tensor (encoder `f.*` and head `g.*`) of a NAME_model.pth or NAME_last.pth of main.py, or of
    the original tool's *_model.pth with its keys renamed to ours."""
    state = weights_state(path)
    if is_original_tool(state):
        original_tool_config(state, path)  # its head must fit before anything is built from it
        state = from_original_tool(state)
    return state


def weights_state(path: str) -> dict[str, torch.Tensor]:
    """The state_dict of a weights file (the model entry of a NAME_last.pth), its keys as the file has them,
    after check_weights: every script and hub read weights through here or load_training_checkpoint."""
    obj = load_untrusted(path)
    check_weights(obj, path)
    return obj["model"] if is_training_checkpoint(obj) else obj


# ----------------------------------------------------------------------------- what a weights file must hold

# Tensors named so hold no negative value: BatchNorm divides by sqrt(running_var + eps) and Adam by
# sqrt(exp_avg_sq) + eps, so one negative entry is a NaN in every output or step that touches it.
NON_NEGATIVE = {"running_var": "a variance", "exp_avg_sq": "a mean of squares"}
DAMAGED = "the file is damaged: use another copy or checkpoint"


def check_weights(obj, source: str) -> None:
    """Refuse, in one UserError naming the first fault, weights that would give NaN features or a silent
    cast: a state_dict that is not a dict of named plain float tensors, or a NaN/inf or (NON_NEGATIVE) negative
    value in any floating tensor; of a NAME_last.pth its model entry so, and its other entries (optimizer,
    online probe) likewise finite. One aminmax pass per tensor: milliseconds for a ResNet-50 and its Adam
    state. `source` begins each message (the path, or '--resume PATH')."""
    if is_training_checkpoint(obj):
        state = obj["model"]
        check_state_dict(state, f"{source}: its model entry")
        others = nested_tensors([(f"{part}.", value) for part, value in obj.items() if part != "model"])
    else:
        state, others = obj, []
        check_state_dict(state, source)
    for key, tensor in [*state.items(), *others]:
        fault = value_fault(key, tensor)
        if fault is not None:
            raise UserError(f"{source}: {key} {fault}; {DAMAGED}")


def check_state_dict(state, source: str) -> None:
    """Refuse what is not a SimCLR state_dict: a dict of str keys (encoder `f.*`) to plain float tensors
    (integer only for BatchNorm's num_batches_tracked), its keys of one naming scheme."""
    if not isinstance(state, dict):
        raise UserError(f"{source} is not a state_dict: it holds a {type(state).__name__}, not a dict of tensors")
    for key in state:
        if not isinstance(key, str):
            raise UserError(f"{source} is not a state_dict: its key {repr(key)[:40]} ({type(key).__name__}) is "
                            f"not a tensor name (a string)")
    if not any(k.startswith("f.") for k in state):
        raise UserError(f"{source} is not a SimCLR state_dict: it has no encoder keys 'f.*'")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{source} is not a SimCLR state_dict: {key} is a {type(value).__name__}, not a tensor")
        if plain(value) and not value.is_floating_point() and not key.endswith("num_batches_tracked"):
            raise UserError(f"{source}: {key} is a tensor of {str(value.dtype).removeprefix('torch.')} where "
                            f"weights are floating point; {DAMAGED}")
    ours = next((k for k in state if k.startswith(tuple(ORIGINAL_ENCODER_KEYS.values()))), None)
    if "f.0.weight" in state and ours is not None:
        raise UserError(f"{source} mixes two key schemes: f.0.weight (the original tool's numbered encoder) and "
                        f"{ours} (this project's names); it is a state_dict of neither")


def plain(tensor: torch.Tensor) -> bool:
    """True for a dense CPU tensor that holds its data (not sparse, nested, quantized or on the meta device)."""
    return (tensor.layout == torch.strided and not tensor.is_nested and not tensor.is_quantized
            and tensor.device.type == "cpu")


def tensor_kind(tensor: torch.Tensor) -> str:
    """'sparse_coo', 'nested', 'quantized' or 'meta-device', for messages."""
    if tensor.layout != torch.strided:
        return str(tensor.layout).removeprefix("torch.")
    return "nested" if tensor.is_nested else "quantized" if tensor.is_quantized else f"{tensor.device.type}-device"


def value_fault(key: str, tensor: torch.Tensor) -> str | None:
    """What is wrong with the values of one tensor ('has 3 NaN and 0 inf values'), or None."""
    if not plain(tensor):
        return f"is a {tensor_kind(tensor)} tensor, not a plain one with its data"
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    # one reading pass, no temporary: aminmax propagates NaN, so both ends are finite exactly when every value
    # is (measured on one core: 5 ms for a ResNet-50's 24.6 M values, isfinite(t).all() 136 ms)
    low, high = (float(v) for v in torch.aminmax(tensor))
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"has {int(torch.isnan(tensor).sum())} NaN and {int(torch.isinf(tensor).sum())} inf values"
    what = NON_NEGATIVE.get(key.rsplit(".", 1)[-1])
    if what is not None and low < 0:
        count = int((tensor < 0).sum())
        return f"has {count} negative value{'s' * (count != 1)} ({what} cannot be negative)"
    return None


def nested_tensors(items: list) -> list[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) of every tensor inside nested dicts, lists and tuples: [("optimizer.", {...})]
    gives ("optimizer.state.0.exp_avg", t), ... Iterative: a deeply nested file cannot exhaust the stack."""
    found, stack = [], list(reversed(items))
    while stack:
        name, value = stack.pop()
        if isinstance(value, torch.Tensor):
            found.append((name.rstrip("."), value))
        elif isinstance(value, dict):
            stack.extend(reversed([(f"{name}{k}.", v) for k, v in value.items()]))
        elif isinstance(value, (list, tuple)):
            stack.extend(reversed([(f"{name}{i}.", v) for i, v in enumerate(value)]))
    return found


# ----------------------------------------------------------------------------- the original tool's files

# The original tool (leftthomas/SimCLR) saves its Model's state_dict: f = nn.Sequential(conv1, bn1, relu,
# layer1..layer4, avgpool) of a torchvision ResNet-50 (3x3 stride-1 conv1, no max-pool, no fc), so its
# encoder keys are numbered children; its head g (Linear 2048->512 no bias, BatchNorm1d, ReLU, Linear) is ours.
ORIGINAL_ENCODER_KEYS = {"f.0.": "f.conv1.", "f.1.": "f.bn1.", "f.3.": "f.layer1.", "f.4.": "f.layer2.",
                         "f.5.": "f.layer3.", "f.6.": "f.layer4."}
# Its CIFAR-10 normalisation (utils.py of the original tool), which differs from the data set's true std
ORIGINAL_MEAN, ORIGINAL_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
_announced: set[str] = set()


def is_original_tool(state: dict) -> bool:
    """True for a state_dict with the original tool's numbered encoder keys (f.0.weight conv1, f.3.* layer1)."""
    return "f.0.weight" in state and any(k.startswith("f.3.") for k in state) and "f.conv1.weight" not in state


def from_original_tool(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original tool's keys renamed to ours (f.0 -> f.conv1, f.1 -> f.bn1, f.3..f.6 -> f.layer1..4);
    other keys (the head g.*, and any that fit nothing) are kept as they are, for load_strict to judge."""
    def rename(key: str) -> str:
        for old, new in ORIGINAL_ENCODER_KEYS.items():
            if key.startswith(old):
                return new + key[len(old):]
        return key
    return {rename(k): v for k, v in state.items()}


def original_tool_config(state: dict[str, torch.Tensor], path: str) -> dict:
    """The run config the original tool's weights imply: ResNet-50, CIFAR stem, its 2-layer head with
    feature_dim read from g.3, CIFAR-10 with its normalisation. A head that does not fit is a UserError."""
    fault = original_head_fault(state)
    if fault is not None:
        raise UserError(f"{path} has the original tool's encoder keys but a head that does not fit its "
                        f"Linear(2048, H, bias=False), BatchNorm1d(H), ReLU, Linear(H, D): {fault}")
    hidden, feature_dim = state["g.3.weight"].shape[1], state["g.3.weight"].shape[0]
    return {"arch": "resnet50", "stem": "cifar", "feature_dim": int(feature_dim), "proj_hidden_dim": int(hidden),
            "proj_layers": 2, "dataset": "cifar10", "data_root": "data", "image_size": 32,
            "mean": list(ORIGINAL_MEAN), "std": list(ORIGINAL_STD), "num_classes": 10, "original_tool": True}


def original_head_fault(state: dict[str, torch.Tensor]) -> str | None:
    """The first tensor of the original tool's head g that does not fit it, in words; None when all do.
    H and D are read from g.0 and g.3 and must lie in main.py's bounds of --proj_hidden_dim and --feature_dim."""
    def shape(key: str) -> str:
        value = state.get(key)
        return "missing" if value is None else f"of shape {tuple(value.shape)}"

    def out_of_bounds(flag: str, size: int, words: str, key: str) -> str | None:
        bounds = TRAIN[flag]
        if bounds.ge <= size <= bounds.le:
            return None
        return f"its {words} {size} ({key} is {tuple(state[key].shape)}) must be {bounds.describe_bounds()}"

    w0, w3 = state.get("g.0.weight"), state.get("g.3.weight")
    if w0 is None or w0.dim() != 2 or w0.shape[1] != 2048:
        return f"g.0.weight is {shape('g.0.weight')}, not (H, 2048) (the head reads ResNet-50's 2048 features)"
    hidden = w0.shape[0]
    if "g.0.bias" in state:
        return "g.0.bias is there, but the head's first Linear has no bias"
    if w3 is None or w3.dim() != 2 or w3.shape[1] != hidden:
        return f"g.3.weight is {shape('g.3.weight')}, not (D, {hidden}) (H = {hidden} from g.0.weight)"
    fault = (out_of_bounds("proj_hidden_dim", size=hidden, words="hidden width H", key="g.0.weight")
             or out_of_bounds("feature_dim", size=w3.shape[0], words="feature dimension D", key="g.3.weight"))
    if fault is not None:
        return fault
    expected = {**{f"g.1.{k}": (hidden,) for k in ("weight", "bias", "running_mean", "running_var")},
                "g.3.bias": (w3.shape[0],)}
    for key, size in expected.items():
        if state.get(key) is None or tuple(state[key].shape) != size:
            return f"{key} is {shape(key)}, not {size}"
    return None


def original_run_config(path: str) -> dict | None:
    """The implied run config of the original tool's weights at path (announced once, on stderr), else None.
    The file is checked first (weights_state): a damaged one is refused for what it is, before any note."""
    state = weights_state(path)
    if not is_original_tool(state):
        return None
    saved = original_tool_config(state, path)
    if os.path.abspath(path) not in _announced:
        _announced.add(os.path.abspath(path))
        print(f"{path}: the original tool's weights, no run config beside them: assuming ResNet-50, CIFAR stem, head "
              f"2048-{saved['proj_hidden_dim']}-{saved['feature_dim']}, CIFAR-10 in data/ normalised with mean "
              f"{ORIGINAL_MEAN} std {ORIGINAL_STD} (--dataset, --data_root choose other data)", file=sys.stderr,
              flush=True)
    return saved


def encoder_state(path: str) -> dict[str, torch.Tensor]:
    """The encoder's tensors ('f.' stripped) of a NAME_model.pth or NAME_last.pth of main.py."""
    return {k[2:]: v for k, v in model_state(path).items() if k.startswith("f.")}


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: str, what: str, prefix: str = "f.") -> None:
    """module.load_state_dict(state, strict=True), with a one-line UserError naming what does not fit."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    flat = [k for k in shapes if state[k].dim() != expected[k].dim()]
    if flat:  # no other --arch or head size changes how many dimensions a tensor of the same name has
        k = flat[0]
        raise UserError(f"{path}: {prefix}{k} is a {state[k].dim()}-d tensor {tuple(state[k].shape)} where a {what} "
                        f"has a {expected[k].dim()}-d {tuple(expected[k].shape)}; the file is damaged")
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
    except RecursionError:
        raise UserError(f"{path} is not a run config of main.py (its JSON is nested too deeply)") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path} is not a run config of main.py (not a JSON object)")
    return check_run_config(saved, path)


# Keys of NAME_config.json that rebuild a model and find its data, checked like the command line checks them.
CONFIG_FLAGS = ("arch", "stem", "feature_dim", "proj_hidden_dim", "proj_layers", "head", "dataset", "data_root",
                "image_size",
                "cache_dir", "train_subset", "seed")


def check_run_config(saved: dict, path: str) -> dict:
    """The values of a run config that later scripts use, checked against the flag declarations;
    the normalisation must be 3 finite means and 3 positive finite stds (a NaN or a zero would make
    every feature NaN, and the probe would report chance accuracy as if it were a result)."""
    for key in CONFIG_FLAGS:
        if key in saved:
            TRAIN[key].check(saved[key], path)
    for key, low in (("mean", -math.inf), ("std", 0.0)):
        if key not in saved:
            continue
        values = saved[key]
        ok = (isinstance(values, list) and len(values) == 3
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > low
                      for v in values))
        if not ok:
            what = "3 finite numbers" if key == "mean" else "3 positive finite numbers"
            raise UserError(f"{key} in {path} must be {what}, got {values!r}; the file is damaged")
    return saved


def data_location(config: dict, dataset: str | None = None, data_root: str | None = None,
                  image_size: int | None = None) -> dict:
    """load_dataset's name, root, image_size and cache_dir: the flags given over the run config's.

    The config's cache folder holds the decoded images of the config's data folder; another data
    folder (a copy elsewhere, the full set instead of a subset) keeps its own cache.
    """
    refuse_unlabeled_run(config, dataset, data_root)
    name, root = dataset or config["dataset"], data_root or config["data_root"]
    same = name == config["dataset"] and os.path.abspath(root) == os.path.abspath(config["data_root"])
    return dict(name=name, root=root, image_size=image_size or config["image_size"],
                cache_dir=config.get("cache_dir") if same else None)


def refuse_unlabeled_run(saved: dict, dataset: str | None, data_root: str | None) -> None:
    """Refuse to evaluate a run of an unlabeled-only folder on its own data: it has no classes to score."""
    if saved.get("num_classes") == 0 and dataset is None and data_root is None:
        raise UserError(f"the run trained on unlabeled images only ({saved.get('data_root')}/unlabeled/), which "
                        f"have no classes: pass --data_root a folder with train/<class>/ and test/<class>/")


HEAD_KEYS = ("feature_dim", "proj_hidden_dim", "proj_layers")


def head_sizes(saved: dict, source: str) -> tuple[int, int, int]:
    """(feature_dim, proj_hidden_dim, proj_layers) of a run config, checked as main.py checks them; main.py's
    defaults where it names none (a config written before --proj_layers means the 2-layer head)."""
    settings = run_settings(saved)
    sizes = tuple(TRAIN[key].check(settings[key], source) for key in HEAD_KEYS)
    if sizes[1] is None:  # main.py writes the width it built, never the 'encoder's width' it was asked for
        raise UserError(f"proj_hidden_dim in {source} is null, not the width of a head; the file is damaged")
    return sizes


def model_from_config(saved: dict, source: str, arch: str | None = None, stem: str | None = None) -> SimCLR:
    """A randomly initialised SimCLR model of a run config's encoder and head; arch and stem (not None) stand in
    for the config's."""
    settings = run_settings(saved)
    arch = arch if arch is not None else saved.get("arch")
    stem = stem if stem is not None else settings["stem"]
    if arch not in ARCHS or stem not in STEMS:
        raise UserError(f"{source} has arch {arch!r} and stem {stem!r}, not a model of this project")
    feature_dim, hidden, layers = head_sizes(saved, source)
    # the config says which last layer the head has: a config without `head` (older runs) means the original's
    head = TRAIN["head"].check(settings["head"], source)
    # and the modules of the config's method (nnclr: its predictor), so NAME_model.pth loads strictly
    model = SimCLR(arch, feature_dim=feature_dim, proj_hidden_dim=hidden, stem=stem, proj_layers=layers, head=head)
    try:
        return attach_modules(model, {**settings, "feature_dim": feature_dim})
    except (ValueError, TypeError) as e:
        raise UserError(f"{source} names no method of this project ({first_line(e)[:120]})") from None


def describe_model(model: SimCLR, stem: str) -> str:
    """'resnet18 (cifar stem) SimCLR model with head 512-128-64', for messages (SimCLRv2's last layer: '(v2)')."""
    widths = [model.feature_width] + [m.out_features for m in model.g if isinstance(m, nn.Linear)]
    v2 = " (v2)" if isinstance(model.g[-1], nn.BatchNorm1d) else ""
    return f"{model.arch} ({stem} stem) SimCLR model with head {'-'.join(map(str, widths))}{v2}"


def open_run(weights: str, config_path: str | None = None, arch: str | None = None, stem: str | None = None,
             saved: dict | None = None, needs: tuple[str, ...] = (), encoder_only: bool = False) -> tuple[SimCLR, dict]:
    """The SimCLR model of a run of main.py, in eval mode, and the run config it was rebuilt from.

    The config is `saved` when the caller has read it already, else config_path, else the
    NAME_config.json beside the weights; `needs` are keys it must hold (the caller goes on to use
    them). arch and stem (not None) stand in for the config's; the head sizes always come from the
    config (main.py's defaults where it names none). Every tensor of `weights` (weights_only=True)
    must fit the model exactly: encoder and head, or with encoder_only the encoder's alone (the
    head keeps its initialisation: for callers that use only h). Every bad input is a one-line UserError.
    """
    if saved is None and config_path is None and not os.path.isfile(config_path_for(weights)):
        saved = original_run_config(weights)
        if saved is None:
            raise UserError(f"no run config {config_path_for(weights)} beside {weights}: it says which model the "
                            f"weights fit")
    if saved is None:
        saved = read_run_config(config_path or config_path_for(weights))
    source = config_path or "the run config"
    missing = [key for key in needs if key not in saved]
    if missing:
        raise UserError(f"{source} lacks {', '.join(missing)}: pass the NAME_config.json written by main.py")
    model = model_from_config(saved, source=source, arch=arch, stem=stem)
    stem = stem if stem is not None else run_settings(saved)["stem"]
    if encoder_only:
        load_strict(model.f, state=encoder_state(weights), path=weights, what=f"{model.arch} ({stem} stem) encoder")
    else:
        load_strict(model, state=model_state(weights), path=weights, what=describe_model(model, stem), prefix="")
    return model.eval(), saved


# ----------------------------------------------------------------------------- what an evaluation reads and writes

@dataclass(frozen=True)
class Encoder:
    """What the encoder is and where its data is: the saved run config with the flags applied."""
    arch: str
    stem: str
    dataset: str
    data_root: str
    image_size: int | None
    cache_dir: str | None
    mean: tuple[float, float, float] | None  # normalisation the encoder was trained with (None: the data set's)
    std: tuple[float, float, float] | None


def find_run_config(model_path: str | None, config: str | None, arch: str | None, dataset: str | None) -> dict:
    """The run config an evaluation starts from: --config, else NAME_config.json beside --model_path;
    {} when there is none and the flags name the arch and data set themselves."""
    path = config
    if path is None and model_path is not None:
        path = config_path_for(model_path)
        if not os.path.isfile(path):
            original = original_run_config(model_path) if os.path.isfile(model_path) else None
            if original is not None:
                return original
            if arch is not None and dataset is not None:
                return {}
            raise UserError(f"no run config {path} next to the weights: pass --config, or --arch and --dataset "
                            f"(and --data_root, --image_size, --stem as trained)")
    if path is None:
        if arch is None or dataset is None:
            raise UserError("--untrained without --model_path needs --config, or --arch and --dataset")
        return {}
    return read_run_config(path)


def resolve_encoder(saved: dict, arch: str | None = None, stem: str | None = None, dataset: str | None = None,
                    data_root: str | None = None, image_size: int | None = None,
                    cache_dir: str | None = None) -> Encoder:
    """Flags (not None) over the saved run config; the training normalisation is kept only for the same
    data. An unknown data set name is left to data.load_dataset, which refuses it before any file is written."""
    def pick(key: str, flag, default=None):
        return flag if flag is not None else saved.get(key, default)

    refuse_unlabeled_run(saved, dataset, data_root)
    arch, dataset, stem = pick("arch", arch), pick("dataset", dataset), pick("stem", stem, "cifar")
    if arch is None or dataset is None:
        raise UserError("the run config names no arch or dataset: pass --arch and --dataset")
    if arch not in ARCHS or stem not in STEMS or not isinstance(dataset, str):
        raise UserError(f"the run config has arch {arch!r}, stem {stem!r}, dataset {dataset!r}; "
                        f"override them with --arch, --stem, --dataset")
    # the original tool's weights carry no data folder: its normalisation holds for CIFAR-10 wherever it is
    same_data = dataset == saved.get("dataset") and (data_root in (None, saved.get("data_root"))
                                                     or saved.get("original_tool") is True)
    mean, std = saved.get("mean"), saved.get("std")
    usable = same_data and isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3
    # the run's cache folder holds the run's data folder; another data folder keeps its own cache
    cache_dir = cache_dir if cache_dir is not None else saved.get("cache_dir") if same_data else None
    return Encoder(arch=arch, stem=stem, dataset=dataset, data_root=pick("data_root", data_root, "data"),
                   image_size=pick("image_size", image_size), cache_dir=cache_dir,
                   mean=tuple(float(v) for v in mean) if usable else None,
                   std=tuple(float(v) for v in std) if usable else None)


def evaluated_name(name: str | None, model_path: str | None, config: str | None, untrained: bool,
                   enc: Encoder) -> str:
    """--name, else NAME of NAME_model.pth (NAME_last for NAME_last.pth); '_untrained' added for the baseline."""
    if name is not None:
        return name
    if model_path is not None:
        name = run_name(model_path, ("_model.pth",))
    elif config is not None:
        name = run_name(config, ("_config.json",))
    else:
        name = f"{enc.dataset}_{enc.arch}"
    return f"{name}_untrained" if untrained else name


def evaluation_dir(results_dir: str | None, model_path: str | None, config: str | None) -> str:
    """--results_dir, else the folder of the weights (or of the config), else results."""
    if results_dir is not None:
        return results_dir
    source = model_path if model_path is not None else config
    return (os.path.dirname(source) or ".") if source is not None else "results"


def source_id(model_path: str | None, config: str | None, untrained: bool) -> str:
    """Which encoder a set of output files belongs to: the weights' absolute path, or the untrained baseline."""
    where = os.path.abspath(model_path or config or "")
    return f"untrained:{where}" if untrained else where


def check_not_taken(paths: dict[str, str], source: str, what: str, overwrite: bool, continue_hint: str = "") -> None:
    """Refuse to write over the files of an earlier `what` (paths["config.json"] says of which weights) unless
    --overwrite: an evaluation's files are never replaced without being asked to (continue_hint: how to
    continue it, where it can be)."""
    if overwrite:
        return
    try:
        with open(paths["config.json"]) as f:
            previous = json.load(f).get("source")
    except (OSError, ValueError, AttributeError, RecursionError):
        previous = None
    if previous == source:
        refuse_to_replace(paths.values(), f"the {what} of these same weights", continue_hint)
    else:  # another checkpoint's: nothing to continue
        refuse_to_replace(paths.values(), f"the {what} of {previous if isinstance(previous, str) else 'other weights'}")


# ----------------------------------------------------------------------------- writing

def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """module.state_dict() with every tensor on the CPU (a GPU tensor in a file needs that GPU to load)."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _to_cpu(obj):
    """Tensors anywhere inside dicts, lists and tuples moved to the CPU (an optimizer's state_dict)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_weights(module: nn.Module, path: str) -> None:
    """NAME_model.pth: the plain state_dict, CPU tensors, loadable with torch.load(path, weights_only=True)."""
    atomic_save(cpu_state_dict(module), path)


def rng_state() -> dict:
    """Every global generator's state, as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Inverse of rng_state (missing parts are left as they are)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state(("MT19937", s["key"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(path: str, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                             scaler: torch.amp.GradScaler | None, config: dict, epoch: int,
                             step: int, loss_sum: float, seconds: float, best_acc: float, history: list,
                             extra: dict | None = None) -> None:
    """NAME_last.pth: everything --resume needs to continue exactly (epoch = completed epochs); extra: more
    entries a script needs (plain values and tensors only). The learning rate is a pure function of the
    global step and the config (optim.Schedule), so the checkpoint holds no scheduler state."""
    atomic_save({
        "model": cpu_state_dict(model), "optimizer": _to_cpu(optimizer.state_dict()),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "epoch": epoch, "step_in_epoch": step, "epoch_loss_sum": loss_sum, "epoch_seconds": seconds,
        "best_acc": best_acc, "history": list(history), "rng": rng_state(), "config": dict(config),
        **_to_cpu(extra or {}),
    }, path)


def load_training_checkpoint(path: str) -> dict:
    """A NAME_last.pth checkpoint, loaded without running code (weights_only), its parts checked.

    Missing optional parts of older checkpoints get their neutral values; a part of the wrong kind
    is one UserError naming it."""
    ckpt = load_untrusted(path, "--resume")
    if not is_training_checkpoint(ckpt) or not {"config", "epoch"} <= set(ckpt):
        raise UserError(f"--resume {path} is not a NAME_last.pth training checkpoint of this project")

    def bad(part: str, what: str) -> UserError:
        return UserError(f"--resume {path}: its {part} entry is not {what}; the file is damaged or not from main.py")

    check_weights(ckpt, f"--resume {path}")
    if not isinstance(ckpt["config"], dict):
        raise bad("config", "a dict of flags")
    optimizer = ckpt["optimizer"]
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        raise bad("optimizer", "an optimizer state_dict")
    defaults = {"step_in_epoch": 0, "epoch_loss_sum": 0.0, "epoch_seconds": 0.0, "best_acc": -1.0, "history": [],
                "rng": {}, "scaler": {}}
    ckpt = {**defaults, **ckpt}
    for part in ("epoch", "step_in_epoch"):
        if isinstance(ckpt[part], bool) or not isinstance(ckpt[part], int) or ckpt[part] < 0:
            raise bad(part, "a whole number >= 0")
    for part in ("epoch_loss_sum", "epoch_seconds", "best_acc"):
        value = ckpt[part]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(part, "a finite number")
    history = ckpt["history"]
    if not isinstance(history, list) or not all(isinstance(row, dict) and isinstance(row.get("epoch"), int)
                                                and not isinstance(row.get("epoch"), bool) for row in history):
        raise bad("history", "a list of CSV rows with whole-number epochs")
    for part in ("rng", "scaler"):
        if not isinstance(ckpt[part], dict):
            raise bad(part, "a dict")
    return ckpt
