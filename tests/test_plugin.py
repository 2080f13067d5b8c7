"""The pytest plugin and the scratch-backend helpers of chatbus.testing.

The plugin tests run small user suites with pytest's ``pytester`` (in-process) and
check their outcomes; the Postgres ones use the test server (``CHATBUS_TEST_DSN``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
import trio
from psycopg import sql

from chatbus.memory import MemoryNotifier, MemoryStore
from chatbus.testing import BackendUnavailable, drop_schema, open_scratch_backend, open_scratch_bus

from support.pg import configured_dsn, pg_dsn

pytest_plugins = ["pytester"]

CLOSED_DSN = "postgresql://postgres@127.0.0.1:1/test"  # nothing listens on port 1
TRIO_MODE = "[tool.pytest.ini_options]\ntrio_mode = true\n"


def schema_exists(schema: str) -> bool:
    with psycopg.connect(pg_dsn(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = %s", [schema]
        ).fetchone()
    assert row is not None
    return bool(row[0])


def run(pytester: pytest.Pytester, test_source: str, *args: str, ini: str = TRIO_MODE) -> Any:
    pytester.makefile(".toml", pyproject=ini)
    pytester.makepyfile(test_app=textwrap.dedent(test_source))
    return pytester.runpytest("-p", "no:cacheprovider", "-rsfE", *args)


# --- backend selection -----------------------------------------------------------------

REPORT_BACKEND = """
    import pathlib

    async def test_backend(chatbus_backend, chatbus_bus):
        pathlib.Path("seen.txt").write_text(
            f"{chatbus_backend.name} {chatbus_backend.schema} {type(chatbus_bus.store).__name__}"
        )
        async with chatbus_bus.open_subscriber("room") as sub:
            await chatbus_bus.publish("room", {"text": "hi"})
            assert (await sub.receive()).body == {"text": "hi"}
"""


def test_memory_by_default(pytester: pytest.Pytester) -> None:
    run(pytester, REPORT_BACKEND).assert_outcomes(passed=1)
    assert (pytester.path / "seen.txt").read_text() == "memory None MemoryStore"


@pytest.mark.postgres
def test_backend_from_command_line(pytester: pytest.Pytester) -> None:
    result = run(
        pytester, REPORT_BACKEND, "--chatbus-backend", "postgres", "--chatbus-dsn", pg_dsn()
    )
    result.assert_outcomes(passed=1)
    name, schema, store = (pytester.path / "seen.txt").read_text().split()
    assert (name, store) == ("postgres", "PostgresStore")
    assert schema.startswith("chatbus_test_")


@pytest.mark.postgres
def test_backend_from_ini(pytester: pytest.Pytester) -> None:
    ini = TRIO_MODE + f'chatbus_backend = "postgres"\nchatbus_dsn = "{pg_dsn()}"\n'
    run(pytester, REPORT_BACKEND, ini=ini).assert_outcomes(passed=1)
    assert (pytester.path / "seen.txt").read_text().startswith("postgres chatbus_test_")


@pytest.mark.postgres
def test_marker_overrides_command_line(pytester: pytest.Pytester) -> None:
    source = "import pytest\n" + textwrap.dedent(REPORT_BACKEND).replace(
        "async def test_backend",
        f'@pytest.mark.chatbus("postgres", dsn="{pg_dsn()}")\nasync def test_backend',
    )
    result = run(pytester, source, "--chatbus-backend", "memory")
    result.assert_outcomes(passed=1)
    assert (pytester.path / "seen.txt").read_text().startswith("postgres chatbus_test_")


def test_unknown_ini_backend_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = run(pytester, REPORT_BACKEND, ini=TRIO_MODE + 'chatbus_backend = "mongo"\n')
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*chatbus_backend = 'mongo': expected one of memory, postgres, redis*"]
    )


def test_marker_bus_options_reach_the_bus(pytester: pytest.Pytester) -> None:
    source = """
        import pytest, trio

        @pytest.mark.chatbus(poll_interval=10)
        async def test_polls(chatbus_bus, autojump_clock):
            async with chatbus_bus.open_subscriber("room"):
                await trio.sleep(105)
            assert chatbus_bus.statistics().polls == 10

        @pytest.mark.chatbus(cache_size=0)
        async def test_bad_option(chatbus_bus):
            pass

        @pytest.mark.chatbus(pol_interval=1)
        async def test_misspelt(chatbus_bus):
            pass
    """
    result = run(pytester, source)
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*cache_size*", "*unknown option pol_interval; known: *"])


# --- Postgres scratch schema -------------------------------------------------------------


@pytest.mark.postgres
def test_scratch_schema_is_fresh_per_test_and_dropped(pytester: pytest.Pytester) -> None:
    source = """
        import pathlib
        import psycopg

        def exists(dsn, schema):
            with psycopg.connect(dsn) as conn:
                return conn.execute(
                    "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", [schema]
                ).fetchone() is not None

        async def check(backend, bus):
            await bus.publish("room", "x")
            assert exists(backend.dsn, backend.schema)
            assert [m.id for m in await bus.read("room", after=0)] == [1]  # fresh: no history
            with open("schemas.txt", "a") as f:
                f.write(backend.schema + "\\n")

        async def test_one(chatbus_backend, chatbus_bus):
            await check(chatbus_backend, chatbus_bus)

        async def test_two(chatbus_backend, chatbus_bus):
            await check(chatbus_backend, chatbus_bus)
    """
    result = run(pytester, source, "--chatbus-backend", "postgres", "--chatbus-dsn", pg_dsn())
    result.assert_outcomes(passed=2)
    schemas = (pytester.path / "schemas.txt").read_text().split()
    assert len(set(schemas)) == 2
    assert not any(schema_exists(schema) for schema in schemas)


# --- unreachable backends: skip, or fail when required -------------------------------

UNREACHABLE = """
    async def test_needs_server(chatbus_bus):
        raise AssertionError("must not run")
