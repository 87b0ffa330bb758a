"""Sphinx configuration: builds offline; notebooks are rendered as saved (with their outputs)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Build from the source tree even when the package is not installed.
sys.path.insert(0, str(ROOT / "src"))

import scfm_tools  # noqa: E402

project = "scfm_tools"
author = "scfm_tools developers"
copyright = "scfm_tools developers"
release = scfm_tools.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_nb",
]

# The tutorials live in ../tutorials (so that tests can run them); Sphinx only reads files under
# docs/, so they are copied into the git-ignored generated/ folder at every build.
_TUTORIALS_SRC = ROOT / "tutorials"
_TUTORIALS_DST = HERE / "generated" / "tutorials"
if _TUTORIALS_DST.exists():
    shutil.rmtree(_TUTORIALS_DST)
_TUTORIALS_DST.mkdir(parents=True)
for notebook in sorted(_TUTORIALS_SRC.glob("*.ipynb")):
    shutil.copy2(notebook, _TUTORIALS_DST / notebook.name)

templates_path = ["_templates"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"

# autodoc / autosummary / napoleon (numpy style)
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_typehints_description_target = "documented_params"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = True
napoleon_use_ivar = True
# The package writes scanpy-style Returns sections (free text, then a list of the keys written);
# render them as reStructuredText instead of napoleon's "type: description" fields.
napoleon_custom_sections = ["Returns"]

# MyST / notebooks: never execute while building (the data are not public); the notebooks are
# saved with their outputs by scripts/execute_tutorials.py, and the tests run them afresh.
nb_execution_mode = "off"
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# Cross-links to other projects' docs need the network, so they are opt-in.
if os.environ.get("SFT_DOCS_INTERSPHINX") == "1":
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "mudata": ("https://mudata.readthedocs.io/en/latest/", None),
        "pandas": ("https://pandas.pydata.org/docs/", None),
        "torch": ("https://pytorch.org/docs/stable/", None),
    }

html_theme = "sphinx_book_theme"
html_title = "scfm_tools"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path: list[str] = []
