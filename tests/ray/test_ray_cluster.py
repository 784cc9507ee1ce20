"""Runs tests/ray/cluster_cases.py (a real 2-replica Ray Serve cluster) in a private network.

Ray 2.60 listens on every interface and cannot be told otherwise, so its processes run in a new
network namespace (`unshare -n`) whose only interface is loopback; the cases start the cluster,
the client and a reference single server all inside it. The cases' own output is shown on
failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraserve.server.ray.netns import private_network_command

pytest.importorskip("ray", reason="Ray is the optional extra loraserve[ray]")

CASES = Path(__file__).with_name("cluster_cases.py")


@pytest.mark.timeout(600)
def test_two_replica_cluster_cases(tmp_path: Path) -> None:
    command = private_network_command(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rA",
            "-s",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'cases'}",
            str(CASES),
        ]
    )
    if command is None:
        pytest.skip(
            "this host refuses a private network namespace (unshare -n), "
            "and Ray must not listen beyond loopback"
        )
    env = {**os.environ, "LORASERVE_PRIVATE_NETNS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    result = subprocess.run(
        command,
        cwd=CASES.parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    summary = "\n".join(line for line in result.stdout.splitlines() if not line.startswith("("))
    print(summary[-6000:])
    assert result.returncode == 0, f"{summary[-12000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
    assert "10 passed" in result.stdout  # every case ran; none skipped