"""


def test_unreachable_postgres_skips_with_reason(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CHATBUS_REQUIRE_POSTGRES", raising=False)  # CI sets it
    result = run(
        pytester, UNREACHABLE, "--chatbus-backend", "postgres", "--chatbus-dsn", CLOSED_DSN
    )
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*PostgreSQL not reachable at *127.0.0.1:1*refused*"])


@pytest.mark.parametrize(
    ("how", "env"),
    [
        (["--chatbus-require"], None),
        ([], "CHATBUS_REQUIRE_POSTGRES"),
        (["-o", "chatbus_require=true"], None),
    ],
)
def test_unreachable_postgres_fails_when_required(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: list[str], env: str | None
) -> None:
    if env is not None:
        monkeypatch.setenv(env, "1")
    else:
        monkeypatch.delenv("CHATBUS_REQUIRE_POSTGRES", raising=False)
    result = run(
        pytester, UNREACHABLE, "--chatbus-backend", "postgres", "--chatbus-dsn", CLOSED_DSN, *how
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*the chatbus backend is required, but PostgreSQL not reachable at*"]
    )


def test_required_by_marker(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHATBUS_REQUIRE_POSTGRES", raising=False)
    source = f"""
        import pytest

        @pytest.mark.chatbus(backend="postgres", dsn="{CLOSED_DSN}", require=True)
        async def test_required(chatbus_bus):
            pass

        @pytest.mark.chatbus(backend="postgres", dsn="{CLOSED_DSN}")
        async def test_optional(chatbus_bus):
            pass
    """
    run(pytester, source).assert_outcomes(failed=1, skipped=1)


CLOSED_REDIS = "redis://:s3cret@127.0.0.1:1/0"  # nothing listens on port 1


def test_unreachable_redis_skips_with_reason(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CHATBUS_REQUIRE_REDIS", raising=False)
    args = ("--chatbus-backend", "redis", "--chatbus-dsn", CLOSED_REDIS)
    result = run(pytester, UNREACHABLE, *args)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*Redis not reachable at redis://:***@127.0.0.1:1/0*"])
    result = run(pytester, UNREACHABLE, *args, "--chatbus-require")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the chatbus backend is required, but Redis not reachable*"])
    assert "s3cret" not in result.stdout.str()  # the password is never shown


@pytest.mark.redis
def test_redis_backend_runs_on_a_real_server(pytester: pytest.Pytester) -> None:
    from support.redis import redis_url

    result = run(
        pytester, REPORT_BACKEND, "--chatbus-backend", "redis", "--chatbus-dsn", redis_url()
    )
    result.assert_outcomes(passed=1)
    name, schema, store = (pytester.path / "seen.txt").read_text().split()
    assert (name, schema, store) == ("redis", "None", "RedisStore")


def test_redis_backend_uses_open_redis_with_a_fresh_prefix(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in ``chatbus.redis`` (over memory) shows how the plugin will use it."""
    opened: list[tuple[str, str]] = []
    worlds: dict[str, tuple[MemoryStore, MemoryNotifier]] = {}
    dropped: list[str] = []

    @asynccontextmanager
    async def open_redis(url: str, *, prefix: str) -> AsyncIterator[Any]:
        opened.append((url, prefix))
        yield worlds.setdefault(prefix, (MemoryStore(), MemoryNotifier()))

    async def drop_prefix(url: str, prefix: str) -> None:
        dropped.append(prefix)

    fake = types.ModuleType("chatbus.redis")
    fake.open_redis = open_redis  # type: ignore[attr-defined]
    fake.drop_prefix = drop_prefix  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "chatbus.redis", fake)
    source = """
        async def test_one(chatbus_backend, chatbus_bus_factory):
            a, b = await chatbus_bus_factory(), await chatbus_bus_factory()
            async with b.open_subscriber("room") as sub:
                await a.publish("room", "hi")
                assert (await sub.receive()).body == "hi"
            assert chatbus_backend.prefix.startswith("chatbus_test_")

        async def test_two(chatbus_bus):
            assert await chatbus_bus.read("room", after=0) == []
    """
    url = "redis://127.0.0.1:6390/0"
    run(pytester, source, "--chatbus-backend", "redis", "--chatbus-dsn", url).assert_outcomes(
        passed=2
    )
    prefixes = {prefix for _, prefix in opened}
    assert {u for u, _ in opened} == {url}
    assert len(prefixes) == 2  # one world per test, shared by its buses
    assert len(opened) == 2 + 3  # a probe per test, then one pair per bus
    assert set(dropped) == prefixes


