"""Data sets for SimCLR: CIFAR-10/100 and STL-10 via torchvision, or any ImageFolder-style tree.

Every loader returns uint8 (N, H, W, 3) CPU tensors already resized to the training size, so the
augmentation code never has to decode or resize per step. Folder trees are decoded once into a
.npy cache that is memory-mapped on later runs.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import multiprocessing
import os
import signal
import stat
import sys
import tempfile
import threading
import urllib.error
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .cli import DataError, Interrupted
from .engine import mix_seed
from .flags import DATASETS, DEFAULT_IMAGE_SIZE, usable_cores  # noqa: F401 (re-exported)
from .files import atomic_write


# Per-channel statistics of the [0, 1]-scaled training images (population std over all pixels).
# These are the widely used figures for the torchvision training sets (the CIFAR-10 mean agrees to
# ~2e-4 with the JPEG copy in data/cifar10-jpg; JPEG smoothing makes that copy's std ~0.002 lower).
CHANNEL_STATS = {
    'cifar10': ((0.49139968, 0.48215841, 0.44653091), (0.24703223, 0.24348513, 0.26158784)),
    'cifar100': ((0.50707516, 0.48654887, 0.44091784), (0.26733429, 0.25643846, 0.27615047)),
    'stl10': ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}

# (display name, torchvision class name, archive, url); the class is looked up lazily so that
# importing this module does not import torchvision.datasets.
_TORCHVISION_SETS = {
    'cifar10': ('CIFAR-10', 'CIFAR10', 'cifar-10-python.tar.gz',
                'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'),
    'cifar100': ('CIFAR-100', 'CIFAR100', 'cifar-100-python.tar.gz',
                 'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz'),
    'stl10': ('STL-10', 'STL10', 'stl10_binary.tar.gz',
              'http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz'),
}

# torchvision's STL10 only sets .classes when class_names.txt exists.
_STL10_CLASSES = ['airplane', 'bird', 'car', 'cat', 'deer', 'dog', 'horse', 'monkey', 'ship', 'truck']

# Same extensions torchvision's ImageFolder accepts.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')

_CACHE_VERSION = 2  # 2: checksums of the arrays; files fingerprinted by ctime and inode too
_CACHE_DIRNAME = '.simclr_cache'
_DEFAULT_CACHE_BASE = os.path.join('~', '.cache', 'simclr-cifar')
# Below this many files a worker pool costs more to start than it saves.
_POOL_MIN_FILES = 2000


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, H, W, 3), CPU; may be backed by a read-only np.memmap
    labels: torch.Tensor  # int64 (N,); -1 for unlabeled images

    def __len__(self) -> int:
        """Number of images N."""
        return int(self.labels.shape[0])


@dataclass(kw_only=True)  # eight fields: built by name, never by position
class DataBundle:
    name: str                  # 'cifar10' | 'cifar100' | 'stl10' | 'folder'
    train: ImageSet            # images for self-supervised training
    labeled: ImageSet          # the labeled training images: the kNN bank, linear.py's and finetune.py's set
    test: ImageSet
    classes: list[str]
    mean: tuple[float, float, float]   # per-channel, of images scaled to [0,1]
    std: tuple[float, float, float]
    image_size: int


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

def load_dataset(name: str, root: str, image_size: int | None = None, download: bool = True,
                 cache_dir: str | None = None, log: Callable[[str], Any] = print) -> DataBundle:
    """Load a data set as uint8 (N, S, S, 3) tensors with S = image_size (default per data set)."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    size = DEFAULT_IMAGE_SIZE[name] if image_size is None else int(image_size)
    if size <= 0:
        raise DataError(f"image size must be a positive number of pixels, got {image_size}")
    if name in ('cifar10', 'cifar100'):
        return _load_cifar(name, root=root, size=size, download=download, log=log)
    if name == 'stl10':
        return _load_stl10(root, size=size, download=download, log=log)
    return _load_folder(root, size=size, cache_dir=cache_dir, log=log)


def evaluable(bundle: DataBundle, root: str) -> DataBundle:
    """The bundle, if it has labeled training and test images (an evaluation needs both); else a DataError."""
    if len(bundle.labeled) == 0 or len(bundle.test) == 0:
        raise DataError(f'{_shown(root)} has no labeled train/<class>/ or no test/<class>/ images (unlabeled/ alone '
                        f'cannot be evaluated on): pass --data_root a folder with both')
    return bundle


def subset(images: ImageSet, n: int | None, seed: int) -> ImageSet:
    """A fixed random subset of n images (all when n is None or not smaller)."""
    if n is None or n >= len(images.labels):
        return images
    keep = torch.randperm(len(images.labels), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return ImageSet(images.images[keep], images.labels[keep])


def content_fingerprint(images: ImageSet, sample: int = 1024) -> str:
    """A hash of what a data split holds, wherever it lies: its shape, every label and up to `sample`
    evenly spaced images (a moved or copied folder gives the same value, other data another)."""
    n = len(images)
    picks = torch.linspace(0, n - 1, min(n, sample)).round().long().unique() if n else torch.zeros(0, dtype=torch.long)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(tuple(images.images.shape)).encode())
    digest.update(images.labels.cpu().numpy().astype(np.int64).tobytes())
    digest.update(np.ascontiguousarray(images.images[picks].cpu().numpy()).tobytes())
    return digest.hexdigest()


