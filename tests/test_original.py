"""The original tool's files: its *_model.pth read by every script and torch.hub with no config beside it,
its features reproduced exactly; its statistics CSV drawn by plot.py beside ours."""
import pytest
import torch
import torchvision
from torch import nn

import embed
import finetune
import linear
import neighbors
import plot
from conftest import ROOT, write_folder
from simclr import checkpoint
from simclr.cli import UserError

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
FEATURE_DIM = 64  # not main.py's default 128: the scripts must read it from the head


class OriginalModel(nn.Module):
    """The original tool's Model, rebuilt from its description: f = torchvision ResNet-50's children with
    conv1 a 3x3 stride-1 conv, max-pool and fc dropped; g = Linear(2048, 512, no bias), BN, ReLU, Linear."""

    def __init__(self, feature_dim: int = 128):
        super().__init__()
        children = []
        for name, module in torchvision.models.resnet50().named_children():
            if name == "conv1":
                module = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            if name not in ("maxpool", "fc"):
                children.append(module)
        self.f = nn.Sequential(*children)
        self.g = nn.Sequential(nn.Linear(2048, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                               nn.Linear(512, feature_dim, bias=True))

    def forward(self, x):
        """(h (N, 2048), z (N, feature_dim)), neither normalised."""
        h = torch.flatten(self.f(x), start_dim=1)
        return h, self.g(h)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """(the original model in eval mode, path of its saved random state_dict) with BatchNorm statistics that matter."""
    torch.manual_seed(0)
    model = OriginalModel(FEATURE_DIM)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    path = tmp_path_factory.mktemp("original") / "results" / f"{FEATURE_DIM}_0.5_200_512_500_model.pth"
    path.parent.mkdir()
    torch.save(model.state_dict(), path)
    return model.eval(), path


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory):
    """A 3-class 32x32 folder: 12 train and 6 test images (ResNet-50 on the CPU is slow)."""
    return write_folder(tmp_path_factory.mktemp("cifar_like") / "data", train_per_class=4, test_per_class=2, size=32)


def inputs() -> torch.Tensor:
    """(4, 3, 32, 32) images normalised as the original tool does: (x / 255 - mean) / std per channel."""
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(1)).float() / 255
    return (images - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def test_open_run_gives_the_original_models_features(original, capsys):
    reference, path = original
    model, config = checkpoint.open_run(str(path))
    assert "the original tool's weights" in capsys.readouterr().err
    assert (config["arch"], config["stem"], config["feature_dim"]) == ("resnet50", "cifar", FEATURE_DIM)
    assert config["dataset"] == "cifar10" and tuple(config["mean"]) == MEAN and tuple(config["std"]) == STD
    assert not model.training
    x = inputs()
    with torch.no_grad():
        (h, z), (h_ref, z_ref) = model(x), reference(x)
    assert h.shape == (4, 2048) and z.shape == (4, FEATURE_DIM)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=0)
    # every tensor of the file is used, none invented: same count of tensors
    assert len(model.state_dict()) == len(reference.state_dict())


def test_hub_loads_the_original_file(original):
    reference, path = original
    encoder = torch.hub.load(ROOT, "resnet50", source="local", weights=str(path), encoder_only=True)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), torch.flatten(reference.f(x), 1), atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="holds a resnet50"):
        torch.hub.load(ROOT, "resnet18", source="local", weights=str(path))


def test_the_normalisation_is_the_originals_for_cifar10_wherever_it_is(original):
    config = checkpoint.original_tool_config(torch.load(original[1], weights_only=True), "x")
    enc = checkpoint.resolve_encoder(config, data_root="/elsewhere/cifar")
    assert (enc.dataset, enc.mean, enc.std) == ("cifar10", MEAN, STD)
    other = checkpoint.resolve_encoder(config, dataset="folder", data_root="/my/folder")
    assert other.mean is None and other.std is None  # other data: normalised by its own statistics


def one_announcement(capsys) -> str:
    err = capsys.readouterr().err
    assert sum("the original tool's weights" in line for line in err.splitlines()) <= 1
    return err


