"""finetune.py: the label subset, the modules it builds, that every layer trains, refusals, files and resume."""
import json
import math
import os
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torchvision.transforms.functional as TF

import finetune
from simclr import finetuning
from simclr.engine import make_runtime
from simclr.flags import FINETUNE_FLAGS, build_parser
from simclr.augment import AugmentConfig, crop_flip, sample_crop_boxes
from simclr.cli import DataError
from simclr.data import balanced_label_indices, load_dataset
from conftest import TINY_ARCH, TINY_WIDTH, copy_run
from simclr.model import SimCLR, encoder_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["epoch", "train_loss", "train_acc@1", "train_acc@5", "test_acc@1", "test_acc@5", "lr", "epoch_seconds"]
DETERMINISTIC = COLUMNS[:-1]  # timings differ run to run


def base(model_path, results, *extra: str) -> list[str]:
    """Flags of a short in-process run, without the label count."""
    return ["--model_path", str(model_path), "--epochs", "2", "--batch_size", "4", "--device", "cpu",
            "--results_dir", str(results), *extra]


def quick(model_path, results, *extra: str) -> list[str]:
    """Flags of a short in-process run: 12 of the 48 labels (4 per class), 3 steps per epoch."""
    return base(model_path, results, "--label_fraction", "0.25", *extra)


def config_of(results, prefix="run_finetune_0.25") -> dict:
    return json.loads((results / f"{prefix}_config.json").read_text())


# ----------------------------------------------------------------------------- the label subset

def test_balanced_label_indices_per_class_seeded_and_nested():
    gen = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate((30, 7, 12, 50))])[torch.randperm(99, generator=gen)]
    chosen = balanced_label_indices(labels, 4, 5, seed=3)
    assert chosen.tolist() == sorted(set(chosen.tolist()))            # sorted, no repeats
    assert torch.bincount(labels[chosen], minlength=4).tolist() == [5, 5, 5, 5]
    assert torch.equal(chosen, balanced_label_indices(labels, 4, 5, seed=3))
    assert not torch.equal(chosen, balanced_label_indices(labels, 4, 5, seed=4))
    # for one seed, the smaller subset is inside the larger one (1% labels among the 10%)
    assert set(chosen.tolist()) <= set(balanced_label_indices(labels, 4, 7, seed=3).tolist())
    # every class covered: a draw of class c equals the first 5 of class c in the seeded permutation
    perm = torch.randperm(99, generator=torch.Generator().manual_seed(3))
    expected = sorted(i for c in range(4) for i in [j for j in perm.tolist() if labels[j] == c][:5])
    assert chosen.tolist() == expected
    with pytest.raises(DataError, match="class 1 has only 7"):
        balanced_label_indices(labels, 4, 8, seed=3)


def test_the_script_draws_balanced_labels_by_seed_disjoint_from_test(trained, tiny_folder, tmp_path):
    model = trained / "run_model.pth"
    assert finetune.main(quick(model, tmp_path / "a", "--epochs", "1")) == 0
    assert finetune.main(quick(model, tmp_path / "b", "--epochs", "1", "--untrained")) == 0
    assert finetune.main(quick(model, tmp_path / "c", "--epochs", "1", "--seed", "1")) == 0
    a, base = config_of(tmp_path / "a"), config_of(tmp_path / "b", "run_untrained_finetune_0.25")
    other = config_of(tmp_path / "c")
    bundle = load_dataset("folder", str(tiny_folder), 16)
    chosen = torch.tensor(a["label_indices"])
    assert len(chosen) == 12 and a["labels"] == 12
    assert torch.bincount(bundle.labeled.labels[chosen]).tolist() == [4, 4, 4] == a["labels_by_class"]
    assert base["label_indices"] == a["label_indices"]        # the baseline trains on the same labels
    assert other["label_indices"] != a["label_indices"]       # another seed, other labels
    # none of the chosen images is a test image (the test images are distinct random pixels)
    test = bundle.test.images.reshape(len(bundle.test), -1)
    for image in bundle.labeled.images[chosen].reshape(len(chosen), -1):
        assert not (test == image).all(dim=1).any()


# ----------------------------------------------------------------------------- what is built and trained

