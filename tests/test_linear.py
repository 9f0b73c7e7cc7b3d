"""linear.py: the frozen encoder, the probe on synthetic features, refused checkpoints, and a real run end to end."""
import io
import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

import linear
from conftest import TINY_WIDTH, copy_run
from simclr import linear_eval
from simclr.augment import pad_crop_flip
from simclr.model import SimCLR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the `trained` run is in conftest.py
COLUMNS = ["epoch", "train_loss", "train_acc@1", "train_acc@5", "test_loss", "test_acc@1", "test_acc@5"]


def probe_config(*extra: str) -> linear.LinearConfig:
    """A LinearConfig for calling the training functions directly (the model path is never read)."""
    return linear.build_config(["--model_path", "unused_model.pth", *extra])


def quick(model_path, *extra: str) -> list[str]:
    """Flags of a short in-process linear run."""
    return ["--model_path", str(model_path), "--epochs", "2", "--batch_size", "16", "--device", "cpu", *extra]


# ----------------------------------------------------------------------------- frozen encoder

def loaded_encoders(monkeypatch) -> list:
    """The encoders (model.f) of the runs linear_eval opens from now on, in order."""
    captured = []
    open_run = linear_eval.open_run

    def spy(*args, **kwargs):
        model, config = open_run(*args, **kwargs)
        captured.append(model.f)
        return model, config
    monkeypatch.setattr(linear_eval, "open_run", spy)
    return captured


@pytest.mark.parametrize("augment", [False, True])
def test_encoder_params_and_batchnorm_buffers_are_bit_identical(trained, tmp_path, monkeypatch, augment):
    captured = loaded_encoders(monkeypatch)
    extra = ["--augment"] if augment else []
    assert linear.main(quick(trained / "run_model.pth", "--results_dir", str(tmp_path), *extra)) == 0

    saved = torch.load(trained / "run_model.pth", weights_only=True)
    encoder = captured[0]
    after = encoder.state_dict()
    assert any("running_mean" in k for k in after) and any("num_batches_tracked" in k for k in after)
    assert set(after) == {k[2:] for k in saved if k.startswith("f.")}
    for key, value in after.items():
        assert torch.equal(value, saved[f"f.{key}"]), key
    # the run trained main.py's BatchNorm statistics: they are not the initial ones, so equality means something
    assert not torch.equal(after["0.1.running_mean"], torch.zeros_like(after["0.1.running_mean"]))
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_the_script_itself_refuses_a_moved_encoder(trained, tmp_path, monkeypatch, capsys):
    captured = loaded_encoders(monkeypatch)
    train_on_features = linear_eval.train_on_features

    def buggy(*args, **kwargs):  # a bug that touches a BatchNorm buffer while the probe trains
        captured[0][0][1].running_var.add_(1e-3)  # the first BatchNorm
        return train_on_features(*args, **kwargs)
    monkeypatch.setattr(linear_eval, "train_on_features", buggy)
    assert linear.main(quick(trained / "run_model.pth", "--results_dir", str(tmp_path))) == 1
    err = capsys.readouterr().err
    assert "encoder changed" in err and "0.1.running_var" in err
    assert not (tmp_path / "run_linear_model.pth").exists()


# ----------------------------------------------------------------------------- the probe on given features

def test_linearly_separable_features_reach_100_percent():
    gen = torch.Generator().manual_seed(0)
    classes, dim = 4, 32
    directions = torch.randn(classes, dim, generator=gen)

    def split(n):
        y = torch.randint(0, classes, (n,), generator=gen)
        return directions[y] * 3 + 0.3 * torch.randn(n, dim, generator=gen) + 5.0, y  # offset: standardising matters
    (train_x, train_y), (test_x, test_y) = split(400), split(200)
    probe, rows = linear_eval.train_on_features(train_x, train_y, test_x, test_y, classes,
                                           probe_config("--epochs", "10", "--batch_size", "100"))
    assert rows[-1]["train_acc@1"] == 100.0 and rows[-1]["test_acc@1"] == 100.0
    assert [r["epoch"] for r in rows] == list(range(1, 11))
    # the saved layer acts on raw features (the standardisation is folded into it)
    assert (probe(test_x).argmax(1) == test_y).all()


