"""Batched SimCLR augmentations with per-sample random parameters.

The tensor pipeline reproduces, image by image, what the classic torchvision (v1)
per-image pipeline does (RandomResizedCrop, RandomHorizontalFlip, ColorJitter with a
random op order, RandomGrayscale, optional GaussianBlur, Normalize), but runs on a
whole uint8 batch at once on any device. Randomness is split from the pixel work:
`sample_params` draws every image's own parameters, `apply_params` applies them.

`apply_params` never synchronizes with the host (no `.item()`, no boolean-mask
indexing, no data-dependent Python branches), so it can run inside a GPU training
step: every op is applied to the whole batch, with identity parameters for the
images that should not receive it.

Behaviour for crops larger than the output size S (only possible when the source
image is larger than S): the resize is plain bilinear interpolation without
antialiasing (torchvision's `antialias=False`). For crops not larger than S it equals
torchvision's antialiased resize exactly, because antialiasing is a no-op there.
"""

from __future__ import annotations

import functools

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms as T

# Luma weights used by torchvision's tensor `rgb_to_grayscale` (0.2989, not 0.299),
# kept identical so the tensor ops match torchvision to float rounding.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)

# Aspect-ratio range of RandomResizedCrop, as in the classic SimCLR recipe.
_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_TRIES = 10
_SIGMA_RANGE = (0.1, 2.0)

# Index of each op in params["order"], matching torchvision ColorJitter's fn_idx.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


@dataclass(frozen=True)
class AugmentConfig:
    """Settings of the SimCLR augmentation; images are square outputs of side `image_size`."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    min_crop_scale: float = 0.08
    jitter_strength: float = 0.5
    blur: bool = False


# ----------------------------------------------------------------------------------
# Configuration helpers
# ----------------------------------------------------------------------------------


def blur_kernel_size(image_size: int) -> int:
    """Odd Gaussian kernel side, about 10% of the image side and at least 3."""
    k = int(0.1 * image_size)
    k = k + 1 if k % 2 == 0 else k
    return max(k, 3)


def jitter_ranges(cfg: AugmentConfig) -> tuple[tuple[float, float], ...]:
    """(lo, hi) ranges of brightness, contrast, saturation and hue factors, as ColorJitter builds them."""
    s = cfg.jitter_strength
    b = c = sat = 0.8 * s
    h = 0.2 * s
    return (
        (max(0.0, 1.0 - b), 1.0 + b),
        (max(0.0, 1.0 - c), 1.0 + c),
        (max(0.0, 1.0 - sat), 1.0 + sat),
        (-h, h),
    )


# ----------------------------------------------------------------------------------
# Parameter sampling
# ----------------------------------------------------------------------------------


def _uniform(shape: Sequence[int], lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    """Float32 tensor of `shape` uniform in [lo, hi) on the generator's device."""
    u = torch.rand(shape, generator=generator, device=generator.device)
    return u * (hi - lo) + lo


