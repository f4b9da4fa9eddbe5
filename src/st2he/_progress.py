"""Progress bars that suit where st2he runs: a widget in a notebook that can show one, text elsewhere."""

from __future__ import annotations

import functools


@functools.cache
def _tqdm_class():
    """``tqdm.auto.tqdm`` when ipywidgets can be imported, else ``tqdm.std.tqdm``.

    ``tqdm.auto`` in a Jupyter kernel without ipywidgets warns "IProgress not found" and falls back to text; this
    picks the text bar directly there, so no warning is shown.
    """
    try:
        import ipywidgets  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken: either way no widget can be drawn
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm


def tqdm(*args, **kwargs):
    """A progress bar (:class:`tqdm.std.tqdm` or a notebook widget; see :func:`_tqdm_class`)."""
    return _tqdm_class()(*args, **kwargs)
