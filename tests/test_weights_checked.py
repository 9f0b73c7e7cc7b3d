"""Every weights file is checked before use: NaN/inf, a negative running_var or exp_avg_sq, a tensor of the
wrong dtype or kind, keys that are not names or mix two schemes, and an original-tool head that does not fit
are each refused by every script that reads weights (and by hub) in one line naming the tensor, exit 2,
nothing written."""
import os

import pytest
import torch
import torchvision
from torch import nn

import embed
import finetune
import linear
import main
import neighbors
from conftest import ROOT, copy_run
from simclr import checkpoint
from simclr.cli import UserError

SCRIPTS = [(linear, ["--epochs", "1"]), (finetune, ["--epochs", "1", "--label_fraction", "0.5"]),
           (neighbors, []), (embed, ["--method", "pca"])]


def refused_everywhere(path: str, entry: str, needle: str, tmp_path, capsys) -> None:
    """Each script and both hub loads refuse `path` in one line holding `needle` (exit 2) and write nothing."""
    folder = os.path.dirname(path)
    before = sorted(os.listdir(folder))
    out = tmp_path / "out"
    for script, extra in SCRIPTS:
        argv = ["--model_path", path, "--device", "cpu", *extra]
        argv += ["--results_dir", str(out)] if script in (linear, finetune) else ["--out", str(out / "x.png")]
        assert script.main(argv) == 2, script
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {path}") and needle in err[0], (script, err)
    for encoder_only in (False, True):
        with pytest.raises(UserError) as refused:
            torch.hub.load(ROOT, entry, source="local", weights=path, encoder_only=encoder_only)
        message = str(refused.value)
        assert "\n" not in message and message.startswith(path) and needle in message, message
    assert not out.exists() and sorted(os.listdir(folder)) == before
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- this project's NAME_model.pth

def poke(key: str, index, value):
    """A change of one entry of one tensor: state[key][index] = value."""
    def change(state):
        state[key] = state[key].clone()
        state[key][index] = value
        return state
    return change


def replace(key: str, make):
    """A change that replaces state[key] by make(state[key])."""
    def change(state):
        state[key] = make(state[key])
        return state
    return change


OURS = [
    (poke("f.0.0.weight", (0, 0, 0, 0), float("nan")), "f.0.0.weight has 1 NaN and 0 inf values"),
    (poke("g.3.bias", slice(0, 2), float("-inf")), "g.3.bias has 0 NaN and 2 inf values"),  # the head too
    (poke("f.1.1.running_var", slice(0, 3), -1.0), "f.1.1.running_var has 3 negative values"),
    (replace("f.0.0.weight", lambda t: t.round().long()), "f.0.0.weight is a tensor of int64 where weights"),
    (replace("f.2.1.weight", lambda t: t.to_sparse()), "f.2.1.weight is a sparse_coo tensor"),
    (replace("f.0.0.weight", lambda t: torch.tensor(1.0)), "f.0.0.weight is a 0-d tensor () where"),
    (lambda s: {**s, 7: torch.zeros(2)}, "its key 7 (int) is not a tensor name"),
    (lambda s: list(s.values()), "is not a state_dict: it holds a list"),
]


@pytest.mark.parametrize("change,needle", OURS, ids=["nan", "inf", "var", "int", "sparse", "0d", "key", "list"])
def test_a_bad_model_pth_is_refused_by_every_script_and_hub(trained, tmp_path, capsys, change, needle):
    state = torch.load(trained / "run_model.pth", weights_only=True)
    path = copy_run(trained, tmp_path / "w", "bad", change(state))
    refused_everywhere(path, "tiny", needle, tmp_path, capsys)