# --- the trio-mode error -----------------------------------------------------------------

NOT_TRIO = """
    import pytest

    async def test_unmarked(chatbus_bus):
        pass

    @pytest.mark.trio
    async def test_marked(chatbus_bus):
        async with chatbus_bus.open_subscriber("room"):
            pass
"""


def test_fixture_outside_trio_mode_says_what_to_set(pytester: pytest.Pytester) -> None:
    result = run(pytester, NOT_TRIO, ini="[tool.pytest.ini_options]\n")
    result.assert_outcomes(passed=1, errors=1)
    assert (
        "test_app.py::test_unmarked uses the chatbus fixture 'chatbus_bus' but is not a trio "
        "test: set `trio_mode = true` under [tool.pytest.ini_options] in pyproject.toml (or "
        "under [pytest] in pytest.ini), or mark the test `@pytest.mark.trio`"
    ) in result.stdout.str()
    result.stdout.no_fnmatch_line("*no plugin or hook that handled it*")


def test_fixture_in_a_sync_test_says_it_must_be_async(pytester: pytest.Pytester) -> None:
    source = """
        def test_sync(chatbus_bus_factory):
            pass
    """
    result = run(pytester, source)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*'chatbus_bus_factory' but is not an `async def` function*"])


# --- several buses, with faults ---------------------------------------------------------

FACTORY = """
    import trio
    from chatbus.testing import FaultyNotifier, LaggingStore

    async def test_processes(chatbus_backend, chatbus_bus, chatbus_bus_factory):
        faulty = await chatbus_bus_factory(
            drop=0.5, duplicate=0.3, reorder=0.3, max_delay=0.01, lag=0.01, seed=7,
            poll_interval=0.05,
        )
        plain = await chatbus_bus_factory()
        assert isinstance(faulty.notifier, FaultyNotifier) and faulty.notifier.seed == 7
        assert isinstance(faulty.store, LaggingStore)
        assert not isinstance(plain.notifier, FaultyNotifier)
        assert chatbus_bus_factory.buses == [faulty, plain]
        if chatbus_backend.name == "memory":  # one store, one notifier, a listener each
            assert faulty.store.inner is plain.store is chatbus_bus.store
            assert faulty.notifier.inner is plain.notifier is chatbus_bus.notifier
        else:  # an open_postgres pair each, on one schema
            assert len({id(faulty.store.inner), id(plain.store), id(chatbus_bus.store)}) == 3
        with trio.fail_after(20):
            async with faulty.open_subscriber("room") as sub:
                async with plain.open_subscriber("room") as sub2:
                    for i in range(40):
                        await (chatbus_bus if i % 2 else plain).publish("room", i)
                    got = [(await sub.receive()).id for _ in range(40)]
                    got2 = [(await sub2.receive()).id for _ in range(40)]
        assert got == got2 == list(range(1, 41))
        stats = faulty.notifier.statistics()  # how many notices arrive depends on timing
        assert stats.received and stats.dropped + stats.duplicated + stats.reordered, stats
"""


