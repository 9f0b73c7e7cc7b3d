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


# ----------------------------------------------------------------------------- the SimCLR family

from references import naive_dcl, naive_nt_xent, naive_nt_xent_ids  # noqa: E402
from simclr.loss import DCL, REGISTRY, NTXent, SupCon, build_loss, dcl, label_ids  # noqa: E402

TEMPERATURES = [0.05, 0.1, 0.5, 1.0]
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, -1, 3, -1, 1])       # repeated, one class alone, unlabeled


def embeddings(n: int = 12, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(2 * n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_supcon_against_the_loop_reference_with_repeated_labels(temperature):
    z = embeddings()
    ids = label_ids(LABELS)
    got = SupCon(temperature)(z, LABELS)
    # the reference sees the unlabeled images' ids as distinct, as the product makes them
    assert ids[8] != ids[10] and ids[8] == ids[8 + 12]
    assert got.item() == pytest.approx(naive_nt_xent_ids(z, ids, temperature).item(), rel=1e-5)
    assert torch.isfinite(got)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_supcon_base_temperature_scales_as_supcontrast(temperature):
    # SupContrast's SupConLoss: -(temperature / base_temperature) x the mean log-probability of the positives
    z = embeddings(seed=6)
    got = SupCon(temperature, supcon_base_temperature=0.07)(z, LABELS)
    expected = temperature / 0.07 * naive_nt_xent_ids(z, label_ids(LABELS), temperature)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert SupCon(temperature)(z, LABELS).item() == pytest.approx(expected.item() * 0.07 / temperature, rel=1e-5)


def test_supcon_with_distinct_labels_or_none_is_ntxent():
    z = embeddings(seed=1)
    plain = NTXent(0.5)(z)
    assert torch.allclose(SupCon(0.5)(z, torch.arange(12)), plain, atol=1e-6)
    assert torch.allclose(SupCon(0.5)(z, torch.full((12,), -1)), plain, atol=1e-6)
    assert torch.allclose(SupCon(0.5)(z), plain, atol=1e-6)
    # ntxent and dcl take the labels and leave them: the two views of an image are the positives
    assert torch.equal(NTXent(0.5)(z, LABELS), plain) and torch.equal(DCL(0.5)(z, LABELS), DCL(0.5)(z))


def test_supcon_ids_of_unlabeled_images_are_unique_in_the_whole_batch():
    # under torchrun the labels of every rank are gathered first: an unlabeled image's id is its position
    # in the global batch, so rank 1's first unlabeled image never shares an id with rank 0's
    ids = label_ids(torch.full((8,), -1))
    assert len(set(ids[:8].tolist())) == 8 and torch.equal(ids[:8], ids[8:])


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("sigma", [None, 0.5])
def test_dcl_against_the_loop_reference(temperature, sigma):
    z = embeddings(seed=2)
    got = DCL(temperature, dcl_sigma=sigma)(z)
    assert got.item() == pytest.approx(naive_dcl(z[:12], z[12:], temperature, sigma).item(), rel=1e-5, abs=1e-6)
    # the positive is out of the denominator: DCL differs from NT-Xent by exactly the log of that sum
    if sigma is None:
        assert not torch.isclose(got, nt_xent(z, temperature))


def reference_gradient(z: torch.Tensor, sigma: float | None, weight_gradient: bool = False) -> torch.Tensor:
    ref = z.detach().clone().requires_grad_(True)
    naive_dcl(ref[:6], ref[6:], 0.2, sigma, weight_gradient).backward()
    return ref.grad


@pytest.mark.parametrize("sigma", [None, 0.5, 0.05])
def test_dcl_gradients_match_the_reference(sigma):
    z = embeddings(n=6, seed=3).double().requires_grad_(True)
    dcl(z, 0.2, sigma).backward()
    assert torch.allclose(z.grad, reference_gradient(z, sigma), atol=1e-10)


def test_dclw_weight_is_a_coefficient_of_the_gradient():
    # DCLW's weight multiplies each positive term, the paper's w: no gradient through it (lightly's DCLWLoss).
    # Through it (raminnakhli's code) the same value has another gradient, which this test tells apart
    z = embeddings(n=6, seed=3).double().requires_grad_(True)
    value = dcl(z, 0.2, 0.5)
    value.backward()
    ref = z.detach().clone().requires_grad_(True)
    through = naive_dcl(ref[:6], ref[6:], 0.2, 0.5, weight_gradient=True)
    through.backward()
    assert value.item() == pytest.approx(through.item(), rel=1e-12)
    assert not torch.allclose(z.grad, ref.grad, atol=1e-3)
    assert torch.allclose(z.grad, reference_gradient(z, 0.5), atol=1e-10)


@pytest.mark.parametrize("loss", ["ntxent", "supcon", "dcl"])
def test_every_loss_stays_fp32_and_finite_under_bf16_autocast(loss):
    z = embeddings(seed=4) * 30  # large projections: only normalisation keeps exp(sim / 0.05) in range
    loss_fn = REGISTRY[loss](0.05)
    exact = loss_fn(z, LABELS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss_fn(z.bfloat16(), LABELS)
    assert inside.dtype == torch.float32 and torch.isfinite(inside)
    assert inside.item() == pytest.approx(exact.item(), rel=0.05)


def test_the_ntxent_default_still_equals_the_textbook_loss():
    z = embeddings(seed=5)
    assert NTXent(0.5)(z).item() == pytest.approx(naive_nt_xent(z[:12], z[12:], 0.5).item(), rel=1e-5)


# ----------------------------------------------------------------------------- the registry and the flag table

def test_the_registry_is_the_loss_flag_and_each_setting_is_one_declared_flag():
    import dataclasses

    from simclr.flags import LOSSES, TRAIN, TRAIN_FLAGS
    assert tuple(REGISTRY) == LOSSES == TRAIN["loss"].choices
    for name, kind in REGISTRY.items():
        for field in dataclasses.fields(kind):
            # a setting is a flag of main.py: shared by every loss (temperature), or this loss's own
            assert field.name in TRAIN and TRAIN[field.name].loss in (None, name), (name, field.name)
    owned = {(f.loss, f.name) for f in TRAIN_FLAGS if f.loss is not None}
    assert owned == {(name, f.name) for name, kind in REGISTRY.items() for f in dataclasses.fields(kind)
                     if TRAIN[f.name].loss is not None}


def test_build_loss_takes_each_setting_from_the_config_and_nothing_else():
    from types import SimpleNamespace
    config = SimpleNamespace(loss="dcl", temperature=0.2, dcl_sigma=0.7, lr=1.0)
    assert build_loss(config) == DCL(0.2, dcl_sigma=0.7)
    # a setting of another loss in the config (an older checkpoint's dcl_sigma beside ntxent) is not read
    assert build_loss(SimpleNamespace(loss="ntxent", temperature=0.2, dcl_sigma=0.7)) == NTXent(0.2)


def test_dcl_sigma_is_bounded_where_the_weight_stays_finite():
    from simclr.cli import UserError
    from simclr.flags import TRAIN
    flag = TRAIN["dcl_sigma"]
    assert flag.ge == 2.0 ** -126 == torch.finfo(torch.float32).tiny  # the smallest normal float32
    # pairs at both ends of [-1, 1] (identical and opposite views), one at 1 up to float32 rounding, random ones
    e = torch.eye(4)
    z1 = torch.cat([e[:2], e[2:3], torch.randn(5, 4, generator=torch.Generator().manual_seed(0))])
    z2 = torch.cat([e[:2], -e[2:3], z1[3:4] * 3, torch.randn(4, 4, generator=torch.Generator().manual_seed(1))])
    z = torch.cat([z1, z2]).requires_grad_(True)
    for sigma in (flag.ge, 2 * flag.ge, 1e-30, 0.5, 100.0):
        value = dcl(z, 0.5, sigma)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(z.grad).all(), sigma
        z.grad = None
    # beyond the bound the weight is not finite (1 / sigma overflows float32), and the flag refuses it
    for sigma in (flag.ge / 4, 1e-45, 1e-300):
        assert not torch.isfinite(dcl(z.detach(), 0.5, sigma)), sigma
        with pytest.raises(UserError, match=r">= 1\.1754943508222875e-38"):
            flag.check(sigma)
    assert flag.check(flag.ge) == flag.ge
