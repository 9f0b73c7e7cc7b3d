"""Nearest neighbours by encoder feature: random test images and their closest labeled training images.

    python neighbors.py --model_path results/NAME_model.pth [--n 8] [--k 8] [--device D] [--out FILE.png]

Writes a grid (default: NAME_neighbors.png beside the weights): one row per test image, the
query in the first column, then its k most cosine-similar images of the labeled training split
(the kNN bank), each bordered green when its class matches the query's and red when not.
"""
from __future__ import annotations

import sys

try:  # Ctrl-C in the first moments (these imports) is one line too, not a traceback
    from simclr.cli import UserError, run_cli
    from simclr.flags import NEIGHBORS_FLAGS, build_parser
except KeyboardInterrupt:
    print("interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_cli(lambda: draw(argv), "try a smaller --eval_batch_size, or --device cpu")


def draw(argv: list[str] | None) -> int:
    """Parse, then find the neighbours and write the picture (simclr.neighbor_grid, which imports torch)."""
    args = build_parser(NEIGHBORS_FLAGS, "Show test images and their nearest labeled training images by encoder "
                        "feature.").parse_args(argv)
    if args.model_path is None:
        raise UserError("--model_path is required: pass results/NAME_model.pth written by main.py")
    from simclr.neighbor_grid import run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
