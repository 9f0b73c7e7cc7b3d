"""Train SimCLR on CIFAR-scale images, with a weighted kNN evaluation after every epoch.

    python main.py --batch_size 1024 --epochs 500                 # the seed's run: CIFAR-10, ResNet-50
    python main.py --recipe paper                                  # LARS, warm-up + cosine (paper, B.9)
    python main.py --dataset folder --data_root data/cifar10-jpg --arch resnet18 --epochs 5
    python main.py --resume auto ...                               # continue a stopped run
    torchrun --nproc_per_node=4 main.py --batch_size 4096          # several GPUs, global batch 4096

Writes results/NAME_statistics.csv, NAME_model.pth (best kNN top-1), NAME_last.pth (resume
checkpoint), NAME_config.json and NAME_curves.png; see README.md.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch

from checkpoint import is_training_checkpoint, load_untrusted
from augment import AugmentConfig, normalize, pil_transform, two_views
from data import DATASETS, DEFAULT_IMAGE_SIZE, DataBundle, DataError, ImageSet, load_dataset
from distributed import (World, close_world, convert_batchnorm, gather_rows, global_nt_xent,
                         in_turn, init_world, mean_over_ranks, shard, any_rank)
from model import ARCHS, BN_STATS, STEMS, SimCLR, at_least_fp32
from plot import plot_run_or_warn
from optim import LR_SCALINGS, OPTIMIZERS, SCHEDULES, build_optimizer, lr_at, scaled_lr, set_lr
from utils import (OneLineParser, Runtime, UserError, atomic_save, atomic_save_json, atomic_write_csv, extract_features,
                   knn_accuracy, mix_seed, resolve_device, seed_everything)

CSV_COLUMNS = ("epoch", "train_loss", "test_acc@1", "test_acc@5", "lr", "epoch_seconds",
               "train_images_per_second", "knn_seconds")

# The seed's defaults; every departure is a flag.
DEFAULTS = dict(
    arch="resnet50", stem="cifar", feature_dim=128, proj_hidden_dim=512, temperature=0.5,
    k=200, knn_temperature=None, knn_every=1, batch_size=1024, epochs=500,
    optimizer="adam", lr=1e-3, weight_decay=1e-6, momentum=0.9, lr_scaling="none", warmup_epochs=0,
    schedule="constant", jitter_strength=0.5, blur=False, min_crop_scale=0.08,
    dataset="cifar10", data_root="data", image_size=None, cache_dir=None, train_subset=None,
    seed=0, device="auto", workers=min(8, os.cpu_count() or 1), results_dir="results", name=None,
    aug_backend="tensor", precision="auto", channels_last=True, compile=False, grad_checkpoint=False,
    bn_stats="per_view",
    eval_batch_size=1024, knn_at_start=False, recipe="seed", resume=None,
)

# Named presets: applied over DEFAULTS, under flags given explicitly.
RECIPES = {
    "seed": {},
    # SimCLR paper, appendix B.9 (CIFAR-10): LARS, lr 1.0 x batch/256, 10 warm-up epochs, cosine
    "paper": dict(optimizer="lars", lr=1.0, lr_scaling="linear", weight_decay=1e-6, warmup_epochs=10,
                  schedule="cosine", temperature=0.5, jitter_strength=0.5, blur=False, proj_hidden_dim=2048),
}

# Flags that define what a run computes: a resumed run must keep them.
RUN_KEYS = ("arch", "stem", "feature_dim", "proj_hidden_dim", "temperature", "batch_size", "optimizer", "lr",
            "weight_decay", "momentum", "lr_scaling", "warmup_epochs", "schedule", "jitter_strength", "blur",
            "min_crop_scale", "dataset", "image_size", "train_subset", "seed", "aug_backend", "recipe", "bn_stats")

# Run-altering flags added after checkpoints were first written: the value an older checkpoint,
# which lacks the key, was trained with.
LEGACY_VALUES = dict(bn_stats="joint")


@dataclass(frozen=True)
class Config:
    """Every resolved flag of a run (see build_parser for their meaning)."""
    arch: str
    stem: str
    feature_dim: int
    proj_hidden_dim: int
    temperature: float
    k: int
    knn_temperature: float | None
    knn_every: int
    batch_size: int
    epochs: int
    optimizer: str
    lr: float
    weight_decay: float
    momentum: float
    lr_scaling: str
    warmup_epochs: int
    schedule: str
    jitter_strength: float
    blur: bool
    min_crop_scale: float
    dataset: str
    data_root: str
    image_size: int | None
    cache_dir: str | None
    train_subset: int | None
    seed: int
    device: str
    workers: int
    results_dir: str
    name: str | None
    aug_backend: str
    precision: str
    channels_last: bool
    compile: bool
    grad_checkpoint: bool
    bn_stats: str
    eval_batch_size: int
    knn_at_start: bool
    recipe: str
    resume: str | None


def build_parser() -> argparse.ArgumentParser:
    """All flags; defaults are applied later (so that explicit flags can be told apart)."""
    p = OneLineParser(description="SimCLR on CIFAR-scale images with weighted kNN evaluation.",
                      argument_default=argparse.SUPPRESS,
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="Files: results/NAME_statistics.csv, NAME_model.pth, NAME_last.pth, "
                             "NAME_config.json, NAME_curves.png (see README.md).")
    d = DEFAULTS

    g = p.add_argument_group("model and loss")
    add_g = lambda flag, help, **kw: (g.add_argument(flag, help=f"{help} (default: {d[flag.lstrip('-')]})", **kw))
    add_g("--arch", "encoder", choices=ARCHS)
    add_g("--stem", "first layer: cifar (3x3 conv, no max-pool) or imagenet (7x7/2 conv + max-pool)", choices=STEMS)
    add_g("--feature_dim", "projection output size", type=int)
    add_g("--proj_hidden_dim", "projection head hidden width", type=int)
    add_g("--temperature", "NT-Xent temperature", type=float)
    add_g("--grad_checkpoint", "recompute encoder activations in backward: less memory, ~30%% slower",
          action=argparse.BooleanOptionalAction)
    add_g("--bn_stats", "BatchNorm statistics in training: per_view (each view its own, as two forward passes) "
          "or joint (both views together); the convolutions run once over both views either way",
          choices=BN_STATS)

    g = p.add_argument_group("evaluation")
    add_g("--k", "neighbours in the weighted kNN", type=int)
    add_g("--knn_temperature", "kNN vote weight exp(sim / t); None means --temperature", type=float)
    add_g("--knn_every", "evaluate every N epochs (and always after the last)", type=int)
    add_g("--eval_batch_size", "batch size for feature extraction", type=int)
    add_g("--knn_at_start", "also evaluate the untrained encoder, as an epoch-0 row of the CSV",
          action=argparse.BooleanOptionalAction)

    g = p.add_argument_group("optimisation")
    add_g("--recipe", "preset: seed (Adam 1e-3, constant) or paper (LARS, lr 1.0 x B/256, 10 warm-up "
          "epochs, cosine, head 2048); explicit flags override it", choices=tuple(RECIPES))
    add_g("--batch_size", "images per step (global over all processes); two views each", type=int)
    add_g("--epochs", "training epochs", type=int)
    add_g("--optimizer", "optimizer", choices=OPTIMIZERS)
    add_g("--lr", "learning rate before --lr_scaling", type=float)
    add_g("--lr_scaling", "linear: lr x batch/256; sqrt: lr x sqrt(batch/256)", choices=LR_SCALINGS)
    add_g("--weight_decay", "weight decay (LARS: not on biases and BatchNorm)", type=float)
    add_g("--momentum", "momentum for sgd and lars", type=float)
    add_g("--warmup_epochs", "linear warm-up epochs", type=int)
    add_g("--schedule", "after warm-up: constant or cosine (stepped every batch)", choices=SCHEDULES)

    g = p.add_argument_group("augmentation")
    add_g("--jitter_strength", "colour jitter strength s: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)", type=float)
    add_g("--blur", "Gaussian blur with p=0.5 (kernel ~10%% of the image, sigma 0.1-2)",
          action=argparse.BooleanOptionalAction)
    add_g("--min_crop_scale", "smallest crop area fraction of RandomResizedCrop", type=float)
    add_g("--aug_backend", "tensor: batched on the run's device; pil: torchvision per image in "
          "DataLoader workers (the seed's way, the reference)", choices=("tensor", "pil"))

    g = p.add_argument_group("data")
    add_g("--dataset", "data set; folder reads DATA_ROOT/train/<class>/* and DATA_ROOT/test/<class>/*",
          choices=DATASETS)
    add_g("--data_root", "where the data set is (downloaded to, for torchvision sets)")
    add_g("--image_size", "image side; None means the data set's (32; stl10: 96)", type=int)
    add_g("--cache_dir", "folder data: where to keep the decoded-image cache when DATA_ROOT is read-only")
    add_g("--train_subset", "train on a fixed random subset of N training images (quick runs)", type=int)
    add_g("--workers", "DataLoader workers of the pil backend", type=int)

    g = p.add_argument_group("speed")
    add_g("--device", "auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    add_g("--precision", "auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32; loss and kNN stay fp32",
          choices=("auto", "bf16", "fp16", "fp32"))
    add_g("--channels_last", "channels-last memory format for the network", action=argparse.BooleanOptionalAction)
    add_g("--compile", "torch.compile the model (first steps are slow while it compiles)",
          action=argparse.BooleanOptionalAction)

    g = p.add_argument_group("run")
    add_g("--seed", "seed of everything random", type=int)
    add_g("--results_dir", "where results files go")
    add_g("--name", "run name; None means DATASET_ARCH_FEATUREDIM_TEMPERATURE_K_BATCH_EPOCHS")
    add_g("--resume", "continue from a NAME_last.pth checkpoint, or 'auto' for this run name's")
    return p


def default_name(values: dict) -> str:
    """The seed's naming: data set, arch and the five seed flags in the seed's order."""
    return "{dataset}_{arch}_{feature_dim}_{temperature:g}_{k}_{batch_size}_{epochs}".format(**values)


def resolve_values(explicit: dict) -> dict:
    """DEFAULTS, then the recipe's values, then the explicit flags."""
    recipe = explicit.get("recipe", DEFAULTS["recipe"])
    values = {**DEFAULTS, **RECIPES[recipe], **explicit}
    if values["name"] is None:
        values["name"] = default_name(values)
    return values