@pytest.mark.parametrize(
    "backend", ["memory", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_bus_factory_with_faults(pytester: pytest.Pytester, backend: str) -> None:
    args = ["--chatbus-backend", backend]
    if backend == "postgres":
        args += ["--chatbus-dsn", pg_dsn()]
    run(pytester, FACTORY, *args).assert_outcomes(passed=1)


# --- mock clocks ----------------------------------------------------------------------------

AUTOJUMP = """
    import pytest, trio

    @pytest.mark.chatbus(poll_interval=1000)
    async def test_slow_poll_is_instant(chatbus_bus, chatbus_bus_factory, autojump_clock):
        deaf = await chatbus_bus_factory(drop=1.0)  # hears no notice: only the poll
        with trio.fail_after(5000):  # trio time: a failure, not a hang, if it never comes
            async with deaf.open_subscriber("room") as sub:
                await trio.sleep(1000)
                await chatbus_bus.publish("room", "late")
                assert (await sub.receive()).body == "late"
        assert trio.current_time() >= 2000
        assert deaf.statistics().polls >= 1
"""


def test_autojump_clock_on_memory(pytester: pytest.Pytester) -> None:
    started = time.monotonic()
    run(pytester, AUTOJUMP).assert_outcomes(passed=1)
    assert time.monotonic() - started < 10  # 2000 s of trio time


def test_autojump_clock_skips_on_postgres(pytester: pytest.Pytester) -> None:
    result = run(pytester, AUTOJUMP, "--chatbus-backend", "postgres", "--chatbus-dsn", CLOSED_DSN)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["SKIPPED*test_app.py:*: autojump_clock needs the memory backend, not postgres*"]
    )


# --- the helpers without pytest ------------------------------------------------------------


@pytest.mark.postgres
async def test_open_scratch_bus_makes_and_drops_a_schema() -> None:
    dsn = pg_dsn()
    with trio.fail_after(30):
        async with open_scratch_backend("postgres", dsn=dsn, poll_interval=0.05) as world:
            assert world.schema is not None and world.dsn == dsn
            async with world.open_bus() as a, world.open_bus(drop=1.0) as b:
                async with b.open_subscriber("room") as sub:
                    await a.publish("room", "via poll")  # b hears no notice
                    assert (await sub.receive()).body == "via poll"
            assert schema_exists(world.schema)
        assert not schema_exists(world.schema)


async def test_open_scratch_bus_memory() -> None:
    async with open_scratch_bus(poll_interval=0.5) as bus:
        async with bus.open_subscriber("room") as sub:
            await bus.publish("room", 1)
            assert (await sub.receive()).id == 1
    with pytest.raises(ValueError, match="unknown backend 'mongo'"):
        async with open_scratch_bus("mongo"):
            pass


async def test_open_scratch_bus_unreachable() -> None:
    with pytest.raises(BackendUnavailable, match="PostgreSQL not reachable at"):
        async with open_scratch_bus("postgres", dsn=CLOSED_DSN):
            pass


@pytest.mark.postgres
async def test_drop_schema_quotes_the_name() -> None:
    schema = 'chatbus_test "odd"; name'
    with psycopg.connect(pg_dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE TABLE {}.t (x int)").format(sql.Identifier(schema)))
    assert schema_exists(schema)
    await drop_schema(configured_dsn(), schema)
    assert not schema_exists(schema)
    await drop_schema(configured_dsn(), schema)  # already gone: fine


def test_testing_imports_without_psycopg() -> None:
    code = (
        "import sys; sys.modules['psycopg'] = None; import chatbus.testing, chatbus._pytest_plugin"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
