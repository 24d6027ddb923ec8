"""Sphinx configuration for the celery-eventstore documentation."""

from __future__ import annotations

project = "celery-eventstore"
author = "celery-eventstore contributors"
copyright = "the celery-eventstore contributors"
version = "0.1"
release = "0.1.0"

extensions: list[str] = []
templates_path: list[str] = []
exclude_patterns = ["_build"]

html_theme = "alabaster"
