"""Shared fixtures: a tiny image-folder data set made by the tests (never a download), the flags of a
tiny main.py run (written once, here), and a tiny trained run."""
import contextlib
import fcntl
import os
import pickle
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: N workers share the cores; one thread each (and in the scripts they start) keeps them
    # from waiting on each other's OpenMP barriers
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The tests marked long first (their order otherwise kept): under pytest -n N a long test that starts last
    keeps one worker busy while the others have finished."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


CLASSES = ("cat", "dog", "frog")
# a tiny CPU run on the tiny folder data set: 48 training images at batch 8 are 6 steps an epoch, with the
# encoder table's tiny CNN (64-d features): the tests of what a run does around the network need no ResNet,
# and the tests of the ResNets name one (model, BatchNorm, distributed, bench, the end-to-end runs)
TINY_ARCH, TINY_WIDTH = "tiny", 64
TINY_RUN = {"dataset": "folder", "image_size": 16, "arch": TINY_ARCH, "batch_size": 8, "epochs": 1, "k": 5,
            "feature_dim": 16, "proj_hidden_dim": 32, "device": "cpu", "workers": 0}


def tiny_run_args(data, results, name: str | None = None, *extra: str, **overrides) -> list[str]:
    """main.py's flags for a tiny CPU run on the folder data set `data`, writing to `results`.

    `overrides` replace or add flags (epochs=2, tensorboard=True, channels_last=False; None drops a
    flag); `extra` are raw arguments appended at the end ("--resume", "auto").
    """
    values = {**TINY_RUN, "data_root": data, "results_dir": results, "name": name, **overrides}
    return [*as_flags(values), *extra]


def as_flags(values: dict) -> list[str]:
    """{"epochs": 2, "blur": True, "channels_last": False, "name": None} -> ["--epochs", "2", "--blur", "--no-channels_last"]."""
    args: list[str] = []
    for flag, value in values.items():
        if value is None:
            continue
        if value is True or value is False:
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", str(value)]
    return args


def run_main(args: list[str], script: str = "main.py", timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a script of the repository (main.py unless told) as a subprocess; assert it exits 0."""
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def write_folder(root, train_per_class=16, test_per_class=6, size=16, seed=0):
    """root/{train,test}/<class>/*.png: noisy images whose colour and stripes depend on the class."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 60, (size, size, 3))
                image[..., c] += 150
                image[:, c::3] += 40  # a class-specific stripe pattern survives grayscale
                Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def made_once(tmp_path_factory, name: str, make) -> "os.PathLike":
    """A folder that `make(folder)` fills once per test run, also under pytest -n N: the workers share it (the
    first one to get the lock makes it, the others wait and read it), so a costly set-up runs once in all."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # pytest-of-USER/pytest-N/
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(folder)  # what a failed attempt left
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A 3-class folder data set: 48 train and 18 test 16x16 images."""
    return write_folder(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session")
def trained(tiny_folder, tmp_path_factory):
    """A real (tiny) main.py run, as a subprocess: its results folder holds run_model.pth and run_config.json."""
    results = tmp_path_factory.mktemp("trained") / "results"
    run_main(tiny_run_args(tiny_folder, results, "run", train_subset=16))
    assert (results / "run_model.pth").is_file() and (results / "run_config.json").is_file()
    return results


def copy_run(trained, folder, name: str, state: dict | None = None) -> str:
    """folder/NAME_model.pth (the trained weights, or `state`) with the trained run's config beside it."""
    os.makedirs(folder, exist_ok=True)
    shutil.copy(trained / "run_config.json", os.path.join(folder, f"{name}_config.json"))
    path = os.path.join(folder, f"{name}_model.pth")
    if state is None:
        shutil.copy(trained / "run_model.pth", path)
    else:
        torch.save(state, path)
    return path


# ----------------------------------------------------------------------------- torchvision's on-disk formats

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def pickle_to(path, obj) -> None:
    """Pickle obj to path."""
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> (N, 3072) rows: all red, then green, then blue, row-major like the real files."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_cifar10_files(root, train: np.ndarray, train_y: list, test: np.ndarray, test_y: list) -> None:
    """root/cifar-10-batches-py as torchvision's CIFAR10 reads it: the training images (N, 32, 32, 3) over five
    data batches, the test images in test_batch, the class names in batches.meta."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    # The real files are Python 2 pickles; torchvision loads them with encoding='latin1', which
    # turns their keys into str (they read as b'data' only with encoding='bytes').
    bounds = np.linspace(0, len(train), 6).round().astype(int)
    for i in range(5):
        sl = slice(bounds[i], bounds[i + 1])
        pickle_to(os.path.join(folder, f"data_batch_{i + 1}"), {"data": cifar_rows(train[sl]), "labels": train_y[sl]})
    pickle_to(os.path.join(folder, "test_batch"), {"data": cifar_rows(test), "labels": test_y})
    pickle_to(os.path.join(folder, "batches.meta"), {"label_names": list(CIFAR10_CLASSES)})


def accept_fake_torchvision_files(monkeypatch) -> None:
    """Make torchvision accept fake CIFAR/STL files whose md5 sums cannot match the published ones."""
    import torchvision.datasets as tvd
    import torchvision.datasets.cifar as tv_cifar

    def files_exist(self) -> bool:
        folder = os.path.join(self.root, self.base_folder)
        return all(os.path.isfile(os.path.join(folder, f)) for f, _ in self.train_list + self.test_list)

    # torchvision checks every file against its published md5 sum; fakes can only be checked for existence.
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", files_exist)
    monkeypatch.setattr(tvd.CIFAR100, "_check_integrity", files_exist)
    monkeypatch.setattr(tvd.STL10, "_check_integrity", files_exist)
    # CIFAR's meta file is verified separately by the module-level check_integrity.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def no_network(monkeypatch) -> None:
    """Any download attempt fails as if offline, without touching the network."""
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
