"""Fine-tune a SimCLR encoder on a class-balanced fraction of the labels (SimCLR's 1% and 10% protocol).

    python finetune.py --model_path results/NAME_model.pth --label_fraction 0.1              # 10% of the labels
    python finetune.py --model_path results/NAME_model.pth --label_fraction 0.01 --from_layer head1
    python finetune.py --model_path results/NAME_model.pth --label_fraction 0.1 --untrained  # random init, same labels
    python finetune.py --model_path results/NAME_model.pth --label_fraction 0.1 --resume auto

Every layer trains (BatchNorm in training mode), on random resized crops and flips made on the
device, with SGD + Nesterov momentum and a cosine schedule; a new Linear classifier sits on the
encoder output h, or on the projection head's first layer (`--from_layer head1`, as SimCLRv2).
Test top-1/top-5 are measured after every epoch in eval mode. The labeled images are a subset of
the data set's labeled training split drawn per class by --seed; their indices are in the config
JSON. Writes RESULTS/NAME_finetune_TAG_{statistics.csv,model.pth,last.pth,config.json,curves.png}
with TAG the fraction (0.1) or the count per class (50perclass). The file reads in calling order.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from simclr.augment import AugmentConfig, crop_flip, normalize
from simclr.checkpoint import (Encoder, check_not_taken, encoder_state, evaluated_name, evaluation_dir, find_run_config,
                        head_sizes, load_strict, load_training_checkpoint, model_state, resolve_encoder,
                        save_training_checkpoint, save_weights, source_id)
from simclr.cli import NonFiniteLoss, StopRequest, UserError, resume_command, run_cli
from simclr.curves import plot_run_or_warn
from simclr.data import DataBundle, ImageSet, balanced_label_indices, load_dataset
from simclr.engine import Runtime, make_runtime, mix_seed, seed_everything
from simclr.files import atomic_save_json, atomic_write_csv
from simclr.tblog import NoLog, config_markdown, open_log, require_tensorboard
from simclr.flags import (DEFAULT_FRACTION, FINETUNE_DEFAULTS as DEFAULTS, FINETUNE_FLAGS,
                          FINETUNE_RUN_KEYS as RUN_KEYS, FINETUNE as FLAGS, FinetuneConfig, build_parser, check_name)
from simclr.knn import extract_features, topk_accuracy, topk_hits
from simclr.model import Classifier, SimCLR
from simclr.optim import build_optimizer, lr_at, set_lr

CSV_COLUMNS = ("epoch", "train_loss", "train_acc@1", "train_acc@5", "test_acc@1", "test_acc@5", "lr",
               "epoch_seconds")
RESULT_FILES = ("statistics.csv", "model.pth", "last.pth", "config.json", "curves.png")
# Keeps the label draw apart from every other use of --seed (initialisation, batch order, crops).
LABEL_STREAM = 0x1AB
OOM_ADVICE = "use a smaller --batch_size or --eval_batch_size, or --precision bf16"



def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_cli(lambda: run(argv), OOM_ADVICE)


def run(argv: list[str] | None) -> int:
    """The whole fine-tuning run; returns the exit code."""
    from tqdm import tqdm
    say = tqdm.write
    cfg, job = plan(parse(argv), say)  # everything the user can get wrong is refused before any file is written
    runtime = make_runtime(cfg.device, cfg.precision, cfg.channels_last, threads=cfg.threads)
    bundle = load_dataset(job.encoder.dataset, job.encoder.data_root, job.encoder.image_size,
                          cache_dir=job.encoder.cache_dir, log=say)
    labels = choose_labels(bundle, cfg)
    ft = build(cfg, job, bundle, labels, runtime, say)
    if job.checkpoint is not None:
        restore(ft, job.checkpoint)
    os.makedirs(os.path.dirname(job.paths["config.json"]) or ".", exist_ok=True)
    write_config(ft)
    if cfg.tensorboard:  # one point per epoch; a resumed run drops what was logged past its checkpoint
        tb_dir = cfg.tensorboard_dir or os.path.join(os.path.dirname(job.paths["config.json"]) or ".", f"{job.prefix}_tb")
        ft.log = open_log(tb_dir, purge_step=ft.start_epoch + 1)
        ft.log.text("config", config_markdown(dataclasses.asdict(cfg)), ft.start_epoch)
    try:
        return train(ft, cfg, job, labels, say)
    finally:
        ft.log.close()


def train(ft: "FineTune", cfg: "FinetuneConfig", job: "Job", labels: torch.Tensor, say) -> int:
    """Epoch by epoch, until the end or a stop request; returns the exit code."""
    with StopRequest() as stop:
        for epoch in range(ft.start_epoch, cfg.epochs):
            result = train_epoch(ft, epoch, stop)
            if result.done < ft.steps_per_epoch:  # stopped mid-epoch: save exactly where we are
                save_last(ft, epoch, result)
                atomic_write_csv(job.paths["statistics.csv"], CSV_COLUMNS, ft.history)
                return stopped(stop, ft)
            row = end_epoch(ft, epoch, result)
            say(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, train top-1 {row['train_acc@1']:.2f}%, "
                f"test top-1 {row['test_acc@1']:.2f}% top-5 {row['test_acc@5']:.2f}%, {row['epoch_seconds']:.1f} s")
            if stop.requested and epoch + 1 < cfg.epochs:
                return stopped(stop, ft)
    last = ft.history[-1]
    say(f"files: {job.paths['statistics.csv']}, {job.paths['model.pth']}, {job.paths['curves.png']}")
    print(f"fine-tuned on {len(labels)} labels: test top-1 {last['test_acc@1']:.2f}% top-5 {last['test_acc@5']:.2f}% "
          f"(last epoch {last['epoch']})", flush=True)
    return 0


# ----------------------------------------------------------------------------- what to run, checked before writing

def parse(argv: list[str] | None) -> dict:
    """The flags given on the command line (only those: a resumed run takes the others from its checkpoint)."""
    parser = build_parser(FINETUNE_FLAGS, "Fine-tune a SimCLR encoder with a few labels.",
                          "Files: RESULTS/NAME_finetune_TAG_statistics.csv (" + ", ".join(CSV_COLUMNS) +
                          "), _model.pth, _last.pth, _config.json, _curves.png.", explicit_only=True)
    explicit = vars(parser.parse_args(argv))
    if explicit.get("tensorboard"):
        require_tensorboard()
    return explicit


@dataclass(frozen=True)
class Job:
    """What one fine-tuning run starts from and where its files go."""
    encoder: Encoder
    head: tuple[int, int]                    # feature_dim, proj_hidden_dim of the run's projection head
    prefix: str                              # NAME_finetune_TAG
    paths: dict[str, str]                    # RESULT_FILES -> path
    source: str                              # checkpoint.source_id: whose files these are
    state: dict[str, torch.Tensor] | None = None   # the weights to start from (None: random init)
    checkpoint: dict | None = None           # the NAME_finetune_TAG_last.pth to resume from ...
    resume_path: str | None = None           # ... and its path


def plan(explicit: dict, say) -> tuple[FinetuneConfig, Job]:
    """Explicit flags -> (config, job): run config, weights, file names and resume checkpoint, all checked
    before anything is written. A resumed run takes the flags not given again from its checkpoint."""
    values = {**DEFAULTS, **explicit}
    checkpoint, resume_path = None, None
    if values["resume"] not in (None, "auto"):
        resume_path = values["resume"]
        checkpoint = load_training_checkpoint(resume_path)
        values = resumed_values(explicit, checkpoint["config"], resume_path)
    cfg, job = locate(values)
    if cfg.resume == "auto":
        resume_path = job.paths["last.pth"]
        if not os.path.exists(resume_path):
            say(f"--resume auto: no checkpoint at {resume_path}, starting from scratch")
            resume_path = None
        else:
            checkpoint = load_training_checkpoint(resume_path)
            cfg, job = locate(resumed_values(explicit, checkpoint["config"], resume_path))
    if checkpoint is not None and checkpoint["config"].get("source") != job.source:
        raise UserError(f"--resume {resume_path} fine-tuned {checkpoint['config'].get('source')}, not {job.source}; "
                        f"give the same --model_path, or start a new run with another --name")
    check_not_taken({"statistics": job.paths["statistics.csv"], "config": job.paths["config.json"], **job.paths},
                    job.source, "fine-tuning")
    state = None
    if not cfg.untrained:
        # head1 starts from the head's first layer too: the whole SimCLR model is loaded strictly
        state = model_state(cfg.model_path) if cfg.from_layer == "head1" else encoder_state(cfg.model_path)
    return cfg, dataclasses.replace(job, state=state, checkpoint=checkpoint, resume_path=resume_path)


def locate(values: dict) -> tuple[FinetuneConfig, Job]:
    """Checked flags -> (config, job without weights): the run config, the encoder, the file names."""
    if values["label_fraction"] is not None and values["labels_per_class"] is not None:
        raise UserError("pass --label_fraction or --labels_per_class, not both")
    if values["model_path"] is None and not values["untrained"]:
        raise UserError("--model_path is required (or --untrained with --config or --arch and --dataset)")
    if values["name"] is not None:
        check_name(values["name"])
    if values["lr"] is None:
        values = {**values, "lr": default_lr(values["batch_size"])}
    cfg = FinetuneConfig(**values)
    saved = find_run_config(cfg.model_path, cfg.config, cfg.arch, cfg.dataset)
    encoder = resolve_encoder(saved, cfg.arch, cfg.stem, cfg.dataset, cfg.data_root, cfg.image_size, cfg.cache_dir)
    head = head_sizes(saved, cfg.config or cfg.model_path or "the run config")
    name = evaluated_name(cfg.name, cfg.model_path, cfg.config, cfg.untrained, encoder)
    prefix = f"{name}_finetune_{label_tag(cfg)}"
    results_dir = evaluation_dir(cfg.results_dir, cfg.model_path, cfg.config)
    paths = {kind: os.path.join(results_dir, f"{prefix}_{kind}") for kind in RESULT_FILES}
    return cfg, Job(encoder, head, prefix, paths, source_id(cfg.model_path, cfg.config, cfg.untrained))


def default_lr(batch_size: int) -> float:
    """SimCLR appendix B.5: lr 0.05 x B/256. A larger step wipes out much of what pretraining learned in the first
    epoch (on a CPU-scale check, lr 0.05 at batch 32 sent the loss to 7.8 and test top-1 to 10%)."""
    return 0.05 * batch_size / 256


def resumed_values(explicit: dict, saved: dict, path: str) -> dict:
    """Flags of a resumed run: the weights and what the run computes from the checkpoint unless given again
    (and then unchanged); where files go and machine settings from this command."""
    if not isinstance(saved, dict) or not all(k in saved for k in RUN_KEYS):
        raise UserError(f"--resume {path} is not a checkpoint of finetune.py")
    kept = {k: FLAGS[k].check(saved[k], path) for k in (*RUN_KEYS, "model_path", "config", "cache_dir")}
    changed = [k for k in RUN_KEYS if k in explicit and explicit[k] != kept[k]]
    if changed:
        what = ", ".join(f"--{k} {kept[k]} -> {explicit[k]}" for k in changed)
        raise UserError(f"cannot resume with changed flags that alter the run ({what}); drop them, "
                        f"or start a new run with another --name")
    return {**DEFAULTS, **kept, **explicit}


def label_tag(cfg: FinetuneConfig) -> str:
    """The TAG of the file names: the fraction (0.1) or the count per class (50perclass)."""
    if cfg.labels_per_class is not None:
        return f"{cfg.labels_per_class}perclass"
    return f"{fraction_of(cfg):g}"


def fraction_of(cfg: FinetuneConfig) -> float:
    return DEFAULT_FRACTION if cfg.label_fraction is None else cfg.label_fraction


def choose_labels(bundle: DataBundle, cfg: FinetuneConfig) -> torch.Tensor:
    """Indices (L,) into the labeled training split (bundle.memory): the same count from every class."""
    labels, num_classes = bundle.memory.labels, len(bundle.classes)
    n = len(labels)
    if cfg.labels_per_class is not None:
        per_class = cfg.labels_per_class
    elif fraction_of(cfg) == 1.0:
        return torch.arange(n)  # every label, balanced or not
    else:
        total = round(fraction_of(cfg) * n)
        if total < num_classes:
            raise UserError(f"--label_fraction {fraction_of(cfg):g} of the {n} labeled images is {total} labels, "
                            f"fewer than the {num_classes} classes; use at least {num_classes / n:.2g}")
        per_class = total // num_classes
    indices = balanced_label_indices(labels, num_classes, per_class, mix_seed(cfg.seed, LABEL_STREAM))
    if len(indices) < 2:
        raise UserError(f"{len(indices)} labeled image is too few to train with BatchNorm; use more labels")
    return indices


# ----------------------------------------------------------------------------- the run's state

@dataclass
class FineTune:
    """One run's state, built once, then driven epoch by epoch."""
    cfg: FinetuneConfig
    job: Job
    runtime: Runtime
    bundle: DataBundle
    label_indices: torch.Tensor        # (L,) into bundle.memory
    labeled: ImageSet                  # the L labeled images, uint8 (L, S, S, 3), labels on the device
    aug: AugmentConfig
    model: Classifier
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    schedule: dict                     # base_lr, steps_per_epoch, warmup_steps, total_steps
    batch: int
    say: object
    start_epoch: int = 0
    start_step: int = 0
    carried: dict = field(default_factory=lambda: dict(sums=[0.0, 0.0, 0.0], seconds=0.0))
    history: list[dict] = field(default_factory=list)
    log: object = field(default_factory=NoLog)  # tblog.TBLog with --tensorboard

    @property
    def steps_per_epoch(self) -> int:
        return self.schedule["steps_per_epoch"]


