"""main.py's job: SimCLR pretraining with a weighted kNN evaluation after every epoch.

Reads in calling order: run (configure, then build the run, then simclr.loop.run_epochs over
this job's train_epoch and epoch_row). What every training run shares (the epoch loop, safe
stops, the monitor, checkpoints) is in simclr.loop; what is SimCLR's is here.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import torch
import torch.nn.functional as F

from .augment import AugmentConfig, normalize, pil_transform, two_views
from .checkpoint import load_training_checkpoint, save_weights
from .cli import UserError, first_line
from .curves import plot_run_or_warn
from .data import DataBundle, ImageSet, content_fingerprint, load_dataset, pil_view_batches, subset
from .distributed import World, convert_batchnorm, in_turn
from .engine import (Runtime, count_macs, cpu_has_native_bf16, make_runtime, mix_seed, resolve_device,
                     resolve_precision, seed_everything, versions)
from .files import RunLock, atomic_save_json, check_name_fits, existing, refuse_to_replace, remove_files
from .flags import TRAIN_FLAGS, TrainConfig, check_name, check_values, train_resume_values, train_values
from .knn import knn_accuracy, percent, sharded_features
from .loop import EpochResult, RunState, finished, log_row, open_tensorboard, restore
from .loop import run_epochs
from .methods import attach_modules, build_method
from .model import SimCLR, one_view_per_pass
from .names import PRETRAIN_COLUMNS, RUN_FILES, TENSORBOARD, run_paths
from .optim import Schedule, build_optimizer, scaled_lr, set_lr
from .step import train_step
from .tblog import require_tensorboard

PROBE_LR = 1e-3
NAN_ADVICE = "try a lower --lr, more --warmup_epochs or --precision fp32"


def run(explicit: dict, world: World) -> int:
    """The whole job from the flags given on the command line; returns the exit code."""
    from tqdm import tqdm
    cfg, checkpoint, notes = configure(explicit, world)
    say = (lambda *a: tqdm.write(" ".join(str(x) for x in a))) if world.is_main else (lambda *a: None)
    for note in notes:
        say(note)
    job = Pretraining(cfg, world, say)
    # one process per run name and results folder, from here to the end (released by the kernel on any exit)
    files = [f"{cfg.name}_{kind}" for kind in RUN_FILES]
    lock = RunLock(cfg.results_dir, cfg.name, files).acquire() if world.is_main else None
    try:
        return job.train(checkpoint)
    finally:
        if lock is not None:
            lock.release()


def configure(explicit: dict, world: World) -> tuple[TrainConfig, dict | None, list[str]]:
    """Explicit flags -> (resolved, checked config; checkpoint to resume or None; notes to print)."""
    values, checkpoint, notes = train_values(explicit), None, []
    if values["resume"] is not None:
        path = values["resume"]
        if path == "auto":
            path = resume_path(values)
            if not os.path.exists(path):
                notes.append(f"--resume auto: no checkpoint at {path}, starting from scratch")
                path = None
        if path is not None:
            checkpoint = load_training_checkpoint(path)
            values, notes = train_resume_values(explicit, checkpoint["config"], path)
    device, note = resolve_device(values["device"])
    notes += [note] if note else []
    precision = resolve_precision(values["precision"], device)
    if values["precision"] == "auto":
        notes.append(precision_note(precision, device.type))
    values.update(device=str(device), precision=precision)
    cfg = TrainConfig(**check_values(values, TRAIN_FLAGS))
    check_name(cfg.name)
    check_name_fits(cfg.results_dir, [f"{cfg.name}_{kind}" for kind in RUN_FILES])
    if cfg.overwrite and explicit.get("resume") is not None:
        raise UserError("--overwrite starts the run afresh and --resume continues it; pass one of them")
    if checkpoint is None and not cfg.overwrite:  # a new run never writes over an earlier one of its name
        last = resume_path(cfg)
        refuse_to_replace(run_paths(cfg.results_dir, cfg.name).values(), f"an earlier run named {cfg.name}",
                          "continue it with --resume auto (a finished run trains on with a larger --epochs), "
                          if os.path.exists(last) else "")
    if cfg.view_passes == 2 and cfg.bn_stats != "per_view":
        raise UserError("--view_passes 2 (a view a pass) gives each view its own BatchNorm statistics, which is "
                        "--bn_stats per_view; with --bn_stats joint use --view_passes 1 (or 0, auto)")
    if cfg.view_passes == 2 and world.distributed:
        raise UserError("--view_passes 2 runs one process only (DDP takes one forward pass a step); under torchrun "
                        "use --view_passes 1 (or 0, auto)")
    if cfg.warmup_epochs > cfg.epochs:
        raise UserError(f"--warmup_epochs {cfg.warmup_epochs} is longer than --epochs {cfg.epochs}")
    if cfg.tensorboard and world.is_main:
        require_tensorboard()
    if cfg.batch_size % world.world_size:
        raise UserError(f"--batch_size {cfg.batch_size} (the global batch) must divide by the {world.world_size} "
                        f"processes; use a multiple of {world.world_size}")
    return cfg, checkpoint, notes


def precision_note(precision: str, device_type: str) -> str:
    """The line that says what --precision auto chose and why; the way to exact arithmetic only when it is not."""
    why = {"cuda": "this GPU's fastest safe autocast",
           "cpu": "this CPU computes bf16 natively" if precision == "bf16" else
                  "ONEDNN_MAX_CPU_ISA keeps the kernels off this CPU's bf16 units" if cpu_has_native_bf16(environ={})
                  else "this CPU has no native bf16"}
    hint = "" if precision == "fp32" else "; --precision fp32 for exact arithmetic"
    return f"precision: {precision} (auto: {why[device_type]}{hint})"


def resume_path(values) -> str:
    """RESULTS/NAME_last.pth of the run these values name (what --resume auto continues)."""
    get = values.get if isinstance(values, dict) else lambda key: getattr(values, key)
    return os.path.join(get("results_dir"), f"{get('name')}_last.pth")


# ----------------------------------------------------------------------------- the job

class Pretraining:
    """A SimCLR run: the data, the model and its optimizer, and what each epoch does."""

    def __init__(self, cfg: TrainConfig, world: World, say):
        self.cfg, self.world, self.say = cfg, world, say
        self.runtime = setup_runtime(cfg, world)
        self.bundle = load_data(cfg, world, say)
        self.data = data_identity(self.bundle)
        seed_everything(cfg.seed)  # the model's initialisation
        model, self.params, self.macs = build_model(cfg, bundle=self.bundle, runtime=self.runtime, say=say)
        steps_per_epoch = len(self.bundle.train) // cfg.batch_size  # the last incomplete batch is dropped
        schedule = Schedule(scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling), steps_per_epoch=steps_per_epoch,
                            total_steps=cfg.epochs * steps_per_epoch,
                            warmup_steps=cfg.warmup_epochs * steps_per_epoch, kind=cfg.schedule)
        optimizer = build_optimizer(model, name=cfg.optimizer, lr=schedule.base_lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum)
        # its loss with its own settings (temperature, dcl_sigma, ...: the step never sees them) and its state
        self.method = build_method(cfg, model, self.runtime.device)
        self.passes = view_passes(cfg.view_passes, device=self.runtime.device, bn_stats=cfg.bn_stats,
                                  distributed=world.distributed)
        one_view_per_pass(model, self.passes == 2)  # a view a pass: each per-view BatchNorm sees one view
        if self.passes == 2 and not cfg.view_passes:
            say("views: a view a pass (auto on a CPU, where half the batch fits the caches; --view_passes 1 runs "
                "both at once)")
        self.net, self.encode = wrap_for_speed(model, self.runtime, world)
        self.train_images, self.bundle = place_images(cfg, bundle=self.bundle, runtime=self.runtime, say=say)
        self.train_labels = self.bundle.train.labels.to(self.runtime.device)  # (N,), -1 for unlabeled images
        self.aug = AugmentConfig(image_size=self.bundle.image_size, mean=self.bundle.mean, std=self.bundle.std,
                                 min_crop_scale=cfg.min_crop_scale, jitter_strength=cfg.jitter_strength,
                                 blur=cfg.blur)
        paths = run_paths(cfg.results_dir, cfg.name)
        self.state = RunState(name=cfg.name, script="main.py", epochs=cfg.epochs, batch_size=cfg.batch_size,
                              world=world, runtime=self.runtime, model=model, optimizer=optimizer,
                              scaler=self.runtime.grad_scaler(), schedule=schedule, paths=paths,
                              csv_columns=PRETRAIN_COLUMNS, config=dataclasses.asdict(cfg), say=say, nan_advice=NAN_ADVICE,
                              extra=self.checkpoint_extra)
        self.probe = None
        if cfg.online_probe and self.evaluates and bool((self.bundle.train.labels >= 0).any()):
            self.probe = OnlineProbe(model.feature_width, num_classes=len(self.bundle.classes),
                                     device=self.runtime.device, world=world)
        elif cfg.online_probe:
            say("note: no labeled training images, so no online probe (its CSV columns stay empty)")

    def checkpoint_extra(self) -> dict:
        """The job's own entries of NAME_last.pth: the data's identity, the method's state, the probe's."""
        extra = {"data": self.data, "method": self.method.state_dict()}
        return extra if self.probe is None else {**extra, "online_probe": self.probe.state_dict()}

    @property
    def evaluates(self) -> bool:
        """False for a folder of unlabeled images only: nothing to evaluate against."""
        return len(self.bundle.test) > 0 and len(self.bundle.labeled) > 0

    def train(self, checkpoint: dict | None) -> int:
        """Restore if resuming, write the config, then train epoch by epoch; returns the exit code."""
        cfg, state, say = self.cfg, self.state, self.say
        if checkpoint is not None:
            path = resume_path(cfg) if cfg.resume == "auto" else cfg.resume
            check_same_data(checkpoint, path=path, data=self.data, data_root=cfg.data_root)
            restore(state, checkpoint=checkpoint, path=path, what=f"{cfg.arch} SimCLR model")
            restore_method(self.method, checkpoint=checkpoint, path=path, name=cfg.method)
            if self.probe is not None:
                self.probe.restore(checkpoint.get("online_probe"), path)
            if finished(state):  # nothing to train: the run's files stay as they are
                say(f"{cfg.name} is finished ({state.start_epoch} of {cfg.epochs} epochs; pass a larger --epochs to "
                    f"train on): {existing(state.paths[k] for k in ('model.pth', 'statistics.csv', 'config.json'))}")
                return 0
        if self.world.is_main:
            if checkpoint is None and cfg.overwrite:
                for path in remove_files(state.paths.values()):
                    say(f"--overwrite: removed {path} of the earlier run")
            self.write_config()
            if cfg.tensorboard:
                logdir = self.tensorboard_dir
                open_tensorboard(state, logdir, dataclasses.asdict(cfg))
                say(f"tensorboard: event files in {logdir} (tensorboard --logdir {os.path.dirname(logdir) or '.'})")
        try:
            if cfg.knn_at_start and self.evaluates and not state.history and state.start_step == 0:
                figures = {**self.evaluate(), "probe_acc@1": None, "probe_acc@5": None}  # no probe trained yet
                state.history.append({"epoch": 0, **figures})
                say(f"untrained encoder: kNN top-1 {figures['test_acc@1']:.2f}% top-5 {figures['test_acc@5']:.2f}%")
                log_row(state, state.history[-1])
            code = run_epochs(state, self)
        finally:
            state.log.close()  # what was logged reaches the disk, also when the run stops or fails
        if code == 0:
            best = f"best kNN top-1 {state.best:.2f}%" if self.evaluates else "no evaluation (no labeled data)"
            say(f"done: {best}; files {self.written()}")
        return code

    @property
    def tensorboard_dir(self) -> str:
        return self.cfg.tensorboard_dir or os.path.join(self.cfg.results_dir, f"{self.cfg.name}_{TENSORBOARD}")

    def written(self) -> str:
        """Every file (and the TensorBoard folder) this run has on disk, comma-separated, for the closing line."""
        paths = [self.state.paths[kind] for kind in RUN_FILES]
        return existing(paths + [self.tensorboard_dir] if self.cfg.tensorboard else paths)

    def write_config(self) -> None:
        """NAME_config.json: the resolved config (as in NAME_last.pth), plus data, model and versions."""
        bundle, state = self.bundle, self.state
        atomic_save_json({**dataclasses.asdict(self.cfg), "base_lr": state.schedule.base_lr,
                          "world_size": self.world.world_size, "num_classes": len(bundle.classes),
                          "classes": bundle.classes, "mean": list(bundle.mean), "std": list(bundle.std),
                          "train_images": len(bundle.train), "parameters": self.params,
                          "macs_per_image": self.macs, **versions(), "data_fingerprint": self.data["fingerprint"]},
                         state.paths["config.json"])

    # ------------------------------------------------------------------------- one epoch

    def train_epoch(self, epoch: int, monitor) -> None:
        """The steps of an epoch from monitor.first: the step's lr, then simclr.step.train_step (views, forward,
        gathered projections, the method's loss, backward, optimizer step, its after-step hook, online probe),
        then the monitor."""
        state = self.state
        for step, views, labels in self.epoch_views(epoch, monitor.first):
            set_lr(state.optimizer, state.schedule.lr(epoch * state.steps_per_epoch + step))
            # views (2b, 3, S, S) = [view 1; view 2]; labels (b,), -1 unlabeled (supcon's positives, the probe's targets)
            loss = train_step(self.net, optimizer=state.optimizer, views=views, labels=labels, method=self.method,
                              runtime=self.runtime, scaler=state.scaler, probe=self.probe, passes=self.passes)
            if monitor.update(step, loss):
                break

    def epoch_views(self, epoch: int, first: int):
        """(step, views, labels) for the epoch's steps from `first`: views (2b, 3, S, S) = [view 1; view 2]
        on the device, labels (b,) of the images (-1 for unlabeled ones).

        The epoch's permutation is the same on every rank (seeded by epoch); each rank takes its share
        of each global batch. tensor backend: augmented here, on the device, seeded by (seed, epoch,
        step, rank); pil backend: built by DataLoader workers, seeded per image.
        """
        cfg, world, device = self.cfg, self.world, self.runtime.device
        images, local = self.train_images, cfg.batch_size // world.world_size
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(mix_seed(cfg.seed, epoch)))
        on_device = perm.to(device)  # the labels' indices: a host-to-device copy per step would wait for the GPU

        def indices(step: int, order: torch.Tensor = perm) -> torch.Tensor:
            start = step * cfg.batch_size + world.rank * local
            return order[start:start + local]

        steps = range(first, self.state.steps_per_epoch)
        if cfg.aug_backend == "tensor":
            on_images = perm.to(images.device)
            generator = torch.Generator(device=images.device)
            for step in steps:
                generator.manual_seed(mix_seed(cfg.seed, epoch, step, world.rank))
                views = two_views(images[indices(step, on_images)].to(device, non_blocking=True), self.aug, generator)
                yield step, views, self.train_labels[indices(step, on_device)]
        else:
            batches = pil_view_batches(images, transform=pil_transform(self.aug),
                                       batches=[indices(s).tolist() for s in steps], seed=cfg.seed,
                                       epoch=epoch, workers=cfg.workers, pin_memory=device.type == "cuda")
            for step, views in zip(steps, batches):
                yield step, views.to(device, non_blocking=True), self.train_labels[indices(step, on_device)]

    # ------------------------------------------------------------------------- end of an epoch

    def epoch_row(self, epoch: int, result: EpochResult) -> dict:
        """Evaluate if due, save the best weights; returns the CSV row."""
        cfg, state = self.cfg, self.state
        row = {"epoch": epoch + 1, "train_loss": result.sums[0].item() / state.steps_per_epoch, "test_acc@1": None,
               "test_acc@5": None, "lr": state.optimizer.param_groups[0]["lr"], "epoch_seconds": result.seconds,
               "train_images_per_second": state.steps_per_epoch * cfg.batch_size / result.seconds,
               "knn_seconds": None, "probe_acc@1": None, "probe_acc@5": None}
        if not self.evaluates:  # nothing to choose the best epoch by: the weights of the last one
            if self.world.is_main:
                save_weights(state.model, state.paths["model.pth"])
        elif (epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs:
            row.update(self.evaluate())
            if row["test_acc@1"] > state.best and self.world.is_main:
                save_weights(state.model, state.paths["model.pth"])
            state.best = max(state.best, row["test_acc@1"])
        return row

    def plot(self, history: list[dict]) -> None:
        plot_run_or_warn(history, path=self.state.paths["curves.png"], title=self.cfg.name, warn=self.say)

    def describe(self, row: dict) -> str:
        acc = (f"kNN top-1 {row['test_acc@1']:.2f}% top-5 {row['test_acc@5']:.2f}%"
               if row["test_acc@1"] is not None else "no kNN this epoch")
        if row.get("probe_acc@1") is not None:
            acc += f", probe top-1 {row['probe_acc@1']:.2f}%"
        return (f"epoch {row['epoch']}/{self.cfg.epochs}: loss {row['train_loss']:.4f}, {acc}, "
                f"{row['epoch_seconds']:.1f} s, {row['train_images_per_second']:.0f} images/s")

    def evaluate(self) -> dict:
        """The CSV's figures: weighted kNN top-1, top-5 (%) of test images against the bank, on encoder features h;
        the online probe's top-1, top-5 on the same test features (None without a probe); the seconds."""
        from tqdm import tqdm
        t0 = time.perf_counter()
        cfg, bundle, world, model = self.cfg, self.bundle, self.world, self.state.model
        was_training = model.training
        model.eval()
        to_input = lambda batch: normalize(batch, bundle.mean, bundle.std)  # noqa: E731

        def features(split: ImageSet, what: str) -> torch.Tensor:
            bar = lambda it: tqdm(it, desc=f"  features of {what}", leave=False, disable=not world.is_main)  # noqa: E731
            return sharded_features(self.encode, images=split.images, to_input=to_input, runtime=self.runtime,
                                    batch_size=cfg.eval_batch_size, world=world, progress=bar)

        try:
            bank, test = features(bundle.labeled, "kNN bank"), features(bundle.test, "test set")
            top1, top5 = knn_accuracy(test, test_labels=bundle.test.labels, bank_features=bank,
                                      bank_labels=bundle.labeled.labels, num_classes=len(bundle.classes), k=cfg.k,
                                      temperature=cfg.knn_temperature)
            probe = self.probe.accuracy(test, bundle.test.labels) if self.probe is not None else (None, None)
        finally:
            model.train(was_training)
        return {"test_acc@1": top1, "test_acc@5": top5, "probe_acc@1": probe[0], "probe_acc@5": probe[1],
                "knn_seconds": time.perf_counter() - t0}


