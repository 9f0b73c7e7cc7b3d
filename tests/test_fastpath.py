"""The project's fast step against the seed-style naive one, and the tensor vs PIL augmentation backends."""
import math

import pandas as pd
import pytest
import torch

import main
from conftest import tiny_run_args
from references import naive_dcl, naive_nt_xent, naive_nt_xent_ids, naive_step, pil_two_views
from simclr.augment import AugmentConfig, two_views
from simclr.engine import Runtime
from simclr.loss import DCL, NTXent, SupCon
from simclr.model import SimCLR, nt_xent
from simclr.methods.simclr import SimCLRMethod
from simclr.step import train_step

CFG = AugmentConfig(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared, loaded machine several OpenMP threads make these tiny steps crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_net(seed: int = 0) -> SimCLR:
    """The encoder table's tiny CNN (BatchNorm after every conv) with a small head, seeded."""
    torch.manual_seed(seed)
    return SimCLR("tiny", feature_dim=16, proj_hidden_dim=32)


def test_naive_loss_equals_nt_xent():
    torch.manual_seed(0)
    z = torch.randn(12, 8, dtype=torch.float64)
    assert torch.allclose(naive_nt_xent(z[:6], z[6:], 0.5), nt_xent(z, 0.5), atol=1e-10)


def test_one_forward_and_two_forwards_give_the_same_loss_and_gradients():
    # BatchNorm in eval mode: the only intended difference between the steps is the per-view batch statistics
    images = torch.randint(0, 256, (6, 16, 16, 3), dtype=torch.uint8)
    views = two_views(images, CFG, torch.Generator().manual_seed(0)).double()
    nets = [small_net().double().eval() for _ in range(2)]
    with torch.no_grad():  # the same start, and a non-trivial BN state
        for net in nets:
            for m in net.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.running_mean.fill_(0.1)
                    m.running_var.fill_(1.5)
    fast = nt_xent(nets[0](views)[1], 0.5)
    _, z1 = nets[1](views[:6])
    _, z2 = nets[1](views[6:])
    naive = naive_nt_xent(z1, z2, 0.5)
    assert torch.allclose(fast, naive, rtol=1e-9)
    fast.backward()
    naive.backward()
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-10), name


def ids_by_hand(labels: torch.Tensor) -> torch.Tensor:
    """Positive ids of [view 1; view 2] written out: the label, or for an unlabeled image an id no other image has."""
    ids = [int(y) if y >= 0 else -1 - i for i, y in enumerate(labels.tolist())]
    return torch.tensor(ids + ids)


# each --loss as the step calls it, and its loop reference on the projections z1, z2 (N, d) of the two views
LOSSES_BY_HAND = {
    "ntxent": (NTXent(0.5), lambda z1, z2, labels: naive_nt_xent(z1, z2, 0.5)),
    "supcon": (SupCon(0.5), lambda z1, z2, labels: naive_nt_xent_ids(torch.cat([z1, z2]), ids_by_hand(labels), 0.5)),
    "dcl": (DCL(0.5), lambda z1, z2, labels: naive_dcl(z1, z2, 0.5)),
    "dclw": (DCL(0.5, dcl_sigma=0.5), lambda z1, z2, labels: naive_dcl(z1, z2, 0.5, 0.5)),
}


@pytest.mark.parametrize("name", list(LOSSES_BY_HAND))
def test_the_step_is_one_step_by_hand(name):
    # train_step: one forward over both views (per-view BatchNorm), the loss object, backward, Adam; by hand:
    # a forward pass per view, the loop reference of the loss, plain backward, a plain Adam step
    loss, reference = LOSSES_BY_HAND[name]
    images = torch.randint(0, 256, (6, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    views = two_views(images, CFG, torch.Generator().manual_seed(0)).double()
    labels = torch.tensor([0, 1, 0, -1, 2, -1])                     # a repeated class and two unlabeled images
    torch.manual_seed(0)
    net = SimCLR("tiny", feature_dim=16, proj_hidden_dim=32, bn_stats="per_view").double()
    by_hand = SimCLR("tiny", feature_dim=16, proj_hidden_dim=32).double()
    by_hand.load_state_dict(net.state_dict())
    start = {key: tensor.clone() for key, tensor in net.state_dict().items()}
    value = train_step(net, torch.optim.Adam(net.parameters(), lr=1e-3), views, labels, method=SimCLRMethod(loss),
                       runtime=Runtime(torch.device("cpu"), "fp32", False))

    _, z1 = by_hand(views[:6])
    _, z2 = by_hand(views[6:])
    expected = reference(z1, z2, labels)
    optimizer = torch.optim.Adam(by_hand.parameters(), lr=1e-3)
    optimizer.zero_grad()
    expected.backward()
    optimizer.step()

    assert value.item() == pytest.approx(expected.item(), rel=1e-9)
    after, expected_after = net.state_dict(), by_hand.state_dict()
    assert after.keys() == expected_after.keys()
    for key, tensor in after.items():
        assert torch.allclose(tensor, expected_after[key], rtol=0, atol=1e-6), key
    for key, _ in net.named_parameters():  # a step that moved nothing would pass the comparison
        assert not torch.equal(after[key], start[key]), key


@pytest.mark.parametrize("backend", ["tensor", "pil"])
def test_steps_on_fixed_views_decrease_the_loss(backend):
    # a fixed batch repeated: both steps must fit it, from views made by either augmentation backend
    images = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8)
    if backend == "tensor":
        views = two_views(images, CFG, torch.Generator().manual_seed(0))
        v1, v2 = views[:8], views[8:]
    else:
        torch.manual_seed(0)
        v1, v2 = pil_two_views(images, CFG.image_size, CFG.mean, CFG.std)
    runtime = Runtime(torch.device("cpu"), "fp32", True)
    fast_net, naive_net = small_net(), small_net()
    fast_net = fast_net.to(memory_format=torch.channels_last)
    fast_opt = torch.optim.Adam(fast_net.parameters(), lr=1e-3)
    naive_opt = torch.optim.Adam(naive_net.parameters(), lr=1e-3)
    fast, naive = [], []
    for _ in range(6):
        fast.append(train_step(fast_net, fast_opt, torch.cat([v1, v2]), method=SimCLRMethod(NTXent(0.5)),
                               runtime=runtime).item())
        naive.append(naive_step(naive_net, naive_opt, v1, v2, 0.5).item())
    for losses in (fast, naive):
        assert all(math.isfinite(x) for x in losses)
        assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("backend", ["tensor", "pil"])
def test_training_with_either_backend_decreases_the_loss(tiny_folder, tmp_path, backend):
    results = tmp_path / "results"
    code = main.main(tiny_run_args(tiny_folder, results, backend, batch_size=16, epochs=4, knn_every=100,
                                   aug_backend=backend))
    assert code == 0
    loss = pd.read_csv(results / f"{backend}_statistics.csv")["train_loss"].tolist()
    assert len(loss) == 4 and all(math.isfinite(x) for x in loss)
    # 3 steps per epoch are noisy: compare the first epoch with the mean of the last two
    assert (loss[2] + loss[3]) / 2 < loss[0], loss
