"""pytest plugin, registered through the ``pytest11`` entry point.

Fixtures for users' pytest-trio suites:

* ``chatbus_bus``: a fresh in-memory :class:`chatbus.Bus`, closed after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ._bus import Bus, open_bus


@pytest.fixture
async def chatbus_bus() -> AsyncIterator[Bus]:
    """A fresh embedded (in-memory) bus, for pytest-trio tests."""
    async with open_bus() as bus:
        yield bus
