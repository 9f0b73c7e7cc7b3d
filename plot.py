"""Compare runs: the loss and kNN top-1 curves of several NAME_statistics.csv files on one figure.

    python plot.py results/*_statistics.csv --out compare.png
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from simclr.cli import OneLineParser, UserError, first_line, run_cli
from simclr.curves import epoch_axes, pyplot, save, series
from simclr.names import run_name

REQUIRED = ("epoch", "train_loss", "test_acc@1", "test_acc@5")


def read_statistics(path: str) -> list[dict]:
    """Rows of a NAME_statistics.csv; a clear UserError when it is not one."""
    import pandas as pd
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as e:  # pandas raises many types for a file that is not a CSV; some have no message
        raise UserError(f"{path} is not a readable CSV ({first_line(e)[:120]})") from None
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise UserError(f"{path} lacks the columns {', '.join(missing)}: pass NAME_statistics.csv files of main.py")
    for column in REQUIRED:  # a number or an empty cell; text would be drawn as categories, silently wrong
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = frame[column].notna() & values.isna()
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise UserError(f"{path}: column {column} has a non-numeric value {frame[column].iloc[row]!r} "
                            f"(line {row + 2}); pass NAME_statistics.csv files of main.py")
        frame[column] = values
    frame = frame.astype(object).where(frame.notna(), None)
    return frame.to_dict("records")


def plot_compare(paths: Sequence[str], out: str) -> None:
    """Loss and kNN top-1 of several runs on one figure, a legend entry per run."""
    names = [run_name(p, ("_statistics.csv",)) for p in paths]
    # the same NAME from two results folders would give two identical legend entries
    names = [os.path.join(os.path.basename(os.path.dirname(os.path.abspath(p))), name) if names.count(name) > 1
             else name for p, name in zip(paths, names)]
    runs = [(name, read_statistics(p)) for p, name in zip(paths, names)]
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, rows in runs:
        line, = left.plot(*series(rows, "train_loss"), marker=".", label=name)  # a 1-epoch run is a dot
        right.plot(*series(rows, "test_acc@1"), marker=".", color=line.get_color(), label=name)
    left.set(xlabel="epoch", ylabel="train loss")
    right.set(xlabel="epoch", ylabel="kNN top-1 (%)")
    epoch_axes(left, right)
    right.legend(fontsize="small")
    fig.suptitle(f"{len(runs)} run{'s' if len(runs) != 1 else ''}")
    fig.tight_layout()
    save(fig, out)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_cli(lambda: compare(argv))


def compare(argv: list[str] | None) -> int:
    """Parse, read every CSV, write the figure."""
    parser = OneLineParser(description="Draw the curves of one or several runs on one figure.")
    parser.add_argument("csv", nargs="+", help="results/NAME_statistics.csv files of main.py")
    parser.add_argument("--out", default="compare.png", help="PNG to write (default: compare.png)")
    args = parser.parse_args(argv)
    try:
        plot_compare(args.csv, args.out)
    except OSError as e:  # --out in a folder that cannot be written, or a directory
        raise UserError(f"cannot write {args.out}: {e.strerror or first_line(e)}") from None
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
