"""TensorBoard event files for any script: scalars, CSV rows, the config as text, embeddings.

    log = open_log("results/NAME_tb", purge_step=first_step)   # None as the folder: a log that does nothing
    log.row("linear", row, step=row["epoch"])                   # every number of a CSV row, tag "linear/COLUMN"
    log.scalars({"step/loss": 5.2, "step/lr": 1e-3}, step=120)
    log.text("config", config_markdown(config), step=first_step)
    log.close()

`purge_step` makes a resumed (or restarted) run's log continue without duplicated or
out-of-order steps: TensorBoard hides every event an earlier writer put at a step >= purge_step.
Importing TensorBoard takes seconds, so it happens in open_log, never at import.
"""
from __future__ import annotations

import math
import os
import re
import time
from typing import Any, Mapping, Sequence

import torch

from .cli import UserError


class NoLog:
    """What open_log returns without a folder (or on a rank other than 0): every call does nothing."""

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        pass

    def row(self, prefix: str, row: Mapping[str, Any], step: int, skip: Sequence[str] = ("epoch",)) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def embedding(self, features: torch.Tensor, metadata: list[list[str]], header: list[str],
                  images: torch.Tensor | None, tag: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TBLog(NoLog):
    """A torch SummaryWriter behind a small API that skips missing values (None, NaN)."""

    def __init__(self, writer):
        self.writer = writer

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        """One scalar per tag at this global step; None and NaN are left out (a CSV's empty cell)."""
        for tag, value in values.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(tag, float(value), int(step))

    def row(self, prefix: str, row: Mapping[str, Any], step: int, skip: Sequence[str] = ("epoch",)) -> None:
        """Every numeric column of a CSV row as PREFIX/COLUMN (the tags keep the CSV's names)."""
        self.scalars({f"{prefix}/{key}": value for key, value in row.items()
                      if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool)}, step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Markdown text (TensorBoard's Text tab)."""
        self.writer.add_text(tag, text, int(step))

    def embedding(self, features: torch.Tensor, metadata: list[list[str]], header: list[str],
                  images: torch.Tensor | None, tag: str) -> None:
        """Features (n, d) with one metadata row per point and thumbnails (n, 3, h, w) in [0, 1] for the projector."""
        self.writer.add_embedding(features.detach().float().cpu(), metadata=metadata, metadata_header=header,
                                  label_img=None if images is None else images.detach().float().cpu(), tag=tag)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def require_tensorboard():
    """torch's SummaryWriter class; a one-line UserError when the tensorboard package is missing.

    Scripts call it while checking their flags, so a missing package stops a run before any work.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def open_log(logdir: str | None, purge_step: int | None = None) -> NoLog:
    """A TBLog writing event files into logdir (a NoLog for None); a missing package is a one-line UserError."""
    if logdir is None:
        return NoLog()
    writer_class = require_tensorboard()
    wait_for_a_later_second(logdir)
    return TBLog(writer_class(logdir, purge_step=purge_step))


def wait_for_a_later_second(logdir: str) -> None:
    """Sleep (under a second) until a new event file's name sorts after every one already in logdir.

    TensorBoard reads a folder's event files in name order, and a name starts with the second it was
    made in, then host, pid and a counter. A run resumed within the same second as the last file
    was opened (fast runs, tests) could otherwise sort before it, and its purge of the steps it
    repeats would be read first and undone.
    """
    try:
        names = os.listdir(logdir)
    except OSError:
        return  # no folder yet: nothing to sort after
    seconds = [int(match.group(1)) for match in map(EVENT_FILE.match, names) if match]
    wait = max(seconds, default=0) + 1 - time.time()
    if 0 < wait <= 1:  # a file from the future (a clock set back) is not waited for
        time.sleep(wait + 0.01)


EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d+)\.")


def config_markdown(config: Mapping[str, Any]) -> str:
    """A config as a two-column Markdown table (TensorBoard renders it in the Text tab)."""
    lines = ["| flag | value |", "| --- | --- |"]
    lines += [f"| {key} | {str(value).replace('|', '/')} |" for key, value in config.items()]
    return "\n".join(lines)
