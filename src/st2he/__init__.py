"""st2he: virtual H&E from high-resolution spatial transcriptomics, and histology read back."""

from importlib.metadata import version

from . import datasets, io, models, pl, pp, tl

__all__ = ["datasets", "io", "models", "pl", "pp", "tl"]

__version__ = version("st2he")
