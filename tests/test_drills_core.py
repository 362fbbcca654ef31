"""The core fault drills (drills/kill_workers.py, drills/two_beats.py, drills/secret_leaks.py),
each run in its ``--quick`` size as a subprocess that must exit 0 with a ``VERDICT: PASS`` line.

Each drill starts its own workers, beat (and Flower) against this test session's Redis and
PostgreSQL (the ``redis_url`` / ``database_url`` fixtures, handed to the drill as
``INSTAQUEUE_TEST_REDIS_URL`` / ``INSTAQUEUE_TEST_DATABASE_URL``): it flushes that Redis database
and recreates the tables, as the other integration tests do, so it must not run in parallel with
them. Together they take
about three minutes on a 2-CPU machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Registered marker only (--strict-markers): the drills are integration tests.
pytestmark = [pytest.mark.integration, pytest.mark.drill]

#: Seconds a quick drill may take at most before the test gives up on it.
DRILL_TIMEOUT = 300


def run_drill(script: str, redis_url: str, database_url: str) -> None:
    # The test's environment, with INSTAQUEUE_TEST_* naming the services of this test session
    # (tests/services.py in the drill then uses them as given); the drill sets its INSTAQUEUE_*.
    env = {**os.environ, "INSTAQUEUE_TEST_REDIS_URL": redis_url, "INSTAQUEUE_TEST_DATABASE_URL": database_url}
    proc = subprocess.Popen([sys.executable, str(ROOT / "drills" / script), "--quick"], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=DRILL_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the drill stops its workers, beat and services on SIGTERM
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"{script} --quick did not finish within {DRILL_TIMEOUT} s:\n{output[-6000:]}")
    verdicts = [line for line in output.splitlines() if line.startswith("VERDICT: ")]
    assert proc.returncode == 0 and verdicts and verdicts[-1].startswith("VERDICT: PASS"), (
        f"{script} --quick exited {proc.returncode}:\n{output[-6000:]}")


def test_kill_workers_drill(redis_url: str, database_url: str) -> None:
    run_drill("kill_workers.py", redis_url, database_url)


def test_two_beats_drill(redis_url: str, database_url: str) -> None:
    run_drill("two_beats.py", redis_url, database_url)


def test_secret_leaks_drill(redis_url: str, database_url: str) -> None:
    run_drill("secret_leaks.py", redis_url, database_url)