def test_random_labels_stay_near_chance_on_test():
    gen = torch.Generator().manual_seed(1)
    classes = 10
    train_x, test_x = torch.randn(1000, 64, generator=gen), torch.randn(3000, 64, generator=gen)
    train_y = torch.randint(0, classes, (1000,), generator=gen)
    test_y = torch.randint(0, classes, (3000,), generator=gen)
    _, rows = linear_eval.train_on_features(train_x, train_y, test_x, test_y, classes,
                                       probe_config("--epochs", "10", "--batch_size", "256"))
    assert 5.0 < rows[-1]["test_acc@1"] < 15.0  # chance is 10%; 3,000 test labels: std ~0.5 points
    assert rows[-1]["train_acc@1"] > rows[-1]["test_acc@1"] + 5  # it memorises, it cannot generalise
    assert all(math.isfinite(r["test_loss"]) for r in rows)


def test_fold_matches_the_standardised_layer():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(50, 8, generator=gen) * 4 + 2
    mean, std = linear_eval.standardizer(x)
    layer = torch.nn.Linear(8, 3)
    torch.testing.assert_close(linear_eval.fold(layer, mean, std)(x), layer((x - mean) / std), rtol=1e-5, atol=1e-5)


def test_pad_crop_flip_is_a_padded_crop_or_its_mirror():
    images = torch.randint(0, 256, (6, 16, 16, 3), dtype=torch.uint8)
    out = pad_crop_flip(images, torch.Generator().manual_seed(3))
    assert out.shape == (6, 3, 16, 16) and out.dtype == torch.float32
    padded = torch.nn.functional.pad(images.permute(0, 3, 1, 2).float() / 255, (2, 2, 2, 2))
    for i in range(6):
        options = [c for t in range(5) for l in range(5) for c in
                   (padded[i, :, t:t + 16, l:l + 16], padded[i, :, t:t + 16, l:l + 16].flip(2))]
        assert any(torch.equal(out[i], c) for c in options), i


# ----------------------------------------------------------------------------- refused checkpoints

class RunsCode:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def bad_checkpoint(kind: str, trained, folder, marker) -> str:
    """A checkpoint of the given kind in `folder`, with the trained run's config beside it."""
    if kind == "missing":
        copy_run(trained, folder, "missing")
        os.remove(os.path.join(folder, "missing_model.pth"))
        return os.path.join(folder, "missing_model.pth")
    if kind == "truncated":
        path = copy_run(trained, folder, "truncated")
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
        return path
    if kind == "random":
        path = copy_run(trained, folder, "random")
        open(path, "wb").write(os.urandom(4096))
        return path
    if kind == "resnet50":
        return copy_run(trained, folder, "resnet50", SimCLR("resnet50", 16, 32).state_dict())
    if kind == "no_encoder":
        return copy_run(trained, folder, "no_encoder", {"weight": torch.zeros(3), "g.0.weight": torch.zeros(2, 2)})
    if kind == "code":
        buffer = io.BytesIO()
        torch.save({"f.conv1.weight": RunsCode(marker)}, buffer)
        path = copy_run(trained, folder, "code")
        open(path, "wb").write(buffer.getvalue())
        return path
    raise ValueError(kind)


BAD = [("missing", "no such file"), ("truncated", "truncated"), ("random", "not a PyTorch weights file"),
       ("resnet50", "does not fit a tiny"), ("no_encoder", "no encoder keys"), ("code", "run code")]


@pytest.mark.parametrize("kind,needle", BAD)
def test_bad_checkpoints_exit_2_with_one_line_and_write_nothing(trained, tmp_path, capsys, kind, needle):
    marker = tmp_path / "code_ran"
    path = bad_checkpoint(kind, trained, tmp_path / "ckpt", marker)
    before = sorted(os.listdir(tmp_path / "ckpt"))
    results = tmp_path / "results"
    code = linear.main(quick(path, "--results_dir", str(results)))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and needle in err, err
    assert not results.exists() and sorted(os.listdir(tmp_path / "ckpt")) == before
    assert not marker.exists()


