"""finetune.py's job: fine-tune a SimCLR encoder on a class-balanced fraction of the labels.

Reads in calling order: run (plan: flags, run config, weights, file names and resume checkpoint,
all checked before any write; choose_labels; FineTuning builds the model; then
simclr.loop.run_epochs over this job's train_epoch and epoch_row).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .augment import AugmentConfig, crop_flip, normalize
from .checkpoint import (Encoder, check_not_taken, evaluated_name, evaluation_dir, find_run_config, head_sizes,
                         load_training_checkpoint, model_from_config, open_run, resolve_encoder, save_weights,
                         source_id)
from .cli import UserError
from .curves import plot_run_or_warn
from .data import DataBundle, ImageSet, balanced_label_indices, evaluable, load_dataset
from .distributed import World
from .engine import make_runtime, mix_seed, seed_everything, versions
from .files import RunLock, atomic_save_json, check_name_fits, existing, remove_files
from .flags import (DEFAULT_FRACTION, FINETUNE_DEFAULTS, FINETUNE_FLAGS, FINETUNE_RUN_KEYS, FinetuneConfig,
                    check_name, resume_values)
from .knn import extract_features, percent, topk_accuracy, topk_hits
from .loop import EpochResult, RunState, finished, open_tensorboard, restore, run_epochs
from .model import Classifier, SimCLR, head_depth
from .names import FINETUNE_COLUMNS, RUN_FILES, TENSORBOARD, run_paths
from .optim import Schedule, build_optimizer, set_lr
from .step import apply_gradients
from .tblog import require_tensorboard

# Keeps the label draw apart from every other use of --seed (initialisation, batch order, crops).
LABEL_STREAM = 0x1AB


def run(explicit: dict) -> int:
    """The whole fine-tuning run from the flags given on the command line; returns the exit code."""
    from tqdm import tqdm
    say = tqdm.write
    if explicit.get("tensorboard"):
        require_tensorboard()
    cfg, setup = plan(explicit, say)  # everything the user can get wrong is refused before any file is written
    runtime = make_runtime(cfg.device, cfg.precision, cfg.channels_last, threads=cfg.threads)
    bundle = evaluable(load_dataset(setup.encoder.dataset, setup.encoder.data_root, setup.encoder.image_size,
                                          cache_dir=setup.encoder.cache_dir, log=say), setup.encoder.data_root)
    labels = choose_labels(bundle, cfg)
    # one process per NAME_finetune_TAG and folder, from the first write to the end (released by the kernel on
    # any exit); taken after the data, which writes nothing in the results folder, so a refusal leaves it as it was
    lock = RunLock(os.path.dirname(setup.paths["config.json"]) or ".", setup.prefix,
                   [os.path.basename(p) for p in setup.paths.values()]).acquire()
    try:
        return FineTuning(cfg, setup=setup, bundle=bundle, label_indices=labels, runtime=runtime, say=say).train()
    finally:
        lock.release()


# ----------------------------------------------------------------------------- what to run, checked before writing

@dataclass(frozen=True)
class FinetunePlan:
    """What one fine-tuning run starts from and where its files go."""
    encoder: Encoder
    saved: dict                              # the run config ({} when flags stand in for it)
    head: tuple[int, int, int]               # feature_dim, proj_hidden_dim, proj_layers of the run's head
    prefix: str                              # NAME_finetune_TAG
    paths: dict[str, str]                    # names.RUN_FILES -> path
    source: str                              # checkpoint.source_id: whose files these are
    trained: SimCLR | None = None            # the run's model with its weights (None: --untrained)
    checkpoint: dict | None = None           # the NAME_finetune_TAG_last.pth to resume from ...
    resume_path: str | None = None           # ... and its path


def plan(explicit: dict, say) -> tuple[FinetuneConfig, FinetunePlan]:
    """Explicit flags -> (config, plan): run config, weights, file names and resume checkpoint, all checked
    before anything is written. A resumed run takes the flags not given again from its checkpoint."""
    values = {**FINETUNE_DEFAULTS, **explicit}
    checkpoint, resume_path = None, None
    if values["resume"] not in (None, "auto"):
        resume_path = values["resume"]
        checkpoint = load_training_checkpoint(resume_path)
        values = resumed_values(explicit, saved=checkpoint["config"], path=resume_path, say=say)
    cfg, setup = locate(values)
    if cfg.resume == "auto":
        resume_path = setup.paths["last.pth"]
        if not os.path.exists(resume_path):
            say(f"--resume auto: no checkpoint at {resume_path}, starting from scratch")
            resume_path = None
        else:
            checkpoint = load_training_checkpoint(resume_path)
            cfg, setup = locate(resumed_values(explicit, saved=checkpoint["config"], path=resume_path, say=say))
    if checkpoint is not None and checkpoint["config"].get("source") != setup.source:
        raise UserError(f"--resume {resume_path} fine-tuned {checkpoint['config'].get('source')}, not {setup.source}; "
                        f"give the same --model_path, or start a new run with another --name")
    if cfg.overwrite and explicit.get("resume") is not None:
        raise UserError("--overwrite starts the run afresh and --resume continues it; pass one of them")
    if checkpoint is None:  # a fresh start: never over an earlier run's files unless --overwrite
        hint = ("continue it with --resume auto (a finished run trains on with a larger --epochs), "
                if os.path.exists(setup.paths["last.pth"]) else "")
        check_not_taken(setup.paths,
                        source=setup.source, what="fine-tuning", overwrite=cfg.overwrite, continue_hint=hint)
    trained = None
    if not cfg.untrained:  # the encoder must fit the weights, and the head too where the classifier uses it
        trained = open_run(cfg.model_path, config_path=cfg.config, arch=setup.encoder.arch, stem=setup.encoder.stem,
                           saved=setup.saved,
                           encoder_only=cfg.from_layer == "encoder")[0]
    return cfg, dataclasses.replace(setup, trained=trained, checkpoint=checkpoint, resume_path=resume_path)


def resumed_values(explicit: dict, saved: dict, path: str, say) -> dict:
    """Flags of a resumed run (simclr.flags.resume_values over finetune.py's flags); its notes are printed."""
    if not isinstance(saved, dict) or not all(k in saved for k in FINETUNE_RUN_KEYS):
        raise UserError(f"--resume {path} is not a checkpoint of finetune.py")
    values, notes = resume_values(FINETUNE_FLAGS, explicit=explicit, saved=saved, source=path)
    for note in notes:
        say(note)
    return values


def locate(values: dict) -> tuple[FinetuneConfig, FinetunePlan]:
    """Checked flags -> (config, plan without weights): the run config, the encoder, the file names."""
    if values["label_fraction"] is not None and values["labels_per_class"] is not None:
        raise UserError("pass --label_fraction or --labels_per_class, not both")
    if values["model_path"] is None and not values["untrained"]:
        raise UserError("--model_path is required (or --untrained with --config or --arch and --dataset)")
    if values["name"] is not None:
        check_name(values["name"])
    if values["epochs"] is None:  # SimCLR (B.5): 60 epochs with 1% of the labels, 30 with 10%
        one_percent = values["labels_per_class"] is None and (values["label_fraction"] or DEFAULT_FRACTION) <= 0.01
        values = {**values, "epochs": 60 if one_percent else 30}
    cfg = FinetuneConfig(**values)  # lr None: default_lr of the batch used, known once the labels are drawn
    saved = find_run_config(cfg.model_path, config=cfg.config, arch=cfg.arch, dataset=cfg.dataset)
    encoder = resolve_encoder(saved, arch=cfg.arch, stem=cfg.stem, dataset=cfg.dataset, data_root=cfg.data_root,
                              image_size=cfg.image_size, cache_dir=cfg.cache_dir)
    head = head_sizes(saved, cfg.config or cfg.model_path or "the run config")
    if head_depth(cfg.from_layer) >= head[2]:
        raise UserError(f"--from_layer {cfg.from_layer}: the run's head has {head[2]} layers, so its hidden layers "
                        f"are head1 to head{head[2] - 1}" if head[2] > 1 else
                        f"--from_layer {cfg.from_layer}: the run's head has one layer and no hidden one; use encoder")
    name = evaluated_name(cfg.name, model_path=cfg.model_path, config=cfg.config, untrained=cfg.untrained, enc=encoder)
    prefix = f"{name}_finetune_{label_tag(cfg)}"
    results_dir = evaluation_dir(cfg.results_dir, cfg.model_path, cfg.config)
    paths = run_paths(results_dir, prefix)
    check_name_fits(results_dir, [os.path.basename(p) for p in paths.values()])
    return cfg, FinetunePlan(encoder=encoder, saved=saved, head=head, prefix=prefix, paths=paths,
                             source=source_id(cfg.model_path, cfg.config, cfg.untrained))


def default_lr(batch_size: int) -> float:
    """SimCLR appendix B.5: lr 0.05 x B/256. A larger step wipes out much of what pretraining learned in the
    first epoch (docs/experiments/finetune_check.md)."""
    return 0.05 * batch_size / 256


def label_tag(cfg: FinetuneConfig) -> str:
    """The TAG of the file names: the fraction (0.1) or the count per class (50perclass), then the layer
    when it is not the encoder (0.1_head1), so fine-tuning from another layer keeps its own files."""
    tag = f"{cfg.labels_per_class}perclass" if cfg.labels_per_class is not None else f"{fraction_of(cfg):g}"
    return tag if cfg.from_layer == "encoder" else f"{tag}_{cfg.from_layer}"


def fraction_of(cfg: FinetuneConfig) -> float:
    return DEFAULT_FRACTION if cfg.label_fraction is None else cfg.label_fraction


def choose_labels(bundle: DataBundle, cfg: FinetuneConfig) -> torch.Tensor:
    """Indices (L,) into the labeled training split (bundle.labeled): the same count from every class."""
    labels, num_classes = bundle.labeled.labels, len(bundle.classes)
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
    indices = balanced_label_indices(labels, num_classes=num_classes, per_class=per_class,
                                     seed=mix_seed(cfg.seed, LABEL_STREAM))
    if len(indices) < 2:
        raise UserError(f"{len(indices)} labeled image is too few to train with BatchNorm; use more labels")
    return indices


# ----------------------------------------------------------------------------- the job

class FineTuning:
    """A fine-tuning run: the labeled images, the classifier and its optimizer, and what each epoch does."""

    def __init__(self, cfg: FinetuneConfig, *, setup: FinetunePlan, bundle: DataBundle, label_indices: torch.Tensor,
                 runtime, say):
        self.cfg, self.setup, self.bundle, self.label_indices = cfg, setup, bundle, label_indices
        self.runtime, self.say = runtime, say
        enc = setup.encoder
        mean, std = (enc.mean, enc.std) if enc.mean is not None else (bundle.mean, bundle.std)
        num_classes = len(bundle.classes)
        seed_everything(cfg.seed)  # --untrained's initialisation (the new classifier starts at zero)
        simclr = setup.trained or model_from_config(setup.saved, source="the run config", arch=enc.arch, stem=enc.stem)
        model = runtime.place(Classifier(simclr.train(), cfg.from_layer, num_classes))
        self.labeled = ImageSet(bundle.labeled.images[label_indices],
                                bundle.labeled.labels[label_indices].to(runtime.device))
        n = len(self.labeled)
        # Checkpoints written before "batching" dropped the last incomplete batch; they resume as they ran.
        self.even = setup.checkpoint is None or setup.checkpoint["config"].get("batching") == "even"
        if self.even:  # every label every epoch: ceil(n / batch_size) batches of nearly equal size (>= 2 for BatchNorm)
            steps_per_epoch = max(1, min(-(-n // cfg.batch_size), n // 2))
            self.bounds = [round(i * n / steps_per_epoch) for i in range(steps_per_epoch + 1)]
            self.batch = -(-n // steps_per_epoch)
        else:
            self.batch = min(cfg.batch_size, n)
            steps_per_epoch = n // self.batch
            self.bounds = [i * self.batch for i in range(steps_per_epoch + 1)]
        self.lr = cfg.lr if cfg.lr is not None else default_lr(self.batch)
        schedule = Schedule(self.lr, steps_per_epoch=steps_per_epoch, total_steps=cfg.epochs * steps_per_epoch,
                            warmup_steps=0, kind="cosine")
        optimizer = build_optimizer(model, name="sgd", lr=self.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum, nesterov=cfg.momentum > 0)
        self.aug = AugmentConfig(image_size=bundle.image_size, mean=tuple(mean), std=tuple(std),
                                 min_crop_scale=cfg.min_crop_scale)
        self.state = RunState(name=setup.prefix, script="finetune.py", epochs=cfg.epochs, batch_size=self.batch,
                              world=World(), runtime=runtime, model=model, optimizer=optimizer,
                              scaler=runtime.grad_scaler(), schedule=schedule, paths=setup.paths,
                              csv_columns=FINETUNE_COLUMNS, config={}, say=say, nan_advice="try a lower --lr", n_sums=3,
                              log_steps=False, tb_tag="finetune")
        self.state.config = self.record()
        source = f"untrained {enc.arch} (seed {cfg.seed})" if cfg.untrained else cfg.model_path
        few = (f" (fewer labels than --batch_size {cfg.batch_size}: every label in one batch)"
               if n < cfg.batch_size else "")
        say(f"fine-tuning {source} from {cfg.from_layer}: {len(self.labeled)} labeled images "
            f"({len(self.labeled) // num_classes} per class) of {len(bundle.labeled)}, {len(bundle.test)} test images, "
            f"{num_classes} classes, batch {self.batch}{few}, {steps_per_epoch} steps per epoch, lr {self.lr:g}, "
            f"{cfg.epochs} epochs")

    def train(self) -> int:
        """Restore if resuming, write the config, then train epoch by epoch; returns the exit code."""
        cfg, setup, state = self.cfg, self.setup, self.state
        if setup.checkpoint is not None:
            if setup.checkpoint["config"].get("label_indices") != self.label_indices.tolist():
                raise UserError("the labeled images differ from the checkpoint's (has the data set changed?); "
                                "start a new run with another --name")
            restore(state, checkpoint=setup.checkpoint, path=setup.resume_path, what="fine-tuned model of these flags",
                    legacy_sums=self.legacy_sums)
            if finished(state):  # nothing to train: the run's files stay as they are
                self.say(f"{setup.prefix} is finished ({state.start_epoch} of {cfg.epochs} epochs): "
                         f"{existing(setup.paths[k] for k in ('statistics.csv', 'model.pth', 'config.json'))}")
                return 0
        os.makedirs(os.path.dirname(setup.paths["config.json"]) or ".", exist_ok=True)
        if setup.checkpoint is None and cfg.overwrite:
            for path in remove_files(setup.paths.values()):
                self.say(f"--overwrite: removed {path} of the earlier run")
        atomic_save_json(state.config, setup.paths["config.json"])
        if cfg.tensorboard:  # one point per epoch; a resumed run drops what was logged past its checkpoint
            results_dir = os.path.dirname(setup.paths["config.json"]) or "."
            open_tensorboard(state, cfg.tensorboard_dir or os.path.join(results_dir, f"{setup.prefix}_{TENSORBOARD}"),
                             dataclasses.asdict(cfg))
        try:
            code = run_epochs(state, self)
        finally:
            state.log.close()
        if code == 0:
            last = state.history[-1]
            self.say(f"files: {existing(setup.paths[kind] for kind in RUN_FILES)}")
            print(f"fine-tuned on {len(self.labeled)} labels: test top-1 {last['test_acc@1']:.2f}% "
                  f"top-5 {last['test_acc@5']:.2f}% (last epoch {last['epoch']})", flush=True)
        return code

    def legacy_sums(self, checkpoint: dict) -> list[float]:
        """Running sums of a checkpoint written before `epoch_sums`: its loss sum was over images, not steps."""
        hits = checkpoint.get("epoch_hits", [0.0, 0.0])
        return [checkpoint["epoch_loss_sum"] / self.batch, *hits]

    def record(self) -> dict:
        """The config JSON (and the checkpoint's config): flags, source, the label indices and what was built."""
        bundle, cfg, setup = self.bundle, self.cfg, self.setup
        counts = torch.bincount(self.labeled.labels.cpu(), minlength=len(bundle.classes)).tolist()
        return {**dataclasses.asdict(cfg), "lr": self.lr, "source": setup.source, "prefix": setup.prefix,
                "encoder": dataclasses.asdict(setup.encoder), "feature_dim": setup.head[0],
                "proj_hidden_dim": setup.head[1], "proj_layers": setup.head[2], "image_size": bundle.image_size, "mean": list(self.aug.mean),
                "std": list(self.aug.std), "num_classes": len(bundle.classes), "classes": bundle.classes,
                "label_split": "the data set's labeled training split, in load order", "labels": len(self.labeled),
                "labels_by_class": counts, "batch": self.batch, "steps_per_epoch": self.state.steps_per_epoch,
                "precision": self.runtime.precision, **versions(), "label_indices": self.label_indices.tolist(),
                **({"batching": "even"} if self.even else {})}

    # ------------------------------------------------------------------------- one epoch

    def train_epoch(self, epoch: int, monitor) -> None:
        """Steps of one epoch from monitor.first: lr, crops of the labeled images, forward, loss, backward, step.

        Every layer trains, BatchNorm in training mode (batch statistics, running ones updated)."""
        cfg, state, runtime = self.cfg, self.state, self.runtime
        images, labels = self.labeled.images, self.labeled.labels
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(mix_seed(cfg.seed, epoch)))
        generator = torch.Generator(device=runtime.device)
        state.model.train()
        for step in range(monitor.first, state.steps_per_epoch):
            idx = perm[self.bounds[step]:self.bounds[step + 1]]
            set_lr(state.optimizer, state.schedule.lr(epoch * state.steps_per_epoch + step))
            generator.manual_seed(mix_seed(cfg.seed, epoch, step))
            x = crop_flip(images[idx].to(runtime.device, non_blocking=True), self.aug, generator)  # (B, 3, S, S)
            y = labels[idx.to(labels.device)]                                                     # (B,)
            with runtime.autocast():
                logits = state.model(runtime.prepare(x))                                          # (B, C)
            loss = F.cross_entropy(logits.float(), y)                                             # fp32
            apply_gradients(loss, state.optimizer, state.scaler)
            # train figures are running sums over the epoch's batches (no second pass over the data)
            loss = loss.detach()
            if monitor.update(step, loss, torch.cat([loss.reshape(1), topk_hits(logits.detach(), y, (1, 5))])):
                break

    # ------------------------------------------------------------------------- end of an epoch

    def epoch_row(self, epoch: int, result: EpochResult) -> dict:
        """Test in eval mode, save the weights; returns the CSV row."""
        steps, seen = self.state.steps_per_epoch, self.bounds[-1]  # images per epoch
        loss_sum, hits1, hits5 = result.sums.tolist()
        test1, test5 = self.evaluate()
        row = {"epoch": epoch + 1, "train_loss": loss_sum / steps, "train_acc@1": percent(hits1, seen),
               "train_acc@5": percent(hits5, seen), "test_acc@1": test1, "test_acc@5": test5,
               "lr": self.state.optimizer.param_groups[0]["lr"], "epoch_seconds": result.seconds}
        save_weights(self.state.model, self.setup.paths["model.pth"])
        return row

    def plot(self, history: list[dict]) -> None:
        plot_run_or_warn(history, path=self.setup.paths["curves.png"], title=f"{self.setup.prefix}: fine-tuning",
                         warn=self.say,
                         acc_keys=("train_acc@1", "test_acc@1"), acc_label="top-1 (%)")

    def describe(self, row: dict) -> str:
        return (f"epoch {row['epoch']}/{self.cfg.epochs}: loss {row['train_loss']:.4f}, train top-1 "
                f"{row['train_acc@1']:.2f}%, test top-1 {row['test_acc@1']:.2f}% top-5 {row['test_acc@5']:.2f}%, "
                f"{row['epoch_seconds']:.1f} s")

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Test top-1, top-5 (%) in eval mode (BatchNorm running statistics), without augmentation."""
        model, bundle = self.state.model, self.bundle
        model.eval()
        try:
            logits = extract_features(model, images=bundle.test.images,
                                      to_input=lambda b: normalize(b, self.aug.mean, self.aug.std),
                                      runtime=self.runtime, batch_size=self.cfg.eval_batch_size)   # (T, C)
        finally:
            model.train()
        top1, top5 = topk_accuracy(logits, bundle.test.labels, (1, 5))
        return top1, top5
