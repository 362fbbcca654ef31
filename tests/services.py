"""Real Redis and PostgreSQL for the integration tests.

Each ``provide_*`` function tries, in order:

1. the URL in ``INSTAQUEUE_TEST_REDIS_URL`` / ``INSTAQUEUE_TEST_DATABASE_URL``
   (used as given, nothing is started);
2. testcontainers, when a Docker engine answers;
3. ``redis-server`` / ``initdb`` + ``pg_ctl`` found on PATH (or, for PostgreSQL,
   in ``/usr/lib/postgresql/*/bin``), started in a temporary directory on a free
   loopback port -- this is what ``nix develop`` provides;
4. otherwise an ``unavailable`` Service whose ``problem`` says, in one line, how
   to provide one.

They never raise. Whatever they start is stopped by ``Service.stop()`` and, as
a safety net, when the interpreter exits.
"""

from __future__ import annotations

import atexit
import gc
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REDIS_ENV = "INSTAQUEUE_TEST_REDIS_URL"
DATABASE_ENV = "INSTAQUEUE_TEST_DATABASE_URL"

STARTUP_TIMEOUT = 30.0  # seconds to wait for a started service to answer
# Where Debian/Ubuntu keep initdb/pg_ctl (not on PATH there); tests may override.
PG_BIN_GLOBS: tuple[str, ...] = ("/usr/lib/postgresql/*/bin",)
# Unprivileged users to run initdb/pg_ctl as when we are root.
PG_RUN_AS: tuple[str, ...] = ("postgres", "nobody")
_SYSTEM_BIN_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


@dataclass
class Service:
    url: str | None  # redis://127.0.0.1:P/0 or postgresql+psycopg://postgres@127.0.0.1:P/test
    how: str  # "env", "testcontainers", "path" or "unavailable"
    problem: str | None = None  # one-line explanation when unavailable
    _stopper: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    _owner_pid: int = field(default_factory=os.getpid, repr=False, compare=False)

    def stop(self) -> None:
        """Stop what was started for this service; idempotent, never raises."""
        stopper, self._stopper = self._stopper, None
        _LIVE.pop(id(self), None)
        if stopper is not None:
            try:
                stopper()
            except Exception:  # best effort: nothing sensible to do about it
                pass


# Services with something running, stopped at interpreter exit.
_LIVE: dict[int, Service] = {}


def _started(service: Service) -> Service:
    _LIVE[id(service)] = service
    return service


@atexit.register
def _stop_all() -> None:
    for service in list(_LIVE.values()):
        # A forked child (e.g. a worker pool) must not stop its parent's services.
        if service._owner_pid == os.getpid():
            service.stop()


# --------------------------------------------------------------------------- #
# Public entry points
# --------------------------------------------------------------------------- #


def provide_redis(tmpdir: Path) -> Service:
    return _provide(
        REDIS_ENV,
        [_redis_testcontainers, _redis_path],
        Path(tmpdir),
        f"no Redis for the integration tests: set {REDIS_ENV}=redis://host:port/0, "
        "start a Docker engine for testcontainers, or put redis-server on PATH",
    )


def provide_postgres(tmpdir: Path) -> Service:
    return _provide(
        DATABASE_ENV,
        [_postgres_testcontainers, _postgres_path],
        Path(tmpdir),
        f"no PostgreSQL for the integration tests: set {DATABASE_ENV}="
        "postgresql+psycopg://user@host:port/db, start a Docker engine for "
        "testcontainers, or put initdb and pg_ctl on PATH",
    )


# A route returns a running Service, None when its tool is absent, or a
# string saying why it was present but failed.
Route = Callable[[Path], "Service | str | None"]


def _provide(env_var: str, routes: list[Route], tmpdir: Path, hint: str) -> Service:
    url = os.environ.get(env_var, "").strip()
    if url:
        return Service(url=url, how="env")
    failures = []
    for route in routes:
        try:
            result = route(tmpdir)
        except Exception as exc:  # a route must never take the caller down
            result = f"{route.__name__.lstrip('_')}: {type(exc).__name__}: {exc}"
        if isinstance(result, Service):
            return result
        if result:
            failures.append(result)
    problem = hint + (f" [{'; '.join(failures)}]" if failures else "")
    return Service(url=None, how="unavailable", problem=_one_line(problem))


