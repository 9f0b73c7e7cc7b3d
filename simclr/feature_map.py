"""A map of what the encoder has learned, embed.py's job: encoder features of test images drawn in two
dimensions (t-SNE or PCA), the PNG and CSV of the map, and TensorBoard's projector files.
"""
from __future__ import annotations

import io
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from .checkpoint import run_base
from .cli import UserError, first_line, os_error_advice
from .engine import usable_cores
from .files import atomic_write_bytes, atomic_write_csv
from .flags import MIN_POINTS, THUMBNAILS
from .knn import encoder_features
from .run_data import open_for_features
from .tblog import open_log, require_tensorboard

AGREEMENT_K = 10          # neighbours for the printed class-agreement figure
THUMBNAIL_GAP = 0.045     # smallest distance between two thumbnails, as a fraction of the map's side
THUMBNAIL_PX = 24         # displayed thumbnail side in pixels
SPRITE_MAX = 8192         # TensorBoard's projector refuses sprite images larger than 8192 x 8192
CSV_COLUMNS = ("index", "label", "class", "x", "y")


# ----------------------------------------------------------------------------- which test images

def balanced_sample(labels: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    """n indices (n,) into labels (N,), sorted: as many per class as possible, the same for the same seed.

    Every class gives its share in turn (a seeded random image of each class, then a second, ...),
    so the counts differ by at most one among classes that still have images; the classes that
    get one more when n does not divide are also chosen by the seed. None or n >= N: all of them.
    """
    total = labels.shape[0]
    if n is None or n >= total:
        return torch.arange(total)
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(total, generator=generator)                 # random order inside each class
    shuffled = labels[perm]
    order = torch.argsort(shuffled, stable=True)                       # grouped by class, perm order kept
    grouped = shuffled[order]
    classes, counts = torch.unique_consecutive(grouped, return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank = torch.arange(total) - starts                                # position inside its class
    priority = torch.randperm(len(classes), generator=generator)       # who goes first in each round
    slot = torch.repeat_interleave(priority, counts)
    chosen = order[torch.argsort(rank * len(classes) + slot)[:n]]
    return perm[chosen].sort().values


# ----------------------------------------------------------------------------- two dimensions

def pca_2d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (n, d) -> (coordinates (n, 2) on the first two principal axes, their share of the variance (2,)).

    Exact SVD of the centred features; each axis's sign is fixed (its largest coordinate is
    positive) so that the same features always give the same picture.
    """
    centred = x.double() - x.double().mean(dim=0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)         # vh: (min(n, d), d)
    coords = centred @ vh[:2].T                                        # (n, 2)
    flip = torch.sign(coords.gather(0, coords.abs().argmax(dim=0, keepdim=True)))
    coords = coords * torch.where(flip == 0, torch.ones_like(flip), flip)
    variance = s ** 2
    return coords.float(), (variance[:2] / variance.sum().clamp_min(1e-30)).float()


def tsne_2d(x: torch.Tensor, perplexity: float, seed: int, threads: int) -> torch.Tensor:
    """Features (n, d) -> t-SNE coordinates (n, 2) with openTSNE (FFT-accelerated, PCA initialisation)."""
    from openTSNE import TSNE
    import numpy as np
    embedding = TSNE(perplexity=perplexity, n_jobs=threads, random_state=seed % 2 ** 32).fit(x.double().numpy())
    return torch.from_numpy(np.asarray(embedding)).float()


def require_tsne() -> None:
    """A one-line UserError when the t-SNE library is missing (checked before the slow feature pass)."""
    try:
        import openTSNE  # noqa: F401
    except ImportError:
        raise UserError("--method tsne needs openTSNE: pip install openTSNE (or use --method pca)") from None


def usable_perplexity(perplexity: float, n: int) -> float:
    """t-SNE's perplexity must stay below (n - 1) / 3 (its 3 x perplexity neighbours must exist)."""
    return min(perplexity, (n - 1) / 3)


def class_agreement(points: torch.Tensor, labels: torch.Tensor, k: int = AGREEMENT_K, chunk: int = 1024) -> float:
    """Percent of each point's k nearest other points (Euclidean) with the same label: points (n, m), labels (n,)."""
    n = points.shape[0]
    k = min(k, n - 1)
    points, hits = points.float(), 0
    for start in range(0, n, chunk):
        dist = torch.cdist(points[start:start + chunk], points)                  # (c, n)
        rows = torch.arange(dist.shape[0])
        dist[rows, rows + start] = math.inf                                      # not itself
        nearest = dist.topk(k, dim=1, largest=False).indices                     # (c, k)
        hits += (labels[nearest] == labels[start:start + chunk, None]).sum().item()
    return 100.0 * hits / (n * k)


# ----------------------------------------------------------------------------- picture

def class_colours(num_classes: int) -> list:
    """One colour per class: matplotlib's qualitative tab10 / tab20, a spread of turbo beyond 20 classes."""
    from .curves import pyplot
    plt = pyplot()
    if num_classes <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(num_classes)]
    if num_classes <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(num_classes)]
    return [plt.get_cmap("turbo")(i / max(1, num_classes - 1)) for i in range(num_classes)]


