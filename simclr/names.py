"""The names of a run's files and of the columns inside them: pure strings, torch-free.

main.py writes results/NAME_model.pth, NAME_last.pth, NAME_config.json and NAME_statistics.csv;
the evaluation scripts name their own files after that NAME. plot.py and every script's `--help`
read these without waiting for torch to import.
"""
from __future__ import annotations

import os

# The suffixes main.py gives a run's files; NAME is what stands before them.
RUN_SUFFIXES = ("_model.pth", "_last.pth", "_config.json", "_statistics.csv")

# Columns of linear.py's NAME_linear_statistics.csv, in file order.
LINEAR_COLUMNS = ("epoch", "train_loss", "train_acc@1", "train_acc@5", "test_loss", "test_acc@1", "test_acc@5",
                  "lr", "epoch_seconds")


def run_base(path: str, suffixes: tuple[str, ...] = RUN_SUFFIXES) -> str:
    """results/NAME_model.pth (or another of the run's files) -> results/NAME; other files lose their extension."""
    for suffix in suffixes:
        if path.endswith(suffix) and len(os.path.basename(path)) > len(suffix):
            return path[: -len(suffix)]
    return os.path.splitext(path)[0]


def run_name(path: str, suffixes: tuple[str, ...] = RUN_SUFFIXES) -> str:
    """results/NAME_model.pth -> NAME."""
    return os.path.basename(run_base(path, suffixes))


def config_path_for(model_path: str) -> str:
    """The NAME_config.json main.py writes beside NAME_model.pth and NAME_last.pth."""
    return run_base(model_path) + "_config.json"
