"""Hostile input: full disks, odd folder entries, high bit depths, tampered caches, flat data, bad values.

Each case ends in "reported and skipped" or one clear line with exit code 2, and leaves no
half-written file behind.
"""
from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from simclr import data, pretrain
import main
from simclr.data import load_dataset
from conftest import tiny_run_args, write_folder


class Log(list):
    def __call__(self, line: str) -> None:
        assert "\n" not in line
        self.append(line)


def one_line_exit_2(capsys, code) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err, err
    return err


def no_temporaries(folder) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(".tmp") or p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- the image cache

def test_a_full_disk_while_caching_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    root = write_folder(tmp_path / "data")
    cache = tmp_path / "cache"

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    err = one_line_exit_2(capsys, main.main(tiny_run_args(root, tmp_path / "r", cache_dir=cache)))
    assert "not enough space" in err and str(cache) in err and "MiB needed" in err
    assert no_temporaries(cache) and not (tmp_path / "r").exists()


def test_odd_entries_are_reported_once_and_skipped(tmp_path):
    root = write_folder(tmp_path / "data")
    cat = root / "train" / "cat"
    os.symlink(cat / "missing.png", cat / "dangling.png")                 # a broken link
    os.symlink(cat, cat / "loop")                                          # a link to its own folder
    os.mkfifo(cat / "pipe.png")                                            # reading it would block forever
    (cat / "folder.jpg").mkdir()                                           # a folder named like an image...
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(cat / "folder.jpg" / "inner.png")  # ...holding one
    odd_name = os.fsdecode(b"caf\xe9.png")                                 # not UTF-8
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(os.path.join(os.fsencode(cat), b"caf\xe9.png"))
    log = Log()
    bundle = load_dataset("folder", str(root), 16, log=log)
    skipped = [line for line in log if line.startswith("skipped")]
    assert len(skipped) == 3, skipped
    assert any("dangling.png (a broken link)" in s for s in skipped)
    assert any("loop (a link back to a folder already scanned)" in s for s in skipped)
    assert any("pipe.png (not a regular file)" in s for s in skipped)
    # the image inside folder.jpg and the one with the odd name are used: 16 + 2 cats
    assert int((bundle.train.labels == 0).sum()) == 18 and odd_name
    again = Log()
    load_dataset("folder", str(root), 16, log=again)  # from the cache: still consistent, no new decode
    assert any(line.startswith("using cached") for line in again)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    root = write_folder(tmp_path / "data")
    gray16 = np.full((16, 16), 32896, np.uint16)                           # 50% grey in 16 bits
    Image.fromarray(gray16).save(root / "train" / "dog" / "deep.png")
    assert Image.open(root / "train" / "dog" / "deep.png").mode.startswith("I")
    bundle = load_dataset("folder", str(root), 16, log=Log())
    dogs = bundle.train.images[bundle.train.labels == 1]
    flat = [img for img in dogs if (img == img[0, 0, 0]).all()]
    assert len(flat) == 1 and int(flat[0][0, 0, 0]) == 128                 # 32896 / 257 = 128, not 255


def test_a_tampered_cache_is_rebuilt_and_never_trained_on(tmp_path):
    root = write_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    first = load_dataset("folder", str(root), 16, cache_dir=str(cache), log=Log()).train.images.clone()
    manifest = json.loads((cache / "train-16px.json").read_text())
    images_file = cache / manifest["images"]
    stored = np.load(images_file)
    np.save(images_file, np.random.default_rng(0).integers(0, 256, stored.shape, dtype=np.uint8))  # same shape
    log = Log()
    second = load_dataset("folder", str(root), 16, cache_dir=str(cache), log=log)
    assert any(line.startswith("decoding") and "train" in line for line in log), log
    assert torch.equal(first, second.train.images)