def build(cfg: FinetuneConfig, job: Job, bundle: DataBundle, label_indices: torch.Tensor, runtime: Runtime,
          say) -> FineTune:
    """Model (weights loaded strictly), optimizer, schedule and augmentation of a run."""
    enc = job.encoder
    mean, std = (enc.mean, enc.std) if enc.mean is not None else (bundle.mean, bundle.std)
    num_classes = len(bundle.classes)
    seed_everything(cfg.seed)  # --untrained's initialisation (the new classifier starts at zero)
    feature_dim, hidden = job.head
    simclr = SimCLR(enc.arch, feature_dim, hidden, enc.stem)
    what = f"{enc.arch} ({enc.stem} stem)"
    if job.state is not None and cfg.from_layer == "head1":
        load_strict(simclr, job.state, cfg.model_path, f"{what} SimCLR model with head "
                    f"{simclr.feature_width}-{hidden}-{feature_dim}", prefix="")
    elif job.state is not None:
        load_strict(simclr.f, job.state, cfg.model_path, f"{what} encoder")
    model = runtime.place(Classifier(simclr, cfg.from_layer, num_classes))
    labeled = ImageSet(bundle.memory.images[label_indices], bundle.memory.labels[label_indices].to(runtime.device))
    batch = min(cfg.batch_size, len(labeled))
    steps_per_epoch = len(labeled) // batch  # a fresh order every epoch: dropped images are seen in other epochs
    schedule = dict(name="cosine", base_lr=cfg.lr, steps_per_epoch=steps_per_epoch, warmup_steps=0,
                    total_steps=cfg.epochs * steps_per_epoch)
    optimizer = build_optimizer(model, "sgd", cfg.lr, cfg.weight_decay, cfg.momentum, nesterov=cfg.momentum > 0)
    aug = AugmentConfig(image_size=bundle.image_size, mean=tuple(mean), std=tuple(std),
                        min_crop_scale=cfg.min_crop_scale)
    source = f"untrained {enc.arch} (seed {cfg.seed})" if cfg.untrained else cfg.model_path
    say(f"fine-tuning {source} from {cfg.from_layer}: {len(labeled)} labeled images "
        f"({len(labeled) // num_classes} per class) of {len(bundle.memory)}, {len(bundle.test)} test images, "
        f"{num_classes} classes, batch {batch}, {steps_per_epoch} steps per epoch")
    return FineTune(cfg, job, runtime, bundle, label_indices, labeled, aug, model, optimizer,
                    runtime.grad_scaler(), schedule, batch, say)


