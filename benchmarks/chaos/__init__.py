"""A bounded, seeded chaos soak of chatbus: ``python -m benchmarks.chaos --minutes N``.

Publisher and subscriber OS processes run over a handful of streams (one with a
hostile name) in a fresh scratch namespace, while a seeded schedule terminates server
sessions, freezes server backends and clients, SIGKILLs publishers and has a loopback
proxy lose replies after the server acted on them. At the end the invariants are
checked against the store, read directly (see ``_check.py`` for the list).

Modules: ``_run`` (parent: children, faults, evaluation), ``_child`` (publisher and
subscriber processes), ``_proxy`` (the reply-losing TCP proxy), ``_check`` (the pure
invariant checker), ``_report`` (table, JSON), ``_backend`` (the backend interface)
and ``_postgres`` (the Postgres backend: schema, reader, server-side faults).
"""
