"""Train SimCLR on CIFAR-scale images, with a weighted kNN evaluation after every epoch.

    python main.py --batch_size 1024 --epochs 500                 # the seed's run: CIFAR-10, ResNet-50
    python main.py --recipe paper                                  # LARS, warm-up + cosine (paper, B.9)
    python main.py --dataset folder --data_root data/cifar10-jpg --arch resnet18 --epochs 5
    python main.py --resume auto ...                               # continue a stopped run
    torchrun --nproc_per_node=4 main.py --batch_size 4096          # several GPUs, global batch 4096

Writes results/NAME_statistics.csv, NAME_model.pth (best kNN top-1), NAME_last.pth (resume
checkpoint), NAME_config.json and NAME_curves.png, and with --tensorboard event files in
results/NAME_tb/; see README.md. The file reads in calling
order: main -> configure -> train (build steps, then per epoch: train_epoch over epoch_views,
end_epoch).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from simclr.augment import AugmentConfig, normalize, pil_transform, two_views
from simclr.checkpoint import load_strict, load_training_checkpoint, restore_rng, save_training_checkpoint, save_weights
from simclr.cli import NonFiniteLoss, StopRequest, UserError, first_line, resume_command, run_cli
from simclr.data import DataBundle, ImageSet, load_dataset, pil_view_batches, subset
from simclr.distributed import World, any_rank, close_world, convert_batchnorm, in_turn, init_world, mean_over_ranks
from simclr.engine import (Runtime, count_macs, make_runtime, mix_seed, resolve_device, resolve_precision,
                    seed_everything, train_step)
from simclr.files import RunLock, atomic_save_json, atomic_write_csv
from simclr.flags import (TRAIN_FLAGS, TrainConfig, build_parser, check_name, check_values, resume_values,
                   train_values)
from simclr.knn import knn_accuracy, sharded_features
from simclr.model import SimCLR
from simclr.optim import build_optimizer, lr_at, scaled_lr, set_lr
from simclr.curves import plot_run_or_warn
from simclr.tblog import NoLog, config_markdown, open_log, require_tensorboard

CSV_COLUMNS = ("epoch", "train_loss", "test_acc@1", "test_acc@5", "lr", "epoch_seconds",
               "train_images_per_second", "knn_seconds")
RESULT_FILES = ("statistics.csv", "model.pth", "last.pth", "config.json", "curves.png")
OOM_ADVICE = ("try --grad_checkpoint, --precision bf16, a smaller --batch_size or --eval_batch_size, "
              "or more GPUs with torchrun")
# Under torchrun, ranks compare stop requests and non-finite losses every this many steps.
AGREE_EVERY = 10
# Seconds between two reads of the loss for the progress bar (and TensorBoard): each read waits for
# the device, so a few per second, never one per step.
READ_EVERY_S = 0.5


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    world = World()

    def job() -> int:
        nonlocal world
        parser = build_parser(TRAIN_FLAGS, "SimCLR on CIFAR-scale images with weighted kNN evaluation.",
                              "Files: results/NAME_statistics.csv, NAME_model.pth, NAME_last.pth, NAME_config.json, "
                              "NAME_curves.png (see README.md).", explicit_only=True)
        explicit = vars(parser.parse_args(argv))  # only the flags given: recipes and resume fill the rest
        world = init_world(explicit.get("device", "auto"))
        cfg, checkpoint, notes = configure(explicit, world)
        return train(cfg, world, checkpoint, notes)

    return run_cli(job, OOM_ADVICE, prefix=lambda: f"[rank {world.rank}] " if world.distributed else "",
                   cleanup=lambda: close_world(world))


def configure(explicit: dict, world: World) -> tuple[TrainConfig, dict | None, list[str]]:
    """Explicit flags -> (resolved, checked config; checkpoint to resume or None; notes to print)."""
    values, checkpoint, notes = train_values(explicit), None, []
    if values["resume"] is not None:
        path = values["resume"]
        if path == "auto":
            path = os.path.join(values["results_dir"], f"{values['name']}_last.pth")
            if not os.path.exists(path):
                notes.append(f"--resume auto: no checkpoint at {path}, starting from scratch")
                path = None
        if path is not None:
            checkpoint = load_training_checkpoint(path)
            values, notes = resume_values(explicit, checkpoint["config"], path)
    device, note = resolve_device(values["device"])
    notes += [note] if note else []
    precision = resolve_precision(values["precision"], device)
    if values["precision"] == "auto":
        why = {"cuda": "this GPU's fastest safe autocast",
               "cpu": "this CPU computes bf16 natively" if precision == "bf16" else "this CPU has no native bf16"}
        notes.append(f"precision: {precision} (auto: {why[device.type]}; --precision fp32 for exact arithmetic)")
    values.update(device=str(device), precision=precision)
    cfg = TrainConfig(**check_values(values, TRAIN_FLAGS))
    check_name(cfg.name)
    if cfg.warmup_epochs > cfg.epochs:
        raise UserError(f"--warmup_epochs {cfg.warmup_epochs} is longer than --epochs {cfg.epochs}")
    if cfg.tensorboard and world.is_main:
        require_tensorboard()
    if cfg.batch_size % world.world_size:
        raise UserError(f"--batch_size {cfg.batch_size} (the global batch) must divide by the {world.world_size} "
                        f"processes; use a multiple of {world.world_size}")
    return cfg, checkpoint, notes


# ----------------------------------------------------------------------------- the run

@dataclass
class Run:
    """One run's state, built once by build_run, then driven epoch by epoch."""
    cfg: TrainConfig
    world: World
    runtime: Runtime
    bundle: DataBundle                 # train = the images trained on (a subset, maybe); memory = kNN bank
    train_images: torch.Tensor         # uint8 (N, S, S, 3), on the GPU when it fits (tensor backend)
    aug: AugmentConfig
    model: SimCLR                      # what is saved: never compiled, never wrapped
    net: torch.nn.Module               # what is trained: the model, maybe DDP-wrapped and compiled
    encode: object                     # the encoder's forward for features, maybe compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    schedule: dict                     # base_lr, steps_per_epoch, warmup_steps, total_steps
    paths: dict[str, str]
    say: object
    params: int = 0
    macs: int = 0
    start_epoch: int = 0
    start_step: int = 0
    carried: dict = field(default_factory=lambda: dict(loss_sum=0.0, seconds=0.0))  # of a mid-epoch checkpoint
    history: list[dict] = field(default_factory=list)
    best_acc: float = -1.0
    log: NoLog = field(default_factory=NoLog)  # TensorBoard (rank 0 with --tensorboard), else does nothing

    @property
    def steps_per_epoch(self) -> int:
        return self.schedule["steps_per_epoch"]


