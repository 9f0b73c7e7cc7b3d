"""main.py end to end: a real (tiny) run, its files, and the errors a user can cause."""
import json
import math
import os

import pandas as pd
import pytest
import torch

import main
from conftest import run_main, tiny_run_args
from simclr import flags
from simclr.data import load_dataset
from simclr.engine import Runtime
from simclr.knn import encoder_features, knn_accuracy
from simclr.model import SimCLR
from simclr.pretrain import drop_last_note


@pytest.mark.long
def test_end_to_end_subprocess(tiny_folder, tmp_path):
    results = tmp_path / "results"
    proc = run_main(tiny_run_args(tiny_folder, results, "e2e", epochs=2, arch="resnet18"))  # the real network
    assert "M parameters" in proc.stdout + proc.stderr and "MACs" in proc.stdout + proc.stderr

    frame = pd.read_csv(results / "e2e_statistics.csv")
    assert list(frame.columns[:4]) == ["epoch", "train_loss", "test_acc@1", "test_acc@5"]
    assert {"lr", "epoch_seconds", "train_images_per_second"} <= set(frame.columns)
    assert frame["epoch"].tolist() == [1, 2]
    for column in ("train_loss", "test_acc@1", "test_acc@5", "lr", "epoch_seconds", "train_images_per_second"):
        assert frame[column].map(math.isfinite).all(), column
    # 18 test images of 3 classes: top-1 counts whole images, and the top 5 of 3 classes hold every label
    assert all(abs(a * 18 / 100 - round(a * 18 / 100)) < 1e-6 for a in frame["test_acc@1"])
    assert (frame["test_acc@5"] == 100.0).all()

    config = json.loads((results / "e2e_config.json").read_text())
    assert config["arch"] == "resnet18" and config["batch_size"] == 8 and config["k"] == 5
    assert config["knn_temperature"] == 0.5 and config["torch_version"] == torch.__version__
    assert "torchvision_version" in config and len(config["mean"]) == 3

    state = torch.load(results / "e2e_model.pth", weights_only=True)
    fresh = SimCLR("resnet18", feature_dim=16, proj_hidden_dim=32)
    fresh.load_state_dict(state, strict=True)  # no thop counters, no _orig_mod. prefix
    assert not any("total_ops" in k or "_orig_mod" in k for k in state)
    assert (results / "e2e_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the last row's kNN accuracy is the saved model's: recomputed here from the weights and the images
    bundle = load_dataset("folder", str(tiny_folder), 16, log=lambda line: None)
    runtime = Runtime(torch.device("cpu"), "fp32")
    bank = encoder_features(fresh, bundle.labeled.images, config["mean"], config["std"], runtime)
    test = encoder_features(fresh, bundle.test.images, config["mean"], config["std"], runtime)
    top1, _ = knn_accuracy(test, bundle.test.labels, bank, bundle.labeled.labels, 3, 5, 0.5)
    # a bf16 run's features differ from these fp32 ones in rounding: one test image may fall the other way
    assert frame["test_acc@1"].iloc[-1] == pytest.approx(top1, abs=0 if config["precision"] == "fp32" else 5.6)
    assert not [p for p in os.listdir(results) if p.endswith(".tmp")]


def test_default_name_follows_the_seed():
    values = flags.train_values({})
    assert values["name"] == "cifar10_resnet50_128_0.5_200_1024_500"
    assert (values["feature_dim"], values["temperature"], values["k"], values["batch_size"], values["epochs"]) == \
        (128, 0.5, 200, 1024, 500)
    assert (values["lr"], values["weight_decay"], values["optimizer"]) == (1e-3, 1e-6, "adam")


def test_help_exits_zero():
    proc = run_main(["--help"])
    for flag in ("--feature_dim", "--temperature", "--k", "--batch_size", "--epochs", "--arch", "--dataset",
                 "--data_root", "--image_size", "--lr", "--weight_decay", "--knn_temperature", "--knn_every",
                 "--seed", "--device", "--workers", "--results_dir", "--name"):
        assert flag in proc.stdout


BAD_FLAGS = [
    (["--batch_size", "0"], "batch_size"), (["--batch_size", "-4"], "batch_size"), (["--epochs", "0"], "epochs"),
    (["--k", "0"], "--k"), (["--temperature", "0"], "temperature"), (["--temperature", "-1"], "temperature"),
    (["--feature_dim", "0"], "feature_dim"), (["--lr", "0"], "--lr"), (["--image_size", "0"], "image_size"),
    (["--k", "1000"], "kNN bank"), (["--batch_size", "1000"], "training images"),
    (["--arch", "resnet99"], "arch"), (["--dataset", "imagenet"], "dataset"), (["--epochs", "two"], "epochs"),
]


@pytest.mark.parametrize("extra,needle", BAD_FLAGS)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_folder, tmp_path, capsys, extra, needle):
    results = tmp_path / "results"
    try:
        code = main.main(tiny_run_args(tiny_folder, results, None, *extra))
    except SystemExit as e:  # argparse's own errors (unknown choice, not a number)
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not results.exists()