def test_an_edited_image_with_size_and_mtime_put_back_is_decoded_again(tmp_path):
    root = write_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    target = root / "train" / "cat" / "000.bmp"  # uncompressed: an edit keeps the file's size
    pixels = np.asarray(Image.open(root / "train" / "cat" / "000.png")).copy()
    os.remove(root / "train" / "cat" / "000.png")
    Image.fromarray(pixels).save(target)
    load_dataset("folder", str(root), 16, cache_dir=str(cache), log=Log())
    before = os.stat(target)
    pixels[0, 0] = (255 - pixels[0, 0]).astype(np.uint8)
    Image.fromarray(pixels).save(target)
    assert os.path.getsize(target) == before.st_size
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    log = Log()
    bundle = load_dataset("folder", str(root), 16, cache_dir=str(cache), log=log)
    assert any(line.startswith("decoding") and "train" in line for line in log), log
    assert torch.equal(bundle.train.images[0], torch.from_numpy(pixels))


def test_flat_colour_data_is_refused(tmp_path, capsys):
    root = tmp_path / "flat"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(np.full((16, 16, 3), 77, np.uint8)).save(root / split / cls / f"{i}.png")
    err = one_line_exit_2(capsys, main.main(tiny_run_args(root, tmp_path / "r")))
    assert "one flat colour" in err and not (tmp_path / "r").exists()
    assert not list((root / ".simclr_cache").glob("*.npy"))  # no orphan cache array either


def test_a_class_whose_images_all_fail_is_refused(tmp_path, capsys):
    root = write_folder(tmp_path / "data")
    for path in (root / "train" / "frog").iterdir():
        path.write_bytes(b"not an image at all")
    err = one_line_exit_2(capsys, main.main(tiny_run_args(root, tmp_path / "r")))
    assert "frog" in err and "no image that decodes" in err


def test_a_data_root_that_is_a_file(tmp_path, capsys):
    file = tmp_path / "data.txt"
    file.write_text("x")
    err = one_line_exit_2(capsys, main.main(tiny_run_args(file, tmp_path / "r")))
    assert "is a file, not a folder" in err


# ----------------------------------------------------------------------------- absurd values

@pytest.mark.parametrize("flag,value,needle", [
    ("--weight_decay", "1e308", "<= 10"), ("--lr", "1e300", "<= 10000"), ("--image_size", "10000000", "<= 1024"),
    ("--temperature", "inf", "finite"), ("--lr", "nan", "finite"), ("--batch_size", "99999999999", "<="),
    ("--momentum", "1", "< 1"), ("--threads", "100000", "<= 1024"),
    ("--proj_layers", "0", "positive"), ("--proj_layers", "1000", "<= 8"), ("--dcl_sigma", "0", ">= 1.1754943508222875e-38"),
    ("--dcl_sigma", "-0.5", ">= 1.1754943508222875e-38"), ("--dcl_sigma", "1e-300", ">= 1.1754943508222875e-38"),
])
def test_absurd_values_name_their_bound(tmp_path, capsys, flag, value, needle):
    args = tiny_run_args(tmp_path / "nowhere", tmp_path / "r", **{flag[2:]: value})
    err = one_line_exit_2(capsys, main.main(args))
    assert flag in err and needle in err


def test_linear_threads_bound(tmp_path, capsys):
    import linear
    err = one_line_exit_2(capsys, linear.main(["--model_path", str(tmp_path / "x_model.pth"), "--workers", "100000"]))
    assert "--workers" in err and "<= 1024" in err


# ----------------------------------------------------------------------------- results files and run names

def test_a_second_run_of_the_same_name_stops_at_once_naming_the_holder(tiny_folder, tmp_path, capsys):
    from simclr.files import RunLock
    results = tmp_path / "r"
    holder = RunLock(str(results), "same").acquire()  # stands for a live run of that name
    try:
        err = one_line_exit_2(capsys, main.main(tiny_run_args(tiny_folder, results, "same")))
    finally:
        holder.release()
    assert "in use by process" in err and str(os.getpid()) in err
    assert sorted(p.name for p in results.iterdir()) == [".same.lock"]  # nothing of the run was written
    assert main.main(tiny_run_args(tiny_folder, results, "same")) == 0  # free again: kill -9 leaves no lock
    assert (results / "same_model.pth").is_file()