def restore(ft: FineTune, checkpoint: dict) -> None:
    """Continue from a NAME_finetune_TAG_last.pth: weights, optimizer, scaler, position, history, RNG."""
    if checkpoint["config"].get("label_indices") != ft.label_indices.tolist():
        raise UserError("the labeled images differ from the checkpoint's (has the data set changed?); "
                        "start a new run with another --name")
    load_strict(ft.model, checkpoint["model"], ft.job.resume_path, "fine-tuned model of these flags", prefix="")
    ft.optimizer.load_state_dict(checkpoint["optimizer"])
    if ft.scaler is not None and checkpoint.get("scaler"):
        ft.scaler.load_state_dict(checkpoint["scaler"])
    ft.start_epoch, ft.start_step = checkpoint["epoch"], checkpoint.get("step_in_epoch", 0)
    ft.carried = dict(sums=[checkpoint.get("epoch_loss_sum", 0.0), *checkpoint.get("epoch_hits", [0.0, 0.0])],
                      seconds=checkpoint.get("epoch_seconds", 0.0))
    ft.history = [row for row in checkpoint.get("history", []) if row["epoch"] <= ft.start_epoch]
    ft.say(f"resuming {ft.job.prefix} at epoch {ft.start_epoch + 1}, step {ft.start_step} of {ft.steps_per_epoch}")


