"""CPU/GPU mixing caught without a GPU: augmentation, forward, loss and optimizer step on fake CUDA tensors.

FakeTensorMode gives tensors that claim to live on cuda:0 and only carry shapes; a dispatch mode
underneath records every op that receives a CPU tensor next to CUDA ones. Even a 0-dim CPU tensor
(which real PyTorch accepts) is recorded: it is a host-to-device copy, so a sync in the step.
Backward does not run on fake CUDA, so the optimizer step gets made-up gradients.
"""
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from simclr import augment
from simclr.augment import AugmentConfig, two_views
from simclr.distributed import gather_views
from simclr.engine import Runtime
from simclr.loss import NTXent
from simclr.model import SimCLR
from simclr.optim import build_optimizer, lr_at, set_lr

CFG = AugmentConfig(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), blur=True)


class MixedDevices(TorchDispatchMode):
    """Records the ops that get CPU and CUDA tensors together, and every read of a CUDA value on the host."""

    def __init__(self):
        super().__init__()
        self.mixed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(): fake tensors hold no value
            if args[0].device.type == "cuda":
                self.mixed.append(f"{func} of a CUDA tensor (the host waits for the GPU)")
            return 1.0 if args[0].is_floating_point() else 1  # a CPU scalar (an optimizer's step count) is free
        devices = {t.device.type for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)}
        if {"cpu", "cuda"} <= devices:
            self.mixed.append(str(func))
        return func(*args, **(kwargs or {}))


def fake_rand(real_rand):
    """torch.rand that accepts a stand-in generator (a real CUDA generator needs a GPU driver)."""
    def rand(*size, generator=None, **kwargs):
        if isinstance(generator, types.SimpleNamespace):
            generator = None
        return real_rand(*size, generator=generator, **kwargs)
    return rand


@pytest.mark.parametrize("optimizer", ["adam", "lars", "sgd"])
def test_step_on_fake_cuda_never_mixes_in_cpu_tensors(monkeypatch, optimizer):
    monkeypatch.setattr(augment.torch, "rand", fake_rand(torch.rand))
    augment._cached_channel_stats.cache_clear()  # it keeps per-device tensors: none from another fake mode
    recorder = MixedDevices()
    with FakeTensorMode(allow_non_fake_inputs=False):
        with torch.device("cuda"):  # only what lives on the GPU: the optimizer makes its own state as in a run
            model = SimCLR("resnet18", feature_dim=8, proj_hidden_dim=16)  # (fake parameters cannot be re-laid out)
            images = torch.empty(4, 20, 20, 3, dtype=torch.uint8)
        opt = build_optimizer(model, optimizer, 0.1, 1e-6)
        runtime = Runtime(torch.device("cuda"), "bf16", True)
        with recorder:
            views = two_views(images, CFG, types.SimpleNamespace(device=torch.device("cuda")))
            assert views.device.type == "cuda" and views.shape == (8, 3, 16, 16)
            with runtime.autocast():
                _, z = model(runtime.prepare(views))
            loss = NTXent(0.5)(*gather_views(z))
            assert loss.device.type == "cuda" and loss.dtype == torch.float32
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            set_lr(opt, lr_at(3, 0.1, 100, 10, "cosine"))
            opt.step()
    augment._cached_channel_stats.cache_clear()
    assert recorder.mixed == [], recorder.mixed


def test_the_recorder_catches_a_cpu_scalar_next_to_a_cuda_tensor():
    recorder = MixedDevices()
    with FakeTensorMode(allow_non_fake_inputs=False), torch.device("cuda"):
        logits = torch.empty(4, 4)
        with recorder:
            logits[torch.arange(4), torch.arange(4)] = torch.tensor(float("-inf"), device="cpu")
    assert recorder.mixed, "a 0-dim CPU tensor written into a CUDA tensor must be seen"
    recorder = MixedDevices()
    with FakeTensorMode(allow_non_fake_inputs=False):
        loss = torch.empty(4, device="cuda").sum()
        with recorder:
            loss.item()
    assert recorder.mixed and "CUDA tensor" in recorder.mixed[0]
