"""Tools for testing code built on chatbus, and chatbus itself, under adversity.

* :class:`FaultyNotifier` wraps any notifier and drops, duplicates, delays and reorders
  its notices, reproducibly from a seed.
* :class:`LaggingStore` wraps any store so its reads lag its appends, like a read
  replica behind the primary.
* :func:`open_scratch_backend` opens a fresh, isolated world of a backend (memory, a
  new Postgres schema that is dropped afterwards, a new Redis key prefix) on which
  :meth:`ScratchBackend.open_bus` opens any number of buses, each its own "process",
  optionally behind the two wrappers above; :func:`open_scratch_bus` is the one-bus
  form and :func:`drop_schema` the Postgres clean-up. None of these need pytest.
* A pytest plugin (installed with chatbus, loaded automatically) provides the
  ``chatbus_backend``, ``chatbus_bus`` and ``chatbus_bus_factory`` fixtures for
  pytest-trio suites; see ``chatbus._pytest_plugin``.

The contract chatbus keeps under all of these: a subscription still yields every
message exactly once and in id order; faults only change latency.
"""

from __future__ import annotations

from ._faults import FaultStatistics as FaultStatistics
from ._faults import FaultyNotifier as FaultyNotifier
from ._faults import LaggingStore as LaggingStore
from ._scratch import BACKENDS as BACKENDS
from ._scratch import DEFAULT_POSTGRES_DSN as DEFAULT_POSTGRES_DSN
from ._scratch import DEFAULT_REDIS_URL as DEFAULT_REDIS_URL
from ._scratch import BackendUnavailable as BackendUnavailable
from ._scratch import BusFactory as BusFactory
from ._scratch import BusOptions as BusOptions
from ._scratch import ScratchBackend as ScratchBackend
from ._scratch import ScratchBusOptions as ScratchBusOptions
from ._scratch import drop_schema as drop_schema
from ._scratch import open_scratch_backend as open_scratch_backend
from ._scratch import open_scratch_bus as open_scratch_bus
from ._util import fixup_module_metadata as _fixup_module_metadata

__all__ = [
    "BACKENDS",
    "DEFAULT_POSTGRES_DSN",
    "DEFAULT_REDIS_URL",
    "BackendUnavailable",
    "BusFactory",
    "BusOptions",
    "FaultStatistics",
    "FaultyNotifier",
    "LaggingStore",
    "ScratchBackend",
    "ScratchBusOptions",
    "drop_schema",
    "open_scratch_backend",
    "open_scratch_bus",
]

_fixup_module_metadata(__name__, globals())
del _fixup_module_metadata
