"""How a run computes: the device and speed settings (decided once, here) and seeding.

Every script and the benchmark build one `Runtime` with `make_runtime` and hand it down; the
model, loss and augmentation code take device and dtype from their inputs and never decide.
"""
from __future__ import annotations

import contextlib
import copy
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from .cli import UserError
from .flags import PRECISIONS, usable_cores  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed: chosen once, used by training, kNN and evaluation."""
    device: torch.device
    precision: str = "fp32"      # bf16 | fp16 | fp32: autocast dtype for the network
    channels_last: bool = False
    compile: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for network forward passes (a no-op in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Put a network input batch in the memory format the network runs in."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move a module to the device and memory format (weights stay fp32: autocast casts on the fly)."""
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def maybe_compile(self, fn):
        """torch.compile(fn) when asked; the uncompiled module is what gets saved (no `_orig_mod.`)."""
        return torch.compile(fn) if self.compile else fn

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling; bf16 and fp32 do not."""
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None


# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device-name fragment; the first match wins,
# so the more specific names come first.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0))


def bf16_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a known card, None when the name is not in the table."""
    return next((peak for fragment, peak in BF16_PEAK_TFLOPS if fragment in device_name), None)


def resolve_device(name: str) -> tuple[torch.device, str | None]:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> device, plus a note to print (or None)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), None
        return torch.device("cpu"), "note: no CUDA GPU found, running on the CPU (slow: fine for tests and small runs)"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {name} asked for, but PyTorch sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return device, None


# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) from which it runs bf16 convolutions natively; a lower limit,
# e.g. AVX2, makes them emulated and slower than fp32.
BF16_ONEDNN_ISAS = frozenset({"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX",
                              "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "ALL", "DEFAULT"})
KERNEL_LIMIT_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def kernel_limits(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables set that cap which instructions the CPU kernels use (oneDNN, ATen, MKL)."""
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in KERNEL_LIMIT_VARIABLES if environ.get(name)}


def cpu_has_native_bf16(cpuinfo: str | None = None, environ: dict[str, str] | None = None) -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX): bf16 autocast is then faster than fp32.

    cpuinfo: the text of /proc/cpuinfo (read when None; elsewhere than Linux the answer is False).
    environ: the environment (os.environ when None): ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 (say AVX2)
    keeps oneDNN off the bf16 units, so the CPU then counts as one without them.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:  # not Linux: no cheap way to know, stay exact
            return False
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "").split()
    limits = kernel_limits(environ)
    isa = limits.get("ONEDNN_MAX_CPU_ISA", limits.get("DNNL_MAX_CPU_ISA"))
    if isa is not None and isa.strip().upper() not in BF16_ONEDNN_ISAS:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA from Ampere on (fp16 before), bf16 on a CPU with native bf16, else fp32."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def make_runtime(device: str | torch.device, precision: str = "auto", channels_last: bool = True,
                 compile: bool = False, threads: int = 0) -> Runtime:
    """The one place that applies speed settings: device, precision, memory format, compile, cuDNN, threads."""
    device = device if isinstance(device, torch.device) else resolve_device(device)[0]
    if threads > 0:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # input shapes never change: let cuDNN pick its fastest kernels
    return Runtime(device, precision=resolve_precision(precision, device), channels_last=channels_last, compile=compile)


def versions() -> dict[str, str]:
    """The library versions a run computed with, for its config JSON."""
    import torchvision
    return {"torch_version": str(torch.__version__), "torchvision_version": str(torchvision.__version__)}


# ----------------------------------------------------------------------------- seeding

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (run seed, epoch, step, rank), well spread."""
    h = 0x6A09E667F3BCC909
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


# ----------------------------------------------------------------------------- model size

def count_macs(model: torch.nn.Module, image_size: int) -> tuple[int, int, str]:
    """(parameters, multiply-accumulates per image, how they were counted): thop when installed, else the
    convolutions and linear layers counted here (thop adds the small BatchNorm and pooling terms)."""
    params = sum(p.numel() for p in model.parameters())
    probe = copy.deepcopy(model).cpu().float().eval()  # counters and hooks go on a throwaway copy
    x = torch.zeros(1, 3, image_size, image_size)
    try:
        import thop
    except ImportError:
        return params, _conv_linear_macs(probe, x), "conv and linear layers, thop not installed"
    with torch.no_grad():
        macs, _ = thop.profile(probe, inputs=(x,), verbose=False)
    return params, int(macs), "thop"


def _conv_linear_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """MACs of every Conv2d and Linear in one forward pass of x (one image)."""
    total = [0]

    def conv(module: torch.nn.Conv2d, inputs, output: torch.Tensor) -> None:
        kh, kw = module.kernel_size
        total[0] += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear(module: torch.nn.Linear, inputs, output: torch.Tensor) -> None:
        total[0] += output.numel() * module.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, torch.nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return total[0]
