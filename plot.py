"""Compare runs: the loss and top-1 curves of several CSVs of one kind on one figure.

    python plot.py results/*_statistics.csv --out compare.png

The kind of each CSV is told by its columns (docs/files.md): main.py's statistics (kNN top-1),
linear.py's (a test_loss column: probe top-1) or finetune.py's (train_acc@1 without test_loss).
The first file's kind is drawn; files of another kind are skipped with a note, never drawn on
axes that name something else.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from simclr.starting import starting

with starting():  # Ctrl-C during these imports is one line too, not a traceback
    from simclr.cli import OneLineParser, UserError, first_line, run_cli
    from simclr.curves import epoch_axes, pyplot, save, series
    from simclr.names import run_name

REQUIRED = ("epoch", "train_loss", "test_acc@1", "test_acc@5")
# kind -> (what it is, its loss axis, its accuracy axis)
KINDS = {"pretraining": ("main.py statistics", "train loss", "kNN top-1 (%)"),
         "linear": ("linear.py probe", "train loss (cross-entropy)", "linear probe top-1 (%)"),
         "finetune": ("finetune.py", "train loss (cross-entropy)", "fine-tuned top-1 (%)")}


def kind_of(columns) -> str:
    """Which script wrote a CSV with these columns."""
    if "test_loss" in columns:
        return "linear"
    if "train_acc@1" in columns:
        return "finetune"
    return "pretraining"


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
    kind = kind_of(frame.columns)
    frame = frame.astype(object).where(frame.notna(), None)
    return [{**row, "kind": kind} for row in frame.to_dict("records")] or [{"kind": kind}]


def plot_compare(paths: Sequence[str], out: str) -> None:
    """Loss and kNN top-1 of several runs on one figure, a legend entry per run."""
    names = [run_name(p, ("_statistics.csv",)) for p in paths]
    # the same NAME from two results folders would give two identical legend entries
    names = [os.path.join(os.path.basename(os.path.dirname(os.path.abspath(p))), name) if names.count(name) > 1
             else name for p, name in zip(paths, names)]
    runs = [(name, read_statistics(p)) for p, name in zip(paths, names)]
    kind = runs[0][1][0]["kind"]
    for (name, rows), path in zip(runs, paths):
        if rows[0]["kind"] != kind:
            print(f"skipped {path}: a {KINDS[rows[0]['kind']][0]} CSV, not {KINDS[kind][0]} like {paths[0]}; "
                  f"plot each kind on its own", file=sys.stderr)
    runs = [(name, [r for r in rows if "epoch" in r]) for name, rows in runs if rows[0]["kind"] == kind]
    _, loss_label, acc_label = KINDS[kind]
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, rows in runs:
        line, = left.plot(*series(rows, "train_loss"), marker=".", label=name)  # a 1-epoch run is a dot
        right.plot(*series(rows, "test_acc@1"), marker=".", color=line.get_color(), label=name)
    left.set(xlabel="epoch", ylabel=loss_label)
    right.set(xlabel="epoch", ylabel=acc_label)
    epoch_axes(left, right)
    right.legend(fontsize="small")
    fig.suptitle(f"{len(runs)} run{'s' if len(runs) != 1 else ''} ({KINDS[kind][0]})")
    fig.tight_layout()
    save(fig, out)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_cli(lambda: compare(argv))


def compare(argv: list[str] | None) -> int:
    """Parse, read every CSV, write the figure."""
    parser = OneLineParser(description="Draw the curves of one or several runs on one figure.")
    parser.add_argument("csv", nargs="+", help="CSVs of one kind: NAME_statistics.csv of main.py, or of linear.py, "
                        "or of finetune.py (others are skipped with a note)")
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
