"""Run a grid of main.py runs over seeds and get tables with error bars and a paired comparison.

    python sweep.py --seeds 0-4 --grid temperature=0.1,0.2,0.5 --grid batch_size=256,512 \
        --baseline temperature=0.5,batch_size=256 -- --dataset cifar10 --arch resnet18 --epochs 100
    python sweep.py ... --dry_run            # the runs and their commands; starts none
    python sweep.py ... --gpus 0,1,2,3       # up to one run per GPU at once
    python sweep.py ... --then linear        # also a linear probe on each finished run

The flags after `--` go to every run. Each run is an ordinary main.py process with its own folder
under --out (default results/sweep_NAME/); the same command again skips finished runs and continues
stopped ones. Writes OUT/runs.csv, summary.csv, comparison.csv (with --baseline) and curves.png; see
docs/sweep.md. The job is simclr/sweep.py; the flags are parsed first, without torch.
"""
from __future__ import annotations

import sys

from simclr.starting import starting

with starting():  # Ctrl-C during these imports is one line too, not a traceback
    from simclr.cli import run_cli
    from simclr.flags import SWEEP_FLAGS, build_parser

DESCRIPTION = "Run every combination of --grid values for every seed as a main.py run; tables with error bars."
EPILOG = ("Flags after -- are main.py's, shared by every run. Files: OUT/runs.csv, summary.csv, comparison.csv, "
          "curves.png, one folder per run (see docs/sweep.md).")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    def job() -> int:
        args = list(sys.argv[1:] if argv is None else argv)
        own, main_args = (args[:args.index("--")], args[args.index("--") + 1:]) if "--" in args else (args, [])
        values = vars(build_parser(SWEEP_FLAGS, DESCRIPTION, EPILOG).parse_args(own))
        from simclr import sweep
        return sweep.run(values, main_args)

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
