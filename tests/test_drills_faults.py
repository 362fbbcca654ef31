"""The fault drills of ``drills/`` (Redis restarted, PostgreSQL restarted, Graph 5xx bursts, a rate
limit storm, hostile input), each run in its CI size (``--quick``) as a subprocess. A drill starts
its own processes and services (``INSTAQUEUE_TEST_REDIS_URL`` / ``INSTAQUEUE_TEST_DATABASE_URL``
are honoured where the drill does not need a server of its own to restart) and ends with one
``VERDICT: PASS|FAIL ...`` line; the test wants exit status 0 and ``VERDICT: PASS``.

Together they take a few minutes (a rate limit lasts one minute whatever the size).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.drill]

DRILLS = ["redis_restart", "postgres_restart", "graph_errors", "rate_limit_storm", "bad_input"]
TIMEOUT = 420  # seconds per drill; the quick runs take well under two minutes each


def drill_env() -> dict[str, str]:
    """The test process's environment: INSTAQUEUE_TEST_* choose the services; the drills set
    every other INSTAQUEUE_* themselves (conftest's own services stay the tests')."""
    return {k: v for k, v in os.environ.items() if not k.startswith("INSTAQUEUE_") or k.startswith("INSTAQUEUE_TEST_")}


@pytest.mark.parametrize("name", DRILLS)
def test_drill_passes_quick(name: str) -> None:
    script = ROOT / "drills" / f"{name}.py"
    try:
        done = subprocess.run([sys.executable, str(script), "--quick"], cwd=ROOT, env=drill_env(),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"drills/{name}.py --quick still running after {TIMEOUT} s:\n{out[-4000:]}", pytrace=False)
    verdicts = [line for line in done.stdout.splitlines() if line.startswith("VERDICT: ")]
    summary = "\n".join(line for line in done.stdout.splitlines() if not line.startswith("["))
    assert done.returncode == 0 and verdicts and verdicts[-1].startswith("VERDICT: PASS"), (
        f"drills/{name}.py --quick exited {done.returncode}:\n{summary[-6000:]}\n--- stderr ---\n{done.stderr[-3000:]}")
