"""Two CPU processes (gloo) compute exactly what one process computes with the whole batch."""
import json
import os
import socket
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import TINY_ARCH, made_once
from simclr.distributed import GlobalBatchNorm, World, convert_batchnorm, gather_views, shard
from simclr.engine import Runtime
from simclr.loss import DCL, NTXent, SupCon
from simclr.model import SimCLR, nt_xent
from simclr.methods.nnclr import NNCLR, predictor
from simclr.methods.simclr import SimCLRMethod
from simclr.step import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, SIZE = 8, 16
# labels of the B images, repeated: ranks 0 and 1 share classes 0 and 1; their positive ids of [view 1 (B); view 2 (B)]
LABELS = torch.tensor([0, 1, 2, 0, 1, 3, 3, 0])
LABEL_IDS = torch.cat([LABELS, LABELS])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def views_and_model(bn_stats: str = "joint", head: str = "original"):
    """The same global batch of views [view 1 (B); view 2 (B)] and initial model in every process.

    float64: at random init the first layers' gradients cancel so much that fp32 rounding alone
    moves them by ~2% (measured: fp32 vs fp64 in one process), which would hide real errors.
    """
    g = torch.Generator().manual_seed(0)
    views = torch.randn(2 * B, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    return views, SimCLR("resnet18", feature_dim=16, proj_hidden_dim=32, bn_stats=bn_stats, head=head).double()


def local_share(views: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank's rows of a global [view 1 (B); view 2 (B)] tensor, both views: (2b, ...)."""
    b = B // world
    return torch.cat([views[rank * b:(rank + 1) * b], views[B + rank * b:B + (rank + 1) * b]])


def single_process_step(bn_stats: str = "joint", head: str = "original"):
    views, model = views_and_model(bn_stats, head)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = train_step(model, opt, views, method=SimCLRMethod(NTXent(0.5)), runtime=Runtime(torch.device("cpu")))
    return loss.item(), {k: v.detach().clone() for k, v in model.state_dict().items()}


# what the two gloo ranks compute, all in one start of two processes: a DDP training step with either BatchNorm
# mode (and SimCLRv2's head, whose last BatchNorm has no shift), and the gathered loss's gradient for NT-Xent,
# positive ids (supcon) and DCLW
MODES = ("step:joint", "step:per_view", "step:per_view:v2", "grad", "ids", "dcl", "nnclr")


def nnclr_setup():
    """The views, a model with NNCLR's predictor and an NNCLR method whose queue holds 5 of its 12 rows."""
    views, model = views_and_model()
    torch.manual_seed(2)
    model.add_module("predictor", predictor(16, 24).double())
    method = NNCLR(model.predictor, 0.5, 12, 16, torch.device("cpu"))
    method.after_step(torch.randn(10, 16, generator=torch.Generator().manual_seed(3)))
    return views, model, method


def nnclr_result(loss: torch.Tensor, model: torch.nn.Module, method: NNCLR) -> dict:
    return {"loss": loss.item(), "state": model.state_dict(), "queue": method.queue.clone(), "filled": method.filled}


def single_process_nnclr_step() -> dict:
    views, model, method = nnclr_setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = train_step(model, opt, views, method=method, runtime=Runtime(torch.device("cpu")))
    return nnclr_result(loss, model, method)


def _worker(rank: int, world: int, port: int, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save({mode: _rank_result(rank, world, mode) for mode in MODES}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _rank_result(rank: int, world: int, mode: str) -> dict:
    if mode == "nnclr":  # as main.py's job: global BatchNorm in the encoder and head, the predictor on the gathered z
        views, model, method = nnclr_setup()
        for part in (model.f, model.g):
            convert_batchnorm(part, torch.device("cpu"))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        loss = train_step(ddp, opt, local_share(views, rank, world), method=method,
                          runtime=Runtime(torch.device("cpu")))
        return nnclr_result(loss, model, method)
    if mode.startswith("step:"):
        views, model = views_and_model(*mode.split(":")[1:])
        model = convert_batchnorm(model, torch.device("cpu"))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        loss = train_step(ddp, opt, local_share(views, rank, world), method=SimCLRMethod(NTXent(0.5)),
                          runtime=Runtime(torch.device("cpu")))
        return {"loss": loss.item(), "state": model.state_dict()}
    # the gradient of the gathered loss with respect to this rank's projections
    z = torch.randn(2 * B, 8, generator=torch.Generator().manual_seed(5))
    z_local = local_share(z, rank, world).clone().requires_grad_(True)
    b = B // world
    labels = LABELS[rank * b:(rank + 1) * b]  # this rank's images
    loss_fn = {"grad": NTXent(0.5), "ids": SupCon(0.5), "dcl": DCL(0.5, dcl_sigma=0.5)}[mode]
    loss = loss_fn(*gather_views(z_local, labels))
    loss.backward()
    return {"loss": loss.item(), "grad": z_local.grad}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, list[dict]]:
    """{mode: [rank 0's result, rank 1's result]} from one start of two gloo processes."""
    out = made_once(tmp_path_factory, "gloo", lambda folder: mp.spawn(
        _worker, args=(2, free_port(), str(folder)), nprocs=2, join=True))  # once, also under pytest -n N
    saved = [torch.load(out / f"{r}.pt", weights_only=True) for r in range(2)]
    return {mode: [saved[r][mode] for r in range(2)] for mode in MODES}


@pytest.mark.parametrize("bn_stats,head", [("joint", "original"), ("per_view", "original"), ("per_view", "v2")])
def test_two_ranks_equal_one_process_step(two_ranks, bn_stats, head):
    # per_view: each rank holds [its view 1 rows; its view 2 rows], and each view's statistics are
    # those of that view over both ranks, as in one process with the whole batch (itself tested
    # against two stock forward passes in test_bn_stats.py)
    loss, state = single_process_step(bn_stats, head)
    results = two_ranks[f"step:{bn_stats}" + (":v2" if head == "v2" else "")]
    # each rank's loss is the mean over its own anchors; their mean is the global loss
    assert sum(r["loss"] for r in results) / 2 == pytest.approx(loss, abs=1e-5)
    for r in results:
        assert set(r["state"]) == set(state)  # same keys as plain BatchNorm: checkpoints stay portable
        for key, value in state.items():
            if value.dtype.is_floating_point:
                assert torch.allclose(r["state"][key], value, atol=1e-9, rtol=1e-7), key
            else:
                assert torch.equal(r["state"][key], value), key


def test_gather_carries_the_other_ranks_gradient(two_ranks):
    results = two_ranks["grad"]
    z = torch.randn(2 * B, 8, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    nt_xent(z, 0.5).backward()
    for rank, r in enumerate(results):
        # the gathered loss of one rank averages over half the anchors, and the all-gather's
        # backward sums every rank's contribution: rank gradient = 2 x single-process gradient.
        # A detached gather would keep only this rank's own anchors' term and fail here.
        expected = 2 * local_share(z.grad, rank, 2)
        assert torch.allclose(r["grad"], expected, atol=1e-6)


def test_gathered_positive_ids_give_the_single_process_loss_and_gradient(two_ranks):
    results = two_ranks["ids"]
    z = torch.randn(2 * B, 8, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    loss = nt_xent(z, 0.5, LABEL_IDS)
    loss.backward()
    # the ids differ from the default pairs, so this is a loss over more positives than NT-Xent's
    assert not torch.isclose(loss, nt_xent(z.detach(), 0.5))
    assert sum(r["loss"] for r in results) / 2 == pytest.approx(loss.item(), abs=1e-6)
    for rank, r in enumerate(results):
        # ids gathered wrongly (or not at all) pair another rank's rows with the wrong positives
        assert torch.allclose(r["grad"], 2 * local_share(z.grad, rank, 2), atol=1e-6)


def test_gathered_decoupled_loss_gives_the_single_process_loss_and_gradient(two_ranks):
    from simclr.loss import dcl
    results = two_ranks["dcl"]
    z = torch.randn(2 * B, 8, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    loss = dcl(z, 0.5, 0.5)  # DCLW: its weights are a softmax over every pair of the global batch
    loss.backward()
    assert sum(r["loss"] for r in results) / 2 == pytest.approx(loss.item(), abs=1e-6)
    for rank, r in enumerate(results):
        assert torch.allclose(r["grad"], 2 * local_share(z.grad, rank, 2), atol=1e-6)


def test_two_ranks_equal_one_process_nnclr_step_and_fill_the_same_queue(two_ranks):
    # the queue of each rank takes view 1 of both ranks' images, in rank order, as one process with the whole batch
    expected = single_process_nnclr_step()
    results = two_ranks["nnclr"]
    assert sum(r["loss"] for r in results) / 2 == pytest.approx(expected["loss"], abs=1e-6)
    for r in results:
        assert r["filled"] == expected["filled"] == 12
        assert torch.allclose(r["queue"], expected["queue"], atol=1e-6)
        for key, value in expected["state"].items():
            if value.dtype.is_floating_point:
                assert torch.allclose(r["state"][key], value, atol=1e-9, rtol=1e-7), key
            else:
                assert torch.equal(r["state"][key], value), key


@pytest.mark.long
def test_torchrun_two_processes_end_to_end(tiny_folder, tmp_path):
    results = tmp_path / "results"
    args = ["--dataset", "folder", "--data_root", str(tiny_folder), "--image_size", "16", "--arch", TINY_ARCH,
            "--batch_size", "8", "--epochs", "2", "--k", "5", "--feature_dim", "16", "--proj_hidden_dim", "32",
            "--device", "cpu", "--precision", "fp32", "--workers", "0", "--results_dir", str(results), "--name", "ddp"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "main.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = sorted(p for p in os.listdir(results) if not p.startswith("."))  # (.ddp.lock: the run-name lock)
    assert shown == ["ddp_config.json", "ddp_curves.png", "ddp_last.pth", "ddp_model.pth",
                     "ddp_statistics.csv"]
    assert json.loads((results / "ddp_config.json").read_text())["world_size"] == 2
    frame = pd.read_csv(results / "ddp_statistics.csv")
    assert frame["epoch"].tolist() == [1, 2]

    # the saved weights, evaluated in this single process, give the kNN accuracy the two ranks reported
    from simclr.augment import normalize
    from simclr.data import load_dataset
    from simclr.knn import extract_features, knn_accuracy
    bundle = load_dataset("folder", str(tiny_folder), 16, log=lambda *a: None)
    model = SimCLR(TINY_ARCH, feature_dim=16, proj_hidden_dim=32)
    model.load_state_dict(torch.load(results / "ddp_model.pth", weights_only=True))
    model.eval()
    runtime, to_input = Runtime(torch.device("cpu")), lambda batch: normalize(batch, bundle.mean, bundle.std)
    bank = extract_features(model.encode, bundle.train.images, to_input, runtime)
    test = extract_features(model.encode, bundle.test.images, to_input, runtime)
    top1, top5 = knn_accuracy(test, bundle.test.labels, bank, bundle.train.labels, len(bundle.classes), 5, 0.5)
    best = frame.loc[frame["test_acc@1"].idxmax()]
    assert top1 == pytest.approx(best["test_acc@1"]) and top5 == pytest.approx(best["test_acc@5"])

    # the online probe (on by default) of rank 0's checkpoint scores the last epoch's test features as logged
    from simclr.distributed import World
    from simclr.pretrain import OnlineProbe
    last = torch.load(results / "ddp_last.pth", weights_only=True)
    model.load_state_dict(last["model"])
    model.eval()
    probe = OnlineProbe(model.feature_width, len(bundle.classes), torch.device("cpu"), World())
    probe.restore(last["online_probe"], "ddp_last.pth")
    test = extract_features(model.encode, bundle.test.images, to_input, runtime)
    p1, p5 = probe.accuracy(test, bundle.test.labels)
    assert p1 == pytest.approx(frame["probe_acc@1"].iloc[-1]) and p5 == pytest.approx(frame["probe_acc@5"].iloc[-1])
    assert probe.linear.weight.abs().sum() > 0


def test_cpu_batchnorm_conversion_keeps_the_parameters_an_optimizer_holds():
    model = SimCLR("resnet18", feature_dim=16, proj_hidden_dim=32)
    before = {id(p) for p in model.parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    converted = convert_batchnorm(model, torch.device("cpu"))
    assert {id(p) for p in converted.parameters()} == before
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == before
    assert sum(isinstance(m, GlobalBatchNorm) for m in converted.modules()) == 21  # 20 in the encoder, 1 in the head


@pytest.mark.parametrize("n,world", [(9, 4), (10, 3), (4, 4), (100, 2)])
def test_shards_cover_every_row_once_and_none_is_empty(n, world):
    parts = [shard(n, World(r, world, r)) for r in range(world)]
    assert [i for p in parts for i in range(n)[p]] == list(range(n))
    assert all(p.stop > p.start for p in parts)
