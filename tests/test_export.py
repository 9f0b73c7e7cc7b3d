"""export_images.py: CIFAR-10 from torchvision's files on disk (a fake made here, no download) written as the image
folders --dataset folder reads, all of it or a per-class subset, whole or not at all."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import export_images
from conftest import CIFAR10_CLASSES, accept_fake_torchvision_files, no_network, write_cifar10_files
from simclr.data import load_dataset

TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 2


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    """tmp_path/data/cifar-10-batches-py with 3 training and 2 test images per class, in torchvision's format."""
    accept_fake_torchvision_files(monkeypatch)
    no_network(monkeypatch)
    rng = np.random.default_rng(0)
    train_y = rng.permutation(np.repeat(np.arange(10), TRAIN_PER_CLASS)).tolist()
    test_y = rng.permutation(np.repeat(np.arange(10), TEST_PER_CLASS)).tolist()
    train = rng.integers(0, 256, (len(train_y), 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (len(test_y), 32, 32, 3), dtype=np.uint8)
    write_cifar10_files(tmp_path / "data", train, train_y, test, test_y)
    return {"root": tmp_path / "data", "train": (train, train_y), "test": (test, test_y)}


def by_folder_order(images: np.ndarray, labels: list, keep: list[int] | None = None) -> tuple[torch.Tensor, list]:
    """The images in the order the folder data set lists them: by class, then by index (the file name)."""
    order = sorted(keep if keep is not None else range(len(labels)), key=lambda i: (labels[i], i))
    return torch.from_numpy(images[order]), [labels[i] for i in order]


def test_png_folders_hold_the_exact_images_in_the_label_order(cifar, tmp_path, capsys):
    out = tmp_path / "cifar10-png"
    assert export_images.main(["--data_root", str(cifar["root"]), "--out", str(out), "--format", "png"]) == 0
    assert f"done: 30 train, 20 test images of 10 classes in {out}/" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["test", "train"]
    bundle = load_dataset("folder", str(out), 32, log=lambda line: None)
    assert bundle.classes == list(CIFAR10_CLASSES)  # sorted folder names are CIFAR-10's label order
    for split, got in (("train", bundle.train), ("test", bundle.test)):
        images, labels = by_folder_order(*cifar[split])
        assert torch.equal(got.images, images) and got.labels.tolist() == labels, split
    first = sorted(i for i, y in enumerate(cifar["train"][1]) if y == 3)[0]
    assert (out / "train" / "cat" / f"{first:05d}.png").is_file()  # the file names are torchvision's indices


def test_a_jpeg_subset_keeps_the_first_images_of_each_class(cifar):
    args = ["--data_root", str(cifar["root"]), "--train_per_class", "1", "--test_per_class", "2"]
    assert export_images.main(args) == 0
    out = cifar["root"] / "cifar10-jpg"  # the default --out: DATA_ROOT/DATASET-FORMAT
    train_y = cifar["train"][1]
    firsts = [min(i for i, y in enumerate(train_y) if y == c) for c in range(10)]
    names = sorted(f"{CIFAR10_CLASSES[train_y[i]]}/{i:05d}.jpg" for i in firsts)
    assert sorted(f"{c}/{f}" for c in os.listdir(out / "train") for f in os.listdir(out / "train" / c)) == names
    with Image.open(out / "train" / names[0]) as image:
        assert image.format == "JPEG" and image.size == (32, 32)
    bundle = load_dataset("folder", str(out), 32, log=lambda line: None)
    images, labels = by_folder_order(*cifar["train"], keep=firsts)
    assert bundle.train.labels.tolist() == labels and len(bundle.test) == 20
    # quality 95, 4:4:4: close to the pixels, although noise is the hardest case for JPEG
    error = (bundle.train.images.float() - images.float()).abs().mean()
    assert error < 6, error  # 4:2:0 chroma subsampling would be about 47 here


def test_an_existing_folder_is_refused_and_an_empty_one_filled(cifar, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    assert export_images.main(["--data_root", str(cifar["root"]), "--out", str(taken)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists and is not empty" in err, err
    assert os.listdir(taken) == ["mine.txt"] and (taken / "mine.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_images.main(["--data_root", str(cifar["root"]), "--out", str(empty), "--test_per_class", "1"]) == 0
    assert sorted(os.listdir(empty)) == ["test", "train"]


def test_a_stop_midway_leaves_no_folder_and_no_temporary(cifar, tmp_path, monkeypatch, capsys):
    real_save, saved = Image.Image.save, []

    def stop_after_five(self, *args, **kwargs):
        if len(saved) == 5:
            raise KeyboardInterrupt
        saved.append(args[0])
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", stop_after_five)
    out = tmp_path / "out"
    assert export_images.main(["--data_root", str(cifar["root"]), "--out", str(out)]) == 130
    assert len(saved) == 5 and not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["data"]  # the temporary folder is gone too


def test_offline_without_the_files_says_what_to_put_where(tmp_path, monkeypatch, capsys):
    no_network(monkeypatch)
    assert export_images.main(["--data_root", str(tmp_path / "data"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "put cifar-10-python.tar.gz" in err and str(tmp_path / "data") in err, err
    assert not (tmp_path / "out").exists()
