"""scripts/gpu_check.sh --dry-run: the GPU check's whole sequence, on the CPU at tiny sizes, from an archive."""
import json
import os
import subprocess
import tarfile

from conftest import write_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_writes_all_the_evidence(tmp_path):
    folder = write_folder(tmp_path / "images", train_per_class=16, test_per_class=6, size=16)
    archive = tmp_path / "cifar10-jpg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # the layout of the real archive: train/<class>/*, test/<class>/*
        for split in ("train", "test"):
            tar.add(folder / split, arcname=split)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--data", str(archive), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stderr[-2000:] + log[-3000:]
    files = sorted(os.listdir(out))
    assert len(files) <= 8, files
    assert {"gpu_check.log", "bench.json", "summary.json", "run_statistics.csv", "run_curves.png",
            "run_linear_statistics.csv"} <= set(files), files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["card"] == "cpu" and summary["epochs"] == 2
    assert 0 <= summary["knn_top1"] <= 100 and 0 <= summary["linear_top1"] <= 100
    assert summary["seconds_per_epoch"] > 0 and summary["images_per_second"] > 0
    assert "BENCH_JSON" in log and "unpacked 54 images" in log  # at most 12 per class and split: 12 + 6, 3 classes


def test_bad_arguments_exit_2(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--data", str(tmp_path / "none.tar.gz"), "--out",
                           str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no such archive" in proc.stderr
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