def test_nan_features_are_refused_before_the_probe_not_diagnosed_as_a_moved_encoder(trained, tmp_path, capsys):
    # NaN in a BatchNorm buffer made the probe train on NaN features and exit 1 ("the frozen encoder changed")
    state = poke("f.1.1.running_mean", 0, float("nan"))(torch.load(trained / "run_model.pth", weights_only=True))
    path = copy_run(trained, tmp_path / "w", "nan", state)
    assert linear.main(["--model_path", path, "--epochs", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "f.1.1.running_mean has 1 NaN" in err and "encoder changed" not in err
    assert sorted(os.listdir(tmp_path / "w")) == ["nan_config.json", "nan_model.pth"]


# ----------------------------------------------------------------------------- NAME_last.pth

LAST = [
    (lambda c: poke("f.0.0.weight", (0, 0, 0, 0), float("inf"))(c["model"]), "f.0.0.weight has 0 NaN and 1 inf"),
    (lambda c: poke("exp_avg", (0, 0, 0, 0), float("nan"))(c["optimizer"]["state"][0]),
     "optimizer.state.0.exp_avg has 1 NaN"),
    (lambda c: poke("exp_avg_sq", slice(0, 2), -1.0)(c["optimizer"]["state"][1]),
     "optimizer.state.1.exp_avg_sq has 2 negative values"),
    (lambda c: c["model"].update({("f", 1): torch.zeros(1)}), "its model entry is not a state_dict: its key ('f', 1)"),
]


@pytest.mark.parametrize("change,needle", LAST, ids=["model", "exp_avg", "exp_avg_sq", "key"])
def test_a_bad_last_pth_is_refused_by_resume_and_as_weights(trained, tmp_path, capsys, change, needle):
    ckpt = torch.load(trained / "run_last.pth", weights_only=True)
    change(ckpt)
    folder = tmp_path / "w"
    path = copy_run(trained, folder, "bad")
    os.remove(path)
    torch.save(ckpt, folder / "bad_last.pth")
    before = sorted(os.listdir(folder))
    out = tmp_path / "out"
    code = main.main(["--resume", str(folder / "bad_last.pth"), "--epochs", "3", "--results_dir", str(out),
                      "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --resume {folder / 'bad_last.pth'}"), err
    assert needle in err[0], err
    assert linear.main(["--model_path", str(folder / "bad_last.pth"), "--config", str(folder / "bad_config.json"),
                        "--results_dir", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists() and sorted(os.listdir(folder)) == before


def test_the_check_reads_every_tensor_of_a_sound_checkpoint_and_passes_it(trained):
    ckpt = torch.load(trained / "run_last.pth", weights_only=True)
    checkpoint.check_weights(ckpt, "x")  # rng's uint8 tensors, num_batches_tracked, Adam's step: all accepted
    names = [name for name, _ in checkpoint.nested_tensors([("optimizer.", ckpt["optimizer"])])]
    assert "optimizer.state.0.exp_avg_sq" in names and "optimizer.state.0.step" in names


# ----------------------------------------------------------------------------- the original tool's file

def original_state(feature_dim: int = 8, hidden: int = 32) -> dict[str, torch.Tensor]:
    """A state_dict in the original tool's layout (numbered encoder children f.0 conv1 ... f.6 layer4, head g of
    Linear(2048, H, bias=False), BatchNorm1d, ReLU, Linear(H, D)), its encoder a ResNet-18's to stay small: every
    fault below is refused before the encoder is compared with a ResNet-50."""
    children = [m for name, m in torchvision.models.resnet18().named_children() if name not in ("maxpool", "fc")]
    model = nn.Module()
    model.f = nn.Sequential(*children)
    model.g = nn.Sequential(nn.Linear(2048, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                            nn.Linear(hidden, feature_dim))
    return model.state_dict()


def zero_features(state):
    state["g.3.weight"], state["g.3.bias"] = torch.zeros(0, 32), torch.zeros(0)
    return state


def zero_hidden(state):
    for key in ("g.1.weight", "g.1.bias", "g.1.running_mean", "g.1.running_var"):
        state[key] = torch.zeros(0)
    state["g.0.weight"], state["g.3.weight"] = torch.zeros(0, 2048), torch.zeros(8, 0)
    return state


ORIGINAL = [
    (poke("f.1.running_var", slice(0, 3), -0.5), "f.1.running_var has 3 negative values"),
    (poke("g.0.weight", (1, 2), float("nan")), "g.0.weight has 1 NaN and 0 inf values"),
    (replace("f.4.0.conv1.weight", lambda t: t.to(torch.int8)), "f.4.0.conv1.weight is a tensor of int8"),
    (zero_features, "its feature dimension D 0 (g.3.weight is (0, 32)) must be positive"),
    (zero_hidden, "its hidden width H 0 (g.0.weight is (0, 2048)) must be positive"),
    (replace("g.0.weight", lambda t: t[:, :512]), "g.0.weight is of shape (32, 512), not (H, 2048)"),
    (replace("g.3.bias", lambda t: torch.tensor(0.0)), "g.3.bias is of shape (), not (8,)"),
    (lambda s: {**s, "g.0.bias": torch.zeros(32)}, "g.0.bias is there"),
    (lambda s: {**s, 3: torch.zeros(1)}, "its key 3 (int) is not a tensor name"),
    (lambda s: {**s, "f.conv1.weight": s["f.0.weight"]}, "mixes two key schemes: f.0.weight"),
    (lambda s: [s], "is not a state_dict: it holds a list"),
]


@pytest.mark.parametrize("change,needle", ORIGINAL, ids=[f"original{i}" for i in range(len(ORIGINAL))])
def test_a_bad_original_tool_file_says_what_is_wrong_with_it(tmp_path, capsys, change, needle):
    # no run config beside it: neither "no run config" nor "--feature_dim in the run config" is the fault
    folder = tmp_path / "w"
    folder.mkdir()
    path = str(folder / "128_0.5_200_512_500_model.pth")
    torch.save(change(original_state()), path)
    checkpoint._announced.clear()
    refused_everywhere(path, "resnet50", needle, tmp_path, capsys)


def test_the_original_tools_bad_file_is_refused_without_its_note(tmp_path, capsys):
    # the assumption note ("the original tool's weights ... assuming ResNet-50") is for a file that will be used
    path = tmp_path / "x_model.pth"
    torch.save(poke("f.0.weight", 0, float("inf"))(original_state()), path)
    checkpoint._announced.clear()
    with pytest.raises(UserError, match="f.0.weight has 0 NaN and 147 inf"):
        checkpoint.open_run(str(path))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_one_pass_check_agrees_with_isfinite_and_a_negative_count(dtype):
    generator = torch.Generator().manual_seed(0)
    for trial in range(40):
        tensor = torch.randn(37, 5, generator=generator).to(dtype).t()  # not contiguous
        for _ in range(trial % 3):
            i, j = torch.randint(0, 5, (1,), generator=generator), torch.randint(0, 37, (1,), generator=generator)
            tensor[i, j] = (float("nan"), float("inf"), float("-inf"))[trial % 3]
        fault = checkpoint.value_fault("bn.running_var", tensor)
        if not bool(torch.isfinite(tensor).all()):
            expected = f"has {int(tensor.isnan().sum())} NaN and {int(tensor.isinf().sum())} inf values"
        else:
            expected = f"has {int((tensor < 0).sum())} negative values (a variance cannot be negative)"
        assert fault == expected, (trial, fault)
        assert checkpoint.value_fault("bn.running_var", tensor.abs()) == (None if "negative" in expected else expected)
    assert checkpoint.value_fault("x", torch.zeros(0, 3, dtype=dtype)) is None  # empty: nothing to read


def test_a_nan_running_sum_in_a_last_pth_is_refused_on_resume(trained, tmp_path, capsys):
    ckpt = torch.load(trained / "run_last.pth", weights_only=True)
    ckpt["epoch_sums"] = [float("nan")] * len(ckpt["epoch_sums"])
    ckpt["epoch"] = 0  # mid-run, so the sums would be carried into the epoch's train_loss
    torch.save(ckpt, tmp_path / "x_last.pth")
    code = main.main(["--resume", str(tmp_path / "x_last.pth"), "--epochs", "2", "--results_dir", str(tmp_path / "out"),
                      "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "epoch_sums entry is not" in err[-1] and "finite" in err[-1], err
    assert not [p for p in (tmp_path / "out").glob("*") if not p.name.startswith(".")]
