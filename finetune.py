"""Fine-tune a SimCLR encoder on a class-balanced fraction of the labels (SimCLR's 1% and 10% protocol).

    python finetune.py --model_path results/NAME_model.pth --label_fraction 0.1              # 10% of the labels
    python finetune.py --model_path results/NAME_model.pth --label_fraction 0.01 --from_layer head1
    python finetune.py --model_path results/NAME_model.pth --label_fraction 0.1 --untrained  # random init, same labels
    python finetune.py --model_path results/NAME_model.pth --label_fraction 0.1 --resume auto

Every layer trains (BatchNorm in training mode), on random resized crops and flips made on the
device, with SGD + Nesterov momentum and a cosine schedule; a new Linear classifier sits on the
encoder output h, or on the projection head's first layer (`--from_layer head1`, as SimCLRv2).
Test top-1/top-5 are measured after every epoch in eval mode. The labeled images are a subset of
the data set's labeled training split drawn per class by --seed; their indices are in the config
JSON. Writes RESULTS/NAME_finetune_TAG_{statistics.csv,model.pth,last.pth,config.json,curves.png}
with TAG the fraction (0.1) or the count per class (50perclass). The job itself is
simclr/finetuning.py; the flags are parsed first, so --help and a refused flag answer before torch
is imported.
"""
from __future__ import annotations

import sys

from simclr.starting import starting

with starting():  # Ctrl-C during these imports is one line too, not a traceback
    from simclr.cli import run_cli
    from simclr.flags import FINETUNE_FLAGS, build_parser
    from simclr.names import FINETUNE_COLUMNS as CSV_COLUMNS  # NAME_finetune_TAG_statistics.csv's columns

OOM_ADVICE = "use a smaller --batch_size or --eval_batch_size, or --precision bf16"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    def job() -> int:
        # only the flags given: a resumed run takes the others from its checkpoint
        parser = build_parser(FINETUNE_FLAGS, "Fine-tune a SimCLR encoder with a few labels.",
                              f"Files: RESULTS/NAME_finetune_TAG_statistics.csv ({', '.join(CSV_COLUMNS)}), "
                              f"_model.pth, _last.pth, _config.json, _curves.png.", explicit_only=True)
        explicit = vars(parser.parse_args(argv))
        from simclr import finetuning
        return finetuning.run(explicit)

    return run_cli(job, OOM_ADVICE)


if __name__ == "__main__":
    sys.exit(main())