def balanced_label_indices(labels: torch.Tensor, num_classes: int, per_class: int, seed: int) -> torch.Tensor:
    """Sorted indices (per_class * num_classes,) of labels (N,): per_class images of every class, drawn by seed.

    One seeded permutation of all images; each class keeps its first per_class images in that order.
    So for one seed a smaller subset is part of every larger one (the 1% labels are among the 10%),
    and a class with fewer images than asked is a DataError naming it.
    """
    labels = labels.cpu()
    counts = torch.bincount(labels.clamp_min(0), minlength=num_classes)[:num_classes]
    if (labels < 0).any() or int(counts.min()) < per_class:
        short = int(counts.argmin())
        raise DataError(f"{per_class} labels per class asked for, but class {short} has only "
                        f"{int(counts[short])} labeled images; ask for fewer")
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    shuffled = labels[perm]                                                  # (N,)
    by_class = torch.argsort(shuffled, stable=True)                          # classes in blocks, in perm order
    starts = torch.cumsum(counts, 0) - counts                                # (C,) first position of each block
    rank = torch.arange(len(labels)) - starts[shuffled[by_class]]           # position within its class block
    return perm[by_class[rank < per_class]].sort().values


class PilViews(torch.utils.data.Dataset):
    """The classic path: two torchvision PIL-transformed views per image, in DataLoader workers.

    Each image's random stream is seeded from (run seed, epoch, index), so the views do not
    depend on the number of workers and a resumed epoch sees the same views.
    """

    def __init__(self, images: torch.Tensor, transform: Callable, seed: int, epoch: int):
        self.images, self.transform, self.seed, self.epoch = images, transform, seed, epoch

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = Image.fromarray(self.images[index].numpy())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, self.epoch, index))
            return self.transform(image), self.transform(image)