def validate(cfg: Config, world: World) -> None:
    """Reject flag values that cannot run, with one line that says what to do."""
    positive = ("batch_size", "epochs", "k", "temperature", "feature_dim", "lr", "knn_every", "proj_hidden_dim",
                "eval_batch_size")
    for key in positive:
        if not getattr(cfg, key) > 0:
            raise UserError(f"--{key} must be positive, got {getattr(cfg, key)}")
    for key in ("image_size", "knn_temperature", "train_subset"):
        value = getattr(cfg, key)
        if value is not None and not value > 0:
            raise UserError(f"--{key} must be positive, got {value}")
    for key in ("weight_decay", "warmup_epochs", "jitter_strength", "workers", "momentum"):
        if getattr(cfg, key) < 0:
            raise UserError(f"--{key} must not be negative, got {getattr(cfg, key)}")
    if not all(math.isfinite(getattr(cfg, key)) for key in ("lr", "temperature", "weight_decay")):
        raise UserError("--lr, --temperature and --weight_decay must be finite numbers")
    if not 0 < cfg.min_crop_scale <= 1:
        raise UserError(f"--min_crop_scale must be in (0, 1], got {cfg.min_crop_scale}")
    if cfg.warmup_epochs > cfg.epochs:
        raise UserError(f"--warmup_epochs {cfg.warmup_epochs} is longer than --epochs {cfg.epochs}")
    if cfg.image_size is not None and cfg.image_size < 8:
        raise UserError(f"--image_size {cfg.image_size} is too small for a ResNet; use 8 or more")
    if not cfg.name or os.sep in cfg.name or cfg.name.startswith("."):
        raise UserError(f"--name {cfg.name!r} must be a plain file name (no '/', not starting with '.')")
    if cfg.batch_size % world.world_size:
        raise UserError(f"--batch_size {cfg.batch_size} (the global batch) must divide by the {world.world_size} "
                        f"processes; use a multiple of {world.world_size}")


