"""hubconf.py through torch.hub: the entry points, the weights of a run bit-identical to loading them by hand."""
import inspect
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from simclr.cli import UserError
from conftest import TINY_ARCH
from simclr.model import SimCLR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = ["resnet18", "resnet34", "resnet50", "tiny"]
SCRIPTS = ("main", "linear", "neighbors", "plot", "bench", "finetune", "embed")


def hub_load(entry: str, **kwargs):
    return torch.hub.load(ROOT, entry, source="local", **kwargs)


def by_hand(trained) -> SimCLR:
    """The trained run's model the README way: sizes from its config, strict weights_only load, eval mode."""
    config = json.loads((trained / "run_config.json").read_text())
    model = SimCLR(config["arch"], config["feature_dim"], config["proj_hidden_dim"], config["stem"])
    model.load_state_dict(torch.load(trained / "run_model.pth", weights_only=True), strict=True)
    return model.eval()


def test_list_and_help_show_the_entry_points_only(monkeypatch):
    # torch.hub.list and help take GitHub repos only (no source="local" in this torch); pointing their
    # download step at this folder runs their own listing rule on our hubconf.py, offline
    assert "source" not in inspect.signature(torch.hub.list).parameters
    monkeypatch.setattr(torch.hub, "_get_cache_or_reload", lambda *a, **kw: ROOT)
    assert sorted(torch.hub.list("owner/simclr")) == ENTRY_POINTS
    for entry in ENTRY_POINTS:
        doc = torch.hub.help("owner/simclr", entry)
        assert len(doc.strip().splitlines()) == 1 and (entry[6:] if entry.startswith("resnet") else "Tiny CNN") in doc.replace("-", ""), doc


def test_load_gives_the_runs_model_bit_identical(trained):
    model = hub_load(TINY_ARCH, weights=str(trained / "run_model.pth"))
    reference = by_hand(trained)
    assert isinstance(model, SimCLR) and not model.training
    assert model.g[0].out_features == 32 and model.g[3].out_features == 16  # head sizes from the config
    mine, theirs = model.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (h, z), (h_ref, z_ref) = model(x), reference(x)
    assert torch.equal(h, h_ref) and torch.equal(z, z_ref)

    encoder = hub_load(TINY_ARCH, weights=str(trained / "run_model.pth"), encoder_only=True)
    assert isinstance(encoder, torch.nn.Module) and not encoder.training
    assert set(encoder.state_dict()) == {k for k in theirs if k.startswith("f.")}  # NAME_model.pth's encoder keys
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, theirs[key]), key
    with torch.no_grad():
        assert torch.equal(encoder(x), h_ref)  # callable as the README shows: encoder(x) -> features


@pytest.mark.parametrize("arch,width", [("resnet18", 512), ("resnet50", 2048)])
def test_encoder_only_is_callable_on_images_for_every_resnet(arch, width):
    encoder = hub_load(arch, encoder_only=True)
    with torch.no_grad():
        h = encoder(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert h.shape == (2, width) and torch.isfinite(h).all()


def test_without_weights_a_random_model_of_the_asked_sizes():
    model = hub_load("resnet34", feature_dim=8, proj_hidden_dim=24, stem="imagenet")
    assert isinstance(model, SimCLR) and not model.training
    assert model.feature_width == 512 and model.g[0].out_features == 24 and model.g[3].out_features == 8
    assert model.f.conv1.kernel_size == (7, 7)
    default = hub_load("resnet50")
    assert default.feature_width == 2048 and default.f.conv1.kernel_size == (3, 3)


def test_refusals(trained, tmp_path):
    weights = str(trained / "run_model.pth")
    with pytest.raises(UserError, match="holds a tiny.*not a resnet50"):
        hub_load("resnet50", weights=weights)
    with pytest.raises(ValueError, match="feature_dim come from the run config"):
        hub_load(TINY_ARCH, weights=weights, feature_dim=16)
    lonely = tmp_path / "lonely_model.pth"
    shutil.copy(weights, lonely)
    with pytest.raises(UserError, match="no run config"):
        hub_load(TINY_ARCH, weights=str(lonely))
    # a config whose head sizes disagree with the weights: strict loading names the mismatch
    shutil.copy(weights, tmp_path / "wrong_model.pth")
    config = json.loads((trained / "run_config.json").read_text())
    (tmp_path / "wrong_config.json").write_text(json.dumps({**config, "proj_hidden_dim": 64}))
    with pytest.raises(UserError, match="shape mismatches"):
        hub_load(TINY_ARCH, weights=str(tmp_path / "wrong_model.pth"))
    # an extra key in the config (another branch's, say) is ignored
    shutil.copy(weights, tmp_path / "extra_model.pth")
    (tmp_path / "extra_config.json").write_text(json.dumps({**config, "bn_stats": "per_view"}))
    assert hub_load(TINY_ARCH, weights=str(tmp_path / "extra_model.pth")).g[0].out_features == 32


def test_importing_hubconf_imports_no_script_and_does_nothing(tmp_path):
    code = ("import sys, hubconf; print(sorted(m for m in sys.modules if m in %r))" % (SCRIPTS,))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]" and proc.stderr == ""


def test_the_head_depth_comes_from_the_run_config(trained, tmp_path):
    from conftest import copy_run
    deep = SimCLR(TINY_ARCH, 16, 32, proj_layers=3)
    path = copy_run(trained, tmp_path, "deep", deep.state_dict())
    config = json.loads((tmp_path / "deep_config.json").read_text())
    (tmp_path / "deep_config.json").write_text(json.dumps({**config, "proj_layers": 3}))
    model = hub_load(TINY_ARCH, weights=path)
    assert [m.out_features for m in model.g if isinstance(m, torch.nn.Linear)] == [32, 32, 16]
    for key, value in deep.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # without weights the depth is an argument like the sizes
    random = hub_load("resnet18", proj_layers=3, feature_dim=16, proj_hidden_dim=32)
    assert random.g[6].out_features == 16


def test_simclrv2s_head_loads_from_its_config_and_not_from_another(trained, tmp_path):
    from conftest import copy_run
    v2 = SimCLR(TINY_ARCH, 16, 32, proj_layers=3, head="v2")
    path = copy_run(trained, tmp_path, "v2", v2.state_dict())
    config = json.loads((tmp_path / "v2_config.json").read_text())
    (tmp_path / "v2_config.json").write_text(json.dumps({**config, "proj_layers": 3, "head": "v2"}))
    model = hub_load(TINY_ARCH, weights=path)
    assert isinstance(model.g[7], torch.nn.BatchNorm1d) and model.g[7].bias is None and model.g[6].bias is None
    for key, value in v2.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # the same weights under a config of the original head: strict loading names what does not fit
    (tmp_path / "v2_config.json").write_text(json.dumps({**config, "proj_layers": 3}))
    with pytest.raises(UserError, match="missing keys .*g.6.bias.*unexpected keys"):
        hub_load(TINY_ARCH, weights=path)
    # without weights the last layer is an argument like the sizes
    assert hub_load("resnet18", proj_layers=3, head="v2").g[7].bias is None
