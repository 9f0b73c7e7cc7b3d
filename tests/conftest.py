"""Shared fixtures: a tiny image-folder data set made by the tests (never a download), the flags of a
tiny main.py run (written once, here), and a tiny trained run."""
import contextlib
import fcntl
import os
import shutil
import subprocess
import sys

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
