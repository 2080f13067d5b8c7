"""Fixtures of the Postgres tests: a store and notifier pair on a fresh schema."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chatbus.postgres import PostgresNotifier, PostgresStore

from support.pg import fresh_postgres_pair


@pytest.fixture
async def pair() -> AsyncIterator[tuple[PostgresStore, PostgresNotifier]]:
    async with fresh_postgres_pair(max_connections=8) as pair:
        yield pair


@pytest.fixture
async def store(pair: tuple[PostgresStore, PostgresNotifier]) -> PostgresStore:
    return pair[0]
