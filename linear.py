"""Linear evaluation of a SimCLR encoder: a frozen encoder, a trained Linear(d -> classes) on top.

    python linear.py --model_path results/NAME_model.pth                 # features once, 100 epochs
    python linear.py --model_path results/NAME_model.pth --augment       # crop + flip through the encoder
    python linear.py --model_path results/NAME_model.pth --untrained     # the same probe on a random encoder

The encoder is rebuilt from NAME_config.json next to the weights (flags override it) and loaded
with weights_only=True. Writes RESULTS/NAME_linear_statistics.csv, NAME_linear_model.pth (the
classifier's state_dict, acting on raw encoder features h), NAME_linear_config.json and
NAME_linear_curves.png (and with --tensorboard event files in NAME_linear_tb/); RESULTS is the
folder of the weights unless --results_dir is given.
"""
from __future__ import annotations

import sys

from simclr.starting import starting

with starting():  # Ctrl-C during these imports is one line too, not a traceback
    from simclr.cli import UserError, run_cli
    from simclr.flags import DEFAULT_LR, LINEAR_FLAGS, LinearConfig, build_parser as flags_parser, check_name
    from simclr.names import LINEAR_COLUMNS as CSV_COLUMNS  # NAME_linear_statistics.csv's columns


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_cli(lambda: run(build_config(argv)),
                   "try a smaller --eval_batch_size or --batch_size, or --precision bf16")


def build_config(argv: list[str] | None = None) -> LinearConfig:
    """Flags -> validated LinearConfig (reads no file)."""
    parser = flags_parser(LINEAR_FLAGS, "Linear evaluation of a SimCLR encoder (frozen encoder, trained linear "
                          "layer).", f"Files: RESULTS/NAME_linear_statistics.csv ({', '.join(CSV_COLUMNS)}), "
                          "NAME_linear_model.pth, NAME_linear_config.json, NAME_linear_curves.png.")
    values = vars(parser.parse_args(argv))
    if values["lr"] is None:
        values["lr"] = DEFAULT_LR[values["optimizer"]]
    if values["model_path"] is None and not values["untrained"]:
        raise UserError("--model_path is required (or --untrained with --config or --arch and --dataset)")
    if values["name"] is not None:
        check_name(values["name"])
    if values["tensorboard"]:
        from simclr.tblog import require_tensorboard
        require_tensorboard()
    return LinearConfig(**values)


def run(cfg: LinearConfig) -> int:
    """The linear evaluation (simclr.linear_eval, which imports torch: only once the flags are valid)."""
    from simclr.linear_eval import run as evaluate
    return evaluate(cfg)


if __name__ == "__main__":
    sys.exit(main())