def _randint_below(n: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B,) int64 uniform in [0, n) for a (B,) int64 tensor of positive bounds `n`."""
    u = torch.rand(n.shape, generator=generator, device=generator.device, dtype=torch.float64)
    # float64 keeps floor(u * n) unbiased; the clamp guards the u*n == n rounding corner.
    return torch.minimum((u * n).floor().long(), n - 1)


def sample_crop_boxes(
    batch: int, height: int, width: int, min_scale: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop.get_params for a batch: four (B,) int64 tensors top, left, h, w."""
    area = float(height * width)
    log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
    # All tries for all samples at once, drawn in float32 like torchvision; the box
    # arithmetic is done in float64 because torchvision does it with Python floats.
    frac = _uniform((batch, _CROP_TRIES), lo=min_scale, hi=1.0, generator=generator).double()  # (B, 10)
    log_r = _uniform((batch, _CROP_TRIES), lo=log_lo, hi=log_hi, generator=generator)  # (B, 10)
    ratio = torch.exp(log_r).double()
    target = area * frac
    # torch.round rounds half to even, exactly like Python's round().
    w = torch.round(torch.sqrt(target * ratio)).long()  # (B, 10)
    h = torch.round(torch.sqrt(target / ratio)).long()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (B, 10)

    # argmax returns the first maximal index, i.e. the first accepted try.
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)  # (B, 1)
    any_valid = valid.any(dim=1)  # (B,)
    h = h.gather(1, first).squeeze(1)  # (B,)
    w = w.gather(1, first).squeeze(1)

    # Centre-crop fallback: depends only on the image shape, so plain Python.
    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        fw, fh = width, int(round(width / _RATIO[0]))
    elif in_ratio > _RATIO[1]:
        fw, fh = int(round(height * _RATIO[1])), height
    else:
        fw, fh = width, height
    h = torch.where(any_valid, h, torch.full_like(h, fh))
    w = torch.where(any_valid, w, torch.full_like(w, fw))

    # Offsets are drawn for every sample (fixed-size draws) and replaced by the
    # centred ones where the fallback is used.
    top = _randint_below(height - h + 1, generator)
    left = _randint_below(width - w + 1, generator)
    top = torch.where(any_valid, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(any_valid, left, torch.full_like(left, (width - fw) // 2))
    return top, left, h, w


def sample_params(
    batch: int, height: int, width: int, cfg: AugmentConfig, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Draw per-sample parameters for B images of size (H, W); all tensors are (B,) except order (B, 4).

    Keys (all on generator.device):
      top, left, height, width: int64 crop box in source pixels.
      flip: bool, horizontal flip of the output.
      jitter: bool, whether ColorJitter is applied (p=0.8).
      brightness, contrast, saturation, hue: float32 jitter factors (used only where jitter).
      order: int64 (B, 4), order[i, p] is the op at position p (0 brightness, 1 contrast,
        2 saturation, 3 hue), a random permutation per image.
      grayscale: bool (p=0.2).
      blur: bool (p=0.5 if cfg.blur, else always False).
      sigma: float32 Gaussian sigma in [0.1, 2.0) (used only where blur).
    """
    dev = generator.device
    top, left, h, w = sample_crop_boxes(batch, height=height, width=width, min_scale=cfg.min_crop_scale,
                                        generator=generator)
    (b_lo, b_hi), (c_lo, c_hi), (s_lo, s_hi), (h_lo, h_hi) = jitter_ranges(cfg)
    # Sorting i.i.d. uniforms gives a uniformly random permutation per row.
    order = torch.rand((batch, 4), generator=generator, device=dev).argsort(dim=1)  # (B, 4)
    blur_p = 0.5 if cfg.blur else 0.0
    return {
        "top": top,
        "left": left,
        "height": h,
        "width": w,
        "flip": torch.rand(batch, generator=generator, device=dev) < 0.5,
        "jitter": torch.rand(batch, generator=generator, device=dev) < 0.8,
        "brightness": _uniform((batch,), lo=b_lo, hi=b_hi, generator=generator),
        "contrast": _uniform((batch,), lo=c_lo, hi=c_hi, generator=generator),
        "saturation": _uniform((batch,), lo=s_lo, hi=s_hi, generator=generator),
        "hue": _uniform((batch,), lo=h_lo, hi=h_hi, generator=generator),
        "order": order,
        "grayscale": torch.rand(batch, generator=generator, device=dev) < 0.2,
        "blur": torch.rand(batch, generator=generator, device=dev) < blur_p,
        "sigma": _uniform((batch,), lo=_SIGMA_RANGE[0], hi=_SIGMA_RANGE[1], generator=generator),
    }


# ----------------------------------------------------------------------------------
# Pixel ops (all batched, float32, images in [0, 1] unless stated)
# ----------------------------------------------------------------------------------


def _axis_taps(
    start: torch.Tensor, length: torch.Tensor, out_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear taps (B, S) i0, i1 (int64 source indices) and weight of i1 for boxes [start, start+length)."""
    o = torch.arange(out_size, device=start.device, dtype=torch.float32)  # (S,)
    scale = length.to(torch.float32).unsqueeze(1) / out_size  # (B, 1)
    # Half-pixel centres (align_corners=False); negative positions clamp to the first pixel.
    src = ((o + 0.5) * scale - 0.5).clamp_min(0.0)  # (B, S)
    i0 = src.floor()
    frac = src - i0
    i0 = i0.long()
    last = (length - 1).unsqueeze(1)  # (B, 1)
    # Clamping to the box keeps sampling inside the crop, like cropping first.
    i0 = torch.minimum(i0, last)
    i1 = torch.minimum(i0 + 1, last)
    off = start.unsqueeze(1)
    return i0 + off, i1 + off, frac


def _tap_matrix(i0: torch.Tensor, i1: torch.Tensor, frac: torch.Tensor, n_in: int, scale: float) -> torch.Tensor:
    """Dense interpolation matrix (B, S, n_in) with (1-frac, frac) * scale at columns (i0, i1)."""
    b, s = i0.shape
    m = torch.zeros((b, s, n_in), dtype=torch.float32, device=i0.device)
    # scatter_add (not scatter) so i0 == i1 at the box edge sums to the full weight.
    m.scatter_add_(2, i0.unsqueeze(2), ((1.0 - frac) * scale).unsqueeze(2))
    m.scatter_add_(2, i1.unsqueeze(2), (frac * scale).unsqueeze(2))
    return m


def _crop_matmul(
    images: torch.Tensor, ty: tuple[torch.Tensor, ...], tx: tuple[torch.Tensor, ...], size: int
) -> torch.Tensor:
    """(B, H, W, 3) -> (B, 3, S, S) float32 as two batched matmuls with per-image tap matrices.

    Used on CPU: BLAS reads the transposed operands in place, so the channel-last to
    channel-first layout change is free, whereas strided copies and gathers are slow there.
    Each output is a sum of two non-zero products, so the result is exact bilinear.
    """
    b, h, w, c = images.shape
    scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
    x = images.reshape(b, h, w * c).to(torch.float32)  # (B, H, W*3)
    ry = _tap_matrix(*ty, h, scale)  # (B, S, H)
    rx = _tap_matrix(*tx, w, 1.0)  # (B, S, W)
    # Rows: (B, W*3, H) @ (B, H, S) -> (B, W*3, S), memory order [b, w, c, y].
    t = torch.bmm(x.transpose(1, 2), ry.transpose(1, 2))
    # Columns: read t as (B, 3*S, W) [b, (c, y), w] @ (B, W, S) -> (B, 3*S, S) = (B, 3, S, S).
    out = torch.bmm(t.view(b, w, c * size).transpose(1, 2), rx.transpose(1, 2))
    return out.view(b, c, size, size)


def _resample_rows(
    images: torch.Tensor, i0: torch.Tensor, i1: torch.Tensor, frac: torch.Tensor
) -> torch.Tensor:
    """Linear interpolation along dim 2 of (B, C, H, W): taps (B, S) -> (B, C, S, W)."""
    b, c, h, w = images.shape
    s = i0.shape[1]
    # Whole source rows are copied with index_select; flat row index = (b * C + c) * H + y.
    base = (torch.arange(b * c, device=images.device) * h).view(b, c, 1)  # (B, C, 1)
    flat = images.reshape(b * c * h, w)
    r0 = flat.index_select(0, (base + i0.unsqueeze(1)).reshape(-1)).view(b, c, s, w)
    r1 = flat.index_select(0, (base + i1.unsqueeze(1)).reshape(-1)).view(b, c, s, w)
    return r0.lerp_(r1, frac.view(b, 1, s, 1))  # (B, C, S, W)


def _crop_gather(
    images: torch.Tensor, ty: tuple[torch.Tensor, ...], tx: tuple[torch.Tensor, ...], size: int
) -> torch.Tensor:
    """(B, H, W, 3) -> (B, 3, S, S) float32 by gathering rows, then columns of the transpose.

    Used on accelerators: exact in float32 even when TF32 matmuls are enabled globally.
    """
    x = images.permute(0, 3, 1, 2).to(torch.float32).contiguous()  # (B, 3, H, W)
    if images.dtype == torch.uint8:
        x.div_(255.0)
    rows = _resample_rows(x, *ty)  # (B, 3, S, W)
    cols = _resample_rows(rows.transpose(2, 3).contiguous(), *tx)  # (B, 3, S_x, S_y)
    return cols.transpose(2, 3).contiguous()  # (B, 3, S, S)


def crop_resize_flip(
    images: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    height: torch.Tensor,
    width: torch.Tensor,
    flip: torch.Tensor,
    size: int,
    use_matmul: bool | None = None,
) -> torch.Tensor:
    """(B, H, W, 3) uint8 or float -> (B, 3, S, S) float32 crops resized bilinearly, flipped where flip.

    uint8 is mapped to [0, 1] like ToTensor; float input is taken as already in [0, 1].
    use_matmul picks the implementation (both are exact); None: matmul on CPU only.
    """
    ty = _axis_taps(top, height, size)  # 3 x (B, S)
    x0, x1, wx = _axis_taps(left, width, size)  # (B, S)
    # Flipping the output only reverses the column taps, so it costs nothing.
    fl = flip.unsqueeze(1)
    tx = tuple(torch.where(fl, t.flip(1), t) for t in (x0, x1, wx))
    if use_matmul is None:
        use_matmul = images.device.type == "cpu"
    return (_crop_matmul if use_matmul else _crop_gather)(images, ty, tx, size)


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma with torchvision's weights."""
    r, g, b = images.unbind(1)
    wr, wg, wb = _GRAY_WEIGHTS
    gray = r * wr
    gray.add_(g, alpha=wg).add_(b, alpha=wb)
    return gray.unsqueeze(1)


def blend_linear(
    images: torch.Tensor, keep: torch.Tensor, to_mean: torch.Tensor, to_gray_w: torch.Tensor
) -> torch.Tensor:
    """(B, 3, H, W) -> clamp(keep*x + to_mean*mean(gray(x)) + to_gray_w*gray(x), 0, 1); weights (B,).

    Brightness f is (f, 0, 0), contrast f is (f, 1-f, 0), saturation f is (f, 0, 1-f)
    and (1, 0, 0) is the identity, so one pass applies whichever op each image needs.
    """
    gray = to_gray(images)  # (B, 1, H, W)
    mean = gray.mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
    view = (-1, 1, 1, 1)
    shift = gray.mul_(to_gray_w.view(view)).add_(mean * to_mean.view(view))  # (B, 1, H, W)
    out = torch.addcmul(shift, images, keep.view(view))  # (B, 3, H, W)
    return out.clamp_(0.0, 1.0)


def adjust_hue(images: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H, W) with HSV hue shifted by hue (B,) in turns, as torchvision."""
    r, g, b = images.unbind(1)  # each (B, H, W)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    # Where chroma is 0 the hue is irrelevant (all channel differences are 0 too), so
    # any positive divisor avoids NaN without changing the result.
    inv = chroma.clamp_min(1e-12).reciprocal_()
    # Hue in sixths of a turn, the usual max-channel case split. The split is done
    # with 0/1 float masks and lerp because torch.where is several times slower than
    # plain arithmetic on CPU. Ties between channels give the same hue in either
    # branch, so which branch wins a tie does not matter.
    is_r = torch.sub(maxc, r).sign_().neg_().add_(1.0)  # 1 where r is the max
    is_g = torch.sub(maxc, g).sign_().neg_().add_(1.0)
    h6 = (r - g).add_(chroma, alpha=4.0)  # blue is the max
    h6.lerp_((b - r).add_(chroma, alpha=2.0), is_g)
    h6.lerp_(g - b, is_r).mul_(inv)
    h6.add_((hue * 6.0).view(-1, 1, 1))
    # Wrap into [0, 6) with floor rather than torch.remainder, which is much slower on CPU.
    h6.sub_(torch.floor(h6 * (1.0 / 6.0)).mul_(6.0))
    # HSV -> RGB without materializing V, S and the textbook 6-case stack: hue rotation
    # keeps max and min, and each channel is min + chroma * (fully saturated hue ramp).
    out = torch.empty_like(images)
    ramp = (h6 - 3.0).abs_().sub_(1.0).clamp_(0.0, 1.0)  # red ramp
    torch.addcmul(minc, chroma, ramp, out=out[:, 0])
    ramp = (h6 - 2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)  # green ramp
    torch.addcmul(minc, chroma, ramp, out=out[:, 1])
    ramp = h6.sub_(4.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)  # blue ramp, reuses h6
    torch.addcmul(minc, chroma, ramp, out=out[:, 2])
    return out


def color_jitter(
    images: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    hue: torch.Tensor,
    order: torch.Tensor,
) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H, W) with the four jitter ops applied per image in order (B, 4).

    Pass identity factors (1, 1, 1, 0) for images that should not be jittered.
    """
    hue_pos = (order == HUE).to(torch.uint8).argmax(dim=1)  # (B,)
    ones = torch.ones_like(brightness)
    zeros = torch.zeros_like(brightness)

    def linear_at(x: torch.Tensor, pos: int, active: torch.Tensor) -> torch.Tensor:
        """Apply the linear op each image has at position `pos`, where active (B,) bool."""
        op = order[:, pos]
        keep = torch.where(op == BRIGHTNESS, brightness, ones)
        keep = torch.where(op == CONTRAST, contrast, keep)
        keep = torch.where(op == SATURATION, saturation, keep)
        to_mean = torch.where(op == CONTRAST, 1.0 - contrast, zeros)
        to_gray_w = torch.where(op == SATURATION, 1.0 - saturation, zeros)
        # Inactive images (and the hue slot) get the identity (1, 0, 0).
        keep = torch.where(active, keep, ones)
        to_mean = torch.where(active, to_mean, zeros)
        to_gray_w = torch.where(active, to_gray_w, zeros)
        return blend_linear(x, keep=keep, to_mean=to_mean, to_gray_w=to_gray_w)

    # Hue is the expensive op, so it runs once for the whole batch: the linear ops
    # placed before each image's hue slot run first, those after it run afterwards.
    # That costs 6 cheap linear passes instead of 4 hue passes.
    x = images
    for pos in range(3):  # a slot before hue can only be at positions 0..2
        x = linear_at(x, pos, hue_pos > pos)
    x = adjust_hue(x, hue)
    for pos in range(1, 4):  # a slot after hue can only be at positions 1..3
        x = linear_at(x, pos, hue_pos < pos)
    return x


def random_grayscale(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H, W), replaced by 3-channel luma where apply (B,) bool."""
    gray = to_gray(images)  # (B, 1, H, W)
    return torch.where(apply.view(-1, 1, 1, 1), gray, images)  # broadcasts to (B, 3, H, W)


def gaussian_kernels(sigma: torch.Tensor, apply: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B,) sigmas -> (B, K) normalized 1-D Gaussians; a centred delta (identity) where not apply."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=torch.float32)  # (K,)
    pdf = torch.exp(-0.5 * (x / sigma.unsqueeze(1)).pow(2))  # (B, K)
    kernel = pdf / pdf.sum(dim=1, keepdim=True)
    delta = (x == 0).to(torch.float32).expand_as(kernel)
    return torch.where(apply.unsqueeze(1), kernel, delta)


def gaussian_blur(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) blurred per image with separable kernels (B, K), reflect padding -> (B, 3, H, W)."""
    b, c, h, w = images.shape
    k = kernels.shape[1]
    pad = k // 2
    # One group per (image, channel): every image has its own kernel.
    weight = kernels.repeat_interleave(c, dim=0)  # (B*3, K)
    x = images.reshape(1, b * c, h, w)
    # Reflect padding per axis equals torchvision's 2-D reflect pad for a separable kernel.
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), weight.view(b * c, 1, k, 1), groups=b * c)
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), weight.view(b * c, 1, 1, k), groups=b * c)
    return x.view(b, c, h, w)