def train(cfg: TrainConfig, world: World, checkpoint: dict | None, notes: list[str]) -> int:
    """The whole job: build, train epoch by epoch, write files; returns the exit code."""
    from tqdm import tqdm
    say = (lambda *a: tqdm.write(" ".join(str(x) for x in a))) if world.is_main else (lambda *a: None)
    for note in notes:
        say(note)
    run = build_run(cfg, world, say)
    # one process per run name and results folder, from here to the end (released by the kernel on any exit)
    lock = RunLock(cfg.results_dir, cfg.name).acquire() if world.is_main else None
    try:
        return train_run(run, checkpoint)
    finally:
        if lock is not None:
            lock.release()


def train_run(run: "Run", checkpoint: dict | None) -> int:
    """Restore if resuming, write the config, then train epoch by epoch; returns the exit code."""
    cfg, world, say = run.cfg, run.world, run.say
    if checkpoint is not None:
        restore(run, checkpoint)
    if world.is_main:
        write_config(run)
        if cfg.tensorboard:
            open_tensorboard(run)
    try:
        if cfg.knn_at_start and not run.history and run.start_step == 0:
            top1, top5, seconds = evaluate(run)
            run.history.append({"epoch": 0, "test_acc@1": top1, "test_acc@5": top5, "knn_seconds": seconds})
            say(f"untrained encoder: kNN top-1 {top1:.2f}% top-5 {top5:.2f}%")
            log_epoch(run, run.history[-1])

        with StopRequest() as stop:
            for epoch in range(run.start_epoch, cfg.epochs):
                result = train_epoch(run, epoch, stop)
                if result.done < run.steps_per_epoch:  # stopped mid-epoch: save exactly where we are
                    if world.is_main:
                        save_last(run, epoch, result.done, result.loss_sum.item(), result.seconds)
                        atomic_write_csv(run.paths["statistics.csv"], CSV_COLUMNS, run.history)
                    return stopped(stop, run)
                row = end_epoch(run, epoch, result)
                acc = (f"kNN top-1 {row['test_acc@1']:.2f}% top-5 {row['test_acc@5']:.2f}%"
                       if row["test_acc@1"] is not None else "no kNN this epoch")
                say(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, {acc}, "
                    f"{row['epoch_seconds']:.1f} s, {row['train_images_per_second']:.0f} images/s")
                if epoch + 1 < cfg.epochs and any_rank([stop.requested], world, run.runtime.device)[0]:
                    return stopped(stop, run)
    finally:
        run.log.close()  # what was logged reaches the disk, also when the run stops or fails
    say(f"done: best kNN top-1 {run.best_acc:.2f}%; weights {run.paths['model.pth']}, "
        f"statistics {run.paths['statistics.csv']}")
    return 0