def collate_views(items: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """[(view 1, view 2)] * b -> (2b, 3, S, S) = [view 1 of all; view 2 of all], built in the worker."""
    return torch.stack([v for v, _ in items] + [v for _, v in items])


def _ignore_sigint(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the main process finishes the step and saves,
    # so the workers must not die first
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def pil_view_batches(images: torch.Tensor, transform: Callable, batches: list[list[int]], seed: int, epoch: int,
                     workers: int, pin_memory: bool) -> Iterator[torch.Tensor]:
    """(2b, 3, S, S) batches of PIL-pipeline views, one per list of image indices, built in `workers` processes."""
    loader = torch.utils.data.DataLoader(PilViews(images, transform=transform, seed=seed, epoch=epoch),
                                         batch_sampler=batches,
                                         num_workers=workers, pin_memory=pin_memory, collate_fn=collate_views,
                                         worker_init_fn=_ignore_sigint)
    return iter(loader)


# ----------------------------------------------------------------------------------------------
# torchvision data sets
# ----------------------------------------------------------------------------------------------

def _shown(root: str) -> str:
    """root as the user typed it, with one trailing slash, for messages."""
    return root.rstrip('/\\') + '/'


def _open_torchvision(name: str, root: str, download: bool, log: Callable[[str], Any], **kwargs: Any) -> Any:
    """Construct the torchvision data set, turning missing-files/offline failures into a one-line DataError."""
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import check_integrity

    title, cls_name, archive, url = _TORCHVISION_SETS[name]
    cls = getattr(tvd, cls_name)
    archive_path = os.path.join(root, archive)
    extracted = os.path.isdir(os.path.join(root, cls.base_folder))
    if not download and not extracted and os.path.isfile(archive_path) and check_integrity(archive_path, cls.tgz_md5):
        # A verified archive is already local: torchvision's download() then only extracts it
        # (download_url returns early when the md5 matches), so no network is touched.
        download = True
    if download and not extracted:
        what = f'extracting {archive}' if os.path.isfile(archive_path) else f'downloading {archive} from {url}'
        log(f'{title} not found in {_shown(root)}: {what} ...')
    try:
        return cls(root, download=download, **kwargs)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        reason = ' '.join(f'{type(e).__name__}: {e}'.split())[:160]
        how = f'could not be downloaded (no internet? {reason})' if download else 'downloading is off'
        raise DataError(f'{title} is not in {_shown(root)} and {how}: put {archive} ({url}) '
                        f'in {_shown(root)} and run again') from e


def _resize_images(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 (N, H, W, 3) to uint8 (N, size, size, 3), in chunks to bound memory."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    out = torch.empty((images.shape[0], size, size, 3), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(size, size), mode='bilinear', antialias=True, align_corners=False)
        out[start:start + chunk] = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


def _load_cifar(name: str, root: str, size: int, download: bool, log: Callable[[str], Any]) -> DataBundle:
    """CIFAR-10/100 with labeled = train (same object); images uint8 (N, size, size, 3)."""
    train_ds = _open_torchvision(name, root=root, download=download, log=log, train=True)
    # The first call downloaded/extracted if needed; the test split must now be on disk.
    test_ds = _open_torchvision(name, root=root, download=False, log=log, train=False)

    def to_set(ds: Any) -> ImageSet:
        """torchvision's HWC view (N, 32, 32, 3) -> contiguous ImageSet."""
        images = torch.from_numpy(np.ascontiguousarray(ds.data))
        return ImageSet(_resize_images(images, size), torch.as_tensor(ds.targets, dtype=torch.int64))

    train = to_set(train_ds)
    mean, std = CHANNEL_STATS[name]
    return DataBundle(name=name, train=train, labeled=train, test=to_set(test_ds), classes=list(train_ds.classes),
                      mean=mean, std=std, image_size=size)


def _chw_to_hwc(data: np.ndarray) -> torch.Tensor:
    """(N, 3, H, W) uint8 array (any strides) -> contiguous uint8 (N, H, W, 3) tensor."""
    # torch's permute+contiguous copy is multi-threaded, numpy's ascontiguousarray is not.
    return torch.from_numpy(data).permute(0, 2, 3, 1).contiguous()


def _load_stl10(root: str, size: int, download: bool, log: Callable[[str], Any]) -> DataBundle:
    """STL-10: train = train+unlabeled (105,000), labeled = the 5,000 labeled train images, test = 8,000."""
    train_ds = _open_torchvision('stl10', root=root, download=download, log=log, split='train+unlabeled')
    test_ds = _open_torchvision('stl10', root=root, download=False, log=log, split='test')
    # torchvision concatenates (train, unlabeled) in that order, so the labeled images are the
    # first n_labeled rows; train_y.bin holds one byte per labeled image.
    n_labeled = os.path.getsize(os.path.join(root, train_ds.base_folder, 'train_y.bin'))
    train_images = _resize_images(_chw_to_hwc(train_ds.data), size)
    labels = torch.from_numpy(np.asarray(train_ds.labels, dtype=np.int64).copy())
    # torchvision already uses -1 for unlabeled rows; force it anyway so nothing else can leak into kNN.
    labels[n_labeled:] = -1
    del train_ds  # drop torchvision's CHW copy (several GB for the full unlabeled split)
    train = ImageSet(train_images, labels)
    # Views, not copies: the labeled set shares storage with the first n_labeled training rows.
    labeled = ImageSet(train_images[:n_labeled], labels[:n_labeled])
    test = ImageSet(_resize_images(_chw_to_hwc(test_ds.data), size),
                    torch.from_numpy(np.asarray(test_ds.labels, dtype=np.int64).copy()))
    classes = list(getattr(test_ds, 'classes', _STL10_CLASSES))
    mean, std = CHANNEL_STATS['stl10']
    return DataBundle(name='stl10', train=train, labeled=labeled, test=test, classes=classes, mean=mean, std=std,
                      image_size=size)


# ----------------------------------------------------------------------------------------------
# Folder data sets: scanning
# ----------------------------------------------------------------------------------------------

@dataclass
class _Scan:
    paths: list[str]          # absolute image paths, class-major, sorted
    labels: np.ndarray        # int64 (len(paths),)
    skipped: list[str]        # 'path relative to the data root (reason)' of entries that are not images to decode
    fingerprint: str          # hash of (relative path, size, mtime, ctime, inode) of every file seen


def _shown_path(path: str) -> str:
    """A path for messages: bytes that are not UTF-8 shown as escapes instead of failing to print."""
    return os.fsencode(path).decode('utf-8', 'backslashreplace')


def _list_classes(split_dir: str) -> list[str]:
    """Sorted class folder names directly under split_dir (hidden folders such as .ipynb_checkpoints skipped)."""
    return sorted(e.name for e in os.scandir(split_dir) if _is_dir(e) and not e.name.startswith('.'))


def _is_dir(entry: os.DirEntry) -> bool:
    """entry.is_dir(), False for a dangling link or one that cannot be followed."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _walk_files(top: str, others: tuple[str, ...] = ()) -> Iterator[tuple[str, os.stat_result | None, str | None]]:
    """(path, stat, None) for every regular file below top, sorted, links followed once; (path, None, reason)
    for every entry that cannot be an image: a dangling link, a link loop, a special file, an unreadable folder,
    a link to a folder that holds top (its images would be scanned again) or into one of `others` (the other
    class folders: their images would get this class's label). Nothing is opened, so a FIFO or a device never
    blocks the scan."""
    seen: set[tuple[int, int]] = set()
    real_top = os.path.realpath(top)
    real_others = [os.path.realpath(o) for o in others]

    def inside(path: str, folder: str) -> bool:
        return path == folder or path.startswith(os.path.join(folder, ''))

    def walk(folder: str) -> Iterator[tuple[str, os.stat_result | None, str | None]]:
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                yield folder, None, 'a link back to a folder already scanned'
                return
            if folder != top:
                real = os.path.realpath(folder)
                if inside(real_top, real) and real != real_top:
                    yield folder, None, 'a link to a folder that holds this class folder'
                    return
                if any(inside(real, other) for other in real_others):
                    yield folder, None, 'a link into another class folder'
                    return
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            yield folder, None, f'cannot be read: {e.strerror}'
            return
        for entry in entries:
            if entry.name.startswith('.'):
                continue
            try:
                st = entry.stat()  # follows links
            except OSError as e:
                yield entry.path, None, ('a broken link' if entry.is_symlink() else f'cannot be read: {e.strerror}')
                continue
            if stat.S_ISDIR(st.st_mode):
                yield from walk(entry.path)
            elif stat.S_ISREG(st.st_mode):
                yield entry.path, st, None
            else:
                yield entry.path, None, 'not a regular file'

    yield from walk(top)


def _scan_split(split_dir: str, classes: list[str], unlabeled_dir: str | None = None) -> _Scan:
    """List every file under split_dir/<class>/ (recursively), then with unlabeled_dir every file at any depth
    below it (label -1), and fingerprint them; DataError on an image-less class or unlabeled folder."""
    paths: list[str] = []
    labels: list[int] = []
    skipped: list[str] = []
    digest = hashlib.sha256()
    split_name = os.path.basename(os.path.normpath(split_dir))
    prefix_len = len(os.path.join(split_dir, ''))  # os.path.relpath is slow over 50k files
    root_len = len(os.path.join(os.path.dirname(split_dir), ''))
    for index, cls in enumerate(classes):
        n_files = n_images = 0
        others = tuple(os.path.join(split_dir, c) for c in classes if c != cls)
        for full, st, problem in _walk_files(os.path.join(split_dir, cls), others):
            rel = full[prefix_len:]
            if problem is not None:
                skipped.append(f'{_shown_path(full[root_len:])} ({problem})')
                continue
            # ctime and inode change on every edit or replacement, even when size and mtime are put back
            digest.update(os.fsencode(rel) + f'\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n'.encode())
            n_files += 1
            if full.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(full)
                labels.append(index)
                n_images += 1
            else:
                skipped.append(f'{_shown_path(full[root_len:])} (not an image file)')
        if n_files == 0:
            raise DataError(f'class folder {split_name}/{cls} in {split_dir} is empty: add images or remove the folder')
        if n_images == 0:
            raise DataError(f'class folder {split_name}/{cls} in {split_dir} has no image files '
                            f'({", ".join(IMAGE_EXTENSIONS)}): add images or remove the folder')
    if unlabeled_dir is not None:
        unlabeled_len = len(os.path.join(os.path.dirname(unlabeled_dir), ''))
        n_images = 0
        for full, st, problem in _walk_files(unlabeled_dir):
            rel = full[unlabeled_len:]  # 'unlabeled/...': apart from every class folder's files
            if problem is not None:
                skipped.append(f'{_shown_path(rel)} ({problem})')
                continue
            digest.update(b'\0u\0' + os.fsencode(rel) + f'\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n'.encode())
            if full.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(full)
                labels.append(-1)
                n_images += 1
            else:
                skipped.append(f'{_shown_path(rel)} (not an image file)')
        if n_images == 0:
            raise DataError(f'{unlabeled_dir} has no image files ({", ".join(IMAGE_EXTENSIONS)}) at any depth: '
                            f'add images or remove the folder')
    return _Scan(paths, labels=np.asarray(labels, dtype=np.int64), skipped=skipped, fingerprint=digest.hexdigest())


# ----------------------------------------------------------------------------------------------
# Folder data sets: decoding
# ----------------------------------------------------------------------------------------------

def _decode_image(path: str, size: int) -> np.ndarray:
    """Decode one image file to RGB, shorter side resized to size, centre-cropped: uint8 (size, size, 3)."""
    with Image.open(path) as img:
        # JPEG only: lets libjpeg shrink by 1/2, 1/4 or 1/8 during decoding while staying >= size,
        # which is far faster than decoding large photos at full resolution.
        img.draft('RGB', (size, size))
        return fit_image(img, size)


def fit_image(img: Image.Image, size: int) -> np.ndarray:
    """An image as a folder data set holds it: RGB, shorter side resized to size, centre-cropped: uint8 (size, size, 3)."""
    rgb = _to_8bit(img).convert('RGB')
    w, h = rgb.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        # Pillow's BILINEAR widens its filter when shrinking, i.e. it is antialiased.
        rgb = rgb.resize((nw, nh), Image.BILINEAR)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        rgb = rgb.crop((left, top, left + size, top + size))
    return np.asarray(rgb, dtype=np.uint8)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer images scaled to 8 bits (convert('RGB') would clip them to near white)."""
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I'):
        pixels = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith('I;16') or pixels.max() <= 65535 else float(2 ** 31 - 1)
        return Image.fromarray(np.clip(np.rint(pixels * (255.0 / top)), 0, 255).astype(np.uint8), 'L')
    if img.mode == 'F':
        raise ValueError('floating-point pixels have no agreed range; save the image with integer pixels')
    return img


def _decode_chunk(task: tuple[list[str], int]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode a list of paths: (uint8 (n_ok, S, S, 3) in input order, [(index in chunk, reason)] of failures)."""
    paths, size = task
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    failed: list[tuple[int, str]] = []
    n_ok = 0
    for i, path in enumerate(paths):
        try:
            out[n_ok] = _decode_image(path, size)
            n_ok += 1
        except Exception as e:  # any decoder failure just means "skip this file"
            failed.append((i, ' '.join(f'{type(e).__name__}: {e}'.split())[:120]))
    return out[:n_ok], failed


def _n_workers() -> int:
    """Decoding processes: one per usable core."""
    return usable_cores()


def _decode_all(paths: list[str], size: int) -> Iterator[tuple[np.ndarray, list[tuple[int, str]]]]:
    """Yield _decode_chunk results in order over consecutive chunks of paths, in parallel when worthwhile."""
    workers = min(_n_workers(), 16)
    # Chunks of at most ~4 MB of pixels keep results cheap to ship back and bound memory; at least
    # ~4 chunks per worker keep the workers evenly loaded.
    chunk = max(1, min(512, (4 << 20) // (size * size * 3), -(-len(paths) // (4 * workers))))
    tasks = [(paths[i:i + chunk], size) for i in range(0, len(paths), chunk)]
    workers = min(workers, len(tasks))
    if workers <= 1 or len(paths) < _POOL_MIN_FILES:
        yield from map(_decode_chunk, tasks)
        return
    # fork avoids re-importing torch in every worker; workers only run PIL/numpy, which is fork-safe.
    use_fork = sys.platform.startswith('linux') and 'fork' in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context('fork' if use_fork else None)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(_decode_chunk, tasks)


# ----------------------------------------------------------------------------------------------
# Folder data sets: cache
# ----------------------------------------------------------------------------------------------

def _dir_writable(path: str) -> bool:
    """True when path exists or can be created and a file can be written in it."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def _cache_candidates(split_dir: str, cache_dir: str | None) -> list[str]:
    """Cache directories to look in, preferred first: cache_dir alone, else root/.simclr_cache then the home cache."""
    if cache_dir is not None:
        return [os.path.abspath(os.path.expanduser(cache_dir))]
    root = os.path.dirname(os.path.abspath(split_dir))
    home = os.path.join(os.path.expanduser(_DEFAULT_CACHE_BASE), hashlib.sha256(root.encode()).hexdigest()[:16])
    return [os.path.join(root, _CACHE_DIRNAME), home]


def _manifest_path(directory: str, stem: str) -> str:
    """Path of the JSON manifest for one split at one size."""
    return os.path.join(directory, stem + '.json')


def _read_cache(directory: str, stem: str, split_dir: str, size: int, scan: _Scan,
                classes: list[str], unlabeled_dir: str | None = None) -> tuple[ImageSet, dict] | None:
    """Load a valid cache (images memory-mapped, uint8 (N, S, S, 3)) or None if absent/stale/broken."""
    try:
        with open(_manifest_path(directory, stem)) as f:
            man = json.load(f)
        if (man.get('version') != _CACHE_VERSION or man.get('image_size') != size
                or man.get('fingerprint') != scan.fingerprint or man.get('classes') != classes
                or man.get('split_dir') != os.path.abspath(split_dir)
                or man.get('unlabeled_dir') != (unlabeled_dir and os.path.abspath(unlabeled_dir))):
            return None
        count = int(man['count'])
        # mode='c' (copy-on-write) gives a writable array, so torch.from_numpy does not warn;
        # nothing is ever written back to the file.
        images = np.load(os.path.join(directory, man['images']), mmap_mode='c')
        labels = np.load(os.path.join(directory, man['labels']))
        if images.shape[0] < count or images.shape[1:] != (size, size, 3) or labels.shape != (count,):
            return None
        # the arrays must be the ones this manifest describes: same-shaped other data is rebuilt, not trained on
        if man.get('checksum') != _checksum(images[:count]) or man.get('labels_checksum') != _checksum(labels):
            return None
        if not _manifest_values_ok(man):  # fields the checksums do not cover: a bad one means rebuild
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    # The image file may have a few unused rows at the end (files that failed to decode).
    return ImageSet(torch.from_numpy(images[:count]), torch.from_numpy(labels.astype(np.int64))), man


def _manifest_values_ok(man: dict) -> bool:
    """3 finite means in [0, 1], 3 finite stds in (0, 1], `skipped` a list of strings."""
    def three(values, low_open: bool) -> bool:
        return (isinstance(values, list) and len(values) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                        and (0 < v if low_open else 0 <= v) and v <= 1 for v in values))
    skipped = man.get('skipped')
    return (three(man.get('mean'), False) and three(man.get('std'), True)
            and isinstance(skipped, list) and all(isinstance(line, str) for line in skipped))


def _checksum(array: np.ndarray) -> str:
    """BLAKE2b of an array's bytes, read in 64 MiB pieces (about 0.2 s for CIFAR-10's 150 MB)."""
    digest = hashlib.blake2b(digest_size=16)
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    for start in range(0, flat.size, 64 << 20):
        digest.update(flat[start:start + (64 << 20)])
    return digest.hexdigest()


def _reserve(path: str, directory: str) -> None:
    """Allocate the whole file now: out of space becomes one clear error here, before any pixel is written."""
    needed = os.path.getsize(path)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, needed)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(f'not enough space in {directory} for the image cache ({needed / 2**20:.1f} MiB needed): '
                            f'free some space or pass --cache_dir on another disk') from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate: write as before
            raise
    finally:
        os.close(fd)


def _build_cache(directory: str, stem: str, split_dir: str, size: int, scan: _Scan, classes: list[str],
                 log: Callable[[str], Any], unlabeled_dir: str | None = None) -> dict:
    """Decode every image of scan into directory/<stem>-<token>.npy (+ labels, manifest); return the manifest."""
    token = uuid.uuid4().hex[:12]
    images_name, labels_name = f'{stem}-{token}.npy', f'{stem}-{token}-labels.npy'
    tmp = os.path.join(directory, f'.tmp-{images_name}')
    try:
        # Rows are filled in order; failed files only shift later rows up, so n rows always suffice.
        out = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.uint8, shape=(len(scan.paths), size, size, 3))
        _reserve(tmp, directory)  # a full disk under a memory map is a bus error, not an exception
        count, keep, skipped, mean, std = _decode_into(out, scan=scan, split_dir=split_dir, log=log)
        labels = scan.labels[keep]
        _check_decoded(split_dir, classes=classes, labels=labels, std=std, unlabeled_dir=unlabeled_dir)
        out.flush()
        checksum = _checksum(out[:count])
        del out
        os.replace(tmp, os.path.join(directory, images_name))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    atomic_write(os.path.join(directory, labels_name), lambda f: np.save(f, labels))
    man = {'version': _CACHE_VERSION, 'split_dir': os.path.abspath(split_dir), 'image_size': size,
           'fingerprint': scan.fingerprint, 'classes': classes, 'count': count,
           'images': images_name, 'labels': labels_name, 'mean': mean.tolist(), 'std': std.tolist(),
           'skipped': skipped, 'checksum': checksum, 'labels_checksum': _checksum(labels)}
    if unlabeled_dir is not None:  # absent otherwise: caches written before unlabeled folders stay valid
        man['unlabeled_dir'] = os.path.abspath(unlabeled_dir)
    # The manifest is written last: until it is replaced, readers see the previous complete cache.
    atomic_write(_manifest_path(directory, stem), lambda f: f.write(json.dumps(man, indent=1).encode()))
    for name in os.listdir(directory):  # drop files of earlier builds of this split/size
        if name.startswith(stem + '-') and name.endswith('.npy') and name not in (images_name, labels_name):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, name))
    return man