def run_record(ft: FineTune) -> dict:
    """The config JSON (and the checkpoint's config): flags, source, the label indices and what was built."""
    import torchvision
    bundle, cfg = ft.bundle, ft.cfg
    counts = torch.bincount(ft.labeled.labels.cpu(), minlength=len(bundle.classes)).tolist()
    return {**dataclasses.asdict(cfg), "source": ft.job.source, "prefix": ft.job.prefix,
            "encoder": dataclasses.asdict(ft.job.encoder), "feature_dim": ft.job.head[0],
            "proj_hidden_dim": ft.job.head[1], "image_size": bundle.image_size, "mean": list(ft.aug.mean),
            "std": list(ft.aug.std), "num_classes": len(bundle.classes), "classes": bundle.classes,
            "label_split": "the data set's labeled training split, in load order", "labels": len(ft.labeled),
            "labels_by_class": counts, "batch": ft.batch, "steps_per_epoch": ft.steps_per_epoch,
            "precision": ft.runtime.precision, "torch_version": str(torch.__version__),
            "torchvision_version": str(torchvision.__version__), "label_indices": ft.label_indices.tolist()}


def write_config(ft: FineTune) -> None:
    atomic_save_json(run_record(ft), ft.job.paths["config.json"])


# ----------------------------------------------------------------------------- one epoch

