"""st2he.io."""
