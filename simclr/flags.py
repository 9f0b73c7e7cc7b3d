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
from dataclasses import KW_ONLY, dataclass
from typing import Any, Iterable

from .cli import OneLineParser, UserError
from .encoders import ARCHS, ENCODERS, STEMS

# The choices of the flags, here so that parsing (and --help) never waits for torch to import; the
# modules that act on them (data, engine, model, optim) import them from here.
DATASETS = ("cifar10", "cifar100", "stl10", "folder")
DEFAULT_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "folder": 32}
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OPTIMIZERS = ("adam", "sgd", "lars")
SCHEDULES = ("constant", "cosine")
LR_SCALINGS = ("none", "linear", "sqrt")
BN_STATS = ("per_view", "joint")
LOSSES = ("ntxent", "supcon", "dcl")
TRAIN_METHODS = ("simclr", "nnclr")   # --method (simclr.methods.METHODS)
HEADS = ("original", "v2")   # the projection head's last layer (simclr.model.projection_head)
MAX_PROJ_LAYERS = 8
RECIPE_NAMES = ("seed", "paper", "supcon", "simclrv2")   # the presets of main.py (RECIPES)
# where finetune.py's classifier sits: on h, or after the K-th hidden layer of the projection head
FROM_LAYERS = ("encoder",) + tuple(f"head{k}" for k in range(1, MAX_PROJ_LAYERS))
AUG_BACKENDS = ("tensor", "pil")


def usable_cores() -> int:
    """CPU cores this process may use (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)

# Bounds that every numeric flag shares: far beyond any sensible run, inside what float32 and
# memory can hold, so that an absurd value is refused with its bound instead of a traceback later.
BIG = 2 ** 31 - 1
MAX_IMAGE_SIZE = 1024   # a 1024x1024 image is 3 MiB as uint8; a data set of them would not fit a cache
MAX_LR = 1e4            # float32 holds up to 3.4e38, but no optimizer here converges with lr above 1e4
MAX_THREADS = 1024
# --dcl_sigma: DCLW's weight is a softmax of cos / sigma in float32, with |cos| <= 1 (a rounding more for
# L2-normalised rows). cos / sigma overflows below sigma = 1 / 3.4e38 = 2^-128, and a sigma below 2^-126,
# the smallest normal float32, is subnormal: a device that flushes subnormals to zero divides by 0 (NaN).
# From 2^-126 on, |cos| / sigma <= (1 + 2^-23) 2^126 stays 4x below float32's largest value on any device.
MIN_DCL_SIGMA = 2.0 ** -126


@dataclass(frozen=True)
class Flag:
    """One flag: `--name`, its default, type and bounds, help text, and role in a run."""
    name: str
    default: Any
    help: str
    _: KW_ONLY                         # everything after the help text is named at the call
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
    repeat: bool = False               # may be given several times; the values are collected in a list
    loss: str | None = None            # a setting of this --loss alone (simclr.loss builds it from the flag)
    method: str | None = None          # a setting of this --method alone (its file in simclr/methods reads it)

    @property
    def owner(self) -> str | None:
        """The --method whose setting this is (a loss's settings are simclr's), None for every method's."""
        return "simclr" if self.loss is not None else self.method

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
                    raise UserError(f"--{self.name}{where} must be {self.describe_bounds()}, got {exact(value)}")
        return value

    def describe_bounds(self) -> str:
        """'positive and <= 1024', for messages and --help."""
        low = ("positive" if self.gt == 0 or (self.type is int and self.ge == 1)
               else f"> {exact(self.gt)}" if self.gt is not None else f">= {exact(self.ge)}" if self.ge is not None
               else None)
        high = f"< {exact(self.lt)}" if self.lt is not None else f"<= {exact(self.le)}" if self.le is not None else None
        return " and ".join(part for part in (low, high) if part)


def exact(number: float) -> str:
    """A number for a message: an integer in full (2**63 - 1, not 9.22337e+18), a float short where that is exact."""
    if isinstance(number, int):
        return str(number)
    short = f"{number:g}"
    return short if float(short) == number else repr(number)


_KINDS = {int: "a whole number", float: "a number"}
TRUE_WORDS, FALSE_WORDS = ("true", "on", "yes", "1"), ("false", "off", "no", "0")


def parse_text(flag: Flag, text: str, source: str = "") -> Any:
    """A flag's value written as text (a sweep's grid value) -> the value, judged as the script's parser
    and Flag.check judge it; on/off flags take true/false, optional flags `none` (the flag left out)."""
    where = f" in {source}" if source else ""
    if flag.type is None:
        word = text.strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise UserError(f"--{flag.name}{where} is an on/off flag: write true or false, got {text!r}")
    if flag.optional and text.strip().lower() == "none":
        return None
    try:
        value = flag.type(text)
    except ValueError:
        raise UserError(f"--{flag.name}{where} must be {_KINDS.get(flag.type, 'text')}, got {text!r}") from None
    return flag.check(value, source)


