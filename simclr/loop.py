"""The run skeleton of main.py and finetune.py: a run's state, its epoch loop with safe stops, the
monitor beside every step, the end-of-epoch writes, and the checkpoint that makes --resume exact.

A job (simclr.pretrain, simclr.finetuning) builds a `RunState` and supplies only what is its own
(the `Job` methods): the steps of an epoch, the evaluation that turns an epoch into a CSV row,
its curves and its line per epoch. `run_epochs` drives it:

    for each epoch from the resumed one:
        with Monitor(...) as monitor: job.train_epoch(epoch, monitor)   # stops early on a signal
        stopped mid-epoch -> NAME_last.pth at that step, the CSV, exit 128 + signal
        else row = job.epoch_row(...) -> CSV, curves, TensorBoard, NAME_last.pth; a line
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .checkpoint import load_strict, restore_rng, save_training_checkpoint
from .cli import EvaluationStopped, NonFiniteLoss, StopRequest, UserError, first_line, resume_command
from .distributed import World, any_rank, mean_over_ranks
from .engine import Runtime
from .files import atomic_write_csv
from .optim import Schedule
from .tblog import NoLog, config_markdown, open_log

# The files of a run (main.py) and of a fine-tuning run (finetune.py), after NAME_ / NAME_finetune_TAG_.
# Under torchrun, ranks compare stop requests and non-finite losses every this many steps.
AGREE_EVERY = 10
# Seconds between two reads of the loss for the progress bar (and TensorBoard): each read waits for
# the device, so a few per second, never one per step.
READ_EVERY_S = 0.5


@dataclass(kw_only=True)
class RunState:
    """One training run's state: built once by its job, then driven epoch by epoch by run_epochs (by keyword:
    fifteen fields in a row are read by name, not by position)."""
    name: str                          # what messages call the run: NAME, or NAME_finetune_TAG
    script: str                        # main.py | finetune.py, for the command that resumes it
    epochs: int
    batch_size: int                    # images per step over all processes (for images/s)
    world: World
    runtime: Runtime
    model: torch.nn.Module             # what is saved: never compiled, never wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    schedule: Schedule
    paths: dict[str, str]              # names.RUN_FILES -> path
    csv_columns: tuple[str, ...]
    config: dict                       # the config saved in NAME_last.pth
    say: Callable[..., None]
    nan_advice: str                    # what to try when the loss is not finite
    n_sums: int = 1                    # running sums per epoch, the step losses first
    log_steps: bool = True             # TensorBoard: step/* scalars, rows at their last step's index
    tb_tag: str = "epoch"              # TensorBoard: rows as TAG/COLUMN
    start_epoch: int = 0               # position to continue from (a resumed run's checkpoint)
    start_step: int = 0
    carried_sums: list[float] = field(default_factory=list)   # of the interrupted epoch, so far
    carried_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)         # the CSV rows
    best: float = -1.0                 # best evaluation figure so far (main.py: kNN top-1)
    log: NoLog = field(default_factory=NoLog)                # TensorBoard, or nothing
    extra: Callable[[], dict] = dict   # more entries of NAME_last.pth, the job's own (plain values and tensors)

    @property
    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch


@dataclass
class EpochResult:
    """What one pass over (part of) an epoch produced."""
    done: int               # steps finished in this epoch (from its first step, resumed or not)
    sums: torch.Tensor      # (n_sums,) running sums, averaged over processes; [0] is the sum of step losses
    seconds: float          # training time of the epoch so far


class Job(Protocol):
    """What a script's job supplies to run_epochs."""

    def train_epoch(self, epoch: int, monitor: "Monitor") -> None:
        """The steps of `epoch` from monitor.first; each step ends with `if monitor.update(...): break`."""

    def epoch_row(self, epoch: int, result: EpochResult) -> dict:
        """Evaluate (every rank) and return the CSV row; may save weights (rank 0)."""

    def plot(self, history: list[dict]) -> None:
        """Draw the curves PNG (rank 0)."""

    def describe(self, row: dict) -> str:
        """The line printed after an epoch."""


