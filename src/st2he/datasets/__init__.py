"""st2he.datasets: built-in data."""

from ._he_pairs import pairs_from_he
from ._synthetic import synthetic_tissue

__all__ = ["pairs_from_he", "synthetic_tissue"]