def spread_sample(coords: torch.Tensor, count: int, gap: float, seed: int) -> list[int]:
    """Up to `count` row indices of coords (n, 2), seeded, no two closer than `gap` x the map's side."""
    span = (coords.max(dim=0).values - coords.min(dim=0).values).clamp_min(1e-12)
    unit = (coords - coords.min(dim=0).values) / span                            # (n, 2) in [0, 1]
    kept: list[int] = []
    for i in torch.randperm(coords.shape[0], generator=torch.Generator().manual_seed(seed)).tolist():
        if not kept or torch.cdist(unit[i:i + 1], unit[kept]).min() >= gap:
            kept.append(i)
            if len(kept) == count:
                break
    return kept


def draw_map(coords: torch.Tensor, labels: torch.Tensor, classes: list[str], title: str,
             axis_names: tuple[str, str], thumbnails: list[tuple[int, torch.Tensor]] = ()) -> bytes:
    """PNG bytes of the map: coords (n, 2) as points coloured by labels (n,), a legend of the classes,
    and optional (row, uint8 image (H, W, 3)) thumbnails framed in their class colour."""
    from .curves import pyplot
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    plt = pyplot()
    colours = class_colours(len(classes))
    n = coords.shape[0]
    fig, ax = plt.subplots(figsize=(10, 8))
    size = max(1.0, min(30.0, 20000.0 / n))                                      # marker area, points^2
    xy = coords.numpy()
    for c, name in enumerate(classes):
        mask = (labels == c).numpy()
        if mask.any():
            ax.scatter(xy[mask, 0], xy[mask, 1], s=size, color=colours[c], label=name, linewidths=0, alpha=0.8)
    for row, image in thumbnails:
        zoom = THUMBNAIL_PX / image.shape[0] * 72 / fig.dpi                      # OffsetImage counts points
        box = AnnotationBbox(OffsetImage(image.numpy(), zoom=zoom), (xy[row, 0], xy[row, 1]), pad=0.15,
                             bboxprops=dict(edgecolor=colours[int(labels[row])], linewidth=1.5))
        ax.add_artist(box)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_xticks([])
    ax.set_yticks([])
    columns = max(1, math.ceil(len(classes) / 25))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8 if columns == 1 else 6, ncol=columns,
              markerscale=max(1.0, 6.0 / math.sqrt(size)), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    return buf.getvalue()


def sprite_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, s, s) in [0, 1], s small enough that TensorBoard's square
    sprite of ceil(sqrt(n)) thumbnails per side stays within SPRITE_MAX pixels."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    side = min(x.shape[2], SPRITE_MAX // math.ceil(math.sqrt(x.shape[0])))
    if side != x.shape[2] or x.shape[2] != x.shape[3]:
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
    return x


# ----------------------------------------------------------------------------- the run

def move_into(src: str, dst: str) -> None:
    """Move the projector files of folder src into dst by renames (src's own event file stays behind)."""
    import shutil
    for entry in os.scandir(src):
        target = os.path.join(dst, entry.name)
        if entry.name.startswith("events.out.tfevents"):
            continue
        if entry.is_dir() and os.path.isdir(target):
            move_into(entry.path, target)  # e.g. 00000/: keep other embeddings, replace this one whole
        elif entry.is_dir():
            os.rename(entry.path, target)
        else:
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(entry.path, target)

