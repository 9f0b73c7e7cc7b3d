"""bench.py: the quick CPU run prints every row and a parseable JSON line; the epoch section runs on a CPU."""
import json
import os
import subprocess
import sys

import torch

import bench
from simclr.engine import bf16_peak_tflops, make_runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the project's default step is `project`; the other precision x memory-format pairs are variants
DEFAULT = (make_runtime("cpu").precision, "channels_last")
OTHERS = {f"project {p} {m}" for p in ("fp32", "bf16") for m in ("channels_last", "contiguous")} - {
    f"project {DEFAULT[0]} {DEFAULT[1]}"}
ROWS = ("aug tensor two_views, 1 thread(s)", "aug pil per image, 1 process(es)", "aug ratio tensor/pil, 1 thread(s)",
        "step naive", "step project ", *sorted(f"step {v}" for v in OTHERS), "step ratio project/naive",
        "step fastest project variant", "step --bn_stats joint", "step --bn_stats per_view",
        "step ratio per_view/joint", "== targets")


def test_quick_cpu_run_prints_every_row_and_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", "--quick", "--device", "cpu", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for row in ROWS:
        assert row in proc.stdout, row
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_JSON ")]
    assert len(lines) == 1
    record = json.loads(lines[0][len("BENCH_JSON "):])
    assert record == json.loads(out.read_text())
    assert {"device", "threads", "augmentation", "train_step", "targets"} <= set(record)
    assert {"tensor_views_per_s", "pil_views_per_s", "ratio"} <= set(record["augmentation"])
    step = record["train_step"]
    assert {"project_pairs_per_s", "naive_pairs_per_s", "ratio", "variants", "fastest_project_variant"} <= set(step)
    assert set(step["variants"]) == {"naive", "project", *OTHERS}
    assert step["variants"]["project"]["precision"] == DEFAULT[0]
    bn = record["bn_stats"]
    assert bn["joint_seconds_per_step"] > 0 and bn["ratio"] == bn["per_view_seconds_per_step"] / bn["joint_seconds_per_step"]


def test_import_does_nothing():
    proc = subprocess.run([sys.executable, "-c", "import bench"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""


def test_epoch_section_runs_on_cpu_with_tiny_sizes():
    # the CUDA-only section, exercised end to end on the CPU so that its code paths are tested without a GPU
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: extra OpenMP threads only add waiting on a loaded machine
    try:
        result = bench.epoch_section(torch.device("cpu"), ("resnet18",), (8,), n_train=16, n_test=8, warmup=1,
                                     steps=1, eval_batch=8)
    finally:
        torch.set_num_threads(before)
    (row,) = result["rows"]
    assert row["steps_per_epoch"] == 2 and row["epoch_seconds"] > 0 and row["tflops"] > 0
    assert 0 < row["data_share"] and row["knn_seconds"] > 0 and row["macs_per_image"] > 0
    bench.report_epochs(result)


def test_bf16_peak_table():
    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bf16_peak_tflops("Tesla T4") is None