# ----------------------------------------------------------------------------- the loop

def run_epochs(state: RunState, job: Job) -> int:
    """Train from the state's position to the last epoch, or until a stop request; returns the exit code."""
    with StopRequest() as stop:
        for epoch in range(state.start_epoch, state.epochs):
            with Monitor(state, epoch, stop) as monitor:
                job.train_epoch(epoch, monitor)
            result = monitor.result()
            # stopped mid-epoch, or after its last step and before (or during) its evaluation: save exactly
            # where we are; a checkpoint after the last step resumes with the evaluation
            if (result.done < state.steps_per_epoch
                    or any_rank([stop.requested], state.world, state.runtime.device)[0]):
                return save_and_stop(state, stop=stop, epoch=epoch, result=result)
            try:
                with stop.evaluation(interruptible=not state.world.distributed):
                    row = job.epoch_row(epoch, result)
            except EvaluationStopped:
                return save_and_stop(state, stop=stop, epoch=epoch, result=result)
            end_epoch(state, job=job, epoch=epoch, row=row)
            state.say(job.describe(row))
            if epoch + 1 < state.epochs and any_rank([stop.requested], state.world, state.runtime.device)[0]:
                return stopped(state, stop)
    return 0


def save_and_stop(state: RunState, stop: StopRequest, epoch: int, result: EpochResult) -> int:
    """After a stop request: NAME_last.pth at the position `result` reached and the CSV, then how to resume."""
    if state.world.is_main:
        save_last(state, epoch, result)
        atomic_write_csv(state.paths["statistics.csv"], state.csv_columns, state.history)
    return stopped(state, stop)


def end_epoch(state: RunState, job: Job, epoch: int, row: dict) -> None:
    """The job's row of the epoch: TensorBoard, the checkpoint that says the epoch is done, the CSV, the curves.

    The CSV follows the checkpoint (which holds the rows too): a save that fails (a full disk) leaves a
    CSV that never claims an epoch no checkpoint holds."""
    state.history.append(row)
    if state.world.is_main:
        log_row(state, row)  # before the checkpoint: a resumed run purges what was logged past it
        save_last(state, epoch + 1, EpochResult(0, torch.zeros(state.n_sums), 0.0))
        atomic_write_csv(state.paths["statistics.csv"], state.csv_columns, state.history)
        job.plot(state.history)


