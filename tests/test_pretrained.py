"""A trained run in the user's own code: simclr.load_encoder gives the run's encoder and the preprocessing its images
had (size, crop and the mean/std of NAME_config.json), from any input form and from any working folder."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import simclr
from conftest import ROOT, TINY_WIDTH, write_folder
from simclr.data import load_dataset
from simclr.model import SimCLR


def reference_input(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> (N, 3, H, W) float, (x / 255 - mean) / std, written out by hand."""
    x = pixels.double().permute(0, 3, 1, 2) / 255.0
    return ((x - torch.tensor(mean, dtype=torch.float64)[:, None, None])
            / torch.tensor(std, dtype=torch.float64)[:, None, None]).float()


def test_load_encoder_gives_the_runs_features(trained, tiny_folder):
    encoder, preprocess = simclr.load_encoder(str(trained / "run_model.pth"))
    config = json.loads((trained / "run_config.json").read_text())
    assert not encoder.training and encoder.feature_width == TINY_WIDTH
    assert (preprocess.image_size, preprocess.mean, preprocess.std) == (16, tuple(config["mean"]), tuple(config["std"]))
    by_hand = SimCLR(config["arch"], config["feature_dim"], config["proj_hidden_dim"], config["stem"])
    by_hand.load_state_dict(torch.load(trained / "run_model.pth", weights_only=True))
    by_hand.eval()
    pixels = load_dataset("folder", str(tiny_folder), 16, log=lambda line: None).test.images[:5]   # (5, 16, 16, 3)
    x = preprocess(pixels)
    torch.testing.assert_close(x, reference_input(pixels, config["mean"], config["std"]), rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(encoder(x), by_hand.encode(x))
        assert encoder(x).shape == (5, TINY_WIDTH)


def test_every_input_form_gives_the_same_input(trained, tiny_folder):
    preprocess = simclr.preprocess_for(str(trained / "run_config.json"))
    path = sorted((tiny_folder / "test" / "cat").iterdir())[0]
    hwc = np.array(Image.open(path).convert("RGB"))                        # (16, 16, 3) uint8
    expected = preprocess(torch.from_numpy(hwc)[None])
    forms = [str(path), path, Image.open(path), hwc, torch.from_numpy(hwc), torch.from_numpy(hwc).permute(2, 0, 1),
             [Image.open(path)], np.stack([hwc])]
    for form in forms:
        assert torch.equal(preprocess(form), expected), type(form)
    batch = preprocess([str(path), hwc, torch.from_numpy(hwc).permute(2, 0, 1)])
    assert batch.shape == (3, 3, 16, 16) and all(torch.equal(b, expected[0]) for b in batch)


def test_other_sizes_are_resized_and_cropped_as_the_folder_data_set_does(tmp_path, trained):
    # one 40x24 photo in a folder data set: its cached 16x16 pixels are what preprocess must give
    root = write_folder(tmp_path / "data", train_per_class=2, test_per_class=1)
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(big).save(root / "test" / "cat" / "000.png")
    held = load_dataset("folder", str(root), 16, log=lambda line: None).test.images[0]   # the cat image, first
    preprocess = simclr.preprocess_for(str(trained / "run_config.json"))
    config = json.loads((trained / "run_config.json").read_text())
    expected = reference_input(held[None], config["mean"], config["std"])
    for form in (str(root / "test" / "cat" / "000.png"), big, torch.from_numpy(big).permute(2, 0, 1)):
        torch.testing.assert_close(preprocess(form), expected, rtol=0, atol=1e-6)


def test_wrong_inputs_are_named(trained):
    preprocess = simclr.preprocess_for(str(trained / "run_config.json"))
    with pytest.raises(TypeError, match="uint8 pixels"):
        preprocess(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match=r"shape \(16, 16\)"):
        preprocess([torch.zeros(16, 16, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="shape"):
        preprocess(torch.zeros(2, 2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="cannot read an image from a int"):
        preprocess([7])
    with pytest.raises(ValueError, match="lacks mean, std"):
        simclr.preprocess_for({"dataset": "cifar10"})


def test_the_readme_snippet_runs_from_another_folder(trained, tmp_path):
    # as after `pip install -e .`: the package on the path, the working folder holds no model.py or simclr/
    code = ("import sys, simclr\n"
            "assert 'torch' not in sys.modules, 'import simclr imported torch'\n"
            "import torch\n"
            f"encoder, preprocess = simclr.load_encoder({str(trained / 'run_model.pth')!r})\n"
            "with torch.no_grad():\n"
            "    h = encoder(preprocess(torch.zeros(2, 16, 16, 3, dtype=torch.uint8)))\n"
            "print(tuple(h.shape))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"(2, {TINY_WIDTH})"
