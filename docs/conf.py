"""Sphinx configuration for the celery-eventstore documentation."""

from __future__ import annotations

import os
import sys

# The API reference imports the package: make the repository root importable
# even when the package is not installed (an editable install works too).
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
# The local extension that runs the demo and the CLI for the sample outputs.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "_ext")))

project = "celery-eventstore"
author = "celery-eventstore contributors"
copyright = "the celery-eventstore contributors"
version = "0.1"
release = "0.1.0"

# Extensions that ship with Sphinx, and ours: every sample output in the pages is
# produced by the build itself (see _ext/eventstore_samples.py), so none goes stale.
extensions: list[str] = ["sphinx.ext.autodoc", "eventstore_samples"]
templates_path: list[str] = []
exclude_patterns = ["_build"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"

html_theme = "alabaster"
