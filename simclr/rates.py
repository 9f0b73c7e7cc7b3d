"""The machine's dense rates, what bench.py compares a training step with: a 3x3 convolution and a square
matmul timed in bursts on a CPU, matmuls in bf16, fp16 and tf32 on a GPU beside the card's datasheet
peak; and the FLOP arithmetic of a SimCLR step.

Everything here is a function of plain sizes; the FLOP counts are exact for the kernels timed (a 3x3
convolution with padding 1 and stride 1, an n x n by n x n matmul).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .engine import bf16_peak_tflops, kernel_limits

# The shapes of the CPU rates: a ResNet stage's 3x3 convolution at the step's sizes (layer2 of a
# CIFAR-stem ResNet on 32x32 images is 128 channels at 16x16) and a matmul big enough to be compute-bound.
CONV_CHANNELS, CONV_SIDE, CONV_BATCH = 128, 16, 256
MATMUL_N_CPU, MATMUL_N_GPU = 1024, 8192
QUICK_CONV = dict(batch=4, channels=16, side=8)  # --quick: the code runs, the figures mean nothing
# Dense peaks of the datasheets relative to bf16: fp16 runs at the bf16 rate on every card of the table,
# tf32 at half of it (A100, H100, H200).
DATASHEET_FACTOR = {"bf16": 1.0, "fp16": 1.0, "tf32": 0.5}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32}


# ----------------------------------------------------------------------------- FLOP arithmetic

def step_flops(macs_per_image: int, batch: int) -> float:
    """FLOPs of one SimCLR step on `batch` images: 2 views, forward + backward (about 3 forwards), 2 FLOPs a MAC."""
    return 3 * 2 * macs_per_image * 2 * batch


def conv_flops(batch: int, channels: int, side: int, kernel: int = 3) -> float:
    """FLOPs of a same-size convolution (padding kernel // 2, stride 1): channels in = out, side x side outputs."""
    return 2 * batch * channels * channels * side * side * kernel * kernel


def matmul_flops(n: int) -> float:
    """FLOPs of an (n, n) @ (n, n) matmul."""
    return 2 * n ** 3


def gflops(flops: float, seconds: float) -> float:
    """GFLOP/s of `flops` done in `seconds`."""
    return flops / seconds / 1e9


def percent(rate: float, reference: float | None) -> float | None:
    """rate as a percentage of reference (None without a reference)."""
    return 100 * rate / reference if reference else None


def datasheet_tflops(device_name: str, precision: str) -> float | None:
    """The card's dense datasheet peak in this precision (bf16, fp16, tf32), None for an unknown card."""
    peak = bf16_peak_tflops(device_name)
    return peak * DATASHEET_FACTOR[precision] if peak is not None and precision in DATASHEET_FACTOR else None


# ----------------------------------------------------------------------------- the kernels

@dataclass(frozen=True)
class DenseKernel:
    """One call of a dense kernel: its name, precision, the FLOPs of one call, and the call itself."""
    name: str
    precision: str
    flops: float
    call: Callable[[], object]
    tf32: bool = False  # the call must run with TF32 matmuls allowed


def conv_kernel(precision: str, device: torch.device, batch: int = CONV_BATCH, channels: int = CONV_CHANNELS,
                side: int = CONV_SIDE) -> DenseKernel:
    """A 3x3 convolution forward, channels-last, in fp32 or bf16: (batch, channels, side, side) -> the same."""
    g = torch.Generator().manual_seed(0)
    dtype = DTYPES[precision]
    x = torch.randn(batch, channels, side, side, generator=g).to(device, dtype)
    w = torch.randn(channels, channels, 3, 3, generator=g).to(device, dtype) / (3 * channels ** 0.5)
    x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    return DenseKernel(f"conv3x3 {channels}ch {side}x{side} b{batch} channels-last", precision=precision,
                       flops=conv_flops(batch, channels, side), call=lambda: F.conv2d(x, w, padding=1))


def matmul_kernel(precision: str, device: torch.device, n: int) -> DenseKernel:
    """An (n, n) @ (n, n) matmul in fp32, bf16, fp16 or tf32 (fp32 tensors, TF32 tensor cores allowed)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, DTYPES[precision]) for _ in range(2))
    return DenseKernel(f"matmul {n}x{n}", precision=precision, flops=matmul_flops(n), call=lambda: a @ b,
                       tf32=precision == "tf32")


def matmul_size(device: torch.device, quick: bool = False) -> int:
    """The side of the rate's square matmul on this device (quick: a tiny one)."""
    if device.type == "cuda":
        return 512 if quick else MATMUL_N_GPU
    return 64 if quick else MATMUL_N_CPU


def reference_kernel(device: torch.device, precision: str, quick: bool = False) -> DenseKernel:
    """The rate a step in `precision` is measured against: the 3x3 conv on a CPU, the matmul on a GPU."""
    if device.type == "cuda":
        return matmul_kernel(precision, device, matmul_size(device, quick))
    return conv_kernel(precision, device, **(QUICK_CONV if quick else {}))


def machine_kernels(device: torch.device, precisions: tuple[str, ...], quick: bool = False) -> list[DenseKernel]:
    """The kernels of the machine's rates: CPU, conv and matmul in each of `precisions` (fp32, bf16); GPU,
    matmul in bf16, fp16 and tf32. quick: tiny shapes (the figures mean nothing, the code runs)."""
    if device.type == "cuda":
        return [reference_kernel(device, p, quick) for p in ("bf16", "fp16", "tf32")]
    return [k for p in precisions
            for k in (reference_kernel(device, p, quick), matmul_kernel(p, device, matmul_size(device, quick)))]


# ----------------------------------------------------------------------------- timing

@contextlib.contextmanager
def allow_tf32(on: bool):
    """TF32 matmuls allowed inside (when `on`), the setting restored after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on or before
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def burst_seconds(quick: bool = False) -> float:
    """A burst's length: long enough to hide the timer and the first call's set-up, short enough to sample the
    load often (quick: the code runs, the figures mean nothing)."""
    return 0.01 if quick else 0.3


def calls_per_burst(kernel: DenseKernel, seconds: float, device: torch.device) -> int:
    """How many calls make a burst of about `seconds` (from one timed call after a warm-up call)."""
    with allow_tf32(kernel.tf32):
        kernel.call()
        sync(device)
        t0 = time.perf_counter()
        kernel.call()
        sync(device)
    return max(1, round(seconds / max(time.perf_counter() - t0, 1e-9)))


def burst_rates(kernel: DenseKernel, calls: int, bursts: int, device: torch.device) -> list[float]:
    """GFLOP/s of each of `bursts` bursts of `calls` back-to-back calls (the device synchronized around each)."""
    rates = []
    with allow_tf32(kernel.tf32):
        for _ in range(bursts):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                kernel.call()
            sync(device)
            rates.append(gflops(kernel.flops * calls, time.perf_counter() - t0))
    return rates


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate_row(kernel: DenseKernel, rates: list[float], calls: int) -> dict:
    """The record of one kernel's bursts: best and median GFLOP/s."""
    return {"kernel": kernel.name, "precision": kernel.precision, "bursts": len(rates), "calls_per_burst": calls,
            "best_gflops": max(rates), "median_gflops": statistics.median(rates)}


def measure_rates(kernels: list[DenseKernel], device: torch.device, bursts: int, burst_seconds: float) -> list[dict]:
    """Best and median GFLOP/s of every kernel over `bursts` bursts of about `burst_seconds` each, the kernels'
    bursts interleaved (A, B, C, A, B, C, ...) so that a change of load hits all of them."""
    calls = [calls_per_burst(k, burst_seconds, device) for k in kernels]
    rates: list[list[float]] = [[] for _ in kernels]
    for _ in range(bursts):
        for i, kernel in enumerate(kernels):
            rates[i] += burst_rates(kernel, calls=calls[i], bursts=1, device=device)
    return [rate_row(k, r, c) for k, r, c in zip(kernels, rates, calls)]


def cpu_kind(cpuinfo: str | None = None, cores: int | None = None, environ: dict[str, str] | None = None) -> str:
    """'MODEL NAME, AVX512-BF16 | AMX | AVX2 only | ..., N cores' from /proc/cpuinfo (cpuinfo: its text).

    Any variable that caps the kernels' instructions (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY; read from
    environ, os.environ when None) is named after it: such figures are of the capped kernels.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    lines = cpuinfo.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    flags = set(next((line for line in lines if line.startswith("flags")), "").split())
    vector = ("AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags
              else "AVX-512, no bf16" if "avx512f" in flags else "AVX2 only" if "avx2" in flags else "no AVX2")
    kind = f"{model}, {vector}, {cores or os.cpu_count()} cores"
    limits = kernel_limits(environ)
    return kind + "".join(f", {name}={value}" for name, value in limits.items())
