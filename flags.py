"""Every command-line flag, declared once: name, default, type, bounds, help and its role in a run.

From these declarations come each script's parser, the recipes' checks, main.py's frozen
`TrainConfig`, what `--resume` compares, and the validation of configs read back from files
(NAME_config.json, NAME_last.pth), so a value is judged the same way wherever it comes from.

Roles (main.py):
    run      defines what a run computes; a resumed run refuses to change it
    plan     how the run goes on (epochs, evaluation, files); kept on resume unless given again
    machine  speed settings for the machine at hand; chosen afresh at every start
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable

from cli import OneLineParser, UserError
from data import DATASETS, DEFAULT_IMAGE_SIZE
from engine import PRECISIONS, usable_cores
from model import ARCHS, BN_STATS, STEMS
from optim import LR_SCALINGS, OPTIMIZERS, SCHEDULES

AUG_BACKENDS = ("tensor", "pil")

# Bounds that every numeric flag shares: far beyond any sensible run, inside what float32 and
# memory can hold, so that an absurd value is refused with its bound instead of a traceback later.
BIG = 2 ** 31 - 1
MAX_IMAGE_SIZE = 1024   # a 1024x1024 image is 3 MiB as uint8; a data set of them would not fit a cache
MAX_LR = 1e4            # float32 holds up to 3.4e38, but no optimizer here converges with lr above 1e4
MAX_THREADS = 1024


@dataclass(frozen=True)
class Flag:
    """One flag: `--name`, its default, type and bounds, help text, and role in a run."""
    name: str
    default: Any
    help: str
    type: type | None = None           # int, float or str; None for an on/off flag
    choices: tuple | None = None
    group: str = "run"
    role: str = "plan"                 # run | plan | machine (see the module docstring)
    gt: float | None = None            # value > gt
    ge: float | None = None            # value >= ge
    lt: float | None = None            # value < lt
    le: float | None = None            # value <= le
    optional: bool = False             # None is allowed (means: derived, see help)
    aliases: tuple[str, ...] = ()      # old names, accepted but not shown in --help

    def check(self, value: Any, source: str = "") -> Any:
        """The value if it fits this flag's type and bounds; else a UserError naming flag, value and bound."""
        where = f" in {source}" if source else ""
        if value is None:
            if self.optional:
                return None
            raise UserError(f"--{self.name}{where} must be given (it has no value)")
        if self.type is None:
            if not isinstance(value, bool):
                raise UserError(f"--{self.name}{where} must be true or false, got {value!r}")
            return value
        if self.type is str:
            if not isinstance(value, str):
                raise UserError(f"--{self.name}{where} must be text, got {value!r}")
        elif self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"--{self.name}{where} must be a whole number, got {value!r}")
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"--{self.name}{where} must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise UserError(f"--{self.name}{where} must be a finite number, got {value}")
        if self.choices is not None and value not in self.choices:
            raise UserError(f"--{self.name}{where} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        if self.type in (int, float):
            bounds = [(self.gt, lambda v, b: v > b, ">"), (self.ge, lambda v, b: v >= b, ">="),
                      (self.lt, lambda v, b: v < b, "<"), (self.le, lambda v, b: v <= b, "<=")]
            for bound, ok, sign in bounds:
                if bound is not None and not ok(value, bound):
                    raise UserError(f"--{self.name}{where} must be {self.describe_bounds()}, got {value:g}")
        return value

    def describe_bounds(self) -> str:
        """'positive and <= 1024', for messages and --help."""
        low = ("positive" if self.gt == 0 or (self.type is int and self.ge == 1)
               else f"> {self.gt:g}" if self.gt is not None else f">= {self.ge:g}" if self.ge is not None else None)
        high = f"< {self.lt:g}" if self.lt is not None else f"<= {self.le:g}" if self.le is not None else None
        return " and ".join(part for part in (low, high) if part)


def _flag_type(flag: Flag):
    """argparse type: parses the text, then checks the bounds, so a bad value is one line at parse time."""
    def parse(text: str):
        try:
            value = flag.type(text)
        except ValueError:
            kind = {int: "a whole number", float: "a number"}.get(flag.type, "text")
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
        try:
            return flag.check(value)
        except UserError as e:  # argparse puts "argument --NAME: " in front
            raise argparse.ArgumentTypeError(str(e).split(" ", 1)[1]) from None
    parse.__name__ = flag.type.__name__
    return parse


def build_parser(flags: Iterable[Flag], description: str, epilog: str | None = None,
                 explicit_only: bool = False) -> OneLineParser:
    """A parser for these flags, grouped as declared. explicit_only: unset flags are absent from the
    result (argparse.SUPPRESS), so that recipes and resume can tell explicit flags from defaults."""
    parser = OneLineParser(description=description, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           argument_default=argparse.SUPPRESS if explicit_only else None)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag in flags:
        group = groups.setdefault(flag.group, parser.add_argument_group(flag.group))
        shown = f"{flag.help} (default: {flag.default})".replace("%", "%%")
        if flag.type is not None and flag.describe_bounds():
            shown = shown[:-1] + f"; {flag.describe_bounds()})"
        kwargs = dict(dest=flag.name, help=shown)
        if not explicit_only:
            kwargs["default"] = flag.default
        if flag.type is None:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=_flag_type(flag), choices=flag.choices)
            if flag.choices is not None:
                kwargs["metavar"] = "{" + ",".join(map(str, flag.choices)) + "}"
        group.add_argument(f"--{flag.name}", **kwargs)
        for alias in flag.aliases:  # old names keep working, unlisted
            alias_kwargs = {**kwargs, "help": argparse.SUPPRESS}
            group.add_argument(f"--{alias}", **alias_kwargs)
    return parser


