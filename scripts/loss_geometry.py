"""Where a loss puts the class structure: kNN accuracy and class-mate similarity in h and in z, per run.

    python scripts/loss_geometry.py results/sweep_loss_cpu --data_root data/cifar-1500 [--k 200]

For every run folder below the sweep folder, the last epoch's weights (NAME_last.pth) and, for
reference, the same model at its initialisation (seed 0) are evaluated on the data set's test
images without augmentation (eval mode): the weighted kNN top-1 against the labeled training
images, once on the encoder features h (what main.py's kNN reads) and once on the projections z,
and the class gap: the mean cosine similarity of two test images of one class minus that of two
images of different classes. Prints one row per run, then the means per loss. A development
tool for docs/experiments/losses.md; reads only, writes nothing.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from simclr.augment import normalize  # noqa: E402
from simclr.checkpoint import model_from_config, open_run  # noqa: E402
from simclr.data import load_dataset  # noqa: E402
from simclr.engine import make_runtime  # noqa: E402
from simclr.knn import forward_in_batches, knn_accuracy  # noqa: E402


def embed(model, images: torch.Tensor, mean, std, runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, S, S, 3) -> L2-normalised h (N, d) and z (N, feature_dim), eval mode (knn.forward_in_batches)."""
    model.eval()
    both = forward_in_batches(lambda x: torch.cat(model(x), dim=1), images=images,
                              to_input=lambda b: normalize(b, mean, std),
                              runtime=runtime, batch_size=250)
    h, z = both.split([model.feature_width, both.shape[1] - model.feature_width], dim=1)
    return F.normalize(h, dim=1), F.normalize(z, dim=1)


def class_gap(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cosine of same-class pairs (distinct images) minus mean cosine of different-class pairs."""
    sims = features @ features.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool)
    return float(sims[same & off_diagonal].mean() - sims[~same].mean())


def measure(model, bundle, k: int, knn_temperature: float) -> dict:
    """kNN top-1 on h and z, class gap in h and z (fp32 on the CPU)."""
    runtime = make_runtime("cpu", "fp32", channels_last=False)
    bank_h, bank_z = embed(model, images=bundle.labeled.images, mean=bundle.mean, std=bundle.std, runtime=runtime)
    test_h, test_z = embed(model, images=bundle.test.images, mean=bundle.mean, std=bundle.std, runtime=runtime)
    row = {}
    for name, bank, test in (("h", bank_h, test_h), ("z", bank_z, test_z)):
        row[f"knn_{name}"] = knn_accuracy(test, test_labels=bundle.test.labels, bank_features=bank,
                                          bank_labels=bundle.labeled.labels,
                                          num_classes=len(bundle.classes), k=k, temperature=knn_temperature)[0]
        row[f"gap_{name}"] = class_gap(test, bundle.test.labels)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="a sweep.py output folder (one folder per run below it)")
    parser.add_argument("--data_root", required=True, help="the folder data set the runs trained on")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--knn_temperature", type=float, default=0.1)
    args = parser.parse_args()
    runs = sorted(glob.glob(os.path.join(args.sweep, "*", "*_last.pth")))
    if not runs:
        print(f"error: no */NAME_last.pth below {args.sweep}", file=sys.stderr)
        return 2
    bundle = load_dataset("folder", args.data_root, log=lambda line: None)
    rows = []
    with open(runs[0].replace("_last.pth", "_config.json")) as f:
        config = json.load(f)
    torch.manual_seed(0)
    rows.append({"run": "initialisation (seed 0)", "loss": "init",
                 **measure(model_from_config(config, "the run config"), bundle=bundle, k=args.k,
                             knn_temperature=args.knn_temperature)})
    for path in runs:
        model, saved = open_run(path, config_path=path.replace("_last.pth", "_config.json"))
        label = f"{saved.get('loss', 'ntxent')} t={saved['temperature']:g}"
        rows.append({"run": os.path.basename(os.path.dirname(path)), "loss": label,
                     **measure(model, bundle=bundle, k=args.k, knn_temperature=args.knn_temperature)})
    print(f"{'run':34s} {'kNN h':>7s} {'kNN z':>7s} {'gap h':>7s} {'gap z':>7s}")
    groups = defaultdict(list)
    for row in rows:
        groups[row["loss"]].append(row)
        print(f"{row['run']:34s} {row['knn_h']:7.1f} {row['knn_z']:7.1f} {row['gap_h']:7.4f} {row['gap_z']:7.4f}")
    print("\nmeans per loss")
    for loss, group in groups.items():
        mean = {key: sum(r[key] for r in group) / len(group) for key in ("knn_h", "knn_z", "gap_h", "gap_z")}
        print(f"{loss:34s} {mean['knn_h']:7.1f} {mean['knn_z']:7.1f} {mean['gap_h']:7.4f} {mean['gap_z']:7.4f}"
              f"  (n={len(group)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
