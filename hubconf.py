"""torch.hub entry points: the SimCLR models of this project, with a run's weights.

    model = torch.hub.load("path/to/this/repo", "resnet50", source="local", weights="results/NAME_model.pth")
    encoder = torch.hub.load("path/to/this/repo", "resnet18", source="local", weights=..., encoder_only=True)

One entry point per architecture of the encoder table (simclr/encoders.py). torch.hub lists every
public callable of this file as an entry point, so the project modules are imported under private
names. Importing it runs nothing: no script, no file read.
"""
import os as _os

from simclr import checkpoint as _checkpoint
from simclr import encoders as _encoders
from simclr import flags as _flags
from simclr import model as _model
from simclr.cli import UserError as _UserError

dependencies = ["torch", "torchvision"]

# torch.hub puts this folder first on sys.path while importing this file; a package of the same name
# imported earlier by the caller's own code would be used instead of ours, silently.
_ours = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "simclr")
for _module in (_checkpoint, _encoders, _flags, _model):
    if _os.path.dirname(_os.path.abspath(_module.__file__)) != _ours:
        raise ImportError(f"hubconf needs this repository's simclr package, but {_module.__file__} was "
                          f"imported first; load the hub model in a process without that package")


def _build(arch: str, weights: str | None, encoder_only: bool, sizes: dict):
    """The SimCLR model (eval mode) of `arch`: a run's weights and sizes, or a random initialisation."""
    given = {k: v for k, v in sizes.items() if v is not None}
    if weights is None:  # main.py's defaults under the sizes given
        net = _checkpoint.model_from_config({**_flags.TRAIN_DEFAULTS, **given, "arch": arch}, "the hub call").eval()
    elif given:
        raise ValueError(f"{', '.join(given)} come from the run config beside {weights}; pass them only without weights")
    else:
        net, config = _checkpoint.open_run(weights)
        if config["arch"] != arch:
            says = ("as the original tool's weights always do" if config.get("original_tool")
                    else f"says {_checkpoint.config_path_for(weights)}")
            raise _UserError(f"{weights} holds a {config['arch']} ({says}), "
                             f"not a {arch}; load it with the {config['arch']} entry point")
    return _model.FeatureEncoder(net) if encoder_only else net  # encoder(x) -> h (N, feature_width)


def _entry_point(arch: str):
    """The hub function of one architecture, named after it, its docstring from the table's summary."""
    def load(weights: str | None = None, encoder_only: bool = False, feature_dim: int | None = None,
             proj_hidden_dim: int | None = None, stem: str | None = None, proj_layers: int | None = None,
             head: str | None = None):
        return _build(arch, weights=weights, encoder_only=encoder_only,
                      sizes=dict(feature_dim=feature_dim, proj_hidden_dim=proj_hidden_dim,
                                                        stem=stem, proj_layers=proj_layers, head=head))
    title = _encoders.ENCODERS[arch].summary.split(",")[0]  # "ResNet-18, 512-d features" -> "ResNet-18"
    load.__name__ = load.__qualname__ = arch
    load.__doc__ = (f"SimCLR {title}: weights=results/NAME_model.pth (sizes from NAME_config.json) or random; "
                    f"encoder_only=True gives the encoder alone, encoder(x) -> features.")
    return load


for _arch in _encoders.ENCODERS:
    globals()[_arch] = _entry_point(_arch)