def config_class(name: str, flags: Iterable[Flag], doc: str) -> type:
    """A frozen dataclass with one field per flag (in declaration order)."""
    cls = dataclasses.make_dataclass(name, [(f.name, Any) for f in flags], frozen=True)
    cls.__doc__ = doc
    return cls


def check_values(values: dict, flags: Iterable[Flag], source: str = "") -> dict:
    """Every flag's value checked against its declaration (type, choices, bounds)."""
    return {f.name: f.check(values.get(f.name), source) for f in flags}


def by_name(flags: Iterable[Flag]) -> dict[str, Flag]:
    return {f.name: f for f in flags}


# ----------------------------------------------------------------------------- flags several scripts share

def _shared() -> dict[str, Flag]:
    flags = [
        Flag("model_path", None, "weights of main.py: NAME_model.pth (or a NAME_last.pth checkpoint)", str,
             group="input", optional=True),
        Flag("config", None, "run config JSON; None means NAME_config.json beside --model_path", str,
             group="input", optional=True),
        Flag("arch", "resnet50", "encoder", str, ARCHS, "model and loss", "run"),
        Flag("stem", "cifar", "first layer: cifar (3x3 conv, no max-pool) or imagenet (7x7/2 conv + max-pool)",
             str, STEMS, "model and loss", "run"),
        Flag("dataset", "cifar10", "data set; folder reads DATA_ROOT/train/<class>/* and DATA_ROOT/test/<class>/*",
             str, DATASETS, "data", "run"),
        Flag("data_root", "data", "where the data set is (downloaded to, for torchvision sets)", str, group="data"),
        Flag("image_size", None, "image side; None means the data set's (32; stl10: 96)", int, group="data",
             role="run", ge=8, le=MAX_IMAGE_SIZE, optional=True),
        Flag("cache_dir", None, "folder data: where to keep the decoded-image cache when DATA_ROOT is read-only",
             str, group="data", optional=True),
        Flag("train_subset", None, "use a fixed random subset of N training images (quick runs)", int,
             group="data", role="run", ge=1, le=BIG, optional=True),
        Flag("eval_batch_size", 1024, "images per forward pass when computing features", int, group="speed",
             ge=1, le=2 ** 20, aliases=("feature_batch_size",)),
        Flag("device", "auto", "auto (CUDA if present, else CPU), cpu, cuda or cuda:N", str, group="speed",
             role="machine"),
        Flag("precision", "auto", "network autocast: auto is bf16 on CUDA (fp16 before Ampere) and fp32 on a "
             "CPU; bf16, fp16 or fp32; losses, kNN and similarities stay fp32", str, PRECISIONS, "speed", "machine"),
        Flag("channels_last", True, "channels-last memory format for the network", group="speed", role="machine"),
        Flag("threads", 0, "CPU threads for PyTorch; 0 keeps PyTorch's default (one per core)", int, group="speed",
             role="machine", ge=0, le=MAX_THREADS),
        Flag("workers", min(8, usable_cores()), "DataLoader worker processes of the pil backend", int, group="speed",
             role="machine", ge=0, le=256),
        Flag("seed", 0, "seed of everything random", int, group="run", role="run", ge=0, le=2 ** 63 - 1),
        Flag("results_dir", "results", "where results files go", str, group="run"),
        Flag("name", None, "run name; None means DATASET_ARCH_FEATUREDIM_TEMPERATURE_K_BATCH_EPOCHS", str,
             group="run", optional=True),
        Flag("tensorboard", False, "also write TensorBoard event files (tensorboard --logdir RESULTS_DIR)",
             group="logging"),
        Flag("tensorboard_dir", None, "folder of the TensorBoard event files; None means RESULTS_DIR/NAME_tb",
             str, group="logging", optional=True),
    ]
    return by_name(flags)


