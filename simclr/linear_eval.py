"""Linear evaluation of a SimCLR encoder, linear.py's job: the frozen encoder's features, the
standardisation folded into the probe, the probe's training, and the run that writes its files.

`run(cfg)` takes the LinearConfig that linear.py built from the flags; the functions below it take
plain values, so tests call them on synthetic features.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .augment import normalize, normalize_float, pad_crop_flip
from .checkpoint import (Encoder, check_not_taken, evaluated_name, evaluation_dir, find_run_config, open_run,
                         resolve_encoder, source_id)
from .cli import InvalidResult, UserError
from .curves import plot_run_or_warn
from .data import evaluable, load_dataset, subset
from .engine import Runtime, make_runtime, mix_seed, seed_everything, versions
from .files import atomic_save, atomic_save_json, atomic_write_csv, existing, remove_files
from .flags import LinearConfig
from .knn import forward_in_batches, percent, topk_accuracy, topk_hits
from .model import SimCLR
from .names import LINEAR_COLUMNS, LINEAR_FILES, TENSORBOARD, run_paths
from .optim import build_optimizer, lr_at, set_lr
from .tblog import NoLog, config_markdown, open_log

# Seconds between two redraws of the curves PNG: on cached features an epoch takes milliseconds,
# and redrawing after each of them would make plotting most of the run time.
PLOT_INTERVAL_S = 2.0


# ----------------------------------------------------------------------------- loading the encoder

def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every parameter and buffer (BatchNorm running statistics included)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def changed_tensors(module: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors of `module` that are not bit-identical to `before`."""
    now = module.state_dict()
    return [k for k in before if k not in now or not torch.equal(now[k].detach().cpu(), before[k])] + \
           [k for k in now if k not in before]


# ----------------------------------------------------------------------------- standardised features

