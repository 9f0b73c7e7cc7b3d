"""Nearest neighbours by encoder feature: random test images and their closest labeled training images.

    python neighbors.py --model_path results/NAME_model.pth [--n 8] [--k 8] [--device D] [--out FILE.png]

Writes a grid (default: NAME_neighbors.png beside the weights): one row per test image, the
query in the first column, then its k most cosine-similar images of the labeled training split
(the kNN bank), each bordered green when its class matches the query's and red when not.
"""
from __future__ import annotations

import sys

from simclr.starting import starting

with starting():  # Ctrl-C during these imports is one line too, not a traceback
    from simclr.entry import run_on_model
    from simclr.flags import NEIGHBORS_FLAGS

DESCRIPTION = "Show test images and their nearest labeled training images by encoder feature."


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (the job: simclr/neighbor_grid.py, which imports torch)."""
    return run_on_model(argv, flags=NEIGHBORS_FLAGS, description=DESCRIPTION, job="neighbor_grid",
                        oom_advice="try a smaller --eval_batch_size, or --device cpu")


if __name__ == "__main__":
    sys.exit(main())
