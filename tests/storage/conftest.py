"""Store fixtures (the databases themselves are in the suite's conftest)."""

from __future__ import annotations

import pytest
from storehelpers import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
