"""The test suite's own Redis servers (``support.redis_servers``): settings, teardown.

Every Redis test and benchmark relies on them: servers on ports of their own with the
persistence asked for, a cluster that is ready when handed over, and nothing left
running afterwards — not even when the process that started them is killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from support.redis_servers import RESERVED_PORTS, _pid_alive, binaries_problem, cluster, standalone

pytestmark = pytest.mark.redis

if (problem := binaries_problem()) is not None:
    if os.environ.get("CHATBUS_REQUIRE_REDIS") == "1":
        pytest.fail(f"Redis required (CHATBUS_REQUIRE_REDIS=1): {problem}", pytrace=False)
    pytest.skip(problem, allow_module_level=True)

TESTS = Path(__file__).resolve().parents[1]


def test_standalone_has_its_own_port_folder_and_persistence() -> None:
    with standalone(aof="always") as server:
        assert server.port not in RESERVED_PORTS
        assert server.command("CONFIG", "GET", "appendfsync") == ["appendfsync", "always"]
        assert server.command("CONFIG", "GET", "save") == ["save", ""]
        assert server.command("CONFIG", "GET", "dir")[1] == str(server.directory)
        pid, folder = server.pid, server.directory
        assert pid is not None and _pid_alive(pid)
    assert not _pid_alive(pid), "server left running"
    assert not folder.exists(), "server folder left behind"


def test_cluster_is_ready_when_handed_over_and_gone_afterwards() -> None:
    with cluster(masters=3) as nodes:
        pids = [node.pid for node in nodes.nodes]
        for node in nodes.nodes:
            assert "cluster_state:ok" in node.command("CLUSTER", "INFO")
        assert len(nodes.masters()) == 3
        assert nodes.url.startswith("redis+cluster://127.0.0.1:")
    assert not any(_pid_alive(pid) for pid in pids if pid is not None)


def test_servers_of_a_killed_owner_are_stopped_by_the_watchdog() -> None:
    """The launching process is SIGKILLed (no teardown runs): its servers still go."""
    script = textwrap.dedent(
        """
        import os, signal
        from support.redis_servers import standalone
        with standalone() as server:
            print(server.pid, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=TESTS, capture_output=True, text=True, timeout=60
    )
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _pid_alive(pid):
        assert time.monotonic() < deadline, f"orphan redis-server {pid} still running"
        time.sleep(0.1)