def run(args) -> int:
    """embed.py's parsed flags: compute features and the 2-D map, write PNG, CSV and (asked for) the projector files."""
    if args.method == "tsne":
        require_tsne()
    if args.tensorboard:
        require_tensorboard()
    log = lambda text: print(text, file=sys.stderr)  # noqa: E731 -- stdout only says what was written
    # fp32: t-SNE's neighbourhoods are computed to within rounding, not to bf16 noise
    model, config, runtime, bundle = open_for_features(args.model_path, config=args.config, dataset=args.dataset,
                                                       data_root=args.data_root,
                                                       image_size=args.image_size, device=args.device,
                                                       threads=args.threads, log=log)
    n_test = len(bundle.test)
    if n_test < MIN_POINTS:
        raise UserError(f"the test split has {n_test} images; a map needs at least {MIN_POINTS}")
    picked = balanced_sample(bundle.test.labels, args.n, args.seed)                   # (n,)
    images, labels = bundle.test.images[picked], bundle.test.labels[picked]

    from tqdm import tqdm
    bar = lambda it: tqdm(it, desc="features of the test images", leave=False, file=sys.stderr)  # noqa: E731
    h = encoder_features(model.to(runtime.device), images=images, mean=bundle.mean, std=bundle.std, runtime=runtime,
                         batch_size=args.eval_batch_size,
                         progress=bar).cpu()                                                      # (n, d)
    x = F.normalize(h, dim=1)
    t0, cpu0 = time.perf_counter(), time.process_time()
    if args.method == "tsne":
        perplexity = usable_perplexity(args.perplexity, len(picked))
        log(f"t-SNE of {len(picked)} points ({x.shape[1]}-d), perplexity {perplexity:g} ...")
        coords = tsne_2d(x, perplexity=perplexity, seed=args.seed, threads=args.threads or usable_cores())
        what, axes = f"t-SNE (openTSNE, perplexity {perplexity:g})", ("t-SNE 1", "t-SNE 2")
    else:
        coords, share = pca_2d(x)
        what = "PCA"
        axes = (f"PC 1 ({100 * share[0]:.1f}% of the variance)", f"PC 2 ({100 * share[1]:.1f}%)")
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0

    name = os.path.basename(run_base(args.model_path))
    out = args.out or f"{run_base(args.model_path)}_embed_{map_tag(args.method, args.n, args.thumbnails)}.png"
    csv_path = os.path.splitext(out)[0] + ".csv"
    thumbs = []
    if args.thumbnails:
        thumbs = [(i, images[i]) for i in spread_sample(coords, count=THUMBNAILS, gap=THUMBNAIL_GAP, seed=args.seed)]
    title = f"{name}: {what} of encoder features h, {len(picked)} test images"
    picture = draw_map(coords, labels=labels, classes=bundle.classes, title=title, axis_names=axes, thumbnails=thumbs)
    rows = [{"index": int(i), "label": int(c), "class": bundle.classes[int(c)], "x": float(a), "y": float(b)}
            for i, c, (a, b) in zip(picked.tolist(), labels.tolist(), coords.tolist())]
    try:
        atomic_write_csv(csv_path, CSV_COLUMNS, rows)
        atomic_write_bytes(out, picture)
    except OSError as e:  # e.g. --out in a folder that cannot be written
        raise UserError(f"cannot write {out}: {first_line(e)}") from None
    if args.tensorboard:
        write_projector(args.tensorboard_dir or f"{run_base(args.model_path)}_tb", h=h, labels=labels, picked=picked,
                        images=images,
                        classes=bundle.classes, log=log)

    in_map, in_features = class_agreement(coords, labels), class_agreement(x, labels)
    # CPU seconds too: on a shared machine the wall time says more about the neighbours than about t-SNE
    print(f"wrote {out} and {csv_path}: {what} of {len(picked)} test images in {seconds:.1f} s "
          f"({cpu_seconds:.1f} CPU-seconds); "
          f"{AGREEMENT_K}-NN class agreement {in_map:.1f}% in the map, {in_features:.1f}% in the features")
    return 0


def map_tag(method: str, n: int | None, thumbnails: bool) -> str:
    """What a map's default file name says about it: METHOD, then _nN and _thumbnails when asked for, so
    a map of another sample or with thumbnails never replaces the plain map of the full test set."""
    return method + (f"_n{n}" if n is not None else "") + ("_thumbnails" if thumbnails else "")


def write_projector(logdir: str, h: torch.Tensor, labels: torch.Tensor, picked: torch.Tensor, images: torch.Tensor,
                    classes: list[str], log) -> None:
    """Features h (n, d), class names, test indices and thumbnails into logdir for TensorBoard's projector.

    Written into a temporary folder beside logdir first, then moved in: a full disk leaves the previous
    projector files (or none), never a truncated sprite."""
    import shutil
    import uuid
    parent, base = os.path.split(os.path.abspath(logdir))
    tmp = os.path.join(parent, f".{base}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        board = open_log(tmp)
        try:
            metadata = [[classes[int(c)], str(int(c)), str(int(i))] for c, i in zip(labels, picked)]
            board.embedding(h, metadata=metadata, header=["class", "label", "test_index"],
                            images=sprite_images(images), tag="encoder_h")
        finally:
            board.close()
        os.makedirs(logdir, exist_ok=True)
        move_into(tmp, logdir)
    except (OSError, RuntimeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        advice = os_error_advice(e) if isinstance(e, OSError) else "free space or choose another folder"
        raise UserError(f"cannot write the projector files in {logdir}: {reason}; {advice} (--tensorboard_dir; "
                        f"the previous projector files are kept)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"tensorboard: projector files in {logdir} (tensorboard --logdir {os.path.dirname(logdir) or '.'})")