def _channel_stats(
    mean: Sequence[float], std: Sequence[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as (1, 3, 1, 1) float32 tensors on device (made once per device and values)."""
    return _cached_channel_stats(tuple(float(v) for v in mean), tuple(float(v) for v in std), torch.device(device))


@functools.lru_cache(maxsize=16)
def _cached_channel_stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # torch.tensor(python values, device=cuda) is a blocking copy: done once here, not every step
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(device)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).to(device)
    return m, s


def normalize_float(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, 3, H, W) (x - mean) / std per channel."""
    m, s = _channel_stats(mean, std, images.device)
    return (images - m).div_(s)


# ----------------------------------------------------------------------------------
# Public pipeline
# ----------------------------------------------------------------------------------


def apply_unnormalized(images: torch.Tensor, params: dict[str, torch.Tensor], cfg: AugmentConfig) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, S, S) float32 in [0, 1], augmented with params, before Normalize."""
    dev = images.device
    p = {k: v.to(dev, non_blocking=True) for k, v in params.items()}
    x = crop_resize_flip(images, top=p["top"], left=p["left"], height=p["height"], width=p["width"], flip=p["flip"],
                         size=cfg.image_size)

    # Images without jitter get identity factors, so no data-dependent branching.
    on = p["jitter"]
    one = torch.ones_like(p["brightness"])
    x = color_jitter(
        x,
        brightness=torch.where(on, p["brightness"], one),
        contrast=torch.where(on, p["contrast"], one),
        saturation=torch.where(on, p["saturation"], one),
        hue=torch.where(on, p["hue"], torch.zeros_like(one)),
        order=p["order"],
    )
    x = random_grayscale(x, p["grayscale"])
    if cfg.blur:  # a config flag, not tensor data: no sync
        kernels = gaussian_kernels(p["sigma"], p["blur"], blur_kernel_size(cfg.image_size))
        x = gaussian_blur(x, kernels)
    # Every op keeps [0, 1] mathematically; the clamp only removes float rounding.
    return x.clamp_(0.0, 1.0)


def apply_params(images: torch.Tensor, params: dict[str, torch.Tensor], cfg: AugmentConfig) -> torch.Tensor:
    """(B, H, W, 3) uint8 on any device -> (B, 3, S, S) float32 augmented and normalized."""
    if images.device.type == "cpu" and torch.get_num_threads() > 1 and images.shape[0] >= 2 * _MIN_CHUNK:
        return _apply_in_threads(images, params, cfg)
    return normalize_float(apply_unnormalized(images, params, cfg), cfg.mean, cfg.std)


# Below this many images per thread a chunk's ops are too small to be worth a thread.
_MIN_CHUNK = 32


def _apply_in_threads(images: torch.Tensor, params: dict[str, torch.Tensor], cfg: AugmentConfig) -> torch.Tensor:
    """apply_params on a CPU, split by images over threads, each op single-threaded.

    The pipeline is hundreds of small element-wise ops: split inside each op over the intra-op
    threads, every op waits at a barrier, and on 2 cores 2 threads were no faster than 1 (measured).
    Whole chunks of images on their own threads keep every core busy instead; ATen releases the
    GIL inside each op. The result is identical: every op works image by image.
    """
    from concurrent.futures import ThreadPoolExecutor
    threads = min(torch.get_num_threads(), images.shape[0] // _MIN_CHUNK)
    bounds = [round(i * images.shape[0] / threads) for i in range(threads + 1)]
    out = torch.empty(images.shape[0], 3, cfg.image_size, cfg.image_size)

    def work(i: int) -> None:
        part = slice(bounds[i], bounds[i + 1])
        chunk = {k: v[part] for k, v in params.items()}
        out[part] = normalize_float(apply_unnormalized(images[part], chunk, cfg), cfg.mean, cfg.std)

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per chunk: the chunks are the parallelism
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, range(threads)))
    finally:
        torch.set_num_threads(previous)
    return out


def augment(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """One augmented view per image: (B, H, W, 3) uint8 -> (B, 3, S, S) float32."""
    b, h, w, _ = images.shape
    return apply_params(images, sample_params(b, height=h, width=w, cfg=cfg, generator=generator), cfg)


def two_views(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (2B, 3, S, S); rows [0, B) are view 1, rows [B, 2B) view 2."""
    # Stacking the uint8 batch twice is cheap and gives both views independent params.
    both = torch.cat([images, images], dim=0)  # (2B, H, W, 3)
    return augment(both, cfg, generator)


def crop_flip(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop and horizontal flip only, per image (supervised fine-tuning, as SimCLR's):
    (B, H, W, 3) uint8 -> (B, 3, S, S) float32 normalized. Colour, grayscale and blur settings are ignored."""
    b, h, w, _ = images.shape
    top, left, height, width = sample_crop_boxes(b, height=h, width=w, min_scale=cfg.min_crop_scale,
                                                 generator=generator)
    flip = torch.rand(b, generator=generator, device=generator.device) < 0.5
    dev = images.device
    x = crop_resize_flip(images, top=top.to(dev), left=left.to(dev), height=height.to(dev), width=width.to(dev),
                         flip=flip.to(dev), size=cfg.image_size)
    return normalize_float(x, cfg.mean, cfg.std)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """No augmentation: (B, H, W, 3) uint8 -> (B, 3, H, W) float32 normalized."""
    x = images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)  # (B, 3, H, W)
    return normalize_float(x, mean, std)


def pil_transform(cfg: AugmentConfig) -> T.Compose:
    """Per-image reference pipeline on PIL images -> (3, S, S) float32 normalized tensor."""
    s = cfg.jitter_strength
    steps: list = [
        T.RandomResizedCrop(cfg.image_size, scale=(cfg.min_crop_scale, 1.0), ratio=_RATIO),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if cfg.blur:
        k = blur_kernel_size(cfg.image_size)
        steps.append(T.RandomApply([T.GaussianBlur(k, _SIGMA_RANGE)], p=0.5))
    steps += [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    return T.Compose(steps)


def pad_crop_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop of the image zero-padded by size//8 on every side, and horizontal flip (linear.py --augment):
    uint8 (B, S, S, 3) -> float (B, 3, S, S) in [0, 1], not normalized. crop_flip is the resized crop."""
    b, s = images.shape[0], images.shape[1]
    pad = s // 8
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    # zero padding on [0, 1] pixels is black, as torchvision's RandomCrop(padding) on the raw image
    x = F.pad(x, (pad, pad, pad, pad))
    dev = images.device
    top = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
    left = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
    flip = torch.rand(b, device=dev, generator=generator) < 0.5
    steps = torch.arange(s, device=dev)
    rows = (top[:, None] + steps)[:, :, None]                                  # (B, S, 1)
    cols = left[:, None] + steps                                               # (B, S)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]          # (B, 1, S)
    out = x[torch.arange(b, device=dev)[:, None, None], :, rows, cols]         # (B, S, S, 3)
    return out.permute(0, 3, 1, 2).contiguous()