def test_a_code_pickle_is_refused_when_it_is_the_default_output_folder_too(trained, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    path = bad_checkpoint("code", trained, tmp_path / "ckpt", marker)
    assert linear.main(quick(path)) == 2  # results go next to the weights by default: still nothing written
    assert "run code" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["code_config.json", "code_model.pth"]
    assert not marker.exists()


BAD_FLAGS = [(["--batch_size", "0"], "batch_size"), (["--epochs", "-1"], "epochs"), (["--lr", "0"], "--lr"),
             (["--lr", "nan"], "--lr"), (["--momentum", "1"], "momentum"), (["--weight_decay", "-1"], "weight_decay"),
             (["--feature_batch_size", "0"], "feature_batch_size"), (["--name", "a/b"], "name")]


@pytest.mark.parametrize("extra,needle", BAD_FLAGS)
def test_bad_flags_exit_2(tmp_path, capsys, extra, needle):
    assert linear.main(["--model_path", str(tmp_path / "x_model.pth"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert os.listdir(tmp_path) == []


def test_help_names_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        linear.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model_path", "--batch_size", "--epochs", "--lr", "--weight_decay", "--optimizer", "--device",
                 "--seed", "--results_dir", "--augment", "--untrained", "--config", "--name"):
        assert flag in out


# ----------------------------------------------------------------------------- end to end and file names

def test_end_to_end_subprocess(trained, tmp_path):
    out = tmp_path / "linear"
    proc = subprocess.run([sys.executable, "linear.py", "--model_path", str(trained / "run_model.pth"),
                           "--epochs", "3", "--batch_size", "16", "--device", "cpu", "--results_dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "linear probe: test top-1" in proc.stdout and "chosen on the test set" in proc.stdout

    frame = pd.read_csv(out / "run_linear_statistics.csv")
    assert list(frame.columns[:7]) == COLUMNS
    assert frame["epoch"].tolist() == [1, 2, 3]
    for column in COLUMNS[1:] + ["lr"]:
        assert frame[column].map(math.isfinite).all(), column
    assert ((frame[COLUMNS[2:4] + COLUMNS[5:]] >= 0) & (frame[COLUMNS[2:4] + COLUMNS[5:]] <= 100)).all().all()
    assert f"{frame['test_acc@1'].iloc[-1]:.2f}%" in proc.stdout

    state = torch.load(out / "run_linear_model.pth", weights_only=True)
    assert set(state) == {"weight", "bias"} and state["weight"].shape == (3, TINY_WIDTH)
    assert (out / "run_linear_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "run_linear_config.json").read_text())["arch"] is None  # no override given
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    files = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("files: ")][-1]
    assert sorted(files[len("files: "):].split(", ")) == sorted(str(out / p) for p in os.listdir(out)), files


def test_runs_on_other_checkpoints_never_overwrite(trained, tmp_path, capsys):
    a = copy_run(trained, tmp_path / "results", "a")
    b = copy_run(trained, tmp_path / "results", "b")
    assert linear.main(quick(a)) == 0
    first = {p: (tmp_path / "results" / p).read_bytes() for p in ("a_linear_statistics.csv", "a_linear_model.pth")}
    assert linear.main(quick(b, "--lr", "0.5")) == 0  # default output folder: next to the weights
    assert linear.main(quick(a, "--untrained")) == 0  # the baseline gets its own name
    files = set(os.listdir(tmp_path / "results"))
    assert {"b_linear_statistics.csv", "a_untrained_linear_statistics.csv", "a_untrained_linear_model.pth"} <= files
    for p, data in first.items():
        assert (tmp_path / "results" / p).read_bytes() == data, p

    # the same NAME from another folder into the same --results_dir is refused, not overwritten
    other = copy_run(trained, tmp_path / "elsewhere", "a")
    capsys.readouterr()
    assert linear.main(quick(other, "--results_dir", str(tmp_path / "results"))) == 2
    assert "already holds" in capsys.readouterr().err
    for p, data in first.items():
        assert (tmp_path / "results" / p).read_bytes() == data, p
