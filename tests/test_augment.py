"""Tests for augment.py, with torchvision's per-image functional ops as the reference."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from references import pil_simclr_transform  # noqa: E402
from simclr import augment as A  # noqa: E402

# Linear ops (crop, brightness, contrast, saturation, grayscale, blur, normalize) differ
# from torchvision only in float32 summation order: a few ulp of values in [0, 1].
LINEAR_TOL = 1e-5
# Hue goes through a division by the chroma and a different (but equivalent) HSV->RGB
# formula; errors stay around 2e-6, so the same bound still holds with margin.
HUE_TOL = 1e-5
# The whole pipeline chains up to 7 ops (observed max error ~2e-6); contrast and
# saturation can amplify earlier errors by up to 2x, still well inside 1e-5.
PIPELINE_TOL = 1e-5

IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _gen(seed: int) -> torch.Generator:
    """CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(seed)


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(B, H, W, 3) uint8 random images, a few of them gray or with tied channels."""
    x = torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=_gen(seed))
    x[0] = x[0, :, :, :1]  # gray image: hue undefined, chroma 0
    x[1:2] = (x[1:2] // 64) * 64  # many equal channel values: hue case ties
    return x


def _chw(x: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [0, 1], like ToTensor."""
    return x.permute(2, 0, 1).float() / 255.0


def _rand_float(b: int, s: int, seed: int) -> torch.Tensor:
    """(B, 3, S, S) float images in [0, 1] with a gray one and tied channels."""
    x = torch.rand(b, 3, s, s, generator=_gen(seed))
    x[0] = x[0, :1]
    x[1] = (x[1] * 4).round() / 4
    return x


# ----------------------------------------------------------------------------------
# Single ops versus torchvision functional ops
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("use_matmul", [True, False])
@pytest.mark.parametrize("hw", [(32, 32), (24, 40)])
def test_crop_resize_flip_matches_resized_crop(use_matmul: bool, hw: tuple[int, int]) -> None:
    h, w = hw
    b, s = 48, 32
    x = _images(b, h, w, seed=1)
    p = A.sample_params(b, h, w, A.AugmentConfig(s, *IDENTITY), _gen(2))
    out = A.crop_resize_flip(x, p["top"], p["left"], p["height"], p["width"], p["flip"], s, use_matmul)
    assert out.shape == (b, 3, s, s) and out.dtype == torch.float32
    assert bool(p["flip"].any()) and bool((~p["flip"]).any())
    for i in range(b):
        box = [int(p[k][i]) for k in ("top", "left", "height", "width")]
        # Boxes up to S: torchvision's antialias is a no-op. Larger boxes (the 40-wide
        # source can give them): documented plain bilinear, i.e. antialias=False.
        small = box[2] <= s and box[3] <= s
        ref = TF.resized_crop(_chw(x[i]), *box, [s, s], antialias=small)
        if p["flip"][i]:
            ref = TF.hflip(ref)
        torch.testing.assert_close(out[i], ref, atol=LINEAR_TOL, rtol=0)


def test_crop_upscale_from_tiny_box() -> None:
    # A 1x2 box upscaled to 8x8 exercises the clamping at both box edges.
    x = _images(2, 6, 6, seed=3)
    top, left = torch.tensor([2, 0]), torch.tensor([3, 4])
    hh, ww = torch.tensor([1, 6]), torch.tensor([2, 2])
    flip = torch.tensor([False, True])
    for use_matmul in (True, False):
        out = A.crop_resize_flip(x, top, left, hh, ww, flip, 8, use_matmul)
        for i in range(2):
            ref = TF.resized_crop(_chw(x[i]), int(top[i]), int(left[i]), int(hh[i]), int(ww[i]), [8, 8])
            ref = TF.hflip(ref) if flip[i] else ref
            torch.testing.assert_close(out[i], ref, atol=LINEAR_TOL, rtol=0)


