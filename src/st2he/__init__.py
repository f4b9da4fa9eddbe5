"""st2he: virtual H&E from high-resolution spatial transcriptomics, and histology read back."""

from importlib import import_module
from importlib.metadata import version

from . import datasets, io, pl, pp, tl

__all__ = ["datasets", "io", "models", "pl", "pp", "tl"]

__version__ = version("st2he")


def __getattr__(name: str):
    # st2he.models needs the deep-learning stack (the "models" extra); reading and rasterising do not
    if name == "models":
        return import_module(".models", __name__)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
