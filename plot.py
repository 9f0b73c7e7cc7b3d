"""Compare runs: the loss and top-1 curves of several CSVs of one kind on one figure.

    python plot.py results/*_statistics.csv --out compare.png

The kind of each CSV is told by its columns (docs/files.md): main.py's statistics (kNN top-1),
linear.py's (a test_loss column: probe top-1) or finetune.py's (train_acc@1 without test_loss).
One kind is drawn: main.py's when it is among them (the glob above also matches
NAME_linear_statistics.csv), else the first file's; the others are skipped with a note that says
how to draw them, never drawn on axes that name something else.
"""
from __future__ import annotations

import csv
import glob
import math
import os
import re
import shlex
import stat
import sys
from dataclasses import dataclass
from typing import Sequence

from simclr.starting import starting

with starting():  # Ctrl-C during these imports is one line too, not a traceback
    from simclr.cli import OneLineParser, UserError, first_line, run_cli
    from simclr.curves import epoch_axes, pyplot, save, series
    from simclr.names import ORIGINAL_COLUMNS as REQUIRED, run_name  # every kind of CSV has these

# kind -> (what it is, its loss axis, its accuracy axis)
KINDS = {"pretraining": ("main.py statistics", "train loss", "kNN top-1 (%)"),
         "linear": ("linear.py probe", "train loss (cross-entropy)", "linear probe top-1 (%)"),
         "finetune": ("finetune.py", "train loss (cross-entropy)", "fine-tuned top-1 (%)")}
FORMATS = (".png", ".pdf", ".svg")
# Every script computes in float32, so a larger finite number was not written by one; near the float64
# limit matplotlib's axis arithmetic overflows (a warning, then a traceback).
LIMIT = 3.4028234663852886e38
PASS = "pass NAME_statistics.csv files of main.py, linear.py or finetune.py"


@dataclass(frozen=True)
class Statistics:
    """One CSV: its kind, the rows that can be drawn, and the file lines of those that cannot."""
    path: str
    kind: str
    rows: list[dict]
    dropped: list[int]


def kind_of(columns) -> str:
    """Which script wrote a CSV with these columns."""
    if "test_loss" in columns:
        return "linear"
    if "train_acc@1" in columns:
        return "finetune"
    return "pretraining"


def check_input(path: str) -> None:
    """A regular file, refused before it is opened: a FIFO would block the read for ever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or first_line(e)}") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{path} is a directory: {PASS}, e.g. {os.path.join(path, '*_statistics.csv')}")
    if not stat.S_ISREG(mode):
        raise UserError(f"{path} is not a regular file (a FIFO, socket or device): {PASS}")


def check_out(out: str, inputs: Sequence[str]) -> None:
    """--out names a figure file that is none of the inputs: a run's CSV, weights or config are never replaced."""
    if os.path.isdir(out):
        raise UserError(f"cannot write {out}: it is a directory; name a figure file in it, "
                        f"e.g. --out {os.path.join(out, 'compare.png')}")
    if os.path.exists(out) and not stat.S_ISREG(os.stat(out).st_mode):
        raise UserError(f"cannot write {out}: it is not a regular file; name a new .png, .pdf or .svg file")
    for path in inputs:  # the real path: a symlink, ./ or ../ spelling of an input is the input
        if os.path.realpath(path) == os.path.realpath(out) or (os.path.exists(out) and os.path.samefile(path, out)):
            raise UserError(f"--out {out} is the input {path}: name another .png, .pdf or .svg file")
    if not out.lower().endswith(FORMATS):
        raise UserError(f"--out {out}: a figure is written, so it must end in .png, .pdf or .svg "
                        f"(never a run's .csv, .pth or .json)")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):  # missing folders are made when the figure is written
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"cannot write {out}: {parent} is a file, not a folder")


