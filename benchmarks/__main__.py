"""Entry point: ``python -m benchmarks --help``."""

from __future__ import annotations

import sys

from ._cli import main

sys.exit(main())