def test_linear_jitter_ops_match_torchvision() -> None:
    b = 16
    x = _rand_float(b, 12, seed=4)
    f = torch.rand(b, generator=_gen(5)) * 1.6 + 0.2  # factors in [0.2, 1.8]: clamping happens
    one, zero = torch.ones(b), torch.zeros(b)
    bright = A.blend_linear(x, f, zero, zero)
    contrast = A.blend_linear(x, f, 1.0 - f, zero)
    sat = A.blend_linear(x, f, zero, 1.0 - f)
    ident = A.blend_linear(x, one, zero, zero)
    for i in range(b):
        fi = float(f[i])
        torch.testing.assert_close(bright[i], TF.adjust_brightness(x[i], fi), atol=LINEAR_TOL, rtol=0)
        torch.testing.assert_close(contrast[i], TF.adjust_contrast(x[i], fi), atol=LINEAR_TOL, rtol=0)
        torch.testing.assert_close(sat[i], TF.adjust_saturation(x[i], fi), atol=LINEAR_TOL, rtol=0)
    assert torch.equal(ident, x)  # identity factors leave [0, 1] images untouched


def test_hue_matches_torchvision() -> None:
    b = 32
    x = _rand_float(b, 16, seed=6)
    hue = torch.rand(b, generator=_gen(7)) - 0.5  # the full legal range [-0.5, 0.5)
    hue[2] = 0.0
    out = A.adjust_hue(x, hue)
    for i in range(b):
        ref = TF.adjust_hue(x[i], float(hue[i]))
        torch.testing.assert_close(out[i], ref, atol=HUE_TOL, rtol=0)
    assert not torch.allclose(out[3:], x[3:], atol=1e-2)  # it really shifts colours


def test_grayscale_matches_torchvision() -> None:
    x = _rand_float(6, 8, seed=8)
    apply = torch.tensor([True, False, True, False, True, False])
    out = A.random_grayscale(x, apply)
    for i in range(6):
        ref = TF.rgb_to_grayscale(x[i], num_output_channels=3) if apply[i] else x[i]
        torch.testing.assert_close(out[i], ref, atol=LINEAR_TOL, rtol=0)


@pytest.mark.parametrize("size", [8, 32, 64])
def test_blur_matches_torchvision(size: int) -> None:
    b = 6
    k = A.blur_kernel_size(size)
    assert k % 2 == 1 and (k == 3 or abs(k - 0.1 * size) <= 1.0)
    x = _rand_float(b, size, seed=9)
    sigma = torch.rand(b, generator=_gen(10)) * 1.9 + 0.1
    apply = torch.tensor([True, True, False, True, False, True])
    out = A.gaussian_blur(x, A.gaussian_kernels(sigma, apply, k))
    for i in range(b):
        ref = TF.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2) if apply[i] else x[i]
        torch.testing.assert_close(out[i], ref, atol=LINEAR_TOL, rtol=0)


def test_normalize_matches_totensor_normalize() -> None:
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    x = _images(5, 9, 7, seed=11)
    out = A.normalize(x, mean, std)
    assert out.shape == (5, 3, 9, 7) and out.dtype == torch.float32
    ref_tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    for i in range(5):
        ref = TF.normalize(_chw(x[i]), mean, std)
        torch.testing.assert_close(out[i], ref, atol=LINEAR_TOL, rtol=0)
        torch.testing.assert_close(out[i], ref_tf(Image.fromarray(x[i].numpy())), atol=LINEAR_TOL, rtol=0)


# ----------------------------------------------------------------------------------
# Whole pipeline versus a per-image torchvision composition
# ----------------------------------------------------------------------------------


