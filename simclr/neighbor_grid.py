"""Nearest neighbours by encoder feature, neighbors.py's job: random test images, their k most
cosine-similar labeled training images, and the PNG grid that shows them.
"""
from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .checkpoint import run_base
from .cli import UserError, first_line
from .data import DataBundle
from .engine import Runtime
from .files import atomic_write_bytes
from .knn import encoder_features, nearest_neighbors
from .run_data import open_for_features
from .model import SimCLR

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
    indices: torch.Tensor       # (n, k) int64 indices into bundle.labeled, most similar first
    similarities: torch.Tensor  # (n, k) fp32 cosine similarities, descending along each row


# ----------------------------------------------------------------------------- search

def pick_queries(n_test: int, n: int, seed: int) -> torch.Tensor:
    """n distinct random test indices (n,), the same for the same seed."""
    return torch.randperm(n_test, generator=torch.Generator().manual_seed(seed))[:n]


def find_neighbors(model: SimCLR, bundle: DataBundle, n: int, k: int, seed: int, runtime: Runtime,
                   batch_size: int = 256, progress: Callable[[Iterable], Iterable] | None = None) -> Neighbors:
    """n random test images (chosen by seed) and their k nearest bank images by cosine of encoder features."""
    n_test, n_bank = len(bundle.test.labels), len(bundle.labeled.labels)
    if n <= 0 or k <= 0:
        raise UserError(f"--n and --k must be positive, got --n {n} --k {k}")
    if n > n_test:
        raise UserError(f"--n {n} is more than the {n_test} test images; use --n {n_test} or less")
    if k > n_bank:
        raise UserError(f"--k {k} is more than the {n_bank} labeled training images; use --k {n_bank} or less")
    queries = pick_queries(n_test, n, seed)
    query_features = encoder_features(model, images=bundle.test.images[queries], mean=bundle.mean, std=bundle.std,
                                      runtime=runtime, batch_size=batch_size)
    bank_features = encoder_features(model, images=bundle.labeled.images, mean=bundle.mean, std=bundle.std,
                                     runtime=runtime, batch_size=batch_size,
                                     progress=progress)
    indices, similarities = nearest_neighbors(query_features, bank_features, k)
    return Neighbors(queries, indices.cpu(), similarities.cpu())


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
    draw.text((MARGIN, 4), _fit(draw, text=title, font=title_font, width=width - 2 * MARGIN), fill="black",
              font=title_font)
    legend = "first column: test image; then nearest labeled training images, green = same class, red = other; " \
             "number = cosine similarity"
    draw.text((MARGIN, 22), _fit(draw, text=legend, font=font, width=width - 2 * MARGIN), fill=(90, 90, 90), font=font)

    def tile(image: torch.Tensor, x: int, y: int, colour: tuple, lines: tuple[str, str]) -> None:
        draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour)
        # nearest keeps 32-pixel images sharp when enlarged; the pixels are the stored uint8 ones
        pixels = Image.fromarray(image.numpy()).resize((side, side), Image.NEAREST)
        canvas.paste(pixels, (x + BORDER, y + BORDER))
        for i, line in enumerate(lines):
            draw.text((x, y + cell + 1 + 14 * i), _fit(draw, text=line, font=font, width=cell), fill="black", font=font)

    classes = bundle.classes
    for row in range(n):
        y = HEADER + row * (cell + LABEL + PAD)
        q = int(result.queries[row])
        q_label = int(bundle.test.labels[q])
        tile(bundle.test.images[q], x=MARGIN, y=y, colour=QUERY_COLOUR, lines=(classes[q_label], f"test #{q}"))
        for col in range(k):
            j = int(result.indices[row, col])
            label = int(bundle.labeled.labels[j])
            x = MARGIN + cell + GAP + col * (cell + PAD)
            colour = MATCH_COLOUR if label == q_label else MISMATCH_COLOUR
            tile(bundle.labeled.images[j], x=x, y=y, colour=colour,
                 lines=(classes[label], f"{float(result.similarities[row, col]):.3f}"))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def same_class_fraction(bundle: DataBundle, result: Neighbors) -> float:
    """Fraction of the n x k neighbours whose label equals their query's."""
    query_labels = bundle.test.labels[result.queries]                 # (n,)
    return (bundle.labeled.labels[result.indices] == query_labels[:, None]).float().mean().item()


# ----------------------------------------------------------------------------- the run

def run(args) -> int:
    """neighbors.py's parsed flags: load config, weights and data, find the neighbours, write the picture."""
    bundle, result, out = search(args)
    name = os.path.basename(run_base(args.model_path))
    title = f"{name}: {len(result.queries)} test images and their {args.k} nearest training images"
    try:
        atomic_write_bytes(out, draw_neighbors(bundle, result, title))
    except OSError as e:  # e.g. --out in a folder that cannot be written
        raise UserError(f"cannot write {out}: {first_line(e)}") from None
    print(f"wrote {out} ({100 * same_class_fraction(bundle, result):.1f}% of the neighbours share the query's class)")
    return 0


def search(args) -> tuple[DataBundle, Neighbors, str]:
    """Load config, weights and data, find the neighbours; returns (bundle, result, output path)."""
    from tqdm import tqdm
    log = lambda text: print(text, file=sys.stderr)  # noqa: E731 -- stdout only says what was written
    model, _, runtime, bundle = open_for_features(args.model_path, config=args.config, dataset=args.dataset,
                                                  data_root=args.data_root,
                                                  image_size=args.image_size, device=args.device,
                                                  threads=args.threads, log=log)
    bar = lambda it: tqdm(it, desc="features of the labeled training images", leave=False, file=sys.stderr)  # noqa: E731
    result = find_neighbors(model.to(runtime.device), bundle=bundle, n=args.n, k=args.k, seed=args.seed,
                            runtime=runtime,
                            batch_size=args.eval_batch_size, progress=bar)
    return bundle, result, args.out or run_base(args.model_path) + "_neighbors.png"