def number(cell: str, path: str, column: str, line: int) -> float | None:
    """A cell as a float, None when empty (an epoch without kNN); text is refused, never drawn as categories."""
    cell = cell.strip()
    if not cell:
        return None
    try:
        return float(cell)
    except ValueError:
        raise UserError(f"{path}: column {column} has a non-numeric value {cell!r} (line {line}); {PASS}") from None


def drawable(row: dict) -> bool:
    """An epoch to place it at, and every value finite and inside float32's range (see LIMIT)."""
    return row["epoch"] is not None and all(v is None or (math.isfinite(v) and abs(v) <= LIMIT) for v in row.values())


def read_statistics(path: str) -> Statistics:
    """The rows of a NAME_statistics.csv (of main.py, linear.py or finetune.py); a UserError when it is not one."""
    check_input(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            lines = [(reader.line_num, cells) for cells in reader if cells]
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or first_line(e)}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path} is not a readable CSV ({first_line(e)[:120]}); {PASS}") from None
    if not header:
        raise UserError(f"{path} is not a readable CSV: it is empty, not even a header; {PASS}")
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise UserError(f"{path} lacks the columns {', '.join(missing)}: {PASS}")
    where = {c: header.index(c) for c in REQUIRED}
    rows, dropped = [], []
    for line, cells in lines:
        if len(cells) > len(header):
            raise UserError(f"{path}: line {line} has {len(cells)} cells, the header {len(header)}; {PASS}")
        row = {c: number(cells[i], path=path, column=c, line=line) if i < len(cells) else None
               for c, i in where.items()}
        if drawable(row):
            rows.append(row)
        else:
            dropped.append(line)
    return Statistics(path=path, kind=kind_of(header), rows=rows, dropped=dropped)


def legend_labels(paths: Sequence[str]) -> list[str]:
    """Each run's NAME, after as many of its folders as tell it from every other run (the shortest such suffix)."""
    parts = [os.path.abspath(p).split(os.sep)[:-1] + [run_name(p, ("_statistics.csv",))] for p in paths]
    parts = [q[:-1] + [os.path.basename(p)] if parts.count(q) > 1 else q  # a.csv and a_statistics.csv: one NAME
             for p, q in zip(paths, parts)]
    labels = []
    for i, mine in enumerate(parts):
        others = parts[:i] + parts[i + 1:]
        depth = next((k for k in range(1, len(mine)) if all(q[-k:] != mine[-k:] for q in others)), len(mine))
        labels.append("/".join(mine[-depth:]))
    return labels


def command_for(paths: Sequence[str], out: str, kind: str) -> str:
    """The plot.py command that draws these CSVs: one glob when a shell-safe one matches exactly them."""
    base, ext = os.path.splitext(out)
    args = " ".join(shlex.quote(p) for p in paths)
    folder = {os.path.dirname(p) for p in paths}
    if len(paths) > 1 and len(folder) == 1:
        names = [os.path.basename(p) for p in paths]
        suffix = os.path.commonprefix([n[::-1] for n in names])[::-1]
        suffix = suffix[suffix.find("_"):] if "_" in suffix else suffix
        pattern = os.path.join(folder.pop(), "*" + suffix)
        exact = {os.path.realpath(p) for p in glob.glob(pattern)} == {os.path.realpath(p) for p in paths}
        if exact and re.fullmatch(r"[\w@%+=:,./-]*\*[\w@%+=:,./-]*", pattern):
            args = pattern
    return f"python plot.py {args} --out {shlex.quote(f'{base}_{kind}{ext}')}"


def skipped_note(skipped: dict[str, list[str]], kind: str, out: str) -> str:
    """One line: the CSVs of other kinds left out, and the commands that draw them."""
    what = []
    for other, paths in skipped.items():
        desc = KINDS[other][0]
        what.append(f"{paths[0]} (a {desc} CSV)" if len(paths) == 1 else f"{len(paths)} {desc} CSVs")
    them = "it" if sum(map(len, skipped.values())) == 1 else "them"
    commands = "; ".join(command_for(paths, out, other) for other, paths in skipped.items())
    return f"skipped {' and '.join(what)}: this figure draws {KINDS[kind][0]} CSVs; to draw {them}: {commands}"


