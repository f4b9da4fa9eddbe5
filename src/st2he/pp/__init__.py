"""st2he.pp."""