def _flag_type(flag: Flag):
    """argparse type: parses the text, then checks the bounds, so a bad value is one line at parse time."""
    def parse(text: str):
        try:
            value = flag.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {_KINDS.get(flag.type, 'text')}, got {text!r}") from None
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
            if flag.repeat:
                kwargs["action"] = "append"
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
        Flag("model_path", None, "weights of main.py: NAME_model.pth (or a NAME_last.pth checkpoint)", type=str,
             group="input", optional=True),
        Flag("config", None, "run config JSON; None means NAME_config.json beside --model_path", type=str,
             group="input", optional=True),
        Flag("arch", "resnet50", "encoder", type=str, choices=ARCHS, group="model and loss", role="run"),
        Flag("stem", "cifar", "first layer: cifar (3x3 conv, no max-pool) or imagenet (7x7/2 conv + max-pool)",
             type=str, choices=STEMS, group="model and loss", role="run"),
        Flag("dataset", "cifar10", "data set; folder reads DATA_ROOT/train/<class>/* and DATA_ROOT/test/<class>/*, "
             "and images without classes at any depth of DATA_ROOT/unlabeled/",
             type=str, choices=DATASETS, group="data", role="run"),
        Flag("data_root", "data", "where the data set is (downloaded to, for torchvision sets)", type=str,
             group="data"),
        Flag("image_size", None, "image side; None means the data set's (32; stl10: 96)", type=int, group="data",
             role="run", ge=8, le=MAX_IMAGE_SIZE, optional=True),
        Flag("cache_dir", None, "folder data: where to keep the decoded-image cache when DATA_ROOT is read-only",
             type=str, group="data", optional=True),
        Flag("train_subset", None, "use a fixed random subset of N training images (quick runs)", type=int,
             group="data", role="run", ge=1, le=BIG, optional=True),
        Flag("eval_batch_size", 1024, "images per forward pass when computing features", type=int, group="speed",
             ge=1, le=2 ** 20, aliases=("feature_batch_size",)),
        Flag("device", "auto", "auto (CUDA if present, else CPU), cpu, cuda or cuda:N", type=str, group="speed",
             role="machine"),
        Flag("precision", "auto", "network autocast: auto is bf16 on CUDA (fp16 before Ampere), bf16 on a CPU with "
             "native bf16 (AVX512-BF16 or AMX, unless ONEDNN_MAX_CPU_ISA caps oneDNN below them), else fp32; bf16, fp16 "
             "or fp32; losses, kNN and similarities stay fp32",
             type=str, choices=PRECISIONS, group="speed", role="machine"),
        Flag("channels_last", True, "channels-last memory format for the network", group="speed", role="machine"),
        Flag("threads", 0, "CPU threads for PyTorch; 0 keeps PyTorch's default (one per core)", type=int, group="speed",
             role="machine", ge=0, le=MAX_THREADS),
        Flag("workers", min(8, usable_cores()), "DataLoader worker processes of the pil backend", type=int,
             group="speed",
             role="machine", ge=0, le=256),
        Flag("seed", 0, "seed of everything random", type=int, group="run", role="run", ge=0, le=2 ** 63 - 1),
        Flag("results_dir", "results", "where results files go", type=str, group="run"),
        Flag("name", None, "run name; None means DATASET_ARCH_FEATUREDIM_TEMPERATURE_K_BATCH_EPOCHS", type=str,
             group="run", optional=True),
        Flag("tensorboard", False, "also write TensorBoard event files (tensorboard --logdir RESULTS_DIR)",
             group="logging"),
        Flag("tensorboard_dir", None, "folder of the TensorBoard event files; None means RESULTS_DIR/NAME_tb",
             type=str, group="logging", optional=True),
        # taken afresh at every start (role machine): replacing a run's files is a decision of this command only
        Flag("overwrite", False, "replace the files of an earlier run of the same name (without it, a run whose "
             "files exist is refused)", group="run", role="machine"),
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
    Flag("feature_dim", 128, "projection output size", type=int, group="model and loss", role="run", ge=1, le=65536),
    Flag("proj_hidden_dim", 512, "projection head hidden width; None means the encoder's width (SimCLRv2's, "
         "--recipe simclrv2: 512 for ResNet-18, 2048 for ResNet-50)", type=int, group="model and loss", role="run",
         ge=1, le=65536, optional=True),
    Flag("proj_layers", 2, "Linear layers of the projection head, with BatchNorm and ReLU between them "
         "(2: the original tool's head; 3: SimCLRv2's depth)", type=int, group="model and loss", role="run", ge=1,
         le=MAX_PROJ_LAYERS),
    Flag("head", "original", "the projection head's last layer: original (Linear with a bias, the original "
         "tool's) or v2 (SimCLRv2's: Linear without a bias, then BatchNorm1d with a scale and no shift); the "
         "hidden layers are the same", type=str, choices=HEADS, group="model and loss", role="run"),
    Flag("method", "simclr", "simclr (SimCLR and its family: the loss of --loss); nnclr (Dwibedi et al. 2021: each "
         "view's positive is its projection's nearest neighbour in a support queue of earlier projections, "
         "against a prediction head's output for the other view)", type=str, choices=TRAIN_METHODS,
         group="model and loss", role="run"),
    Flag("queue_size", 65536, "nnclr: projections in the support queue; 65,536 as solo-learn's CIFAR setting "
         "(the paper's 98,304 is for ImageNet's batch of 4,096); the neighbours are looked up in its filled slots",
         type=int, group="model and loss", role="run", ge=1, le=2 ** 22, method="nnclr"),
    Flag("pred_hidden_dim", 4096, "nnclr: hidden width of the prediction head on z (Linear, BatchNorm, ReLU, "
         "Linear), the paper's 4,096", type=int, group="model and loss", role="run", ge=1, le=65536, method="nnclr"),
    Flag("loss", "ntxent", "ntxent (SimCLR); supcon (supervised contrastive, Khosla et al. 2020: views of the same "
         "label are positives, an unlabeled image's only positive is its other view); dcl (decoupled "
         "contrastive, Yeh et al. 2022: the positive is left out of the denominator)", type=str, choices=LOSSES,
         group="model and loss", role="run", method="simclr"),
    Flag("dcl_sigma", None, "dcl: weight each positive term as DCLW does, 2 - N softmax(sim / sigma) over the "
         "batch's pairs (a coefficient: no gradient through it); None means plain DCL; from 2^-126 on, the "
         "smallest normal float32, the weight is finite", type=float, group="model and loss", role="run",
         ge=MIN_DCL_SIGMA, le=100, optional=True, loss="dcl"),
    Flag("supcon_base_temperature", None, "supcon: scale the loss by --temperature / this, as SupContrast does "
         "(its base_temperature, 0.07: x1.43 at temperature 0.1); None means no scale", type=float,
         group="model and loss", role="run", gt=0, le=100, optional=True, loss="supcon"),
    Flag("temperature", 0.5, "temperature of the loss", type=float, group="model and loss", role="run", gt=0, le=100),
    Flag("bn_stats", "per_view", "BatchNorm statistics in training: per_view (each view its own, as the original tool's two "
         "forward passes) or joint (both views together); see --view_passes for how the network runs over them",
         type=str, choices=BN_STATS, group="model and loss", role="run"),
    Flag("grad_checkpoint", False, "recompute encoder activations in backward: less memory, ~30% slower",
         group="model and loss", role="machine"),

    Flag("k", 200, "neighbours in the weighted kNN", type=int, group="evaluation", ge=1, le=BIG),
    Flag("knn_temperature", None, "kNN vote weight exp(sim / t); None means --temperature", type=float,
         group="evaluation", gt=0, le=100, optional=True),
    Flag("knn_every", 1, "evaluate every N epochs (and always after the last)", type=int, group="evaluation",
         ge=1, le=BIG),
    shared("eval_batch_size", group="evaluation"),
    Flag("knn_at_start", False, "also evaluate the untrained encoder, as an epoch-0 row of the CSV",
         group="evaluation"),
    Flag("online_probe", True, "train a linear classifier (its own Adam, lr 1e-3) on the detached encoder features "
         "of the labeled images of every step and report its test top-1/top-5 at each evaluation; never changes "
         "the encoder; off when the training images have no labels", group="evaluation", role="run"),

    Flag("recipe", "seed", "preset: seed (the original tool's: Adam 1e-3, constant), paper (LARS, lr 1.0 x B/256, "
         "10 warm-up epochs, cosine, head 2048), supcon (SupContrast's CIFAR recipe) or simclrv2 (paper + a "
         "3-layer head); explicit flags override it (README: recipes)", type=str, choices=RECIPE_NAMES,
         group="optimisation", role="run"),
    Flag("batch_size", 1024, "images per step (global over all processes); two views each", type=int,
         group="optimisation", role="run", ge=2, le=2 ** 20),
    Flag("epochs", 500, "training epochs", type=int, group="optimisation", ge=1, le=10 ** 6),
    Flag("optimizer", "adam", "optimizer", type=str, choices=OPTIMIZERS, group="optimisation", role="run"),
    Flag("lr", 1e-3, "learning rate before --lr_scaling", type=float, group="optimisation", role="run",
         gt=0, le=MAX_LR),
    Flag("lr_scaling", "none", "linear: lr x batch/256; sqrt: lr x sqrt(batch/256)", type=str, choices=LR_SCALINGS,
         group="optimisation", role="run"),
    Flag("weight_decay", 1e-6, "weight decay (LARS: not on biases and BatchNorm)", type=float, group="optimisation",
         role="run", ge=0, le=10),
    Flag("momentum", 0.9, "momentum for sgd and lars", type=float, group="optimisation", role="run", ge=0, lt=1),
    Flag("warmup_epochs", 0, "linear warm-up epochs", type=int, group="optimisation", role="run", ge=0, le=10 ** 6),
    Flag("schedule", "constant", "after warm-up: constant or cosine (stepped every batch)", type=str, choices=SCHEDULES,
         group="optimisation", role="run"),

    Flag("jitter_strength", 0.5, "colour jitter strength s: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)", type=float,
         group="augmentation", role="run", ge=0, le=2.5),
    Flag("blur", False, "Gaussian blur with p=0.5 (kernel ~10% of the image, sigma 0.1-2)",
         group="augmentation", role="run"),
    Flag("min_crop_scale", 0.08, "smallest crop area fraction of RandomResizedCrop", type=float,
         group="augmentation", role="run", gt=0, le=1),
    Flag("aug_backend", "tensor", "tensor: batched on the run's device; pil: torchvision per image in "
         "DataLoader workers (the original tool's way, the reference)", type=str, choices=AUG_BACKENDS,
         group="augmentation", role="run"),

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
    Flag("view_passes", 0, "forward passes of a step over its two views: 1 (both views as one batch) or 2 (a view a "
         "pass: half the batch, which fits a CPU's caches; with --bn_stats per_view the same arithmetic, rounding "
         "aside); 0 means auto: 2 on a CPU with --bn_stats per_view outside torchrun, else 1 (docs/speed.md)",
         type=int, group="speed", role="machine", ge=0, le=2),
    shared("threads"),
    shared("workers"),

    shared("seed"),
    shared("results_dir"),
    shared("name"),
    shared("tensorboard"),
    shared("tensorboard_dir"),
    Flag("resume", None, "continue from a NAME_last.pth checkpoint, or 'auto' for this run name's", type=str,
         group="run", optional=True),
    shared("overwrite"),
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
    # SupContrast's CIFAR command (HobbitLong/SupContrast README: --batch_size 1024 --learning_rate 0.5
    # --temp 0.1 --cosine --warm) with main_supcon.py's defaults (SGD, momentum 0.9, weight decay 1e-4,
    # 1000 epochs, 10 warm-up epochs), its head width (2048 = ResNet-50's h) and its loss's scale
    # temperature / base_temperature (SupConLoss's base_temperature 0.07)
    "supcon": dict(loss="supcon", batch_size=1024, optimizer="sgd", lr=0.5, lr_scaling="none", momentum=0.9,
                   weight_decay=1e-4, warmup_epochs=10, schedule="cosine", epochs=1000, temperature=0.1,
                   supcon_base_temperature=0.07, proj_hidden_dim=2048),
    # SimCLRv2 (Chen et al. 2020b) at CIFAR scale: its projection head (google-research/simclr tf2: 3 layers,
    # hidden ones as wide as h, the last Linear without bias + BatchNorm without shift; fine-tune from its
    # first layer: finetune.py --from_layer head1) over the paper recipe's CIFAR settings
    "simclrv2": dict(optimizer="lars", lr=1.0, lr_scaling="linear", weight_decay=1e-6, warmup_epochs=10,
                     schedule="cosine", temperature=0.5, jitter_strength=0.5, blur=False, proj_hidden_dim=None,
                     proj_layers=3, head="v2"),
}


