"""main.py's random stream on the PIL path: per-image seeded views must be drawn as torchvision's own.

The views of image i in epoch e come from a CPU generator seeded with mix_seed(seed, e, i). The
CPU generator keeps only the low 32 bits of a seed, so those bits must differ between images and
epochs, and the seeded draws must have the same distribution as one continuing generator (the
original tool's DataLoader workers), with no link between the two views, or between epochs.
"""
from __future__ import annotations

import torch
import torchvision.transforms as T
from PIL import Image

from references import pil_simclr_transform
from simclr.augment import AugmentConfig, pil_transform
from simclr.data import PilViews
from simclr.engine import mix_seed

N = 1500  # images; 2 views each


def test_the_cpu_generator_keeps_the_low_32_bits_and_mix_seed_varies_them():
    with torch.random.fork_rng(devices=[]):  # leave the global generator as the other tests find it
        torch.manual_seed(12345)
        a = torch.rand(4)
        torch.manual_seed(12345 + 2 ** 40)
        assert torch.equal(a, torch.rand(4))  # why the low bits are what matters
    low = [mix_seed(s, e, i) & 0xFFFFFFFF for s in range(4) for e in range(4) for i in range(3000)]
    assert len(set(low)) == len(low)


def _crop_areas(monkeypatch, draw) -> torch.Tensor:
    """Run draw(); return the area fraction of every RandomResizedCrop it made, in order."""
    areas: list[float] = []
    original = T.RandomResizedCrop.get_params

    def spy(img, scale, ratio):
        i, j, h, w = original(img, scale, ratio)
        areas.append(h * w / (img.size[0] * img.size[1]))
        return i, j, h, w

    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(spy))
    draw()
    monkeypatch.undo()
    return torch.tensor(areas)


def _images(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _transform():
    """The product's PIL pipeline, which main.py's PilViews runs."""
    return pil_transform(AugmentConfig(image_size=32, mean=MEAN, std=STD))


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    grid = torch.cat([a, b]).unique()
    cdf = lambda x: torch.searchsorted(x.sort().values, grid, right=True) / len(x)  # noqa: E731
    return (cdf(a) - cdf(b)).abs().max().item()


def test_seeded_views_are_drawn_like_one_continuing_generator(monkeypatch):
    images, transform = _images(N), _transform()
    views = PilViews(images, transform, seed=3, epoch=0)
    seeded = _crop_areas(monkeypatch, lambda: [views[i] for i in range(N)])

    # against torchvision's pipeline as the original tool ran it: one continuing generator
    pictures = [Image.fromarray(images[i].numpy()) for i in range(N)]
    reference = pil_simclr_transform(32, MEAN, STD)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        continuing = _crop_areas(monkeypatch, lambda: [(reference(p), reference(p)) for p in pictures])

    assert len(seeded) == len(continuing) == 2 * N
    # 2N = 3000 draws a side: the KS distance of two samples of one law stays below 0.05 with p > 0.999;
    # 0.06 leaves a margin
    assert _ks(seeded, continuing) < 0.06
    assert abs(seeded.mean().item() - continuing.mean().item()) < 0.03
    assert seeded.unique().numel() > 100  # not one crop for every image


def test_seeded_views_are_independent_between_views_and_epochs_and_reproducible(monkeypatch):
    images, transform = _images(N), _transform()
    epoch0 = _crop_areas(monkeypatch, lambda: [PilViews(images, transform, 3, 0)[i] for i in range(N)]).view(N, 2)
    epoch1 = _crop_areas(monkeypatch, lambda: [PilViews(images, transform, 3, 1)[i] for i in range(N)]).view(N, 2)
    # correlations over 1500 images: about 0.026 apart from zero by chance
    corr = lambda a, b: torch.corrcoef(torch.stack([a, b]))[0, 1].abs().item()  # noqa: E731
    assert corr(epoch0[:, 0], epoch0[:, 1]) < 0.1   # view 1 against view 2
    assert corr(epoch0[:, 0], epoch1[:, 0]) < 0.1   # an image's view in epoch 1 against epoch 2
    assert not torch.equal(epoch0, epoch1)
    v1, v2 = PilViews(images, transform, 3, 0)[7]
    w1, w2 = PilViews(images, transform, 3, 0)[7]
    assert torch.equal(v1, w1) and torch.equal(v2, w2) and not torch.equal(v1, v2)