def test_every_script_reads_the_original_file(original, cifar_like, tmp_path, capsys):
    _, path = original
    data = ["--dataset", "folder", "--data_root", str(cifar_like)]
    checkpoint._announced.clear()
    assert linear.main(["--model_path", str(path), *data, "--epochs", "1", "--batch_size", "8", "--device", "cpu",
                        "--results_dir", str(tmp_path / "linear")]) == 0
    assert "assuming ResNet-50" in one_announcement(capsys)
    assert (tmp_path / "linear" / f"{FEATURE_DIM}_0.5_200_512_500_linear_statistics.csv").is_file()
    assert neighbors.main(["--model_path", str(path), *data, "--n", "2", "--k", "2", "--device", "cpu",
                           "--out", str(tmp_path / "n.png")]) == 0
    assert (tmp_path / "n.png").is_file()
    assert embed.main(["--model_path", str(path), *data, "--method", "pca", "--device", "cpu",
                       "--out", str(tmp_path / "e.png")]) == 0
    assert (tmp_path / "e.png").is_file()
    assert finetune.main(["--model_path", str(path), *data, "--epochs", "1", "--batch_size", "4", "--device", "cpu",
                          "--label_fraction", "0.5", "--from_layer", "head1",
                          "--results_dir", str(tmp_path / "ft")]) == 0
    one_announcement(capsys)
    tuned = torch.load(tmp_path / "ft" / f"{FEATURE_DIM}_0.5_200_512_500_finetune_0.5_head1_model.pth",
                       weights_only=True)
    assert "f.conv1.weight" in tuned and "f.0.weight" not in tuned  # written in our key names


def bad_head(state: dict) -> dict:
    state = dict(state)
    state["g.3.weight"] = torch.zeros(FEATURE_DIM, 256)  # its input is 512 wide
    return state


@pytest.mark.parametrize("change,needle", [
    (bad_head, "head that does not fit"),
    # not a SimCLR state_dict at all: that is the fault, not the missing run config
    (lambda s: {k.replace("f.", "encoder.", 1): v for k, v in s.items()}, "no encoder keys"),
    (lambda s: {"weight": torch.zeros(3)}, "no encoder keys"),
])
def test_foreign_files_exit_2_with_one_line_and_write_nothing(original, cifar_like, tmp_path, capsys, change,
                                                               needle):
    path = tmp_path / "w" / "x_model.pth"
    path.parent.mkdir()
    torch.save(change(torch.load(original[1], weights_only=True)), path)
    out = tmp_path / "out"
    scripts = [(linear, ["--epochs", "1"]), (finetune, ["--epochs", "1", "--label_fraction", "0.5"]),
               (neighbors, ["--out", str(out / "n.png")]), (embed, ["--method", "pca", "--out", str(out / "e.png")])]
    for script, extra in scripts:
        argv = ["--model_path", str(path), "--device", "cpu", *extra]
        if script in (linear, finetune):
            argv += ["--results_dir", str(out)]
        assert script.main(argv) == 2, script
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), (script, err)
        assert needle in err[0], (script, err)
        assert not out.exists()


def test_plot_draws_the_original_tools_csv_beside_ours(tmp_path, capsys):
    theirs = tmp_path / "128_0.5_200_512_500_statistics.csv"
    # the original tool writes a pandas frame indexed by epoch, with index_label='epoch'
    theirs.write_text("epoch,train_loss,test_acc@1,test_acc@5\n1,6.1,40.5,88.0\n2,5.9,45.25,90.5\n")
    ours = tmp_path / "mine_statistics.csv"
    ours.write_text("epoch,train_loss,test_acc@1,test_acc@5,lr,epoch_seconds,train_images_per_second,knn_seconds,"
                    "probe_acc@1,probe_acc@5\n1,6.0,41.0,89.0,0.001,1.0,10.0,0.5,50.0,91.0\n")
    rows = plot.read_statistics(str(theirs)).rows
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["test_acc@1"] == 45.25
    out = tmp_path / "both.png"
    assert plot.main([str(theirs), str(ours), "--out", str(out)]) == 0
    assert out.stat().st_size > 0 and f"wrote {out}" in capsys.readouterr().out
