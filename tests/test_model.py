"""Model and NT-Xent loss against independent references (tests/references.py); kNN is in test_knn.py."""
import math

import pytest
import torch

from references import naive_nt_xent, naive_nt_xent_ids
from simclr.model import ARCHS, SimCLR, nt_xent


@pytest.mark.parametrize("n", [1, 2, 5, 16])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_matches_naive_loop(n, temperature):
    g = torch.Generator().manual_seed(n * 100 + int(temperature * 10))
    z1, z2 = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
    got = nt_xent(torch.cat([z1, z2]), temperature).item()
    assert got == pytest.approx(naive_nt_xent(z1, z2, temperature).item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_the_ids_reference_with_image_ids_is_simclrs_loss(n):
    # SimCLR's positives are the other view of the same image: ids 0..N-1 twice
    g = torch.Generator().manual_seed(n)
    z1, z2 = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
    ids = torch.arange(n).repeat(2)
    got = naive_nt_xent_ids(torch.cat([z1, z2]), ids, 0.5).item()
    assert got == pytest.approx(naive_nt_xent(z1, z2, 0.5).item(), rel=1e-12)
    if n > 1:  # and other positives give another loss: the ids are used
        other = torch.cat([torch.arange(n), torch.arange(n).roll(1)])
        assert got != pytest.approx(naive_nt_xent_ids(torch.cat([z1, z2]), other, 0.5).item(), rel=1e-6)


def test_the_ids_reference_closed_form_for_identical_positives():
    # two ids, m identical rows each, the ids orthogonal: each of the m-1 positives gives
    # -log(e^{1/t} / ((m-1) e^{1/t} + m e^0)), and so does their mean
    m, t = 3, 0.5
    z = torch.eye(4)[torch.tensor([0, 1, 0, 1, 0, 1])] * 2.0
    expected = -math.log(math.exp(1 / t) / ((m - 1) * math.exp(1 / t) + m))
    assert naive_nt_xent_ids(z, torch.tensor([0, 1, 0, 1, 0, 1]), t).item() == pytest.approx(expected, rel=1e-12)


def test_nt_xent_closed_form_for_aligned_views():
    # identical views, every other pair orthogonal: l = -log(e^{1/t} / (e^{1/t} + (2N-2) e^0))
    n, t = 4, 0.5
    z1 = torch.eye(8)[:n] * 3.0  # scale must not matter: z is normalised
    loss = nt_xent(torch.cat([z1, z1]), t).item()
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * n - 2))
    assert loss == pytest.approx(expected, rel=1e-6)


def test_nt_xent_symmetric_in_views_and_stable_at_low_temperature():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    a = nt_xent(torch.cat([z1, z2]), 0.3)
    b = nt_xent(torch.cat([z2, z1]), 0.3)
    assert torch.allclose(a, b, atol=1e-6)
    # exp-then-log overflows here; the cross-entropy form must stay finite
    assert torch.isfinite(nt_xent(torch.cat([z1, z2]) * 1000, 0.001))


def test_nt_xent_anchor_subset_averages_to_full_loss():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 4, generator=g)
    first = nt_xent(z, 0.5, anchors=torch.tensor([0, 1, 4, 5]))
    second = nt_xent(z, 0.5, anchors=torch.tensor([2, 3, 6, 7]))
    assert torch.allclose((first + second) / 2, nt_xent(z, 0.5), atol=1e-6)


@pytest.mark.parametrize("arch,width", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_model_shapes_and_cifar_stem(arch, width):
    model = SimCLR(arch, feature_dim=32, proj_hidden_dim=64)
    h, z = model(torch.randn(2, 3, 32, 32))
    assert h.shape == (2, width) and z.shape == (2, 32)
    conv1 = model.f.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1) and conv1.padding == (1, 1)
    assert isinstance(model.f.maxpool, torch.nn.Identity)
    assert not hasattr(model.f, "fc") and not any(k.startswith("f.fc") for k in model.state_dict())
    head = [type(m).__name__ for m in model.g]
    assert head == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert model.g[0].bias is None and model.g[0].out_features == 64


def test_imagenet_stem_and_unknown_arch():
    model = SimCLR("resnet18", stem="imagenet")
    assert model.f.conv1.stride == (2, 2) and isinstance(model.f.maxpool, torch.nn.MaxPool2d)
    with pytest.raises(ValueError, match="unknown arch"):
        SimCLR("resnet99")
    assert set(ARCHS) == {"resnet18", "resnet34", "resnet50", "tiny"}


def test_tiny_cnn_shapes_and_stems():
    model = SimCLR("tiny", feature_dim=8, proj_hidden_dim=16)
    h, z = model(torch.randn(3, 3, 16, 16))
    assert h.shape == (3, model.feature_width) == (3, 64) and z.shape == (3, 8)
    assert [m.stride for m in model.f.modules() if isinstance(m, torch.nn.Conv2d)] == [(1, 1), (2, 2), (2, 2)]
    wide = SimCLR("tiny", stem="imagenet")
    assert [m.stride for m in wide.f.modules() if isinstance(m, torch.nn.Conv2d)] == [(2, 2), (2, 2), (2, 2)]
    assert sum(p.numel() for p in model.f.parameters()) < 30_000


