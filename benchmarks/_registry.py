"""Every scenario of the suite, in run order: ``--only`` and ``--list`` read this."""

from __future__ import annotations

from . import (
    events,
    fanout,
    gateway,
    latency,
    peers,
    redis_throughput,
    scale,
    statement,
    throughput,
)
from ._scenario import Scenario

SCENARIOS: tuple[Scenario, ...] = (
    throughput.MEMORY,
    throughput.POSTGRES,
    throughput.PG_KEYED,
    peers.SCENARIO,
    redis_throughput.SCENARIO,
    statement.SCENARIO,
    latency.SCENARIO,
    fanout.SCENARIO,
    scale.SCENARIO,
    events.SCENARIO,
    gateway.SCENARIO,
)

BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}
