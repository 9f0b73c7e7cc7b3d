"""scripts/gpu_check.sh --dry-run: the GPU check's whole sequence, on the CPU at tiny sizes, from an archive."""
import json
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import write_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the script runs $PYTHON: this test's own interpreter, also when its folder is not on PATH (a venv not activated)
ENV = {**os.environ, "PYTHON": sys.executable}


@pytest.mark.long
def test_dry_run_writes_all_the_evidence(tmp_path):
    folder = write_folder(tmp_path / "images", train_per_class=16, test_per_class=6, size=16)
    archive = tmp_path / "cifar10-jpg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # the layout of the real archive: train/<class>/*, test/<class>/*
        for split in ("train", "test"):
            tar.add(folder / split, arcname=split)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--data", str(archive), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stderr[-2000:] + log[-3000:]
    files = sorted(os.listdir(out))
    assert len(files) <= 8, files
    assert {"gpu_check.log", "bench.json", "summary.json", "run_statistics.csv", "run_curves.png",
            "run_linear_statistics.csv"} <= set(files), files
    summary = json.loads((out / "summary.json").read_text())
    assert not [key for key in summary if key.endswith("_error")], summary
    assert summary["card"] == "cpu" and summary["epochs"] == 2 and summary["precision"] in ("fp32", "bf16")
    # 3 classes that differ in colour and stripes: chance is 33%, the kNN and the probe must do far better
    assert 60 <= summary["knn_top1"] <= 100 and 60 <= summary["linear_top1"] <= 100, summary
    assert summary["seconds_per_epoch"] > 0 and summary["images_per_second"] > 0 and summary["knn_seconds"] > 0
    # augmentation, training step, BatchNorm statistics, online probe, the breakdown's two (pipeline, conv rate)
    assert len(summary["bench_targets"]) == 7
    bench = json.loads((out / "bench.json").read_text())
    assert bench["device"] == "cpu" and bench["quick"] is True and bench["targets"] == summary["bench_targets"]
    assert "BENCH_JSON" in log and "unpacked 54 images" in log  # at most 12 per class and split: 12 + 6, 3 classes
    assert "(main.py exit 0)" in log and "== the other BatchNorm mode" in log  # both runs of main.py ended well
    for name in ("supcon", "dclw", "v2head", "nnclr"):  # each variant of the family trained and was evaluated
        assert summary[f"family_{name}"]["epochs"] >= 1 and summary[f"family_{name}"]["knn_top1"] > 33, summary
    for command in ("-m pytest", "bench.py --device cpu --quick --arch tiny", "linear.py --model_path"):
        assert exit_codes(log, f"{sys.executable} {command}") == [0], command


def exit_codes(log: str, command: str) -> list[int]:
    """The exit codes gpu_check.log records after each `$ COMMAND ...` line that starts with `command`."""
    codes, lines = [], log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"$ {command}"):
            end = next(line for line in lines[i + 1:] if line.startswith("(exit "))
            codes.append(int(end[len("(exit "):-1]))
    return codes


def test_bad_arguments_exit_2(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--data", str(tmp_path / "none.tar.gz"), "--out",
                           str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 2 and "no such archive" in proc.stderr
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=ENV)
    assert proc.returncode == 2 and "usage" in proc.stderr
