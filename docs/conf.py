"""Sphinx configuration for the celery-eventstore documentation."""

from __future__ import annotations

import os
import sys

# The API reference imports the package: make the repository root importable
# even when the package is not installed (an editable install works too).
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

project = "celery-eventstore"
author = "celery-eventstore contributors"
copyright = "the celery-eventstore contributors"
version = "0.1"
release = "0.1.0"

# Only extensions that ship with Sphinx itself.
extensions: list[str] = ["sphinx.ext.autodoc"]
templates_path: list[str] = []
exclude_patterns = ["_build"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"

html_theme = "alabaster"
