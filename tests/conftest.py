"""Shared fixtures: real Redis and PostgreSQL, the fake Graph API, and real worker processes.

Services are found before ``instaqueue`` is imported (its settings are read at import), in
this order: ``INSTAQUEUE_TEST_REDIS_URL`` / ``INSTAQUEUE_TEST_DATABASE_URL``; testcontainers
when a Docker engine answers; ``redis-server`` and ``initdb``/``pg_ctl`` on PATH. Without
them the integration tests fail with one line saying how to provide them; pure tests still run.

Every test starts from empty tables, an empty Redis database and a fresh fake Graph API.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent

from fake_graph import FakeGraph  # noqa: E402
from services import Service, provide_postgres, provide_redis  # noqa: E402

#: Settings every test process runs with: the retry schedule scaled down (base 0.5 s, cap 2 s),
#: a short Graph timeout, scheduled posts checked every second, so that a claim lease and
#: Redis's redelivery fit in a test.
TEST_SETTINGS = {
    "INSTAQUEUE_RETRY_BASE": "0.5",
    "INSTAQUEUE_RETRY_CAP": "2",
    "INSTAQUEUE_SCHEDULED_CHECK_INTERVAL": "1",
    "INSTAQUEUE_CONTAINER_CHECK_INTERVAL": "0.5",
    "INSTAQUEUE_PUBLISH_STUCK_AFTER": "4",
    "INSTAQUEUE_GRAPH_TIMEOUT": "1.5",
    "INSTAQUEUE_VISIBILITY_TIMEOUT": "12",
    "INSTAQUEUE_RATE_LIMIT_BACKOFF": "3",
    "INSTAQUEUE_WORKER_CONCURRENCY": "2",
}

_state: dict[str, Any] = {}


def pytest_configure(config: pytest.Config) -> None:
    base = Path(tempfile.mkdtemp(prefix="instaqueue-tests-"))
    redis_service = provide_redis(base / "redis")
    pg_service = provide_postgres(base / "pg")
    fake = FakeGraph().start()
    _state.update(base=base, redis=redis_service, pg=pg_service, fake=fake)
    os.environ.update(TEST_SETTINGS)
    os.environ["INSTAQUEUE_DATA_DIR"] = str(base / "data")
    os.environ["INSTAQUEUE_GRAPH_API_URL"] = fake.url
    for name in ("INSTAQUEUE_REDIS_URL", "INSTAQUEUE_DATABASE_URL"):
        os.environ.pop(name, None)
    if redis_service.url:
        os.environ["INSTAQUEUE_REDIS_URL"] = redis_service.url
    if pg_service.url:
        os.environ["INSTAQUEUE_DATABASE_URL"] = pg_service.url


def pytest_unconfigure(config: pytest.Config) -> None:
    if "fake" in _state:
        _state["fake"].stop()
    for key in ("redis", "pg"):
        if key in _state:
            _state[key].stop()


def _require(service: Service) -> str:
    if not service.url:
        pytest.fail(service.problem or "service unavailable", pytrace=False)
    return service.url


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _require(_state["redis"])


@pytest.fixture(scope="session")
def database_url() -> str:
    return _require(_state["pg"])


@pytest.fixture
def fake_graph() -> Iterator[FakeGraph]:
    fake: FakeGraph = _state["fake"]
    fake.reset()
    yield fake
    fake.reset()


@pytest.fixture
def db(database_url: str, redis_url: str) -> Iterator[Any]:
    """Empty tables and an empty Redis database for this test; yields the instaqueue module."""
    import instaqueue
    import redis
    import sqlalchemy as sa

    if not _state.get("schema_fresh"):
        # The test database outlives a run (CI reuses it): start from this code's schema.
        instaqueue.SQLModel.metadata.drop_all(instaqueue.get_engine())
        _state["schema_fresh"] = True
    instaqueue.create_tables()
    tables = ", ".join(t.name for t in instaqueue.SQLModel.metadata.sorted_tables)
    with instaqueue.get_engine().begin() as connection:
        connection.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    redis.Redis.from_url(redis_url).flushdb()
    yield instaqueue


@pytest.fixture
def account(db: Any, fake_graph: FakeGraph) -> Any:
    """One active account, known to the fake, with a rule answering "price"."""
    iq = db
    with iq.session() as s:
        acc = iq.Account(ig_user_id="17841400000000001", username="shop", access_token="TOKEN-shop-s3cret")
        s.add(acc)
        s.commit()
        s.add(iq.ReplyRule(account_id=acc.id, match="price, cost", reply="Prices start at 20 EUR."))
        s.commit()
    fake_graph.add_account(acc.ig_user_id, acc.username, acc.access_token)
    return acc


class Proc:
    """A real instaqueue process (worker or beat) in its own process group, logging to a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str], ready: str | None) -> None:
        self.args, self.log, self.env, self.ready = args, log, env, ready
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> "Proc":
        handle = open(self.log, "ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "instaqueue", *self.args], cwd=ROOT, env=self.env,
            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        handle.close()
        if self.ready:
            self.wait_for_log(self.ready, timeout=timeout)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for_log(self, needle: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return
            if self.popen and self.popen.poll() is not None:
                raise AssertionError(f"{self.args[0]} exited with {self.popen.returncode}:\n{self.text()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"{self.args[0]} not ready after {timeout} s:\n{self.text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole process group: main process and pool children, no goodbye."""
        if self.popen and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)

    def stop(self) -> None:
        """TERM to the main process only (celery-notes), then KILL what is left."""
        if not self.popen:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)


@pytest.fixture
def spawn(db: Any, tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start ``python -m instaqueue worker|beat`` processes; all are stopped after the test."""
    procs: list[Proc] = []

    def start(kind: str = "worker", *extra: str, env: dict[str, str] | None = None) -> Proc:
        full_env = {**os.environ, **(env or {})}
        n = len(procs)
        if kind == "worker":
            args = ["worker", "-n", f"w{n}@%h", "--without-gossip", "--without-mingle", *extra]
            ready = " ready."
        else:
            args = ["beat", "--schedule", str(tmp_path / f"beat-{n}"), *extra]
            ready = "beat: Starting"
        proc = Proc(args, tmp_path / f"{kind}-{n}.log", full_env, ready)
        procs.append(proc)
        return proc.start()

    yield start
    for proc in procs:
        proc.stop()


def wait_until(predicate: Callable[[], Any], timeout: float = 20, interval: float = 0.1, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
