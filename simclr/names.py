"""The names of a run's files and of the columns inside them: pure strings, torch-free.

main.py writes results/NAME_model.pth, NAME_last.pth, NAME_config.json and NAME_statistics.csv;
the evaluation scripts name their own files after that NAME. plot.py and every script's `--help`
read these without waiting for torch to import.
"""
from __future__ import annotations

import os

# A run's files are PREFIX_KIND, one key scheme for every script: PREFIX is main.py's NAME,
# NAME_finetune_TAG or NAME_linear (NAME_linear_augment), and a script's `paths` dict is keyed by KIND.
RUN_FILES = ("statistics.csv", "model.pth", "last.pth", "config.json", "curves.png")   # main.py, finetune.py
LINEAR_FILES = ("statistics.csv", "model.pth", "config.json", "curves.png")            # linear.py: no resume
TENSORBOARD = "tb"  # the TensorBoard folder PREFIX_tb beside them (a folder: never checked or removed)
# what identifies a file of main.py's as one of a run's (curves.png is drawn from the CSV, so it does not)
RUN_SUFFIXES = tuple(f"_{kind}" for kind in ("model.pth", "last.pth", "config.json", "statistics.csv"))

# The columns of each script's PREFIX_statistics.csv, in file order: the one declaration every reader and
# writer uses (docs/files.md describes them). The original tool's CSV had the first four of main.py's.
PRETRAIN_COLUMNS = ("epoch", "train_loss", "test_acc@1", "test_acc@5", "lr", "epoch_seconds",
                    "train_images_per_second", "knn_seconds", "probe_acc@1", "probe_acc@5")
ORIGINAL_COLUMNS = PRETRAIN_COLUMNS[:4]
FINETUNE_COLUMNS = ("epoch", "train_loss", "train_acc@1", "train_acc@5", "test_acc@1", "test_acc@5", "lr",
                    "epoch_seconds")
LINEAR_COLUMNS = ("epoch", "train_loss", "train_acc@1", "train_acc@5", "test_loss", "test_acc@1", "test_acc@5",
                  "lr", "epoch_seconds")


def run_paths(folder: str, prefix: str, kinds: tuple[str, ...] = RUN_FILES) -> dict[str, str]:
    """KIND -> FOLDER/PREFIX_KIND for each of `kinds`."""
    return {kind: os.path.join(folder, f"{prefix}_{kind}") for kind in kinds}


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
