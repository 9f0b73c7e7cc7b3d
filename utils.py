"""Shared pieces: user errors, seeding, the speed settings, kNN evaluation and atomic results files."""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import random
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


class UserError(Exception):
    """Something the user can fix (a flag, a file): printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (not usage + error) and exits 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ----------------------------------------------------------------------------- seeding

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (run seed, epoch, step, rank), well spread."""
    h = 0x6A09E667F3BCC909
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


# ----------------------------------------------------------------------------- speed settings

@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed: chosen once, used by training, kNN and linear eval."""
    device: torch.device
    precision: str = "fp32"      # bf16 | fp16 | fp32: autocast dtype for the network
    channels_last: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for network forward passes (a no-op in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Put a network input batch in the memory format the network runs in."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def resolve_device(name: str) -> tuple[torch.device, str | None]:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> device, plus a note to print (or None)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), None
        return torch.device("cpu"), "note: no CUDA GPU found, running on the CPU (slow: fine for tests and small runs)"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device, None


# ----------------------------------------------------------------------------- kNN evaluation

@torch.no_grad()
def knn_scores(test_features: torch.Tensor, bank_features: torch.Tensor, bank_labels: torch.Tensor,
               num_classes: int, k: int, temperature: float, chunk_size: int = 1024) -> torch.Tensor:
    """Weighted kNN class scores (InstDisc): (T, d), (N, d), (N,) -> (T, C).

    Features are L2-normalised here; each test feature's k most cosine-similar bank features
    vote for their labels with weight exp(similarity / temperature). Similarities are fp32.
    """
    bank = F.normalize(bank_features.float(), dim=1)
    labels = bank_labels.to(bank.device)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, test_features.shape[0], chunk_size):
        chunk = F.normalize(test_features[start:start + chunk_size].to(bank.device).float(), dim=1)
        sim = chunk @ bank.T                                     # (c, N)
        top_sim, top_idx = sim.topk(k, dim=1)                    # (c, k)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, labels[top_idx], weights)          # (c, C)
        scores.append(votes)
    if not scores:
        return torch.zeros(0, num_classes, device=bank.device)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[float]:
    """Percent of rows whose label is among the top-k scores, for each k (k capped at C)."""
    labels = labels.to(scores.device)
    if scores.shape[0] == 0:
        return [float("nan")] * len(ks)
    order = scores.argsort(dim=1, descending=True)
    hits = order == labels[:, None]                              # (T, C)
    return [hits[:, :min(k, scores.shape[1])].any(dim=1).float().mean().item() * 100 for k in ks]


def knn_accuracy(test_features: torch.Tensor, test_labels: torch.Tensor, bank_features: torch.Tensor,
                 bank_labels: torch.Tensor, num_classes: int, k: int, temperature: float,
                 chunk_size: int = 1024) -> tuple[float, float]:
    """Weighted kNN top-1 and top-5 accuracy in percent."""
    scores = knn_scores(test_features, bank_features, bank_labels, num_classes, k, temperature, chunk_size)
    top1, top5 = topk_accuracy(scores, test_labels, (1, 5))
    return top1, top5


@torch.no_grad()
def extract_features(encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                     to_input: Callable[[torch.Tensor], torch.Tensor], runtime: Runtime,
                     batch_size: int = 1024, progress: Callable[[Iterable], Iterable] | None = None) -> torch.Tensor:
    """Encoder features of uint8 images (N, H, W, 3) -> fp32 (N, d) on the runtime's device.

    `to_input` turns a uint8 batch already on the device into the network's float input.
    """
    starts = range(0, images.shape[0], batch_size)
    if progress is not None:
        starts = progress(starts)
    out = []
    for start in starts:
        batch = images[start:start + batch_size].to(runtime.device, non_blocking=True)
        with runtime.autocast():
            h = encode(runtime.prepare(to_input(batch)))
        out.append(h.float())
    return torch.cat(out) if out else torch.zeros(0, 0, device=runtime.device)


# ----------------------------------------------------------------------------- atomic files

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
        with contextlib.suppress(FileNotFoundError):
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
