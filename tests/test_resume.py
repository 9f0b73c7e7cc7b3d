"""Runs that survive: exact resume, kills between write and rename, signals, non-finite losses."""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from simclr import loop, pretrain
from simclr import flags
import main
from conftest import ROOT, run_main, tiny_run_args
from simclr.cli import UserError
from simclr.loss import NTXent

DETERMINISTIC = ["epoch", "train_loss", "test_acc@1", "test_acc@5", "lr"]  # timings differ run to run


def weights(results, name, kind="model"):
    return torch.load(results / f"{name}_{kind}.pth", weights_only=True)


def assert_same_run(results, a, b):
    fa, fb = (pd.read_csv(results / f"{n}_statistics.csv") for n in (a, b))
    pd.testing.assert_frame_equal(fa[DETERMINISTIC], fb[DETERMINISTIC], check_exact=True)
    for kind in ("model", "last"):
        wa, wb = weights(results, a, kind), weights(results, b, kind)
        wa, wb = (w if kind == "model" else w["model"] for w in (wa, wb))
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (kind, key)


@pytest.fixture(scope="module")
def straight(tiny_folder, tmp_path_factory):
    """Two epochs in one go (the reference), with a schedule and LARS so that their state matters."""
    results = tmp_path_factory.mktemp("straight")
    extra = ["--optimizer", "lars", "--lr", "0.5", "--warmup_epochs", "1", "--schedule", "cosine"]
    assert main.main(tiny_run_args(tiny_folder, results, "run", *extra, epochs=2)) == 0
    return results, extra


def copy_reference(straight, tmp_path):
    import shutil
    results, extra = straight
    for suffix in ("statistics.csv", "model.pth", "last.pth"):
        shutil.copy(results / f"run_{suffix}", tmp_path / f"ref_{suffix}")
    return extra


def test_resume_after_one_epoch_is_exact(tiny_folder, tmp_path, straight, monkeypatch):
    extra = copy_reference(straight, tmp_path)
    real_save_last = loop.save_last
    calls = []

    def stop_after_first_epoch(state, epoch, result):
        real_save_last(state, epoch, result)
        calls.append(epoch)
        if epoch == 1:
            raise KeyboardInterrupt  # the process dies right after epoch 1 was saved
    with monkeypatch.context() as patch:
        patch.setattr(loop, "save_last", stop_after_first_epoch)
        assert main.main(tiny_run_args(tiny_folder, tmp_path, "r", *extra, epochs=2)) == 130
    assert calls == [1]
    assert main.main(tiny_run_args(tiny_folder, tmp_path, "r", "--resume", "auto", *extra, epochs=2)) == 0
    assert_same_run(tmp_path, "ref", "r")