# ----------------------------------------------------------------------------- build steps, in calling order

def build_run(cfg: TrainConfig, world: World, say) -> Run:
    """Speed settings, data, model, optimizer, files: everything a run needs before its first step."""
    runtime = setup_runtime(cfg, world)
    bundle = load_data(cfg, world, say)
    seed_everything(cfg.seed)  # the model's initialisation
    model, params, macs = build_model(cfg, bundle, runtime, say)
    steps_per_epoch = len(bundle.train) // cfg.batch_size  # the last incomplete batch is dropped
    base_lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
    schedule = dict(name=cfg.schedule, base_lr=base_lr, steps_per_epoch=steps_per_epoch,
                    warmup_steps=cfg.warmup_epochs * steps_per_epoch, total_steps=cfg.epochs * steps_per_epoch)
    optimizer = build_optimizer(model, cfg.optimizer, base_lr, cfg.weight_decay, cfg.momentum)
    net, encode = wrap_for_speed(model, runtime, world)
    train_images, bundle = place_images(cfg, bundle, runtime, say)
    aug = AugmentConfig(image_size=bundle.image_size, mean=bundle.mean, std=bundle.std,
                        min_crop_scale=cfg.min_crop_scale, jitter_strength=cfg.jitter_strength, blur=cfg.blur)
    paths = {kind: os.path.join(cfg.results_dir, f"{cfg.name}_{kind}") for kind in RESULT_FILES}
    return Run(cfg, world, runtime, bundle, train_images, aug, model, net, encode, optimizer, runtime.grad_scaler(),
               schedule, paths, say, params, macs)


def setup_runtime(cfg: TrainConfig, world: World) -> Runtime:
    """Device (under torchrun: this process's GPU), precision, memory format, compile, cuDNN, threads."""
    device = torch.device(cfg.device)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    return make_runtime(device, cfg.precision, cfg.channels_last, cfg.compile, cfg.threads)


