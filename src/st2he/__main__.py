"""``python -m st2he``: the ``st2he`` command line (see :mod:`st2he._cli`)."""

from st2he._cli import main

raise SystemExit(main())
