"""Drawing training curves: one run's PNG (written by main.py and linear.py after each epoch), and the
figure helpers plot.py's comparisons use. Nothing here reads files; every PNG is written whole.
"""
from __future__ import annotations

import io
from typing import Sequence


def pyplot():
    """matplotlib with a file-only backend (no display needed), imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: str, file_format: str = "png") -> None:
    """Render (PNG, or another format matplotlib writes: pdf, svg) in memory, then replace `path` whole."""
    from .files import atomic_write_bytes  # here: files imports torch, and plot.py's --help does not wait for it
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=file_format, dpi=100)
    finally:
        pyplot().close(fig)  # pyplot keeps every open figure alive: one leak per epoch otherwise
    atomic_write_bytes(path, buf.getvalue())


def series(rows: Sequence[dict], key: str) -> tuple[list, list]:
    """(epochs, values) of the rows where `key` has a value."""
    pairs = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None and r[key] == r[key]]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def epoch_axes(*axes) -> None:
    """Grid, and whole-number epoch ticks (a 2-epoch run would otherwise show 1.2, 1.4, ...)."""
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_run(rows: Sequence[dict], path: str, title: str, loss_key: str = "train_loss",
             acc_keys: Sequence[str] = ("test_acc@1", "test_acc@5"), acc_label: str = "kNN accuracy (%)") -> None:
    """Two panels against epoch: the training loss, and the test accuracies (with main.py's online probe top-1
    where the rows have it); written atomically."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(*series(rows, loss_key), marker=".", label=loss_key.replace("_", " "))
    for extra in ("test_loss",):
        if any(r.get(extra) is not None for r in rows):
            left.plot(*series(rows, extra), marker=".", label=extra.replace("_", " "))
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.legend()
    for key in acc_keys:
        right.plot(*series(rows, key), marker=".", label=key.replace("_", " "))
    probe = series(rows, "probe_acc@1")
    if probe[0]:  # main.py's online probe, on the same test images, where the run has one
        right.plot(*probe, marker=".", linestyle="--", label="online probe top-1")
        acc_label = acc_label.replace("kNN accuracy", "kNN and online probe accuracy")
    right.set_xlabel("epoch")
    right.set_ylabel(acc_label)
    right.legend()
    epoch_axes(left, right)
    fig.suptitle(title)
    fig.tight_layout()
    save(fig, path)


def plot_run_or_warn(rows: Sequence[dict], path: str, title: str, warn, **kwargs) -> None:
    """plot_run, but a plotting failure is only reported through `warn`: never fatal to a long run."""
    try:
        plot_run(rows, path, title, **kwargs)
    except Exception as e:  # noqa: BLE001 - matplotlib trouble must not lose training or evaluation
        warn(f"warning: could not draw {path}: {e}")