def default_name(values: dict) -> str:
    """The original tool's naming: data set, arch and its five flags in its order."""
    return "{dataset}_{arch}_{feature_dim}_{temperature:g}_{k}_{batch_size}_{epochs}".format(**values)


def train_values(explicit: dict) -> dict:
    """The defaults, then the recipe's values, then the explicit flags; name and derived values filled in.

    A setting of another method or loss than the run's is refused when given (a resumed run's are the
    checkpoint's: train_resume_values checks it) and dropped when a recipe gave it."""
    recipe = explicit.get("recipe", TRAIN_DEFAULTS["recipe"])
    values = {**TRAIN_DEFAULTS, **RECIPES[recipe], **explicit}
    if explicit.get("resume") is None:
        check_loss_flags(explicit, values["loss"], values["method"])
    values.update({f.name: f.default for f in TRAIN_FLAGS
                   if not belongs(f, values["loss"], values["method"]) and f.name not in explicit})
    return derive(values)


def belongs(flag: Flag, loss: str, method: str) -> bool:
    """Whether flag is read by a run of this method and loss (a loss's settings only by simclr's runs of it)."""
    return flag.owner in (None, method) and (method != "simclr" or flag.loss in (None, loss))


def check_loss_flags(explicit: dict, loss: str, method: str = "simclr") -> None:
    """Refuse an explicit flag that is a setting of another method or loss than the run's: it would be stored
    and never used."""
    for flag in TRAIN_FLAGS:
        if flag.name not in explicit or belongs(flag, loss, method):
            continue
        if flag.owner != method:
            raise UserError(f"--{flag.name} is a setting of --method {flag.owner}, and this run's method is "
                            f"{method}; drop it, or pass --method {flag.owner}")
        raise UserError(f"--{flag.name} is a setting of --loss {flag.loss}, and this run's loss is {loss}; "
                        f"drop it, or pass --loss {flag.loss}")


