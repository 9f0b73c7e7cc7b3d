"""LARS against a hand-written update, and the learning-rate schedule."""
import math

import pytest
import torch
from torch import nn

from simclr.optim import LARS, build_optimizer, lr_at, scaled_lr, split_decay_groups


def reference_lars(params, grads, bufs, lr, momentum, wd, eta, excluded):
    """The update written out for one step, tensor by tensor, in float64."""
    new_params, new_bufs = [], []
    for p, g, v, ex in zip(params, grads, bufs, excluded):
        p, g, v = p.double(), g.double(), v.double()
        if ex:
            update = g  # no decay, no trust ratio: plain momentum
        else:
            d = g + wd * p
            wn, dn = p.norm().item(), d.norm().item()
            trust = eta * wn / dn if wn > 0 and dn > 0 else 1.0
            update = trust * d
        v = momentum * v + lr * update
        new_params.append(p - v)
        new_bufs.append(v)
    return new_params, new_bufs


def test_lars_matches_reference_for_several_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    opt = build_optimizer(model, "lars", lr=0.7, weight_decay=1e-2, momentum=0.9)
    assert isinstance(opt, LARS)
    weights, excluded = split_decay_groups(model)
    params = weights + excluded
    flags = [False] * len(weights) + [True] * len(excluded)
    bufs = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for step in range(4):
        x = torch.randn(16, 5)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        grads = [p.grad.detach().clone() for p in params]
        lr = 0.7 * (step + 1) / 4  # a changing lr, as under warm-up
        for group in opt.param_groups:
            group["lr"] = lr
        ref_in = [p.detach().clone() for p in params]
        opt.step()
        expected, bufs = reference_lars(ref_in, grads, bufs, lr, 0.9, 1e-2, 1e-3, flags)
        for p, e in zip(params, expected):
            assert torch.allclose(p.double(), e, atol=1e-6, rtol=1e-5)
    # biases and BatchNorm are the excluded (1-d) parameters
    assert {p.ndim for p in excluded} == {1} and {p.ndim for p in weights} == {2}


def test_lars_excluded_parameters_get_plain_momentum_without_decay():
    bias = nn.Parameter(torch.tensor([2.0, -3.0]))
    opt = LARS([{"params": [bias], "lars_exclude": True, "weight_decay": 0.0}], lr=0.1, weight_decay=0.5)
    bias.grad = torch.tensor([1.0, 1.0])
    opt.step()
    assert torch.allclose(bias.detach(), torch.tensor([1.9, -3.1]))
    bias.grad = torch.tensor([1.0, 1.0])
    opt.step()  # v = 0.9 * 0.1 + 0.1 = 0.19
    assert torch.allclose(bias.detach(), torch.tensor([1.71, -3.29]))


def test_schedule_warmup_and_cosine_end_points():
    base, total, warm = 4.0, 1000, 100
    assert lr_at(0, base, total, warm, "cosine") == pytest.approx(base / warm)
    assert lr_at(warm - 1, base, total, warm, "cosine") == pytest.approx(base)
    assert lr_at(warm, base, total, warm, "cosine") == pytest.approx(base)
    assert lr_at(warm + (total - warm) // 2, base, total, warm, "cosine") == pytest.approx(base / 2)
    last = lr_at(total - 1, base, total, warm, "cosine")
    assert 0 < last < base * 1e-4
    assert lr_at(total - 1, base, total, warm, "constant") == base
    assert lr_at(5, base, total, 0, "constant") == base


def test_lr_scaling():
    assert scaled_lr(1.0, 1024, "linear") == 4.0
    assert scaled_lr(1.0, 1024, "sqrt") == 2.0
    assert scaled_lr(1e-3, 1024, "none") == 1e-3
    assert math.isclose(scaled_lr(0.3, 128, "linear"), 0.15)