def load_data(cfg: TrainConfig, world: World, say) -> DataBundle:
    """The data set (one process at a time fills a shared cache), the training subset, and its checks."""
    bundle = in_turn(lambda: load_dataset(cfg.dataset, cfg.data_root, cfg.image_size, cache_dir=cfg.cache_dir,
                                          log=say), world)
    train_set = subset(bundle.train, cfg.train_subset, cfg.seed)
    shared_bank = bundle.memory is bundle.train
    bundle = dataclasses.replace(bundle, train=train_set, memory=train_set if shared_bank else bundle.memory)
    n_train, n_bank = len(bundle.train), len(bundle.memory)
    if cfg.batch_size > n_train:
        raise UserError(f"--batch_size {cfg.batch_size} is larger than the {n_train} training images; "
                        f"use --batch_size {n_train} or less")
    if cfg.k > n_bank:
        raise UserError(f"--k {cfg.k} is larger than the {n_bank} images of the kNN bank; use --k {n_bank} or less")
    if len(bundle.test) == 0:
        raise UserError(f"the test split of {cfg.data_root} has no images")
    return bundle


def build_model(cfg: TrainConfig, bundle: DataBundle, runtime: Runtime, say) -> tuple[SimCLR, int, int]:
    """The SimCLR model on the run's device, with its size printed; returns (model, parameters, MACs)."""
    model = SimCLR(cfg.arch, cfg.feature_dim, cfg.proj_hidden_dim, cfg.stem, cfg.grad_checkpoint, cfg.bn_stats)
    params, macs, counted = count_macs(model, bundle.image_size)
    say(f"model: {cfg.arch} ({cfg.stem} stem) + head {model.feature_width}-{cfg.proj_hidden_dim}-"
        f"{cfg.feature_dim}: {params / 1e6:.2f} M parameters, {macs / 1e9:.3f} G MACs per "
        f"{bundle.image_size}x{bundle.image_size} image ({counted})")
    return runtime.place(model), params, macs


def wrap_for_speed(model: SimCLR, runtime: Runtime, world: World):
    """(what trains, what encodes): DDP with global BatchNorm under torchrun, then torch.compile if asked."""
    net = model
    if world.distributed:
        convert_batchnorm(model, runtime.device)  # in place: the optimizer keeps the same parameters
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
    if bundle.memory is bundle.train:  # the kNN bank is the training set: share the GPU copy
        on_gpu = ImageSet(images, bundle.train.labels)
        bundle = dataclasses.replace(bundle, train=on_gpu, memory=on_gpu)
    return images, bundle


def restore(run: Run, checkpoint: dict) -> None:
    """Continue from a NAME_last.pth checkpoint: weights, optimizer, scaler, position, history, RNG.

    Every part is checked as it is put back: a checkpoint that loads but does not fit this run is
    one UserError naming the part, never a traceback halfway through."""
    path = run.cfg.resume
    if run.cfg.resume == "auto":
        path = os.path.join(run.cfg.results_dir, f"{run.cfg.name}_last.pth")
    if checkpoint["epoch"] > run.cfg.epochs:
        raise UserError(f"--resume {path}: it has done {checkpoint['epoch']} epochs, more than --epochs {run.cfg.epochs}")
    if checkpoint["step_in_epoch"] >= run.steps_per_epoch:
        raise UserError(f"--resume {path}: its step_in_epoch {checkpoint['step_in_epoch']} does not fit the "
                        f"{run.steps_per_epoch} steps per epoch of this data")
    load_strict(run.model, checkpoint["model"], path, f"{run.cfg.arch} SimCLR model", prefix="")
    for part, load in (("optimizer", run.optimizer.load_state_dict), ("rng", restore_rng),
                       ("scaler", run.scaler.load_state_dict if run.scaler is not None else None)):
        if load is None or (part == "scaler" and not checkpoint.get("scaler")):
            continue
        try:
            load(checkpoint[part])
        except Exception as e:  # noqa: BLE001 - a malformed part of an untrusted file is the user's to fix
            raise UserError(f"--resume {path}: its {part} entry does not fit this run ({first_line(e)[:120]})") from None
    run.start_epoch, run.start_step = checkpoint["epoch"], checkpoint["step_in_epoch"]
    run.carried = dict(loss_sum=checkpoint["epoch_loss_sum"], seconds=checkpoint["epoch_seconds"])
    run.history = [row for row in checkpoint["history"] if row["epoch"] <= run.start_epoch]
    run.best_acc = checkpoint["best_acc"]
    run.say(f"resuming {run.cfg.name} at epoch {run.start_epoch + 1}, step {run.start_step} "
            f"of {run.steps_per_epoch}")


