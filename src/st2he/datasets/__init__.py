"""st2he.datasets."""
