"""The scenario interface: what each benchmark module declares, and the one runner.

A scenario module ends with ``SCENARIO = Scenario(...)`` (or several): its ``--only``
name, the row label of its skipped row, for each chatbus backend it runs on what
that backend needs, and one entry function ``entry(context, backend) -> rows``.
:func:`run_scenario` is the only place that decides to skip a backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from ._backends import Availability
from ._config import Sizes
from ._report import Row, skipped


@dataclasses.dataclass(frozen=True, kw_only=True)
class Context:
    """Everything a scenario's entry function may use."""

    sizes: Sizes
    dsn: str
    #: Backends chosen with ``--backends``.
    backends: Sequence[str]
    #: URLs of the peer systems by name (``nats``, ``redis``).
    peer_urls: Mapping[str, str]
    availability: Availability

    def problem(self, *needs: str) -> str | None:
        """Why one of ``needs`` is unavailable, or None (see ``_backends.Availability``)."""
        return self.availability.problem(*needs)


Entry = Callable[[Context, str], list[Row]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scenario:
    """One ``--only`` choice of the suite."""

    #: The ``--only`` name.
    name: str
    #: The ``scenario`` column of its rows when skipped (usually the first row's).
    label: str
    #: Chatbus backend -> what it needs (names known to ``Availability``), in run
    #: order. A scenario with more than one backend runs those chosen by ``--backends``.
    needs: Mapping[str, tuple[str, ...]]
    #: ``entry(context, backend)``: run on one backend, return its rows.
    entry: Entry
    #: One line for ``--list``.
    summary: str = ""

    def backends(self, chosen: Sequence[str]) -> list[str]:
        """The backends to run on, given ``--backends``."""
        if len(self.needs) == 1:
            return list(self.needs)
        return [backend for backend in self.needs if backend in chosen]


def run_scenario(scenario: Scenario, context: Context) -> list[Row]:
    """Run ``scenario`` on each of its backends, or say why a backend was skipped."""
    rows: list[Row] = []
    for backend in scenario.backends(context.backends):
        problem = context.problem(*scenario.needs[backend])
        if problem is not None:
            rows.append(skipped(scenario.label, backend, problem))
        else:
            rows += scenario.entry(context, backend)
    return rows
