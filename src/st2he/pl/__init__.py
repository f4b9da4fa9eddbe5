"""st2he.pl."""

from ._compare import compare
from ._zero_shot import roc, zero_shot
