"""--bn_stats: per_view equals two forward passes of a stock model, joint equals one."""
import pytest
import torch
from torch import nn

from simclr import flags
from simclr.cli import UserError
from simclr.distributed import GlobalBatchNorm, PerViewGlobalBatchNorm, PerViewSyncBatchNorm, convert_batchnorm
from simclr.model import PerViewBatchNorm, SimCLR, nt_xent, per_view_batchnorm

B, SIZE = 4, 16
STOCK = (nn.BatchNorm1d, nn.BatchNorm2d)


def stock_and(bn_stats: str, dtype=torch.float64, momentum="default", **kw) -> tuple[SimCLR, SimCLR]:
    """A plain SimCLR (torchvision BatchNorm) and a `bn_stats` one with the same weights."""
    torch.manual_seed(0)
    stock = SimCLR("resnet18", feature_dim=16, proj_hidden_dim=32).to(dtype)
    other = SimCLR("resnet18", feature_dim=16, proj_hidden_dim=32, bn_stats=bn_stats, **kw).to(dtype)
    other.load_state_dict(stock.state_dict())
    if momentum != "default":
        for m in (*stock.modules(), *other.modules()):
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = momentum
    return stock, other


def batch(dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    """[view 1 (B); view 2 (B)] with views of clearly different statistics (so the modes differ)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * B, 3, SIZE, SIZE, generator=g, dtype=dtype)
    x[B:] = 0.5 * x[B:] + 1.0
    return x


def two_passes(model: SimCLR, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: view 1, then view 2, each its own forward pass."""
    h1, z1 = model(x[:B])
    h2, z2 = model(x[B:])
    return torch.cat([h1, h2]), torch.cat([z1, z2])


def assert_models_match(a: nn.Module, b: nn.Module, atol: float, rtol: float, grads: bool = True) -> None:
    """Same gradients, running statistics and num_batches_tracked (exactly)."""
    if grads:
        for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.allclose(pa.grad.double(), pb.grad.double(), atol=atol, rtol=rtol), name
    for (name, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(ba, bb), name
        else:
            assert torch.allclose(ba.double(), bb.double(), atol=atol, rtol=rtol), name


def step(model: SimCLR, forward, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """forward(model, x) -> (h, z); backward of NT-Xent; returns detached (h, z)."""
    h, z = forward(model, x)
    nt_xent(z.float() if z.dtype == torch.bfloat16 else z, 0.5).backward()
    return h.detach(), z.detach()


@pytest.mark.parametrize("momentum", ["default", None, 0.3])
def test_per_view_equals_two_forward_passes(momentum):
    stock, per_view = stock_and("per_view", momentum=momentum)
    assert sum(isinstance(m, PerViewBatchNorm) for m in per_view.modules()) == 21  # 20 BatchNorm2d, 1 BatchNorm1d
    assert not any(isinstance(m, STOCK) for m in per_view.modules())
    for seed in (1, 2):  # two steps: the second one starts from updated running statistics
        x = batch(seed=seed)
        h_ref, z_ref = step(stock, two_passes, x)
        h, z = step(per_view, lambda m, v: m(v), x)
        assert torch.allclose(h, h_ref, atol=1e-10) and torch.allclose(z, z_ref, atol=1e-10)
    assert_models_match(stock, per_view, atol=1e-10, rtol=1e-8)
    assert stock.g[1].num_batches_tracked.item() == 4  # two steps x two views
    # eval mode: running statistics, the whole batch at once
    stock.eval(), per_view.eval()
    x = batch(seed=3)
    assert torch.allclose(per_view(x)[1], stock(x)[1], atol=1e-10)


def test_per_view_differs_from_joint_and_joint_is_one_stock_pass():
    stock, joint = stock_and("joint")
    assert all(type(m) in STOCK for m in joint.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    _, per_view = stock_and("per_view")
    x = batch()
    _, z_one = step(stock, lambda m, v: m(v), x)
    _, z_joint = step(joint, lambda m, v: m(v), x)
    assert torch.equal(z_joint, z_one)
    assert_models_match(stock, joint, atol=0, rtol=0)
    _, z_per_view = step(per_view, lambda m, v: m(v), x)
    # the test could not tell the modes apart if they gave (nearly) the same output
    assert (z_per_view - z_joint).abs().max() > 1e-2


def test_head_batchnorm1d_alone_per_view():
    g = torch.Generator().manual_seed(0)
    stock = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).double()
    per_view = per_view_batchnorm(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).double())
    per_view.load_state_dict(stock.state_dict())
    x = torch.randn(2 * B, 6, generator=g, dtype=torch.float64)
    x[B:] *= 3
    ref = torch.cat([stock(x[:B]), stock(x[B:])])
    out = per_view(x)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (ref * weights).sum().backward()
    (out * weights).sum().backward()
    assert torch.allclose(out, ref, atol=1e-12)
    assert_models_match(stock, per_view, atol=1e-12, rtol=1e-10)


def test_batchnorm_without_a_shift_per_view_and_global_equals_two_stock_passes():
    # SimCLRv2's last head layer: BatchNorm1d with a scale and no shift, per view (the custom kernel path) and in
    # the CPU torchrun form outside a process group; both against two passes of the stock module
    from simclr.model import unshifted_batchnorm
    g = torch.Generator().manual_seed(0)
    stock = unshifted_batchnorm(5).double()
    with torch.no_grad():
        stock.weight.copy_(torch.rand(5, generator=g, dtype=torch.float64) + 0.5)
    x = torch.randn(2 * B, 5, generator=g, dtype=torch.float64)
    x[B:] = 3 * x[B:] + 1
    weights = torch.randn(2 * B, 5, generator=g, dtype=torch.float64)
    for make in (per_view_batchnorm, lambda m: convert_batchnorm(per_view_batchnorm(m), torch.device("cpu"))):
        reference = unshifted_batchnorm(5).double()
        reference.load_state_dict(stock.state_dict())
        other = make(nn.Sequential(unshifted_batchnorm(5).double()))
        other.load_state_dict({f"0.{k}": v for k, v in stock.state_dict().items()})
        assert other[0].bias is None and "0.bias" not in other.state_dict()
        ref = torch.cat([reference(x[:B]), reference(x[B:])])
        out = other(x)
        (ref * weights).sum().backward()
        (out * weights).sum().backward()
        assert torch.allclose(out, ref, atol=1e-12)
        assert torch.allclose(other[0].weight.grad, reference.weight.grad, atol=1e-12)
        assert torch.allclose(other[0].running_var, reference.running_var, atol=1e-12)


def test_channels_last_per_view():
    stock, per_view = stock_and("per_view")
    stock, per_view = (m.to(memory_format=torch.channels_last) for m in (stock, per_view))
    x = batch().contiguous(memory_format=torch.channels_last)
    _, z_ref = step(stock, two_passes, x)
    _, z = step(per_view, lambda m, v: m(v), x)
    assert torch.allclose(z, z_ref, atol=1e-10)
    assert_models_match(stock, per_view, atol=1e-10, rtol=1e-8)
    # the per-view BatchNorm keeps the memory format (no silent fall-back to a contiguous layout)
    y = per_view.f.bn1(per_view.f.conv1(x))
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_bf16_autocast_per_view():
    stock, per_view = stock_and("per_view", dtype=torch.float32)
    stock, per_view = (m.to(memory_format=torch.channels_last) for m in (stock, per_view))
    x = batch(torch.float32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, z_ref = two_passes(stock, x)
        _, z = per_view(x)
    assert z.dtype == z_ref.dtype == torch.bfloat16
    assert torch.allclose(z.float(), z_ref.float(), atol=5e-2, rtol=5e-2)
    nt_xent(z_ref.float(), 0.5).backward()
    nt_xent(z.float(), 0.5).backward()
    # bf16 rounding differs between a 2B and a B convolution: compare gradients by direction
    for (name, a), (_, b) in zip(stock.named_parameters(), per_view.named_parameters()):
        cosine = torch.nn.functional.cosine_similarity(a.grad.flatten(), b.grad.flatten(), dim=0)
        assert cosine > 0.95, name
    assert_models_match(stock, per_view, atol=5e-2, rtol=5e-2, grads=False)


@pytest.mark.parametrize("momentum", ["default", None])
def test_grad_checkpoint_per_view_updates_running_statistics_once(momentum):
    stock, per_view = stock_and("per_view", momentum=momentum)
    _, checkpointed = stock_and("per_view", momentum=momentum, grad_checkpoint=True)
    x = batch()
    _, z_ref = step(stock, two_passes, x)
    _, z_plain = step(per_view, lambda m, v: m(v), x)
    _, z_ckpt = step(checkpointed, lambda m, v: m(v), x)
    assert torch.allclose(z_ckpt, z_ref, atol=1e-10)
    assert_models_match(per_view, checkpointed, atol=1e-10, rtol=1e-8)
    assert_models_match(stock, checkpointed, atol=1e-10, rtol=1e-8)


def test_odd_batch_is_refused_in_training_only():
    _, per_view = stock_and("per_view")
    with pytest.raises(ValueError, match="even number of rows"):
        per_view(batch()[:2 * B - 1])
    per_view.eval()
    assert per_view(batch()[:3])[1].shape == (3, 16)  # evaluation: running statistics, any batch


def test_state_dict_keys_are_torchvision_and_load_strictly_into_the_default_model():
    plain, per_view = stock_and("per_view")
    step(per_view, lambda m, v: m(v), batch())
    state = per_view.state_dict()
    assert list(state) == list(plain.state_dict())
    assert [k for k in state if k.startswith("g.1.")] == ["g.1.weight", "g.1.bias", "g.1.running_mean",
                                                          "g.1.running_var", "g.1.num_batches_tracked"]
    fresh = SimCLR("resnet18", feature_dim=16, proj_hidden_dim=32)
    fresh.load_state_dict(state, strict=True)
    assert fresh.f.bn1.num_batches_tracked.item() == 2
    per_view.eval(), fresh.eval()
    x = batch(torch.float32, seed=4)
    assert torch.allclose(per_view.float()(x)[0], fresh(x)[0], atol=1e-5)  # a plain model evaluates the same


def test_distributed_conversion_keeps_per_view_and_the_parameters():
    for device, per_view_kind, joint_kind in ((torch.device("cpu"), PerViewGlobalBatchNorm, GlobalBatchNorm),
                                             (torch.device("cuda"), PerViewSyncBatchNorm, nn.SyncBatchNorm)):
        for bn_stats, kind in (("per_view", per_view_kind), ("joint", joint_kind)):
            model = SimCLR("resnet18", feature_dim=16, proj_hidden_dim=32, bn_stats=bn_stats)
            before = [id(p) for p in model.parameters()] + [id(b) for b in model.buffers()]
            keys = list(model.state_dict())
            convert_batchnorm(model, device)  # nothing moves to the device: CUDA conversion runs here too
            norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            assert len(norms) == 21 and all(type(m) is kind for m in norms), (device, bn_stats)
            assert [id(p) for p in model.parameters()] + [id(b) for b in model.buffers()] == before
            assert list(model.state_dict()) == keys


@pytest.mark.parametrize("kind", [PerViewGlobalBatchNorm, PerViewSyncBatchNorm])
def test_distributed_per_view_kinds_in_one_process_equal_two_passes(kind):
    # outside a process group both fall back to local statistics: the per-view split must still hold
    stock = nn.BatchNorm2d(3).double()
    other = kind(3).double()
    x = batch()
    out = other(x)
    ref = torch.cat([stock(x[:B]), stock(x[B:])])
    assert torch.allclose(out, ref, atol=1e-12)
    assert torch.allclose(other.running_mean, stock.running_mean) and torch.allclose(other.running_var,
                                                                                      stock.running_var)
    assert other.num_batches_tracked.item() == 2


# ----------------------------------------------------------------------------- torch.compile

class Tiny(nn.Module):
    """Conv-BN2d-ReLU-pool-Linear-BN1d: both kinds of BatchNorm, compiled in seconds."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn2d = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.linear, self.bn1d = nn.Linear(8, 6, bias=False), nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn2d(self.conv(x))).mean(dim=(2, 3))  # (N, 8)
        return self.bn1d(self.linear(h))                           # (N, 6)


def test_compile_aot_eager_per_view_matches_eager_without_extra_graph_breaks():
    import torch._dynamo
    torch.manual_seed(0)
    joint = Tiny()
    per_view, eager = per_view_batchnorm(Tiny()), per_view_batchnorm(Tiny())
    per_view.load_state_dict(joint.state_dict())
    eager.load_state_dict(joint.state_dict())
    x = batch(torch.float32)[:, :, :8, :8]

    torch._dynamo.reset()
    breaks = {name: torch._dynamo.explain(model)(x).graph_break_count
              for name, model in (("joint", Tiny()), ("per_view", per_view_batchnorm(Tiny())))}
    assert breaks["per_view"] <= breaks["joint"], breaks

    torch._dynamo.reset()
    compiled = torch.compile(per_view, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    out = compiled(x)
    ref = eager(x)
    out.square().sum().backward()
    ref.square().sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert_models_match(eager, per_view, atol=1e-5, rtol=1e-4)
    assert per_view.bn1d.num_batches_tracked.item() == 2


# ----------------------------------------------------------------------------- the flag

def test_flag_parses_is_recorded_and_alters_the_run():
    parser = flags.build_parser(flags.TRAIN_FLAGS, "test", explicit_only=True)
    values = flags.train_values(vars(parser.parse_args(["--bn_stats", "joint"])))
    assert values["bn_stats"] == "joint"
    assert flags.TRAIN_DEFAULTS["bn_stats"] in ("per_view", "joint") and "bn_stats" in flags.RUN_KEYS
    with pytest.raises(UserError, match="bn_stats"):
        parser.parse_args(["--bn_stats", "both"])


def test_resume_of_a_checkpoint_from_before_the_flag_keeps_joint():
    saved = {k: v for k, v in flags.train_values({}).items() if k != "bn_stats"}  # an older checkpoint's config
    values, _ = flags.train_resume_values({"resume": "x"}, saved, "x")
    assert values["bn_stats"] == "joint"  # what that run was trained with, whatever today's default
    with pytest.raises(UserError, match="bn_stats"):
        flags.train_resume_values({"resume": "x", "bn_stats": "per_view"}, saved, "x")
    values, _ = flags.train_resume_values({"resume": "x", "bn_stats": "per_view"}, {**saved, "bn_stats": "per_view"}, "x")
    assert values["bn_stats"] == "per_view"
    # the loss and the head depth came later too: an older checkpoint means NT-Xent and a 2-layer head
    older = {k: v for k, v in saved.items() if k not in ("loss", "proj_layers")}
    values, _ = flags.train_resume_values({"resume": "x"}, older, "x")
    assert (values["loss"], values["proj_layers"]) == ("ntxent", 2)
    with pytest.raises(UserError, match="loss"):
        flags.train_resume_values({"resume": "x", "loss": "dcl"}, older, "x")


# ----------------------------------------------------------------------------- --view_passes: a view a pass

@pytest.mark.parametrize("momentum", ["default", None])
def test_a_view_a_pass_equals_per_view_in_one_pass(momentum):
    """train_step's passes=2 on a per-view model told so (one_view_per_pass) computes what one pass of per-view
    BatchNorm computes: h, z, gradients and running statistics, float64, over two steps of Adam."""
    from simclr.engine import make_runtime
    from simclr.loss import NTXent
    from simclr.methods.simclr import SimCLRMethod
    from simclr.model import one_view_per_pass
    from simclr.optim import build_optimizer
    from simclr.step import train_step
    _, one_pass = stock_and("per_view", momentum=momentum)
    _, view_a_pass = stock_and("per_view", momentum=momentum)
    one_view_per_pass(view_a_pass)
    runtime, method = make_runtime("cpu", "fp32", False), SimCLRMethod(NTXent(0.5))
    losses = {}
    for name, model, passes in (("one", one_pass, 1), ("two", view_a_pass, 2)):
        optimizer = build_optimizer(model, name="adam", lr=1e-3, weight_decay=1e-6)
        losses[name] = [train_step(model, optimizer=optimizer, views=batch(seed=s), method=method, runtime=runtime,
                                   passes=passes).item() for s in (1, 2)]
    assert losses["one"] == pytest.approx(losses["two"], rel=1e-12, abs=0)
    assert_models_match(one_pass, view_a_pass, atol=1e-12, rtol=1e-10)
    for (name, a), (_, b) in zip(one_pass.named_parameters(), view_a_pass.named_parameters()):
        assert torch.allclose(a, b, atol=1e-12, rtol=0), name
    # told it gets two views again, it splits its input as before (a view a pass is the model's setting only)
    one_view_per_pass(view_a_pass, False)
    x = batch(seed=3)
    assert torch.allclose(view_a_pass(x)[1], one_pass(x)[1], atol=1e-10)
    # without being told, one view alone is split into halves: the step must tell the model
    one_view_per_pass(view_a_pass)
    h_alone = view_a_pass(x[:B])[0]
    one_view_per_pass(view_a_pass, False)
    assert not torch.allclose(view_a_pass(x[:B])[0], h_alone, atol=1e-6)


def test_view_passes_auto_and_refusals(tiny_folder, tmp_path, capsys):
    import main
    from conftest import tiny_run_args
    from simclr.pretrain import view_passes
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert view_passes(0, cpu, "per_view", distributed=False) == 2  # auto on a CPU: half the batch fits the caches
    assert view_passes(0, cpu, "joint", distributed=False) == 1     # joint statistics need both views in one pass
    assert view_passes(0, cpu, "per_view", distributed=True) == 1   # DDP: one forward pass a step
    assert view_passes(0, cuda, "per_view", distributed=False) == 1
    assert view_passes(1, cpu, "per_view", distributed=False) == 1 and view_passes(2, cuda, "per_view", False) == 2
    for extra, word in ((["--view_passes", "2", "--bn_stats", "joint"], "bn_stats"),
                        (["--view_passes", "3"], "view_passes")):
        assert main.main(tiny_run_args(tiny_folder, str(tmp_path), None, *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0], err
    assert not list(tmp_path.glob("**/*.csv"))  # refused before anything was written


def test_a_view_a_pass_with_grad_checkpoint_updates_running_statistics_once():
    from simclr.model import one_view_per_pass
    stock, _ = stock_and("per_view")
    _, checkpointed = stock_and("per_view", grad_checkpoint=True)
    one_view_per_pass(checkpointed)
    x = batch()
    _, z_ref = step(stock, two_passes, x)
    _, z = step(checkpointed, two_passes, x)  # a view a pass, each recomputed in backward
    assert torch.allclose(z, z_ref, atol=1e-10)
    assert_models_match(stock, checkpointed, atol=1e-10, rtol=1e-8)