def test_bad_folders_exit_2(tmp_path, tiny_folder, capsys):
    import shutil
    no_test = tmp_path / "no_test"
    shutil.copytree(tiny_folder / "train", no_test / "train")
    other_classes = tmp_path / "other"
    shutil.copytree(tiny_folder, other_classes)
    os.rename(other_classes / "test" / "cat", other_classes / "test" / "cow")
    for root in (no_test, other_classes, tmp_path / "missing"):
        results = tmp_path / f"results_{root.name}"
        assert main.main(tiny_run_args(root, results)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:"), err
        assert not results.exists()


def test_offline_cifar10_says_which_file_to_put_where(tmp_path, monkeypatch, capsys):
    # never touch the network: make any download attempt fail as it does offline
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code = main.main(["--data_root", str(tmp_path / "data"), "--results_dir", str(tmp_path / "r"), "--device", "cpu",
                      "--arch", "resnet18", "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "cifar-10-python.tar.gz" in err and str(tmp_path / "data") in err, err
    assert not (tmp_path / "r").exists()


def test_recipes_set_flags_and_explicit_flags_win():
    paper = flags.train_values({"recipe": "paper"})
    assert (paper["optimizer"], paper["lr"], paper["lr_scaling"], paper["warmup_epochs"], paper["schedule"]) == \
        ("lars", 1.0, "linear", 10, "cosine")
    assert (paper["proj_hidden_dim"], paper["temperature"], paper["jitter_strength"], paper["blur"]) == \
        (2048, 0.5, 0.5, False)
    assert paper["weight_decay"] == 1e-6
    overridden = flags.train_values({"recipe": "paper", "lr": 0.3, "blur": True})
    assert overridden["lr"] == 0.3 and overridden["blur"] is True and overridden["optimizer"] == "lars"
    assert flags.train_values({"recipe": "seed"}) == flags.train_values({})


@pytest.mark.parametrize("loss", ["ntxent", "supcon", None])
def test_a_setting_of_another_loss_is_refused_in_one_line(tiny_folder, tmp_path, capsys, loss):
    extra = ["--dcl_sigma", "0.5", *(["--loss", loss] if loss else [])]
    code = main.main(tiny_run_args(tiny_folder, tmp_path / "r", None, *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--dcl_sigma" in err and "--loss dcl" in err and f"loss is {loss or 'ntxent'}" in err, err
    assert not (tmp_path / "r").exists()
    # with its own loss the flag is the loss's setting
    assert flags.train_values({"loss": "dcl", "dcl_sigma": 0.5})["dcl_sigma"] == 0.5


def test_the_supcon_recipe_scales_its_loss_as_supcontrast_and_only_its_loss():
    from simclr.loss import SupCon, build_loss
    recipe = flags.train_values({"recipe": "supcon"})
    assert (recipe["loss"], recipe["temperature"], recipe["supcon_base_temperature"]) == ("supcon", 0.1, 0.07)
    assert build_loss(flags.TrainConfig(**recipe)) == SupCon(0.1, supcon_base_temperature=0.07)
    # the recipe with another loss: its supcon setting does not follow; given explicitly, it is refused
    assert flags.train_values({"recipe": "supcon", "loss": "ntxent"})["supcon_base_temperature"] is None
    with pytest.raises(flags.UserError, match="--supcon_base_temperature is a setting of --loss supcon"):
        flags.train_values({"recipe": "supcon", "loss": "dcl", "supcon_base_temperature": 0.07})
    assert flags.train_values({})["supcon_base_temperature"] is None  # no scale unless asked
    # a checkpoint from before the flag resumes unscaled, as it was trained
    older = {k: v for k, v in recipe.items() if k != "supcon_base_temperature"}
    values, _ = flags.train_resume_values({"resume": "x"}, older, "x")
    assert values["supcon_base_temperature"] is None


@pytest.mark.parametrize("n,batch,world,better", [(500, 256, 1, "--batch_size 250 uses them all"),
                                                  (500, 256, 4, "--batch_size 248 leaves out 4"),
                                                  (300, 256, 1, "--batch_size 150 uses them all"),
                                                  (3, 2, 1, "(33%, the incomplete last batch)")])
def test_the_drop_last_note_names_the_share_and_a_batch_that_fits(n, batch, world, better):
    note = drop_last_note(n, batch, world)
    dropped = n % batch
    assert note.startswith(f"note: --batch_size {batch} leaves out {dropped} of the {n} training images every epoch "
                           f"({100 * dropped / n:.0f}%") and note.endswith(better), note
    if better.startswith("--batch_size"):  # else no accepted batch size leaves out fewer
        suggested = int(better.split()[1])
        assert suggested % world == 0 and 2 <= suggested <= batch and n % suggested < dropped


@pytest.mark.parametrize("n,batch", [(5000, 256), (10000, 256), (48, 8), (1100, 1000)])
def test_no_drop_last_note_at_a_tenth_or_less(n, batch):
    assert drop_last_note(n, batch) is None


def test_main_says_at_start_when_the_last_batch_drops_much(tiny_folder, tmp_path, capsys):
    # 48 training images at batch 20: two steps of 20, 8 images (17%) left out of every epoch
    assert main.main(tiny_run_args(tiny_folder, tmp_path, "d", batch_size=20)) == 0
    lines = capsys.readouterr().out.splitlines()
    notes = [i for i, line in enumerate(lines) if "leaves out" in line]
    assert len(notes) == 1 and lines[notes[0]] == drop_last_note(48, 20), lines
    assert notes[0] < min(i for i, line in enumerate(lines) if line.startswith("epoch 1/"))  # at start
    assert drop_last_note(48, 20).endswith("--batch_size 16 uses them all")