class Monitor:
    """Beside the steps of one epoch: the running sums and the step of the first non-finite loss,
    kept on the device; a few times per second the progress bar and TensorBoard's step scalars
    (one transfer); the stop decision, taken together by every rank under torchrun."""

    def __init__(self, state: RunState, epoch: int, stop: StopRequest):
        from tqdm import tqdm
        self.state, self.epoch, self.stop = state, epoch, stop
        device = state.runtime.device
        resumed = epoch == state.start_epoch
        self.first = state.start_step if resumed else 0       # the epoch's first step to run
        carried = state.carried_sums if resumed and state.carried_sums else [0.0] * state.n_sums
        self.sums = torch.tensor(carried, dtype=torch.float32, device=device)              # (n_sums,)
        self.first_bad = torch.tensor(-1, device=device)  # step of the first non-finite loss
        self.seconds = state.carried_seconds if resumed else 0.0
        self.done = self.first
        self.bar = tqdm(total=state.steps_per_epoch, initial=self.first, desc=f"epoch {epoch + 1}/{state.epochs}",
                        disable=not state.world.is_main, dynamic_ncols=True)
        self.t0 = self.last_look = time.perf_counter()
        self.done_at_look = self.first

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()  # before any message: an error must not be printed onto the bar's line

    def update(self, step: int, loss: torch.Tensor, sums: torch.Tensor | None = None) -> bool:
        """Count a finished step (loss: its detached loss; sums: (n_sums,) to add, [0] = loss; default
        the loss alone). True when the epoch must stop now (a stop request, agreed by every rank)."""
        state, steps = self.state, self.state.steps_per_epoch
        self.sums += loss.reshape(1) if sums is None else sums
        self.first_bad.copy_(torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad))
        self.done = step + 1
        self.bar.update(1)
        if state.world.distributed:  # every rank must stop, or fail, at the same step
            stop_now = False
            if self.done % AGREE_EVERY == 0 or self.done == steps:
                stop_now = self._agree()
        else:
            stop_now = self.stop.requested
        now = time.perf_counter()
        if now - self.last_look > READ_EVERY_S or self.done == steps:  # a few syncs per second
            if not state.world.distributed:
                check_finite(state, self.first_bad, self.epoch)
            mean, last = torch.stack([self.sums[0] / self.done, loss.float()]).tolist()  # one transfer for both
            self.bar.set_postfix(loss=f"{mean:.4f}")
            if state.log_steps:
                speed = (self.done - self.done_at_look) * state.batch_size / max(now - self.last_look, 1e-9)
                state.log.scalars({"step/loss": last, "step/loss_epoch_mean": mean,
                                   "step/lr": state.optimizer.param_groups[0]["lr"],
                                   "step/images_per_second": speed}, self.epoch * steps + step)
            self.last_look, self.done_at_look = now, self.done
        return stop_now and self.done < steps

    def _agree(self) -> bool:
        """Stop now if any rank was asked to; fail if any rank saw a non-finite loss."""
        state = self.state
        wants_stop, bad = any_rank([self.stop.requested, self.first_bad >= 0], state.world, state.runtime.device)
        if bad:
            check_finite(state, self.first_bad.clamp_min(0), self.epoch)
        return wants_stop

    def result(self) -> EpochResult:
        """After the epoch's steps: fail on a non-finite loss; the sums averaged over ranks, the seconds."""
        check_finite(self.state, self.first_bad, self.epoch)
        device = self.state.runtime.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = self.seconds + time.perf_counter() - self.t0
        return EpochResult(self.done, mean_over_ranks(self.sums, self.state.world), seconds)


def check_finite(state: RunState, first_bad: torch.Tensor, epoch: int) -> None:
    """Raise NonFiniteLoss naming the epoch and step of the first non-finite loss (one device sync)."""
    bad = int(first_bad.item())
    if bad >= 0:
        last = state.paths["last.pth"]
        kept = (f"the last good checkpoint is kept at {last} (resume with --resume auto)" if os.path.exists(last)
                else "no checkpoint was written yet")
        raise NonFiniteLoss(f"the loss became NaN/inf at epoch {epoch + 1}, step {bad + 1} of "
                            f"{state.steps_per_epoch}; {kept}; {state.nan_advice}")


def stopped(state: RunState, stop: StopRequest) -> int:
    """Print how to continue after a signal; the exit code is 128 + signal number."""
    if state.world.is_main:
        where = f"stopped; checkpoint {state.paths['last.pth']}."
        if state.world.distributed:
            print(f"{where} Resume with the same torchrun command plus --resume auto", file=sys.stderr, flush=True)
        else:
            print(f"{where} Resume with:\n  {resume_command(state.script)}", file=sys.stderr, flush=True)
    return stop.exit_code


# ----------------------------------------------------------------------------- TensorBoard

def open_tensorboard(state: RunState, logdir: str, config: dict) -> None:
    """Event files in `logdir`, continuing at the run's first point to write.

    Whatever an earlier writer logged at that point or later (a run killed after its last
    checkpoint, or an earlier run of the same name started afresh) is purged, so the steps of the
    log stay unique and increasing across stops and resumes.
    """
    first = first_log_step(state)
    state.log = open_log(logdir, purge_step=first)
    state.log.text("config", config_markdown(config), first)
    for row in state.history:  # only the untrained encoder's row, of a run resumed before its first step
        if row_step(state, row["epoch"]) >= first:
            log_row(state, row)


def first_log_step(state: RunState) -> int:
    """The first TensorBoard step this start writes: the next optimizer step, or the next epoch's row."""
    if state.log_steps:
        return state.start_epoch * state.steps_per_epoch + state.start_step
    return state.start_epoch + 1


