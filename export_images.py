"""Write CIFAR-10 or CIFAR-100 from the torchvision download as folders of images, the layout --dataset folder reads.

    python export_images.py                                        # data/cifar10-jpg/{train,test}/<class>/*.jpg
    python export_images.py --train_per_class 500 --test_per_class 100 --out data/cifar10-small
    python export_images.py --dataset cifar100 --format png         # data/cifar100-png, the exact pixels

Downloads the data set into --data_root first if it is not there (offline: put cifar-10-python.tar.gz
or cifar-100-python.tar.gz there). The images are written into a temporary folder and renamed to
--out when complete; an --out that holds anything is refused. The job is simclr/export.py.
"""
from __future__ import annotations

import sys

from simclr.starting import starting

with starting():  # Ctrl-C during these imports is one line too, not a traceback
    from simclr.cli import run_cli
    from simclr.flags import EXPORT_FLAGS, build_parser

DESCRIPTION = "Write CIFAR-10 or CIFAR-100 as image folders: OUT/train/<class>/*, OUT/test/<class>/*."


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    def job() -> int:
        args = build_parser(EXPORT_FLAGS, DESCRIPTION).parse_args(argv)
        from simclr import export  # imports torch: only once the flags are valid
        return export.run(args)

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