def derive(values: dict) -> dict:
    """Fill the values that stand for 'derived from the others' (name, image size, kNN temperature, head width)."""
    values = dict(values)
    if values.get("proj_hidden_dim") is None and values.get("arch") in ENCODERS:
        values["proj_hidden_dim"] = ENCODERS[values["arch"]].width
    if values.get("name") is None:
        values["name"] = default_name(values)
    if values.get("image_size") is None and values.get("dataset") in DEFAULT_IMAGE_SIZE:
        values["image_size"] = DEFAULT_IMAGE_SIZE[values["dataset"]]
    if values.get("knn_temperature") is None:
        values["knn_temperature"] = values.get("temperature")
    return values


# Run-defining flags added after checkpoints were first written: the value an older checkpoint, which
# lacks the key, was trained with (not today's default). The one place that knows the project's older
# files: every reader of a run config goes through run_settings, resume through train_resume_values.
LEGACY_VALUES = dict(bn_stats="joint", loss="ntxent", proj_layers=2, online_probe=False, method="simclr",
                     head="original", stem="cifar")


def run_settings(saved: dict) -> dict:
    """A run config with what an older one lacks filled in: as it was trained (LEGACY_VALUES), else the default."""
    return {**TRAIN_DEFAULTS, **LEGACY_VALUES, **saved}


