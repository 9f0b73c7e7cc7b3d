"""Speed benchmark: tensor vs PIL augmentation, the project's training step vs a naive one, per-view vs joint
BatchNorm statistics, and GPU epochs.

    python bench.py                       # CUDA if present, else CPU
    python bench.py --device cpu --quick  # tiny sizes, under a minute (the test suite runs this)
    python bench.py --device cuda --json bench.json

Prints one table per section and a final line `BENCH_JSON {...}` with every figure.
Importing this module does nothing; run it as a script.
"""
from __future__ import annotations

import sys

from simclr.starting import starting

with starting():  # Ctrl-C during these imports is one line too, not a traceback
    from simclr.cli import run_cli
    from simclr.flags import BENCH_FLAGS, build_parser as flags_parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_cli(lambda: bench(argv), "use a smaller --batch_size")


def bench(argv: list[str] | None) -> int:
    """Parse, then run every section (simclr.benchmark, which imports torch), print the JSON line, optionally
    write it to --json."""
    args = flags_parser(BENCH_FLAGS, "Benchmark augmentation, the training step and (CUDA) whole epochs.").parse_args(argv)
    from simclr.benchmark import run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
