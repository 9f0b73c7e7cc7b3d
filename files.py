"""Results files written whole or not at all: a temp file beside the target, fsync, then rename.

A run killed at any moment leaves the previous file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import uuid
from typing import Callable, Iterable, Sequence

import torch

def atomic_write(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write through `write` into a temp file beside `path`, fsync, then rename over `path`.

    Readers (and a run killed at any moment) see the old file or the new one, never half of one.
    The temp name is unique and opened with 'xb' rather than mkstemp, which would force mode 0600.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # on a read-only or full disk the cleanup fails too: report the first error
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Replace `path` with `data`, all or nothing."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str, text: str) -> None:
    """Replace `path` with `text` (UTF-8), all or nothing."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(obj, path: str) -> None:
    """torch.save to `path`, all or nothing."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_json(obj, path: str) -> None:
    """JSON-dump to `path`, all or nothing."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_csv(path: str, columns: Sequence[str], rows: Iterable[dict]) -> None:
    """Write rows (dicts keyed by column) as a CSV readable by pandas; NaN/None become empty cells."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row.get(c)) for c in columns])
    atomic_write_text(path, buf.getvalue())


def _csv_cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest string that round-trips exactly
    return str(value)