# --------------------------------------------------------------------------- #
# testcontainers
# --------------------------------------------------------------------------- #


def _construct(make: Callable[[], object]) -> object | None:
    """The container, or None when testcontainers is missing or no Docker engine answers."""
    # testcontainers' constructors raise DockerException when no engine answers, and
    # the docker client leaves the failed socket to the garbage collector: keep its
    # ResourceWarning out of test runs that turn warnings into errors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            return make()
        except Exception:
            pass
        finally:
            gc.collect()
    return None


def _from_container(container, make_url: Callable[[], str]) -> Service | str:
    try:
        container.start()
        url = make_url()
    except Exception as exc:
        try:
            container.stop()
        except Exception:
            pass
        return f"testcontainers: {type(exc).__name__}: {exc}"
    return _started(Service(url=url, how="testcontainers", _stopper=container.stop))


def _redis_testcontainers(tmpdir: Path) -> Service | str | None:
    def make():
        try:
            from testcontainers.community.redis import RedisContainer
        except ImportError:
            from testcontainers.redis import RedisContainer
        return RedisContainer()

    container = _construct(make)
    if container is None:
        return None
    return _from_container(
        container,
        lambda: f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0",
    )


def _postgres_testcontainers(tmpdir: Path) -> Service | str | None:
    def make():
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:
            from testcontainers.postgres import PostgresContainer
        return PostgresContainer("postgres:16-alpine", driver="psycopg")

    container = _construct(make)
    if container is None:
        return None
    return _from_container(container, container.get_connection_url)


# --------------------------------------------------------------------------- #
# Binaries on PATH
# --------------------------------------------------------------------------- #


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _die_with_parent() -> None:  # runs in the child between fork and exec
    import ctypes

    try:  # PR_SET_PDEATHSIG: SIGTERM the child if we die without running atexit
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _redis_path(tmpdir: Path) -> Service | str | None:
    exe = shutil.which("redis-server")
    if not exe:
        return None
    workdir = tmpdir / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "redis.log"
    # The death signal follows the spawning *thread*, so only use it from the main one.
    on_main = threading.current_thread() is threading.main_thread()
    for _attempt in range(3):  # the free port may be taken before redis binds it
        port = _free_port()
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if on_main else None,
            )
        service = _started(Service(url=f"redis://127.0.0.1:{port}/0", how="path",
                                   _stopper=lambda proc=proc: _terminate(proc)))
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if _redis_ping(port):
                return service
            time.sleep(0.05)
        exited = proc.poll() is not None
        service.stop()
        if not exited:
            return f"redis-server on PATH did not answer PING within {STARTUP_TIMEOUT:.0f} s"
    return f"redis-server on PATH failed to start: {_tail(log)}"


def _pg_binaries() -> tuple[str, str] | None:
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return initdb, pg_ctl

    def version(directory: str) -> int:
        name = Path(directory).parent.name
        return int(name) if name.isdigit() else 0

    dirs = [d for pattern in PG_BIN_GLOBS for d in glob.glob(pattern)]
    for directory in sorted(dirs, key=version, reverse=True):
        initdb, pg_ctl = Path(directory, "initdb"), Path(directory, "pg_ctl")
        if os.access(initdb, os.X_OK) and os.access(pg_ctl, os.X_OK):
            return str(initdb), str(pg_ctl)
    return None


def _system_which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SYSTEM_BIN_DIRS))


