"""Checks that need a CUDA GPU (skipped without one): no host sync in the step, device augmentation."""
import pytest
import torch

import main
from simclr.augment import AugmentConfig, apply_params, sample_params, two_views
from simclr.model import SimCLR, nt_xent
from simclr.optim import build_optimizer
from simclr.engine import Runtime
from simclr.loss import NTXent
from simclr.methods.simclr import SimCLRMethod
from simclr.step import train_step

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CFG = AugmentConfig(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.mark.parametrize("bn_stats", ["joint", "per_view"])
def test_training_step_never_waits_for_the_gpu(bn_stats):
    device = torch.device("cuda")
    images = torch.randint(0, 256, (512, 32, 32, 3), dtype=torch.uint8, device=device)
    perm = torch.randperm(512, device=device)
    model = SimCLR("resnet18", bn_stats=bn_stats).to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, "lars", 0.1, 1e-6)
    runtime = Runtime(device, "bf16", True)
    generator = torch.Generator(device=device)
    loss_sum = torch.zeros((), device=device)
    for warm in range(2):  # cuDNN and allocator warm-up may sync; the steady state must not
        train_step(model, optimizer, two_views(images[perm[:64]], CFG, generator), method=SimCLRMethod(NTXent(0.5)),
                   runtime=runtime)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            generator.manual_seed(step)
            views = two_views(images[perm[step * 64:(step + 1) * 64]], CFG, generator)
            loss_sum += train_step(model, optimizer, views, method=SimCLRMethod(NTXent(0.5)), runtime=runtime)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss_sum).item()


def test_device_augmentation_equals_cpu_given_the_same_parameters():
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
    params = sample_params(64, 32, 32, CFG, torch.Generator().manual_seed(0))
    on_cpu = apply_params(images, params, CFG)
    on_gpu = apply_params(images.cuda(), {k: v.cuda() for k, v in params.items()}, CFG).cpu()
    assert torch.allclose(on_cpu, on_gpu, atol=1e-4)


def test_compiled_run_saves_plain_weights(tiny_folder, tmp_path):
    args = ["--dataset", "folder", "--data_root", str(tiny_folder), "--image_size", "16", "--arch", "resnet18",
            "--batch_size", "8", "--epochs", "1", "--k", "5", "--device", "cuda", "--compile",
            "--results_dir", str(tmp_path), "--name", "c"]
    assert main.main(args) == 0
    state = torch.load(tmp_path / "c_model.pth", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in state)
    SimCLR("resnet18").load_state_dict(state)
    # saved from the GPU, loadable on a machine without one: every tensor in both files is a CPU tensor
    last = torch.load(tmp_path / "c_last.pth", weights_only=True)
    tensors = [*state.values(), *last["model"].values(),
               *(v for s in last["optimizer"]["state"].values() for v in s.values() if isinstance(v, torch.Tensor))]
    assert tensors and all(t.device.type == "cpu" for t in tensors)


def test_a_device_index_beyond_the_gpus_is_one_line(tmp_path, capsys):
    import main
    code = main.main(["--device", f"cuda:{torch.cuda.device_count()}", "--results_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cuda:0 to cuda:" in err


def test_per_view_on_the_gpu_equals_two_forward_passes():
    # float64: a B-row and a 2B-row convolution round differently in fp32/TF32
    device = torch.device("cuda")
    torch.manual_seed(0)
    stock = SimCLR("resnet18", feature_dim=16, proj_hidden_dim=32).double()
    per_view = SimCLR("resnet18", feature_dim=16, proj_hidden_dim=32, bn_stats="per_view").double()
    per_view.load_state_dict(stock.state_dict())
    stock, per_view = (m.to(device).to(memory_format=torch.channels_last) for m in (stock, per_view))
    x = torch.randn(16, 3, 32, 32, device=device, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x[8:] = 0.5 * x[8:] + 1  # views with different statistics
    z_ref = torch.cat([stock(x[:8])[1], stock(x[8:])[1]])
    z = per_view(x)[1]
    assert torch.allclose(z, z_ref, atol=1e-8)
    nt_xent(z_ref, 0.5).backward()
    nt_xent(z, 0.5).backward()
    for (name, a), (_, b) in zip(stock.named_parameters(), per_view.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-8, rtol=1e-6), name
    for (name, a), (_, b) in zip(stock.named_buffers(), per_view.named_buffers()):
        assert torch.allclose(a.double(), b.double(), atol=1e-10), name