def resume_values(flags: Iterable[Flag], explicit: dict, saved: dict, source: str,
                  derive_values=lambda values: dict(values), legacy: dict | None = None) -> tuple[dict, list[str]]:
    """Flags of a resumed run (main.py's or finetune.py's): what the run computes and its plan from the
    checkpoint's config, machine settings afresh, explicit flags over both; a UserError when an explicit
    flag would change what is computed. derive_values fills derived values (main.py: derive); legacy:
    the values of run flags that checkpoints written before the flag existed were trained with."""
    flags = tuple(flags)
    defaults = {f.name: f.default for f in flags}
    run_keys = [f.name for f in flags if f.role == "run"]
    machine_keys = [f.name for f in flags if f.role == "machine"]
    saved = {**(legacy or {}), **saved}
    saved = check_values(derive_values({**defaults, **saved}), [f for f in flags if f.role != "machine"], source)
    wanted = derive_values({**saved, **{k: defaults[k] for k in machine_keys}, **explicit})
    changed = [k for k in run_keys if k in explicit and wanted[k] != saved[k]]
    if changed:
        what = ", ".join(f"--{k} {saved[k]} -> {wanted[k]}" for k in changed)
        raise UserError(f"cannot resume with changed flags that alter the run ({what}); "
                        f"drop them, or start a new run with another --name")
    notes = [f"resume: changed --{k} {saved[k]} -> {wanted[k]}" for k in explicit
             if k not in run_keys and k not in machine_keys and k != "resume" and wanted[k] != saved.get(k)]
    return wanted, notes


def train_resume_values(explicit: dict, saved: dict, source: str) -> tuple[dict, list[str]]:
    """resume_values of main.py: its flags, derived values filled in, older checkpoints' LEGACY_VALUES; a setting
    of another loss than the run's is refused when given (one the checkpoint holds beside another loss, as
    older versions stored it, is kept and never used)."""
    run = {**run_settings(saved), **explicit}
    check_loss_flags(explicit, run.get("loss"), run.get("method"))
    return resume_values(TRAIN_FLAGS, explicit=explicit, saved=saved, source=source, derive_values=derive,
                         legacy=LEGACY_VALUES)


# ----------------------------------------------------------------------------- linear.py and finetune.py

def evaluation_files(suffix: str, tag: str, when: str = "") -> tuple[Flag, ...]:
    """--results_dir, --name, --tensorboard, --tensorboard_dir of a script that writes NAME_SUFFIX_* files
    beside the weights it evaluates, logging TAG/COLUMN."""
    return (
        shared("results_dir", default=None, optional=True,
               help="where the files go; None means the folder of --model_path (or of --config, else results)"),
        shared("name", help=f"file prefix before _{suffix}; None means NAME of NAME_model.pth (+ _untrained)"),
        shared("tensorboard", help=f"also write TensorBoard event files, tags {tag}/COLUMN of the CSV{when}"),
        shared("tensorboard_dir", help=f"folder of the TensorBoard event files; None means RESULTS/NAME_{suffix}_tb"),
        shared("overwrite", help=f"replace the NAME_{suffix}_* files of an earlier evaluation (without it, "
               f"existing ones are refused)"),
    )


FROM_CONFIG = "None means the run config's"
# Default learning rate per optimizer: SGD on standardised features tolerates a large step
# (the loss is convex); Adam's usual 1e-3 is its robust default.
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3}