SHARED = _shared()


def shared(name: str, **changes) -> Flag:
    """A shared flag, with script-specific changes (default, help, role) where a script needs them."""
    return dataclasses.replace(SHARED[name], **changes)


def check_name(name: str) -> str:
    """A run name must be a plain file name: it becomes the prefix of every results file."""
    if not name or os.sep in name or name.startswith(".") or "\0" in name:
        raise UserError(f"--name {name!r} must be a plain file name (no '/', not starting with '.')")
    return name


# ----------------------------------------------------------------------------- main.py

TRAIN_FLAGS: tuple[Flag, ...] = (
    shared("arch"),
    shared("stem"),
    Flag("feature_dim", 128, "projection output size", int, group="model and loss", role="run", ge=1, le=65536),
    Flag("proj_hidden_dim", 512, "projection head hidden width", int, group="model and loss", role="run",
         ge=1, le=65536),
    Flag("temperature", 0.5, "NT-Xent temperature", float, group="model and loss", role="run", gt=0, le=100),
    Flag("bn_stats", "per_view", "BatchNorm statistics in training: per_view (each view its own, as the seed's two "
         "forward passes) or joint (both views together); the convolutions run once over both views either way",
         str, BN_STATS, "model and loss", "run"),
    Flag("grad_checkpoint", False, "recompute encoder activations in backward: less memory, ~30% slower",
         group="model and loss", role="machine"),

    Flag("k", 200, "neighbours in the weighted kNN", int, group="evaluation", ge=1, le=BIG),
    Flag("knn_temperature", None, "kNN vote weight exp(sim / t); None means --temperature", float,
         group="evaluation", gt=0, le=100, optional=True),
    Flag("knn_every", 1, "evaluate every N epochs (and always after the last)", int, group="evaluation",
         ge=1, le=BIG),
    shared("eval_batch_size", group="evaluation"),
    Flag("knn_at_start", False, "also evaluate the untrained encoder, as an epoch-0 row of the CSV",
         group="evaluation"),

    Flag("recipe", "seed", "preset: seed (Adam 1e-3, constant) or paper (LARS, lr 1.0 x B/256, 10 warm-up "
         "epochs, cosine, head 2048); explicit flags override it", str, ("seed", "paper"), "optimisation", "run"),
    Flag("batch_size", 1024, "images per step (global over all processes); two views each", int,
         group="optimisation", role="run", ge=2, le=2 ** 20),
    Flag("epochs", 500, "training epochs", int, group="optimisation", ge=1, le=10 ** 6),
    Flag("optimizer", "adam", "optimizer", str, OPTIMIZERS, "optimisation", "run"),
    Flag("lr", 1e-3, "learning rate before --lr_scaling", float, group="optimisation", role="run",
         gt=0, le=MAX_LR),
    Flag("lr_scaling", "none", "linear: lr x batch/256; sqrt: lr x sqrt(batch/256)", str, LR_SCALINGS,
         "optimisation", "run"),
    Flag("weight_decay", 1e-6, "weight decay (LARS: not on biases and BatchNorm)", float, group="optimisation",
         role="run", ge=0, le=10),
    Flag("momentum", 0.9, "momentum for sgd and lars", float, group="optimisation", role="run", ge=0, lt=1),
    Flag("warmup_epochs", 0, "linear warm-up epochs", int, group="optimisation", role="run", ge=0, le=10 ** 6),
    Flag("schedule", "constant", "after warm-up: constant or cosine (stepped every batch)", str, SCHEDULES,
         "optimisation", "run"),

    Flag("jitter_strength", 0.5, "colour jitter strength s: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)", float,
         group="augmentation", role="run", ge=0, le=2.5),
    Flag("blur", False, "Gaussian blur with p=0.5 (kernel ~10% of the image, sigma 0.1-2)",
         group="augmentation", role="run"),
    Flag("min_crop_scale", 0.08, "smallest crop area fraction of RandomResizedCrop", float,
         group="augmentation", role="run", gt=0, le=1),
    Flag("aug_backend", "tensor", "tensor: batched on the run's device; pil: torchvision per image in "
         "DataLoader workers (the seed's way, the reference)", str, AUG_BACKENDS, "augmentation", "run"),

    shared("dataset"),
    shared("data_root"),
    shared("image_size"),
    shared("cache_dir"),
    shared("train_subset", help="train on a fixed random subset of N training images (quick runs)"),

    shared("device"),
    shared("precision"),
    shared("channels_last"),
    Flag("compile", False, "torch.compile the model (first steps are slow while it compiles)", group="speed",
         role="machine"),
    shared("threads"),
    shared("workers"),

    shared("seed"),
    shared("results_dir"),
    shared("name"),
    shared("tensorboard"),
    shared("tensorboard_dir"),
    Flag("resume", None, "continue from a NAME_last.pth checkpoint, or 'auto' for this run name's", str,
         group="run", optional=True),
)
TRAIN = by_name(TRAIN_FLAGS)
TRAIN_DEFAULTS = {f.name: f.default for f in TRAIN_FLAGS}
RUN_KEYS = tuple(f.name for f in TRAIN_FLAGS if f.role == "run")
MACHINE_KEYS = tuple(f.name for f in TRAIN_FLAGS if f.role == "machine")

