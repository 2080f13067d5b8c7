"""The result table and the JSON document."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._check import Invariant


def table(invariants: Sequence[Invariant]) -> str:
    """A plain-text table: invariant, checked, violations, PASS/FAIL, detail."""
    rows = [("invariant", "checked", "violations", "result", "detail")]
    for inv in invariants:
        result = "PASS" if inv.violations == 0 else ("INFO" if inv.informational else "FAIL")
        rows.append((inv.name, f"{inv.checked:,}", f"{inv.violations:,}", result, inv.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for n, r in enumerate(rows):
        cells = [r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].rjust(widths[2])]
        lines.append("  ".join([*cells, r[3].ljust(widths[3]), r[4]]).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  ------")
    return "\n".join(lines)


def counts(title: str, values: Mapping[str, int | float | str]) -> str:
    """One indented ``key: value`` block."""
    body = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in values.items())
    return f"{title}: {body or '-'}"


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Write ``document`` as indented JSON."""
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False, default=str) + "\n")


def invariant_json(inv: Invariant) -> dict[str, Any]:
    """One invariant as a JSON object."""
    return {
        "name": inv.name,
        "checked": inv.checked,
        "violations": inv.violations,
        "passed": inv.passed,
        "informational": inv.informational,
        "detail": inv.detail,
    }