class OnlineProbe:
    """A linear classifier on the encoder features h, trained in every step beside the encoder.

    It sees h detached, after the encoder's step, with its own optimizer and in fp32, so the encoder's
    weights are the same with and without it. Adam at a fixed 1e-3: h drifts as the encoder learns, and
    an adaptive step follows it without a schedule tied to the run's. Zero-initialised: it draws nothing
    from the random generators the run's views come from. Under torchrun every rank trains on its own
    views, with the loss and gradients averaged over all ranks' labeled views, so the copies stay equal.
    """

    def __init__(self, width: int, num_classes: int, device: torch.device, world: World):
        # built on the meta device, so its default random initialisation never runs
        self.linear = torch.nn.Linear(width, num_classes, device="meta").to_empty(device=device)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        self.optimizer = torch.optim.Adam(self.linear.parameters(), lr=PROBE_LR)
        self.world = world

    def step(self, h: torch.Tensor, labels: torch.Tensor) -> None:
        """One step on h (2b, width) of [view 1; view 2] with labels (b,); unlabeled (-1) views are left out.
        No host-device sync: the mean is over a count kept on the device."""
        targets = labels.repeat(2)                                                  # (2b,) both views
        total = F.cross_entropy(self.linear(h.float()), targets, ignore_index=-1, reduction="sum")
        count = (targets >= 0).sum().float()
        if self.world.distributed:
            torch.distributed.all_reduce(count)
        self.optimizer.zero_grad(set_to_none=True)
        (total / count.clamp_min(1)).backward()
        if self.world.distributed:
            for p in self.linear.parameters():
                torch.distributed.all_reduce(p.grad)  # sums of per-rank shares of the global mean
        self.optimizer.step()

    @torch.no_grad()
    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """Top-1, top-5 (%) of features (N, width) against labels (N,)."""
        logits = self.linear(features.float())                                      # (N, classes)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()             # (N, 5)
        hits = top == labels.cpu()[:, None]
        n = hits.shape[0]
        return percent(int(hits[:, 0].sum()), n), percent(int(hits.any(dim=1).sum()), n)

    def state_dict(self) -> dict:
        return {"linear": {k: v.detach().cpu() for k, v in self.linear.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def restore(self, saved, path: str) -> None:
        """Put back what state_dict saved in NAME_last.pth; a checkpoint without it (written with the probe
        off, or before it existed, which resume reads as off) cannot be one that has it on."""
        if not isinstance(saved, dict):
            raise UserError(f"--resume {path}: it has no online_probe entry although its run has --online_probe; "
                            f"the file is damaged")
        try:
            self.linear.load_state_dict(saved["linear"])
            self.optimizer.load_state_dict(saved["optimizer"])
        except Exception as e:  # noqa: BLE001 - a malformed part of an untrusted file is the user's to fix
            raise UserError(f"--resume {path}: its online_probe entry does not fit this run ({first_line(e)[:120]}); "
                            f"the file is damaged") from None


def restore_method(method, checkpoint: dict, path: str, name: str) -> None:
    """Put back the method's state from NAME_last.pth; a checkpoint without it is from before methods had
    state, so a simclr run (which has none)."""
    saved = checkpoint.get("method", {} if name == "simclr" else None)
    try:
        if not isinstance(saved, dict):
            raise ValueError("no method entry")
        method.load_state_dict(saved)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"--resume {path}: its state of --method {name} does not fit this run ({first_line(e)[:120]}); "
                        f"the file is damaged") from None


# ----------------------------------------------------------------------------- the data a run was trained on

def data_identity(bundle: DataBundle) -> dict:
    """What a resume compares: the classes, the training image count and a fingerprint of their content."""
    return {"classes": list(bundle.classes), "train_images": len(bundle.train),
            "fingerprint": content_fingerprint(bundle.train)}


def check_same_data(checkpoint: dict, path: str, data: dict, data_root: str) -> None:
    """Refuse to resume on other data than the checkpoint's (its "data" entry; an older checkpoint's
    NAME_config.json beside it gives classes and count only); one line naming what differs."""
    saved = checkpoint.get("data")
    if not isinstance(saved, dict):
        saved = {}
        beside = path[:-len("_last.pth")] + "_config.json" if path.endswith("_last.pth") else None
        if beside is not None and os.path.isfile(beside):
            try:
                with open(beside) as f:
                    config = json.load(f)
                saved = {k: config[k] for k in ("classes", "train_images") if k in config}
            except (OSError, ValueError, TypeError, RecursionError):
                saved = {}
    differs = []
    if "classes" in saved and saved["classes"] != data["classes"]:
        shown = lambda c: ", ".join(map(str, c[:5])) + (", ..." if len(c) > 5 else "")  # noqa: E731
        differs.append(f"classes {len(saved['classes'])} ({shown(saved['classes'])}) -> "
                       f"{len(data['classes'])} ({shown(data['classes'])})")
    if "train_images" in saved and saved["train_images"] != data["train_images"]:
        differs.append(f"training images {saved['train_images']} -> {data['train_images']}")
    if not differs and "fingerprint" in saved and saved["fingerprint"] != data["fingerprint"]:
        differs.append("same classes and count, other images")
    if differs:
        raise UserError(f"--resume {path}: --data_root {data_root} is not the data this run was trained on "
                        f"({'; '.join(differs)}); pass the run's data, or start a new run with another --name")


# ----------------------------------------------------------------------------- build steps, in calling order

def setup_runtime(cfg: TrainConfig, world: World) -> Runtime:
    """Device (under torchrun: this process's GPU), precision, memory format, compile, cuDNN, threads."""
    device = torch.device(cfg.device)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    return make_runtime(device, precision=cfg.precision, channels_last=cfg.channels_last, compile=cfg.compile,
                        threads=cfg.threads)


def load_data(cfg: TrainConfig, world: World, say) -> DataBundle:
    """The data set (one process at a time fills a shared cache), the training subset, and its checks."""
    bundle = in_turn(lambda: load_dataset(cfg.dataset, cfg.data_root, cfg.image_size, cache_dir=cfg.cache_dir,
                                          log=say), world)
    train_set = subset(bundle.train, cfg.train_subset, cfg.seed)
    shared_bank = bundle.labeled is bundle.train
    bundle = dataclasses.replace(bundle, train=train_set, labeled=train_set if shared_bank else bundle.labeled)
    n_train, n_bank = len(bundle.train), len(bundle.labeled)
    if cfg.batch_size > n_train:
        raise UserError(f"--batch_size {cfg.batch_size} is larger than the {n_train} training images; "
                        f"use --batch_size {n_train} or less")
    note = drop_last_note(n_train, cfg.batch_size, world.world_size)
    if note is not None:
        say(note)
    if cfg.loss == "supcon" and not (bundle.train.labels >= 0).any():
        raise UserError(f"--loss supcon needs labels, and none of the {n_train} training images of {cfg.data_root} "
                        f"has one; use --loss ntxent or dcl")
    if n_bank == 0 and len(bundle.test) == 0:  # a folder of unlabeled/ only
        say(f"note: {cfg.data_root} holds unlabeled images only: training without evaluation (empty accuracy "
            f"columns; NAME_model.pth is the last epoch's weights); evaluate them with linear.py --data_root "
            f"a folder with train/<class>/ and test/<class>/")
        return bundle
    if cfg.k > n_bank:
        raise UserError(f"--k {cfg.k} is larger than the {n_bank} images of the kNN bank; use --k {n_bank} or less")
    if len(bundle.test) == 0:
        raise UserError(f"the test split of {cfg.data_root} has no images")
    return bundle


def drop_last_note(n_train: int, batch_size: int, world_size: int = 1, share: float = 0.1) -> str | None:
    """A note when the incomplete last batch, dropped every epoch, is more than `share` of the training images,
    naming the batch size (at most the one given, a multiple of world_size) that leaves out fewest; else None."""
    dropped = n_train % batch_size
    if dropped <= share * n_train:
        return None
    steps = -(-n_train // batch_size)                           # as many steps as would cover every image
    better = max(2, world_size, n_train // steps // world_size * world_size)  # a batch main.py accepts
    left = n_train % better
    note = (f"note: --batch_size {batch_size} leaves out {dropped} of the {n_train} training images every epoch "
            f"({100 * dropped / n_train:.0f}%, the incomplete last batch)")
    if left >= dropped:  # no accepted batch size leaves out fewer
        return note
    return note + f"; --batch_size {better} " + ("uses them all" if left == 0 else f"leaves out {left}")


def build_model(cfg: TrainConfig, bundle: DataBundle, runtime: Runtime, say) -> tuple[SimCLR, int, int]:
    """The SimCLR model on the run's device, with its size printed; returns (model, parameters, MACs)."""
    model = attach_modules(SimCLR(cfg.arch, feature_dim=cfg.feature_dim, proj_hidden_dim=cfg.proj_hidden_dim,
                                  stem=cfg.stem, grad_checkpoint=cfg.grad_checkpoint,
                                  bn_stats=cfg.bn_stats, proj_layers=cfg.proj_layers,
                                  head=cfg.head), cfg)  # and the method's (nnclr: predictor)
    params, macs, counted = count_macs(model, bundle.image_size)
    widths = [model.feature_width] + [cfg.proj_hidden_dim] * (cfg.proj_layers - 1) + [cfg.feature_dim]
    last = " (SimCLRv2's last layer)" if cfg.head == "v2" else ""
    say(f"model: {cfg.arch} ({cfg.stem} stem) + head {'-'.join(map(str, widths))}{last}: {params / 1e6:.2f} M parameters, "
        f"{macs / 1e9:.3f} G MACs per {bundle.image_size}x{bundle.image_size} image ({counted})")
    return runtime.place(model), params, macs


def view_passes(asked: int, device: torch.device, bn_stats: str, distributed: bool) -> int:
    """--view_passes with 0 (auto) resolved: a view a pass on a CPU, where a batch of one view's activations fits
    the caches that both views' overflow (docs/speed.md), when per-view BatchNorm makes it the same arithmetic
    and no DDP needs one pass; else both views in one pass."""
    if asked:
        return asked
    return 2 if device.type == "cpu" and bn_stats == "per_view" and not distributed else 1


def wrap_for_speed(model: SimCLR, runtime: Runtime, world: World):
    """(what trains, what encodes): DDP with global BatchNorm under torchrun, then torch.compile if asked."""
    net = model
    if world.distributed:
        # in place (the optimizer keeps the same parameters); the encoder's and head's only: a method's
        # modules (nnclr's predictor) run on the gathered batch, whose statistics are global already
        for part in (model.f, model.g):
            convert_batchnorm(part, runtime.device)
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    return runtime.maybe_compile(net), runtime.maybe_compile(model.encode)


def place_images(cfg: TrainConfig, bundle: DataBundle, runtime: Runtime, say) -> tuple[torch.Tensor, DataBundle]:
    """Keep the uint8 training images on the GPU when they fit comfortably (the tensor backend); else stream."""
    images = bundle.train.images
    if cfg.aug_backend != "tensor" or runtime.device.type != "cuda":
        return images, bundle
    free, _ = torch.cuda.mem_get_info(runtime.device)
    if images.numel() >= 0.3 * free:
        say(f"note: the {images.numel() / 2**30:.1f} GiB of training images stay in host memory (GPU too small)")
        return images, bundle
    images = images.to(runtime.device)
    if bundle.labeled is bundle.train:  # the kNN bank is the training set: share the GPU copy
        on_gpu = ImageSet(images, bundle.train.labels)
        bundle = dataclasses.replace(bundle, train=on_gpu, labeled=on_gpu)
    return images, bundle