@dataclass
class EpochResult:
    """What one pass over (part of) an epoch produced."""
    done: int               # steps finished in this epoch (from its first step, resumed or not)
    sums: torch.Tensor      # (3,) summed over images: loss, top-1 hits, top-5 hits
    seconds: float          # training time of the epoch so far


def train_epoch(ft: FineTune, epoch: int, stop: StopRequest) -> EpochResult:
    """Steps of one epoch from its first unfinished one, until its end or a stop request."""
    from tqdm import tqdm
    cfg, runtime, steps = ft.cfg, ft.runtime, ft.steps_per_epoch
    resumed = epoch == ft.start_epoch
    first = ft.start_step if resumed else 0
    sums = torch.tensor(ft.carried["sums"] if resumed else [0.0, 0.0, 0.0], device=runtime.device)
    images, labels = ft.labeled.images, ft.labeled.labels
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(mix_seed(cfg.seed, epoch)))
    generator = torch.Generator(device=runtime.device)
    ft.model.train()  # BatchNorm normalises with batch statistics and updates its running ones
    bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}", dynamic_ncols=True, leave=False)
    t0, done = time.perf_counter(), first
    for step in range(first, steps):
        idx = perm[step * ft.batch:(step + 1) * ft.batch]
        set_lr(ft.optimizer, lr_at(epoch * steps + step, cfg.lr, ft.schedule["total_steps"], 0, "cosine"))
        generator.manual_seed(mix_seed(cfg.seed, epoch, step))
        x = crop_flip(images[idx].to(runtime.device, non_blocking=True), ft.aug, generator)  # (B, 3, S, S)
        y = labels[idx.to(labels.device)]
        sums += train_step(ft, x, y)
        done = step + 1
        bar.update(1)
        if stop.requested and done < steps:
            break
    bar.close()
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    seconds = (ft.carried["seconds"] if resumed else 0.0) + time.perf_counter() - t0
    return EpochResult(done, sums, seconds)