def open_tensorboard(run: Run) -> None:
    """Event files in --tensorboard_dir (default RESULTS/NAME_tb), continuing at the run's first step to do.

    Whatever an earlier writer logged at that step or later (a run killed after its last
    checkpoint, or an earlier run of the same name started afresh) is purged, so the steps of the
    log stay unique and increasing across stops and resumes.
    """
    cfg = run.cfg
    logdir = cfg.tensorboard_dir or os.path.join(cfg.results_dir, f"{cfg.name}_tb")
    first = run.start_epoch * run.steps_per_epoch + run.start_step
    run.log = open_log(logdir, purge_step=first)
    run.log.text("config", config_markdown(dataclasses.asdict(cfg)), first)
    for row in run.history:  # only the untrained encoder's row, of a run resumed before its first step
        if epoch_step(run, row["epoch"]) >= first:
            log_epoch(run, row)
    run.say(f"tensorboard: event files in {logdir} (tensorboard --logdir {os.path.dirname(logdir) or '.'})")


def write_config(run: Run) -> None:
    """NAME_config.json: the resolved config (as in NAME_last.pth), plus data, model and versions."""
    import torchvision
    bundle = run.bundle
    atomic_save_json({**dataclasses.asdict(run.cfg), "base_lr": run.schedule["base_lr"],
                      "world_size": run.world.world_size, "num_classes": len(bundle.classes), "classes": bundle.classes,
                      "mean": list(bundle.mean), "std": list(bundle.std), "train_images": len(bundle.train),
                      "parameters": run.params, "macs_per_image": run.macs, "torch_version": torch.__version__,
                      "torchvision_version": torchvision.__version__}, run.paths["config.json"])


# ----------------------------------------------------------------------------- one epoch

@dataclass
class EpochResult:
    """What one pass over (part of) an epoch produced."""
    done: int               # steps finished in this epoch (from its first step, resumed or not)
    loss_sum: torch.Tensor  # sum of the step losses, averaged over processes
    seconds: float          # training time of the epoch so far


def train_epoch(run: Run, epoch: int, stop: StopRequest) -> EpochResult:
    """Steps of one epoch from its first unfinished one, until its end or a stop request."""
    from tqdm import tqdm
    cfg, world, device, steps = run.cfg, run.world, run.runtime.device, run.steps_per_epoch
    resumed = epoch == run.start_epoch
    first = run.start_step if resumed else 0
    loss_sum = torch.tensor(run.carried["loss_sum"] if resumed else 0.0, device=device)
    first_bad = torch.tensor(-1, device=device)  # step of the first non-finite loss, kept on the device
    run.model.train()
    bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not world.is_main,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        done = run_steps(run, epoch, first, stop, bar, loss_sum, first_bad)
    finally:
        bar.close()  # before any message: an error must not be printed onto the bar's line
    check_finite(run, first_bad, epoch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (run.carried["seconds"] if resumed else 0.0) + time.perf_counter() - t0
    return EpochResult(done, mean_over_ranks(loss_sum, run.world), seconds)


def run_steps(run: Run, epoch: int, first: int, stop: StopRequest, bar, loss_sum: torch.Tensor,
              first_bad: torch.Tensor) -> int:
    """The steps of an epoch from `first`; loss_sum and first_bad are updated in place. Returns steps done."""
    cfg, world, steps = run.cfg, run.world, run.steps_per_epoch
    last_look, done, stop_now = time.perf_counter(), first, False
    done_at_look = first
    for step, views in epoch_views(run, epoch, first):
        set_lr(run.optimizer, lr_at(epoch * steps + step, run.schedule["base_lr"], run.schedule["total_steps"],
                                    run.schedule["warmup_steps"], cfg.schedule))
        loss = train_step(run.net, run.optimizer, views, cfg.temperature, run.runtime, run.scaler)
        loss_sum += loss
        first_bad.copy_(torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad))
        done = step + 1
        bar.update(1)
        if world.distributed:  # every rank must stop, or fail, at the same step
            if done % AGREE_EVERY == 0 or done == steps:
                stop_now = agree(run, stop, first_bad, epoch)
        else:
            stop_now = stop.requested
        now = time.perf_counter()
        if now - last_look > READ_EVERY_S or done == steps:  # a few device syncs per second, never one per step
            if not world.distributed:
                check_finite(run, first_bad, epoch)
            mean, last = torch.stack([loss_sum / done, loss]).tolist()  # one transfer for both
            bar.set_postfix(loss=f"{mean:.4f}")
            speed = (done - done_at_look) * cfg.batch_size / max(now - last_look, 1e-9)
            run.log.scalars({"step/loss": last, "step/loss_epoch_mean": mean,
                             "step/lr": run.optimizer.param_groups[0]["lr"], "step/images_per_second": speed},
                            epoch * steps + step)
            last_look, done_at_look = now, done
        if stop_now and done < steps:
            break
    return done


