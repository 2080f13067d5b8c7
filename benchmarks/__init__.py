"""chatbus benchmark suite: ``python -m benchmarks`` from the repository root.

Every chatbus figure is reported next to a baseline measured in the same run, as
medians over repeats. See ``benchmarks/README.md``.
"""

# trio-asyncio is imported before anything imports psycopg: psycopg.waiting binds
# asyncio.get_running_loop at import time, and only trio-asyncio's patched version
# finds its loop (imported the other way round, pool connects fail with "no running
# event loop"). chatbus.postgres now repairs this itself; this keeps the suite
# working against older revisions.
import contextlib

with contextlib.suppress(ImportError):  # without the postgres extra: memory only
    import trio_asyncio  # noqa: F401