def row_step(state: RunState, epoch: int) -> int:
    """TensorBoard step of the row of `epoch` (1-based; 0: before training): with step scalars the global
    index of the epoch's last step, else the epoch number."""
    if state.log_steps:
        return max(0, epoch * state.steps_per_epoch - 1)
    return epoch


def log_row(state: RunState, row: dict) -> None:
    """A CSV row as TAG/COLUMN scalars, flushed to disk (rank 0 with --tensorboard; else nothing)."""
    state.log.row(state.tb_tag, row, row_step(state, row["epoch"]))
    state.log.flush()


# ----------------------------------------------------------------------------- checkpoints

def save_last(state: RunState, epoch: int, result: EpochResult) -> None:
    """NAME_last.pth: everything --resume needs to continue exactly (epoch = completed epochs)."""
    sums = result.sums.tolist()
    save_training_checkpoint(state.paths["last.pth"], model=state.model, optimizer=state.optimizer,
                             scaler=state.scaler, config=state.config, epoch=epoch, step=result.done,
                             loss_sum=sums[0], seconds=result.seconds, best_acc=state.best, history=state.history,
                             extra={**state.extra(), "epoch_sums": sums})


def restore(state: RunState, checkpoint: dict, path: str, what: str,
            legacy_sums: Callable[[dict], list[float]] | None = None) -> None:
    """Continue from a NAME_last.pth: weights, optimizer, RNG, scaler, position, history, best figure.

    Every part is checked as it is put back: a checkpoint that loads but does not fit this run is
    one UserError naming the part, never a traceback halfway through. legacy_sums: the running
    sums of a checkpoint written before they were saved as `epoch_sums`."""
    if checkpoint["epoch"] > state.epochs:
        raise UserError(f"--resume {path}: it has done {checkpoint['epoch']} epochs, more than --epochs {state.epochs}")
    if checkpoint["step_in_epoch"] > state.steps_per_epoch:  # == : every step done, the evaluation not yet
        raise UserError(f"--resume {path}: its step_in_epoch {checkpoint['step_in_epoch']} does not fit the "
                        f"{state.steps_per_epoch} steps per epoch of this data")
    load_strict(state.model, state=checkpoint["model"], path=path, what=what, prefix="")
    for part, load in (("optimizer", state.optimizer.load_state_dict), ("rng", restore_rng),
                       ("scaler", state.scaler.load_state_dict if state.scaler is not None else None)):
        if load is None or (part == "scaler" and not checkpoint.get("scaler")):
            continue
        try:
            load(checkpoint[part])
        except Exception as e:  # noqa: BLE001 - a malformed part of an untrusted file is the user's to fix
            raise UserError(f"--resume {path}: its {part} entry does not fit this run ({first_line(e)[:120]})") from None
    sums = checkpoint.get("epoch_sums")
    if sums is None:
        sums = legacy_sums(checkpoint) if legacy_sums is not None else [checkpoint["epoch_loss_sum"]]
    if (not isinstance(sums, list) or len(sums) != state.n_sums
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in sums)):
        raise UserError(f"--resume {path}: its epoch_sums entry is not {state.n_sums} finite numbers; "
                        f"the file is damaged")
    state.start_epoch, state.start_step = checkpoint["epoch"], checkpoint["step_in_epoch"]
    state.carried_sums, state.carried_seconds = [float(v) for v in sums], checkpoint["epoch_seconds"]
    state.history = [row for row in checkpoint["history"] if row["epoch"] <= state.start_epoch]
    state.best = checkpoint["best_acc"]
    if not finished(state):
        pending = " (its steps are done: its evaluation)" if state.start_step == state.steps_per_epoch else ""
        state.say(f"resuming {state.name} at epoch {state.start_epoch + 1}, step {state.start_step} "
                  f"of {state.steps_per_epoch}{pending}")


def finished(state: RunState) -> bool:
    """True when the run's position is past its last epoch: nothing is left to train."""
    return state.start_epoch >= state.epochs