def standardizer(train_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std of the train features (N, d) -> ((d,), (d,)); constant features get std 1."""
    mean = train_x.mean(dim=0)
    std = train_x.std(dim=0, unbiased=False)
    # a feature that is constant on the train split carries nothing: leave it at 0 rather than divide by 0
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def fold(linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """Linear on standardised features -> the equal Linear on raw features: W' = W / std, b' = b - W' mean."""
    out = nn.Linear(linear.in_features, linear.out_features)
    with torch.no_grad():
        weight = linear.weight / std
        out.weight.copy_(weight)
        out.bias.copy_(linear.bias - weight @ mean)
    return out


# ----------------------------------------------------------------------------- training the probe

BatchFn = Callable[[torch.Tensor, int, int], torch.Tensor]  # (indices (B,), epoch, step) -> features (B, d)


@torch.no_grad()
def evaluate(linear: nn.Linear, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> tuple[float, float, float]:
    """(loss, top-1 %, top-5 %) of the probe on features (N, d) with labels (N,)."""
    if x.shape[0] == 0:
        return float("nan"), float("nan"), float("nan")
    logits = torch.cat([linear(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])  # (N, C)
    loss = F.cross_entropy(logits, y, reduction="mean").item()
    top1, top5 = topk_accuracy(logits, y, (1, 5))
    return loss, top1, top5


def fit(batch_features: BatchFn, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
        num_classes: int, cfg: LinearConfig, on_epoch: Callable[[list[dict]], None] | None = None,
        progress: bool = False) -> tuple[nn.Linear, list[dict]]:
    """Train Linear(d -> num_classes) on batches of train features; one CSV row per epoch (train/test metrics)."""
    from tqdm import tqdm
    device = test_x.device
    n = train_y.shape[0]
    batch = min(cfg.batch_size, n)  # keeps every example, one batch when the split is smaller
    steps_per_epoch = math.ceil(n / batch)
    total_steps = cfg.epochs * steps_per_epoch
    linear = nn.Linear(test_x.shape[1], num_classes).to(device)
    # softmax regression is convex with no symmetry to break: zero start makes runs independent of init
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = build_optimizer(linear, name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                momentum=cfg.momentum)
    rows: list[dict] = []
    epochs = tqdm(range(cfg.epochs), desc="linear probe", disable=not progress, dynamic_ncols=True)
    for epoch in epochs:
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(cfg.seed, epoch))).to(device)
        loss_sum, hits1, hits5 = 0.0, 0.0, 0.0
        for step in range(steps_per_epoch):
            idx = perm[step * batch:(step + 1) * batch]
            set_lr(optimizer,
                   lr_at(epoch * steps_per_epoch + step, base_lr=cfg.lr, total_steps=total_steps, warmup_steps=0,
                         schedule="cosine"))
            x = batch_features(idx, epoch, step)                            # (B, d), fp32
            y = train_y[idx]
            logits = linear(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # train metrics are running averages over the epoch's batches (no second pass over the data)
            top1, top5 = topk_hits(logits.detach(), y, (1, 5)).tolist()
            loss_sum += loss.item() * len(idx)
            hits1 += top1
            hits5 += top5
        test_loss, test1, test5 = evaluate(linear, test_x, test_y)
        rows.append({"epoch": epoch + 1, "train_loss": loss_sum / n, "train_acc@1": percent(hits1, n),
                     "train_acc@5": percent(hits5, n), "test_loss": test_loss, "test_acc@1": test1, "test_acc@5": test5,
                     "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - t0})
        epochs.set_postfix(loss=f"{rows[-1]['train_loss']:.3f}", test_top1=f"{test1:.2f}")
        if on_epoch is not None:
            on_epoch(rows)
    return linear, rows


def train_on_features(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                      num_classes: int, cfg: LinearConfig, on_epoch: Callable[[list[dict]], None] | None = None,
                      progress: bool = False) -> tuple[nn.Linear, list[dict]]:
    """The default protocol on fixed features (N, d) / (T, d); returns the probe on raw features and the rows."""
    mean, std = standardizer(train_x) if cfg.standardize else (torch.zeros(train_x.shape[1], device=train_x.device),
                                                                torch.ones(train_x.shape[1], device=train_x.device))
    train_z, test_z = (train_x - mean) / std, (test_x - mean) / std  # train statistics only, also for test
    linear, rows = fit(lambda idx, epoch, step: train_z[idx], train_y=train_y, test_x=test_z, test_y=test_y,
                       num_classes=num_classes, cfg=cfg,
                       on_epoch=on_epoch, progress=progress)
    return fold(linear, mean, std), rows


# ----------------------------------------------------------------------------- the run: load, features, train, write

class EncoderChanged(InvalidResult):
    """The frozen encoder's parameters or buffers moved during the run."""


def run(cfg: LinearConfig) -> int:
    """The whole linear evaluation; returns the exit code."""
    from tqdm import tqdm
    say = tqdm.write
    # Everything that can fail on the user's input is checked before any file is written.
    enc, name, paths, trained = plan(cfg)
    runtime = make_runtime(cfg.device, cfg.precision, cfg.channels_last, threads=cfg.threads)
    model, frozen = load_encoder(cfg, enc=enc, trained=trained, runtime=runtime)
    bundle = evaluable(load_dataset(enc.dataset, enc.data_root, enc.image_size, cache_dir=enc.cache_dir,
                                          log=say), enc.data_root)
    train, test = subset(bundle.labeled, cfg.train_subset, cfg.seed), bundle.test
    if len(train) == 0 or len(test) == 0:
        raise UserError(f"{enc.data_root} has no labeled train or no test images for the linear probe")
    mean, std = (enc.mean, enc.std) if enc.mean is not None else (bundle.mean, bundle.std)
    num_classes = len(bundle.classes)
    source = "untrained (random init, seed %d)" % cfg.seed if cfg.untrained else cfg.model_path
    say(f"linear probe on {enc.arch} ({enc.stem} stem) features ({model.feature_width}-d) of {source}: "
        f"{len(train)} train, {len(test)} test images, {num_classes} classes, {bundle.image_size}x{bundle.image_size}")

    os.makedirs(os.path.dirname(paths["config.json"]) or ".", exist_ok=True)
    if cfg.overwrite:  # the earlier evaluation's files go now, so none of them is left beside this one's
        for path in remove_files(paths[k] for k in LINEAR_FILES):
            say(f"--overwrite: removed {path} of the earlier evaluation")
    source_key = source_id(cfg.model_path, cfg.config, cfg.untrained)
    atomic_save_json({**dataclasses.asdict(cfg), "source": source_key, "name": name,
                      "results_dir": os.path.dirname(paths["config.json"]), "encoder": dataclasses.asdict(enc),
                      "image_size": bundle.image_size, "mean": list(mean), "std": list(std),
                      "num_classes": num_classes, "classes": bundle.classes, "feature_width": model.feature_width,
                      "precision": runtime.precision, **versions()}, paths["config.json"])

    to_input = lambda batch: normalize(batch, mean, std)  # noqa: E731
    train_y, test_y = train.labels.to(runtime.device), test.labels.to(runtime.device)
    # a run again under the same name starts its log afresh: purge_step 0 hides the earlier one
    log = open_log(cfg.tensorboard_dir or paths[TENSORBOARD], purge_step=0) if cfg.tensorboard else NoLog()
    try:
        log.text("linear/config", config_markdown(dataclasses.asdict(cfg)), 0)
        on_epoch = epoch_writer(paths, name=name, epochs=cfg.epochs, say=say, log=log)
        t0 = time.perf_counter()
        test_x = features(model, images=test.images, to_input=to_input, runtime=runtime, cfg=cfg, what="test set")
        # --augment --no-standardize never looks at un-augmented train features
        needs_train_x = not cfg.augment or cfg.standardize
        train_x = (features(model, images=train.images, to_input=to_input, runtime=runtime, cfg=cfg, what="train set")
                   if needs_train_x else None)
        say(f"features extracted in {time.perf_counter() - t0:.1f} s; training the linear layer")
        if not cfg.augment:
            linear, rows = train_on_features(train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                                             num_classes=num_classes, cfg=cfg, on_epoch=on_epoch, progress=True)
        else:
            linear, rows = train_augmented(model, images=train.images, train_x=train_x, train_y=train_y,
                                           test_x=test_x, test_y=test_y, num_classes=num_classes,
                                           norm=(mean, std), runtime=runtime, cfg=cfg, on_epoch=on_epoch)
    finally:
        log.close()

    moved = changed_tensors(model.f, frozen)
    if moved or model.training:
        raise EncoderChanged(f"the frozen encoder changed during the run ({len(moved)} tensors, e.g. "
                             f"{moved[0] if moved else 'train mode'}); the linear result is not valid")
    atomic_save(linear.cpu().state_dict(), paths["model.pth"])
    last = rows[-1]
    best = max(rows, key=lambda r: r["test_acc@1"])
    say(f"encoder unchanged: {len(frozen)} parameters and buffers bit-identical to the loaded ones")
    written = [paths[kind] for kind in LINEAR_FILES]
    say(f"files: {existing(written + [cfg.tensorboard_dir or paths[TENSORBOARD]] if cfg.tensorboard else written)}")
    print(f"linear probe: test top-1 {last['test_acc@1']:.2f}% top-5 {last['test_acc@5']:.2f}% "
          f"(last epoch {last['epoch']}); best test top-1 {best['test_acc@1']:.2f}% at epoch {best['epoch']} "
          f"(chosen on the test set, for reference only)", flush=True)
    return 0


def plan(cfg: LinearConfig) -> tuple[Encoder, str, dict[str, str], SimCLR | None]:
    """What to evaluate and where its files go, checked before anything is written: (encoder, name, paths,
    the run's model loaded from the weights, or None for --untrained)."""
    saved = find_run_config(cfg.model_path, config=cfg.config, arch=cfg.arch, dataset=cfg.dataset)
    enc = resolve_encoder(saved, arch=cfg.arch, stem=cfg.stem, dataset=cfg.dataset, data_root=cfg.data_root,
                          image_size=cfg.image_size, cache_dir=cfg.cache_dir)
    trained = None if cfg.untrained else open_run(cfg.model_path, config_path=cfg.config, arch=enc.arch,
                                                  stem=enc.stem, saved=saved, encoder_only=True)[0]
    name = evaluated_name(cfg.name, model_path=cfg.model_path, config=cfg.config, untrained=cfg.untrained, enc=enc)
    results_dir = evaluation_dir(cfg.results_dir, cfg.model_path, cfg.config)
    variant = "linear_augment" if cfg.augment else "linear"  # each probe its own files
    paths = run_paths(results_dir, f"{name}_{variant}", LINEAR_FILES)
    what = "linear evaluation with --augment" if cfg.augment else "linear evaluation"
    check_not_taken(paths, source=source_id(cfg.model_path, cfg.config, cfg.untrained), what=what,
                    overwrite=cfg.overwrite)
    paths[TENSORBOARD] = os.path.join(results_dir, f"{name}_{variant}_{TENSORBOARD}")  # a folder, never checked
    return enc, name, paths, trained


def load_encoder(cfg: LinearConfig, enc: Encoder, trained: SimCLR | None,
                 runtime: Runtime) -> tuple[SimCLR, dict[str, torch.Tensor]]:
    """The run's model (or, given None, a seeded random init), frozen, in eval mode; and its encoder's snapshot."""
    seed_everything(cfg.seed)  # the --untrained encoder's initialisation
    model = trained if trained is not None else SimCLR(enc.arch, stem=enc.stem)  # the head is never used here
    model.requires_grad_(False)
    model.eval()  # BatchNorm uses its running statistics and never updates them
    frozen = snapshot(model.f)
    return runtime.place(model), frozen


def features(model: SimCLR, images: torch.Tensor, to_input, runtime: Runtime, cfg: LinearConfig,
             what: str) -> torch.Tensor:
    """Encoder features (N, d) fp32 of uint8 images, with a progress bar."""
    from tqdm import tqdm
    bar = lambda it: tqdm(it, desc=f"features of {what}", leave=False, dynamic_ncols=True)  # noqa: E731
    return forward_in_batches(model.encode, images=images, to_input=to_input, runtime=runtime,
                              batch_size=cfg.eval_batch_size, progress=bar)


def train_augmented(model: SimCLR, images: torch.Tensor, train_x: torch.Tensor | None, train_y: torch.Tensor,
                    test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int, norm: tuple, runtime: Runtime,
                    cfg: LinearConfig, on_epoch) -> tuple[nn.Linear, list[dict]]:
    """--augment: every batch is cropped and flipped, then goes through the frozen encoder."""
    device, width = runtime.device, model.feature_width
    if cfg.standardize:  # statistics of the un-augmented train features, as without --augment
        f_mean, f_std = standardizer(train_x)
    else:
        f_mean, f_std = torch.zeros(width, device=device), torch.ones(width, device=device)
    generator = torch.Generator(device=device)

    @torch.no_grad()
    def augmented(idx: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        generator.manual_seed(mix_seed(cfg.seed, epoch, step))
        batch = images[idx.cpu()].to(device, non_blocking=True)
        x = normalize_float(pad_crop_flip(batch, generator), *norm)
        with runtime.autocast():
            h = model.encode(runtime.prepare(x))
        return (h.float() - f_mean) / f_std

    linear, rows = fit(augmented, train_y=train_y, test_x=(test_x - f_mean) / f_std, test_y=test_y,
                       num_classes=num_classes, cfg=cfg, on_epoch=on_epoch, progress=True)
    return fold(linear, f_mean, f_std), rows


def epoch_writer(paths: dict[str, str], name: str, epochs: int, say,
                 log: NoLog = NoLog()) -> Callable[[list[dict]], None]:
    """After each epoch: the CSV, TensorBoard's linear/COLUMN scalars, and the curves at most every
    PLOT_INTERVAL_S seconds (and at the end)."""
    last_plot = [0.0]

    def on_epoch(rows: list[dict]) -> None:
        atomic_write_csv(paths["statistics.csv"], LINEAR_COLUMNS, rows)
        log.row("linear", rows[-1], rows[-1]["epoch"])
        now = time.perf_counter()
        if now - last_plot[0] >= PLOT_INTERVAL_S or rows[-1]["epoch"] == epochs:
            plot_run_or_warn(rows, path=paths["curves.png"], title=f"{name}: linear probe", warn=say, loss_key="train_loss",
                             acc_keys=("train_acc@1", "test_acc@1"), acc_label="linear probe top-1 (%)")
            last_plot[0] = time.perf_counter()

    return on_epoch
