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
        "step ratio per_view/joint", "step --bn_stats per_view --view_passes 1",
        "step ratio view a pass/one pass, paired", "step --no-online_probe", "step --online_probe", "step ratio probe on/off",
        "== dense rates of", "conv3x3 16ch 8x8 b4 channels-last fp32", "matmul 64x64 bf16", "== where the time goes",
        "end to end (main.py's step)", "model forward+backward", "of which --bn_stats per_view over joint",
        "what is left", "pipeline around the model", "== profile of main.py's step", "convolution backward",
        "== main.py end to end", "train images/s (the CSV's)", "== targets")
SECTIONS = {"rates", "augmentation", "train_step", "bn_stats", "online_probe", "breakdown", "profile", "main"}


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
    assert {"device", "device_name", "threads", "targets", *SECTIONS} <= set(record)
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
    # on a CPU main.py runs per-view BatchNorm a view a pass: the section times it against one pass too
    assert bn["per_view_passes"] == 2
    assert positive(bn["per_view_one_pass_seconds_per_step"]) and positive(bn["view_a_pass_over_one_pass_paired"])

    probe = record["online_probe"]
    for key in ("off_seconds_per_step", "on_seconds_per_step", "ratio", "paired_ratio"):
        assert positive(probe[key]), (key, probe[key])
    assert probe["ratio"] == pytest.approx(probe["on_seconds_per_step"] / probe["off_seconds_per_step"])

    # the printed ratios are the record's
    assert f"{step['ratio']:.2f}x" in stdout and f"{aug['ratio']:.2f}x" in stdout and f"{bn['ratio']:.3f}x" in stdout
    assert f"{probe['paired_ratio']:.3f}x" in stdout
    assert len(record["targets"]) == 7 and all(t.endswith(("met", "NOT met")) for t in record["targets"])


def test_quick_run_rates_and_breakdown_are_consistent(quick_run):
    _, stdout, record = quick_run
    rows = record["rates"]["rows"]
    assert [(r["kernel"].split()[0], r["precision"]) for r in rows] == [
        ("conv3x3", "fp32"), ("matmul", "fp32"), ("conv3x3", "bf16"), ("matmul", "bf16")]
    for r in rows:
        assert r["bursts"] == 3 and positive(r["calls_per_burst"]) and r["datasheet_tflops"] is None
        assert r["best_gflops"] >= r["median_gflops"] > 0
    step = record["train_step"]
    assert set(step["rates"]) == set(QUICK_PRECISIONS)  # a burst of the conv rate in each timed precision
    for name, row in step["variants"].items():
        assert row["gflops"] == pytest.approx(step["step_gflop"] / row["seconds_per_step"]), name
        rate = step["rates"].get(row["precision"])
        assert row["percent_of_rate"] == (None if rate is None else pytest.approx(
            100 * row["gflops"] / rate["median_gflops"])), name

    bd = record["breakdown"]
    assert bd["arch"] == "resnet18" and bd["batch_size"] == 8 and bd["rounds"] == 2
    assert set(bd["parts"]) == set(benchmark.PARTS) | {"what is left"}
    # every round's parts and what is left add up to its end-to-end step; with two rounds each median is the mean
    assert sum(part["share"] for part in bd["parts"].values()) == pytest.approx(1.0)
    assert bd["reference"]["kernel"].startswith("conv3x3") and bd["reference"]["precision"] == DEFAULT[0]
    assert bd["end_to_end_gflops"] == pytest.approx(bd["step_gflop"] / bd["end_to_end_seconds"])
    assert bd["end_to_end_percent_of_rate"] == pytest.approx(
        100 * bd["end_to_end_gflops"] / bd["reference"]["median_gflops"])
    assert f"{100 * bd['pipeline_overhead']:.1f}%" in stdout