def _unprivileged() -> tuple[list[str], pwd.struct_passwd | None] | str:
    """Command prefix to run initdb/pg_ctl, which refuse to run as root."""
    if os.geteuid() != 0:
        return [], None
    users = []
    for name in PG_RUN_AS:
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        if user.pw_uid != 0:
            users.append(user)
    if not users:
        return f"running as root and no unprivileged user ({', '.join(PG_RUN_AS)}) to run initdb as"
    user = users[0]
    if setpriv := _system_which("setpriv"):
        return [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"], user
    if runuser := _system_which("runuser"):
        return [runuser, "-u", user.pw_name, "--"], user
    return "running as root and neither setpriv nor runuser to run initdb as an unprivileged user"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_postgres(prefix: list[str], pg_ctl: str, data: Path, workdir: Path, own_dir: bool) -> None:
    try:
        subprocess.run(prefix + [pg_ctl, "-D", str(data), "-m", "fast", "-w", "-t", "20", "stop"],
                       stdin=subprocess.DEVNULL, capture_output=True, cwd=workdir, timeout=30)
    except Exception:
        pass
    try:  # pg_ctl failed or timed out: ask the postmaster directly for an immediate stop
        pid = int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = 0
    if pid > 0 and _pid_alive(pid):
        for sig in (signal.SIGQUIT, signal.SIGKILL):
            os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _pid_alive(pid):
                break
    if own_dir:
        shutil.rmtree(workdir, ignore_errors=True)


def _postgres_path(tmpdir: Path) -> Service | str | None:
    binaries = _pg_binaries()
    if binaries is None:
        return None
    initdb, pg_ctl = binaries
    runas = _unprivileged()
    if isinstance(runas, str):
        return runas
    prefix, user = runas
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"

    # The unix socket goes in the work dir, so its path must stay short (< 108
    # bytes), and an unprivileged user must be able to reach it: when either is
    # doubtful use a fresh short directory under the system temp dir.
    workdir, own_dir = tmpdir / "postgres", False
    if user is not None or len(str(workdir)) > 80:
        workdir, own_dir = Path(tempfile.mkdtemp(prefix="instaqueue-pg-")), True
    workdir.mkdir(parents=True, exist_ok=True)
    if user is not None:
        os.chown(workdir, user.pw_uid, user.pw_gid)
        os.chmod(workdir, 0o700)
    data, log = workdir / "data", workdir / "postgres.log"

    def cleanup() -> None:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)

    def run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(prefix + args, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, cwd=workdir, timeout=timeout)

    try:
        done = run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                    "--locale=C"], timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        cleanup()
        return f"initdb failed: {exc}"
    if done.returncode != 0:
        cleanup()
        last = (done.stderr or done.stdout).strip().splitlines()
        return f"initdb failed: {last[-1] if last else f'exit status {done.returncode}'}"

    def stopper() -> None:
        _stop_postgres(prefix, pg_ctl, data, workdir, own_dir)

    reason = "pg_ctl start failed"
    for _attempt in range(3):  # the free port may be taken before postgres binds it
        port = _free_port()
        options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
        service = _started(Service(url=f"postgresql+psycopg://postgres@127.0.0.1:{port}/test",
                                   how="path", _stopper=stopper))
        try:
            done = run([pg_ctl, "-D", str(data), "-l", str(log), "-o", options,
                        "-w", "-t", str(int(STARTUP_TIMEOUT)), "start"], timeout=STARTUP_TIMEOUT + 15)
        except (OSError, subprocess.SubprocessError) as exc:
            service.stop()
            return f"pg_ctl start failed: {exc}"
        if done.returncode != 0:
            reason = f"pg_ctl start failed: {_tail(log) or done.stderr.strip()}"
            # Stop (keeping the cluster) whatever might have come up, then retry.
            service._stopper = lambda: _stop_postgres(prefix, pg_ctl, data, workdir, own_dir=False)
            service.stop()
            continue
        deadline, last_error = time.monotonic() + STARTUP_TIMEOUT, None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                                     connect_timeout=2, autocommit=True) as conn:
                    conn.execute("CREATE DATABASE test")
                return service
            except psycopg.errors.DuplicateDatabase:
                return service
            except psycopg.Error as exc:
                last_error = exc
                time.sleep(0.1)
        service.stop()
        return f"PostgreSQL started by pg_ctl did not answer: {_one_line(last_error)}"
    service.stop()
    return reason