def validate_data(cfg: Config, bundle: DataBundle) -> None:
    """Checks that need the data: batch and k against the number of images."""
    n_train, n_bank = len(bundle.train.labels), len(bundle.memory.labels)
    if cfg.batch_size > n_train:
        raise UserError(f"--batch_size {cfg.batch_size} is larger than the {n_train} training images; "
                        f"use --batch_size {n_train} or less")
    if cfg.k > n_bank:
        raise UserError(f"--k {cfg.k} is larger than the {n_bank} images of the kNN bank; use --k {n_bank} or less")
    if len(bundle.test.labels) == 0:
        raise UserError(f"the test split of {cfg.data_root} has no images")


# ----------------------------------------------------------------------------- resume

def load_checkpoint(path: str) -> dict:
    """A NAME_last.pth checkpoint, loaded without running code (weights_only)."""
    ckpt = load_untrusted(path, "--resume")
    if not is_training_checkpoint(ckpt) or not {"config", "epoch"} <= set(ckpt):
        raise UserError(f"--resume {path} is not a NAME_last.pth training checkpoint of this project")
    return ckpt


def merge_resume(explicit: dict, saved: dict) -> tuple[dict, list[str]]:
    """Flags for a resumed run: the saved ones, then explicit flags; error on run-altering changes."""
    saved = {**LEGACY_VALUES, **saved}
    values = {**DEFAULTS, **{k: v for k, v in saved.items() if k in DEFAULTS}}
    def same(key: str) -> bool:
        if key == "image_size" and saved.get(key) is None:  # the default: the data set's own size
            return explicit[key] == DEFAULT_IMAGE_SIZE.get(saved.get("dataset"))
        return explicit[key] == saved.get(key)

    changed = [k for k in explicit if k in RUN_KEYS and not same(k)]
    if changed:
        what = ", ".join(f"--{k} {saved.get(k)} -> {explicit[k]}" for k in changed)
        raise UserError(f"cannot resume with changed flags that alter the run ({what}); "
                        f"drop them, or start a new run with another --name")
    notes = [f"--{k} {saved.get(k)} -> {v}" for k, v in explicit.items()
             if k not in ("resume",) and k in saved and saved.get(k) != v]
    values.update(explicit)
    return values, notes