def _reference_view(img: torch.Tensor, p: dict[str, torch.Tensor], i: int, cfg: A.AugmentConfig) -> torch.Tensor:
    """Apply image i's params with torchvision functional ops: (H, W, 3) uint8 -> (3, S, S)."""
    s = cfg.image_size
    box = [int(p[k][i]) for k in ("top", "left", "height", "width")]
    x = TF.resized_crop(_chw(img), *box, [s, s], antialias=True)
    if p["flip"][i]:
        x = TF.hflip(x)
    if p["jitter"][i]:
        ops = {
            A.BRIGHTNESS: lambda y: TF.adjust_brightness(y, float(p["brightness"][i])),
            A.CONTRAST: lambda y: TF.adjust_contrast(y, float(p["contrast"][i])),
            A.SATURATION: lambda y: TF.adjust_saturation(y, float(p["saturation"][i])),
            A.HUE: lambda y: TF.adjust_hue(y, float(p["hue"][i])),
        }
        for op in p["order"][i].tolist():
            x = ops[op](x)
    if p["grayscale"][i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if cfg.blur and p["blur"][i]:
        k = A.blur_kernel_size(s)
        x = TF.gaussian_blur(x, [k, k], [float(p["sigma"][i])] * 2)
    return TF.normalize(x, list(cfg.mean), list(cfg.std))


@pytest.mark.parametrize("blur", [False, True])
def test_pipeline_matches_per_image_torchvision(blur: bool) -> None:
    b, s = 64, 32
    # Unit std keeps the comparison in pixel units; a separate test covers normalization.
    cfg = A.AugmentConfig(s, (0.5, 0.4, 0.3), (1.0, 1.0, 1.0), jitter_strength=1.0, blur=blur)
    x = _images(b, s, s, seed=12)
    p = A.sample_params(b, s, s, cfg, _gen(13))
    out = A.apply_params(x, p, cfg)
    # Every op order, and both branches of each random choice, occur in the batch.
    assert bool(p["jitter"].any()) and bool((~p["jitter"]).any())
    assert bool(p["grayscale"].any()) and bool(p["flip"].any())
    assert len({tuple(r) for r in p["order"].tolist()}) > 10
    if blur:
        assert bool(p["blur"].any()) and bool((~p["blur"]).any())
    for i in range(b):
        torch.testing.assert_close(out[i], _reference_view(x[i], p, i, cfg), atol=PIPELINE_TOL, rtol=0)


def test_normalization_of_pipeline() -> None:
    s = 16
    plain = A.AugmentConfig(s, *IDENTITY)
    cfg = A.AugmentConfig(s, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    x = _images(8, s, s, seed=14)
    p = A.sample_params(8, s, s, cfg, _gen(15))
    raw = A.apply_params(x, p, plain)
    out = A.apply_params(x, p, cfg)
    ref = TF.normalize(raw, list(cfg.mean), list(cfg.std))
    torch.testing.assert_close(out, ref, atol=LINEAR_TOL, rtol=0)


# ----------------------------------------------------------------------------------
# Random parameters
# ----------------------------------------------------------------------------------


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic, correct for ties (discrete data)."""
    grid = np.unique(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def _box_features(top, left, h, w, height: int, width: int) -> dict[str, np.ndarray]:
    """Area fraction, log aspect ratio and relative offsets of crop boxes."""
    top, left, h, w = (np.asarray(v, dtype=np.float64) for v in (top, left, h, w))
    return {
        "area": h * w / (height * width),
        "log_ratio": np.log(w / h),
        "top": top / height,
        "left": left / width,
    }


def _torchvision_boxes(n: int, height: int, width: int, min_scale: float, seed: int) -> dict[str, np.ndarray]:
    """n boxes from torchvision's RandomResizedCrop.get_params on an (H, W) image."""
    torch.manual_seed(seed)
    img = torch.zeros(3, height, width)
    boxes = np.array([T.RandomResizedCrop.get_params(img, [min_scale, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    return _box_features(*boxes.T, height, width)


def _our_boxes(n: int, height: int, width: int, min_scale: float, seed: int) -> dict[str, np.ndarray]:
    """n boxes from sample_crop_boxes."""
    top, left, h, w = A.sample_crop_boxes(n, height, width, min_scale, _gen(seed))
    assert bool(((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width)).all())
    return _box_features(top, left, h, w, height, width)


# n = 3000 per side: the 0.1% critical KS value is 1.95 * sqrt(2 / n) ~= 0.05.
@pytest.mark.parametrize("hw", [(32, 32), (20, 64), (64, 20)])
def test_crop_boxes_follow_torchvision_distribution(hw: tuple[int, int]) -> None:
    h, w = hw
    n = 3000
    ours = _our_boxes(n, h, w, 0.08, seed=16)
    ref = _torchvision_boxes(n, h, w, 0.08, seed=17)
    for key in ours:
        assert _ks(ours[key], ref[key]) < 0.05, key
    if h != w:
        # The centre-crop fallback (full short side, ratio clamped to 4/3) fires for
        # these shapes (about 4% of draws); it gives the largest possible box, which
        # must be equally frequent in both (binomial sd of the difference ~0.005).
        full = max(ours["area"].max(), ref["area"].max())
        frac_ours = float(np.mean(ours["area"] == full))
        frac_ref = float(np.mean(ref["area"] == full))
        assert frac_ref > 0.02 and abs(frac_ours - frac_ref) < 0.015


def test_ks_detects_a_different_scale() -> None:
    # Guards the test above: a wrong min scale must give a large KS statistic.
    ours = _our_boxes(3000, 32, 32, 0.3, seed=18)
    ref = _torchvision_boxes(3000, 32, 32, 0.08, seed=19)
    assert _ks(ours["area"], ref["area"]) > 0.1


def test_jitter_factor_ranges_and_order() -> None:
    cfg = A.AugmentConfig(32, *IDENTITY, jitter_strength=0.5)
    p = A.sample_params(5000, 32, 32, cfg, _gen(20))
    for key, (lo, hi) in zip(("brightness", "contrast", "saturation", "hue"), A.jitter_ranges(cfg)):
        v = p[key]
        assert v.dtype == torch.float32 and float(v.min()) >= lo and float(v.max()) <= hi
        assert float(v.min()) < lo + 0.01 and float(v.max()) > hi - 0.01  # covers the range
    flat = [v for pair in A.jitter_ranges(cfg) for v in pair]
    assert flat == pytest.approx([0.6, 1.4, 0.6, 1.4, 0.6, 1.4, -0.1, 0.1])
    order = p["order"]
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(5000, 4))  # permutations
    # Each op takes each position about a quarter of the time.
    counts = torch.stack([(order == op).float().mean(0) for op in range(4)])
    assert bool(((counts - 0.25).abs() < 0.03).all())
    sigma = p["sigma"]
    assert float(sigma.min()) >= 0.1 and float(sigma.max()) <= 2.0


def test_probabilities() -> None:
    n = 20000
    p = A.sample_params(n, 32, 32, A.AugmentConfig(32, *IDENTITY, blur=True), _gen(21))
    for key, prob in (("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5)):
        assert p[key].dtype == torch.bool
        assert abs(float(p[key].float().mean()) - prob) < 0.02, key
    no_blur = A.sample_params(1000, 32, 32, A.AugmentConfig(32, *IDENTITY), _gen(21))
    assert not bool(no_blur["blur"].any())


def test_params_differ_between_images() -> None:
    p = A.sample_params(64, 32, 32, A.AugmentConfig(32, *IDENTITY), _gen(22))
    for key in ("brightness", "contrast", "saturation", "hue", "sigma"):
        assert len(set(p[key].tolist())) == 64, key
    boxes = set(zip(*(p[k].tolist() for k in ("top", "left", "height", "width"))))
    assert len(boxes) > 50
    assert len({tuple(r) for r in p["order"].tolist()}) > 10


# ----------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------


def test_two_views_shapes_range_and_independence() -> None:
    b, s = 16, 24
    cfg = A.AugmentConfig(s, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), blur=True)
    x = _images(b, 32, 32, seed=23)
    views = A.two_views(x, cfg, _gen(24))
    assert views.shape == (2 * b, 3, s, s) and views.dtype == torch.float32
    # The two views of each image differ (independent parameters).
    diff = (views[:b] - views[b:]).flatten(1).abs().amax(1)
    assert bool((diff > 1e-3).all())
    # Same seed, same views; another seed, other views.
    assert torch.equal(views, A.two_views(x, cfg, _gen(24)))
    assert not torch.allclose(views, A.two_views(x, cfg, _gen(25)))
    # Un-normalized values lie in [0, 1].
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    raw = views * std + mean
    assert float(raw.min()) >= -1e-5 and float(raw.max()) <= 1 + 1e-5


def test_unnormalized_output_in_unit_range() -> None:
    # Strong jitter on saturated random pixels pushes values against both clamps.
    cfg = A.AugmentConfig(32, *IDENTITY, jitter_strength=1.0, blur=True)
    x = _images(128, 32, 32, seed=26)
    p = A.sample_params(128, 32, 32, cfg, _gen(27))
    raw = A.apply_unnormalized(x, p, cfg)
    assert raw.shape == (128, 3, 32, 32) and raw.dtype == torch.float32
    assert float(raw.min()) >= 0.0 and float(raw.max()) <= 1.0
    assert float(raw.min()) == 0.0 and float(raw.max()) == 1.0  # the clamps are reached


def test_augment_shape_and_generator_device() -> None:
    cfg = A.AugmentConfig(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = _images(4, 32, 32, seed=28)
    out = A.augment(x, cfg, _gen(29))
    assert out.shape == (4, 3, 16, 16) and out.dtype == torch.float32 and out.device == x.device
    p = A.sample_params(4, 32, 32, cfg, _gen(29))
    assert all(v.device == torch.device("cpu") and v.shape[0] == 4 for v in p.values())
    assert p["order"].shape == (4, 4)
    torch.testing.assert_close(out, A.apply_params(x, p, cfg), atol=0, rtol=0)


def test_pil_transform_shape_and_normalization() -> None:
    s = 20
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    tf = A.pil_transform(A.AugmentConfig(s, mean, std, blur=True))
    rgb = Image.fromarray(_images(2, 32, 32, seed=30)[1].numpy())
    out = tf(rgb)
    assert out.shape == (3, s, s) and out.dtype == torch.float32
    names = [type(t).__name__ for t in tf.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomApply", "RandomGrayscale",
                     "RandomApply", "ToTensor", "Normalize"]
    # Without jitter a constant gray image survives every step unchanged, so the output
    # is exactly the normalized gray level: same normalization as the tensor pipeline.
    gray = np.full((32, 32, 3), 128, dtype=np.uint8)
    out = A.pil_transform(A.AugmentConfig(s, mean, std, jitter_strength=0.0))(Image.fromarray(gray))
    ref = A.normalize(torch.from_numpy(gray)[None], mean, std)[0, :, :s, :s]
    torch.testing.assert_close(out, ref, atol=LINEAR_TOL, rtol=0)


def test_pil_transform_draws_as_the_torchvision_reference() -> None:
    # the same steps in the same order consume the same random numbers: equal views under one seed
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    product = A.pil_transform(A.AugmentConfig(16, mean, std))
    reference = pil_simclr_transform(16, mean, std)
    pictures = [Image.fromarray(a.numpy()) for a in _images(8, 32, 24, seed=31)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        got = torch.stack([product(p) for p in pictures for _ in range(2)])
        torch.manual_seed(5)
        want = torch.stack([reference(p) for p in pictures for _ in range(2)])
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not torch.equal(got[0], got[1])  # two views of one image differ


def test_import_has_no_side_effects() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", "import simclr.augment"], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == ""


def test_blur_kernel_size_examples() -> None:
    assert [A.blur_kernel_size(s) for s in (8, 32, 64, 96, 224)] == [3, 3, 7, 9, 23]
    assert math.isclose(A.jitter_ranges(A.AugmentConfig(8, *IDENTITY, jitter_strength=1.0))[0][0], 0.2)


def test_threaded_cpu_pipeline_equals_the_single_threaded_one() -> None:
    cfg = A.AugmentConfig(16, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), blur=True)
    images = _images(200, 20, 24, seed=5)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = A.two_views(images, cfg, _gen(9))
        torch.set_num_threads(3)  # 400 views in 3 chunks of uneven size
        threaded = A.two_views(images, cfg, _gen(9))
        assert torch.get_num_threads() == 3  # put back after the pipeline's own single-threaded chunks
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(single, threaded)