def test_resume_mid_epoch_after_sigint_is_exact(tiny_folder, tmp_path, straight, capsys, monkeypatch):
    extra = copy_reference(straight, tmp_path)
    real_step = pretrain.train_step
    count = [0]

    def step_then_interrupt(*a, **kw):
        loss = real_step(*a, **kw)
        count[0] += 1
        if count[0] == 9:  # epoch 2 (6 steps per epoch), step 3
            signal.raise_signal(signal.SIGINT)
        return loss
    with monkeypatch.context() as patch:
        patch.setattr(pretrain, "train_step", step_then_interrupt)
        code = main.main(tiny_run_args(tiny_folder, tmp_path, "r", *extra, epochs=2))
    err = capsys.readouterr().err
    assert code == 130 and "--resume auto" in err
    ckpt = torch.load(tmp_path / "r_last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 3)
    assert len(pd.read_csv(tmp_path / "r_statistics.csv")) == 1
    assert main.main(tiny_run_args(tiny_folder, tmp_path, "r", "--resume", "auto", *extra, epochs=2)) == 0
    assert_same_run(tmp_path, "ref", "r")


class Killed(BaseException):
    """Stands for kill -9 at the worst moment."""


def test_kill_between_temp_write_and_rename_keeps_previous_checkpoint(tiny_folder, tmp_path, straight, monkeypatch):
    extra = copy_reference(straight, tmp_path)
    real_replace = os.replace
    seen = []

    def dying_replace(src, dst):
        if str(dst).endswith("r_last.pth"):
            seen.append(dst)
            if len(seen) == 2:  # epoch 2's checkpoint is fully written to its temp file, not yet renamed
                raise Killed
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(Killed):
        main.main(tiny_run_args(tiny_folder, tmp_path, "r", *extra, epochs=2))
    monkeypatch.setattr(os, "replace", real_replace)
    ckpt = torch.load(tmp_path / "r_last.pth", weights_only=True)  # the old file, whole
    assert ckpt["epoch"] == 1
    (tmp_path / ".r_last.pth.deadbeef.tmp").write_bytes(b"half a file")  # what a real kill -9 leaves
    assert main.main(tiny_run_args(tiny_folder, tmp_path, "r", "--resume", "auto", *extra, epochs=2)) == 0
    assert_same_run(tmp_path, "ref", "r")


def test_resume_refuses_changed_run_flags_and_notes_allowed_ones(tiny_folder, tmp_path, straight, capsys):
    results, extra = straight
    code = main.main(tiny_run_args(tiny_folder, results, "run", "--resume", "auto", *extra, epochs=2,
                                   feature_dim=32))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "feature_dim" in err and len(err.splitlines()) == 1
    before = (results / "run_statistics.csv").read_bytes()
    code = main.main(["--resume", str(results / "run_last.pth"), "--epochs", "3", "--knn_every", "2",
                      "--results_dir", str(tmp_path)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "--knn_every 1 -> 2" in out.out and "--epochs 2 -> 3" in out.out
    # continued under the checkpoint's own name, in the new results dir, with its earlier rows
    frame = pd.read_csv(tmp_path / "run_statistics.csv")
    assert frame["epoch"].tolist() == [1, 2, 3]
    assert (results / "run_statistics.csv").read_bytes() == before


def test_resume_of_a_bad_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "x_last.pth"
    bad.write_bytes(b"not a checkpoint")
    assert main.main(["--resume", str(bad)]) == 2
    assert "not a PyTorch weights file" in capsys.readouterr().err
    assert main.main(["--resume", str(tmp_path / "missing.pth")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_non_finite_loss_stops_with_epoch_and_step(tiny_folder, tmp_path, monkeypatch, capsys):
    real = NTXent.__call__
    count = [0]

    def poisoned(*a, **kw):
        count[0] += 1
        loss = real(*a, **kw)
        return loss * float("nan") if count[0] == 8 else loss  # epoch 2, step 2
    monkeypatch.setattr(NTXent, "__call__", poisoned)
    code = main.main(tiny_run_args(tiny_folder, tmp_path, "nan", epochs=3))
    err = capsys.readouterr().err
    assert code == 1 and "epoch 2, step 2 of 6" in err
    assert torch.load(tmp_path / "nan_last.pth", weights_only=True)["epoch"] == 1  # last good one kept


@pytest.mark.long
def test_sigint_subprocess_then_resume_auto_completes(tiny_folder, tmp_path):
    base = tiny_run_args(tiny_folder, tmp_path, "sig", epochs=40)
    proc = subprocess.Popen([sys.executable, "main.py", *base], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    csv = tmp_path / "sig_statistics.csv"
    deadline = time.time() + 120
    while not csv.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Resume with:" in err and "--resume auto" in err
    command = err.split("Resume with:")[1].strip().splitlines()[0].split()
    assert command[:2] == ["python", "main.py"]
    done = len(pd.read_csv(csv))
    epochs = str(done + 1)
    run_main([*command[2:], "--epochs", epochs])
    assert pd.read_csv(csv)["epoch"].tolist() == list(range(1, done + 2))


def test_sigterm_stops_after_the_step_with_exit_143(tiny_folder, tmp_path, capsys, monkeypatch):
    real_step = pretrain.train_step
    count = [0]

    def step_then_term(*a, **kw):
        loss = real_step(*a, **kw)
        count[0] += 1
        if count[0] == 2:
            signal.raise_signal(signal.SIGTERM)
        return loss
    with monkeypatch.context() as patch:
        patch.setattr(pretrain, "train_step", step_then_term)
        code = main.main(tiny_run_args(tiny_folder, tmp_path, "term", epochs=1))
    assert code == 143 and count[0] == 2  # no step after the one that was running
    assert "--resume auto" in capsys.readouterr().err
    assert torch.load(tmp_path / "term_last.pth", weights_only=True)["step_in_epoch"] == 2


def test_resume_accepts_the_resolved_default_image_size_and_refuses_another():
    saved = flags.train_values({"dataset": "cifar10"})
    values, _ = flags.train_resume_values({"image_size": 32, "resume": "x"}, saved, "x")
    assert values["image_size"] == 32
    with pytest.raises(UserError, match="image_size"):
        flags.train_resume_values({"image_size": 64, "resume": "x"}, saved, "x")
    with pytest.raises(UserError, match="recipe"):
        flags.train_resume_values({"recipe": "paper", "resume": "x"}, saved, "x")


def test_resume_takes_machine_settings_afresh_and_keeps_the_plan():
    saved = {**flags.train_values({"epochs": 7}), "device": "cuda:3", "precision": "fp16", "workers": 99}
    values, _ = flags.train_resume_values({"resume": "x"}, saved, "x")
    assert (values["device"], values["precision"], values["workers"]) == ("auto", "auto", flags.TRAIN_DEFAULTS["workers"])
    assert values["epochs"] == 7


def test_resume_refuses_a_checkpoint_config_that_makes_no_sense():
    saved = flags.train_values({})
    for key, value in (("batch_size", "eight"), ("feature_dim", -5), ("image_size", 1e30), ("arch", "resnet99")):
        with pytest.raises(UserError, match=key):
            flags.train_resume_values({"resume": "x"}, {**saved, key: value}, "x_last.pth")


def test_a_checkpoint_holding_a_setting_of_another_loss_still_resumes(tiny_folder, tmp_path, capsys):
    # older versions accepted --dcl_sigma beside --loss ntxent, stored it in the config and never used it
    assert main.main(tiny_run_args(tiny_folder, tmp_path, "old")) == 0
    path = tmp_path / "old_last.pth"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"]["dcl_sigma"] = 0.5
    torch.save(checkpoint, path)
    assert main.main(tiny_run_args(tiny_folder, tmp_path, "old", "--resume", "auto", epochs=2)) == 0
    assert torch.load(path, weights_only=True)["config"]["dcl_sigma"] == 0.5  # kept as it was
    capsys.readouterr()
    # given again on the command line, it is refused, whichever value
    code = main.main(tiny_run_args(tiny_folder, tmp_path, "old", "--resume", "auto", "--dcl_sigma", "0.5", epochs=3))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--dcl_sigma" in err and "--loss dcl" in err, err
    assert torch.load(path, weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("head", [None, "v2"])  # None: a 3-layer run from before --head (no head in its files)
def test_a_three_layer_head_of_either_kind_resumes_and_loads_as_its_config_says(tiny_folder, tmp_path, head):
    import json

    from simclr.checkpoint import open_run
    extra = ["--proj_layers", "3", *(["--head", head] if head else [])]
    assert main.main(tiny_run_args(tiny_folder, tmp_path, "h", *extra)) == 0
    if head is None:  # as older versions wrote them: the original tool's last layer, no head key
        last = torch.load(tmp_path / "h_last.pth", weights_only=True)
        del last["config"]["head"]
        torch.save(last, tmp_path / "h_last.pth")
        config = json.loads((tmp_path / "h_config.json").read_text())
        del config["head"]
        (tmp_path / "h_config.json").write_text(json.dumps(config))
    assert main.main(tiny_run_args(tiny_folder, tmp_path, "h", "--resume", "auto", epochs=2)) == 0
    last = torch.load(tmp_path / "h_last.pth", weights_only=True)
    assert last["epoch"] == 2 and last["config"]["head"] == (head or "original")  # the older run: the original
    # SimCLRv2's last layer: Linear without bias (g.6) + BatchNorm without shift (g.7); the original's: Linear g.6
    keys = set(last["model"])
    assert ({"g.7.weight", "g.7.running_var"} <= keys and not {"g.6.bias", "g.7.bias"} & keys) if head == "v2" \
        else ("g.6.bias" in keys and not any(k.startswith("g.7.") for k in keys))
    model, _ = open_run(str(tmp_path / "h_model.pth"))  # what every script and hubconf load through
    saved = torch.load(tmp_path / "h_model.pth", weights_only=True)
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_run_state_is_built_by_keyword_only():
    # fifteen fields in a row: a positional call would put a value into the wrong field without a word
    with pytest.raises(TypeError):
        loop.RunState("name", "main.py")
