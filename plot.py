"""Training curves: one run's PNG (written by main.py and linear.py) and several runs compared.

    python plot.py results/*_statistics.csv --out compare.png
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Sequence

from utils import UserError, atomic_write_bytes

REQUIRED = ("epoch", "train_loss", "test_acc@1", "test_acc@5")


def _pyplot():
    """matplotlib with a file-only backend (no display needed), imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> None:
    """Render to PNG in memory, then replace `path` whole."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100)
    finally:
        _pyplot().close(fig)  # pyplot keeps every open figure alive: one leak per epoch otherwise
    atomic_write_bytes(path, buf.getvalue())


def _series(rows: Sequence[dict], key: str) -> tuple[list, list]:
    """(epochs, values) of the rows where `key` has a value."""
    pairs = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None and r[key] == r[key]]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _epoch_axes(*axes) -> None:
    """Grid, and whole-number epoch ticks (a 2-epoch run would otherwise show 1.2, 1.4, ...)."""
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_run(rows: Sequence[dict], path: str, title: str, loss_key: str = "train_loss",
             acc_keys: Sequence[str] = ("test_acc@1", "test_acc@5"), acc_label: str = "kNN accuracy (%)") -> None:
    """Two panels against epoch: the training loss, and the test accuracies; written atomically."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(*_series(rows, loss_key), marker=".", label=loss_key.replace("_", " "))
    for extra in ("test_loss",):
        if any(r.get(extra) is not None for r in rows):
            left.plot(*_series(rows, extra), marker=".", label=extra.replace("_", " "))
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.legend()
    for key in acc_keys:
        right.plot(*_series(rows, key), marker=".", label=key.replace("_", " "))
    right.set_xlabel("epoch")
    right.set_ylabel(acc_label)
    right.legend()
    _epoch_axes(left, right)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_run_or_warn(rows: Sequence[dict], path: str, title: str, warn, **kwargs) -> None:
    """plot_run, but a plotting failure is only reported through `warn`: never fatal to a long run."""
    try:
        plot_run(rows, path, title, **kwargs)
    except Exception as e:  # noqa: BLE001 - matplotlib trouble must not lose training or evaluation
        warn(f"warning: could not draw {path}: {e}")


def read_statistics(path: str) -> list[dict]:
    """Rows of a NAME_statistics.csv; a clear UserError when it is not one."""
    import pandas as pd
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as e:  # pandas raises many types for a file that is not a CSV; some have no message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable CSV ({first[:120]})") from None
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise UserError(f"{path} lacks the columns {', '.join(missing)}: pass NAME_statistics.csv files of main.py")
    frame = frame.astype(object).where(frame.notna(), None)
    return frame.to_dict("records")


def run_name(path: str) -> str:
    """results/NAME_statistics.csv -> NAME."""
    base = os.path.basename(path)
    return base[: -len("_statistics.csv")] if base.endswith("_statistics.csv") else os.path.splitext(base)[0]


def plot_compare(paths: Sequence[str], out: str) -> None:
    """Loss and kNN top-1 of several runs on one figure, a legend entry per run."""
    names = [run_name(p) for p in paths]
    # the same NAME from two results folders would give two identical legend entries
    names = [os.path.join(os.path.basename(os.path.dirname(os.path.abspath(p))), name) if names.count(name) > 1
             else name for p, name in zip(paths, names)]
    runs = [(name, read_statistics(p)) for p, name in zip(paths, names)]
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, rows in runs:
        line, = left.plot(*_series(rows, "train_loss"), marker=".", label=name)  # a 1-epoch run is a dot
        right.plot(*_series(rows, "test_acc@1"), marker=".", color=line.get_color(), label=name)
    left.set(xlabel="epoch", ylabel="train loss")
    right.set(xlabel="epoch", ylabel="kNN top-1 (%)")
    _epoch_axes(left, right)
    right.legend(fontsize="small")
    fig.suptitle(f"{len(runs)} run{'s' if len(runs) != 1 else ''}")
    fig.tight_layout()
    _save(fig, out)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description="Draw the curves of one or several runs on one figure.")
    parser.add_argument("csv", nargs="+", help="results/NAME_statistics.csv files of main.py")
    parser.add_argument("--out", default="compare.png", help="PNG to write (default: compare.png)")
    args = parser.parse_args(argv)
    try:
        plot_compare(args.csv, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out in a folder that cannot be written, or a directory
        print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
