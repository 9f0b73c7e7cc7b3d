#!/usr/bin/env bash
# One prepared check of the CUDA path, for a GPU machine with a preinstalled PyTorch and no package
# index. Installs nothing from the internet; writes every piece of evidence into --out (8 files at most):
#   gpu_check.log   every command's output, in order
#   bench.json      python bench.py --device cuda (matmul rates, the step's breakdown and profile, main.py end to
#                   end against the rate, epoch times, TFLOP/s and MFU of resnet18 and resnet50 at batch 512 and
#                   1024 with the data pipeline's share, memory, kNN)
#   run_statistics.csv, run_curves.png     the real run (ResNet-18 on the real CIFAR-10 images)
#   run_linear_statistics.csv              linear.py on the run's best weights
#   compare_statistics.csv                 the same minutes with the other --bn_stats mode (if it exists)
#   summary.json    card, torch, s/epoch, images/s, TFLOP/s, % of bf16 peak, bench's MFU rows and breakdown,
#                   peak memory, kNN and linear top-1,
#                   and the kNN top-1 of a short run of --loss supcon, --loss dcl --dcl_sigma 0.5, --proj_layers 3,
#                   --method nnclr
#
#   scripts/gpu_check.sh --data cifar10-jpg.tar.gz --wheels DIR --out DIR          # on the GPU (< 9 min on an H100)
#   scripts/gpu_check.sh --dry-run --data ARCHIVE --out DIR                        # the same sequence, CPU, tiny
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: scripts/gpu_check.sh --data ARCHIVE --out DIR [--wheels DIR] [--dry-run]" >&2; exit 2; }
DATA="" OUT="" WHEELS="" DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA="${2:-}"; shift 2 ;;
    --out) OUT="${2:-}"; shift 2 ;;
    --wheels) WHEELS="${2:-}"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) usage ;;
  esac
