"""``python -m benchmarks.chaos --minutes N --seed S [--url URL]``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ._run import Options, run

ALL_FAULTS = ("terminate", "blackhole", "restart", "freeze", "kill", "proxy_drop")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run one soak, return its exit status."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.chaos",
        description="Bounded, seeded chaos soak of chatbus against a loopback server.",
    )
    ap.add_argument("--minutes", type=float, default=1.0, help="run length (fractions ok)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the fault schedule and workload")
    ap.add_argument(
        "--url",
        default=os.environ.get("CHATBUS_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
        help="backend URL (loopback only); default $CHATBUS_TEST_DSN or the local test db",
    )
    ap.add_argument("--keep", action="store_true", help="keep the scratch schema and run dir")
    ap.add_argument(
        "--allow-restart", action="store_true", help="also restart the server (fast shutdown)"
    )
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results")
    ap.add_argument("--publishers", type=int, default=3, help="publisher processes")
    ap.add_argument("--subscribers", type=int, default=2, help="subscriber processes")
    ap.add_argument("--loops", type=int, default=2, help="publish loops per stream per process")
    ap.add_argument("--rate", type=float, default=15.0, help="publishes/s of each loop")
    ap.add_argument("--keyed-share", type=float, default=0.4, help="share of keyed publishes")
    ap.add_argument("--max-stall", type=float, default=5.0, help="stall limit, seconds")
    ap.add_argument(
        "--sabotage",
        action="store_true",
        help="self-test: children corrupt their own observations (duplicate publishes,"
        " wrong acked ids, lost and misread deliveries); those invariants must FAIL",
    )
    ap.add_argument("--cluster", default="15/main", help="pg_ctlcluster version/name")
    ap.add_argument(
        "--faults",
        default=",".join(ALL_FAULTS),
        help=f"comma-separated subset of {','.join(ALL_FAULTS)}; empty for none",
    )
    args = ap.parse_args(argv)
    faults = frozenset(f for f in args.faults.split(",") if f)
    if unknown := faults - set(ALL_FAULTS):
        ap.error(f"unknown faults: {', '.join(sorted(unknown))}")
    if not 0.2 <= args.minutes <= 24 * 60:
        ap.error("--minutes must be between 0.2 and 1440")
    opts = Options(
        minutes=args.minutes,
        seed=args.seed,
        url=args.url,
        keep=args.keep,
        allow_restart=args.allow_restart,
        json_path=args.json,
        publishers=max(1, args.publishers),
        subscribers=max(1, args.subscribers),
        loops=max(1, args.loops),
        rate=max(0.1, args.rate),
        keyed_share=min(1.0, max(0.0, args.keyed_share)),
        max_stall=args.max_stall,
        cluster=args.cluster,
        sabotage=args.sabotage,
        faults=faults,
    )
    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
