"""A trained run in your own code: its encoder, and its images' preprocessing read from NAME_config.json.

    import simclr, torch
    encoder, preprocess = simclr.load_encoder("results/NAME_model.pth")
    with torch.no_grad():
        h = encoder(preprocess(images))          # (N, feature_width) encoder features

`images` is one image or several: a PIL image, an image file's path, a uint8 array or tensor
(H, W, 3) or (3, H, W), a batch (N, H, W, 3) or (N, 3, H, W), or a list of any of these. Each image
is brought to the run's input as main.py's folder data set does (RGB, shorter side resized to the
run's image size, centre-cropped), then scaled to [0, 1] and normalised with the run's mean and std.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .augment import normalize
from .checkpoint import open_run, read_run_config
from .data import fit_image
from .flags import DEFAULT_IMAGE_SIZE
from .model import FeatureEncoder


@dataclass(frozen=True)
class Preprocess:
    """Images -> the encoder's input (N, 3, S, S) float32 on the CPU, as the run's images were before augmentation."""
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images) -> torch.Tensor:
        pixels = torch.stack([self.fit(image) for image in one_by_one(images)])   # (N, S, S, 3) uint8
        return normalize(pixels, self.mean, self.std)                              # (N, 3, S, S)

    def fit(self, image) -> torch.Tensor:
        """One image -> uint8 (S, S, 3)."""
        size = self.image_size
        if isinstance(image, (str, os.PathLike)):
            with Image.open(image) as opened:
                return as_tensor(fit_image(opened, size))
        if isinstance(image, Image.Image):
            return as_tensor(fit_image(image, size))
        hwc = channels_last(image)
        if tuple(hwc.shape[:2]) == (size, size):  # already the run's size: as the data set holds it
            return hwc
        return as_tensor(fit_image(Image.fromarray(hwc.numpy()), size))


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A numpy array as a tensor of its own (PIL's arrays are read-only, which torch warns about)."""
    return torch.from_numpy(np.array(array))


def one_by_one(images) -> list:
    """A single image or a batch or list of them -> a list of single images."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, np.ndarray):
        images = as_tensor(images)
    if isinstance(images, torch.Tensor):
        if images.dim() == 4:
            return list(images)
        if images.dim() == 3:
            return [images]
        raise ValueError(f"images of shape {tuple(images.shape)}: pass (H, W, 3), (3, H, W) or a batch of them")
    return [images]


def channels_last(image) -> torch.Tensor:
    """A uint8 array or tensor (H, W, 3) or (3, H, W) -> a CPU uint8 tensor (H, W, 3)."""
    if isinstance(image, np.ndarray):
        image = as_tensor(image)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"cannot read an image from a {type(image).__name__}: pass a PIL image, a path, or a uint8 "
                        f"array or tensor")
    if image.dtype != torch.uint8:
        raise TypeError(f"images must hold uint8 pixels 0-255 (as read from a file), got {image.dtype}")
    if image.dim() == 3 and image.shape[-1] == 3:
        return image.cpu()
    if image.dim() == 3 and image.shape[0] == 3:
        return image.permute(1, 2, 0).contiguous().cpu()
    raise ValueError(f"an image of shape {tuple(image.shape)}: pass (H, W, 3) or (3, H, W) RGB pixels")


def preprocess_for(config: str | dict) -> Preprocess:
    """The preprocessing of a run: its image size, mean and std, from NAME_config.json (a path, or the dict read)."""
    saved = read_run_config(config) if isinstance(config, (str, os.PathLike)) else config
    missing = [key for key in ("mean", "std") if key not in saved]
    if missing:
        raise ValueError(f"the run config lacks {', '.join(missing)}: pass the NAME_config.json written by main.py")
    size = saved.get("image_size") or DEFAULT_IMAGE_SIZE.get(saved.get("dataset"), DEFAULT_IMAGE_SIZE["cifar10"])
    return Preprocess(int(size), tuple(saved["mean"]), tuple(saved["std"]))


def load_encoder(weights: str, config: str | None = None,
                 device: str | torch.device = "cpu") -> tuple[FeatureEncoder, Preprocess]:
    """(encoder in eval mode on `device`, preprocess) of a run's NAME_model.pth (or NAME_last.pth): the encoder
    rebuilt from the run config (`config`, else NAME_config.json beside the weights) and loaded strictly with
    weights_only=True; preprocess(images) gives its input, on the CPU (move it to `device`)."""
    model, saved = open_run(weights, config, encoder_only=True)
    return FeatureEncoder(model).to(device).eval(), preprocess_for(saved)
