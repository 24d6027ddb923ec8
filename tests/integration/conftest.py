"""Set-up for kombu's integration suite (see kombu_suite.py)."""

from __future__ import annotations

import kombu_suite
import pytest


def pytest_configure(config: pytest.Config) -> None:
    # kombu's test modules mark their classes with these; the mixins in its
    # t/integration/common.py (5.7.0) carry none, but a later version's might, and
    # --strict-markers would then refuse to import it.  Registered, they are inert.
    config.addinivalue_line("markers", "env(name): kombu's marker for the broker a test needs")
    if not config.pluginmanager.hasplugin("rerunfailures"):
        config.addinivalue_line(
            "markers", "flaky(reruns, reruns_delay): kombu's rerun marker (inert here)"
        )
    cache = getattr(config, "cache", None)
    if cache is not None:
        kombu_suite.set_cache_root(cache.mkdir("kombu-suite"))
