"""Shared fixtures: a tiny image-folder data set made by the tests (never a download), and a tiny trained run."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

CLASSES = ("cat", "dog", "frog")


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


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A 3-class folder data set: 48 train and 18 test 16x16 images."""
    return write_folder(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session")
def trained(tiny_folder, tmp_path_factory):
    """A real (tiny) main.py run, as a subprocess: its results folder holds run_model.pth and run_config.json."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = tmp_path_factory.mktemp("trained") / "results"
    args = ["--dataset", "folder", "--data_root", str(tiny_folder), "--image_size", "16", "--arch", "resnet18",
            "--batch_size", "8", "--train_subset", "16", "--epochs", "1", "--k", "5", "--feature_dim", "16",
            "--proj_hidden_dim", "32", "--device", "cpu", "--workers", "0", "--results_dir", str(results),
            "--name", "run"]
    proc = subprocess.run([sys.executable, "main.py", *args], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
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
