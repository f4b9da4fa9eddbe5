"""st2he.tl."""
