"""st2he.models."""
