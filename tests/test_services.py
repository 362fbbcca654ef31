"""Tests for tests/services.py: how the integration tests find Redis and PostgreSQL."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from urllib.parse import urlsplit

import pytest

try:
    from tests import services
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import services

NO_DOCKER = "unix:///nonexistent/instaqueue-test/docker.sock"


def _port(url: str) -> int:
    return urlsplit(url).port


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _pg_conninfo(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture
def no_env_no_docker(monkeypatch):
    """Neither environment URL is set and no Docker engine answers."""
    monkeypatch.delenv(services.REDIS_ENV, raising=False)
    monkeypatch.delenv(services.DATABASE_ENV, raising=False)
    monkeypatch.setenv("DOCKER_HOST", NO_DOCKER)


def test_env_urls_are_used_untouched(monkeypatch, tmp_path):
    redis_url = "redis://cache.example:6390/3"
    db_url = "postgresql+psycopg://someone@db.example:5544/instaqueue"
    monkeypatch.setenv(services.REDIS_ENV, redis_url)
    monkeypatch.setenv(services.DATABASE_ENV, db_url)
    monkeypatch.setenv("PATH", "")  # nothing could be started anyway

    redis_service = services.provide_redis(tmp_path)
    db_service = services.provide_postgres(tmp_path)

    assert (redis_service.url, redis_service.how, redis_service.problem) == (redis_url, "env", None)
    assert (db_service.url, db_service.how, db_service.problem) == (db_url, "env", None)
    redis_service.stop()
    db_service.stop()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not on PATH")
def test_redis_from_path_answers_and_stops(no_env_no_docker, tmp_path):
    service = services.provide_redis(tmp_path)
    try:
        assert service.how == "path", service.problem
        assert service.problem is None
        assert service.url.startswith("redis://127.0.0.1:") and service.url.endswith("/0")
        port = _port(service.url)
        assert port != 6379
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"PING\r\n")
            assert sock.recv(64) == b"+PONG\r\n"
    finally:
        service.stop()
    assert not _port_open(port)
    service.stop()  # idempotent


@pytest.mark.skipif(services._pg_binaries() is None, reason="initdb/pg_ctl not found")
def test_postgres_from_path_answers_and_stops(no_env_no_docker, tmp_path):
    psycopg = pytest.importorskip("psycopg")
    service = services.provide_postgres(tmp_path)
    try:
        assert service.how == "path", service.problem
        assert service.problem is None
        assert service.url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
        assert service.url.endswith("/test")
        port = _port(service.url)
        with psycopg.connect(_pg_conninfo(service.url), connect_timeout=5) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
            assert conn.execute("select current_database()").fetchone() == ("test",)
            data_dir = conn.execute("select current_setting('data_directory')").fetchone()[0]
        if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to an unprivileged user
            assert os.stat(data_dir).st_uid != 0
    finally:
        service.stop()
    assert not _port_open(port)
    service.stop()  # idempotent


def test_unavailable_without_env_docker_or_path(no_env_no_docker, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(services, "PG_BIN_GLOBS", ())

    for provide, env_var in [(services.provide_redis, services.REDIS_ENV),
                             (services.provide_postgres, services.DATABASE_ENV)]:
        service = provide(tmp_path)
        assert service.how == "unavailable"
        assert service.url is None
        assert env_var in service.problem
        assert "\n" not in service.problem
        service.stop()  # harmless


def test_failing_path_route_reports_why(no_env_no_docker, monkeypatch, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "redis-server"
    fake.write_text("#!/bin/sh\necho 'Fatal error, cannot start: fake redis'\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))

    service = services.provide_redis(tmp_path)

    assert service.how == "unavailable"
    assert services.REDIS_ENV in service.problem
    assert "fake redis" in service.problem
    assert "\n" not in service.problem


class _FakeContainer:
    """Stands in for a testcontainers container (there may be no Docker engine here)."""

    fail_start = False

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        self.started = self.stopped = False
        type(self).made.append(self)

    def start(self):
        if self.fail_start:
            raise RuntimeError("image pull refused")
        self.started = True
        return self

    def get_container_host_ip(self):
        return "docker.example"

    def get_exposed_port(self, port):
        return 49000 + port % 1000

    def get_connection_url(self):
        return f"postgresql+{self.kwargs['driver']}://test:test@docker.example:49432/test"

    def stop(self):
        self.stopped = True


@pytest.fixture
def fake_testcontainers(monkeypatch):
    class Redis(_FakeContainer):
        made = []

    class Postgres(_FakeContainer):
        made = []

    monkeypatch.setitem(sys.modules, "testcontainers.community.redis",
                        types.SimpleNamespace(RedisContainer=Redis))
    monkeypatch.setitem(sys.modules, "testcontainers.community.postgres",
                        types.SimpleNamespace(PostgresContainer=Postgres))
    return Redis, Postgres


def test_testcontainers_route_comes_before_path(no_env_no_docker, fake_testcontainers, tmp_path):
    redis_cls, postgres_cls = fake_testcontainers
    redis_service = services.provide_redis(tmp_path)
    db_service = services.provide_postgres(tmp_path)

    assert (redis_service.how, redis_service.url) == ("testcontainers", "redis://docker.example:49379/0")
    assert db_service.how == "testcontainers"
    assert db_service.url == "postgresql+psycopg://test:test@docker.example:49432/test"
    (redis_container,), (db_container,) = redis_cls.made, postgres_cls.made
    assert redis_container.started and db_container.started
    redis_service.stop()
    db_service.stop()
    db_service.stop()
    assert redis_container.stopped and db_container.stopped
    assert list(tmp_path.iterdir()) == []  # nothing was started from PATH


def test_failing_testcontainers_falls_through(no_env_no_docker, fake_testcontainers, monkeypatch, tmp_path):
    redis_cls, _ = fake_testcontainers
    redis_cls.fail_start = True
    monkeypatch.setenv("PATH", "")

    service = services.provide_redis(tmp_path)

    assert service.how == "unavailable"
    assert "image pull refused" in service.problem and services.REDIS_ENV in service.problem
    assert redis_cls.made[0].stopped


def test_started_services_are_stopped_at_interpreter_exit(tmp_path):
    """A process that never calls stop() leaves nothing running behind it."""
    script = textwrap.dedent(
        """
        import os, sys
        from pathlib import Path
        import services
        os.environ.pop(services.REDIS_ENV, None)
        os.environ.pop(services.DATABASE_ENV, None)
        os.environ["DOCKER_HOST"] = sys.argv[2]
        found = []
        if services.shutil.which("redis-server"):
            found.append(services.provide_redis(Path(sys.argv[1]) / "r"))
        if services._pg_binaries():
            found.append(services.provide_postgres(Path(sys.argv[1]) / "p"))
        for s in found:
            assert s.how == "path", s.problem
            print(s.url)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(Path(services.__file__).parent))
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), NO_DOCKER],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    urls = done.stdout.split()
    if not urls:
        pytest.skip("neither redis-server nor initdb/pg_ctl available")
    for url in urls:
        assert not _port_open(_port(url)), url