def test_quick_run_profile_and_main_py_are_consistent(quick_run):
    _, stdout, record = quick_run
    pr = record["profile"]
    assert pr["arch"] == "resnet18" and pr["batch_size"] == 8 and pr["steps"] == 2
    assert sum(k["share"] for k in pr["kinds"].values()) == pytest.approx(1.0)
    # a ResNet step's own time is mostly its convolutions, forward and backward, whatever the machine
    assert {"convolution forward", "convolution backward", "BatchNorm", "optimizer (Adam)"} <= set(pr["kinds"])
    shares = [o["share"] for o in pr["top_ops"]]
    assert shares == sorted(shares, reverse=True) and len(shares) == 10
    assert all(o["kind"] == benchmark.op_kind(o["op"]) for o in pr["top_ops"])

    m = record["main"]  # main.py itself, in a fresh process, on synthetic PNGs
    assert m["arch"] == "resnet18" and m["batch_size"] == 8 and m["data"] == "synthetic"
    assert positive(m["train_images_per_second"])
    macs = benchmark.count_macs(benchmark.default_model("resnet18"), 32)[1]
    # 2 views x (forward + backward: 3 forwards) x 2 FLOPs a MAC
    assert m["gflops"] == pytest.approx(2 * 3 * 2 * macs * m["train_images_per_second"] / 1e9)
    assert m["percent_of_rate"] == pytest.approx(100 * m["gflops"] / m["reference"]["median_gflops"])
    assert m["reference"]["bursts"] == 4  # two just before main.py and two just after
    assert f"{m['train_images_per_second']:,.2f}" in stdout


def test_op_kinds_of_profiler_names():
    kinds = {name: benchmark.op_kind(name) for name in (
        "aten::convolution_backward", "aten::mkldnn_convolution", "aten::native_batch_norm_backward", "aten::addmm",
        "aten::_foreach_addcdiv_", "aten::copy_", "aten::threshold_backward", "aten::randperm")}
    assert kinds == {"aten::convolution_backward": "convolution backward",
                     "aten::mkldnn_convolution": "convolution forward",
                     "aten::native_batch_norm_backward": "BatchNorm", "aten::addmm": "matmul (head, loss, probe)",
                     "aten::_foreach_addcdiv_": "optimizer (Adam)", "aten::copy_": "copies and layout",
                     "aten::threshold_backward": "element-wise", "aten::randperm": "other"}


def test_interleaved_times_rotates_the_order_and_times_every_step_after_warmup():
    calls = []
    runs = {name: (lambda i, name=name: calls.append((i, name))) for name in "abc"}
    times = benchmark.interleaved_times(runs, warmup=1, steps=4)
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    orders = ["".join(name for j, name in calls if j == i) for i in range(5)]
    assert orders == ["abc", "bca", "cab", "abc", "bca"]  # no variant always runs after the same one
    two = []
    benchmark.interleaved_times({n: (lambda i, n=n: two.append(n)) for n in "xy"}, warmup=0, steps=3)
    assert "".join(two) == "xyyxxy"  # with two variants: alternating


def test_rate_arithmetic_against_a_hand_computation():
    from simclr.engine import _conv_linear_macs
    from simclr.rates import conv_flops, datasheet_tflops, gflops, matmul_flops, percent, step_flops
    # ResNet-18's 555,753,984 MACs a 32x32 image at batch 256: 2 views x 3 forwards x 2 FLOPs = 12 x MACs x 256
    assert step_flops(555_753_984, 256) == 12 * 555_753_984 * 256 == 1_707_276_238_848
    # a 3x3 conv, 3 -> 3 channels, 4x4 outputs, batch 2: 2 x 3 x 16 outputs x (3 x 9) MACs each, 2 FLOPs a MAC;
    # the project's own MAC counter agrees
    assert conv_flops(2, 3, 4) == 2 * (2 * 3 * 16) * (3 * 9) == 5184
    conv = torch.nn.Conv2d(3, 3, 3, padding=1, bias=False)
    assert 2 * _conv_linear_macs(conv, torch.zeros(2, 3, 4, 4)) == conv_flops(2, 3, 4)
    assert matmul_flops(10) == 2000 and gflops(3e9, 0.5) == 6.0
    assert percent(50.0, 200.0) == 25.0 and percent(1.0, None) is None
    assert datasheet_tflops("NVIDIA H200", "bf16") == 989.0 and datasheet_tflops("NVIDIA H200", "fp16") == 989.0
    assert datasheet_tflops("NVIDIA H100 80GB HBM3", "tf32") == 494.5 and datasheet_tflops("Tesla T4", "bf16") is None


