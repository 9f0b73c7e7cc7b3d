"""Train SimCLR on CIFAR-scale images, with a weighted kNN evaluation after every epoch.

    python main.py --batch_size 1024 --epochs 500                 # the original tool's run: CIFAR-10, ResNet-50
    python main.py --recipe paper                                  # LARS, warm-up + cosine (paper, B.9)
    python main.py --dataset folder --data_root data/cifar10-jpg --arch resnet18 --epochs 5
    python main.py --resume auto ...                               # continue a stopped run
    torchrun --nproc_per_node=4 main.py --batch_size 4096          # several GPUs, global batch 4096

Writes results/NAME_statistics.csv, NAME_model.pth (best kNN top-1), NAME_last.pth (resume
checkpoint), NAME_config.json and NAME_curves.png, and with --tensorboard event files in
results/NAME_tb/; see README.md and docs/files.md. The job itself is simclr/pretrain.py; the flags
are parsed first, so --help and a refused flag answer before torch is imported.
"""
from __future__ import annotations

import sys

from simclr.starting import starting

with starting():  # Ctrl-C during these imports is one line too, not a traceback
    from simclr.cli import run_cli
    from simclr.flags import TRAIN_FLAGS, build_parser

DESCRIPTION = "SimCLR on CIFAR-scale images with weighted kNN evaluation."
OOM_ADVICE = ("try --grad_checkpoint, --precision bf16, a smaller --batch_size or --eval_batch_size, "
              "or more GPUs with torchrun")
EPILOG = ("Files: results/NAME_statistics.csv, NAME_model.pth, NAME_last.pth, NAME_config.json, NAME_curves.png "
          "(see README.md).")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    world = None

    def job() -> int:
        nonlocal world
        # only the flags given: recipes and resume fill in the rest
        explicit = vars(build_parser(TRAIN_FLAGS, DESCRIPTION, EPILOG, explicit_only=True).parse_args(argv))
        from simclr import pretrain
        from simclr.distributed import init_world
        world = init_world(explicit.get("device", "auto"))
        return pretrain.run(explicit, world)

    def cleanup() -> None:
        if world is not None:
            from simclr.distributed import close_world
            close_world(world)

    return run_cli(job, prefix=lambda: f"[rank {world.rank}] " if world is not None and world.distributed else "",
                   cleanup=cleanup, oom_advice=OOM_ADVICE)

if __name__ == "__main__":
    sys.exit(main())
