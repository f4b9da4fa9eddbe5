"""Plotting: input picture, virtual and real H&E next to gene expression; zero-shot maps and ROC curves."""

from ._compare import compare
from ._expression import expression
from ._zero_shot import roc, zero_shot

__all__ = ["compare", "expression", "roc", "zero_shot"]
