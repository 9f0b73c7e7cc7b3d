"""bench.py's machinery: tensor vs PIL augmentation, the project's training step vs a naive one,
per-view vs joint BatchNorm statistics, and (CUDA) whole epochs; the tables and the JSON record.

`run(args)` takes bench.py's parsed flags; every section is a function of plain sizes that returns
a dict of figures, so the tests run them at tiny sizes.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .augment import AugmentConfig, normalize, pil_transform, two_views
from .cli import UserError
from .data import CHANNEL_STATS
from .distributed import World
from .encoders import ENCODERS
from .engine import count_macs, cpu_has_native_bf16, make_runtime, mix_seed, usable_cores
from .files import atomic_write_text
from .flags import TRAIN_DEFAULTS
from .knn import forward_in_batches, knn_accuracy
from .loss import NTXent
from .methods.simclr import SimCLRMethod
from .model import PerViewStatistics, SimCLR, one_view_per_pass, per_view_batchnorm
from .optim import build_optimizer, set_lr
from .loss import nt_xent
from .pretrain import OnlineProbe, view_passes
from .rates import (DenseKernel, burst_rates, burst_seconds, calls_per_burst, cpu_kind, datasheet_tflops, gflops,
                    machine_kernels, measure_rates, percent, rate_row, reference_kernel, step_flops, sync)
from .step import apply_gradients, train_step

# CIFAR-10 channel statistics: the exact values only matter for realism, not speed.
CIFAR_MEAN, CIFAR_STD = CHANNEL_STATS["cifar10"]
TEMPERATURE = 0.5
METHOD = SimCLRMethod(NTXent(TEMPERATURE))  # main.py's default method and loss
LR, WEIGHT_DECAY = 1e-3, 1e-6  # the original tool's Adam settings, used by both steps

# The targets.
TARGET_AUG_RATIO = 5.0
TARGET_STEP_RATIO = 1.3
TARGET_EPOCH_SECONDS = {("resnet50", 1024): 3.0, ("resnet18", 1024): 1.5}
TARGET_DATA_SHARE = 0.05
TARGET_PER_VIEW_OVERHEAD = 1.05  # --bn_stats per_view step time / joint step time
TARGET_PROBE_OVERHEAD = 1.02  # step with the online probe / step without
TARGET_PIPELINE_OVERHEAD = 0.05  # main.py's step / the model's own forward + backward, minus 1
TARGET_RATE_PERCENT = 65.0  # main.py's step in GFLOP/s, percent of the machine's conv rate (GPU: matmul rate)

CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000

# The step comparison's architecture without --arch; the CUDA epochs time every one with an epoch target.
STEP_ARCH = "resnet18"
EPOCH_ARCHS = tuple(arch for arch in ENCODERS if any(arch == target for target, _ in TARGET_EPOCH_SECONDS))


# ----------------------------------------------------------------------------- small helpers

def default_model(arch: str, **kwargs) -> SimCLR:
    """A SimCLR model of `arch` with main.py's default head sizes (kwargs: stem, bn_stats, ...)."""
    return SimCLR(arch, TRAIN_DEFAULTS["feature_dim"], TRAIN_DEFAULTS["proj_hidden_dim"], **kwargs)


def synthetic_images(n: int, seed: int = 0) -> torch.Tensor:
    """Random uint8 CIFAR-shaped images (n, 32, 32, 3); pixel content does not change the cost."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)


def aug_config(image_size: int) -> AugmentConfig:
    """The original tool's augmentation (jitter 0.5, no blur) at the given output side."""
    return AugmentConfig(image_size=image_size, mean=CIFAR_MEAN, std=CIFAR_STD)


def as_main_py_runs(net: torch.nn.Module, device: torch.device) -> int:
    """The forward passes main.py's step makes over the two views with `net` on `device` (--view_passes auto:
    a view a pass for per-view BatchNorm on a CPU), `net`'s per-view BatchNorm told so; train_step's passes."""
    per_view = any(isinstance(m, PerViewStatistics) for m in net.modules())
    passes = view_passes(0, device, "per_view" if per_view else "joint", distributed=False)
    one_view_per_pass(net, passes == 2)
    return passes


def median(values: list[float]) -> float:
    """Median, nan for an empty list."""
    return statistics.median(values) if values else float("nan")


