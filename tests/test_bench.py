"""bench.py: the quick CPU run's figures, its tables and JSON line; the epoch section runs on a CPU."""
import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import bench
from simclr import benchmark
from simclr.engine import bf16_peak_tflops, cpu_has_native_bf16, make_runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the project's default step is `project`; the other precision x memory-format pairs are variants (--quick
# leaves out bf16 on a CPU that only emulates it)
DEFAULT = (make_runtime("cpu").precision, "channels_last")
QUICK_PRECISIONS = ("fp32", "bf16") if cpu_has_native_bf16() else ("fp32",)
OTHERS = {f"project {p} {m}" for p in QUICK_PRECISIONS for m in ("channels_last", "contiguous")} - {
    f"project {DEFAULT[0]} {DEFAULT[1]}"}
ROWS = ("aug tensor two_views, 1 thread(s)", "aug pil per image, 1 process(es)", "aug ratio tensor/pil, 1 thread(s)",
        "step naive", "step project ", *sorted(f"step {v}" for v in OTHERS), "step ratio project/naive",
        "step fastest project variant", "step --bn_stats joint", "step --bn_stats per_view",
        "step ratio per_view/joint", "step --no-online_probe", "step --online_probe", "step ratio probe on/off",
        "== targets")


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """bench.main(--quick --device cpu --json FILE) in this process: (exit code, stdout, the JSON file's record)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    before = torch.get_num_threads()
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            code = bench.main(["--quick", "--device", "cpu", "--json", str(out)])
    finally:
        torch.set_num_threads(before)  # bench sets the thread count it measures with
    return code, stdout.getvalue(), json.loads(out.read_text()) if out.exists() else None


def test_quick_run_prints_every_row_and_the_json_line(quick_run):
    code, stdout, record = quick_run
    assert code == 0
    for row in ROWS:
        assert row in stdout, row
    lines = [line for line in stdout.splitlines() if line.startswith("BENCH_JSON ")]
    assert len(lines) == 1
    assert json.loads(lines[0][len("BENCH_JSON "):]) == record
    assert {"device", "threads", "augmentation", "train_step", "bn_stats", "online_probe", "targets"} <= set(record)
    assert record["device"] == "cpu" and record["threads"] == 1 and record["quick"] is True
    assert "epochs" not in record  # the CUDA-only section


def test_quick_run_figures_are_positive_and_consistent(quick_run):
    _, stdout, record = quick_run
    aug = record["augmentation"]
    for key in ("tensor_views_per_s", "pil_views_per_s", "ratio"):
        assert positive(aug[key]), (key, aug[key])
    assert aug["ratio"] == pytest.approx(aug["tensor_views_per_s"] / aug["pil_views_per_s"])
    assert aug["threads_1"]["ratio"] == aug["ratio"]  # one thread with --quick: the top row is that one

    step = record["train_step"]
    assert step["arch"] == "resnet18" and step["batch_size"] == 8 and step["image_size"] == 16
    assert set(step["variants"]) == {"naive", "project", *OTHERS}  # both kinds of step ran, every variant
    for name, row in step["variants"].items():
        assert {"precision", "channels_last", "seconds_per_step", "pairs_per_s"} <= set(row), name
        assert positive(row["seconds_per_step"]) and positive(row["pairs_per_s"]), name
        assert row["pairs_per_s"] == pytest.approx(8 / row["seconds_per_step"]), name
    assert step["variants"]["project"]["precision"] == DEFAULT[0]
    assert step["variants"]["project"]["channels_last"] is True and step["variants"]["naive"]["precision"] == "fp32"
    assert step["project_pairs_per_s"] == step["variants"]["project"]["pairs_per_s"]
    assert step["naive_pairs_per_s"] == step["variants"]["naive"]["pairs_per_s"]
    assert positive(step["ratio"])
    assert step["ratio"] == pytest.approx(step["project_pairs_per_s"] / step["naive_pairs_per_s"])
    assert step["fastest_project_variant"] in set(step["variants"]) - {"naive"}
    fastest = step["variants"][step["fastest_project_variant"]]["pairs_per_s"]
    assert fastest == max(r["pairs_per_s"] for n, r in step["variants"].items() if n != "naive")

    bn = record["bn_stats"]
    for key in ("joint_seconds_per_step", "per_view_seconds_per_step", "ratio", "paired_ratio"):
        assert positive(bn[key]), (key, bn[key])
    assert bn["ratio"] == pytest.approx(bn["per_view_seconds_per_step"] / bn["joint_seconds_per_step"])

    probe = record["online_probe"]
    for key in ("off_seconds_per_step", "on_seconds_per_step", "ratio", "paired_ratio"):
        assert positive(probe[key]), (key, probe[key])
    assert probe["ratio"] == pytest.approx(probe["on_seconds_per_step"] / probe["off_seconds_per_step"])

    # the printed ratios are the record's
    assert f"{step['ratio']:.2f}x" in stdout and f"{aug['ratio']:.2f}x" in stdout and f"{bn['ratio']:.3f}x" in stdout
    assert f"{probe['paired_ratio']:.3f}x" in stdout
    assert len(record["targets"]) == 4 and all(t.endswith(("met", "NOT met")) for t in record["targets"])


def test_help_and_a_refused_flag(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0 and "--quick" in capsys.readouterr().out
    assert bench.main(["--arch", "vgg"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--arch" in err[0]


def test_import_does_nothing():
    proc = subprocess.run([sys.executable, "-c", "import bench"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""


def test_epoch_section_runs_on_cpu_with_tiny_sizes():
    # the CUDA-only section, exercised end to end on the CPU so that its code paths are tested without a GPU
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: extra OpenMP threads only add waiting on a loaded machine
    try:
        result = benchmark.epoch_section(torch.device("cpu"), ("resnet18",), (8,), n_train=16, n_test=8, warmup=1,
                                         steps=1, eval_batch=8)
    finally:
        torch.set_num_threads(before)
    (row,) = result["rows"]
    assert row["steps_per_epoch"] == 2 and row["epoch_seconds"] > 0 and row["tflops"] > 0
    assert 0 < row["data_share"] and row["knn_seconds"] > 0 and row["macs_per_image"] > 0
    benchmark.report_epochs(result)


def test_epoch_archs_come_from_the_encoder_table():
    from simclr.encoders import ENCODERS
    assert benchmark.EPOCH_ARCHS == ("resnet18", "resnet50")
    assert set(benchmark.EPOCH_ARCHS) <= set(ENCODERS) and benchmark.STEP_ARCH in ENCODERS


def test_bf16_peak_table():
    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bf16_peak_tflops("Tesla T4") is None


def test_cpu_step_variants_are_every_precision_and_memory_format_but_the_default():
    import torch
    from simclr.benchmark import project_variants
    every = [v.name for v in project_variants(torch.device("cpu"))]
    assert every[0] == "project" and len(every) == 4 and len(set(every)) == 4
    assert set(every[1:]) == {f"project {p} {m}" for p in ("fp32", "bf16") for m in ("channels_last", "contiguous")} - {
        f"project {DEFAULT[0]} {DEFAULT[1]}"}
    fp32_only = [v.name for v in project_variants(torch.device("cpu"), ("fp32",))]
    assert fp32_only[0] == "project" and all("bf16" not in name for name in fp32_only) and len(fp32_only) >= 2