# ----------------------------------------------------------------------------- data

class PilViews(torch.utils.data.Dataset):
    """The classic path: two torchvision PIL-transformed views per image, in DataLoader workers.

    Each image's random stream is seeded from (run seed, epoch, index), so the views do not
    depend on the number of workers and a resumed epoch sees the same views.
    """

    def __init__(self, images: torch.Tensor, aug: AugmentConfig, seed: int, epoch: int):
        self.images, self.transform, self.seed, self.epoch = images, pil_transform(aug), seed, epoch

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image
        image = Image.fromarray(self.images[index].numpy())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, self.epoch, index))
            return self.transform(image), self.transform(image)


def subset(images: ImageSet, n: int | None, seed: int) -> ImageSet:
    """A fixed random subset of n images (all when n is None or not smaller)."""
    if n is None or n >= len(images.labels):
        return images
    keep = torch.randperm(len(images.labels), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return ImageSet(images.images[keep], images.labels[keep])


# ----------------------------------------------------------------------------- training

class StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag checked between steps; a second one interrupts."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, views: torch.Tensor, temperature: float,
               runtime: Runtime, scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """One optimizer step on views (2b, 3, S, S) = [view 1; view 2]; returns the detached loss (no sync)."""
    with runtime.autocast():
        _, z = net(runtime.prepare(views))                        # z: (2b, feature_dim)
    loss = global_nt_xent(at_least_fp32(z), temperature)          # fp32, over the global batch
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach()


def evaluate(model: SimCLR, encode, bundle: DataBundle, cfg: Config, runtime: Runtime, world: World,
             knn_temperature: float) -> tuple[float, float]:
    """Weighted kNN top-1/top-5 (%) of test images against the memory bank, on encoder features h."""
    from tqdm import tqdm
    was_training = model.training
    model.eval()
    to_input = lambda batch: normalize(batch, bundle.mean, bundle.std)

    def features(split: ImageSet, what: str) -> torch.Tensor:
        n = len(split.labels)
        if n < world.world_size:  # too few to share out: every rank does all (no empty shards)
            return extract_features(encode, split.images, to_input, runtime, cfg.eval_batch_size)
        part = shard(n, world)
        bar = (lambda it: tqdm(it, desc=f"  features of {what}", leave=False, disable=not world.is_main))
        local = extract_features(encode, split.images[part], to_input, runtime, cfg.eval_batch_size, bar)
        return gather_rows(local, n, world)

    try:
        bank = features(bundle.memory, "kNN bank")
        test = features(bundle.test, "test set")
        return knn_accuracy(test, bundle.test.labels, bank, bundle.memory.labels, len(bundle.classes), cfg.k,
                            knn_temperature)
    finally:
        model.train(was_training)


def count_macs(model: SimCLR, image_size: int) -> tuple[int, int]:
    """(parameters, multiply-accumulates per image) with thop, on a throwaway copy."""
    import thop
    probe = copy.deepcopy(model).cpu().eval()  # thop attaches counters: never to the real model
    with torch.no_grad():
        macs, _ = thop.profile(probe, inputs=(torch.zeros(1, 3, image_size, image_size),), verbose=False)
    params = sum(p.numel() for p in model.parameters())
    return params, int(macs)


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA (fp16 where bf16 is not supported), fp32 on CPU."""
    if name != "auto":
        return name
    if device.type == "cuda":
        # native bf16 needs compute capability 8 (Ampere) or newer; older cards get fp16 + grad scaler
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    return "fp32"


@dataclass
class EpochResult:
    """What one pass over (part of) an epoch produced."""
    done: int               # steps finished in this epoch (from its first step, resumed or not)
    loss_sum: torch.Tensor  # sum of the step losses, averaged over processes
    seconds: float          # training time of the epoch so far


class Trainer:
    """One run's state: data, model, optimizer, files; built once, then driven epoch by epoch."""

    def __init__(self, cfg: Config, world: World, resume_ckpt: dict | None, say):
        self.cfg, self.world, self.say = cfg, world, say
        device, device_note = resolve_device(cfg.device)
        if world.distributed and device.type == "cuda":
            device = torch.device("cuda", world.local_rank)
        if device_note:
            say(device_note)
        self.device = device
        self.precision = resolve_precision(cfg.precision, device)
        self.runtime = Runtime(device, self.precision, cfg.channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # input shapes never change: let cuDNN pick its fastest kernels

        bundle = in_turn(lambda: load_dataset(cfg.dataset, cfg.data_root, cfg.image_size, cache_dir=cfg.cache_dir,
                                              log=say), world)
        train_set = subset(bundle.train, cfg.train_subset, cfg.seed)
        shared_bank = bundle.memory is bundle.train
        bundle = dataclasses.replace(bundle, train=train_set, memory=train_set if shared_bank else bundle.memory)
        validate_data(cfg, bundle)
        self.knn_temperature = cfg.knn_temperature if cfg.knn_temperature is not None else cfg.temperature

        seed_everything(cfg.seed)
        model = SimCLR(cfg.arch, cfg.feature_dim, cfg.proj_hidden_dim, cfg.stem, cfg.grad_checkpoint, cfg.bn_stats)
        self.params, self.macs = count_macs(model, bundle.image_size)
        say(f"model: {cfg.arch} ({cfg.stem} stem) + head {model.feature_width}-{cfg.proj_hidden_dim}-"
            f"{cfg.feature_dim}: {self.params / 1e6:.2f} M parameters, {self.macs / 1e9:.3f} G MACs per "
            f"{bundle.image_size}x{bundle.image_size} image (thop)")
        model = model.to(device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)

        self.steps_per_epoch = len(train_set.labels) // cfg.batch_size  # the last incomplete batch is dropped
        self.base_lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = cfg.warmup_epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(model, cfg.optimizer, self.base_lr, cfg.weight_decay, cfg.momentum)
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None

        self.start_epoch, self.start_step = 0, 0
        self.carried = dict(loss_sum=0.0, seconds=0.0)  # of a checkpoint written mid-epoch
        self.history: list[dict] = []
        self.best_acc = -1.0
        if resume_ckpt is not None:
            self._restore(model, resume_ckpt)

        self.model, self.net = model, model
        if world.distributed:
            self.model = convert_batchnorm(model, device)
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.encode = self.model.encode
        if cfg.compile:
            self.net = torch.compile(self.net)
            self.encode = torch.compile(self.model.encode)

        self.paths = {kind: os.path.join(cfg.results_dir, f"{cfg.name}_{kind}")
                      for kind in ("statistics.csv", "model.pth", "last.pth", "config.json", "curves.png")}
        self.aug = AugmentConfig(image_size=bundle.image_size, mean=bundle.mean, std=bundle.std,
                                 min_crop_scale=cfg.min_crop_scale, jitter_strength=cfg.jitter_strength, blur=cfg.blur)
        self.train_images = train_set.images
        if cfg.aug_backend == "tensor" and device.type == "cuda":
            self.train_images = put_on_device(train_set.images, device, say)
            if shared_bank:
                bundle = dataclasses.replace(bundle, memory=ImageSet(self.train_images, bundle.memory.labels))
        self.bundle = bundle
        self.generator = torch.Generator(device=self.train_images.device)

    def _restore(self, model: SimCLR, ckpt: dict) -> None:
        """Continue from a NAME_last.pth checkpoint."""
        model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch, self.start_step = ckpt["epoch"], ckpt.get("step_in_epoch", 0)
        self.carried = dict(loss_sum=ckpt.get("epoch_loss_sum", 0.0), seconds=ckpt.get("epoch_seconds", 0.0))
        self.history = [row for row in ckpt.get("history", []) if row["epoch"] <= self.start_epoch]
        self.best_acc = ckpt.get("best_acc", -1.0)
        restore_rng(ckpt.get("rng", {}))
        self.say(f"resuming {self.cfg.name} at epoch {self.start_epoch + 1}, step {self.start_step} "
                 f"of {self.steps_per_epoch}")

    def write_config(self) -> None:
        """NAME_config.json: every resolved flag, plus data, model and versions."""
        cfg, bundle = self.cfg, self.bundle
        atomic_save_json({**dataclasses.asdict(cfg), "image_size": bundle.image_size,
                          "knn_temperature": self.knn_temperature, "precision": self.precision,
                          "base_lr": self.base_lr, "world_size": self.world.world_size,
                          "num_classes": len(bundle.classes), "classes": bundle.classes,
                          "mean": list(bundle.mean), "std": list(bundle.std), "train_images": len(bundle.train.labels),
                          "parameters": self.params, "macs_per_image": self.macs,
                          "torch_version": torch.__version__, "torchvision_version": _tv_version()},
                         self.paths["config.json"])

    def evaluate(self) -> tuple[float, float, float]:
        """kNN top-1, top-5 (%) and the seconds it took."""
        t0 = time.perf_counter()
        top1, top5 = evaluate(self.model, self.encode, self.bundle, self.cfg, self.runtime, self.world,
                              self.knn_temperature)
        return top1, top5, time.perf_counter() - t0

    def train_epoch(self, epoch: int, stop: StopRequest) -> EpochResult:
        """Steps of one epoch from its first unfinished one, until its end or a stop request."""
        from tqdm import tqdm
        cfg, world, device, steps = self.cfg, self.world, self.device, self.steps_per_epoch
        resumed = epoch == self.start_epoch
        first = self.start_step if resumed else 0
        # the same permutation on every rank (seeded by epoch), kept where the images are
        perm = torch.randperm(len(self.train_images), generator=torch.Generator().manual_seed(mix_seed(cfg.seed, epoch)))
        if cfg.aug_backend == "tensor":
            perm = perm.to(self.train_images.device)
        loss_sum = torch.tensor(self.carried["loss_sum"] if resumed else 0.0, device=device)
        first_bad = torch.tensor(-1, device=device)  # step of the first non-finite loss, kept on the device
        local_batch = cfg.batch_size // world.world_size
        self.model.train()
        bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not world.is_main,
                   dynamic_ncols=True)
        batches = epoch_batches(perm, first, steps, cfg, world, self.train_images, self.aug, epoch, device)
        t0 = time.perf_counter()
        last_refresh, done = t0, first
        for step, views in enumerate(batches, start=first):
            if views is None:  # tensor backend: augment here, on the device
                idx = perm_slice(perm, step, cfg.batch_size, local_batch, world)
                self.generator.manual_seed(mix_seed(cfg.seed, epoch, step, world.rank))
                views = two_views(self.train_images[idx].to(device, non_blocking=True), self.aug, self.generator)
            else:
                views = views.to(device, non_blocking=True)
            set_lr(self.optimizer, lr_at(epoch * steps + step, self.base_lr, self.total_steps, self.warmup_steps,
                                         cfg.schedule))
            loss = train_step(self.net, self.optimizer, views, cfg.temperature, self.runtime, self.scaler)
            loss_sum += loss
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            done = step + 1
            bar.update(1)
            now = time.perf_counter()
            if world.distributed:
                # ranks decide together, at the same steps, whether to stop (a signal or a NaN on any)
                wants_stop = False
                if done % 10 == 0 or done == steps:
                    wants_stop, bad = any_rank([stop.signum is not None, first_bad >= 0], world, device)
                    if bad:
                        raise NonFiniteLoss(nonfinite_message(max(int(first_bad.item()), 0), epoch, steps,
                                                              self.paths))
            else:
                wants_stop = stop.signum is not None
            if now - last_refresh > 0.5 or done == steps:
                last_refresh = now
                if not world.distributed:
                    check_finite(first_bad, epoch, steps, self.paths)  # one sync, a few times a second
                bar.set_postfix(loss=f"{loss_sum.item() / done:.4f}")
            if wants_stop and done < steps:
                break
        bar.close()
        check_finite(first_bad, epoch, steps, self.paths)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (self.carried["seconds"] if resumed else 0.0) + time.perf_counter() - t0
        return EpochResult(done, mean_over_ranks(loss_sum, world), seconds)

    def save_last(self, epoch: int, step: int, loss_sum: float, seconds: float) -> None:
        """NAME_last.pth: everything --resume needs to continue exactly (epoch = completed epochs)."""
        save_last(self.paths, dict(model=self.model, optimizer=self.optimizer, scaler=self.scaler, cfg=self.cfg,
                                   history=self.history, best_acc=self.best_acc,
                                   schedule=dict(name=self.cfg.schedule, base_lr=self.base_lr,
                                                 steps_per_epoch=self.steps_per_epoch,
                                                 warmup_steps=self.warmup_steps, total_steps=self.total_steps)),
                  epoch, step, loss_sum, seconds)

    def end_epoch(self, epoch: int, result: EpochResult) -> dict:
        """Evaluate if due, then write the CSV, curves, best weights and checkpoint; returns the CSV row."""
        cfg = self.cfg
        row = {"epoch": epoch + 1, "train_loss": result.loss_sum.item() / self.steps_per_epoch, "test_acc@1": None,
               "test_acc@5": None, "lr": self.optimizer.param_groups[0]["lr"], "epoch_seconds": result.seconds,
               "train_images_per_second": self.steps_per_epoch * cfg.batch_size / result.seconds, "knn_seconds": None}
        if (epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs:
            top1, top5, seconds = self.evaluate()
            row.update({"test_acc@1": top1, "test_acc@5": top5, "knn_seconds": seconds})
            if top1 > self.best_acc and self.world.is_main:
                atomic_save(self.model.state_dict(), self.paths["model.pth"])
            self.best_acc = max(self.best_acc, top1)
        self.history.append(row)
        if self.world.is_main:
            atomic_write_csv(self.paths["statistics.csv"], CSV_COLUMNS, self.history)
            plot_run_or_warn(self.history, self.paths["curves.png"], cfg.name, self.say)
            self.save_last(epoch + 1, 0, 0.0, 0.0)
        return row


def run(cfg: Config, world: World, resume_ckpt: dict | None, notes: list[str]) -> int:
    """The whole job; returns the exit code."""
    from tqdm import tqdm
    say = (lambda *a: tqdm.write(" ".join(str(x) for x in a))) if world.is_main else (lambda *a: None)
    for note in notes:
        say(note)
    trainer = Trainer(cfg, world, resume_ckpt, say)
    paths = trainer.paths
    if world.is_main:
        os.makedirs(cfg.results_dir, exist_ok=True)
        trainer.write_config()
    if cfg.knn_at_start and not trainer.history and trainer.start_step == 0:
        top1, top5, seconds = trainer.evaluate()
        trainer.history.append({"epoch": 0, "test_acc@1": top1, "test_acc@5": top5, "knn_seconds": seconds})
        say(f"untrained encoder: kNN top-1 {top1:.2f}% top-5 {top5:.2f}%")

    stop = StopRequest()
    stop.install()
    try:
        for epoch in range(trainer.start_epoch, cfg.epochs):
            result = trainer.train_epoch(epoch, stop)
            if result.done < trainer.steps_per_epoch:  # stopped mid-epoch: save exactly where we are
                if world.is_main:
                    trainer.save_last(epoch, result.done, result.loss_sum.item(), result.seconds)
                    atomic_write_csv(paths["statistics.csv"], CSV_COLUMNS, trainer.history)
                return stopped(stop.signum, cfg, paths, world)
            row = trainer.end_epoch(epoch, result)
            acc = (f"kNN top-1 {row['test_acc@1']:.2f}% top-5 {row['test_acc@5']:.2f}%"
                   if row["test_acc@1"] is not None else "no kNN this epoch")
            say(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, {acc}, "
                f"{row['epoch_seconds']:.1f} s, {row['train_images_per_second']:.0f} images/s")
            if epoch + 1 < cfg.epochs and any_rank([stop.signum is not None], world, trainer.device)[0]:
                return stopped(stop.signum, cfg, paths, world)
    finally:
        stop.uninstall()
    say(f"done: best kNN top-1 {trainer.best_acc:.2f}%; weights {paths['model.pth']}, "
        f"statistics {paths['statistics.csv']}")
    return 0


def epoch_batches(perm, first, steps, cfg: Config, world: World, images: torch.Tensor, aug: AugmentConfig,
                  epoch: int, device: torch.device):
    """Per step: None (the tensor backend augments in the loop) or a (2b, 3, S, S) batch of PIL views."""
    if cfg.aug_backend == "tensor":
        return (None for _ in range(first, steps))
    local = cfg.batch_size // world.world_size
    sampler = [perm_slice(perm, s, cfg.batch_size, local, world).tolist() for s in range(first, steps)]
    loader = torch.utils.data.DataLoader(PilViews(images, aug, cfg.seed, epoch), batch_sampler=sampler,
                                         num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                         collate_fn=collate_views, worker_init_fn=_ignore_sigint)
    return iter(loader)


def collate_views(items: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """[(view 1, view 2)] * b -> (2b, 3, S, S) = [view 1 of all; view 2 of all], built in the worker."""
    return torch.stack([v for v, _ in items] + [v for _, v in items])


def _ignore_sigint(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the main process finishes the step and saves,
    # so the workers must not die first
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def perm_slice(perm: torch.Tensor, step: int, batch_size: int, local: int, world: World) -> torch.Tensor:
    """This process's share of global batch `step` of the epoch's permutation."""
    start = step * batch_size + world.rank * local
    return perm[start:start + local]


def put_on_device(images: torch.Tensor, device: torch.device, say) -> torch.Tensor:
    """Keep the uint8 training images on the GPU when they fit comfortably; else stream batches."""
    free, _ = torch.cuda.mem_get_info(device)
    if images.numel() < 0.3 * free:
        return images.to(device)
    say(f"note: the {images.numel() / 2**30:.1f} GiB of training images stay in host memory (GPU too small)")
    return images


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite."""


def nonfinite_message(bad: int, epoch: int, steps: int, paths: dict) -> str:
    """What to say when the loss of step `bad` (0-based) of `epoch` was NaN or infinite."""
    return (f"the loss became NaN/inf at epoch {epoch + 1}, step {bad + 1} of {steps}; the last good checkpoint "
            f"is kept at {paths['last.pth']} (resume with --resume auto); try a lower --lr, more --warmup_epochs "
            f"or --precision fp32")


def check_finite(first_bad: torch.Tensor, epoch: int, steps: int, paths: dict) -> None:
    """Raise NonFiniteLoss naming the epoch and step of the first non-finite loss (one device sync)."""
    bad = int(first_bad.item())
    if bad >= 0:
        raise NonFiniteLoss(nonfinite_message(bad, epoch, steps, paths))


def rng_state() -> dict:
    """Every global generator's state, as tensors and plain values (loadable with weights_only)."""
    import random
    import numpy as np
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Inverse of rng_state (missing parts are left as they are)."""
    import random
    import numpy as np
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


def save_last(paths: dict, state: dict, epoch: int, step: int, loss_sum: float, seconds: float) -> None:
    """Write NAME_last.pth: everything --resume needs to continue exactly."""
    cfg: Config = state["cfg"]
    scaler = state["scaler"]
    atomic_save({
        "model": state["model"].state_dict(), "optimizer": state["optimizer"].state_dict(),
        # the learning rate is a pure function of the global step (optim.lr_at): this is its whole state
        "scheduler": {**state["schedule"], "global_step": epoch * state["schedule"]["steps_per_epoch"] + step},
        "scaler": scaler.state_dict() if scaler is not None else {},
        "epoch": epoch, "step_in_epoch": step, "epoch_loss_sum": loss_sum, "epoch_seconds": seconds,
        "best_acc": state["best_acc"], "history": list(state["history"]), "rng": rng_state(),
        "config": dataclasses.asdict(cfg),
    }, paths["last.pth"])


def stopped(signum: int | None, cfg: Config, paths: dict, world: World) -> int:
    """Print how to continue after a signal; the exit code is 128 + signal number."""
    if not world.is_main:
        return 128 + (signum or signal.SIGINT)
    if world.distributed:
        print(f"stopped; checkpoint {paths['last.pth']}. Resume with the same torchrun command plus "
              f"--resume auto", file=sys.stderr, flush=True)
        return 128 + (signum or signal.SIGINT)
    args = [a for a in sys.argv[1:]]
    if "--resume" in args:
        i = args.index("--resume")
        del args[i:i + 2]
    args = [a for a in args if not a.startswith("--resume=")]
    command = " ".join(["python", "main.py", *args, "--resume", "auto"])
    print(f"stopped; checkpoint {paths['last.pth']}. Resume with:\n  {command}", file=sys.stderr, flush=True)
    return 128 + (signum or signal.SIGINT)


def _tv_version() -> str:
    import torchvision
    return torchvision.__version__


def parse(explicit: dict, world: World) -> tuple[Config, dict | None, list[str]]:
    """Explicit flags -> (config, checkpoint to resume or None, notes to print)."""
    values = resolve_values(explicit)
    ckpt, notes = None, []
    if values["resume"] is not None:
        path = values["resume"]
        if path == "auto":
            path = os.path.join(values["results_dir"], f"{values['name']}_last.pth")
            if not os.path.exists(path):
                notes.append(f"--resume auto: no checkpoint at {path}, starting from scratch")
                path = None
        if path is not None:
            ckpt = load_checkpoint(path)
            values, changes = merge_resume(explicit, ckpt["config"])
            notes += [f"resume: changed {c}" for c in changes]
    try:
        cfg = Config(**{f.name: values[f.name] for f in dataclasses.fields(Config)})
    except KeyError as e:
        raise UserError(f"checkpoint config lacks {e}") from None
    validate(cfg, world)
    return cfg, ckpt, notes


def _rank_prefix(world: World) -> str:
    return f"[rank {world.rank}] " if world.distributed else ""


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    explicit = vars(build_parser().parse_args(argv))
    world = World()
    try:
        world = init_world(explicit.get("device", DEFAULTS["device"]))
        cfg, ckpt, notes = parse(explicit, world)
        return run(cfg, world, ckpt, notes)
    except (UserError, DataError) as e:
        print(f"{_rank_prefix(world)}error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"{_rank_prefix(world)}error: {e}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        batch = cfg.batch_size if "cfg" in locals() else "?"
        print(f"{_rank_prefix(world)}error: out of GPU memory at --batch_size {batch} (global); try "
              f"--grad_checkpoint, --precision bf16, a smaller --batch_size, or more GPUs with torchrun",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; files on disk are complete (each is written whole or not at all)", file=sys.stderr)
        return 130
    finally:
        close_world(world)


if __name__ == "__main__":
    sys.exit(main())
