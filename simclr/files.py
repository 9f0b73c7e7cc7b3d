"""Results files written whole or not at all: a temp file beside the target, fsync, then rename.

A run killed at any moment leaves the previous file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import errno
import os
import re
import uuid
from typing import Callable, Iterable, Sequence


from .cli import UserError, is_write_failure

# `.TARGET.XXXXXXXX.tmp`: the temporary of an atomic write of TARGET (8 hex digits make it unique).
TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[0-9a-f]{8}\.tmp$")


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
    except BaseException as e:
        with contextlib.suppress(OSError):  # on a read-only or full disk the cleanup fails too: report the first error
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:  # name the file the user knows, not the temporary
            raise OSError(e.errno, e.strerror, path) from None
        if is_write_failure(e):  # torch.save's own writer reports a full disk as a RuntimeError
            raise OSError(errno.ENOSPC, "the write failed (no space left on device?)", path) from None
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Replace `path` with `data`, all or nothing."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str, text: str) -> None:
    """Replace `path` with `text` (UTF-8), all or nothing."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(obj, path: str) -> None:
    """torch.save to `path`, all or nothing (torch is imported here: plot.py writes files without it)."""
    import torch
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


def check_name_fits(directory: str, names: Iterable[str], flag: str = "--name") -> None:
    """Refuse, before anything is set up, file names whose temporaries (.NAME.XXXXXXXX.tmp) the file
    system of `directory` cannot hold (NAME_MAX, 255 bytes on most)."""
    probe = os.path.abspath(directory)
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        limit = os.pathconf(probe, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    longest = max(names, key=lambda n: len(os.fsencode(n)))
    if len(os.fsencode(f".{longest}.00000000.tmp")) > limit:
        raise UserError(f"{flag}: the file name {longest[:40]}... is longer than the {limit} bytes the file system "
                        f"of {directory} allows (with its temporary's 14 more); use a shorter {flag}")


def refuse_to_replace(paths: Iterable[str], owner: str, continue_hint: str = "") -> None:
    """Refuse a new run (or evaluation) whose files would replace those of an earlier one: one line naming the
    files, how to continue the earlier run (continue_hint, when it can be), another --name, or --overwrite."""
    found = [p for p in dict.fromkeys(paths) if os.path.lexists(p)]
    if not found:
        return
    more = f" ({len(found) - 1} more of its files beside it)" if len(found) > 1 else ""
    raise UserError(f"{found[0]} already holds {owner}{more}; {continue_hint}pass another --name to keep it, "
                    f"or --overwrite to replace it")


def remove_files(paths: Iterable[str]) -> list[str]:
    """Delete those of `paths` that exist (what --overwrite replaces); returns the removed ones."""
    removed = []
    for path in paths:
        if os.path.lexists(path) and not os.path.isdir(path):
            os.unlink(path)
            removed.append(path)
    return removed


class RunLock:
    """An exclusive lock on a run name in a results folder, held for the life of the run.

    flock(2) locks belong to the open file: the kernel releases them when the process ends in any
    way (kill -9 included), so a lock is never stale. The lock file also names the holder's PID.
    """

    def __init__(self, results_dir: str, name: str, files: Iterable[str] = ()):
        """files: the names of the files this run writes (its temporaries are the holder's to remove)."""
        self.path = os.path.join(results_dir, f".{name}.lock")
        self.results_dir, self.name, self.files = results_dir, name, frozenset(files)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunNameInUse; then remove the run's temporaries that a crash left."""
        import fcntl
        os.makedirs(self.results_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunNameInUse(self.name, self.results_dir, holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        self.remove_stale_temporaries()
        return self

    def remove_stale_temporaries(self) -> list[str]:
        """Delete the temporaries of atomic writes of this run's own files that a killed process left (only
        the lock holder may): an exact file name, so a run named NAME_b, or NAME's linear.py or
        finetune.py outputs, keep theirs."""
        removed = []
        for entry in os.scandir(self.results_dir):
            match = TEMPORARY.match(entry.name)
            if match and match["target"] in self.files:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
        return removed

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class RunNameInUse(UserError):
    """Another live process holds the lock of this run name."""

    def __init__(self, name: str, results_dir: str, pid: str):
        super().__init__(f"run name {name} in {results_dir} is in use by process {pid}; wait for it to finish, "
                         f"or pass another --name or --results_dir")


def existing(paths: Iterable[str]) -> str:
    """The paths among `paths` that exist, comma-separated (a closing line names only real files)."""
    return ", ".join(p for p in paths if os.path.exists(p)) or "none"