done
[ -n "$DATA" ] && [ -n "$OUT" ] || usage
[ -f "$DATA" ] || { echo "error: --data $DATA: no such archive (the CIFAR-10 JPEG tar.gz)" >&2; exit 2; }
mkdir -p "$OUT" || { echo "error: cannot create --out $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT/gpu_check.log"
: > "$LOG"
PY="${PYTHON:-python3}"  # the interpreter that has torch: $PYTHON, else python3 from PATH
export PYTHONUNBUFFERED=1
step() { echo "== $*" | tee -a "$LOG"; }
run() { echo "\$ $*" >> "$LOG"; "$@" >> "$LOG" 2>&1; local code=$?; echo "(exit $code)" >> "$LOG"; return $code; }

# ---------------------------------------------------------------- environment
step "environment"
if ! "$PY" -c "import thop" 2>/dev/null; then
  if [ -n "$WHEELS" ] && ls "$WHEELS"/thop-*.whl >/dev/null 2>&1; then
    run "$PY" -m pip install --no-index --no-deps --target "$WORK/pydeps" "$WHEELS"/thop-*.whl
    export PYTHONPATH="$WORK/pydeps${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "thop is not installed and no wheel was given: MACs are counted without it" | tee -a "$LOG"
  fi
fi
run "$PY" -c "import torch, torchvision, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
command -v nvidia-smi >/dev/null && run nvidia-smi
if [ $DRY = 1 ]; then DEVICE=cpu; else DEVICE=cuda; fi
if [ $DRY = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: PyTorch sees no CUDA GPU here; use --dry-run on a machine without one" | tee -a "$LOG" >&2; exit 2
fi

# ---------------------------------------------------------------- data: the real images (a slice when dry)
step "data"
if [ $DRY = 1 ]; then PER_CLASS=12; else PER_CLASS=0; fi
run "$PY" - "$DATA" "$WORK/cifar" "$PER_CLASS" <<'EOF' || { echo "error: cannot unpack $DATA" | tee -a "$LOG" >&2; exit 2; }
import sys, tarfile, os, collections
archive, dest, per_class = sys.argv[1], sys.argv[2], int(sys.argv[3])
kept = collections.Counter()
with tarfile.open(archive) as tar:
    members = []
    for m in tar:
        parts = m.name.strip("./").split("/")
        if not m.isfile() or len(parts) < 3 or parts[-3] not in ("train", "test"):
            continue
        key = tuple(parts[-3:-1])
        if per_class and kept[key] >= per_class:
            continue
        kept[key] += 1
        m.name = "/".join(parts[-3:])
        members.append(m)
    tar.extractall(dest, members=members, filter="data")
print("unpacked", sum(kept.values()), "images into", dest)
EOF

# ---------------------------------------------------------------- tests
step "tests"
if [ $DRY = 1 ]; then
  run "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py  # skipped without CUDA: the step itself runs
else
  run "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
  run "$PY" -m pytest -q -p no:cacheprovider -x tests --deselect tests/test_gpu_check.py
fi

# ---------------------------------------------------------------- benchmark
step "bench"
if [ $DRY = 1 ]; then
  run "$PY" bench.py --device cpu --quick --arch tiny --json "$OUT/bench.json"
else
  run "$PY" bench.py --device cuda --json "$OUT/bench.json"
fi

# ---------------------------------------------------------------- the real run, then the linear probe
step "real run"
COMMON=(--dataset folder --data_root "$WORK/cifar" --device "$DEVICE" --results_dir "$WORK/results")
if [ $DRY = 1 ]; then  # the sequence, not the network: the encoder table's tiny CNN
  RUN=("${COMMON[@]}" --arch tiny --image_size 16 --batch_size 16 --epochs 2 --knn_every 1 --k 10 --feature_dim 16
       --proj_hidden_dim 32 --workers 0)
  BUDGET=120; LINEAR=(--epochs 2); SHORT=(--epochs 1)  # the comparison and family runs: one epoch is enough
else
  RUN=("${COMMON[@]}" --arch resnet18 --batch_size 512 --epochs 1000 --knn_every 10)
  BUDGET=200; LINEAR=(--epochs 100); SHORT=()
fi
# as many epochs as fit the budget: SIGINT then stops after the step, with the files whole (exit 130)
timeout -s INT "$BUDGET" "$PY" main.py "${RUN[@]}" --name run >> "$LOG" 2>&1
echo "(main.py exit $?)" >> "$LOG"
run "$PY" linear.py --model_path "$WORK/results/run_model.pth" --device "$DEVICE" "${LINEAR[@]}"
if "$PY" main.py --help | grep -q -- "--bn_stats"; then
  OTHER=$("$PY" - <<'EOF'
from simclr.flags import TRAIN_DEFAULTS
print("joint" if TRAIN_DEFAULTS.get("bn_stats") == "per_view" else "per_view")
EOF
)
  step "the other BatchNorm mode ($OTHER), same minutes"
  timeout -s INT "$BUDGET" "$PY" main.py "${RUN[@]}" "${SHORT[@]}" --bn_stats "$OTHER" --name compare >> "$LOG" 2>&1
  echo "(main.py exit $?)" >> "$LOG"
  cp "$WORK/results/compare_statistics.csv" "$OUT/" 2>/dev/null
fi
# the SimCLR family, a short run each: supervised contrastive, DCLW, SimCLRv2's 3-layer head, and NNCLR (--method nnclr)
if [ $DRY = 1 ]; then FAMILY_BUDGET=60; else FAMILY_BUDGET=45; fi
for variant in "supcon:--loss supcon" "dclw:--loss dcl --dcl_sigma 0.5" "v2head:--proj_layers 3" "nnclr:--method nnclr"; do
  name=${variant%%:*}; read -r -a flags <<< "${variant#*:}"
  step "family: $name (${flags[*]}), $FAMILY_BUDGET s"
  timeout -s INT "$FAMILY_BUDGET" "$PY" main.py "${RUN[@]}" "${SHORT[@]}" "${flags[@]}" --name "family_$name" >> "$LOG" 2>&1
  echo "(main.py exit $?)" >> "$LOG"
done
for f in run_statistics.csv run_curves.png run_linear_statistics.csv; do
  cp "$WORK/results/$f" "$OUT/" 2>/dev/null || echo "missing: $f" | tee -a "$LOG"
done

# ---------------------------------------------------------------- summary
step "summary"
run "$PY" - "$OUT" "$WORK/results" <<'EOF'
import json, os, sys
import pandas as pd
out, results = sys.argv[1], sys.argv[2]
summary = {}
try:
    bench = json.load(open(os.path.join(out, "bench.json")))
    summary["bench_targets"] = bench.get("targets")
    summary["bench_epochs"] = bench.get("epochs", {}).get("rows")
    # MFU per arch and batch (against the datasheet and the matmul rate bench measured) beside the data share
    summary["bench_mfu"] = [{k: r.get(k) for k in ("arch", "batch_size", "precision", "tflops", "mfu_datasheet_percent",
                                                    "mfu_measured_percent", "data_share")}
                            for r in summary["bench_epochs"] or []]
    summary["bench_rates"] = [{k: r.get(k) for k in ("kernel", "precision", "best_gflops", "datasheet_tflops")}
                              for r in bench.get("rates", {}).get("rows", [])]
    breakdown = bench.get("breakdown") or {}
    summary["bench_breakdown"] = {k: breakdown.get(k) for k in ("arch", "batch_size", "end_to_end_percent_of_rate",
                                                                 "model_percent_of_rate", "pipeline_overhead")}
    summary["bench_breakdown"]["shares"] = {k: v["share"] for k, v in breakdown.get("parts", {}).items()}
except (OSError, ValueError) as e:
    summary["bench_error"] = str(e)
try:
    config = json.load(open(os.path.join(results, "run_config.json")))
    frame = pd.read_csv(os.path.join(results, "run_statistics.csv"))
    import torch
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    from simclr.engine import bf16_peak_tflops
    peak = bf16_peak_tflops(name) if name != "cpu" else None
    trained = frame[frame["epoch"] > 0]
    seconds = float(trained["epoch_seconds"].median())
    images = float(trained["train_images_per_second"].median())
    macs = config.get("macs_per_image")
    tflops = 3 * 2 * macs * 2 * images / 1e12 if macs else None  # forward+backward ~ 3 forwards, 2 views
    summary.update(card=name, torch=torch.__version__, precision=config["precision"], epochs=int(trained["epoch"].max()),
                   seconds_per_epoch=seconds, images_per_second=images, tflops=tflops,
                   percent_of_bf16_peak=100 * tflops / peak if tflops and peak else None,
                   knn_top1=float(frame["test_acc@1"].max()), knn_seconds=float(trained["knn_seconds"].dropna().median()))
    if torch.cuda.is_available():
        summary["peak_memory_gib_bench"] = max((r.get("peak_memory_gib") or 0) for r in summary.get("bench_epochs") or [{}])
except Exception as e:  # noqa: BLE001 - a summary of what is there, whatever failed before
    summary["run_error"] = f"{type(e).__name__}: {e}"
try:
    linear = pd.read_csv(os.path.join(results, "run_linear_statistics.csv"))
    summary["linear_top1"] = float(linear["test_acc@1"].iloc[-1])
except Exception as e:  # noqa: BLE001
    summary["linear_error"] = f"{type(e).__name__}: {e}"
try:
    other = pd.read_csv(os.path.join(results, "compare_statistics.csv"))
    summary["other_bn_stats_knn_top1"] = float(other["test_acc@1"].max())
    summary["other_bn_stats_epochs"] = int(other["epoch"].max())
except Exception:  # noqa: BLE001 - only when the flag exists
    pass
for name in ("supcon", "dclw", "v2head", "nnclr"):
    try:
        family = pd.read_csv(os.path.join(results, f"family_{name}_statistics.csv"))
        summary[f"family_{name}"] = {"epochs": int(family["epoch"].max()),
                                     "knn_top1": float(family["test_acc@1"].max())}
    except Exception as e:  # noqa: BLE001 - one variant failing must not hide the others
        summary[f"family_{name}_error"] = f"{type(e).__name__}: {e}"
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2, default=str)
print(json.dumps(summary, indent=2, default=str))
EOF
step "done: $(ls "$OUT" | tr '\n' ' ')"
[ -f "$OUT/summary.json" ] && ! grep -q '"run_error"' "$OUT/summary.json"
