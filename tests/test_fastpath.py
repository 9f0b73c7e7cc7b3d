"""The project's fast step against the seed-style naive one, and the tensor vs PIL augmentation backends."""
import math

import pandas as pd
import pytest
import torch

import main
from conftest import tiny_run_args
from references import naive_nt_xent, naive_step, pil_two_views
from simclr.augment import AugmentConfig, two_views
from simclr.engine import Runtime, train_step
from simclr.model import SimCLR, nt_xent

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
        fast.append(train_step(fast_net, fast_opt, torch.cat([v1, v2]), 0.5, runtime).item())
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
