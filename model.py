"""The model classes, for code written against the original tool's layout: `from model import SimCLR`.

The library lives in the `simclr` package; this file only re-exports its model classes.
"""
from simclr.model import Classifier, SimCLR

__all__ = ["Classifier", "SimCLR"]
