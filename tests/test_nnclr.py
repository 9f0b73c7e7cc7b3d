"""--method nnclr: its loss against a brute-force reference, its FIFO queue, exact resume, its model everywhere."""
import collections
import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import hubconf
import main
from conftest import tiny_run_args
from references import naive_nnclr
from simclr import flags, loop
from simclr.checkpoint import model_from_config, open_run
from simclr.methods import METHODS, build_method
from simclr.methods.nnclr import NNCLR, predictor
from simclr.model import SimCLR

QUEUE = 20  # smaller than an epoch's 48 view-1 projections of the tiny run: the queue wraps around within an epoch


def method_of(queue_size: int = 7, dim: int = 6, temperature: float = 0.3) -> NNCLR:
    torch.manual_seed(0)
    return NNCLR(predictor(dim, 10).double(), temperature, queue_size, dim, torch.device("cpu"))


def test_the_method_names_are_the_flag_choices():
    assert tuple(METHODS) == flags.TRAIN_METHODS


@pytest.mark.parametrize("filled", [0, 3, 7])
def test_loss_and_gradient_match_a_brute_force_reference(filled):
    method = method_of()
    method.queue = method.queue.double()
    support = F.normalize(torch.randn(filled, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    method.queue[:filled], method.filled = support, filled
    z = torch.randn(10, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    loss = method.loss(z)
    loss.backward()
    z_ref = z.detach().clone().requires_grad_(True)
    p = method.predictor(z_ref)  # the same predictor, in the same (training) mode: the same batch statistics
    expected = naive_nnclr(z_ref[:5], z_ref[5:], p[:5], p[5:], list(support), 0.3)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-10)
    # the gradient reaches z through the predictions only: a neighbour that carried one would differ here
    assert torch.allclose(z.grad, z_ref.grad, atol=1e-10)


def test_the_anchor_rows_of_each_process_average_to_the_whole_batch_loss():
    method = method_of()
    method.after_step(torch.randn(10, 6, generator=torch.Generator().manual_seed(3)).double())
    z = torch.randn(8, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    whole = method.loss(z)
    halves = [method.loss(z, anchors=torch.tensor(rows)) for rows in ([0, 1, 4, 5], [2, 3, 6, 7])]
    assert (halves[0] + halves[1]).item() / 2 == pytest.approx(whole.item(), abs=1e-12)


def test_the_queue_is_first_in_first_out_over_view_one_only():
    method, reference = method_of(queue_size=7), collections.deque(maxlen=7)
    for step, n in enumerate((3, 3, 4, 9)):  # fills, wraps around, and a batch larger than the queue
        z = torch.randn(2 * n, 6, generator=torch.Generator().manual_seed(10 + step))
        method.after_step(z)
        reference.extend(F.normalize(z[:n], dim=1))
        assert method.filled == len(reference)
        filled = method.queue[:method.filled]
        # the same set of rows as the deque (the slots' order is the write position's, not age)
        assert sorted(map(tuple, filled.tolist())) == sorted(tuple(r.tolist()) for r in reference)


def test_state_dict_round_trips_and_a_misfit_is_refused():
    method = method_of()
    method.after_step(torch.randn(8, 6))
    saved = method.state_dict()
    other = method_of()
    other.load_state_dict(saved)
    assert torch.equal(other.queue, method.queue) and (other.filled, other.pointer) == (method.filled, method.pointer)
    with pytest.raises(ValueError, match="not a queue"):
        other.load_state_dict({"queue": torch.zeros(3, 5), "pointer": 0})


def test_queue_size_and_loss_settings_are_refused_with_another_method(tiny_folder, tmp_path, capsys):
    assert main.main(tiny_run_args(tiny_folder, tmp_path, "a", "--queue_size", "5")) == 2
    assert "--queue_size is a setting of --method nnclr" in capsys.readouterr().err
    assert main.main(tiny_run_args(tiny_folder, tmp_path, "b", "--method", "nnclr", "--loss", "dcl")) == 2
    assert "--loss is a setting of --method simclr" in capsys.readouterr().err
    assert main.main(tiny_run_args(tiny_folder, tmp_path, "c", "--method", "nnclr", "--dcl_sigma", "0.5")) == 2
    assert "--dcl_sigma is a setting of --method simclr" in capsys.readouterr().err


def test_a_checkpoint_without_a_method_resumes_as_simclr():
    saved = {k: v for k, v in flags.TRAIN_DEFAULTS.items() if k not in ("method", "queue_size", "pred_hidden_dim")}
    values, _ = flags.train_resume_values({"resume": "x"}, {**saved, "name": "old", "arch": "tiny"}, "old")
    assert values["method"] == "simclr"
    with pytest.raises(Exception, match="--method simclr -> nnclr"):
        flags.train_resume_values({"resume": "x", "method": "nnclr"}, {**saved, "name": "old", "arch": "tiny"}, "old")


# ----------------------------------------------------------------------------- runs

ARGS = ("--method", "nnclr", "--queue_size", str(QUEUE), "--pred_hidden_dim", "24", "--temperature", "0.1")


@pytest.fixture(scope="module")
def straight(tiny_folder, tmp_path_factory):
    """Two nnclr epochs in one go (the reference)."""
    results = tmp_path_factory.mktemp("nnclr")
    assert main.main(tiny_run_args(tiny_folder, results, "ref", *ARGS, epochs=2)) == 0
    return results


def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(tiny_folder, tmp_path, straight, monkeypatch):
    real_save_last = loop.save_last

    def stop_after_first_epoch(state, epoch, result):
        real_save_last(state, epoch, result)
        if epoch == 1:
            raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(loop, "save_last", stop_after_first_epoch)
        assert main.main(tiny_run_args(tiny_folder, tmp_path, "r", *ARGS, epochs=2)) == 130
    stopped = torch.load(tmp_path / "r_last.pth", weights_only=True)["method"]
    assert stopped["queue"].shape == (QUEUE, 16)  # full after an epoch; the pointer is past a wrap-around
    assert main.main(tiny_run_args(tiny_folder, tmp_path, "r", "--resume", "auto", *ARGS, epochs=2)) == 0
    columns = ["epoch", "train_loss", "test_acc@1", "test_acc@5", "lr"]
    pd.testing.assert_frame_equal(pd.read_csv(straight / "ref_statistics.csv")[columns],
                                  pd.read_csv(tmp_path / "r_statistics.csv")[columns], check_exact=True)
    ref, got = (torch.load(d / f"{n}_last.pth", weights_only=True) for d, n in ((straight, "ref"), (tmp_path, "r")))
    assert ref["model"].keys() == got["model"].keys() and any(k.startswith("predictor.") for k in ref["model"])
    assert all(torch.equal(ref["model"][k], got["model"][k]) for k in ref["model"])
    assert torch.equal(ref["method"]["queue"], got["method"]["queue"])
    assert ref["method"]["pointer"] == got["method"]["pointer"]


def test_the_model_loads_strictly_wherever_a_simclr_one_does(straight):
    weights = straight / "ref_model.pth"
    model, config = open_run(str(weights))
    assert config["method"] == "nnclr" and isinstance(model.predictor, torch.nn.Sequential)
    assert isinstance(open_run(str(weights), encoder_only=True)[0], SimCLR)
    hub = hubconf.tiny(weights=str(weights))
    assert set(hub.state_dict()) == set(torch.load(weights, weights_only=True))
    assert not hasattr(model_from_config(json.loads((straight / "ref_config.json").read_text())
                                         | {"method": "simclr"}, "x"), "predictor")


def test_the_linear_and_finetune_scripts_read_an_nnclr_run(straight, tmp_path):
    import finetune
    import linear
    weights = str(straight / "ref_model.pth")
    common = ["--model_path", weights, "--epochs", "1", "--batch_size", "16", "--device", "cpu"]
    assert linear.main([*common, "--results_dir", str(tmp_path / "l")]) == 0
    assert finetune.main([*common, "--results_dir", str(tmp_path / "f"), "--label_fraction", "0.25"]) == 0


def test_build_method_gives_the_config_s_method():
    cfg = flags.TrainConfig(**flags.check_values({**flags.train_values({"method": "nnclr", "arch": "tiny"})},
                                                 flags.TRAIN_FLAGS))
    model = SimCLR("tiny", cfg.feature_dim, cfg.proj_hidden_dim)
    model.add_module("predictor", predictor(cfg.feature_dim, cfg.pred_hidden_dim))
    method = build_method(cfg, model, torch.device("cpu"))
    assert isinstance(method, NNCLR) and method.queue.shape == (65536, cfg.feature_dim)


def test_a_checkpoint_without_its_queue_is_refused_in_one_line(straight, tiny_folder, tmp_path, capsys):
    import shutil
    for suffix in ("model.pth", "config.json", "statistics.csv"):
        shutil.copy(straight / f"ref_{suffix}", tmp_path / f"ref_{suffix}")
    ckpt = torch.load(straight / "ref_last.pth", weights_only=True)
    del ckpt["method"]
    torch.save(ckpt, tmp_path / "ref_last.pth")
    assert main.main(tiny_run_args(tiny_folder, tmp_path, "ref", "--resume", "auto", *ARGS, epochs=3)) == 2
    assert "its state of --method nnclr does not fit this run" in capsys.readouterr().err
