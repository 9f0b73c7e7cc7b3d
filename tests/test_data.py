"""Tests for data.py: folder data sets with their cache, and tiny fake CIFAR/STL-10 files on disk."""
from __future__ import annotations

import os
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, for plain `pytest`

from conftest import CIFAR10_CLASSES, cifar_rows as _cifar_rows, pickle_to as _pickle  # noqa: E402
from conftest import accept_fake_torchvision_files as _skip_md5, no_network as _no_network  # noqa: E402
from conftest import write_cifar10_files  # noqa: E402
from simclr import data  # noqa: E402
from simclr.data import DataError, load_dataset  # noqa: E402

SIZE = 8


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _save(path, array: np.ndarray, fmt: str | None = None) -> None:
    """Write a uint8 (H, W, 3) or (H, W) array as an image file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def _make_folder(root, rng: np.random.Generator) -> None:
    """root/{train,test}/{ant,bee,cat}/ with PNG/JPEG images of assorted sizes and modes."""
    shapes = [(SIZE, SIZE), (20, 12), (9, 30)]
    for split, n in (('train', 3), ('test', 2)):
        # Created out of order to check that class order is the sorted folder names.
        for cls in ('cat', 'ant', 'bee'):
            for i in range(n):
                h, w = shapes[i % len(shapes)]
                img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                ext = '.png' if i % 2 == 0 else '.jpg'
                _save(os.path.join(root, split, cls, f'{i}{ext}'), img)
    # a grayscale image and an RGBA image must come back as RGB
    _save(os.path.join(root, 'train', 'bee', 'gray.png'), rng.integers(0, 256, (10, 10), dtype=np.uint8))
    rgba = rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
    os.makedirs(os.path.join(root, 'train', 'cat'), exist_ok=True)
    Image.fromarray(rgba, 'RGBA').save(os.path.join(root, 'train', 'cat', 'rgba.png'))


class _Log(list):
    """Collects log lines."""

    def __call__(self, line: str) -> None:
        """Record one line."""
        assert '\n' not in line
        self.append(line)


def _one_line(e: pytest.ExceptionInfo) -> str:
    """The DataError message, checked to be a single non-empty line."""
    msg = str(e.value)
    assert msg and '\n' not in msg
    return msg


# ---------------------------------------------------------------------------------------------
# folder data sets
# ---------------------------------------------------------------------------------------------

def test_folder_shapes_labels_stats(tmp_path):
    root = tmp_path / 'ds'
    _make_folder(root, np.random.default_rng(0))
    # A SIZE x SIZE PNG is lossless and needs no resize: its pixels must come back unchanged.
    exact = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    _save(root / 'train' / 'ant' / 'zz_exact.png', exact)
    # 2:1 landscape: left quarter red, middle half green, right quarter blue -> centre crop is green.
    wide = np.zeros((2 * SIZE, 4 * SIZE, 3), np.uint8)
    wide[:, :SIZE, 0] = 255
    wide[:, SIZE:3 * SIZE, 1] = 255
    wide[:, 3 * SIZE:, 2] = 255
    _save(root / 'train' / 'ant' / 'zz_wide.png', wide)

    log = _Log()
    b = load_dataset('folder', str(root), image_size=SIZE, log=log)
    assert b.name == 'folder' and b.image_size == SIZE
    assert b.classes == ['ant', 'bee', 'cat']
    assert b.train.images.dtype == torch.uint8 and b.train.labels.dtype == torch.int64
    assert tuple(b.train.images.shape) == (3 * 3 + 2 + 2, SIZE, SIZE, 3)
    assert tuple(b.test.images.shape) == (3 * 2, SIZE, SIZE, 3)
    assert b.labeled is b.train
    # files are class-major in sorted order: ant (3 + 2 extra), bee (3 + gray), cat (3 + rgba)
    assert b.train.labels.tolist() == [0] * 5 + [1] * 4 + [2] * 4
    assert b.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(b.train.images[3], torch.from_numpy(exact))  # ant: 0,1,2,zz_exact,zz_wide
    # interior columns are pure green; the filter blends the two edge columns with red/blue a little
    assert b.train.images[4, :, 1:-1].tolist() == [[[0, 255, 0]] * (SIZE - 2)] * SIZE
    assert (b.train.images[4, :, [0, -1], 1] > 200).all()

    x = b.train.images.numpy().reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(b.mean, x.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(b.std, x.std(axis=0), rtol=0, atol=1e-12)
    assert isinstance(b.mean, tuple) and len(b.std) == 3
    assert any(line.startswith('decoding 13 images of') for line in log)


def test_folder_skips_and_reports_bad_files(tmp_path):
    root = tmp_path / 'ds'
    _make_folder(root, np.random.default_rng(0))
    (root / 'train' / 'bee' / 'broken.jpg').write_bytes(np.random.default_rng(2).bytes(300))
    (root / 'train' / 'cat' / 'notes.txt').write_text('not an image')
    log = _Log()
    b = load_dataset('folder', str(root), image_size=SIZE, log=log)
    assert len(b.train) == 11
    skipped = [line for line in log if line.startswith('skipped')]
    assert len(skipped) == 2
    assert any('broken.jpg' in line for line in skipped) and any('notes.txt' in line for line in skipped)
    # reported once: reuse mentions the count but does not repeat the files
    log2 = _Log()
    load_dataset('folder', str(root), image_size=SIZE, log=log2)
    assert not any(line.startswith('skipped') for line in log2)
    assert any('2 files were skipped' in line for line in log2)


def test_folder_layout_errors(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(DataError) as e:
        load_dataset('folder', str(tmp_path / 'nowhere'))
    assert 'nowhere' in _one_line(e)

    root = tmp_path / 'a'
    _make_folder(root, rng)
    os.makedirs(root / 'train' / 'dog')
    os.makedirs(root / 'test' / 'dog')
    with pytest.raises(DataError) as e:
        load_dataset('folder', str(root), image_size=SIZE, log=_Log())
    assert 'dog' in _one_line(e) and 'empty' in str(e.value)

    (root / 'test' / 'dog').rmdir()
    (root / 'train' / 'dog').rmdir()
    os.makedirs(root / 'train' / 'emu')
    _save(root / 'train' / 'emu' / '0.png', np.zeros((4, 4, 3), np.uint8))
    os.makedirs(root / 'test' / 'fox')
    _save(root / 'test' / 'fox' / '0.png', np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError) as e:
        load_dataset('folder', str(root), image_size=SIZE, log=_Log())
    msg = _one_line(e)
    assert 'emu' in msg and 'fox' in msg

    root = tmp_path / 'b'
    _make_folder(root, rng)
    for f in (root / 'test').rglob('*.*'):
        f.unlink()
    for d in sorted((root / 'test').iterdir()):
        d.rmdir()
    (root / 'test').rmdir()
    with pytest.raises(DataError) as e:
        load_dataset('folder', str(root), image_size=SIZE, log=_Log())
    assert 'test/' in _one_line(e)

    root = tmp_path / 'c'
    os.makedirs(root / 'train' / 'x')
    (root / 'train' / 'x' / 'a.txt').write_text('hi')
    os.makedirs(root / 'test' / 'x')
    with pytest.raises(DataError) as e:
        load_dataset('folder', str(root), image_size=SIZE, log=_Log())
    assert 'no image files' in _one_line(e)


def test_folder_cache_reuse_and_rebuild(tmp_path, monkeypatch):
    root = tmp_path / 'ds'
    _make_folder(root, np.random.default_rng(0))
    first = load_dataset('folder', str(root), image_size=SIZE, log=_Log())
    assert (root / '.simclr_cache' / 'train-8px.json').is_file()

    def no_decode(path, size):
        raise AssertionError('decoded although the cache is valid')

    with monkeypatch.context() as m, warnings.catch_warnings():
        warnings.simplefilter('error')  # e.g. torch's "non-writable NumPy array" warning
        m.setattr(data, '_decode_image', no_decode)
        log = _Log()
        again = load_dataset('folder', str(root), image_size=SIZE, log=log)
    assert sum(line.startswith('using cached') for line in log) == 2
    assert torch.equal(first.train.images, again.train.images)
    assert torch.equal(first.test.labels, again.test.labels)
    assert first.mean == again.mean and first.std == again.std
    # the reused images are memory-mapped from the cache file (copy-on-write, so torch did not warn)
    (images_file,) = [n for n in os.listdir(root / '.simclr_cache') if n.startswith('train-8px-') and 'labels' not in n]
    mapped = np.load(root / '.simclr_cache' / images_file, mmap_mode='r')
    assert np.array_equal(mapped[:len(again.train)], again.train.images.numpy())

    # a different size is a separate cache, not a reuse
    log = _Log()
    load_dataset('folder', str(root), image_size=SIZE + 2, log=log)
    assert sum(line.startswith('decoding') for line in log) == 2

    # adding an image invalidates the train cache only
    _save(root / 'train' / 'cat' / 'zz_new.png', np.full((SIZE, SIZE, 3), 7, np.uint8))
    log = _Log()
    grown = load_dataset('folder', str(root), image_size=SIZE, log=log)
    assert len(grown.train) == len(first.train) + 1
    assert any(line.startswith('decoding 12 images') for line in log)
    assert any(line.startswith('using cached') and 'test' in line for line in log)
    assert grown.train.images[-1].eq(7).all()
    # old build files of the split are cleaned up: one images + one labels file per split and size
    names = os.listdir(root / '.simclr_cache')
    assert sum(n.startswith('train-8px-') for n in names) == 2
    assert not any(n.startswith('.tmp-') for n in names)

    # modifying an image (same name) invalidates too
    _save(root / 'train' / 'cat' / 'zz_new.png', np.full((SIZE, SIZE, 3), 9, np.uint8))
    os.utime(root / 'train' / 'cat' / 'zz_new.png', ns=(1, 1))
    log = _Log()
    changed = load_dataset('folder', str(root), image_size=SIZE, log=log)
    assert any(line.startswith('decoding 12 images') for line in log)
    assert changed.train.images[-1].eq(9).all()


def test_folder_killed_build_leaves_no_usable_half_cache(tmp_path, monkeypatch):
    root = tmp_path / 'ds'
    _make_folder(root, np.random.default_rng(0))
    calls = []
    real = data._decode_image

    def dies_midway(path, size):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt  # stands in for the process being killed mid-build
        return real(path, size)

    monkeypatch.setattr(data, '_decode_image', dies_midway)
    with pytest.raises(KeyboardInterrupt):
        load_dataset('folder', str(root), image_size=SIZE, log=_Log())
    leftovers = os.listdir(root / '.simclr_cache')
    assert not any(n.endswith('.json') for n in leftovers) and not any(n.startswith('.tmp-') for n in leftovers)
    monkeypatch.setattr(data, '_decode_image', real)
    log = _Log()
    b = load_dataset('folder', str(root), image_size=SIZE, log=log)
    assert len(b.train) == 11 and any(line.startswith('decoding') for line in log)


def test_folder_read_only_root_uses_other_cache(tmp_path, monkeypatch):
    root = tmp_path / 'ds'
    _make_folder(root, np.random.default_rng(0))
    # Tests run as root, for whom chmod does not make a folder read-only: fake the check instead.
    monkeypatch.setattr(data, '_dir_writable', lambda p: not p.startswith(str(root)))
    monkeypatch.setattr(data, '_DEFAULT_CACHE_BASE', str(tmp_path / 'home-cache'))
    b = load_dataset('folder', str(root), image_size=SIZE, log=_Log())
    assert len(b.train) == 11
    assert not (root / '.simclr_cache').exists()
    (sub,) = os.listdir(tmp_path / 'home-cache')  # one folder named by a hash of the root path
    assert (tmp_path / 'home-cache' / sub / 'train-8px.json').is_file()

    explicit = tmp_path / 'mine'
    log = _Log()
    b2 = load_dataset('folder', str(root), image_size=SIZE, cache_dir=str(explicit), log=log)
    assert (explicit / 'train-8px.json').is_file() and (explicit / 'test-8px.json').is_file()
    assert torch.equal(b.train.images, b2.train.images)
    log = _Log()
    load_dataset('folder', str(root), image_size=SIZE, cache_dir=str(explicit), log=log)
    assert all(line.startswith('using cached') and str(explicit) in line for line in log)


def test_folder_parallel_decode_matches_serial(tmp_path, monkeypatch):
    root = tmp_path / 'ds'
    _make_folder(root, np.random.default_rng(0))
    (root / 'train' / 'bee' / 'broken.png').write_bytes(b'\x89PNG nonsense')
    serial = load_dataset('folder', str(root), image_size=SIZE, cache_dir=str(tmp_path / 'c1'), log=_Log())
    # Force the worker pool on this tiny set so its code path (ordering, failures) is exercised.
    monkeypatch.setattr(data, '_POOL_MIN_FILES', 1)
    monkeypatch.setattr(data, '_n_workers', lambda: 2)
    log = _Log()
    par = load_dataset('folder', str(root), image_size=SIZE, cache_dir=str(tmp_path / 'c2'), log=log)
    assert torch.equal(serial.train.images, par.train.images)
    assert torch.equal(serial.train.labels, par.train.labels)
    assert serial.mean == par.mean
    assert sum('broken.png' in line for line in log) == 1


def test_unknown_dataset_name():
    with pytest.raises(DataError) as e:
        load_dataset('mnist', '/nonexistent')
    assert 'cifar10' in _one_line(e)


# ---------------------------------------------------------------------------------------------
# torchvision data sets: tiny files in the on-disk formats torchvision reads
# ---------------------------------------------------------------------------------------------

def _write_cifar10(root, rng) -> dict:
    """root/cifar-10-batches-py with 5 x 2 train and 3 test images; returns the arrays written."""
    train = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    train_y = rng.integers(0, 10, 10).tolist()
    test = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    test_y = [9, 0, 4]
    write_cifar10_files(root, train, train_y, test, test_y)
    return {'train': train, 'train_y': train_y, 'test': test, 'test_y': test_y, 'classes': list(CIFAR10_CLASSES)}


def test_cifar10_from_disk(tmp_path, monkeypatch):
    _skip_md5(monkeypatch)
    _no_network(monkeypatch)
    ref = _write_cifar10(tmp_path, np.random.default_rng(0))
    b = load_dataset('cifar10', str(tmp_path), download=True, log=_Log())
    assert b.name == 'cifar10' and b.image_size == 32 and b.classes == ref['classes']
    assert b.labeled is b.train
    assert b.train.images.dtype == torch.uint8 and b.train.images.is_contiguous()
    assert torch.equal(b.train.images, torch.from_numpy(ref['train']))
    assert b.train.labels.dtype == torch.int64 and b.train.labels.tolist() == ref['train_y']
    assert torch.equal(b.test.images, torch.from_numpy(ref['test']))
    assert b.test.labels.tolist() == ref['test_y']
    assert b.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=1e-3)
    assert b.std == pytest.approx((0.2470, 0.2435, 0.2616), abs=1e-3)

    small = load_dataset('cifar10', str(tmp_path), image_size=16, download=False, log=_Log())
    assert tuple(small.train.images.shape) == (10, 16, 16, 3) and small.train.images.dtype == torch.uint8
    # an antialiased 2x shrink of a constant image stays constant
    assert small.train.images.float().mean().item() == pytest.approx(ref['train'].mean(), abs=3)


def test_cifar10_archive_is_extracted_offline(tmp_path, monkeypatch):
    _skip_md5(monkeypatch)
    _no_network(monkeypatch)
    import torchvision.datasets.utils as tv_utils

    src = tmp_path / 'src'
    ref = _write_cifar10(src, np.random.default_rng(3))
    root = tmp_path / 'root'
    root.mkdir()
    with tarfile.open(root / 'cifar-10-python.tar.gz', 'w:gz') as tar:
        tar.add(src / 'cifar-10-batches-py', arcname='cifar-10-batches-py')
    # Our fake archive cannot match the published md5; with it accepted, torchvision's download_url
    # returns early (no network) and the archive is only extracted.
    monkeypatch.setattr(tv_utils, 'check_integrity', lambda path, md5=None: os.path.isfile(path))
    monkeypatch.setattr(tv_utils, 'download_url', lambda url, root, filename=None, md5=None: None)
    log = _Log()
    b = load_dataset('cifar10', str(root), download=False, log=log)
    assert torch.equal(b.test.images, torch.from_numpy(ref['test']))
    assert any('extracting cifar-10-python.tar.gz' in line for line in log)


def _offline_folder(tmp_path, monkeypatch, name: str, seed: int, size: int, counts: tuple[int, ...]):
    """tmp_path/NAME, with md5 checks and the network off; random uint8 images of (count, size, size, 3) each."""
    _skip_md5(monkeypatch)
    _no_network(monkeypatch)
    folder = tmp_path / name
    folder.mkdir()
    rng = np.random.default_rng(seed)
    return folder, [rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) for n in counts]


def test_cifar100_from_disk(tmp_path, monkeypatch):
    folder, (train, test) = _offline_folder(tmp_path, monkeypatch, 'cifar-100-python', 1, 32, (6, 4))
    train_y, test_y = [99, 0, 5, 5, 42, 1], [3, 2, 1, 0]
    _pickle(folder / 'train', {'data': _cifar_rows(train), 'fine_labels': train_y, 'coarse_labels': [0] * 6})
    _pickle(folder / 'test', {'data': _cifar_rows(test), 'fine_labels': test_y, 'coarse_labels': [0] * 4})
    names = [f'class{i:02d}' for i in range(100)]
    _pickle(folder / 'meta', {'fine_label_names': names, 'coarse_label_names': [f'c{i}' for i in range(20)]})
    b = load_dataset('cifar100', str(tmp_path), log=_Log())
    assert b.classes == names and b.labeled is b.train
    assert torch.equal(b.train.images, torch.from_numpy(train)) and b.train.labels.tolist() == train_y
    assert torch.equal(b.test.images, torch.from_numpy(test)) and b.test.labels.tolist() == test_y
    assert b.mean == pytest.approx((0.5071, 0.4865, 0.4409), abs=1e-3)


def _stl_bytes(images: np.ndarray) -> bytes:
    """(N, 96, 96, 3) -> STL-10's layout: per image, per channel, column-major 96 x 96 bytes."""
    return np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes()