def _decode_into(out: np.ndarray, scan: _Scan, split_dir: str,
                 log: Callable[[str], Any]) -> tuple[int, np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Decode scan's images into the rows of out (N, S, S, 3) in order, reporting each skipped entry once.

    Returns (images decoded, keep mask (N,), skipped lines, mean (3,), std (3,) of the [0, 1] pixels)."""
    keep = np.ones(len(scan.paths), dtype=bool)
    skipped = list(scan.skipped)
    root = os.path.dirname(split_dir)
    # Exact integer sums (255**2 fits uint16), converted to float64 at the end.
    s1 = np.zeros(3, dtype=np.int64)
    s2 = np.zeros(3, dtype=np.int64)
    start = cursor = 0
    for chunk_images, failed in _decode_all(scan.paths, out.shape[1]):
        k = len(chunk_images)
        out[cursor:cursor + k] = chunk_images
        flat = chunk_images.reshape(-1, 3)
        s1 += flat.sum(axis=0, dtype=np.int64)
        s2 += (flat.astype(np.uint16) ** 2).sum(axis=0, dtype=np.int64)
        for i, reason in failed:
            keep[start + i] = False
            skipped.append(f'{_shown_path(os.path.relpath(scan.paths[start + i], root or "."))} ({reason})')
        start += k + len(failed)
        cursor += k
    for line in skipped:
        log(f'skipped {os.path.join(root, line)}')
    if cursor == 0:
        raise DataError(f'no readable images in {split_dir}: every file failed to decode (see the lines above)')
    pixels = cursor * out.shape[1] * out.shape[2]
    mean = s1 / (pixels * 255.0)
    std = np.sqrt(np.maximum(s2 / (pixels * 255.0 ** 2) - mean ** 2, 0.0))
    return cursor, keep, skipped, mean, std


def _check_decoded(split_dir: str, classes: list[str], labels: np.ndarray, std: np.ndarray,
                   unlabeled_dir: str | None = None) -> None:
    """Refuse a split with a class left without images, an unlabeled folder without one, or no variation to
    normalise by."""
    if unlabeled_dir is not None and not (labels < 0).any():
        raise DataError(f'no image in {unlabeled_dir} decodes (see the lines above): add readable images or '
                        f'remove the folder')
    empty = [classes[c] for c in np.flatnonzero(np.bincount(labels[labels >= 0], minlength=len(classes)) == 0)]
    if empty:
        raise DataError(f'class folder {empty[0]} in {split_dir} has no image that decodes (see the lines above): '
                        f'add readable images or remove the folder')
    if not (std > 1e-6).all():  # normalising by a zero std would make every input NaN
        raise DataError(f'every image in {split_dir} is one flat colour (channel std {std.round(6).tolist()}): '
                        f'there is nothing to learn; check the images')


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises, as Ctrl-C does, so that a cache build stopped either way removes its temporary file."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Interrupted(signum)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _folder_split(split_dir: str, size: int, cache_dir: str | None, log: Callable[[str], Any],
                  unlabeled_dir: str | None = None) -> tuple[ImageSet, list[str], tuple[float, ...], tuple[float, ...]]:
    """One split of a folder data set: (images uint8 (N, S, S, 3), classes, mean (3,), std (3,)), via the cache.

    unlabeled_dir: its images (label -1) come after split_dir's labeled ones, in the same cache; split_dir
    may be unlabeled_dir itself (no classes)."""
    if not os.path.isdir(split_dir):
        raise DataError(f'{split_dir} is not a folder: expected {split_dir}/<class>/<images>')
    classes = [] if split_dir == unlabeled_dir else _list_classes(split_dir)
    if not classes and split_dir != unlabeled_dir:
        raise DataError(f'{split_dir} has no class folders: expected {split_dir}/<class>/<images>')
    scan = _scan_split(split_dir, classes, unlabeled_dir)
    split_name = os.path.basename(os.path.normpath(split_dir))
    both = unlabeled_dir is not None and split_dir != unlabeled_dir
    stem = f'{split_name}+unlabeled-{size}px' if both else f'{split_name}-{size}px'
    what = f'{split_dir} and {unlabeled_dir}' if both else split_dir
    candidates = _cache_candidates(split_dir, cache_dir)
    for directory in candidates:
        found = _read_cache(directory, stem=stem, split_dir=split_dir, size=size, scan=scan, classes=classes,
                            unlabeled_dir=unlabeled_dir)
        if found is not None:
            images, man = found
            note = f', {len(man["skipped"])} files were skipped' if man['skipped'] else ''
            log(f'using cached {what} ({len(images)} images, {size}x{size}{note}) from {directory}')
            return images, classes, tuple(man['mean']), tuple(man['std'])
    directory = next((d for d in candidates if _dir_writable(d)), None)
    if directory is None:
        raise DataError(f'cannot write an image cache for {what} in {" or ".join(candidates)}: '
                        f'pass a writable cache_dir')
    os.makedirs(directory, exist_ok=True)
    log(f'decoding {len(scan.paths)} images of {what} into cache {directory} ...')
    with _sigterm_raises():
        man = _build_cache(directory, stem=stem, split_dir=split_dir, size=size, scan=scan, classes=classes, log=log,
                           unlabeled_dir=unlabeled_dir)
    found = _read_cache(directory, stem=stem, split_dir=split_dir, size=size, scan=scan, classes=classes,
                        unlabeled_dir=unlabeled_dir)
    if found is None:  # only if the folder changed while we were decoding it
        raise DataError(f'{what} changed while its cache was being built: run again')
    return found[0], classes, tuple(man['mean']), tuple(man['std'])


def _load_folder(root: str, size: int, cache_dir: str | None, log: Callable[[str], Any]) -> DataBundle:
    """ImageFolder-style root/{train,test}/<class>/*; labeled = train (same object), mean/std from train.

    With root/unlabeled/ (images at any depth, STL-10's name): train = train/ + unlabeled/ (label -1), one
    cache, labeled rows first, labeled = those rows (a view), mean/std of both. With root/unlabeled/ alone:
    train = its images, labeled and test empty, no classes: a run without evaluation."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f'data folder {root} is a file, not a folder: pass the folder that holds train/ and test/')
    if os.path.islink(root) and not os.path.exists(root):
        try:
            os.stat(root)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise DataError(f'data folder {root} is a link loop (a symbolic link that leads back to itself): '
                                f'point it at the folder that holds train/ and test/') from None
    if not os.path.isdir(root):
        raise DataError(f'data folder {root} does not exist: create {_shown(root)}train/<class>/*.jpg '
                        f'and {_shown(root)}test/<class>/*.jpg or pass the right path')
    split_dirs = {s: os.path.join(root, s) for s in ('train', 'test')}
    missing = [s + '/' for s, d in split_dirs.items() if not os.path.isdir(d)]
    unlabeled_dir = os.path.join(root, 'unlabeled')
    if not os.path.isdir(unlabeled_dir):
        unlabeled_dir = None
    as3 = lambda v: (float(v[0]), float(v[1]), float(v[2]))  # noqa: E731
    if unlabeled_dir is not None and len(missing) == 2:
        train, _, mean, std = _folder_split(unlabeled_dir, size=size, cache_dir=cache_dir, log=log,
                                            unlabeled_dir=unlabeled_dir)
        train = _without_unlabeled_copies(train, _pixel_digests(train.images), log)
        none = ImageSet(torch.zeros((0, size, size, 3), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
        return DataBundle(name='folder', train=train, labeled=none, test=none, classes=[], mean=as3(mean),
                          std=as3(std), image_size=size)
    if missing:
        raise DataError(f'{_shown(root)} has no {" or ".join(missing)} folder: expected '
                        f'{_shown(root)}train/<class>/* and {_shown(root)}test/<class>/*'
                        + (' (or unlabeled/ alone)' if unlabeled_dir is not None else ''))
    train_classes, test_classes = (_list_classes(d) for d in split_dirs.values())
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(f'class folders differ between {_shown(root)}train/ and test/: '
                        f'only in train: {", ".join(only_train) or "-"}; only in test: {", ".join(only_test) or "-"}; '
                        f'make both hold the same class folders')
    train, classes, mean, std = _folder_split(split_dirs['train'], size=size, cache_dir=cache_dir, log=log,
                                              unlabeled_dir=unlabeled_dir)
    test, _, _, _ = _folder_split(split_dirs['test'], size=size, cache_dir=cache_dir, log=log)
    labeled = train
    digests = _pixel_digests(train.images)  # once: the copies left out and the test images seen in training
    if unlabeled_dir is not None:  # the labeled rows come first: the bank is a view of them, never a copy
        train = _without_unlabeled_copies(train, digests, log)
        n_labeled = int((train.labels >= 0).sum())
        labeled = ImageSet(train.images[:n_labeled], train.labels[:n_labeled])
    _note_test_copies(set(digests), test=test, root=_shown(root), log=log)
    return DataBundle(name='folder', train=train, labeled=labeled, test=test, classes=classes, mean=as3(mean),
                      std=as3(std), image_size=size)


def _pixel_digests(images: torch.Tensor) -> list[bytes]:
    """One digest per image of uint8 images (N, S, S, 3): equal digests are equal pixels after decoding."""
    rows = images.reshape(len(images), -1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


def _without_unlabeled_copies(train: ImageSet, digests: list[bytes], log: Callable[[str], Any]) -> ImageSet:
    """`train` without the unlabeled images (label -1, after the labeled rows) whose pixels (digests: one per
    image) are those of a labeled image or of an earlier unlabeled one: each image is trained on once,
    labeled if it has a label."""
    labels = train.labels.tolist()
    seen: dict[bytes, bool] = {}  # digest -> labeled
    keep, of_labeled, of_unlabeled = [], 0, 0
    for i, (digest, label) in enumerate(zip(digests, labels)):
        if label < 0 and digest in seen:
            of_labeled += seen[digest]
            of_unlabeled += not seen[digest]
            continue
        seen.setdefault(digest, label >= 0)
        keep.append(i)
    if len(keep) == len(train):
        return train
    parts = [f"{of_labeled} are copies of train/ images" if of_labeled else "",
             f"{of_unlabeled} repeat other unlabeled/ images" if of_unlabeled else ""]
    log(f"note: of the unlabeled/ images, {' and '.join(p for p in parts if p)} (same pixels once decoded); "
        f"each image is trained on once, so the training set has {len(keep)} images, not {len(train)}")
    index = torch.tensor(keep, dtype=torch.int64)
    return ImageSet(train.images[index], train.labels[index])


def _note_test_copies(known: set[bytes], test: ImageSet, root: str, log: Callable[[str], Any]) -> None:
    """Say how many test images are also training images (known: their pixel digests): the accuracies count them."""
    copies = sum(digest in known for digest in _pixel_digests(test.images))
    if copies:
        log(f"note: {copies} of the {len(test)} images of {root}test/ are also training images (same pixels once "
            f"decoded); kNN and linear accuracies count them: remove them from one split for a clean test")