def test_the_lock_holder_removes_temporaries_a_killed_run_left(tiny_folder, tmp_path):
    results = tmp_path / "r"
    results.mkdir()
    (results / ".t_last.pth.0badc0de.tmp").write_bytes(b"x" * 1000)   # a kill -9 during a save leaves this
    (results / ".other_last.pth.0badc0de.tmp").write_bytes(b"y")       # another run's: not ours to remove
    assert main.main(tiny_run_args(tiny_folder, results, "t")) == 0
    assert not (results / ".t_last.pth.0badc0de.tmp").exists() and (results / ".other_last.pth.0badc0de.tmp").exists()


def test_results_dir_that_is_a_file(tiny_folder, tmp_path, capsys):
    file = tmp_path / "results"
    file.write_text("not a folder")
    err = one_line_exit_2(capsys, main.main(tiny_run_args(tiny_folder, file)))
    assert str(file) in err and file.read_text() == "not a folder"


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_files(tiny_folder, tmp_path, monkeypatch,
                                                                             capsys):
    results = tmp_path / "r"
    assert main.main(tiny_run_args(tiny_folder, results, "d")) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in results.iterdir() if p.suffix in (".csv", ".pth", ".json")}
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        raise OSError(errno.ENOSPC, "No space left on device", str(f.name))
    monkeypatch.setattr(torch, "save", full_disk)
    code = main.main(tiny_run_args(tiny_folder, results, "d", "--resume", "auto", epochs=2))
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars: the one error line
    assert code == 2 and err.startswith("error:") and "No space left on device" in err
    assert str(results / "d_") in err and ".tmp" not in err
    after = {p.name: p.read_bytes() for p in results.iterdir() if p.suffix in (".csv", ".pth", ".json")}
    assert after["d_last.pth"] == before["d_last.pth"] and after["d_model.pth"] == before["d_model.pth"]
    assert no_temporaries(results)


# ----------------------------------------------------------------------------- checkpoints and configs

@pytest.fixture(scope="module")
def finished(tiny_folder, tmp_path_factory):
    results = tmp_path_factory.mktemp("finished")
    assert main.main(tiny_run_args(tiny_folder, results, "f", precision="fp32")) == 0
    return results


@pytest.mark.parametrize("change,needle", [
    (lambda c: c.update(model={}), "model"),
    (lambda c: c["config"].update(batch_size="eight"), "batch_size"),
    (lambda c: c.update(epoch="one"), "epoch"),
    (lambda c: c.update(rng={"torch": torch.zeros(3)}), "rng"),
    (lambda c: c.update(history=[{"epoch": "x"}]), "history"),
    (lambda c: c.update(optimizer={"state": {}, "param_groups": [{"params": [0]}]}), "optimizer"),
    (lambda c: c["config"].update(arch="resnet99"), "arch"),
    (lambda c: c.update(step_in_epoch=10 ** 6), "step_in_epoch"),
])
def test_a_tampered_checkpoint_is_refused_naming_the_part(finished, tmp_path, capsys, change, needle):
    ckpt = torch.load(finished / "f_last.pth", weights_only=True)
    change(ckpt)
    torch.save(ckpt, tmp_path / "x_last.pth")
    err = one_line_exit_2(capsys, main.main(["--resume", str(tmp_path / "x_last.pth"), "--epochs", "3",
                                             "--results_dir", str(tmp_path / "out"), "--device", "cpu"]))
    assert needle in err