def pick(tables: list[Statistics], out: str) -> list[Statistics]:
    """The CSVs of the kind to draw (main.py's when present), each left-out file or row said on stderr."""
    for table in tables:
        if table.dropped:
            lines = ", ".join(map(str, table.dropped[:5])) + (", ..." if len(table.dropped) > 5 else "")
            rest = "the other rows are drawn" if table.rows else "nothing of it to draw"
            s = "s" if len(table.dropped) != 1 else ""
            print(f"note: {table.path}: {len(table.dropped)} row{s} left out (line{s} {lines}): no epoch, or a NaN, "
                  f"infinite or huge (beyond 3.4e38) value; {rest}", file=sys.stderr)
        elif not table.rows:
            print(f"note: {table.path} has no rows yet (a run before its first epoch?): nothing of it to draw",
                  file=sys.stderr)
    with_rows = [t for t in tables if t.rows]
    if not with_rows:
        raise UserError(f"nothing to draw: no row of {', '.join(t.path for t in tables)} has an epoch and finite "
                        f"values; {PASS} with at least one epoch")
    kinds = [t.kind for t in with_rows]
    kind = "pretraining" if "pretraining" in kinds else kinds[0]
    skipped: dict[str, list[str]] = {}
    for table in with_rows:
        if table.kind != kind:
            skipped.setdefault(table.kind, []).append(table.path)
    if skipped:
        print(skipped_note(skipped, kind, out), file=sys.stderr)
    return [t for t in with_rows if t.kind == kind]


def draw(tables: Sequence[Statistics], labels: Sequence[str]):
    """Loss and top-1 of runs of one kind on one figure, a legend entry per run."""
    _, loss_label, acc_label = KINDS[tables[0].kind]
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    lines = []
    for table in tables:
        line, = left.plot(*series(table.rows, "train_loss"), marker=".")  # a 1-epoch run is a dot
        right.plot(*series(table.rows, "test_acc@1"), marker=".", color=line.get_color())
        lines.append(line)
    left.set(xlabel="epoch", ylabel=loss_label)
    right.set(xlabel="epoch", ylabel=acc_label)
    epoch_axes(left, right)
    # given explicitly, a NAME that starts with "_" is shown (matplotlib hides such labels); "$" is not math
    right.legend(lines, [label.replace("$", r"\$") for label in labels], fontsize="small")
    fig.suptitle(f"{len(tables)} run{'s' if len(tables) != 1 else ''} ({KINDS[tables[0].kind][0]})")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_cli(lambda: compare(argv))


def compare(argv: list[str] | None) -> int:
    """Parse, check --out and every CSV, read them, write the figure."""
    parser = OneLineParser(description="Draw the curves of one or several runs on one figure.")
    parser.add_argument("csv", nargs="+", help="CSVs of one kind: NAME_statistics.csv of main.py, or of linear.py, "
                        "or of finetune.py (main.py's are drawn when kinds are mixed, the others skipped with a note)")
    parser.add_argument("--out", default="compare.png", help="figure to write, .png, .pdf or .svg; never one of "
                        "the inputs (default: compare.png)")
    args = parser.parse_args(argv)
    paths = []
    for path in args.csv:
        check_input(path)
        again = [p for p in paths if os.path.samefile(p, path)]
        if again:
            print(f"note: {path} is {again[0]} again: drawn once", file=sys.stderr)
        else:
            paths.append(path)
    check_out(args.out, paths)
    tables = pick([read_statistics(p) for p in paths], args.out)
    fig = draw(tables, legend_labels([t.path for t in tables]))
    try:
        save(fig, args.out, args.out.rsplit(".", 1)[1].lower())
    except OSError as e:  # a folder that cannot be written
        raise UserError(f"cannot write {args.out}: {e.strerror or first_line(e)}") from None
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