TrainConfig = config_class("TrainConfig", TRAIN_FLAGS, "Every flag of a run, resolved (no 'auto', no None "
                           "that stands for a default) and checked; what NAME_config.json and NAME_last.pth hold.")

# Named presets: applied over the defaults, under flags given explicitly.
RECIPES = {
    "seed": {},
    # SimCLR paper, appendix B.9 (CIFAR-10): LARS, lr 1.0 x batch/256, 10 warm-up epochs, cosine
    "paper": dict(optimizer="lars", lr=1.0, lr_scaling="linear", weight_decay=1e-6, warmup_epochs=10,
                  schedule="cosine", temperature=0.5, jitter_strength=0.5, blur=False, proj_hidden_dim=2048),
}


def default_name(values: dict) -> str:
    """The seed's naming: data set, arch and the five seed flags in the seed's order."""
    return "{dataset}_{arch}_{feature_dim}_{temperature:g}_{k}_{batch_size}_{epochs}".format(**values)


def train_values(explicit: dict) -> dict:
    """The defaults, then the recipe's values, then the explicit flags; name and derived values filled in."""
    recipe = explicit.get("recipe", TRAIN_DEFAULTS["recipe"])
    return derive({**TRAIN_DEFAULTS, **RECIPES[recipe], **explicit})


def derive(values: dict) -> dict:
    """Fill the values that stand for 'derived from the others' (name, image size, kNN temperature)."""
    values = dict(values)
    if values.get("name") is None:
        values["name"] = default_name(values)
    if values.get("image_size") is None and values.get("dataset") in DEFAULT_IMAGE_SIZE:
        values["image_size"] = DEFAULT_IMAGE_SIZE[values["dataset"]]
    if values.get("knn_temperature") is None:
        values["knn_temperature"] = values.get("temperature")
    return values


# Run-defining flags added after checkpoints were first written: the value an older checkpoint, which
# lacks the key, was trained with (not today's default).
LEGACY_VALUES = dict(bn_stats="joint")


def resume_values(explicit: dict, saved: dict, source: str) -> tuple[dict, list[str]]:
    """Flags of a resumed run: what the run computes and its plan from the checkpoint, machine settings
    afresh, explicit flags over both; a UserError when an explicit flag would change what is computed."""
    saved = {**LEGACY_VALUES, **saved}
    saved = check_values(derive({**TRAIN_DEFAULTS, **saved}), [f for f in TRAIN_FLAGS if f.role != "machine"], source)
    machine = {k: TRAIN_DEFAULTS[k] for k in MACHINE_KEYS}
    wanted = derive({**saved, **machine, **explicit})
    changed = [k for k in RUN_KEYS if k in explicit and wanted[k] != saved[k]]
    if changed:
        what = ", ".join(f"--{k} {saved[k]} -> {wanted[k]}" for k in changed)
        raise UserError(f"cannot resume with changed flags that alter the run ({what}); "
                        f"drop them, or start a new run with another --name")
    notes = [f"resume: changed --{k} {saved[k]} -> {wanted[k]}" for k in explicit
             if k not in RUN_KEYS and k not in MACHINE_KEYS and k != "resume" and wanted[k] != saved.get(k)]
    return wanted, notes