def test_every_parameter_gets_a_gradient():
    model = SimCLR("resnet18", feature_dim=16, proj_hidden_dim=32)
    _, z = model(torch.randn(4, 3, 16, 16))
    nt_xent(z, 0.5).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


@pytest.mark.parametrize("arch", ["resnet18", "tiny"])
def test_grad_checkpoint_gives_same_loss_and_gradients(arch):
    torch.manual_seed(0)
    plain = SimCLR(arch, feature_dim=16, proj_hidden_dim=32)
    ckpt = SimCLR(arch, feature_dim=16, proj_hidden_dim=32, grad_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(6, 3, 16, 16)
    losses = []
    for model in (plain, ckpt):
        _, z = model(x)
        loss = nt_xent(z, 0.5)
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
    # the recomputation in backward must not update BatchNorm's running statistics again
    for (name, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_mac_count_without_thop_is_close_to_thops(monkeypatch):
    import builtins
    from simclr import engine
    model = SimCLR("resnet18", feature_dim=16, proj_hidden_dim=32)
    params, with_thop, how = engine.count_macs(model, 32)
    assert how == "thop" and params == sum(p.numel() for p in model.parameters())
    real_import = builtins.__import__

    def no_thop(name, *args, **kwargs):
        if name == "thop":
            raise ImportError("thop is not installed")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_thop)
    _, without, how = engine.count_macs(model, 32)
    assert "thop not installed" in how
    # by hand: conv1 3x3x3->64 at 32x32 alone is 32*32*64*27 MACs; thop adds BatchNorm and pooling terms
    assert without > 32 * 32 * 64 * 27 and 0.97 * with_thop < without <= with_thop
    assert not any("total_ops" in k for k in model.state_dict())  # the counters went on a copy


# ----------------------------------------------------------------------------- the projection head's last layer

def test_the_v2_head_ends_as_simclrv2s_and_the_original_as_the_original_tools():
    from simclr.model import projection_head
    original, v2 = projection_head(64, 32, 16, 3), projection_head(64, 32, 16, 3, head="v2")
    # hidden layers identical (Linear without bias - BatchNorm1d - ReLU), keys and shapes alike
    assert [type(m) for m in original[:6]] == [type(m) for m in v2[:6]]
    assert {k: v.shape for k, v in original[:6].state_dict().items()} == {k: v.shape for k, v in v2[:6].state_dict().items()}
    # the original tool's last layer: a Linear with a bias, nothing after it
    assert len(original) == 7 and original[6].bias is not None
    # SimCLRv2's (google-research/simclr tf2, ProjectionHead's last LinearLayer): a Linear without bias, then
    # BatchNorm with a scale and no shift (center=False), no ReLU
    assert len(v2) == 8 and v2[6].bias is None and isinstance(v2[7], torch.nn.BatchNorm1d)
    assert v2[7].weight is not None and v2[7].bias is None
    assert set(v2.state_dict()) - set(original.state_dict()) >= {"7.weight", "7.running_mean", "7.running_var"}
    # by hand, in training mode: z = gamma * (W u - mean) / sqrt(var + eps) over the batch, no shift
    u = torch.randn(10, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    last = v2[6:].double()
    with torch.no_grad():
        last[1].weight.copy_(torch.linspace(0.5, 2.0, 16, dtype=torch.float64))
        a = u @ last[0].weight.T
        expected = last[1].weight * (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + last[1].eps)
        assert torch.allclose(last(u), expected, atol=1e-12)
    with pytest.raises(ValueError, match="unknown head"):
        projection_head(64, 32, 16, head="v3")


def test_every_encoder_width_in_the_table_is_the_built_one():
    from simclr.encoders import ENCODERS, build_encoder
    for arch, spec in ENCODERS.items():
        assert build_encoder(arch)[1] == spec.width, arch


def test_the_simclrv2_recipe_builds_v2s_head_as_wide_as_the_encoder():
    from simclr import flags
    for arch, width in (("resnet18", 512), ("resnet50", 2048), ("tiny", 64)):
        values = flags.train_values({"recipe": "simclrv2", "arch": arch})
        assert (values["head"], values["proj_layers"], values["proj_hidden_dim"]) == ("v2", 3, width), arch
    # an explicit width wins; the other recipes keep the original tool's last layer
    assert flags.train_values({"recipe": "simclrv2", "proj_hidden_dim": 256})["proj_hidden_dim"] == 256
    assert {flags.train_values({"recipe": r})["head"] for r in ("seed", "paper", "supcon")} == {"original"}