def interleaved(variants: dict[str, Callable[[int], None]], warmup: int, steps: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, run A,B,C,A,B,C,... so that load changes hit all of them."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(warmup + steps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn(i)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------- the naive step (the original tool's way)

def original_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent as the original tool computes it: exp of every similarity, then -log(positive / sum), for
    z1, z2 (N, d) -> scalar over the 2N anchors. The speed baseline of the step comparison (it
    overflows at small temperatures, which simclr.loss.nt_xent does not)."""
    out = F.normalize(torch.cat([z1, z2]), dim=1)                              # (2N, d)
    n2 = out.shape[0]
    sim = torch.exp(out @ out.T / temperature)                                 # (2N, 2N)
    off_diagonal = ~torch.eye(n2, dtype=torch.bool, device=out.device)
    denominator = sim.masked_select(off_diagonal).view(n2, n2 - 1).sum(dim=1)  # partner and negatives
    positive = torch.exp((F.normalize(z1, dim=1) * F.normalize(z2, dim=1)).sum(dim=1) / temperature)
    return (-torch.log(torch.cat([positive, positive]) / denominator)).mean()


def naive_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, v1: torch.Tensor, v2: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """One step the original tool's way: a forward pass per view (own BatchNorm statistics each), fp32,
    its loss formulation."""
    _, z1 = net(v1)
    _, z2 = net(v2)
    loss = original_loss(z1, z2, temperature)
    apply_gradients(loss, optimizer)
    return loss.detach()


def pil_views(images: torch.Tensor, transform) -> tuple[torch.Tensor, torch.Tensor]:
    """Two PIL-pipeline views per uint8 image (B, H, W, 3), one image at a time: ((B,3,S,S), (B,3,S,S))."""
    from PIL import Image
    first, second = [], []
    for array in images.numpy():
        image = Image.fromarray(array)
        first.append(transform(image))
        second.append(transform(image))
    return torch.stack(first), torch.stack(second)


# ----------------------------------------------------------------------------- augmentation section

_POOL_TRANSFORM = None


def _pool_init(cfg: AugmentConfig) -> None:
    """Worker set-up, as DataLoader workers: one torch thread, the transform built once."""
    global _POOL_TRANSFORM
    torch.set_num_threads(1)
    _POOL_TRANSFORM = pil_transform(cfg)


def _pool_views(chunk: torch.Tensor) -> torch.Tensor:
    """Both PIL views of a chunk of images, in a worker process."""
    return torch.cat(pil_views(chunk, _POOL_TRANSFORM))


def pil_batch_fn(cfg: AugmentConfig, pool, workers: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """views(batch) with the PIL pipeline: in this process, or split over a pool's worker processes."""
    if pool is None:
        transform = pil_transform(cfg)
        return lambda batch: torch.cat(pil_views(batch, transform))
    # pool.map blocks until every chunk is back: no prefetching that would overlap the tensor side's timing
    return lambda batch: torch.cat(pool.map(_pool_views, batch.chunk(workers)))


def augmentation_section(images: torch.Tensor, cfg: AugmentConfig, batch: int, threads: int, warmup: int,
                         steps: int) -> dict:
    """Views per second of two_views vs the per-image PIL pipeline, at 1 thread and at `threads`."""
    n_batches = max(1, images.shape[0] // batch)
    take = lambda i: images[(i % n_batches) * batch:((i % n_batches) + 1) * batch]  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    result: dict = {"batch_images": batch, "threads": threads}
    # Equal threads: N torch threads for the tensor side, N worker processes (the original tool's DataLoader
    # workers) for the PIL side, whose work is single-threaded per image.
    settings = [1] if threads == 1 else [1, threads]
    pool = None
    try:
        for n in settings:
            if n > 1:
                pool = multiprocessing.get_context("fork").Pool(n, initializer=_pool_init, initargs=(cfg,))
            pil = pil_batch_fn(cfg, pool, n)
            torch.set_num_threads(n)
            times = interleaved({"tensor": lambda i: two_views(take(i), cfg, generator),
                                 "pil": lambda i: pil(take(i))}, warmup, steps)
            tensor_vps, pil_vps = 2 * batch / median(times["tensor"]), 2 * batch / median(times["pil"])
            result[f"threads_{n}"] = {"tensor_views_per_s": tensor_vps, "pil_views_per_s": pil_vps,
                                      "ratio": tensor_vps / pil_vps}
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool.terminate()
    top = result[f"threads_{threads}"]
    result.update(tensor_views_per_s=top["tensor_views_per_s"], pil_views_per_s=top["pil_views_per_s"],
                  ratio=top["ratio"])
    return result


def device_augmentation(device: torch.device, cfg: AugmentConfig, batch: int, warmup: int, steps: int) -> float:
    """Views per second of two_views on the device itself (uint8 batches already there)."""
    images = synthetic_images(batch * 2, seed=3).to(device)
    generator = torch.Generator(device=device)
    timer = StepTimer(device)
    for i in range(warmup + steps):
        batch_images = images[(i % 2) * batch:(i % 2 + 1) * batch]
        if i < warmup:
            two_views(batch_images, cfg, generator)
        else:
            timer.time(lambda: two_views(batch_images, cfg, generator))
    return 2 * batch / median(timer.seconds())


# ----------------------------------------------------------------------------- training-step section

@dataclass
class Variant:
    """One way of training: the project's step with some runtime settings, or the naive step."""
    name: str
    precision: str = "fp32"
    channels_last: bool = False
    naive: bool = False


def project_variants(device: torch.device, precisions: tuple[str, ...] = ("fp32", "bf16")) -> list[Variant]:
    """The project's default step first, then (CPU only) the alternatives: `precisions` x memory formats."""
    default = Variant("project", make_runtime(device).precision, True)
    if device.type != "cpu":
        return [default]
    extra = [Variant(f"project {p} {'channels_last' if cl else 'contiguous'}", p, cl)
             for p in precisions for cl in (True, False)
             if (p, cl) != (default.precision, default.channels_last)]
    return [default, *extra]


def train_section(arch: str, images: torch.Tensor, cfg: AugmentConfig, batch: int, device: torch.device,
                  warmup: int, steps: int, variants_on: bool = True, precisions: tuple[str, ...] = ("fp32", "bf16"),
                  references: dict[str, RateProbe] | None = None) -> dict:
    """Pairs per second of the naive step and the project's step(s), interleaved, each with its data work; with
    `references` (precision -> RateProbe), a burst of each in the rotation, and each step's GFLOP/s as a percent
    of the rate in its precision."""
    torch.manual_seed(0)
    base = default_model(arch)
    variants = [Variant("naive", naive=True), *(project_variants(device, precisions) if variants_on
                                                else project_variants(device)[:1])]
    n_batches = max(1, images.shape[0] // batch)
    data = images.to(device)
    transform = pil_transform(cfg)
    runs: dict[str, Callable[[int], None]] = {}
    for v in variants:
        net = copy.deepcopy(base).to(device)  # same initial weights for every variant
        if not v.naive and TRAIN_DEFAULTS["bn_stats"] == "per_view":
            per_view_batchnorm(net)  # the project's default; the naive step's two passes need plain BatchNorm
        if v.channels_last:
            net = net.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(net, name="adam", lr=LR, weight_decay=WEIGHT_DECAY)
        runs[v.name] = make_step(v, net=net, optimizer=optimizer, data=data, cfg=cfg, transform=transform,
                                 batch=batch, n_batches=n_batches, device=device)
    references = references or {}
    runs.update({f"rate {p}": probe for p, probe in references.items()})
    times = interleaved(runs, warmup, steps)
    flops = step_flops(count_macs(base, cfg.image_size)[1], batch)
    rates = {p: probe.record(warmup) for p, probe in references.items()}
    rows = {}
    for v in variants:
        seconds = median(times[v.name])
        rate = rates.get(v.precision)
        rows[v.name] = {"precision": v.precision, "channels_last": v.channels_last, "seconds_per_step": seconds,
                        "pairs_per_s": batch / seconds, "gflops": gflops(flops, seconds),
                        "percent_of_rate": percent(gflops(flops, seconds), rate["median_gflops"]) if rate else None}
    project_names = [v.name for v in variants if not v.naive]
    fastest = max(project_names, key=lambda name: rows[name]["pairs_per_s"])
    return {"arch": arch, "batch_size": batch, "image_size": cfg.image_size, "steps": steps,
            "variants": rows, "project_pairs_per_s": rows["project"]["pairs_per_s"],
            "naive_pairs_per_s": rows["naive"]["pairs_per_s"],
            "ratio": rows["project"]["pairs_per_s"] / rows["naive"]["pairs_per_s"], "fastest_project_variant": fastest,
            "step_gflop": flops / 1e9, "rates": rates}


def make_step(v: Variant, net: torch.nn.Module, optimizer: torch.optim.Optimizer, data: torch.Tensor,
              cfg: AugmentConfig, transform, batch: int, n_batches: int, device: torch.device) -> Callable[[int], None]:
    """A closure doing step i of a variant, data preparation included."""
    if v.naive:
        def step(i: int) -> None:
            v1, v2 = pil_views(data[(i % n_batches) * batch:((i % n_batches) + 1) * batch].cpu(), transform)
            naive_step(net, optimizer=optimizer, v1=v1.to(device), v2=v2.to(device), temperature=TEMPERATURE)
            sync(device)  # perf_counter timing: the step must be finished, not just queued
        return step
    runtime = make_runtime(device, v.precision, v.channels_last)
    passes = as_main_py_runs(net, device)
    generator = torch.Generator(device=device)

    def step(i: int) -> None:
        generator.manual_seed(mix_seed(0, i))
        views = two_views(data[(i % n_batches) * batch:((i % n_batches) + 1) * batch], cfg, generator)
        train_step(net, optimizer, views, method=METHOD, runtime=runtime, passes=passes)
        sync(device)
    return step


# ----------------------------------------------------------------------------- BatchNorm statistics section

def bn_stats_section(arch: str, images: torch.Tensor, cfg: AugmentConfig, batch: int, device: torch.device,
                     warmup: int, steps: int, precision: str = "auto") -> dict:
    """Seconds per simclr.step.train_step with --bn_stats joint vs per_view: same weights, views and runtime
    (channels-last; precision auto: the device's default), interleaved in alternating order."""
    torch.manual_seed(0)
    joint = default_model(arch).to(device).to(memory_format=torch.channels_last)
    per_view = per_view_batchnorm(copy.deepcopy(joint))
    runtime = make_runtime(device, precision, True)
    generator = torch.Generator(device=device).manual_seed(0)
    data = images.to(device)
    # the augmentation is the same work in both modes: made once, outside the timed step
    views = [two_views(data[i * batch:(i + 1) * batch], cfg, generator) for i in range(max(1, data.shape[0] // batch))]

    def timed_step(net: torch.nn.Module, passes: int = 0) -> Callable[[int], None]:
        """`passes` 0: as main.py runs `net` here; 1: both views in one pass (a fresh model's BatchNorm is set so)."""
        optimizer = build_optimizer(net, name="adam", lr=LR, weight_decay=WEIGHT_DECAY)
        passes = passes or as_main_py_runs(net, device)

        def run(i: int) -> None:
            train_step(net, optimizer, views[i % len(views)], method=METHOD, runtime=runtime, passes=passes)
            sync(device)
        return run

    runs = {"joint": timed_step(joint), "per_view": timed_step(per_view)}
    passes = view_passes(0, device, "per_view", distributed=False)  # main.py's auto, as timed_step ran it
    if passes == 2:  # main.py runs a view a pass here: time per-view BatchNorm in one pass beside it
        runs["per_view one pass"] = timed_step(per_view_batchnorm(copy.deepcopy(joint)), passes=1)
    times = interleaved_times(runs, warmup, steps)
    joint_s, per_view_s = median(times["joint"]), median(times["per_view"])
    # on a shared machine the load drifts: the ratio of the two steps of one iteration cancels most of it
    paired = median([p / j for p, j in zip(times["per_view"], times["joint"])])
    record = {"arch": arch, "batch_size": batch, "image_size": cfg.image_size, "precision": runtime.precision,
              "steps": steps, "per_view_passes": passes, "joint_seconds_per_step": joint_s,
              "per_view_seconds_per_step": per_view_s, "ratio": per_view_s / joint_s, "paired_ratio": paired}
    if "per_view one pass" in times:
        one = times["per_view one pass"]
        record["per_view_one_pass_seconds_per_step"] = median(one)
        # below 1: a view a pass (main.py's auto on a CPU) is the faster way to the same arithmetic
        record["view_a_pass_over_one_pass_paired"] = median([p / o for p, o in zip(times["per_view"], one)])
    return record


def interleaved_times(runs: dict[str, Callable[[int], None]], warmup: int, steps: int) -> dict[str, list[float]]:
    """Seconds of each timed step of every variant, the variants interleaved in a rotating order (each iteration
    starts one variant later: with two, alternating; no variant always runs after the same one), the first
    `warmup` iterations untimed."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(warmup + steps):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            runs[name](i)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def report_pair(title: str, record: dict, rows: tuple[tuple[str, str], ...], ratio_name: str) -> None:
    """Print one interleaved A/B table: `rows` are (label, key) of the two s/step medians, then both ratios."""
    table = [(label, record[key], "s/step") for label, key in rows]
    table += [(f"step ratio {ratio_name}", record["ratio"], "x (of the medians)"),
              (f"step ratio {ratio_name}, paired", record["paired_ratio"], "x (median of each iteration's ratio)")]
    print_table(f"{title} ({record['arch']}, batch {record['batch_size']}, {record['image_size']}px, "
                f"{record['precision']}, median of {record['steps']} steps)", table)


def report_bn_stats(bn: dict) -> list[str]:
    """Print the per-view vs joint table; returns target lines."""
    passes = " (a view a pass)" if bn["per_view_passes"] == 2 else ""
    report_pair("BatchNorm statistics", record=bn, rows=(("step --bn_stats joint", "joint_seconds_per_step"),
                                             (f"step --bn_stats per_view{passes}", "per_view_seconds_per_step")),
                ratio_name="per_view/joint")
    if "per_view_one_pass_seconds_per_step" in bn:
        print_table("per-view BatchNorm, a view a pass against one pass over both views (--view_passes 2 / 1)",
                    [("step --bn_stats per_view --view_passes 1", bn["per_view_one_pass_seconds_per_step"], "s/step"),
                     ("step ratio view a pass/one pass, paired", bn["view_a_pass_over_one_pass_paired"],
                      "x (below 1: auto's a view a pass is faster)")])
    return [f"per_view step <= {TARGET_PER_VIEW_OVERHEAD:g}x joint: {bn['ratio']:.3f}x, "
            f"{verdict(bn['ratio'] <= TARGET_PER_VIEW_OVERHEAD)}"]


# ----------------------------------------------------------------------------- online probe section

def probe_section(arch: str, images: torch.Tensor, cfg: AugmentConfig, batch: int, device: torch.device,
                  warmup: int, steps: int, num_classes: int = 10) -> dict:
    """Seconds per main.py step without and with --online_probe (train_step with and without the probe's step on
    the detached h): same weights and views, interleaved in alternating order, as in the BatchNorm section."""
    torch.manual_seed(0)
    plain = default_model(arch).to(device).to(memory_format=torch.channels_last)
    probed = copy.deepcopy(plain)
    runtime = make_runtime(device, "auto", True)
    generator = torch.Generator(device=device).manual_seed(0)
    data = images.to(device)
    views = [two_views(data[i * batch:(i + 1) * batch], cfg, generator) for i in range(max(1, data.shape[0] // batch))]
    labels = torch.randint(0, num_classes, (batch,), generator=torch.Generator().manual_seed(0)).to(device)
    probe = OnlineProbe(probed.feature_width, num_classes=num_classes, device=device, world=World())

    def timed_step(net: torch.nn.Module, with_probe: bool) -> Callable[[int], None]:
        optimizer = build_optimizer(net, name="adam", lr=LR, weight_decay=WEIGHT_DECAY)

        def run(i: int) -> None:
            train_step(net, optimizer=optimizer, views=views[i % len(views)], labels=labels, method=METHOD,
                       runtime=runtime,
                       probe=probe if with_probe else None)
            sync(device)
        return run

    times = interleaved_times({"off": timed_step(plain, False), "on": timed_step(probed, True)}, warmup, steps)
    off_s, on_s = median(times["off"]), median(times["on"])
    paired = median([a / b for a, b in zip(times["on"], times["off"])])
    return {"arch": arch, "batch_size": batch, "image_size": cfg.image_size, "precision": runtime.precision,
            "steps": steps, "off_seconds_per_step": off_s, "on_seconds_per_step": on_s, "ratio": on_s / off_s,
            "paired_ratio": paired}


def report_probe(pr: dict) -> list[str]:
    """Print the probe's cost table; returns target lines."""
    report_pair("online probe", record=pr, rows=(("step --no-online_probe", "off_seconds_per_step"),
                                     ("step --online_probe", "on_seconds_per_step")), ratio_name="probe on/off")
    return [f"online probe step <= {TARGET_PROBE_OVERHEAD:g}x the step: {pr['paired_ratio']:.3f}x (paired), "
            f"{verdict(pr['paired_ratio'] <= TARGET_PROBE_OVERHEAD)}"]


# ----------------------------------------------------------------------------- the machine's dense rates

def rates_section(device: torch.device, quick: bool) -> dict:
    """The machine's dense rates (simclr.rates): CPU conv and matmul in fp32 and bf16, GPU matmul in bf16,
    fp16 and tf32 beside the datasheet; best and median of bursts, the kernels interleaved."""
    kernels = machine_kernels(device, ("fp32", "bf16"), quick)
    burst = burst_seconds(quick)
    rows = measure_rates(kernels, device, bursts=3 if quick else 7, burst_seconds=burst)
    name = device_name(device)
    for row in rows:
        row["datasheet_tflops"] = datasheet_tflops(name, row["precision"])
    return {"device_name": name, "burst_seconds": burst, "rows": rows}


def report_rates(section: dict) -> None:
    """Print the machine's rates table."""
    rows = []
    for r in section["rows"]:
        sheet = f", datasheet {fmt(r['datasheet_tflops'] * 1e3, 0)}" if r["datasheet_tflops"] else ""
        rows.append((f"{r['kernel']} {r['precision']}", r["best_gflops"],
                     f"GFLOP/s best of {r['bursts']} bursts (median {fmt(r['median_gflops'], 1)}{sheet})"))
    print_table(f"dense rates of {section['device_name']} (bursts of {section['burst_seconds']:g} s, interleaved)", rows)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's kind (model name, native bf16 or not, cores)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_kind()


class RateProbe:
    """A reference kernel timed in the rotation of a section: one burst per call, its GFLOP/s kept."""

    def __init__(self, kernel: DenseKernel, device: torch.device, burst_seconds: float):
        self.kernel, self.device = kernel, device
        self.calls = calls_per_burst(kernel, burst_seconds, device)
        self.rates: list[float] = []

    def __call__(self, i: int) -> None:
        self.rates += burst_rates(self.kernel, calls=self.calls, bursts=1, device=self.device)

    def record(self, warmup: int) -> dict:
        """Best and median GFLOP/s of the bursts after the first `warmup` ones."""
        return rate_row(self.kernel, self.rates[warmup:] or self.rates, self.calls)


# ----------------------------------------------------------------------------- where the time of a step goes

# The parts of main.py's step, each timed alone on fixed tensors; "what is left" is the end-to-end step minus them.
PARTS = ("data movement", "augmentation", "model forward+backward", "loss", "optimizer step", "online probe")


def breakdown_section(arch: str, images: torch.Tensor, cfg: AugmentConfig, batch: int, device: torch.device,
                      warmup: int, steps: int, reference: RateProbe, num_classes: int = 10) -> dict:
    """Seconds of main.py's step end to end and of each of its PARTS alone, plus the model's forward + backward
    with the other --bn_stats mode, interleaved in alternating order with a burst of the reference rate.

    Each round's "what is left" is its end-to-end time minus its parts; every figure is the median over rounds."""
    torch.manual_seed(0)
    runtime = make_runtime(device, "auto", True)
    joint = default_model(arch).to(device).to(memory_format=torch.channels_last)
    models = {"joint": joint, "per_view": per_view_batchnorm(copy.deepcopy(joint))}
    default_bn = TRAIN_DEFAULTS["bn_stats"]
    other_bn = next(mode for mode in models if mode != default_bn)
    data = images.to(device)
    n_batches = max(1, data.shape[0] // batch)
    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.randint(0, num_classes, (data.shape[0],), generator=torch.Generator().manual_seed(1)).to(device)
    generator = torch.Generator(device=device)
    indices = lambda i: order[(i % n_batches) * batch:((i % n_batches) + 1) * batch]  # noqa: E731
    # the fixed tensors the parts run on: one batch's views (as the network gets them), z and h of one forward
    views = two_views(data[indices(0)], cfg, generator.manual_seed(0))                  # (2b, 3, S, S)
    net_views = runtime.prepare(views)
    with torch.no_grad(), runtime.autocast():
        h, z = copy.deepcopy(models[default_bn])(net_views)                              # (2b, width), (2b, d)
    grad_z = torch.randn(z.shape, generator=torch.Generator().manual_seed(2)).to(device, z.dtype)
    z_leaf = z.detach().requires_grad_()

    def main_step() -> Callable[[int], None]:
        """main.py's step: lr, the batch's images, two views, train_step, the probe, the monitor's sums."""
        net = copy.deepcopy(models[default_bn])
        passes = as_main_py_runs(net, device)
        optimizer = build_optimizer(net, name="adam", lr=LR, weight_decay=WEIGHT_DECAY)
        probe = OnlineProbe(net.feature_width, num_classes=num_classes, device=device, world=World())
        sums, first_bad = torch.zeros(1, device=device), torch.tensor(-1, device=device)

        def run(i: int) -> None:
            set_lr(optimizer, LR)
            idx = indices(i)
            generator.manual_seed(mix_seed(0, i))
            batch_views = two_views(data[idx].to(device, non_blocking=True), cfg, generator)
            loss = train_step(net, optimizer=optimizer, views=batch_views, labels=labels[idx], method=METHOD,
                              runtime=runtime, probe=probe, passes=passes)
            sums.add_(loss.reshape(1))  # the monitor's bookkeeping on the device (no sync)
            first_bad.copy_(torch.where((first_bad < 0) & ~torch.isfinite(loss), i, first_bad))
            sync(device)
        return run

    def forward_backward(mode: str) -> Callable[[int], None]:
        """The network alone, as main.py runs it: forward of the fixed views (a view a pass where main.py makes
        two), backward of a fixed gradient of z."""
        net = copy.deepcopy(models[mode])
        passes = as_main_py_runs(net, device)

        def run(i: int) -> None:
            net.zero_grad(set_to_none=True)
            with runtime.autocast():
                out = torch.cat([net(part)[1] for part in net_views.chunk(passes)])
            out.backward(grad_z)
            sync(device)
        return run

    def loss_part(i: int) -> None:
        z_leaf.grad = None
        nt_xent(z_leaf, TEMPERATURE).backward()
        sync(device)

    stepped = copy.deepcopy(models[default_bn])
    for p in stepped.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = build_optimizer(stepped, name="adam", lr=LR, weight_decay=WEIGHT_DECAY)
    probe = OnlineProbe(stepped.feature_width, num_classes=num_classes, device=device, world=World())
    fixed_h, fixed_labels = h.detach(), labels[indices(0)]

    def optimizer_part(i: int) -> None:
        optimizer.step()
        sync(device)

    def probe_part(i: int) -> None:
        probe.step(fixed_h, fixed_labels)
        sync(device)

    def data_part(i: int) -> None:
        runtime.prepare(views)  # the channels-last copy train_step makes of its views
        data[indices(i)].to(device, non_blocking=True)
        sync(device)

    def augment_part(i: int) -> None:
        two_views(data[indices(i)], cfg, generator.manual_seed(mix_seed(0, i)))
        sync(device)

    runs = {"end to end": main_step(), "data movement": data_part, "augmentation": augment_part,
            "model forward+backward": forward_backward(default_bn), "loss": loss_part,
            "optimizer step": optimizer_part, "online probe": probe_part,
            f"model forward+backward, --bn_stats {other_bn}": forward_backward(other_bn), "rate": reference}
    times = interleaved_times(runs, warmup, steps)
    return breakdown_figures(times, arch=arch, batch=batch, image_size=cfg.image_size, precision=runtime.precision,
                             default_bn=default_bn, other_bn=other_bn, macs=count_macs(joint, cfg.image_size)[1],
                             reference=reference.record(warmup))


def breakdown_figures(times: dict[str, list[float]], *, arch: str, batch: int, image_size: int, precision: str,
                      default_bn: str, other_bn: str, macs: int, reference: dict) -> dict:
    """The breakdown's record from each round's seconds: per part the median seconds and median share of the
    end-to-end step; what is left; the step's and the model's GFLOP/s and percent of the reference rate."""
    rounds = len(times["end to end"])
    total = times["end to end"]
    left = [total[r] - sum(times[part][r] for part in PARTS) for r in range(rounds)]
    other = times[f"model forward+backward, --bn_stats {other_bn}"]
    model = times["model forward+backward"]
    parts = {name: {"seconds": median(times[name]), "share": median([t / e for t, e in zip(times[name], total)])}
             for name in PARTS}
    parts["what is left"] = {"seconds": median(left), "share": median([t / e for t, e in zip(left, total)])}
    flops = step_flops(macs, batch)
    rate = reference["median_gflops"]
    step_rate, model_rate = gflops(flops, median(total)), gflops(flops, median(model))
    return {"arch": arch, "batch_size": batch, "image_size": image_size, "precision": precision, "rounds": rounds,
            "macs_per_image": macs, "step_gflop": flops / 1e9, "reference": reference,
            "end_to_end_seconds": median(total), "parts": parts,
            "bn_stats": {"default": default_bn, "other": other_bn, "other_seconds": median(other),
                         "default_minus_other_seconds": median([m - o for m, o in zip(model, other)])},
            "pipeline_overhead": median([e / m for e, m in zip(total, model)]) - 1,
            "end_to_end_gflops": step_rate, "model_gflops": model_rate,
            "end_to_end_percent_of_rate": percent(step_rate, rate), "model_percent_of_rate": percent(model_rate, rate),
            "end_to_end_percent_of_best_rate": percent(step_rate, reference["best_gflops"])}


def report_breakdown(bd: dict) -> list[str]:
    """Print where the time of a step goes; returns target lines."""
    ref, bn = bd["reference"], bd["bn_stats"]
    rows = [("end to end (main.py's step)", 1e3 * bd["end_to_end_seconds"],
             f"ms  100.0%  {bd['end_to_end_gflops']:.1f} GFLOP/s = {fmt(bd['end_to_end_percent_of_rate'], 1)}% of the "
             f"rate ({fmt(bd['end_to_end_percent_of_best_rate'], 1)}% of its best burst)")]
    for name, part in bd["parts"].items():
        share = f"ms  {100 * part['share']:5.1f}%"
        if name != "model forward+backward":
            rows.append((f"  {name}", 1e3 * part["seconds"], share))
            continue
        rows += [(f"  {name}", 1e3 * part["seconds"],
                  f"{share}  {bd['model_gflops']:.1f} GFLOP/s = {fmt(bd['model_percent_of_rate'], 1)}% of the rate"),
                 (f"    of which --bn_stats {bn['default']} over {bn['other']}", 1e3 * bn["default_minus_other_seconds"],
                  f"ms (--bn_stats {bn['other']}: {1e3 * bn['other_seconds']:.1f} ms)")]
    rows.append(("pipeline around the model", 100 * bd["pipeline_overhead"],
                 "% over the model's forward+backward (median of each round's ratio)"))
    print_table(f"where the time goes ({bd['arch']}, batch {bd['batch_size']}, {bd['image_size']}px, {bd['precision']}, "
                f"{bd['step_gflop']:.1f} GFLOP a step, median of {bd['rounds']} rounds; rate: {ref['kernel']} "
                f"{ref['precision']}, median {ref['median_gflops']:.1f}, best {ref['best_gflops']:.1f} GFLOP/s "
                f"in the same rounds)", rows)
    overhead, share = 100 * bd["pipeline_overhead"], bd["end_to_end_percent_of_rate"]
    return [f"pipeline around the model <= {100 * TARGET_PIPELINE_OVERHEAD:g}% of its forward+backward "
            f"({bd['arch']}, batch {bd['batch_size']}): {overhead:.1f}%, {verdict(overhead <= 100 * TARGET_PIPELINE_OVERHEAD)}",
            f"end to end >= {TARGET_RATE_PERCENT:g}% of the {ref['precision']} {ref['kernel'].split()[0]} rate: "
            f"{fmt(share, 1)}%, {verdict(share is not None and share >= TARGET_RATE_PERCENT)}"]


# ----------------------------------------------------------------------------- a profile of the step

# op-name pieces -> the kind of kernel they are, first match wins (torch.profiler's aten names, CPU and CUDA)
OP_KINDS = (("convolution backward", ("convolution_backward",)),
            ("convolution forward", ("convolution", "conv2d")),
            ("BatchNorm", ("batch_norm",)),
            ("matmul (head, loss, probe)", ("addmm", "::mm", "bmm", "matmul", "linear")),
            ("optimizer (Adam)", ("_foreach", "adam", "lerp", "addcdiv", "addcmul")),
            ("copies and layout", ("copy_", "::to", "contiguous", "clone", "empty", "cat", "index", "gather")),
            ("element-wise", ("relu", "threshold", "add", "mul", "div", "sub", "exp", "log", "where", "clamp",
                              "fill", "zero", "sum", "mean", "max", "sqrt", "norm", "pow")))


def op_kind(name: str) -> str:
    """The OP_KINDS kind of a profiler op name; 'other' when none matches."""
    lower = name.lower()
    return next((kind for kind, pieces in OP_KINDS if any(piece in lower for piece in pieces)), "other")


def profile_section(arch: str, images: torch.Tensor, cfg: AugmentConfig, batch: int, device: torch.device,
                    warmup: int, steps: int, num_classes: int = 10) -> dict:
    """torch.profiler over `steps` of main.py's step (after `warmup`): each kind of kernel's share of the ops'
    own time (self time, so nothing is counted twice), and the ten ops of most self time."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    runtime = make_runtime(device, "auto", True)
    net = default_model(arch, bn_stats=TRAIN_DEFAULTS["bn_stats"]).to(device).to(memory_format=torch.channels_last)
    passes = as_main_py_runs(net, device)
    optimizer = build_optimizer(net, name="adam", lr=LR, weight_decay=WEIGHT_DECAY)
    probe = OnlineProbe(net.feature_width, num_classes=num_classes, device=device, world=World())
    data = images[:batch].to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=torch.Generator().manual_seed(1)).to(device)
    generator = torch.Generator(device=device)

    def step(i: int) -> None:
        views = two_views(data, cfg, generator.manual_seed(mix_seed(0, i)))
        train_step(net, optimizer=optimizer, views=views, labels=labels, method=METHOD, runtime=runtime, probe=probe,
                   passes=passes)
        sync(device)

    for i in range(warmup):
        step(i)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(warmup + i)
    wall = (time.perf_counter() - t0) / steps
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = [(e.key, getattr(e, key, 0.0) or 0.0) for e in prof.key_averages()]
    total = sum(t for _, t in ops) or 1.0
    kinds: dict[str, float] = {}
    for name, t in ops:
        kind = op_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + t
    top = sorted(ops, key=lambda o: -o[1])[:10]
    return {"arch": arch, "batch_size": batch, "precision": runtime.precision, "steps": steps,
            "seconds_per_step": wall, "ops_seconds_per_step": total / 1e6 / steps,
            "kinds": {k: {"share": t / total, "seconds": t / 1e6 / steps} for k, t in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": name, "share": t / total, "kind": op_kind(name)} for name, t in top]}


def report_profile(pr: dict) -> None:
    """Print the profile's kinds and top ops."""
    rows = [(f"  {kind}", 100 * k["share"], f"% of op time ({1e3 * k['seconds']:.1f} ms a step)")
            for kind, k in pr["kinds"].items()]
    rows += [(f"    top: {o['op'][:48]}", 100 * o["share"], f"% ({o['kind']})") for o in pr["top_ops"]]
    print_table(f"profile of main.py's step ({pr['arch']}, batch {pr['batch_size']}, {pr['precision']}, "
                f"{pr['steps']} steps, {1e3 * pr['seconds_per_step']:.0f} ms a step under the profiler; ops' own "
                f"time {1e3 * pr['ops_seconds_per_step']:.0f} ms, summed over threads)", rows)


# ----------------------------------------------------------------------------- main.py itself, end to end

def write_synthetic_folder(root: str, n_train: int, n_test: int, classes: int = 10, size: int = 32) -> None:
    """root/train/<class>/*.png and root/test/<class>/*.png of random pixels (the section's stand-in for real
    images when --main_data is not given: decoding is cached by main.py, so speed does not depend on content)."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            folder = os.path.join(root, split, f"class{i % classes}")
            os.makedirs(folder, exist_ok=True)
            pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(os.path.join(folder, f"{i:05d}.png"))


def main_section(arch: str, batch: int, device: torch.device, threads: int, data_root: str | None,
                 reference: RateProbe, epochs: int = 2, steps_per_epoch: int = 10, bursts: int = 5) -> dict:
    """main.py as a user runs it (a fresh process, its defaults, folder data), `epochs` epochs of
    `steps_per_epoch` steps: the last epoch's train_images_per_second from its CSV (the first one warms up),
    beside bursts of the reference rate measured just before and just after it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    synthetic = data_root is None
    with tempfile.TemporaryDirectory(prefix="bench_main_") as tmp:
        if synthetic:
            data_root = os.path.join(tmp, "data")
            write_synthetic_folder(data_root, n_train=batch * steps_per_epoch, n_test=100)
        command = [sys.executable, os.path.join(root, "main.py"), "--dataset", "folder", "--data_root", data_root,
                   "--arch", arch, "--batch_size", str(batch), "--epochs", str(epochs), "--knn_every", str(epochs),
                   "--train_subset", str(batch * steps_per_epoch), "--device", device.type,
                   "--threads", str(threads), "--results_dir", os.path.join(tmp, "results"), "--name", "bench",
                   "--cache_dir", os.path.join(tmp, "cache"), "--k", str(min(200, batch * steps_per_epoch))]
        for i in range(bursts):
            reference(i)
        done = subprocess.run(command, capture_output=True, text=True)
        for i in range(bursts):
            reference(bursts + i)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise UserError(f"the main section's main.py run exited {done.returncode} ({last}); fix --main_data, "
                            f"or leave it out for synthetic images")
        with open(os.path.join(tmp, "results", "bench_statistics.csv")) as f:
            rows = list(csv.DictReader(f))
    images_per_second = float(rows[-1]["train_images_per_second"])
    macs = count_macs(default_model(arch), 32)[1]
    flops_per_pair = step_flops(macs, batch) / batch
    rate = reference.record(0)
    achieved = gflops(flops_per_pair * images_per_second, 1.0)
    return {"arch": arch, "batch_size": batch, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
            "data": "synthetic" if synthetic else data_root,
            "train_images_per_second": images_per_second, "gflops": achieved, "reference": rate,
            "percent_of_rate": percent(achieved, rate["median_gflops"]),
            "percent_of_best_rate": percent(achieved, rate["best_gflops"])}


def report_main(m: dict) -> list[str]:
    """Print main.py's end-to-end figures; returns the target line."""
    ref = m["reference"]
    print_table(f"main.py end to end ({m['arch']}, batch {m['batch_size']}, {m['steps_per_epoch']} steps an epoch, "
                f"epoch {m['epochs']} of {m['epochs']}, {m['data']} images; rate: {ref['kernel']} {ref['precision']}, "
                f"median {ref['median_gflops']:.1f}, best {ref['best_gflops']:.1f} GFLOP/s just before and after)",
                [("train images/s (the CSV's)", m["train_images_per_second"], "pairs/s"),
                 ("achieved", m["gflops"], f"GFLOP/s = {fmt(m['percent_of_rate'], 1)}% of the rate "
                                          f"({fmt(m['percent_of_best_rate'], 1)}% of its best burst)")])
    share = m["percent_of_rate"]
    return [f"main.py end to end >= {TARGET_RATE_PERCENT:g}% of the {ref['precision']} {ref['kernel'].split()[0]} rate "
            f"({m['arch']}, batch {m['batch_size']}): {fmt(share, 1)}%, "
            f"{verdict(share is not None and share >= TARGET_RATE_PERCENT)}"]


# ----------------------------------------------------------------------------- GPU epoch section

class StepTimer:
    """Elapsed seconds of a region: CUDA events on a GPU (no host sync inside), perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pairs: list = []

    def time(self, fn: Callable[[], None]) -> None:
        """Run fn once, recording its duration."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self.pairs.append((start, end))
        else:
            t0 = time.perf_counter()
            fn()
            self.pairs.append(time.perf_counter() - t0)

    def seconds(self) -> list[float]:
        """Durations of every timed call (synchronizes once on a GPU)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) / 1000.0 for s, e in self.pairs]
        return list(self.pairs)


def epoch_row(arch: str, batch: int, data: torch.Tensor, cfg: AugmentConfig, device: torch.device, warmup: int,
              steps: int, compile_net: bool, macs: int, peak: float | None) -> dict:
    """One (arch, batch) configuration of main.py's loop: epoch seconds, TFLOP/s, memory, data share (the
    augmentation's seconds, timed alone, over the step's)."""
    torch.manual_seed(0)
    model = default_model(arch, bn_stats=TRAIN_DEFAULTS["bn_stats"])
    model = model.to(device).to(memory_format=torch.channels_last)
    runtime = make_runtime(device, precision="auto", channels_last=True,
                           compile=compile_net)  # the settings main.py trains with
    optimizer = build_optimizer(model, name="adam", lr=LR, weight_decay=WEIGHT_DECAY)
    scaler = runtime.grad_scaler()
    net = runtime.maybe_compile(model)
    n = data.shape[0]
    perm = torch.randperm(n, device=device)
    generator = torch.Generator(device=device)
    steps_per_epoch = n // batch

    def batch_views(i: int) -> torch.Tensor:
        s = i % steps_per_epoch
        generator.manual_seed(mix_seed(0, i))
        return two_views(data[perm[s * batch:(s + 1) * batch]], cfg, generator)

    def full_step(i: int) -> None:
        set_lr(optimizer, LR)
        train_step(net, optimizer, batch_views(i), method=METHOD, runtime=runtime, scaler=scaler)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup):
        full_step(i)
    step_timer, aug_timer = StepTimer(device), StepTimer(device)
    for i in range(warmup, warmup + steps):
        step_timer.time(lambda: full_step(i))
    for i in range(warmup, warmup + steps):
        aug_timer.time(lambda: batch_views(i))
    step_s, aug_s = median(step_timer.seconds()), median(aug_timer.seconds())
    tflops = gflops(step_flops(macs, batch), step_s) / 1e3
    row = {"arch": arch, "batch_size": batch, "precision": runtime.precision, "compiled": compile_net,
           "step_seconds": step_s, "epoch_seconds": step_s * steps_per_epoch, "steps_per_epoch": steps_per_epoch,
           "tflops": tflops, "peak_percent": 100 * tflops / peak if peak else None,
           "data_seconds": aug_s, "data_share": aug_s / step_s,
           "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    return row


def knn_seconds(arch: str, bank: torch.Tensor, test: torch.Tensor, device: torch.device, batch: int) -> float:
    """Seconds for main's kNN evaluation: features of bank and test images, then weighted kNN with k=200."""
    torch.manual_seed(0)
    model = default_model(arch).to(device).to(memory_format=torch.channels_last)
    model.eval()
    runtime = make_runtime(device, "auto", True)
    to_input = lambda x: normalize(x, CIFAR_MEAN, CIFAR_STD)  # noqa: E731
    labels_bank = torch.randint(0, 10, (bank.shape[0],), device=device)
    labels_test = torch.randint(0, 10, (test.shape[0],), device=device)
    forward_in_batches(model.encode, images=bank[:batch], to_input=to_input, runtime=runtime,
                       batch_size=batch)  # warm-up: kernel choice, allocator
    sync(device)
    t0 = time.perf_counter()
    f_bank = forward_in_batches(model.encode, images=bank, to_input=to_input, runtime=runtime, batch_size=batch)
    f_test = forward_in_batches(model.encode, images=test, to_input=to_input, runtime=runtime, batch_size=batch)
    knn_accuracy(f_test, test_labels=labels_test, bank_features=f_bank, bank_labels=labels_bank, num_classes=10,
                 k=min(200, bank.shape[0]), temperature=TEMPERATURE)  # .item(): syncs
    sync(device)
    return time.perf_counter() - t0


def epoch_section(device: torch.device, archs: tuple[str, ...], batches: tuple[int, ...], n_train: int, n_test: int,
                  warmup: int, steps: int, compile_net: bool = False, eval_batch: int = 1024,
                  measured: dict[str, float] | None = None) -> dict:
    """main.py's loop on device-resident uint8 data: per (arch, batch) epoch time, TFLOP/s, MFU (against the
    datasheet peak and against `measured`, precision -> the matmul's best GFLOP/s), memory; kNN per arch."""
    data = synthetic_images(n_train, seed=1).to(device)
    test = synthetic_images(n_test, seed=2).to(device)
    cfg = aug_config(32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = datasheet_tflops(name, "bf16") if device.type == "cuda" else None
    measured = measured or {}
    rows, knn = [], {}
    for arch in archs:
        _, macs, _ = count_macs(default_model(arch), 32)
        for batch in batches:
            rows.append({**epoch_row(arch, batch=batch, data=data, cfg=cfg, device=device, warmup=warmup,
                                     steps=steps, compile_net=compile_net, macs=macs, peak=peak),
                         "macs_per_image": macs})
            if device.type == "cuda":
                torch.cuda.empty_cache()
        knn[arch] = knn_seconds(arch, bank=data, test=test, device=device, batch=eval_batch)
    for row in rows:
        row["knn_seconds"] = knn[row["arch"]]
        sheet = datasheet_tflops(name, row["precision"]) if device.type == "cuda" else None
        row["mfu_datasheet_percent"] = percent(row["tflops"], sheet)
        row["mfu_measured_percent"] = percent(1e3 * row["tflops"], measured.get(row["precision"]))
    return {"device_name": name, "bf16_peak_tflops": peak, "train_images": n_train, "test_images": n_test,
            "rows": rows}


# ----------------------------------------------------------------------------- output

def fmt(value, digits: int = 2) -> str:
    """A number for the table; n/a for None or nan."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def print_table(title: str, rows: list[tuple[str, object, str]]) -> None:
    """A three-column table: name, value, unit."""
    width = max(len(r[0]) for r in rows)
    print(f"\n== {title}")
    for name, value, unit in rows:
        print(f"  {name:<{width}}  {fmt(value):>12}  {unit}")


def verdict(ok: bool) -> str:
    """Target status word."""
    return "met" if ok else "NOT met"


def report_augmentation(aug: dict) -> list[str]:
    """Print the augmentation table; returns target lines."""
    rows = []
    for key in sorted(k for k in aug if k.startswith("threads_")):
        n = key.split("_")[1]
        r = aug[key]
        rows += [(f"aug tensor two_views, {n} thread(s)", r["tensor_views_per_s"], "views/s"),
                 (f"aug pil per image, {n} process(es)", r["pil_views_per_s"], "views/s"),
                 (f"aug ratio tensor/pil, {n} thread(s)", r["ratio"], "x")]
    if "device_tensor_views_per_s" in aug:
        rows.append((f"aug tensor two_views on {aug['device']} ({aug['device_batch_images']} images)",
                     aug["device_tensor_views_per_s"], "views/s"))
    print_table(f"augmentation ({aug['batch_images']} images -> {2 * aug['batch_images']} views per batch)", rows)
    return [f"tensor/PIL augmentation >= {TARGET_AUG_RATIO:g}x at {aug['threads']} threads: "
            f"{aug['ratio']:.2f}x, {verdict(aug['ratio'] >= TARGET_AUG_RATIO)}"]


def report_train(train: dict) -> list[str]:
    """Print the training-step table; returns target lines."""
    rows = [(f"step {name}", r["pairs_per_s"], f"pairs/s ({r['seconds_per_step']:.3f} s/step, {step_rate(r)})")
            for name, r in train["variants"].items()]
    rows.append(("step ratio project/naive", train["ratio"], "x"))
    rows.append((f"step fastest project variant: {train['fastest_project_variant']}",
                 train["variants"][train["fastest_project_variant"]]["pairs_per_s"], "pairs/s"))
    rates = "; ".join(f"{p} {r['kernel'].split()[0]} median {r['median_gflops']:.1f}, best {r['best_gflops']:.1f} "
                      f"GFLOP/s" for p, r in train["rates"].items())
    print_table(f"training step ({train['arch']}, batch {train['batch_size']}, {train['image_size']}px, "
                f"{train['step_gflop']:.2f} GFLOP a step, median of {train['steps']} steps"
                + (f"; rates in the same rotation: {rates})" if rates else ")"), rows)
    return [f"project/naive {train['arch']} step >= {TARGET_STEP_RATIO:g}x: {train['ratio']:.2f}x, "
            f"{verdict(train['ratio'] >= TARGET_STEP_RATIO)}"]


def step_rate(row: dict) -> str:
    """'G GFLOP/s' of a step row, with its percent of the rate in its precision when one was measured."""
    share = "" if row["percent_of_rate"] is None else f" = {row['percent_of_rate']:.1f}% of the {row['precision']} rate"
    return f"{row['gflops']:.1f} GFLOP/s{share}"


def report_epochs(ep: dict) -> list[str]:
    """Print the per-epoch table; returns target lines."""
    rows, targets = [], []
    for r in ep["rows"]:
        tag = f"{r['arch']} b{r['batch_size']}"
        rows += [(f"{tag} epoch", r["epoch_seconds"], f"s ({r['steps_per_epoch']} steps x {r['step_seconds'] * 1e3:.1f} ms)"),
                 (f"{tag} throughput", r["tflops"], f"TFLOP/s ({r['precision']})"),
                 (f"{tag} MFU, datasheet", r["mfu_datasheet_percent"], f"% of the {r['precision']} datasheet peak"),
                 (f"{tag} MFU, measured", r["mfu_measured_percent"], f"% of the {r['precision']} matmul rate measured"),
                 (f"{tag} data pipeline", 100 * r["data_share"], "% of step time"),
                 (f"{tag} peak memory", r["peak_memory_gib"], "GiB"),
                 (f"{tag} kNN evaluation", r["knn_seconds"], "s")]
        limit = TARGET_EPOCH_SECONDS.get((r["arch"], r["batch_size"]))
        if limit is not None:
            targets.append(f"{tag} epoch < {limit:g} s: {r['epoch_seconds']:.2f} s, "
                           f"{verdict(r['epoch_seconds'] < limit)}")
        targets.append(f"{tag} data pipeline < {100 * TARGET_DATA_SHARE:g}% of step: {100 * r['data_share']:.1f}%, "
                       f"{verdict(r['data_share'] < TARGET_DATA_SHARE)}")
    print_table(f"epochs on {ep['device_name']} ({ep['train_images']} images; bf16 peak "
                f"{fmt(ep['bf16_peak_tflops'], 0)} TFLOP/s)", rows)
    return targets


# ----------------------------------------------------------------------------- the run

def settings(args, device: torch.device) -> dict:
    """Sizes of every section from the flags, the device and --quick; the sections to run."""
    cpu = device.type == "cpu"
    if args.quick:
        # 16px crops of the 32px images keep resnet18 steps a fraction of a second on 2 loaded cores
        s = dict(batch=8, steps=2, warmup=1, image_size=16, aug_batch=64, aug_steps=3, bn_steps=3, breakdown_batch=8)
    else:
        # CPU: a resnet18 step at batch 32 takes seconds on 2 cores; 5 variants x 4 steps stay in minutes
        # per_view vs joint differ by a few percent, less than 10 CPU steps' noise (ratios 0.93-1.08
        # were seen): 30 steps each, about 40 s on 2 cores. The breakdown runs main.py's default-sized
        # step on a CPU (batch 256: about 20 s a round for resnet18 on 2 cores, 3 rounds)
        s = dict(batch=32 if cpu else 512, steps=3 if cpu else 10, warmup=1 if cpu else 3, image_size=32,
                 aug_batch=256, aug_steps=5, bn_steps=30, breakdown_batch=256 if cpu else 512)
    if args.batch_size is not None:
        s["batch"] = args.batch_size
    if args.breakdown_batch is not None:
        s["breakdown_batch"] = args.breakdown_batch
    if args.steps is not None:
        s["steps"] = s["aug_steps"] = s["bn_steps"] = args.steps
    s["arch"] = args.arch or STEP_ARCH
    # --quick runs one thread by default: on a loaded machine, OpenMP threads that wait for a busy
    # core at every op's barrier can make a tiny 2-thread step many times slower than 1 thread.
    s["threads"] = args.threads or (1 if args.quick else usable_cores())
    s["sections"] = chosen_sections(args.sections, device)
    return s


SECTIONS = ("rates", "augmentation", "step", "bn_stats", "probe", "breakdown", "profile", "main", "epochs")


def chosen_sections(text: str | None, device: torch.device) -> tuple[str, ...]:
    """--sections a,b,c -> the sections in running order (None: all; epochs only run on a GPU)."""
    names = SECTIONS if text is None else tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise UserError(f"--sections {text}: {', '.join(unknown) or 'nothing'} is not a section; "
                        f"give a comma-separated list of {', '.join(SECTIONS)}")
    return tuple(name for name in SECTIONS if name in names and (name != "epochs" or device.type == "cuda"))


def measure(args) -> dict:
    """Every chosen section for the chosen device; prints tables, returns the JSON record."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    s = settings(args, device)
    torch.set_num_threads(s["threads"])
    sections = s["sections"]
    record: dict = {"device": device.type, "device_name": device_name(device), "threads": s["threads"],
                    "quick": args.quick, "torch_version": torch.__version__, "sections": list(sections),
                    "load_average_start": load_average()}
    print(f"bench: device {record['device_name']}, {s['threads']} threads, torch {torch.__version__}, load average "
          f"{fmt(record['load_average_start'])}" + (" (quick: tiny sizes, figures not meaningful)" if args.quick else ""),
          flush=True)
    cfg = aug_config(s["image_size"])
    n_images = max(s["aug_batch"], s["batch"], s["breakdown_batch"]) * 4
    images = synthetic_images(n_images)
    targets: list[str] = []
    burst = burst_seconds(args.quick)
    step_precision = make_runtime(device).precision

    if "rates" in sections:
        record["rates"] = rates_section(device, args.quick)
        report_rates(record["rates"])

    if "augmentation" in sections:
        # The augmentation comparison is a host-side one (PIL only runs on CPUs); on a GPU the
        # tensor pipeline's cost shows up as the data share of the epoch rows instead.
        record["augmentation"] = augmentation_section(images, cfg=cfg, batch=s["aug_batch"], threads=s["threads"],
                                                      warmup=1, steps=s["aug_steps"])
        if device.type == "cuda":
            record["augmentation"].update(device=device.type, device_batch_images=1024,
                                          device_tensor_views_per_s=device_augmentation(device, cfg=cfg, batch=1024,
                                                                                        warmup=3, steps=10))
        targets += report_augmentation(record["augmentation"])

    if "step" in sections:
        precisions = ("fp32", "bf16")
        if args.quick and device.type == "cpu" and not cpu_has_native_bf16():
            # emulated bf16 steps take 10-20x an fp32 one here: --quick leaves them to the full run
            precisions = ("fp32",)
            print("  (--quick: no bf16 step variants, this CPU has no native bf16; the full run times them)")
        timed = precisions if device.type == "cpu" else (step_precision,)
        references = {p: RateProbe(reference_kernel(device, p, args.quick), device, burst) for p in timed}
        record["train_step"] = train_section(s["arch"], images=images, cfg=cfg, batch=s["batch"], device=device,
                                             warmup=s["warmup"], steps=s["steps"],
                                             precisions=precisions, references=references)
        targets += report_train(record["train_step"])

    if "bn_stats" in sections:
        record["bn_stats"] = bn_stats_section(s["arch"], images=images, cfg=cfg, batch=s["batch"], device=device,
                                              warmup=s["warmup"], steps=s["bn_steps"])
        targets += report_bn_stats(record["bn_stats"])

    if "probe" in sections:
        record["online_probe"] = probe_section(s["arch"], images=images, cfg=cfg, batch=s["batch"], device=device,
                                               warmup=s["warmup"], steps=s["bn_steps"])
        targets += report_probe(record["online_probe"])

    if "breakdown" in sections:
        reference = RateProbe(reference_kernel(device, step_precision, args.quick), device, burst)
        record["breakdown"] = breakdown_section(s["arch"], images=images, cfg=cfg, batch=s["breakdown_batch"],
                                                device=device, warmup=s["warmup"],
                                                steps=s["steps"], reference=reference)
        targets += report_breakdown(record["breakdown"])

    if "profile" in sections:
        record["profile"] = profile_section(s["arch"], images=images, cfg=cfg, batch=s["breakdown_batch"],
                                            device=device, warmup=s["warmup"], steps=s["steps"])
        report_profile(record["profile"])

    if "main" in sections:
        reference = RateProbe(reference_kernel(device, step_precision, args.quick), device, burst)
        record["main"] = main_section(s["arch"], batch=s["breakdown_batch"], device=device, threads=s["threads"],
                                      data_root=args.main_data, reference=reference,
                                      steps_per_epoch=2 if args.quick else 10, bursts=2 if args.quick else 5)
        targets += report_main(record["main"])

    if "epochs" in sections:
        batches = (512, 1024) if args.batch_size is None else (args.batch_size,)
        archs = EPOCH_ARCHS if args.arch is None else (args.arch,)
        measured = {r["precision"]: r["best_gflops"] for r in record.get("rates", {}).get("rows", [])}
        record["epochs"] = epoch_section(device, archs=archs, batches=batches, n_train=CIFAR_TRAIN,
                                         n_test=CIFAR_TEST, warmup=3,
                                         steps=args.steps or 10, compile_net=args.compile, measured=measured)
        targets += report_epochs(record["epochs"])

    record["load_average_end"] = load_average()
    print("\n== targets" + (" (quick sizes: not comparable)" if args.quick else ""))
    for line in targets:
        print(f"  {line}")
    record["targets"] = targets
    return record


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS has none): how busy the run's machine was."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def run(args) -> int:
    """bench.py's parsed flags: measure, print the JSON line, and write it to --json when asked."""
    record = measure(args)
    text = json.dumps(record, default=float)
    print(f"BENCH_JSON {text}", flush=True)
    if args.json:
        atomic_write_text(args.json, text + "\n")
    return 0
