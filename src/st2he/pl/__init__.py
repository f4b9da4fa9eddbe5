"""st2he.pl."""
