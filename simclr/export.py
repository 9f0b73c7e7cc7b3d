"""export_images.py's job: CIFAR-10 or CIFAR-100 from the torchvision download, written as image folders.

    OUT/train/<class>/NNNNN.jpg     NNNNN: the image's index in torchvision's training split
    OUT/test/<class>/NNNNN.jpg

is the layout `--dataset folder` reads; the class folders sorted by name are the data set's label order.
Everything is written into a temporary folder beside OUT and renamed to OUT when complete, so after
any stop OUT is either absent or whole; an OUT that already holds something is refused.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import torch
from PIL import Image

from .cli import UserError
from .data import ImageSet, load_dataset


def run(args) -> int:
    """Read the data set (downloading it if needed), write both splits, rename into place; returns 0."""
    out = args.out or os.path.join(args.data_root, f"{args.dataset}-{args.format}")
    refuse_taken(out)
    bundle = load_dataset(args.dataset, args.data_root, log=print)
    splits = {"train": (bundle.train, first_per_class(bundle.train.labels, args.train_per_class)),
              "test": (bundle.test, first_per_class(bundle.test.labels, args.test_per_class))}
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", suffix=".tmp", dir=parent)
    try:
        for split, (images, indices) in splits.items():
            write_split(os.path.join(temporary, split), images=images, indices=indices, classes=bundle.classes,
                        fmt=args.format, quality=args.quality)
        os.chmod(temporary, 0o755)  # mkdtemp makes it 0700: the folder should read like any other
        move_into_place(temporary, out)
    except BaseException:  # Ctrl-C, SIGTERM, a full disk: nothing half-written is left behind
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    counts = ", ".join(f"{len(indices)} {split}" for split, (_, indices) in splits.items())
    print(f"done: {counts} images of {len(bundle.classes)} classes in {out}/ "
          f"(python main.py --dataset folder --data_root {out})")
    return 0


def refuse_taken(out: str) -> None:
    """A one-line UserError when OUT is a file or a folder that holds anything."""
    if os.path.isdir(out):
        if os.listdir(out):
            raise UserError(f"--out {out} already exists and is not empty: pass another --out, or remove it first")
    elif os.path.lexists(out):
        raise UserError(f"--out {out} exists and is not a folder: pass another --out")


def move_into_place(temporary: str, out: str) -> None:
    """Rename the finished folder to OUT (an empty OUT is replaced); taken meanwhile: a UserError."""
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
    try:
        os.rename(temporary, out)
    except OSError as e:
        if os.path.lexists(out):
            raise UserError(f"--out {out} was created while the images were written: pass another --out") from None
        raise e


def first_per_class(labels: torch.Tensor, per_class: int | None) -> list[int]:
    """The indices of labels (N,) to write, in order: all, or the first per_class of each class."""
    if per_class is None:
        return list(range(len(labels)))
    keep = torch.cat([(labels == c).nonzero().flatten()[:per_class] for c in labels.unique()])
    return keep.sort().values.tolist()


def write_split(folder: str, images: ImageSet, indices: list[int], classes: list[str], fmt: str, quality: int) -> None:
    """folder/<class>/NNNNN.FMT for each index, an empty folder for a class with none (both splits list every class)."""
    from tqdm import tqdm
    for name in classes:
        os.makedirs(os.path.join(folder, name))
    options = {"quality": quality, "subsampling": 0} if fmt == "jpg" else {}  # 4:4:4: 32 px have little colour to spare
    for index in tqdm(indices, desc=f"writing {os.path.basename(folder)}", unit="image", leave=False):
        path = os.path.join(folder, classes[int(images.labels[index])], f"{index:05d}.{fmt}")
        Image.fromarray(images.images[index].numpy()).save(path, **options)
