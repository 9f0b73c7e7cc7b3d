"""Unlabeled folders (DATA_ROOT/unlabeled/ beside train/ and test/, or alone) and the online linear probe."""
import os
import signal

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import embed
import finetune
import linear
import main
import neighbors
from conftest import tiny_run_args, write_folder
from simclr import pretrain
from simclr.names import PRETRAIN_COLUMNS
from simclr.cli import DataError
from simclr.data import load_dataset
from simclr.distributed import World

QUIET = dict(log=lambda *a: None)


def write_unlabeled(root, count=24, size=16, seed=1):
    """root/unlabeled/ with images at three depths, a text file and a file that is not an image inside."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / "unlabeled" / ("" if i % 3 == 0 else "a" if i % 3 == 1 else "a/b/c")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3)).astype(np.uint8)).save(folder / f"u{i:03d}.png")
    (root / "unlabeled" / "notes.txt").write_text("not an image")
    (root / "unlabeled" / "a" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return root


@pytest.fixture()
def three_splits(tmp_path):
    return write_unlabeled(write_folder(tmp_path / "data"))


def decoded(folder) -> np.ndarray:
    """Every decodable image below folder, sorted by path, as uint8 (N, 16, 16, 3) (they are 16x16 already)."""
    paths = sorted(p for p in folder.rglob("*.png"))
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


# ----------------------------------------------------------------------------- the data

def test_train_is_train_plus_unlabeled_and_the_bank_train_only(three_splits, tmp_path):
    lines = []
    bundle = load_dataset("folder", str(three_splits), 16, log=lines.append)
    labeled = load_dataset("folder", str(write_folder(tmp_path / "labeled_only")), 16, **QUIET)
    assert len(bundle.train) == 48 + 24 and int((bundle.train.labels == -1).sum()) == 24
    assert torch.equal(bundle.labeled.labels, labeled.train.labels) and (bundle.labeled.labels >= 0).all()
    assert torch.equal(bundle.labeled.images, labeled.train.images)
    assert bundle.labeled.images.data_ptr() == bundle.train.images.data_ptr()  # a view of the cache, no copy
    assert torch.equal(bundle.test.images, labeled.test.images) and bundle.classes == labeled.classes
    # every unlabeled image at any depth, in path order (walked sorted, folders in place)
    unlabeled = bundle.train.images[bundle.train.labels == -1].numpy()
    assert sorted(map(bytes, unlabeled)) == sorted(map(bytes, decoded(three_splits / "unlabeled")))
    # the normalisation is that of the whole training set
    pixels = np.concatenate([decoded(three_splits / "train"), decoded(three_splits / "unlabeled")]) / 255.0
    np.testing.assert_allclose(bundle.mean, pixels.reshape(-1, 3).mean(0), atol=1e-9)
    np.testing.assert_allclose(bundle.std, pixels.reshape(-1, 3).std(0), atol=1e-9)
    skipped = [line for line in lines if line.startswith("skipped")]
    assert len(skipped) == 2 and any("notes.txt" in s for s in skipped) and any("broken.jpg" in s for s in skipped)
    assert all(os.path.join(str(three_splits), "unlabeled") in s for s in skipped)


def test_the_cache_is_reused_and_a_changed_unlabeled_file_is_seen(three_splits):
    first = load_dataset("folder", str(three_splits), 16, **QUIET)
    lines = []
    again = load_dataset("folder", str(three_splits), 16, log=lines.append)
    assert any(line.startswith("using cached") and "unlabeled" in line for line in lines), lines
    assert torch.equal(first.train.images, again.train.images)
    assert isinstance(again.train.images.numpy().base, np.memmap) or not again.train.images.numpy().flags.owndata
    target = three_splits / "unlabeled" / "a" / "b" / "c" / "u002.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(target)
    lines.clear()
    changed = load_dataset("folder", str(three_splits), 16, log=lines.append)
    assert any(line.startswith("decoding") for line in lines), lines
    assert not torch.equal(changed.train.images, first.train.images)


def test_unlabeled_alone_has_no_classes_bank_or_test(tmp_path):
    root = write_unlabeled(tmp_path / "data")
    bundle = load_dataset("folder", str(root), 16, **QUIET)
    assert len(bundle.train) == 24 and (bundle.train.labels == -1).all()
    assert bundle.classes == [] and len(bundle.labeled) == 0 and len(bundle.test) == 0


@pytest.mark.parametrize("make,needle", [
    (lambda u: (u / "x.txt").write_text("no image"), "has no image files"),
    (lambda u: (u / "bad.png").write_bytes(b"\x89PNG broken"), "decodes"),
])
@pytest.mark.parametrize("with_labels", [False, True])
def test_an_unlabeled_folder_without_a_decodable_image_is_refused(tmp_path, capsys, make, needle, with_labels):
    root = write_folder(tmp_path / "data") if with_labels else tmp_path / "data"
    (root / "unlabeled" / "deep").mkdir(parents=True)
    make(root / "unlabeled" / "deep")
    with pytest.raises(DataError, match=needle if with_labels or needle != "decodes" else "no readable images"):
        load_dataset("folder", str(root), 16, **QUIET)
    results = tmp_path / "results"
    assert main.main(tiny_run_args(root, results, "u")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "unlabeled" in err[0], err
    assert not (results / "u_model.pth").exists() and not (results / "u_statistics.csv").exists()


# ----------------------------------------------------------------------------- training on it

def test_unlabeled_only_trains_without_evaluation_and_keeps_the_last_weights(tmp_path, tiny_folder, capsys):
    root = write_unlabeled(tmp_path / "data", count=16)
    results = tmp_path / "results"
    assert main.main(tiny_run_args(root, results, "u", epochs=2, knn_at_start=True)) == 0
    out = capsys.readouterr()
    assert sum("unlabeled images only" in line for line in (out.out + out.err).splitlines()) == 1
    frame = pd.read_csv(results / "u_statistics.csv")
    assert list(frame["epoch"]) == [1, 2]  # no epoch-0 row: nothing to evaluate
    for column in ("test_acc@1", "test_acc@5", "knn_seconds", "probe_acc@1", "probe_acc@5"):
        assert frame[column].isna().all(), column
    assert frame["train_loss"].notna().all()
    model = torch.load(results / "u_model.pth", weights_only=True)
    last = torch.load(results / "u_last.pth", weights_only=True)["model"]
    assert model.keys() == last.keys() and all(torch.equal(model[k], last[k]) for k in model)
    # its evaluations need labeled data, named on the command line
    out = tmp_path / "out"
    weights = ["--model_path", str(results / "u_model.pth"), "--device", "cpu"]
    scripts = [(linear, ["--epochs", "1", "--results_dir", str(out)]),
               (finetune, ["--epochs", "1", "--label_fraction", "0.5", "--results_dir", str(out)]),
               (neighbors, ["--out", str(out / "n.png")]), (embed, ["--method", "pca", "--out", str(out / "e.png")])]
    for script, extra in scripts:
        for data, needle in (([], "unlabeled images only"), (["--data_root", str(root)], "no labeled train")):
            assert script.main([*weights, *extra, *data]) == 2, (script, data)
            err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("using cached")]
            assert len(err) == 1 and needle in err[0] and "--data_root" in err[0], (script, err)
            assert not out.exists()
    assert linear.main([*weights, *scripts[0][1], "--data_root", str(tiny_folder)]) == 0


def test_supcon_on_images_without_any_label_is_refused_before_training(tmp_path, capsys):
    root = write_unlabeled(tmp_path / "data", count=16)
    results = tmp_path / "results"
    assert main.main(tiny_run_args(root, results, "u", loss="supcon")) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("using cached")]
    assert len(err) == 1 and err[0].startswith("error:") and "--loss supcon needs labels" in err[0], err
    assert not list(results.glob("u_*"))  # nothing trained, nothing written (ntxent trains on it: the test above)



# ----------------------------------------------------------------------------- the online probe

def probe_run(data, results, name, *extra, **overrides):
    args = tiny_run_args(data, results, name, "--precision", "fp32", *extra, **overrides)
    assert main.main(args) == 0
    return torch.load(results / f"{name}_last.pth", weights_only=True)


def test_the_probe_never_changes_what_the_encoder_learns(three_splits, tmp_path):
    on = probe_run(three_splits, tmp_path, "on", "--online_probe", epochs=2)
    off = probe_run(three_splits, tmp_path, "off", "--no-online_probe", epochs=2)
    assert on["model"].keys() == off["model"].keys()
    for key in on["model"]:
        assert torch.equal(on["model"][key], off["model"][key]), key
    for a, b in zip(on["optimizer"]["state"].values(), off["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    frames = {n: pd.read_csv(tmp_path / f"{n}_statistics.csv") for n in ("on", "off")}
    assert list(frames["on"].columns) == list(PRETRAIN_COLUMNS)
    assert frames["on"][["probe_acc@1", "probe_acc@5"]].notna().all().all()
    assert frames["off"][["probe_acc@1", "probe_acc@5"]].isna().all().all()
    pd.testing.assert_series_equal(frames["on"]["test_acc@1"], frames["off"]["test_acc@1"])
    # the probe learned: its weights moved from zero, and only in the checkpoint of the run that has it
    assert on["online_probe"]["linear"]["weight"].abs().sum() > 0 and "online_probe" not in off
    assert on["config"]["online_probe"] is True and off["config"]["online_probe"] is False


def test_resume_mid_epoch_restores_the_probe_exactly(tiny_folder, tmp_path, monkeypatch):
    straight = probe_run(tiny_folder, tmp_path, "straight", epochs=2)
    real_step, count = pretrain.train_step, [0]

    def step_then_interrupt(*a, **kw):
        out = real_step(*a, **kw)
        count[0] += 1
        if count[0] == 9:  # epoch 2 (6 steps per epoch), step 3: the probe has moved since the epoch began
            signal.raise_signal(signal.SIGINT)
        return out
    with monkeypatch.context() as patch:
        patch.setattr(pretrain, "train_step", step_then_interrupt)
        assert main.main(tiny_run_args(tiny_folder, tmp_path, "resumed", "--precision", "fp32", epochs=2)) == 130
    resumed = probe_run(tiny_folder, tmp_path, "resumed", "--resume", "auto", epochs=2)
    for key, value in straight["online_probe"]["linear"].items():
        assert torch.equal(value, resumed["online_probe"]["linear"][key]), key
    a, b = straight["online_probe"]["optimizer"]["state"], resumed["online_probe"]["optimizer"]["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    fa, fb = (pd.read_csv(tmp_path / f"{n}_statistics.csv") for n in ("straight", "resumed"))
    pd.testing.assert_frame_equal(fa[["probe_acc@1", "probe_acc@5"]], fb[["probe_acc@1", "probe_acc@5"]],
                                  check_exact=True)


def test_a_checkpoint_from_before_the_probe_resumes_with_it_off(tiny_folder, tmp_path):
    old = probe_run(tiny_folder, tmp_path, "old", "--no-online_probe", epochs=1)
    del old["config"]["online_probe"]  # as written before the flag existed
    path = tmp_path / "old_last.pth"
    torch.save(old, path)
    # the run continues for one more epoch with the probe off, as it was trained
    resumed = probe_run(tiny_folder, tmp_path, "old", "--resume", str(path), epochs=2)
    assert resumed["config"]["online_probe"] is False and "online_probe" not in resumed
    assert pd.read_csv(tmp_path / "old_statistics.csv")["probe_acc@1"].isna().all()


def test_unlabeled_views_never_reach_the_probe():
    world = World()
    h = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))  # 2b = 8 views of b = 4 images
    before = torch.get_rng_state()
    mixed = pretrain.OnlineProbe(5, 3, torch.device("cpu"), world)
    assert torch.equal(before, torch.get_rng_state())  # built without drawing from the run's generator
    mixed.step(h, torch.tensor([2, -1, 0, -1]))
    only = pretrain.OnlineProbe(5, 3, torch.device("cpu"), world)
    keep = torch.tensor([0, 2, 4, 6])
    only.step(h[keep], torch.tensor([2, 0]))  # the labeled images' two views alone
    for a, b in zip(mixed.linear.parameters(), only.linear.parameters()):
        torch.testing.assert_close(a, b)
    assert mixed.linear.weight.abs().sum() > 0
    none = pretrain.OnlineProbe(5, 3, torch.device("cpu"), world)
    none.step(h, torch.full((4,), -1))
    assert all((p == 0).all() for p in none.linear.parameters())
    top1, top5 = mixed.accuracy(h[:4], torch.tensor([2, 1, 0, 1]))
    assert 0 <= top1 <= top5 == 100.0  # 3 classes: every label is among the top 5
