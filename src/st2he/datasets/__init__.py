"""st2he.datasets: built-in data."""

from ._synthetic import synthetic_tissue

__all__ = ["synthetic_tissue"]