LINEAR_FLAGS: tuple[Flag, ...] = (
    shared("model_path", group="encoder"),
    shared("config", group="encoder"),
    Flag("untrained", False, "probe a randomly initialised encoder of the same architecture (the baseline); "
         "the weights are not read, only the config is needed", group="encoder"),
    shared("arch", default=None, optional=True, group="encoder", help=f"override the encoder; {FROM_CONFIG}"),
    shared("stem", default=None, optional=True, group="encoder", help=f"override the first layer; {FROM_CONFIG}"),
    shared("dataset", default=None, optional=True, help=f"override the data set; {FROM_CONFIG}"),
    shared("data_root", default=None, optional=True, help=f"override the data folder; {FROM_CONFIG}"),
    shared("image_size", help=f"override the image side; {FROM_CONFIG}"),
    shared("cache_dir", help=f"override the folder-data cache folder; {FROM_CONFIG}"),
    shared("train_subset", help="train the probe on a fixed random subset of N labeled images (quick runs)"),
    Flag("batch_size", 512, "examples per step", type=int, group="probe training", ge=1, le=2 ** 20),
    Flag("epochs", 100, "epochs over the labeled train split", type=int, group="probe training", ge=1, le=10 ** 6),
    Flag("optimizer", "sgd", "sgd (with --momentum) or adam; cosine decay to 0 over all steps either way", type=str,
         choices=tuple(DEFAULT_LR), group="probe training"),
    Flag("lr", None, "learning rate; None means 0.1 for sgd, 1e-3 for adam", type=float, group="probe training",
         gt=0, le=MAX_LR, optional=True),
    Flag("momentum", 0.9, "SGD momentum", type=float, group="probe training", ge=0, lt=1),
    Flag("weight_decay", 0.0, "L2 penalty on the linear layer (the paper uses none on CIFAR)", type=float,
         group="probe training", ge=0, le=10),
    Flag("standardize", True, "scale each feature to zero mean, unit variance with train-split statistics only "
         "(folded into the saved layer, which stays linear in raw features)", group="probe training"),
    Flag("augment", False, "train through the frozen encoder with random crop (padding size/8) and flip on "
         "every batch instead of on features computed once", group="probe training"),
    shared("eval_batch_size"),
    shared("device"),
    shared("precision"),
    shared("channels_last", help="channels-last memory format for the encoder"),
    shared("threads", aliases=("workers",)),
    shared("seed", help="seed of the probe (and of --untrained's encoder)"),
    *evaluation_files("linear", "linear"),
)

LinearConfig = config_class("LinearConfig", LINEAR_FLAGS, "Every resolved flag of a linear evaluation.")


# ----------------------------------------------------------------------------- finetune.py

DEFAULT_FRACTION = 0.1

FINETUNE_FLAGS: tuple[Flag, ...] = (
    Flag("model_path", None, "weights of main.py: NAME_model.pth (or a NAME_last.pth checkpoint)", type=str,
         group="encoder", optional=True),
    Flag("config", None, "run config JSON; None means NAME_config.json next to --model_path", type=str,
         group="encoder", optional=True),
    Flag("untrained", False, "start from a random initialisation of the same model (the baseline); the weights "
         "are not read, only the config", group="encoder", role="run"),
    Flag("from_layer", "encoder", "where the new linear classifier sits: encoder (on h) or headK (after the "
         "projection head's first K hidden layers, each Linear + BatchNorm + ReLU, loaded from the checkpoint; "
         "SimCLRv2 fine-tunes from head1); K below the run's --proj_layers", type=str, choices=FROM_LAYERS,
         group="encoder", role="run"),
    shared("arch", default=None, optional=True, group="encoder", help=f"override the encoder; {FROM_CONFIG}"),
    shared("stem", default=None, optional=True, group="encoder", help=f"override the first layer; {FROM_CONFIG}"),
    shared("dataset", default=None, optional=True, help=f"override the data set; {FROM_CONFIG}"),
    shared("data_root", default=None, optional=True, role="run", help=f"override the data folder; {FROM_CONFIG}"),
    shared("image_size", help=f"override the image side; {FROM_CONFIG}"),
    shared("cache_dir", help=f"override the folder-data cache folder; {FROM_CONFIG}"),
    Flag("label_fraction", None, f"fraction of the labeled training images to use, the same number from every "
         f"class (0.01, 0.1, ..., 1); None means {DEFAULT_FRACTION} unless --labels_per_class", type=float,
         group="labels", role="run", gt=0, le=1, optional=True),
    Flag("labels_per_class", None, "use N labeled images of every class instead of a fraction", type=int,
         group="labels", role="run", ge=1, le=BIG, optional=True),
    Flag("batch_size", 64, "most labeled images per step: every label is used every epoch, in ceil(labels / N) "
         "batches of nearly equal size (one batch of all labels when there are fewer than N)", type=int,
         group="fine-tuning", role="run", ge=2, le=2 ** 20),
    Flag("epochs", None, "epochs over the labeled subset; None means 60 for --label_fraction 0.01 or less, else 30 "
         "(SimCLR's 1% and 10% settings)", type=int, group="fine-tuning", role="run", ge=1, le=10 ** 6, optional=True),
    Flag("lr", None, "learning rate of SGD with Nesterov momentum, cosine decay to 0 over all steps; None means "
         "0.05 x B / 256 with B the batch actually used (SimCLR's fine-tuning rule)", type=float, group="fine-tuning",
         role="run", gt=0, le=MAX_LR, optional=True),
    Flag("momentum", 0.9, "Nesterov momentum (0: plain SGD)", type=float, group="fine-tuning", role="run", ge=0, lt=1),
    Flag("weight_decay", 0.0, "L2 penalty on every weight (SimCLR's fine-tuning uses none)", type=float,
         group="fine-tuning", role="run", ge=0, le=10),
    Flag("min_crop_scale", 0.08, "smallest crop area fraction of the random resized crop", type=float,
         group="fine-tuning", role="run", gt=0, le=1),
    shared("eval_batch_size", help="images per forward pass when testing"),
    shared("device"),
    shared("precision"),
    shared("channels_last"),
    shared("threads"),
    shared("seed", help="seed of the label subset, the batch order, the crops and --untrained's initialisation"),
    *evaluation_files("finetune_TAG", "finetune", " per epoch"),
    Flag("resume", None, "continue from a NAME_finetune_TAG_last.pth checkpoint, or 'auto' for this run's", type=str,
         group="run", optional=True),
)

