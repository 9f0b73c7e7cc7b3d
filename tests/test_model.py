"""Model, NT-Xent loss and kNN against independent references."""
import math

import pytest
import torch
import torch.nn.functional as F

from simclr.model import ARCHS, SimCLR, naive_nt_xent, nt_xent
from simclr.knn import knn_accuracy, knn_scores, topk_accuracy


@pytest.mark.parametrize("n", [1, 2, 5, 16])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_matches_naive_loop(n, temperature):
    g = torch.Generator().manual_seed(n * 100 + int(temperature * 10))
    z1, z2 = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
    got = nt_xent(torch.cat([z1, z2]), temperature).item()
    assert got == pytest.approx(naive_nt_xent(z1.double(), z2.double(), temperature).item(), rel=1e-5, abs=1e-6)


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
    first = nt_xent(z, 0.5, torch.tensor([0, 1, 4, 5]))
    second = nt_xent(z, 0.5, torch.tensor([2, 3, 6, 7]))
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
    assert set(ARCHS) == {"resnet18", "resnet34", "resnet50"}


def test_every_parameter_gets_a_gradient():
    model = SimCLR("resnet18", feature_dim=16, proj_hidden_dim=32)
    _, z = model(torch.randn(4, 3, 16, 16))
    nt_xent(z, 0.5).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_grad_checkpoint_gives_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = SimCLR("resnet18", feature_dim=16, proj_hidden_dim=32)
    ckpt = SimCLR("resnet18", feature_dim=16, proj_hidden_dim=32, grad_checkpoint=True)
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


# ----------------------------------------------------------------------------- kNN

def brute_force_knn(test, test_labels, bank, bank_labels, classes, k, t):
    """Loop over test samples: sort similarities, weight the top k, rank classes."""
    top1 = top5 = 0
    bank_n = F.normalize(bank.double(), dim=1)
    for x, y in zip(test, test_labels):
        sims = (bank_n @ F.normalize(x.double(), dim=0)).tolist()
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * classes
        for i in order:
            votes[int(bank_labels[i])] += math.exp(sims[i] / t)
        ranked = sorted(range(classes), key=lambda c: -votes[c])
        top1 += ranked[0] == int(y)
        top5 += int(y) in ranked[:5]
    return 100 * top1 / len(test), 100 * top5 / len(test)


@pytest.mark.parametrize("k,t,chunk", [(1, 0.5, 7), (10, 0.1, 1024), (50, 0.5, 3)])
def test_knn_matches_brute_force(k, t, chunk):
    g = torch.Generator().manual_seed(k)
    bank, test = torch.randn(120, 16, generator=g), torch.randn(37, 16, generator=g)
    bank_labels = torch.randint(0, 10, (120,), generator=g)
    test_labels = torch.randint(0, 10, (37,), generator=g)
    got = knn_accuracy(test, test_labels, bank, bank_labels, 10, k, t, chunk_size=chunk)
    want = brute_force_knn(test, test_labels, bank, bank_labels, 10, k, t)
    assert got == pytest.approx(want)


def test_knn_separable_data_scores_100_and_small_test_set():
    g = torch.Generator().manual_seed(3)
    centres = torch.eye(6, 32) * 10
    bank_labels = torch.arange(6).repeat(20)
    bank = centres[bank_labels] + 0.1 * torch.randn(120, 32, generator=g)
    test_labels = torch.tensor([4, 1, 5])  # fewer test images than the chunk size
    test = centres[test_labels] + 0.1 * torch.randn(3, 32, generator=g)
    top1, top5 = knn_accuracy(test, test_labels, bank, bank_labels, 6, 200, 0.5, chunk_size=1024)
    assert top1 == 100.0 and top5 == 100.0


def test_knn_weights_votes_by_similarity():
    # one very close neighbour of class 1 must outvote two far ones of class 0 at low temperature
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    bank_labels = torch.tensor([1, 0, 0])
    test = torch.tensor([[1.0, 0.2]])
    scores = knn_scores(test, bank, bank_labels, 2, 3, 0.05)
    assert scores.argmax().item() == 1
    assert topk_accuracy(scores, torch.tensor([1]), (1,)) == [100.0]


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
