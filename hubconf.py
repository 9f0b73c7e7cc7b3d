"""torch.hub entry points: the SimCLR models of this project, with a run's weights.

    model = torch.hub.load("path/to/this/repo", "resnet50", source="local", weights="results/NAME_model.pth")
    encoder = torch.hub.load("path/to/this/repo", "resnet18", source="local", weights=..., encoder_only=True)

torch.hub lists every public callable of this file as an entry point, so the project modules are
imported under private names. Importing it runs nothing: no script, no file read.
"""
import os as _os

from simclr import checkpoint as _checkpoint
from simclr import model as _model

dependencies = ["torch", "torchvision"]

# torch.hub puts this folder first on sys.path while importing this file; a package of the same name
# imported earlier by the caller's own code would be used instead of ours, silently.
_ours = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "simclr")
for _module in (_checkpoint, _model):
    if _os.path.dirname(_os.path.abspath(_module.__file__)) != _ours:
        raise ImportError(f"hubconf needs this repository's simclr package, but {_module.__file__} was "
                          f"imported first; load the hub model in a process without that package")


def _build(arch: str, weights: str | None, encoder_only: bool, sizes: dict):
    """The SimCLR model (eval mode) of `arch`: a run's weights and sizes, or a random initialisation."""
    given = {k: v for k, v in sizes.items() if v is not None}
    if weights is None:
        net = _model.SimCLR(arch, **{"feature_dim": 128, "proj_hidden_dim": 512, "stem": "cifar", **given}).eval()
    elif given:
        raise ValueError(f"{', '.join(given)} come from the run config beside {weights}; pass them only without weights")
    else:
        net = _checkpoint.load_run_model(weights, arch)
    return net.f if encoder_only else net


def resnet18(weights: str | None = None, encoder_only: bool = False, feature_dim: int | None = None,
             proj_hidden_dim: int | None = None, stem: str | None = None):
    """SimCLR ResNet-18: weights=results/NAME_model.pth (sizes from NAME_config.json) or random; encoder_only=True gives f."""
    return _build("resnet18", weights, encoder_only, dict(feature_dim=feature_dim, proj_hidden_dim=proj_hidden_dim, stem=stem))


def resnet34(weights: str | None = None, encoder_only: bool = False, feature_dim: int | None = None,
             proj_hidden_dim: int | None = None, stem: str | None = None):
    """SimCLR ResNet-34: weights=results/NAME_model.pth (sizes from NAME_config.json) or random; encoder_only=True gives f."""
    return _build("resnet34", weights, encoder_only, dict(feature_dim=feature_dim, proj_hidden_dim=proj_hidden_dim, stem=stem))


def resnet50(weights: str | None = None, encoder_only: bool = False, feature_dim: int | None = None,
             proj_hidden_dim: int | None = None, stem: str | None = None):
    """SimCLR ResNet-50: weights=results/NAME_model.pth (sizes from NAME_config.json) or random; encoder_only=True gives f."""
    return _build("resnet50", weights, encoder_only, dict(feature_dim=feature_dim, proj_hidden_dim=proj_hidden_dim, stem=stem))
