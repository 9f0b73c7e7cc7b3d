"""The loss takes positive ids; labels travel with the views from the data to the step (both backends)."""
import pytest
import torch

from simclr.loss import nt_xent, view_ids


@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0])
def test_the_default_ids_are_the_two_views_of_an_image(temperature):
    z = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    default = nt_xent(z, temperature)
    assert view_ids(24).tolist() == list(range(12)) * 2
    assert torch.allclose(nt_xent(z, temperature, view_ids(24)), default, atol=1e-6, rtol=0)
    # other ids change the loss: the test would pass on an ids argument that is ignored otherwise
    shifted = torch.cat([torch.arange(12), torch.arange(12).roll(1)])
    assert not torch.isclose(nt_xent(z, temperature, shifted), default, atol=1e-3)


def test_ids_under_bf16_autocast_stay_fp32():
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3] * 2)
    exact = nt_xent(z, 0.1, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = nt_xent(z.bfloat16(), 0.1, ids)
    assert inside.dtype == torch.float32
    assert torch.allclose(inside, exact, atol=0.05)  # only the bf16 rounding of z itself differs


def test_an_odd_number_of_views_without_ids_is_refused():
    with pytest.raises(ValueError, match="even number of rows"):
        nt_xent(torch.randn(5, 4), 0.5)


@pytest.mark.parametrize("backend", ["tensor", "pil"])
def test_labels_travel_with_the_views_of_each_step(tiny_folder, tmp_path, backend):
    from simclr.distributed import World
    from simclr.engine import mix_seed
    from simclr.flags import TRAIN_FLAGS, build_parser
    from simclr.pretrain import Pretraining, configure

    args = ["--dataset", "folder", "--data_root", str(tiny_folder), "--image_size", "16", "--arch", "resnet18",
            "--batch_size", "8", "--epochs", "1", "--k", "5", "--feature_dim", "8", "--proj_hidden_dim", "16",
            "--device", "cpu", "--workers", "0", "--aug_backend", backend, "--results_dir", str(tmp_path)]
    explicit = vars(build_parser(TRAIN_FLAGS, "main.py", explicit_only=True).parse_args(args))
    cfg, _, _ = configure(explicit, World())
    job = Pretraining(cfg, World(), lambda *a: None)
    job.train_labels[::5] = -1  # unlabeled images keep -1 on their way to the step
    labels = job.train_labels.clone()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(mix_seed(cfg.seed, 0)))
    steps = list(job.epoch_views(0, 1))  # from step 1, as a resumed epoch
    assert [s for s, _, _ in steps] == list(range(1, len(labels) // 8))
    for step, views, step_labels in steps:
        assert views.shape == (16, 3, 16, 16)
        assert torch.equal(step_labels, labels[order[step * 8:(step + 1) * 8]])
    assert any((s_labels == -1).any() for _, _, s_labels in steps)
