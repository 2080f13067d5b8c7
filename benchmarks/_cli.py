"""Command line: pick scenarios and sizes, run, print the table, write JSON."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _pg, fanout, latency, scale, statement, throughput
from ._config import BACKENDS, SCENARIOS, Sizes, apply_override, default_dsn, quick_sizes
from ._report import Row, format_table, write_json

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"


def _parse_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}"
        )
    return chosen


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m benchmarks``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="chatbus benchmarks: every figure next to a baseline from the same run.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes for a CI smoke run (< 2 min)"
    )
    parser.add_argument(
        "--only",
        type=lambda text: _parse_list(text, SCENARIOS, "scenario"),
        default=list(SCENARIOS),
        help=f"comma-separated scenarios (default: all of {','.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--backends",
        type=lambda text: _parse_list(text, BACKENDS, "backend"),
        default=list(BACKENDS),
        help="comma-separated backends for latency, fanout and scale (default: both)",
    )
    parser.add_argument("--repeats", type=int, help="repeats per measurement (medians reported)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one size (see --list-sizes); repeatable",
    )
    parser.add_argument("--list-sizes", action="store_true", help="print the sizes and exit")
    parser.add_argument(
        "--dsn", default=default_dsn(), help="Postgres DSN (env CHATBUS_BENCH_DSN)"
    )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where to write JSON ({DEFAULT_JSON})"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; returns the process exit status (0 even if targets are missed)."""
    args = build_parser().parse_args(argv)
    sizes = quick_sizes() if args.quick else Sizes()
    try:
        for assignment in args.overrides:
            apply_override(sizes, assignment)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.repeats is not None:
        sizes.repeats = max(1, args.repeats)
    if args.list_sizes:
        for name, value in vars(sizes).items():
            print(f"{name} = {value}")
        return 0

    started = time.perf_counter()
    pg_problem = None
    if "postgres" in args.backends or "postgres" in args.only:
        pg_problem = _pg.unreachable_reason(args.dsn)
    chatbus_pg_problem = pg_problem or _pg.chatbus_postgres_missing()
    backends = list(args.backends)
    rows: list[Row] = []
    for scenario in SCENARIOS:
        if scenario not in args.only:
            continue
        print(f"[{time.perf_counter() - started:6.1f}s] running {scenario} ...", flush=True)
        first = len(rows)
        if scenario == "memory":
            rows += throughput.memory_throughput(sizes)
        elif scenario == "postgres":
            rows += throughput.postgres_throughput(sizes, args.dsn, pg_problem)
        elif scenario == "statement":
            rows += statement.run(sizes, args.dsn, chatbus_pg_problem)
        elif scenario == "latency":
            rows += latency.run(sizes, backends, args.dsn, chatbus_pg_problem)
        elif scenario == "fanout":
            rows += fanout.run(sizes, backends, args.dsn, chatbus_pg_problem)
        elif scenario == "scale":
            rows += scale.run(sizes, backends, args.dsn, chatbus_pg_problem)
        print(format_table(rows[first:]), flush=True)
    wall = time.perf_counter() - started

    print()
    print(format_table(rows))
    print(f"\nwall time {wall:.1f} s ({'quick' if args.quick else 'full'} mode)")
    meta: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks", *(argv or sys.argv[1:])]),
        "mode": "quick" if args.quick else "full",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "wall_seconds": round(wall, 1),
        "sizes": vars(sizes),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "dsn": args.dsn,
    }
    write_json(args.json, meta, rows)
    print(f"wrote {args.json}")
    return 0