def epoch_views(run: Run, epoch: int, first: int):
    """(step, views) for the epoch's steps from `first`: views (2b, 3, S, S) = [view 1; view 2] on the device.

    The epoch's permutation is the same on every rank (seeded by epoch); each rank takes its share
    of each global batch. tensor backend: augmented here, on the device, seeded by (seed, epoch,
    step, rank); pil backend: built by DataLoader workers, seeded per image.
    """
    cfg, world, device = run.cfg, run.world, run.runtime.device
    images, local = run.train_images, cfg.batch_size // world.world_size
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(mix_seed(cfg.seed, epoch)))

    def indices(step: int) -> torch.Tensor:
        start = step * cfg.batch_size + world.rank * local
        return perm[start:start + local]

    steps = range(first, run.steps_per_epoch)
    if cfg.aug_backend == "tensor":
        perm = perm.to(images.device)
        generator = torch.Generator(device=images.device)
        for step in steps:
            generator.manual_seed(mix_seed(cfg.seed, epoch, step, world.rank))
            yield step, two_views(images[indices(step)].to(device, non_blocking=True), run.aug, generator)
    else:
        batches = pil_view_batches(images, pil_transform(run.aug), [indices(s).tolist() for s in steps], cfg.seed,
                                   epoch, cfg.workers, pin_memory=device.type == "cuda")
        for step, views in zip(steps, batches):
            yield step, views.to(device, non_blocking=True)


def agree(run: Run, stop: StopRequest, first_bad: torch.Tensor, epoch: int) -> bool:
    """What the ranks must decide together: stop now if any rank was asked to; fail if any saw a NaN."""
    wants_stop, bad = any_rank([stop.requested, first_bad >= 0], run.world, run.runtime.device)
    if bad:
        check_finite(run, first_bad.clamp_min(0), epoch)
    return wants_stop


def check_finite(run: Run, first_bad: torch.Tensor, epoch: int) -> None:
    """Raise NonFiniteLoss naming the epoch and step of the first non-finite loss (one device sync)."""
    bad = int(first_bad.item())
    if bad >= 0:
        last = run.paths["last.pth"]
        kept = (f"the last good checkpoint is kept at {last} (resume with --resume auto)" if os.path.exists(last)
                else "no checkpoint was written yet")
        raise NonFiniteLoss(f"the loss became NaN/inf at epoch {epoch + 1}, step {bad + 1} of {run.steps_per_epoch}; "
                            f"{kept}; try a lower --lr, more --warmup_epochs or --precision fp32")


# ----------------------------------------------------------------------------- end of an epoch