def test_stl10_from_disk(tmp_path, monkeypatch):
    folder, (train, unlabeled, test) = _offline_folder(tmp_path, monkeypatch, 'stl10_binary', 2, 96, (4, 3, 2))
    train_y, test_y = [1, 10, 3, 3], [2, 7]  # STL-10 labels are 1..10 on disk
    (folder / 'train_X.bin').write_bytes(_stl_bytes(train))
    (folder / 'train_y.bin').write_bytes(bytes(train_y))
    (folder / 'unlabeled_X.bin').write_bytes(_stl_bytes(unlabeled))
    (folder / 'test_X.bin').write_bytes(_stl_bytes(test))
    (folder / 'test_y.bin').write_bytes(bytes(test_y))
    names = ['airplane', 'bird', 'car', 'cat', 'deer', 'dog', 'horse', 'monkey', 'ship', 'truck']
    (folder / 'class_names.txt').write_text('\n'.join(names) + '\n')
    (folder / 'fold_indices.txt').write_text('0 1\n2 3\n')

    b = load_dataset('stl10', str(tmp_path), log=_Log())
    assert b.name == 'stl10' and b.image_size == 96 and b.classes == names
    assert len(b.train) == 7 and len(b.labeled) == 4 and len(b.test) == 2
    assert b.train.images.is_contiguous() and b.train.images.dtype == torch.uint8
    # pixels round-trip in the right orientation (a transposed image would differ: they are random)
    assert torch.equal(b.train.images[:4], torch.from_numpy(train))
    assert torch.equal(b.train.images[4:], torch.from_numpy(unlabeled))
    assert torch.equal(b.test.images, torch.from_numpy(test))
    assert b.train.labels.dtype == torch.int64 and b.train.labels.tolist() == [0, 9, 2, 2, -1, -1, -1]
    assert b.labeled.labels.tolist() == [0, 9, 2, 2] and (b.labeled.labels >= 0).all()
    assert torch.equal(b.labeled.images, torch.from_numpy(train))
    # the memory bank is a view of the labeled training rows, not a second copy
    assert b.labeled.images.data_ptr() == b.train.images.data_ptr()
    assert b.test.labels.tolist() == [1, 6]

    small = load_dataset('stl10', str(tmp_path), image_size=32, log=_Log())
    assert tuple(small.train.images.shape) == (7, 32, 32, 3) and tuple(small.labeled.images.shape) == (4, 32, 32, 3)
    assert tuple(small.test.images.shape) == (2, 32, 32, 3)


# ---------------------------------------------------------------------------------------------
# offline / missing files
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name, archive', [('cifar10', 'cifar-10-python.tar.gz'),
                                           ('cifar100', 'cifar-100-python.tar.gz'),
                                           ('stl10', 'stl10_binary.tar.gz')])
def test_offline_message(tmp_path, monkeypatch, name, archive):
    _no_network(monkeypatch)
    log = _Log()
    with pytest.raises(DataError) as e:
        load_dataset(name, str(tmp_path / 'data'), log=log)
    msg = _one_line(e)
    assert archive in msg and 'http' in msg and 'could not be downloaded' in msg
    assert isinstance(e.value.__cause__, OSError)

    with pytest.raises(DataError) as e:
        load_dataset(name, str(tmp_path / 'data'), download=False, log=log)
    msg = _one_line(e)
    assert archive in msg and 'downloading is off' in msg