FINETUNE = by_name(FINETUNE_FLAGS)
FINETUNE_DEFAULTS = {f.name: f.default for f in FINETUNE_FLAGS}
FINETUNE_RUN_KEYS = tuple(f.name for f in FINETUNE_FLAGS if f.role == "run")
FinetuneConfig = config_class("FinetuneConfig", FINETUNE_FLAGS, "Every resolved flag of a fine-tuning run.")


# ----------------------------------------------------------------------------- neighbors.py

NEIGHBORS_FLAGS: tuple[Flag, ...] = (
    shared("model_path"),
    shared("config"),
    Flag("n", 8, "test images, one per row", type=int, group="picture", ge=1, le=10_000),
    Flag("k", 8, "neighbours per test image", type=int, group="picture", ge=1, le=1_000),
    shared("seed", group="picture", help="chooses the random test images"),
    Flag("out", None, "PNG to write; None means NAME_neighbors.png beside the weights", type=str, group="picture",
         optional=True),
    shared("dataset", default=None, optional=True, help="override the config's data set"),
    shared("data_root", default=None, optional=True, help="override the config's data folder (e.g. run from elsewhere)"),
    shared("image_size", help="override the config's image side"),
    shared("device"),
    shared("eval_batch_size", default=256, aliases=("batch_size",)),
    shared("threads"),
)


# ----------------------------------------------------------------------------- embed.py

METHODS = ("tsne", "pca")
MIN_POINTS = 5            # embed.py: t-SNE needs perplexity >= 1 < (n - 1) / 3; a map of fewer points says nothing
THUMBNAILS = 150          # --thumbnails: at most this many, spread over the map

EMBED_FLAGS: tuple[Flag, ...] = (
    shared("model_path"),
    shared("config"),
    Flag("method", "tsne", "tsne (openTSNE; about 70 s for 10,000 images on 2 CPU cores) or pca (torch SVD, "
         "seconds)", type=str, choices=METHODS, group="map"),
    Flag("n", None, "test images to draw, class-balanced and chosen by --seed; None means all", type=int, group="map",
         ge=MIN_POINTS, le=BIG, optional=True),
    Flag("perplexity", 30.0, "t-SNE perplexity (lowered to (n - 1) / 3 for few images)", type=float, group="map",
         ge=1, le=10_000),
    Flag("thumbnails", False, f"draw image thumbnails at up to {THUMBNAILS} points spread over the map",
         group="map"),
    shared("seed", group="map", help="chooses the --n test images, t-SNE's random state and the thumbnails"),
    Flag("out", None, "PNG to write; None means NAME_embed_METHOD.png beside the weights; the CSV of "
         "coordinates goes beside it (same name, .csv)", type=str, group="map", optional=True),
    shared("dataset", default=None, optional=True, help="override the config's data set"),
    shared("data_root", default=None, optional=True,
           help="override the config's data folder (moved data, or the full test set of a subset run)"),
    shared("image_size", help="override the config's image side"),
    shared("device"),
    shared("eval_batch_size", default=256),
    shared("threads", help="CPU threads for PyTorch and t-SNE; 0 means one per core"),
    shared("tensorboard", help="also write the features, labels and a thumbnail sprite for TensorBoard's "
           "embedding projector"),
    shared("tensorboard_dir", help="where the projector files go; None means the run's NAME_tb beside the weights"),
)


# ----------------------------------------------------------------------------- bench.py