def build(trained, tiny_folder, *extra: str) -> finetuning.FineTuning:
    """The job finetune.py builds for these flags (nothing trained, nothing written)."""
    parser = build_parser(FINETUNE_FLAGS, "finetune.py", explicit_only=True)
    explicit = vars(parser.parse_args(quick(trained / "run_model.pth", "unused", *extra)))
    cfg, setup = finetuning.plan(explicit, print)
    bundle = load_dataset("folder", str(tiny_folder), 16)
    runtime = make_runtime("cpu", "fp32", False)
    return finetuning.FineTuning(cfg, setup=setup, bundle=bundle, label_indices=finetuning.choose_labels(bundle, cfg),
                                 runtime=runtime, say=print)


def test_from_layer_encoder_puts_the_classifier_on_h(trained, tiny_folder):
    ft = build(trained, tiny_folder, "--from_layer", "encoder")
    saved = torch.load(trained / "run_model.pth", weights_only=True)
    state = ft.state.model.state_dict()
    assert ft.state.model.fc.in_features == TINY_WIDTH and ft.state.model.fc.out_features == 3
    assert not any(k.startswith("head.") for k in state)
    for key, value in state.items():
        if key.startswith("f."):
            assert torch.equal(value, saved[key]), key


def test_from_layer_head1_loads_the_heads_first_layer(trained, tiny_folder):
    ft = build(trained, tiny_folder, "--from_layer", "head1")
    saved = torch.load(trained / "run_model.pth", weights_only=True)
    model = ft.state.model
    assert model.fc.in_features == 32  # the head's hidden width (--proj_hidden_dim 32), not h's 64
    assert isinstance(model.head[0], torch.nn.Linear) and isinstance(model.head[1], torch.nn.BatchNorm1d)
    assert isinstance(model.head[2], torch.nn.ReLU) and len(model.head) == 3
    for name in ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert torch.equal(model.state_dict()[f"head.{name}"], saved[f"g.{name}"]), name
    assert not torch.equal(saved["g.1.running_mean"], torch.zeros(32))  # trained statistics: equality means something
    # the classifier's input is the head's hidden layer of the loaded SimCLR model
    x = torch.randn(5, 3, 16, 16)
    reference = SimCLR(TINY_ARCH, 16, 32)
    reference.load_state_dict(saved)
    model.eval(), reference.eval()
    torch.testing.assert_close(model.head(encoder_spec(TINY_ARCH).features(model.f, x)), reference.g[:3](reference.encode(x)),
                               rtol=0, atol=0)


def test_fine_tuning_moves_every_part_of_the_encoder(trained, tmp_path):
    assert finetune.main(quick(trained / "run_model.pth", tmp_path, "--from_layer", "head1")) == 0
    before = torch.load(trained / "run_model.pth", weights_only=True)
    after = torch.load(tmp_path / "run_finetune_0.25_head1_model.pth", weights_only=True)  # the TAG names the layer
    expected = ({k for k in before if k.startswith("f.")} | {"fc.weight", "fc.bias"} |
                {"head." + k[2:] for k in before if k.startswith(("g.0.", "g.1."))})
    assert set(after) == expected
    weights = [k for k in before if k.startswith("f.") and k.endswith("weight")]
    moved = [k for k in weights if not torch.equal(after[k], before[k])]
    assert moved == weights  # every conv and BatchNorm weight of the encoder trained (linear.py moves none)
    # BatchNorm ran in training mode: its running statistics moved too
    assert not torch.equal(after["f.0.1.running_mean"], before["f.0.1.running_mean"])
    assert int(after["f.0.1.num_batches_tracked"]) == int(before["f.0.1.num_batches_tracked"]) + 2 * 3


