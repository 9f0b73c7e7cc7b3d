"""Nearest neighbours by encoder feature: random test images and their closest labeled training images.

    python neighbors.py --model_path results/NAME_model.pth [--n 8] [--k 8] [--device D] [--out FILE.png]

Writes a grid (default: NAME_neighbors.png beside the weights): one row per test image, the
query in the first column, then its k most cosine-similar images of the labeled training split
(the kNN bank), each bordered green when its class matches the query's and red when not.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from augment import normalize
from data import DataBundle, DataError, load_dataset
from model import SimCLR
from checkpoint import config_path_for, encoder_state, first_line, load_strict, read_run_config, run_base
from utils import OneLineParser, Runtime, UserError, atomic_write_bytes, extract_features, resolve_device

# Keys of NAME_config.json needed to rebuild the model and reload its data.
CONFIG_KEYS = ("arch", "stem", "feature_dim", "proj_hidden_dim", "dataset", "data_root", "image_size")

# Picture layout, in pixels.
TILE = 96          # images are upscaled (nearest) by a whole factor to at least this side
BORDER = 4         # coloured frame around each image
LABEL = 30         # two text lines under each tile
PAD = 6            # between neighbour columns and between rows
GAP = 18           # between the query column and its neighbours
MARGIN = 10
HEADER = 46        # two title lines and the space under them
QUERY_COLOUR = (40, 40, 40)
MATCH_COLOUR = (0, 170, 0)
MISMATCH_COLOUR = (220, 30, 30)


@dataclass(frozen=True)
class Neighbors:
    """The k nearest bank images of n test images."""
    queries: torch.Tensor       # (n,) int64 indices into bundle.test
    indices: torch.Tensor       # (n, k) int64 indices into bundle.memory, most similar first
    similarities: torch.Tensor  # (n, k) fp32 cosine similarities, descending along each row


# ----------------------------------------------------------------------------- search

def nearest_neighbors(query: torch.Tensor, bank: torch.Tensor, k: int,
                      chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k: query (n, d), bank (N, d) -> indices (n, k) int64, similarities (n, k) fp32, descending."""
    if not 0 < k <= bank.shape[0]:
        raise ValueError(f"k must be in 1..{bank.shape[0]} (the bank size), got {k}")
    bank = F.normalize(bank.float(), dim=1)
    indices, similarities = [], []
    # chunks bound the (chunk, N) similarity matrix for a large bank
    for start in range(0, query.shape[0], chunk_size):
        q = F.normalize(query[start:start + chunk_size].to(bank.device).float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        indices.append(idx)
        similarities.append(sim)
    if not indices:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
    return torch.cat(indices), torch.cat(similarities)


def pick_queries(n_test: int, n: int, seed: int) -> torch.Tensor:
    """n distinct random test indices (n,), the same for the same seed."""
    return torch.randperm(n_test, generator=torch.Generator().manual_seed(seed))[:n]


def encoder_features(model: SimCLR, images: torch.Tensor, bundle: DataBundle, runtime: Runtime,
                     batch_size: int = 256, progress: Callable[[Iterable], Iterable] | None = None) -> torch.Tensor:
    """Encoder features h of uint8 images (N, H, W, 3) -> fp32 (N, d), in eval mode."""
    model.eval()  # BatchNorm running statistics, as in the kNN evaluation
    to_input = lambda batch: normalize(batch, bundle.mean, bundle.std)  # noqa: E731
    return extract_features(model.encode, images, to_input, runtime, batch_size, progress)


def find_neighbors(model: SimCLR, bundle: DataBundle, n: int, k: int, seed: int, runtime: Runtime,
                   batch_size: int = 256, progress: Callable[[Iterable], Iterable] | None = None) -> Neighbors:
    """n random test images (chosen by seed) and their k nearest bank images by cosine of encoder features."""
    n_test, n_bank = len(bundle.test.labels), len(bundle.memory.labels)
    if n <= 0 or k <= 0:
        raise UserError(f"--n and --k must be positive, got --n {n} --k {k}")
    if n > n_test:
        raise UserError(f"--n {n} is more than the {n_test} test images; use --n {n_test} or less")
    if k > n_bank:
        raise UserError(f"--k {k} is more than the {n_bank} labeled training images; use --k {n_bank} or less")
    queries = pick_queries(n_test, n, seed)
    query_features = encoder_features(model, bundle.test.images[queries], bundle, runtime, batch_size)
    bank_features = encoder_features(model, bundle.memory.images, bundle, runtime, batch_size, progress)
    indices, similarities = nearest_neighbors(query_features, bank_features, k)
    return Neighbors(queries, indices.cpu(), similarities.cpu())


# ----------------------------------------------------------------------------- loading

def load_config(path: str) -> dict:
    """The flat NAME_config.json of a run; UserError when it is missing or lacks CONFIG_KEYS."""
    config = read_run_config(path)
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: pass the NAME_config.json written by main.py")
    return config


def load_model(model_path: str, config: dict) -> SimCLR:
    """SimCLR rebuilt from the config with the encoder of NAME_model.pth (or NAME_last.pth) loaded strictly."""
    state = encoder_state(model_path)
    try:
        model = SimCLR(config["arch"], int(config["feature_dim"]), int(config["proj_hidden_dim"]), config["stem"])
    except (ValueError, TypeError) as e:
        raise UserError(f"the config does not describe a model ({first_line(e)})") from None
    load_strict(model.f, state, model_path, f"{config['arch']} ({config['stem']} stem) encoder")
    return model.eval()


# ----------------------------------------------------------------------------- picture

def tile_side(image_size: int) -> int:
    """Displayed image side: image_size times the smallest whole factor reaching TILE."""
    return image_size * max(1, -(-TILE // image_size))


def grid_size(n: int, k: int, image_size: int) -> tuple[int, int]:
    """(width, height) in pixels of the picture of n rows and 1 + k columns."""
    cell = tile_side(image_size) + 2 * BORDER
    width = 2 * MARGIN + (1 + k) * cell + GAP + (k - 1) * PAD
    height = HEADER + n * (cell + LABEL) + (n - 1) * PAD + MARGIN
    return width, height


def _fit(draw, text: str, font, width: int) -> str:
    """text, shortened with '...' until it is at most `width` pixels wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def draw_neighbors(bundle: DataBundle, result: Neighbors, title: str) -> bytes:
    """PNG bytes of the grid: n rows x (query + k neighbours), sized by grid_size."""
    from PIL import Image, ImageDraw, ImageFont
    n, k = result.indices.shape
    side = tile_side(bundle.image_size)
    cell = side + 2 * BORDER
    width, height = grid_size(n, k, bundle.image_size)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    title_font = ImageFont.load_default(size=14)
    draw.text((MARGIN, 4), _fit(draw, title, title_font, width - 2 * MARGIN), fill="black", font=title_font)
    legend = "first column: test image; then nearest labeled training images, green = same class, red = other; " \
             "number = cosine similarity"
    draw.text((MARGIN, 22), _fit(draw, legend, font, width - 2 * MARGIN), fill=(90, 90, 90), font=font)

    def tile(image: torch.Tensor, x: int, y: int, colour: tuple, lines: tuple[str, str]) -> None:
        draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour)
        # nearest keeps 32-pixel images sharp when enlarged; the pixels are the stored uint8 ones
        pixels = Image.fromarray(image.numpy()).resize((side, side), Image.NEAREST)
        canvas.paste(pixels, (x + BORDER, y + BORDER))
        for i, line in enumerate(lines):
            draw.text((x, y + cell + 1 + 14 * i), _fit(draw, line, font, cell), fill="black", font=font)

    classes = bundle.classes
    for row in range(n):
        y = HEADER + row * (cell + LABEL + PAD)
        q = int(result.queries[row])
        q_label = int(bundle.test.labels[q])
        tile(bundle.test.images[q], MARGIN, y, QUERY_COLOUR, (classes[q_label], f"test #{q}"))
        for col in range(k):
            j = int(result.indices[row, col])
            label = int(bundle.memory.labels[j])
            x = MARGIN + cell + GAP + col * (cell + PAD)
            colour = MATCH_COLOUR if label == q_label else MISMATCH_COLOUR
            tile(bundle.memory.images[j], x, y, colour, (classes[label], f"{float(result.similarities[row, col]):.3f}"))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def same_class_fraction(bundle: DataBundle, result: Neighbors) -> float:
    """Fraction of the n x k neighbours whose label equals their query's."""
    query_labels = bundle.test.labels[result.queries]                 # (n,)
    return (bundle.memory.labels[result.indices] == query_labels[:, None]).float().mean().item()


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    """The flags of neighbors.py."""
    p = OneLineParser(description="Show test images and their nearest labeled training images by encoder feature.")
    p.add_argument("--model_path", required=True, help="results/NAME_model.pth written by main.py")
    p.add_argument("--config", default=None, help="the run's config (default: NAME_config.json beside the weights)")
    p.add_argument("--n", type=int, default=8, help="test images, one per row (default: 8)")
    p.add_argument("--k", type=int, default=8, help="neighbours per test image (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="chooses the random test images (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--out", default=None, help="PNG to write (default: NAME_neighbors.png beside the weights)")
    p.add_argument("--dataset", default=None, help="override the config's data set")
    p.add_argument("--data_root", default=None, help="override the config's data folder (e.g. run from elsewhere)")
    p.add_argument("--image_size", type=int, default=None, help="override the config's image side")
    p.add_argument("--batch_size", type=int, default=256, help="images per feature-extraction batch (default: 256)")
    return p


def run(args: argparse.Namespace) -> tuple[DataBundle, Neighbors, str]:
    """Load config, weights and data, find the neighbours; returns (bundle, result, output path)."""
    from tqdm import tqdm
    log = lambda text: print(text, file=sys.stderr)  # noqa: E731 -- stdout only says what was written
    if args.batch_size <= 0:
        raise UserError(f"--batch_size must be positive, got {args.batch_size}")
    if args.image_size is not None and args.image_size < 8:
        raise UserError(f"--image_size {args.image_size} is too small for a ResNet; use 8 or more")
    config = load_config(args.config or config_path_for(args.model_path))
    model = load_model(args.model_path, config)
    device, note = resolve_device(args.device)
    if note:
        log("note: no CUDA GPU found, computing features on the CPU")
    runtime = Runtime(device)  # fp32: similarities are compared to within rounding, not to bf16 noise
    bundle = load_dataset(args.dataset or config["dataset"], args.data_root or config["data_root"],
                          args.image_size or config["image_size"], cache_dir=config.get("cache_dir"), log=log)
    bar = lambda it: tqdm(it, desc="features of the labeled training images", leave=False, file=sys.stderr)  # noqa: E731
    result = find_neighbors(model.to(device), bundle, args.n, args.k, args.seed, runtime, args.batch_size, bar)
    return bundle, result, args.out or run_base(args.model_path) + "_neighbors.png"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        bundle, result, out = run(args)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = os.path.basename(run_base(args.model_path))
    title = f"{name}: {len(result.queries)} test images and their {args.k} nearest training images"
    try:
        atomic_write_bytes(out, draw_neighbors(bundle, result, title))
    except OSError as e:  # e.g. --out in a folder that cannot be written
        print(f"error: cannot write {out}: {first_line(e)}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({100 * same_class_fraction(bundle, result):.1f}% of the neighbours share the query's class)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
