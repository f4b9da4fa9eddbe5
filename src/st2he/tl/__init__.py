"""st2he.tl."""

from ._virtual_he import virtual_he