def train_step(ft: FineTune, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step on x (B, 3, S, S), y (B,); returns (3,) sums: loss x B, top-1 and top-5 hits (no sync)."""
    with ft.runtime.autocast():
        logits = ft.model(ft.runtime.prepare(x))                 # (B, C)
    loss = F.cross_entropy(logits.float(), y)                    # fp32
    ft.optimizer.zero_grad(set_to_none=True)
    if ft.scaler is not None:
        ft.scaler.scale(loss).backward()
        ft.scaler.step(ft.optimizer)
        ft.scaler.update()
    else:
        loss.backward()
        ft.optimizer.step()
    # train figures are running sums over the epoch's batches (no second pass over the data)
    return torch.cat([loss.detach().reshape(1) * len(y), topk_hits(logits.detach(), y, (1, 5))])


# ----------------------------------------------------------------------------- end of an epoch

def end_epoch(ft: FineTune, epoch: int, result: EpochResult) -> dict:
    """Test, then write the CSV, curves, weights and checkpoint; returns the CSV row."""
    seen = ft.steps_per_epoch * ft.batch
    loss_sum, hits1, hits5 = result.sums.tolist()
    if not math.isfinite(loss_sum):
        raise NonFiniteLoss(f"the loss became NaN/inf in epoch {epoch + 1}; the last good checkpoint is kept at "
                            f"{ft.job.paths['last.pth']}; try a lower --lr")
    test1, test5 = evaluate(ft)
    row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc@1": 100 * hits1 / seen,
           "train_acc@5": 100 * hits5 / seen, "test_acc@1": test1, "test_acc@5": test5,
           "lr": ft.optimizer.param_groups[0]["lr"], "epoch_seconds": result.seconds}
    ft.history.append(row)
    ft.log.row("finetune", row, epoch + 1)
    ft.log.flush()
    paths = ft.job.paths
    atomic_write_csv(paths["statistics.csv"], CSV_COLUMNS, ft.history)
    plot_run_or_warn(ft.history, paths["curves.png"], f"{ft.job.prefix}: fine-tuning", ft.say,
                     acc_keys=("train_acc@1", "test_acc@1"), acc_label="top-1 (%)")
    save_weights(ft.model, paths["model.pth"])
    save_last(ft, epoch + 1, EpochResult(0, torch.zeros(3), 0.0))
    return row


@torch.no_grad()
def evaluate(ft: FineTune) -> tuple[float, float]:
    """Test top-1, top-5 (%) in eval mode (BatchNorm running statistics), without augmentation."""
    bundle = ft.bundle
    ft.model.eval()
    try:
        logits = extract_features(ft.model, bundle.test.images, lambda b: normalize(b, ft.aug.mean, ft.aug.std),
                                  ft.runtime, ft.cfg.eval_batch_size)   # (T, C)
    finally:
        ft.model.train()
    top1, top5 = topk_accuracy(logits, bundle.test.labels, (1, 5))
    return top1, top5


def save_last(ft: FineTune, epoch: int, result: EpochResult) -> None:
    """NAME_finetune_TAG_last.pth: everything --resume needs to continue exactly (epoch = completed epochs)."""
    loss_sum, hits1, hits5 = result.sums.tolist()
    save_training_checkpoint(ft.job.paths["last.pth"], model=ft.model, optimizer=ft.optimizer, scaler=ft.scaler,
                             schedule=ft.schedule, config=run_record(ft), epoch=epoch, step=result.done,
                             loss_sum=loss_sum, seconds=result.seconds, best_acc=-1.0, history=ft.history,
                             extra={"epoch_hits": [hits1, hits5]})


def stopped(stop: StopRequest, ft: FineTune) -> int:
    """Print how to continue after a signal; the exit code is 128 + signal number."""
    command = resume_command("finetune.py")
    print(f"stopped; checkpoint {ft.job.paths['last.pth']}. Resume with:\n  {command}", file=sys.stderr, flush=True)
    return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
