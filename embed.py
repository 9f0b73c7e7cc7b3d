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

try:  # Ctrl-C in the first moments (these imports) is one line too, not a traceback
    from simclr.cli import UserError, run_cli
    from simclr.flags import EMBED_FLAGS, build_parser
except KeyboardInterrupt:
    print("interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_cli(lambda: embed(argv), "try a smaller --eval_batch_size, or --device cpu")


def embed(argv: list[str] | None) -> int:
    """Parse, then draw the map (simclr.feature_map, which imports torch)."""
    args = build_parser(EMBED_FLAGS, "Draw encoder features of the test images in two dimensions (t-SNE or PCA), "
                        "coloured by class.").parse_args(argv)
    if args.model_path is None:
        raise UserError("--model_path is required: pass results/NAME_model.pth written by main.py")
    from simclr.feature_map import run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