def test_crop_flip_equals_torchvision_resized_crop_and_flip():
    images = torch.randint(0, 256, (6, 16, 16, 3), dtype=torch.uint8)
    cfg = AugmentConfig(image_size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), min_crop_scale=0.3)
    out = crop_flip(images, cfg, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)  # the same draws, in the same order
    top, left, h, w = sample_crop_boxes(6, 16, 16, 0.3, gen)
    flip = torch.rand(6, generator=gen) < 0.5
    assert flip.any() and not flip.all() and (h < 16).any()
    for i in range(6):
        x = TF.resized_crop(images[i].permute(2, 0, 1).float() / 255, int(top[i]), int(left[i]), int(h[i]),
                            int(w[i]), [16, 16], antialias=True)
        x = TF.hflip(x) if flip[i] else x
        x = TF.normalize(x, cfg.mean, cfg.std)
        torch.testing.assert_close(out[i], x, rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- refusals

BAD = [(["--label_fraction", "0"], "label_fraction"), (["--label_fraction", "-0.1"], "label_fraction"),
       (["--label_fraction", "1.5"], "label_fraction"), (["--label_fraction", "nan"], "label_fraction"),
       (["--label_fraction", "0.02"], "fewer than the 3 classes"),  # 1 label of 48
       (["--labels_per_class", "0"], "labels_per_class"),
       (["--labels_per_class", "17"], "has only 16"),
       (["--labels_per_class", "2", "--label_fraction", "0.5"], "not both")]


@pytest.mark.parametrize("labels,needle", BAD)
def test_bad_label_counts_exit_2_with_one_line_and_write_nothing(trained, tmp_path, capsys, labels, needle):
    assert finetune.main(base(trained / "run_model.pth", tmp_path / "out", *labels)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and needle in err, err
    assert not (tmp_path / "out").exists()


def test_missing_and_foreign_checkpoints_exit_2_and_write_nothing(trained, tmp_path, capsys):
    foreign = copy_run(trained, tmp_path / "ckpt", "big", SimCLR("resnet50", 16, 32).state_dict())
    other_head = copy_run(trained, tmp_path / "ckpt", "head", SimCLR(TINY_ARCH, 16, 64).state_dict())
    cases = [(tmp_path / "ckpt" / "missing_model.pth", ["--config", str(trained / "run_config.json")],
              "no such file"),
             (foreign, [], "does not fit a tiny"),
             (other_head, ["--from_layer", "head1"], "shape mismatches")]
    for path, extra, needle in cases:
        assert finetune.main(quick(path, tmp_path / "out", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        assert not (tmp_path / "out").exists()
    # the encoder of the checkpoint with the other head still fits where the head is not used
    assert finetune.main(quick(other_head, tmp_path / "out", "--epochs", "1")) == 0


def test_never_overwrites_the_files_of_another_checkpoint(trained, tmp_path, capsys):
    a = copy_run(trained, tmp_path / "one", "a")
    other = copy_run(trained, tmp_path / "two", "a")
    results = tmp_path / "results"
    assert finetune.main(quick(a, results, "--epochs", "1")) == 0
    before = (results / "a_finetune_0.25_model.pth").read_bytes()
    capsys.readouterr()
    assert finetune.main(quick(other, results, "--epochs", "1")) == 2
    assert "already holds the fine-tuning of" in capsys.readouterr().err
    assert (results / "a_finetune_0.25_model.pth").read_bytes() == before


# ----------------------------------------------------------------------------- files, end to end

def test_end_to_end_subprocess(trained, tmp_path):
    out = tmp_path / "ft"
    args = ["--model_path", str(trained / "run_model.pth"), "--labels_per_class", "5", "--epochs", "3",
            "--batch_size", "5", "--device", "cpu", "--results_dir", str(out)]
    proc = subprocess.run([sys.executable, "finetune.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    frame = pd.read_csv(out / "run_finetune_5perclass_statistics.csv")
    assert list(frame.columns) == COLUMNS and frame["epoch"].tolist() == [1, 2, 3]
    for column in COLUMNS:
        assert frame[column].map(math.isfinite).all(), column
    accuracies = frame[["train_acc@1", "train_acc@5", "test_acc@1", "test_acc@5"]]
    assert ((accuracies >= 0) & (accuracies <= 100)).all().all()
    assert (frame["test_acc@5"] == 100).all()  # 3 classes: the top 5 always hold the label
    # the default rate 0.05 x 5/256, cosine to 0 over 3 epochs x 3 steps: the last step's is lr_at(8 of 9)
    assert frame["lr"].iloc[-1] == pytest.approx(0.05 * 5 / 256 * 0.5 * (1 + math.cos(math.pi * 8 / 9)))
    assert f"{frame['test_acc@1'].iloc[-1]:.2f}%" in proc.stdout
    state = torch.load(out / "run_finetune_5perclass_model.pth", weights_only=True)
    assert state["fc.weight"].shape == (3, TINY_WIDTH)
    config = json.loads((out / "run_finetune_5perclass_config.json").read_text())
    assert config["labels_by_class"] == [5, 5, 5] and len(config["label_indices"]) == 15
    assert config["source"] == os.path.abspath(trained / "run_model.pth")
    assert (out / "run_finetune_5perclass_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    files = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("files: ")][-1]
    written = sorted(str(out / p) for p in os.listdir(out) if not p.startswith("."))  # not the hidden lock file
    assert sorted(files[len("files: "):].split(", ")) == written, files


# ----------------------------------------------------------------------------- resume and signals

def assert_same_run(a, b, prefix="run_finetune_0.25"):
    fa, fb = (pd.read_csv(folder / f"{prefix}_statistics.csv") for folder in (a, b))
    pd.testing.assert_frame_equal(fa[DETERMINISTIC], fb[DETERMINISTIC], check_exact=True)
    for kind in ("model", "last"):
        wa, wb = (torch.load(folder / f"{prefix}_{kind}.pth", weights_only=True) for folder in (a, b))
        wa, wb = (w if kind == "model" else w["model"] for w in (wa, wb))
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (kind, key)


def test_resume_after_sigint_mid_epoch_equals_an_uninterrupted_run(trained, tmp_path, monkeypatch, capsys):
    model = trained / "run_model.pth"
    extra = ("--from_layer", "head1", "--weight_decay", "1e-4", "--lr", "0.05")
    assert finetune.main(quick(model, tmp_path / "straight", *extra)) == 0
    real_step, count = finetuning.apply_gradients, [0]

    def step_then_interrupt(*a, **kw):
        sums = real_step(*a, **kw)
        count[0] += 1
        if count[0] == 4:  # epoch 2 (3 steps per epoch), after its first step
            signal.raise_signal(signal.SIGINT)
        return sums
    with monkeypatch.context() as patch:
        patch.setattr(finetuning, "apply_gradients", step_then_interrupt)
        assert finetune.main(quick(model, tmp_path / "r", *extra)) == 130
    assert count[0] == 4 and "--resume auto" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "r" / "run_finetune_0.25_head1_last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 1)
    assert len(pd.read_csv(tmp_path / "r" / "run_finetune_0.25_head1_statistics.csv")) == 1
    # a changed flag that alters the run is refused; the same command (or fewer flags) continues
    assert finetune.main(quick(model, tmp_path / "r", *extra, "--lr", "0.1", "--resume", "auto")) == 2
    assert "--lr 0.05 -> 0.1" in capsys.readouterr().err
    # the layer names the files (TAG 0.25_head1); every other flag comes from the checkpoint
    assert finetune.main(quick(model, tmp_path / "r", "--from_layer", "head1", "--resume", "auto")) == 0
    assert_same_run(tmp_path / "straight", tmp_path / "r", prefix="run_finetune_0.25_head1")


def test_sigterm_finishes_the_step_and_exits_143(trained, tmp_path, monkeypatch):
    real_step, count = finetuning.apply_gradients, [0]

    def step_then_term(*a, **kw):
        sums = real_step(*a, **kw)
        count[0] += 1
        if count[0] == 2:
            signal.raise_signal(signal.SIGTERM)
        return sums
    monkeypatch.setattr(finetuning, "apply_gradients", step_then_term)
    assert finetune.main(quick(trained / "run_model.pth", tmp_path)) == 143
    assert count[0] == 2  # no step after the one that was running
    ckpt = torch.load(tmp_path / "run_finetune_0.25_last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, 2)


def deep_run(trained, folder) -> str:
    """A run with SimCLRv2's 3-layer head (--proj_layers 3): its weights and a config that says so."""
    model = SimCLR(TINY_ARCH, 16, 32, proj_layers=3)
    path = copy_run(trained, folder, "deep", model.state_dict())
    config_path = os.path.join(folder, "deep_config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**config, "proj_layers": 3}, f)
    return path


def test_the_head_depth_comes_from_the_config_and_from_layer_takes_each_hidden_layer(trained, tmp_path, capsys):
    path = deep_run(trained, tmp_path / "deep")
    saved = torch.load(path, weights_only=True)
    assert finetune.main(quick(path, tmp_path / "out", "--from_layer", "head2", "--epochs", "1", "--lr", "1e-9")) == 0
    tuned = torch.load(tmp_path / "out" / "deep_finetune_0.25_head2_model.pth", weights_only=True)
    # the classifier sits after both hidden layers (g.0-g.5) of the 3-layer head, loaded from the weights
    assert {k for k in tuned if k.startswith("head.")} == {k.replace("g.", "head.", 1) for k in saved
                                                            if k.startswith("g.") and int(k.split(".")[1]) < 6}
    assert tuned["fc.weight"].shape == (3, 32)
    assert torch.allclose(tuned["head.3.weight"], saved["g.3.weight"], atol=1e-6)  # lr 1e-9: barely moved
    assert config_of(tmp_path / "out", "deep_finetune_0.25_head2")["proj_layers"] == 3
    capsys.readouterr()
    # a 3-layer head has two hidden layers: head3 is refused with one line, before anything is written
    assert finetune.main(quick(path, tmp_path / "out3", "--from_layer", "head3")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "head1 to head2" in err and not (tmp_path / "out3").exists()