def end_epoch(run: Run, epoch: int, result: EpochResult) -> dict:
    """Evaluate if due, then write the CSV, curves, best weights and checkpoint; returns the CSV row."""
    cfg = run.cfg
    row = {"epoch": epoch + 1, "train_loss": result.loss_sum.item() / run.steps_per_epoch, "test_acc@1": None,
           "test_acc@5": None, "lr": run.optimizer.param_groups[0]["lr"], "epoch_seconds": result.seconds,
           "train_images_per_second": run.steps_per_epoch * cfg.batch_size / result.seconds, "knn_seconds": None}
    if (epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs:
        top1, top5, seconds = evaluate(run)
        row.update({"test_acc@1": top1, "test_acc@5": top5, "knn_seconds": seconds})
        if top1 > run.best_acc and run.world.is_main:
            save_weights(run.model, run.paths["model.pth"])
        run.best_acc = max(run.best_acc, top1)
    run.history.append(row)
    if run.world.is_main:
        atomic_write_csv(run.paths["statistics.csv"], CSV_COLUMNS, run.history)
        plot_run_or_warn(run.history, run.paths["curves.png"], cfg.name, run.say)
        log_epoch(run, row)  # before the checkpoint that says this epoch is done
        save_last(run, epoch + 1, 0, 0.0, 0.0)
    return row


def epoch_step(run: Run, epoch: int) -> int:
    """TensorBoard step of an epoch's row: the global index of its last step (0 for the untrained encoder)."""
    return max(0, epoch * run.steps_per_epoch - 1)


def log_epoch(run: Run, row: dict) -> None:
    """A CSV row as epoch/COLUMN scalars, flushed to disk (rank 0 with --tensorboard; else nothing)."""
    run.log.row("epoch", row, epoch_step(run, row["epoch"]))
    run.log.flush()


def evaluate(run: Run) -> tuple[float, float, float]:
    """Weighted kNN top-1, top-5 (%) of test images against the bank, on encoder features h; and the seconds."""
    from tqdm import tqdm
    t0 = time.perf_counter()
    cfg, bundle, world = run.cfg, run.bundle, run.world
    was_training = run.model.training
    run.model.eval()
    to_input = lambda batch: normalize(batch, bundle.mean, bundle.std)  # noqa: E731

    def features(split: ImageSet, what: str) -> torch.Tensor:
        bar = lambda it: tqdm(it, desc=f"  features of {what}", leave=False, disable=not world.is_main)  # noqa: E731
        return sharded_features(run.encode, split.images, to_input, run.runtime, cfg.eval_batch_size, world, bar)

    try:
        bank, test = features(bundle.memory, "kNN bank"), features(bundle.test, "test set")
        top1, top5 = knn_accuracy(test, bundle.test.labels, bank, bundle.memory.labels, len(bundle.classes), cfg.k,
                                  cfg.knn_temperature)
    finally:
        run.model.train(was_training)
    return top1, top5, time.perf_counter() - t0


def save_last(run: Run, epoch: int, step: int, loss_sum: float, seconds: float) -> None:
    """NAME_last.pth: everything --resume needs to continue exactly (epoch = completed epochs)."""
    save_training_checkpoint(run.paths["last.pth"], model=run.model, optimizer=run.optimizer, scaler=run.scaler,
                             schedule=run.schedule, config=dataclasses.asdict(run.cfg), epoch=epoch, step=step,
                             loss_sum=loss_sum, seconds=seconds, best_acc=run.best_acc, history=run.history)


def stopped(stop: StopRequest, run: Run) -> int:
    """Print how to continue after a signal; the exit code is 128 + signal number."""
    if run.world.is_main:
        where = f"stopped; checkpoint {run.paths['last.pth']}."
        if run.world.distributed:
            print(f"{where} Resume with the same torchrun command plus --resume auto", file=sys.stderr, flush=True)
        else:
            print(f"{where} Resume with:\n  {resume_command('main.py')}", file=sys.stderr, flush=True)
    return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
