"""Nothing replaced, nothing false: a run never writes over another run's files, a stop saves right after
the step (not after an evaluation), duplicate images are trained on once, and an OSError's advice names
its real cause."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import finetune
import linear
import main
from simclr import data, pretrain
from simclr.cli import UserError, run_cli
from conftest import copy_run, tiny_run_args, write_folder


def checksums(folder) -> dict[str, str]:
    """Every file below `folder` -> the sha256 of its bytes."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def only_error(capsys) -> str:
    """The one error line of the last command's stderr (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- main.py

def test_a_second_run_of_the_same_name_on_other_data_is_refused_and_replaces_nothing(tiny_folder, tmp_path, capsys):
    other = write_folder(tmp_path / "other", seed=1)
    results = tmp_path / "results"
    assert main.main(tiny_run_args(tiny_folder, results)) == 0  # the default name, as a newcomer would
    before = checksums(results)
    assert len([f for f in before if not f.startswith(".")]) == 5
    capsys.readouterr()
    assert main.main(tiny_run_args(other, results)) == 2
    line = only_error(capsys)
    assert "--resume auto" in line and "--name" in line and "--overwrite" in line, line
    assert checksums(results) == before


def test_overwrite_replaces_the_earlier_run_whole(tiny_folder, tmp_path, capsys):
    results = tmp_path / "results"
    assert main.main(tiny_run_args(tiny_folder, results, "r", epochs=2)) == 0
    assert main.main(tiny_run_args(tiny_folder, results, "r", "--overwrite", seed=3)) == 0
    frame = pd.read_csv(results / "r_statistics.csv")
    assert frame["epoch"].tolist() == [1]  # the new run's one epoch, none of the earlier run's two
    saved = torch.load(results / "r_last.pth", weights_only=True)
    assert saved["config"]["seed"] == 3
    assert "removed" in capsys.readouterr().out


def test_overwrite_with_resume_is_refused(tiny_folder, tmp_path, capsys):
    assert main.main(tiny_run_args(tiny_folder, tmp_path, "r", "--resume", "auto", "--overwrite")) == 2
    assert "pass one of them" in only_error(capsys)
    assert not any(tmp_path.iterdir())


def test_a_stopped_run_is_refused_without_resume_and_continues_with_it(tiny_folder, tmp_path, monkeypatch, capsys):
    args = tiny_run_args(tiny_folder, tmp_path, "s", epochs=2)
    real = pretrain.Pretraining.epoch_row

    def stop_after_first(self, epoch, result):
        row = real(self, epoch, result)
        os.kill(os.getpid(), signal.SIGINT)  # a stop after epoch 1's row: epoch 2 is not trained
        return row
    with monkeypatch.context() as patch:
        patch.setattr(pretrain.Pretraining, "epoch_row", stop_after_first)
        assert main.main(args) == 130
    before = checksums(tmp_path)
    capsys.readouterr()
    assert main.main(args) == 2
    assert "continue it with --resume auto" in only_error(capsys)
    assert checksums(tmp_path) == before
    assert main.main([*args, "--resume", "auto"]) == 0
    assert pd.read_csv(tmp_path / "s_statistics.csv")["epoch"].tolist() == [1, 2]


# ----------------------------------------------------------------------------- linear.py and finetune.py

def test_linear_twice_is_refused_and_augment_has_its_own_files(trained, tmp_path, capsys):
    model = copy_run(trained, tmp_path, "run")
    common = ["--model_path", model, "--epochs", "2", "--batch_size", "16", "--device", "cpu"]
    assert linear.main(common) == 0
    plain = checksums(tmp_path)
    assert linear.main([*common, "--augment"]) == 0  # its own NAME_linear_augment_* files
    after = checksums(tmp_path)
    assert {k: after[k] for k in plain} == plain
    assert os.path.isfile(tmp_path / "run_linear_augment_statistics.csv")
    capsys.readouterr()
    assert linear.main([*common, "--epochs", "3"]) == 2
    line = only_error(capsys)
    assert "run_linear_" in line and "these same weights" in line and "--overwrite" in line, line
    assert checksums(tmp_path) == after
    assert linear.main([*common, "--epochs", "3", "--overwrite"]) == 0
    assert pd.read_csv(tmp_path / "run_linear_statistics.csv")["epoch"].tolist() == [1, 2, 3]


def test_finetune_twice_is_refused_unless_overwrite(trained, tmp_path, capsys):
    model = copy_run(trained, tmp_path, "run")
    common = ["--model_path", model, "--epochs", "1", "--batch_size", "4", "--device", "cpu",
              "--label_fraction", "0.25"]
    assert finetune.main(common) == 0
    before = checksums(tmp_path)
    capsys.readouterr()
    assert finetune.main([*common, "--lr", "0.01"]) == 2
    line = only_error(capsys)
    assert "--resume auto" in line and "--overwrite" in line, line
    assert checksums(tmp_path) == before
    assert finetune.main([*common, "--resume", "auto"]) == 0  # finished: nothing rewritten
    assert checksums(tmp_path) == before
    assert finetune.main([*common, "--lr", "0.01", "--overwrite"]) == 0
    assert checksums(tmp_path) != before


# ----------------------------------------------------------------------------- a stop and the evaluation

def test_a_stop_during_the_evaluation_saves_the_steps_and_the_resume_evaluates(tiny_folder, tmp_path, monkeypatch,
                                                                              capsys):
    reference = tmp_path / "reference"
    assert main.main(tiny_run_args(tiny_folder, reference, "r", epochs=2)) == 0
    stopped = tmp_path / "stopped"
    real, calls = pretrain.Pretraining.evaluate, []

    def signal_then_evaluate(self):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the evaluation runs
        return real(self)
    with monkeypatch.context() as patch:
        patch.setattr(pretrain.Pretraining, "evaluate", signal_then_evaluate)
        assert main.main(tiny_run_args(tiny_folder, stopped, "r", epochs=2)) == 130
    err = capsys.readouterr().err
    assert "stopping this epoch's evaluation" in err, err
    saved = torch.load(stopped / "r_last.pth", weights_only=True)
    assert (saved["epoch"], saved["step_in_epoch"]) == (0, 6)  # every step of epoch 1 done, its evaluation not
    assert pd.read_csv(stopped / "r_statistics.csv").empty
    assert main.main(tiny_run_args(tiny_folder, stopped, "r", "--resume", "auto", epochs=2)) == 0
    assert "its evaluation" in capsys.readouterr().out
    ours, theirs = (pd.read_csv(d / "r_statistics.csv") for d in (stopped, reference))
    figures = ["epoch", "train_loss", "test_acc@1", "test_acc@5", "probe_acc@1"]
    pd.testing.assert_frame_equal(ours[figures], theirs[figures])
    a, b = (torch.load(d / "r_model.pth", weights_only=True) for d in (stopped, reference))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_in_the_last_step_skips_the_evaluation(tiny_folder, tmp_path, monkeypatch):
    evaluated = []
    monkeypatch.setattr(pretrain.Pretraining, "evaluate", lambda self: evaluated.append(1) or {})
    real = pretrain.Pretraining.train_epoch

    def stop_in_last_step(self, epoch, monitor):
        real_update = monitor.update

        def update(step, loss, sums=None):
            if step + 1 == self.state.steps_per_epoch:
                os.kill(os.getpid(), signal.SIGINT)
            return real_update(step, loss, sums)
        monitor.update = update
        real(self, epoch, monitor)
    monkeypatch.setattr(pretrain.Pretraining, "train_epoch", stop_in_last_step)
    assert main.main(tiny_run_args(tiny_folder, tmp_path, "r", epochs=2)) == 130
    assert evaluated == []
    assert torch.load(tmp_path / "r_last.pth", weights_only=True)["step_in_epoch"] == 6


# ----------------------------------------------------------------------------- the same image twice

def test_unlabeled_copies_of_train_images_are_trained_on_once(tmp_path):
    root = write_folder(tmp_path / "data")
    unlabeled = root / "unlabeled"
    unlabeled.mkdir()
    shutil.copy(root / "train" / "cat" / "000.png", unlabeled / "a.png")  # a copy of a labeled image
    shutil.copy(root / "train" / "dog" / "001.png", unlabeled / "b.png")  # another
    rng = np.random.default_rng(5)
    fresh = rng.integers(0, 255, (16, 16, 3)).astype(np.uint8)
    Image.fromarray(fresh).save(unlabeled / "c.png")
    Image.fromarray(fresh).save(unlabeled / "d.png")  # the same new image twice
    shutil.copy(root / "train" / "frog" / "002.png", root / "test" / "frog" / "copy.png")  # a test image seen in training
    notes = []
    bundle = data.load_dataset("folder", str(root), 16, log=notes.append)
    assert len(bundle.train) == 48 + 1 and len(bundle.labeled) == 48
    assert (bundle.train.labels < 0).sum() == 1
    said = " ".join(notes)
    assert "2 are copies of train/ images and 1 repeat other unlabeled/ images" in said, notes
    assert "1 of the 19 images" in said and "also training images" in said, notes
    # a brute-force reference: every kept image is distinct from every other
    flat = bundle.train.images.reshape(len(bundle.train), -1)
    assert len({bytes(row.numpy()) for row in flat}) == len(bundle.train)


def test_a_folder_without_copies_is_loaded_as_it_is(tiny_folder):
    notes = []
    bundle = data.load_dataset("folder", str(tiny_folder), 16, log=notes.append)
    assert len(bundle.train) == 48 and not any("same pixels" in n for n in notes)


# ----------------------------------------------------------------------------- what an OSError's line says

@pytest.mark.parametrize("code, says, never", [
    (errno.EEXIST, "already there", "free space"),
    (errno.EISDIR, "is a folder", "free space"),
    (errno.EACCES, "permissions", "free space"),
    (errno.ENOSPC, "free space", "permissions"),
])
def test_an_os_error_is_one_line_with_advice_for_its_cause(code, says, never, capsys):
    def job():
        raise OSError(code, os.strerror(code), "results/x.csv")
    assert run_cli(job) == 2
    line = only_error(capsys)
    assert line.startswith("error: results/x.csv: ") and says in line and never not in line, line


def test_the_refusal_is_a_user_error_before_anything_is_set_up(tmp_path):
    (tmp_path / "x_statistics.csv").write_text("epoch\n")
    values = {"dataset": "folder", "data_root": "nowhere", "results_dir": str(tmp_path), "name": "x",
              "device": "cpu"}
    with pytest.raises(UserError, match="x_statistics.csv already holds an earlier run named x; pass another --name"):
        pretrain.configure(values, main_world())


def main_world():
    from simclr.distributed import init_world
    return init_world("cpu")