def test_breakdown_figures_against_a_hand_computation():
    # two rounds of hand-made seconds: the end-to-end step 10 s and 12 s, the model 8 s and 11 s
    times = {"end to end": [10.0, 12.0], "data movement": [0.1, 0.1], "augmentation": [0.4, 0.2],
             "model forward+backward": [8.0, 11.0], "loss": [0.2, 0.2], "optimizer step": [0.3, 0.3],
             "online probe": [0.0, 0.0], "model forward+backward, --bn_stats joint": [7.0, 10.0], "rate": [0.3, 0.3]}
    reference = {"kernel": "conv3x3 128ch 16x16 b256 channels-last", "precision": "bf16", "bursts": 2,
                 "calls_per_burst": 5, "best_gflops": 500.0, "median_gflops": 400.0}
    bd = benchmark.breakdown_figures(times, arch="resnet18", batch=100, image_size=32, precision="bf16",
                                     default_bn="per_view", other_bn="joint", macs=10 ** 9, reference=reference)
    assert bd["step_gflop"] == 12 * 100  # 12 x 1 GMAC x 100 images
    assert bd["end_to_end_seconds"] == 11.0 and bd["end_to_end_gflops"] == pytest.approx(1200 / 11)
    assert bd["model_gflops"] == pytest.approx(1200 / 9.5)
    assert bd["end_to_end_percent_of_rate"] == pytest.approx(100 * 1200 / 11 / 400)
    assert bd["end_to_end_percent_of_best_rate"] == pytest.approx(100 * 1200 / 11 / 500)
    left = bd["parts"]["what is left"]
    assert left["seconds"] == pytest.approx((1.0 + 0.2) / 2)  # 10 - 9.0 and 12 - 11.8
    assert left["share"] == pytest.approx((1.0 / 10 + 0.2 / 12) / 2)
    assert bd["parts"]["augmentation"]["share"] == pytest.approx((0.04 + 0.2 / 12) / 2)
    assert bd["pipeline_overhead"] == pytest.approx((10 / 8 + 12 / 11) / 2 - 1)
    assert bd["bn_stats"]["default_minus_other_seconds"] == 1.0 and bd["bn_stats"]["other_seconds"] == 8.5


def test_cpu_kind_names_the_vector_units():
    from simclr.rates import cpu_kind
    info = "model name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    assert cpu_kind(info, 2, {}) == "AMD EPYC 9R14, AVX512-BF16, 2 cores"
    assert cpu_kind("model name : Xeon\nflags : avx2 avx512f amx_bf16\n", 4, {}) == "Xeon, AMX, 4 cores"
    assert cpu_kind("model name : Core\nflags : sse4_2 avx2\n", 8, {}) == "Core, AVX2 only, 8 cores"
    capped = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "2"}
    assert (cpu_kind("model name : Xeon\nflags : avx2 amx_bf16\n", 2, capped)
            == "Xeon, AMX, 2 cores, ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2")


def test_sections_pick_what_runs_and_a_bad_one_is_one_line(capsys):
    cpu = torch.device("cpu")
    assert benchmark.chosen_sections("breakdown,rates", cpu) == ("rates", "breakdown")
    assert benchmark.chosen_sections(None, cpu) == tuple(s for s in benchmark.SECTIONS if s != "epochs")
    assert "epochs" in benchmark.chosen_sections(None, torch.device("cuda"))
    assert bench.main(["--sections", "rates,speed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sections" in err[0] and "speed" in err[0]


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
    assert row["mfu_datasheet_percent"] is None and row["mfu_measured_percent"] is None  # no datasheet, no rates given
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
