"""A map of what the encoder has learned: encoder features of test images drawn in two dimensions.

    python embed.py --model_path results/NAME_model.pth                    # t-SNE of all test images
    python embed.py --model_path results/NAME_model.pth --method pca       # PCA (torch SVD), seconds
    python embed.py --model_path results/NAME_model.pth --n 2000 --thumbnails --tensorboard

Writes NAME_embed_METHOD.png (one point per test image, coloured by class, with a legend) and
NAME_embed_METHOD.csv (test index, label, class, x, y) beside the weights, or --out FILE.png and
FILE.csv. Features are L2-normalised first, so both methods see the cosine geometry the kNN
evaluation uses. --tensorboard also writes the features, labels and a thumbnail sprite for
TensorBoard's embedding projector (into the run's NAME_tb folder by default).
"""
from __future__ import annotations

import sys

from simclr.starting import starting

with starting():  # Ctrl-C during these imports is one line too, not a traceback
    from simclr.entry import run_on_model
    from simclr.flags import EMBED_FLAGS

DESCRIPTION = "Draw encoder features of the test images in two dimensions (t-SNE or PCA), coloured by class."


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (the job: simclr/feature_map.py, which imports torch)."""
    return run_on_model(argv, flags=EMBED_FLAGS, description=DESCRIPTION, job="feature_map",
                        oom_advice="try a smaller --eval_batch_size, or --device cpu")


if __name__ == "__main__":
    sys.exit(main())