BENCH_FLAGS: tuple[Flag, ...] = (
    Flag("device", None, "cpu or cuda; None means cuda if available, else cpu", type=str, choices=("cpu", "cuda"),
         group="bench",
         optional=True),
    Flag("quick", False, "tiny sizes (CPU run under a minute; figures not meaningful; no bf16 step variants on a CPU without native bf16)", group="bench"),
    Flag("threads", None, "torch threads / PIL processes on both sides; None means all cores (1 with --quick)",
         type=int, group="bench", ge=1, le=1024, optional=True),
    Flag("arch", None, "arch of the step comparison; None means resnet18 (and resnet50 for CUDA epochs)", type=str,
         choices=ARCHS, group="bench", optional=True),
    Flag("batch_size", None, "images per step in the step comparison; None means cpu 32, cuda 512; quick 8", type=int,
         group="bench", ge=2, le=2 ** 20, optional=True),
    Flag("steps", None, "timed steps per variant after warm-up; None means cpu 3, cuda 10; quick 2", type=int,
         group="bench", ge=1, le=10_000, optional=True),
    Flag("breakdown_batch", None, "images per step of the breakdown of main.py's step; None means cpu 256, cuda "
         "512; quick 8", type=int, group="bench", ge=2, le=2 ** 20, optional=True),
    Flag("sections", None, "comma-separated sections to run, of rates, augmentation, step, bn_stats, probe, "
         "breakdown, profile, main, epochs (cuda only); None means all", type=str, group="bench", optional=True),
    Flag("main_data", None, "the main section's data: a folder with train/<class>/ and test/<class>/ images "
         "(data/cifar10-jpg); None means random-pixel PNGs written to a temporary folder", type=str,
         group="bench", optional=True),
    Flag("json", None, "also write the JSON to this file", type=str, group="bench", optional=True),
    Flag("compile", False, "torch.compile the project's network (cuda epochs)", group="bench"),
)


# ----------------------------------------------------------------------------- sweep.py

THEN_SCRIPTS = ("linear", "finetune")
# main.py flags the sweep sets for each run itself: neither a grid key nor a flag after --
SWEEP_OWNED = ("seed", "name", "results_dir", "resume")

SWEEP_FLAGS: tuple[Flag, ...] = (
    Flag("seeds", "0", "seeds of every configuration: a range 0-4, a list 0,1,2, or both (0-2,7)", type=str,
         group="grid"),
    Flag("grid", None, "KEY=V1,V2,...: a flag of main.py and its values (given again for each key); every "
         "combination runs for every seed; on/off flags take true,false", type=str, group="grid", optional=True,
         repeat=True),
    Flag("baseline", None, "KEY=V,KEY=V: the configuration the others are compared with, paired by seed "
         "(comparison.csv)", type=str, group="grid", optional=True),
    Flag("name", None, "sweep name; None means the grid keys joined by _", type=str, group="files", optional=True),
    Flag("out", None, "folder of the runs and the tables; None means results/sweep_NAME", type=str, group="files",
         optional=True),
    Flag("gpus", None, "GPU indices to use, e.g. 0,1,2,3: up to one run per GPU at once, each seeing only its "
         "own; None means one run at a time on the default device", type=str, group="devices", optional=True),
    Flag("gpus_per_run", 1, "GPUs per run: more than 1 starts each run with torchrun on that many of --gpus "
         "(of all GPUs when --gpus is not given)", type=int, group="devices", ge=1, le=1024),
    Flag("then", None, "evaluate each finished run's NAME_model.pth with linear.py or finetune.py and add its "
         "final test top-1 to the tables", type=str, choices=THEN_SCRIPTS, group="evaluation", optional=True),
    dataclasses.replace(FINETUNE["label_fraction"], group="evaluation",
                        help=f"--then finetune: fraction of the labels; None means {DEFAULT_FRACTION}"),
    Flag("then_args", None, "more flags of the evaluation script, in quotes (e.g. '--epochs 20')", type=str,
         group="evaluation", optional=True),
    Flag("dry_run", False, "list the runs and their commands; start none, write nothing", group="files"),
)


# ----------------------------------------------------------------------------- export_images.py

EXPORT_DATASETS = ("cifar10", "cifar100")
IMAGE_FORMATS = ("jpg", "png")

EXPORT_FLAGS: tuple[Flag, ...] = (
    shared("dataset", choices=EXPORT_DATASETS, help="the torchvision data set to write as image folders"),
    shared("data_root", help="where the data set is, or is downloaded to (offline: put its .tar.gz there)"),
    Flag("out", None, "the folder to write, OUT/train/<class>/ and OUT/test/<class>/ (absent or empty); None means "
         "DATA_ROOT/DATASET-FORMAT, e.g. data/cifar10-jpg", type=str, group="output", optional=True),
    Flag("train_per_class", None, "write only the first N training images of each class; None means all", type=int,
         group="output", ge=1, le=BIG, optional=True),
    Flag("test_per_class", None, "write only the first N test images of each class; None means all", type=int,
         group="output", ge=1, le=BIG, optional=True),
    Flag("format", "jpg", "jpg (smaller, lossy) or png (the exact pixels)", type=str, choices=IMAGE_FORMATS,
         group="output"),
    Flag("quality", 95, "JPEG quality (full-resolution colour, no chroma subsampling)", type=int, group="output", ge=1,
         le=100),
)


# ----------------------------------------------------------------------------- every script's table

# The flags of each script, in --help order: docs/flags.md is generated from this table.
SCRIPT_FLAGS: dict[str, tuple[Flag, ...]] = {
    "main.py": TRAIN_FLAGS, "linear.py": LINEAR_FLAGS, "finetune.py": FINETUNE_FLAGS,
    "neighbors.py": NEIGHBORS_FLAGS, "embed.py": EMBED_FLAGS, "bench.py": BENCH_FLAGS,
    "sweep.py": SWEEP_FLAGS, "export_images.py": EXPORT_FLAGS,
}