@pytest.mark.parametrize("key,value,needle", [
    ("image_size", 1e30, "image_size"), ("feature_dim", -5, "feature_dim"), ("feature_dim", 10 ** 12, "feature_dim"),
    ("mean", "red", "mean"), ("data_root", 7, "data_root"), ("mean", [float("nan"), 0.5, 0.5], "mean"),
    ("std", [0.2, 0.0, 0.2], "std"), ("arch", "resnet99", "arch"),
])
def test_a_tampered_run_config_is_refused_by_linear_and_neighbors(finished, tmp_path, capsys, key, value, needle):
    import shutil
    import linear
    import neighbors
    shutil.copy(finished / "f_model.pth", tmp_path / "g_model.pth")
    config = json.loads((finished / "f_config.json").read_text())
    config[key] = value
    (tmp_path / "g_config.json").write_text(json.dumps(config))
    err = one_line_exit_2(capsys, linear.main(["--model_path", str(tmp_path / "g_model.pth"), "--device", "cpu"]))
    assert needle in err
    err = one_line_exit_2(capsys, neighbors.main(["--model_path", str(tmp_path / "g_model.pth"), "--device", "cpu"]))
    assert needle in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g_config.json", "g_model.pth"]


def test_nan_in_the_first_epoch_says_no_checkpoint_exists(tiny_folder, tmp_path, monkeypatch, capsys):
    from simclr.loss import NTXent
    real = NTXent.__call__
    monkeypatch.setattr(NTXent, "__call__", lambda *a, **kw: real(*a, **kw) * float("nan"))
    code = main.main(tiny_run_args(tiny_folder, tmp_path / "r", "n"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: the loss became NaN/inf at epoch 1, step 1")
    assert "no checkpoint was written yet" in err[-1] and not (tmp_path / "r" / "n_last.pth").exists()


def test_a_second_sigterm_exits_143_not_130(tiny_folder, tmp_path, monkeypatch, capsys):
    import signal
    real_step = pretrain.train_step

    def step_then_two_terms(*a, **kw):
        loss = real_step(*a, **kw)
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # the second one cuts the wait short
        return loss
    monkeypatch.setattr(pretrain, "train_step", step_then_two_terms)
    assert main.main(tiny_run_args(tiny_folder, tmp_path / "r", "tt")) == 143
    assert "interrupted" in capsys.readouterr().err


def test_sigterm_during_the_cache_build_exits_143_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    import signal
    root = write_folder(tmp_path / "data")
    real = data._decode_image
    count = [0]

    def decode_then_term(path, size):
        count[0] += 1
        if count[0] == 5:
            signal.raise_signal(signal.SIGTERM)
        return real(path, size)
    monkeypatch.setattr(data, "_decode_image", decode_then_term)
    code = main.main(tiny_run_args(root, tmp_path / "r", cache_dir=tmp_path / "cache"))
    assert code == 143 and "interrupted" in capsys.readouterr().err
    assert no_temporaries(tmp_path / "cache") and not list((tmp_path / "cache").glob("*.npy"))
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is put back


def test_a_read_only_file_system_is_one_error_naming_the_file(tmp_path, monkeypatch):
    from simclr import files
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(files.os, "replace", read_only)
    monkeypatch.setattr(files.os, "unlink", read_only)  # the cleanup fails the same way
    with pytest.raises(OSError) as e:
        files.atomic_write_text(str(tmp_path / "x.csv"), "a,b\n")
    assert e.value.errno == errno.EROFS and e.value.filename == str(tmp_path / "x.csv")


def test_plot_refuses_text_in_a_number_column_and_bad_flags_in_one_line(tmp_path, capsys):
    import plot
    bad = tmp_path / "r_statistics.csv"
    bad.write_text("epoch,train_loss,test_acc@1,test_acc@5\n1,0.5,abc,90\n")
    err = one_line_exit_2(capsys, plot.main([str(bad), "--out", str(tmp_path / "o.png")]))
    assert "non-numeric" in err and "'abc'" in err and not (tmp_path / "o.png").exists()
    one_line_exit_2(capsys, plot.main([]))
