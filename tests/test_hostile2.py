"""Hostile input, second pass: nothing mixed (a resume onto other data, plots of other kinds), nothing
overwritten (fine-tuning and map names, the lock), nothing left behind (temporaries, full disks)."""
from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

import finetune
import main
from simclr import data, finetuning
from simclr.cli import UserError, resume_command
from simclr.data import load_dataset
from simclr.files import RunLock
from simclr.flags import FINETUNE_DEFAULTS
from simclr.knn import topk_accuracy
from conftest import ROOT, copy_run, tiny_run_args, write_folder

FULL_DISK = "[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"


def last_error(capsys) -> str:
    """The last stderr line (after progress bars): it must be the only error line, with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def ft_args(model, results, *extra):
    return ["--model_path", str(model), "--epochs", "1", "--batch_size", "4", "--device", "cpu",
            "--results_dir", str(results), "--label_fraction", "0.25", *extra]


# ----------------------------------------------------------------------------- 1, 13: resume on the data of the run

@pytest.fixture(scope="module")
def one_epoch(tiny_folder, tmp_path_factory):
    results = tmp_path_factory.mktemp("one") / "r"
    assert main.main(tiny_run_args(tiny_folder, results, "o", precision="fp32")) == 0
    return results


def test_a_resume_onto_other_data_is_refused_naming_what_differs(one_epoch, tiny_folder, tmp_path, capsys):
    results = tmp_path / "r"
    shutil.copytree(one_epoch, results)
    config = (results / "o_config.json").read_bytes()
    other_images = write_folder(tmp_path / "other", seed=7)               # same classes and count, other pixels
    fewer = write_folder(tmp_path / "fewer", train_per_class=10)
    for root, needle in ((other_images, "other images"), (fewer, "training images 48 -> 30")):
        for epochs in (1, 2):  # also when no epoch is left to run
            code = main.main(tiny_run_args(root, results, "o", "--resume", "auto", epochs=epochs))
            err = last_error(capsys)
            assert code == 2 and needle in err and str(root) in err, err
    old = torch.load(results / "o_last.pth", weights_only=True)
    del old["data"]  # a checkpoint written before the data was recorded: NAME_config.json gives classes and count
    torch.save(old, results / "o_last.pth")
    assert main.main(tiny_run_args(fewer, results, "o", "--resume", "auto", epochs=2)) == 2
    assert "training images 48 -> 30" in last_error(capsys)
    assert (results / "o_config.json").read_bytes() == config
    assert sorted(p.name for p in results.iterdir()) == sorted(p.name for p in one_epoch.iterdir())


def test_a_moved_folder_is_the_same_data_and_a_finished_run_is_left_alone(one_epoch, tiny_folder, tmp_path, capsys):
    results = tmp_path / "r"
    shutil.copytree(one_epoch, results)
    moved = tmp_path / "moved"
    shutil.copytree(tiny_folder, moved)  # new inodes and times: the scan fingerprint differs, the content not
    before = {p.name: p.read_bytes() for p in results.iterdir() if p.is_file()}
    assert main.main(tiny_run_args(moved, results, "o", "--resume", "auto")) == 0  # 1 of 1 epochs done
    out = capsys.readouterr().out
    assert "o is finished (1 of 1 epochs" in out and "resuming" not in out
    assert {p.name: p.read_bytes() for p in results.iterdir() if p.is_file()} == before  # nothing rewritten
    assert main.main(tiny_run_args(moved, results, "o", "--resume", "auto", epochs=2)) == 0
    out = capsys.readouterr().out
    done = [line for line in out.splitlines() if line.startswith("done:")][0]
    assert all(os.path.exists(p) for p in done.split("files ")[1].split(", "))
    assert json.loads((results / "o_config.json").read_text())["data_fingerprint"] == \
        torch.load(results / "o_last.pth", weights_only=True)["data"]["fingerprint"]


# ----------------------------------------------------------------------------- 2: a full disk in torch.save

def test_a_full_disk_in_torch_save_is_exit_2_and_the_csv_claims_no_unsaved_epoch(tiny_folder, tmp_path, monkeypatch,
                                                                                capsys):
    real_save = torch.save

    def full_on_last(obj, f, *a, **kw):
        if "_last.pth" in str(getattr(f, "name", f)):
            f.write(b"PK\x03\x04half")
            raise RuntimeError(FULL_DISK)
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", full_on_last)
    results = tmp_path / "r"
    assert main.main(tiny_run_args(tiny_folder, results, "d")) == 2
    err = last_error(capsys)
    assert "no space left on device" in err and str(results / "d_last.pth") in err
    assert not (results / "d_statistics.csv").exists() and not (results / "d_last.pth").exists()
    assert not [p for p in results.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_in_finetune_is_exit_2(trained, tmp_path, monkeypatch, capsys):
    def full(obj, f, *a, **kw):
        raise RuntimeError(FULL_DISK)
    monkeypatch.setattr(torch, "save", full)
    assert finetune.main(ft_args(trained / "run_model.pth", tmp_path)) == 2
    assert "no space left on device" in last_error(capsys)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- 3, 6, 7: the lock and temporaries

def test_finetune_holds_a_run_lock_against_a_second_process(trained, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from simclr.files import RunLock; "
                               "RunLock(sys.argv[1], sys.argv[2]).acquire(); print('held', flush=True); time.sleep(120)",
                               str(tmp_path), "run_finetune_0.25"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert finetune.main(ft_args(trained / "run_model.pth", tmp_path)) == 2
        err = last_error(capsys)
        assert "in use by process" in err and str(holder.pid) in err
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run_finetune_0.25.lock"]


def test_a_lock_removes_only_the_temporaries_of_its_own_files(tmp_path):
    names = [".X_last.pth.0badc0de.tmp", ".X_b_last.pth.0badc0de.tmp", ".X_linear_model.pth.0badc0de.tmp",
             ".X_finetune_0.1_last.pth.0badc0de.tmp", ".X_statistics.csv.12345678.tmp"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    lock = RunLock(str(tmp_path), "X", ["X_last.pth", "X_statistics.csv"]).acquire()
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == sorted(names[1:4])


def test_the_next_finetune_of_a_name_removes_what_a_killed_save_left(trained, tmp_path):
    left = tmp_path / ".run_finetune_0.25_last.pth.0badc0de.tmp"
    tmp_path.mkdir(exist_ok=True)
    left.write_bytes(b"x" * 1000)
    other = tmp_path / ".run_linear_model.pth.0badc0de.tmp"
    other.write_bytes(b"y")
    assert finetune.main(ft_args(trained / "run_model.pth", tmp_path)) == 0
    assert not left.exists() and other.exists()


# ----------------------------------------------------------------------------- 13: names that say what differs

def test_fine_tuning_from_head1_keeps_its_own_files(trained, tmp_path):
    model = trained / "run_model.pth"
    assert finetune.main(ft_args(model, tmp_path)) == 0
    first = (tmp_path / "run_finetune_0.25_statistics.csv").read_bytes()
    assert finetune.main(ft_args(model, tmp_path, "--from_layer", "head1")) == 0
    assert (tmp_path / "run_finetune_0.25_statistics.csv").read_bytes() == first
    assert json.loads((tmp_path / "run_finetune_0.25_head1_config.json").read_text())["from_layer"] == "head1"


def test_a_finished_fine_tuning_says_so_and_rewrites_nothing(trained, tmp_path, capsys):
    model = trained / "run_model.pth"
    assert finetune.main(ft_args(model, tmp_path)) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    capsys.readouterr()
    assert finetune.main(ft_args(model, tmp_path, "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert "is finished (1 of 1 epochs)" in out and "resuming" not in out
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_map_names_say_what_differs():
    from simclr.feature_map import map_tag
    assert map_tag("tsne", None, False) == "tsne"  # the default command keeps its name
    assert map_tag("tsne", 2000, True) == "tsne_n2000_thumbnails" and map_tag("pca", 50, False) == "pca_n50"


# ----------------------------------------------------------------------------- 4, 5: the folder data and its cache

def test_links_to_an_ancestor_or_another_class_are_skipped(tmp_path):
    root = write_folder(tmp_path / "data")
    os.symlink("..", root / "train" / "cat" / "up")                 # train/: every class again
    os.symlink("../..", root / "train" / "cat" / "top")             # the root: the test images too
    os.symlink("../dog", root / "train" / "frog" / "dogs")          # another class's images
    lines = []
    bundle = load_dataset("folder", str(root), 16, log=lines.append)
    assert torch.bincount(bundle.train.labels).tolist() == [16, 16, 16]
    assert torch.bincount(bundle.labeled.labels).tolist() == [16, 16, 16]
    assert sum("holds this class folder" in line for line in lines) == 2
    assert sum("into another class folder" in line for line in lines) == 1


@pytest.mark.parametrize("field,value", [("mean", "xyz"), ("skipped", 5), ("std", [0.0, 0.0, 0.0]),
                                         ("mean", [0.5, float("nan"), 0.5])])
def test_a_manifest_value_outside_the_checksums_is_rebuilt(tmp_path, field, value):
    root = write_folder(tmp_path / "data")
    first = load_dataset("folder", str(root), 16, log=lambda line: None)
    manifest = root / ".simclr_cache" / "train-16px.json"
    man = json.loads(manifest.read_text())
    man[field] = value
    manifest.write_text(json.dumps(man))
    lines = []
    again = load_dataset("folder", str(root), 16, log=lines.append)
    assert any(line.startswith("decoding") for line in lines)  # rebuilt, not trained on
    assert again.mean == first.mean and again.std == first.std


def test_a_data_root_that_is_a_link_loop_says_so(tmp_path, capsys):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    assert main.main(tiny_run_args(loop, tmp_path / "r")) == 2
    assert "link loop" in last_error(capsys)


# ----------------------------------------------------------------------------- 16: exact percentages

def test_accuracies_are_exact_percentages_of_counts():
    labels = torch.zeros(500, dtype=torch.long)
    scores = torch.zeros(500, 2)
    scores[:106, 0] = 1.0   # 106 of 500 right
    scores[106:, 1] = 1.0
    assert topk_accuracy(scores, labels, (1,)) == [100 * 106 / 500] and repr(100 * 106 / 500) == "21.2"


# ----------------------------------------------------------------------------- 14: plot.py draws like with like

def test_plot_skips_csvs_of_another_kind_with_a_note(one_epoch, tmp_path, capsys):
    import plot
    linear = tmp_path / "o_linear_statistics.csv"
    linear.write_text("epoch,train_loss,train_acc@1,train_acc@5,test_loss,test_acc@1,test_acc@5,lr,epoch_seconds\n"
                      "1,2.0,30,80,2.1,31,81,0.1,1.0\n")
    assert plot.main([str(one_epoch / "o_statistics.csv"), str(linear), "--out", str(tmp_path / "c.png")]) == 0
    err = capsys.readouterr().err
    assert f"skipped {linear} (a linear.py probe CSV)" in err and (tmp_path / "c.png").is_file()
    assert plot.kind_of(["epoch", "train_loss", "train_acc@1", "test_acc@1"]) == "finetune"


# ----------------------------------------------------------------------------- 9, 10, 12: messages and signals

def test_the_resume_command_is_quoted(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["main.py", "--name", "my run", "--resume", "x.pth"])
    assert shlex.split(resume_command("main.py")) == ["python", "main.py", "--name", "my run", "--resume", "auto"]


def test_a_deeply_nested_run_config_is_one_line(trained, tmp_path, capsys):
    import linear
    model = copy_run(trained, tmp_path, "deep")
    (tmp_path / "deep_config.json").write_text("[" * 200_000 + "]" * 200_000)
    assert linear.main(["--model_path", model, "--device", "cpu"]) == 2
    assert "nested too deeply" in last_error(capsys)
    with pytest.raises(UserError):
        torch.hub.load(ROOT, "resnet18", source="local", weights=model)


def test_sigterm_in_linear_is_one_line_and_143(trained):
    code = ("import signal, sys; import simclr.linear_eval as job; "
            "job.run = lambda cfg: signal.raise_signal(signal.SIGTERM); import linear; "
            f"sys.exit(linear.main(['--model_path', {str(trained / 'run_model.pth')!r}, '--device', 'cpu']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143 and proc.stderr.strip().startswith("interrupted"), proc.stderr


def test_ctrl_c_while_a_script_imports_is_one_line_and_130():
    code = ("import builtins, runpy; real = builtins.__import__\n"
            "def imp(name, *a, **k):\n"
            "    if name == 'simclr.flags': raise KeyboardInterrupt\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = imp; runpy.run_path('embed.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and proc.stderr.strip() == "interrupted while starting; nothing was written"


# ----------------------------------------------------------------------------- 15: fine-tuning batches and defaults

def test_fine_tuning_uses_every_label_and_its_lr_follows_the_batch(trained, tmp_path):
    # 12 labels at --batch_size 5: 3 batches of 4 (the old plan: 2 batches of 5, 2 labels dropped)
    args = ft_args(trained / "run_model.pth", tmp_path)
    args[args.index("--batch_size") + 1] = "5"
    assert finetune.main(args) == 0
    config = json.loads((tmp_path / "run_finetune_0.25_config.json").read_text())
    assert config["steps_per_epoch"] == 3 and config["batch"] == 4 and config["lr"] == 0.05 * 4 / 256
    args[args.index("--batch_size") + 1] = "64"  # fewer labels than a batch: one batch of all 12
    assert finetune.main([*args, "--results_dir", str(tmp_path / "b")]) == 0
    config = json.loads((tmp_path / "b" / "run_finetune_0.25_config.json").read_text())
    assert config["steps_per_epoch"] == 1 and config["batch"] == 12 and config["lr"] == 0.05 * 12 / 256


@pytest.mark.parametrize("fraction,epochs", [(0.01, 60), (0.1, 30), (None, 30)])
def test_the_default_epochs_follow_the_label_fraction(tiny_folder, fraction, epochs):
    values = {**FINETUNE_DEFAULTS, "untrained": True, "arch": "resnet18", "dataset": "folder",
              "data_root": str(tiny_folder), "label_fraction": fraction}
    assert finetuning.locate(values)[0].epochs == epochs


# ----------------------------------------------------------------------------- smaller

def test_a_name_too_long_for_the_file_system_is_refused_before_anything(tiny_folder, tmp_path, capsys):
    results = tmp_path / "r"
    assert main.main(tiny_run_args(tiny_folder, results, "n" * 240)) == 2
    err = last_error(capsys)
    assert "shorter --name" in err and not results.exists()
    assert "model:" not in capsys.readouterr().out


def test_content_fingerprint_ignores_where_and_sees_what(tiny_folder, tmp_path):
    a = load_dataset("folder", str(tiny_folder), 16, log=lambda line: None).train
    b = load_dataset("folder", str(write_folder(tmp_path / "o", seed=3)), 16, log=lambda line: None).train
    assert data.content_fingerprint(a) == data.content_fingerprint(data.ImageSet(a.images.clone(), a.labels.clone()))
    assert data.content_fingerprint(a) != data.content_fingerprint(b)


def test_a_damaged_pickle_is_said_in_words(tmp_path):
    import zipfile
    from simclr.checkpoint import load_untrusted
    torch.save({"a": torch.zeros(2)}, tmp_path / "ok.pth")
    with zipfile.ZipFile(tmp_path / "ok.pth") as src, zipfile.ZipFile(tmp_path / "bad.pth", "w") as out:
        for info in src.infolist():  # the same archive with a pickle that pops from an empty stack
            out.writestr(info, b"\x80\x020." if info.filename.endswith("data.pkl") else src.read(info))
    with pytest.raises(UserError) as e:
        load_untrusted(str(tmp_path / "bad.pth"))
    assert "is damaged" in str(e.value) and "save or copy it again" in str(e.value)


def test_embed_projector_on_a_full_disk_leaves_no_half_sprite(trained, tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    import embed
    from simclr import tblog

    def half_then_full(self, features, metadata, header, images, tag):
        # the disk fills while the projector files are written: half a sprite is on disk, then ENOSPC
        folder = os.path.join(self.writer.log_dir, "00000", tag)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "sprite.png"), "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tblog.TBLog, "embedding", half_then_full)
    logdir = tmp_path / "tb"
    code = embed.main(["--model_path", str(trained / "run_model.pth"), "--method", "pca", "--device", "cpu",
                       "--tensorboard", "--tensorboard_dir", str(logdir), "--out", str(tmp_path / "m.png")])
    err = last_error(capsys)
    assert code == 2 and str(logdir) in err and "No space left on device" in err
    assert not list(tmp_path.rglob("sprite.png")) and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
