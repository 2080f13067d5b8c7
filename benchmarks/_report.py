"""Result rows, medians, the printed table and the JSON document."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def median(samples: Sequence[float]) -> float | None:
    """The median of ``samples``, or None if there are none."""
    return statistics.median(samples) if samples else None


def percentile(sorted_samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted samples (``fraction`` in 0..1)."""
    if not sorted_samples:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_samples)))
    return sorted_samples[rank - 1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Row:
    """One line of the result table.

    ``value`` and ``baseline`` are medians of ``samples`` and ``baseline_samples``;
    ``ratio`` is ``value / baseline`` when both exist. ``ok`` is the verdict against
    ``target`` (None when there is no target or nothing was measured).
    """

    scenario: str
    backend: str
    metric: str
    unit: str
    value: float | None = None
    samples: tuple[float, ...] = ()
    baseline_name: str = ""
    baseline: float | None = None
    baseline_samples: tuple[float, ...] = ()
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None
    note: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def measured(
    *,
    scenario: str,
    backend: str,
    metric: str,
    unit: str,
    samples: Sequence[float],
    baseline_name: str = "",
    baseline_samples: Sequence[float] = (),
    target: str = "",
    min_ratio: float | None = None,
    max_value: float | None = None,
    min_value: float | None = None,
    note: str = "",
    extra: dict[str, Any] | None = None,
) -> Row:
    """Build a row from raw samples, computing medians, ratio and the verdict."""
    value = median(samples)
    baseline = median(baseline_samples)
    ratio = value / baseline if value is not None and baseline else None
    ok: bool | None = None
    if min_ratio is not None and ratio is not None:
        ok = ratio >= min_ratio
    if max_value is not None and value is not None:
        ok = value <= max_value
    if min_value is not None and value is not None:
        ok = value >= min_value
    return Row(
        scenario=scenario,
        backend=backend,
        metric=metric,
        unit=unit,
        value=value,
        samples=tuple(samples),
        baseline_name=baseline_name,
        baseline=baseline,
        baseline_samples=tuple(baseline_samples),
        ratio=ratio,
        target=target,
        ok=ok,
        note=note,
        extra=dict(extra or {}),
    )


def skipped(scenario: str, backend: str, reason: str) -> Row:
    """A row saying why a scenario did not run."""
    return Row(scenario=scenario, backend=backend, metric="-", unit="", note=f"skipped: {reason}")


def _number(value: float | None, unit: str = "") -> str:
    if value is None or math.isnan(value):
        return "-"
    if unit == "ms":
        return f"{value:.3f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_table(rows: Sequence[Row]) -> str:
    """Render ``rows`` as a fixed-width text table."""
    header = (
        "scenario",
        "backend",
        "metric",
        "chatbus",
        "unit",
        "baseline",
        "ratio",
        "target",
        "ok",
        "note",
    )
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        verdict = {True: "yes", False: "NO", None: ""}[row.ok]
        baseline = _number(row.baseline, row.unit)
        if row.baseline_name and row.baseline is not None:
            baseline = f"{baseline} ({row.baseline_name})"
        lines.append(
            (
                row.scenario,
                row.backend,
                row.metric,
                _number(row.value, row.unit),
                row.unit,
                baseline,
                "-" if row.ratio is None else f"{row.ratio:.2f}x",
                row.target,
                verdict,
                row.note,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
        if n == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(text.rstrip() for text in out)


def write_json(path: Path, meta: dict[str, Any], rows: Sequence[Row]) -> None:
    """Write the run's metadata and rows to ``path`` (creating its directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, "rows": [dataclasses.asdict(row) for row in rows]}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
