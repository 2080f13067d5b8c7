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

from ._backends import BACKENDS, DEFAULT_PEER_URLS, Availability
from ._config import Sizes, apply_override, default_dsn, default_peer_url, quick_sizes
from ._registry import BY_NAME, SCENARIOS
from ._report import Row, format_table, write_json
from ._scenario import Context, Scenario, run_scenario

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
    names = list(BY_NAME)
    parser.add_argument(
        "--only",
        type=lambda text: _parse_list(text, names, "scenario"),
        default=names,
        help=f"comma-separated scenarios (default: all of {','.join(names)})",
    )
    parser.add_argument(
        "--backends",
        type=lambda text: _parse_list(text, BACKENDS, "backend"),
        default=list(BACKENDS),
        help="comma-separated backends for latency, fanout and scale (default: all)",
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
        "--list", action="store_true", help="print the scenarios, what they need, and exit"
    )
    parser.add_argument(
        "--dsn", default=default_dsn(), help="Postgres DSN (env CHATBUS_BENCH_DSN)"
    )
    for peer, url in DEFAULT_PEER_URLS.items():
        parser.add_argument(
            f"--{peer}-url",
            default=default_peer_url(peer, url),
            help=f"{peer} server for the peers scenario (env CHATBUS_BENCH_{peer.upper()}_URL)",
        )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where to write JSON ({DEFAULT_JSON})"
    )
    return parser


def _sizes(args: argparse.Namespace) -> Sizes:
    """The sizes of this run: quick or full, then ``--set`` and ``--repeats``."""
    sizes = quick_sizes() if args.quick else Sizes()
    for assignment in args.overrides:
        apply_override(sizes, assignment)
    if args.repeats is not None:
        sizes.repeats = max(1, args.repeats)
    return sizes


def _context(args: argparse.Namespace, sizes: Sizes) -> Context:
    peer_urls = {peer: getattr(args, f"{peer}_url") for peer in DEFAULT_PEER_URLS}
    return Context(
        sizes=sizes,
        dsn=args.dsn,
        backends=list(args.backends),
        peer_urls=peer_urls,
        availability=Availability(dsn=args.dsn, peer_urls=peer_urls),
    )


def _describe(scenario: Scenario) -> str:
    needs = "; ".join(
        f"{backend}: {', '.join(needs) or 'nothing'}" for backend, needs in scenario.needs.items()
    )
    return f"{scenario.name:<10} {scenario.summary} (needs {needs})"


def run_all(scenarios: Sequence[Scenario], context: Context) -> list[Row]:
    """Run ``scenarios`` in order, printing each one's rows as it finishes."""
    started = time.perf_counter()
    rows: list[Row] = []
    for scenario in scenarios:
        print(f"[{time.perf_counter() - started:6.1f}s] running {scenario.name} ...", flush=True)
        produced = run_scenario(scenario, context)
        print(format_table(produced), flush=True)
        rows += produced
    return rows


def _meta(
    args: argparse.Namespace, argv: Sequence[str] | None, sizes: Sizes, wall: float
) -> dict[str, Any]:
    return {
        "command": " ".join(["python -m benchmarks", *(argv or sys.argv[1:])]),
        "mode": "quick" if args.quick else "full",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "wall_seconds": round(wall, 1),
        "sizes": vars(sizes),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "dsn": args.dsn,
        "peer_urls": {peer: getattr(args, f"{peer}_url") for peer in DEFAULT_PEER_URLS},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; returns the process exit status (0 even if targets are missed)."""
    args = build_parser().parse_args(argv)
    try:
        sizes = _sizes(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for scenario in SCENARIOS:
            print(_describe(scenario))
        return 0
    if args.list_sizes:
        for name, value in vars(sizes).items():
            print(f"{name} = {value}")
        return 0
    started = time.perf_counter()
    chosen = [scenario for scenario in SCENARIOS if scenario.name in args.only]
    rows = run_all(chosen, _context(args, sizes))
    wall = time.perf_counter() - started
    print()
    print(format_table(rows))
    print(f"\nwall time {wall:.1f} s ({'quick' if args.quick else 'full'} mode)")
    write_json(args.json, _meta(args, argv, sizes, wall), rows)
    print(f"wrote {args.json}")
    return 0
