"""st2he.pl."""

from ._zero_shot import roc, zero_shot
