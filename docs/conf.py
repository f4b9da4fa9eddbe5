"""Sphinx configuration for st2he."""

import os
from datetime import datetime
from pathlib import Path
from importlib.metadata import metadata

info = metadata("st2he")
project = info["Name"]
author = "st2he developers"
copyright = f"{datetime.now():%Y}, {author}"
version = info["Version"]
release = version

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
]

autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
typehints_defaults = "braces"
always_document_param_types = False
nitpicky = False

myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath", "html_image"]
myst_heading_anchors = 3
# tutorials run at build time on the built-in simulated data, so the docs show what the code does today
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_merge_streams = True
nb_execution_excludepatterns = []
# the real-platform tutorial reads the real data crops kept beside the repository (../shared/data, or
# ST2HE_SHARED_DATA); where they are not (Read the Docs), it is shown as written, not executed
_here = Path(__file__).resolve().parent
_crops = [Path(os.environ["ST2HE_SHARED_DATA"])] if "ST2HE_SHARED_DATA" in os.environ else []
_crops += [parent / "shared" / "data" for parent in _here.parents]
if not any(c.is_dir() for c in _crops):
    nb_execution_excludepatterns.append("tutorials/real_platforms.md")

source_suffix = {".rst": "restructuredtext", ".ipynb": "myst-nb", ".md": "myst-nb"}
master_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "jupyter_execute"]

html_theme = "sphinx_book_theme"
html_title = "st2he"
html_static_path = ["_static"]
html_theme_options = {
    "repository_url": "https://github.com/scverse/st2he",
    "use_repository_button": True,
    "navigation_with_keys": False,
}

suppress_warnings = ["mystnb.unknown_mime_type", "config.cache"]
