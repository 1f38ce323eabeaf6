"""Sphinx configuration of the documentation: Markdown pages (MyST), the theme that ships with Sphinx.

Nothing is fetched at build time: no intersphinx, no remote images or theme assets. Build with
``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (``tests/test_docs.py`` does).
"""
from __future__ import annotations

project = "Flask-Multiprocess-Controller"
author = "flask-multiprocess-controller developers"
copyright = "flask-multiprocess-controller developers"
release = "0.2.0"

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

#: Anchors for headings down to ###, so that ``page.md#a-heading`` links are checked like pages.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

html_theme = "alabaster"
html_title = "Flask-Multiprocess-Controller"
html_static_path: list[str] = []
html_theme_options = {"description": "Heavy Python work in child processes behind a Flask REST resource."}
