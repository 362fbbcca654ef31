"""Shared harness of instaqueue's fault drills (``drills/*.py``).

A drill is a script that runs real processes -- ``python -m instaqueue worker|beat|flower`` --
against real Redis and PostgreSQL (from ``tests/services.py``: ``INSTAQUEUE_TEST_REDIS_URL`` /
``INSTAQUEUE_TEST_DATABASE_URL`` when set, else throwaway ``redis-server`` / PostgreSQL from
PATH) and the fake Graph API of ``tests/fake_graph.py`` served from the drill's own process,
injects a fault, counts at the fake what reached Instagram, prints ONE verdict line::

    VERDICT: PASS answered=1000/1000 duplicates=0 ...
    VERDICT: FAIL answered=998/1000 duplicates=2 ...

and exits 0 (PASS) or 1 (FAIL, or the drill itself broke). ``--quick`` is the CI-sized run.

Public API (other drills rely on it: extend it, never change what is here)::

    from common import Drill, DRILL_SETTINGS, parse_args, run, wait_until

    def main() -> int:
        args = parse_args(__doc__)                   # --quick, --keep, --seed (+ add= callback)
        with Drill("my_drill", settings={...}, keep=args.keep) as d:
            d.iq             # the instaqueue module, imported with the drill's environment
            d.fake           # started FakeGraph (tests/fake_graph.py)
            d.base           # temp dir of the run: every log is under it (d.log_files())
            d.env            # environment for subprocesses (d.spawn adds per-process extras)
            d.redis_url, d.database_url
            account = d.add_account("17841400000000001", "shop", "TOKEN-x", rule=("price", "20 EUR"))
            w = d.worker("w1")                       # started and ready; a Proc
            b = d.beat("b1")                         # started and ready; a Proc
            f = d.spawn("flower", ["flower", "--port=5599"], ready="Visit me at")
            w.kill(); w.start()                      # SIGKILL the whole group, start again
            return d.verdict(ok, answered="1000/1000", duplicates=0)   # prints, returns 0/1

    if __name__ == "__main__":
        run(main)                                    # exit code; an exception is VERDICT: FAIL

Rules: one ``Drill`` per process (instaqueue reads its settings once, at import); settings are
``DRILL_SETTINGS`` updated with the drill's own, nothing inherited from the caller's
``INSTAQUEUE_*`` (``INSTAQUEUE_TEST_*`` are kept, they choose the services). Every process a
drill started is stopped when the ``with`` block ends, the services too; the temp dir is removed
after a PASS unless ``--keep``, and kept (and named) otherwise. Never name a drill after a
standard-library module (``drills/`` is ``sys.path[0]`` of a drill: ``drills/secrets.py`` would
shadow ``secrets`` for instaqueue and the fake).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
DRILLS = ROOT / "drills"
TESTS = ROOT / "tests"
for _path in (str(ROOT), str(TESTS)):
    if _path not in sys.path:
        sys.path.insert(1, _path)

from fake_graph import FakeGraph  # noqa: E402
from services import Service, provide_postgres, provide_redis  # noqa: E402

#: Settings every drill starts from (a drill's ``settings`` override them): redelivery after a
#: killed worker within a drill's time (visibility 30 s must exceed the longest task delay plus a
#: claim lease: max(retry cap 5*1.2, 2*check 5, container check 2) + lease 3*2+5 = 21 s), the
#: retry schedule scaled down, a short Graph timeout, posts checked every 5 s.
DRILL_SETTINGS: dict[str, str] = {
    "INSTAQUEUE_VISIBILITY_TIMEOUT": "30",
    "INSTAQUEUE_GRAPH_TIMEOUT": "2",
    "INSTAQUEUE_RETRY_BASE": "1",
    "INSTAQUEUE_RETRY_CAP": "5",
    "INSTAQUEUE_SCHEDULED_CHECK_INTERVAL": "5",
    "INSTAQUEUE_PUBLISH_STUCK_AFTER": "10",
    "INSTAQUEUE_CONTAINER_CHECK_INTERVAL": "2",
    "INSTAQUEUE_RATE_LIMIT_BACKOFF": "3",
    "INSTAQUEUE_WORKER_CONCURRENCY": "2",
    "INSTAQUEUE_SHUTDOWN_GRACE": "10",
}

WORKER_READY = " ready."
BEAT_READY = "beat: Starting"


# Processes ###################################################################################

class Proc:
    """``python -m instaqueue ARGS`` in its own process group, appending to one log file.

    ``start()`` may be called again after ``kill()``/``stop()`` (same log, appended);
    ``starts`` counts the starts. ``ready`` is a log substring awaited by ``start()``, counted
    from the start (earlier starts' lines do not count)."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str],
                 ready: str | None) -> None:
        self.name, self.args, self.log, self.env, self.ready = name, args, log, env, ready
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self, timeout: float = 60, wait: bool = True) -> "Proc":
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as handle:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "instaqueue", *self.args], cwd=ROOT, env=self.env,
                stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.starts += 1
        if wait and self.ready:
            self.wait_for_log(self.ready, timeout=timeout, offset=offset)
        return self

    def text(self, offset: int = 0) -> str:
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 60, offset: int = 0) -> None:
        deadline = time.monotonic() + timeout
        popen = self.popen
        while needle not in self.text(offset):
            if popen is None or popen.poll() is not None:
                code = popen.returncode if popen else None
                raise RuntimeError(f"{self.name} exited with {code}:\n{self.text(offset)[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.text(offset)[-3000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the whole process group (main process and pool children), no goodbye."""
        popen = self.popen
        if popen is None:
            return
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, grace: float = 15) -> None:
        """SIGTERM to the main process (Celery's warm shutdown), then SIGKILL the group."""
        popen = self.popen
        if popen is None:
            return
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


# The drill ###################################################################################

class Drill:
    """Services, the fake Graph API, instaqueue imported with the drill's settings, and the
    processes started through it; everything is stopped on leaving the ``with`` block."""

    def __init__(self, name: str, settings: dict[str, str] | None = None, keep: bool = False) -> None:
        self.name, self.keep = name, keep
        self.settings = {**DRILL_SETTINGS, **(settings or {})}
        self.base = Path(tempfile.mkdtemp(prefix=f"instaqueue-drill-{name}-"))
        self.fake = FakeGraph()
        self.procs: list[Proc] = []
        self.services: list[Service] = []
        self.passed = False
        self.iq: Any = None
        self.env: dict[str, str] = {}
        self.redis_url = self.database_url = ""

    def __enter__(self) -> "Drill":
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)  # also when started in the background
        try:
            self._setup()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def _setup(self) -> None:
        redis_service = provide_redis(self.base / "redis")
        self.services.append(redis_service)
        pg_service = provide_postgres(self.base / "pg")
        self.services.append(pg_service)
        for service in (redis_service, pg_service):
            if not service.url:
                raise RuntimeError(f"no service: {service.problem}")
        self.redis_url, self.database_url = redis_service.url, pg_service.url
        self.fake.start()
        for name in [n for n in os.environ if n.startswith("INSTAQUEUE_") and not n.startswith("INSTAQUEUE_TEST_")]:
            del os.environ[name]
        os.environ.update(self.settings)
        os.environ.update({
            "INSTAQUEUE_REDIS_URL": self.redis_url,
            "INSTAQUEUE_DATABASE_URL": self.database_url,
            "INSTAQUEUE_GRAPH_API_URL": self.fake.url,
            "INSTAQUEUE_DATA_DIR": str(self.base / "data"),
        })
        self.env = dict(os.environ)
        if "instaqueue" in sys.modules:
            raise RuntimeError("instaqueue was imported before the Drill: one Drill per process, first")
        import instaqueue
        import redis

        self.iq = instaqueue
        # A database given from outside (CI) outlives a run: start from this code's schema.
        instaqueue.SQLModel.metadata.drop_all(instaqueue.get_engine())
        instaqueue.create_tables()
        redis.Redis.from_url(self.redis_url).flushdb()
        print(f"{self.name}: services Redis ({redis_service.how}) {self.redis_url}, PostgreSQL "
              f"({pg_service.how}); fake Graph {self.fake.url}; logs {self.base}", flush=True)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for proc in reversed(self.procs):
                try:
                    proc.stop()
                except Exception:
                    pass
            self.fake.stop()
            for service in self.services:
                service.stop()
            if self.passed and not self.keep:
                shutil.rmtree(self.base, ignore_errors=True)
            else:
                print(f"{self.name}: logs kept in {self.base}", flush=True)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)

    # processes ---------------------------------------------------------------------------------

    def spawn(self, name: str, args: list[str], ready: str | None = None, *,
              env: dict[str, str] | None = None, wait: bool = True, timeout: float = 60) -> Proc:
        """Start ``python -m instaqueue ARGS`` logging to ``base/NAME.log``; stopped at the end."""
        proc = Proc(name, args, self.base / f"{name}.log", {**self.env, **(env or {})}, ready)
        self.procs.append(proc)
        return proc.start(timeout=timeout, wait=wait)

    def worker(self, name: str, *extra: str, env: dict[str, str] | None = None, wait: bool = True) -> Proc:
        """A worker on high,default,low named ``NAME@%h`` (no gossip, no mingle)."""
        return self.spawn(name, ["worker", "-n", f"{name}@%h", "--without-gossip", "--without-mingle", *extra],
                          WORKER_READY, env=env, wait=wait)

    def beat(self, name: str, *extra: str, env: dict[str, str] | None = None, wait: bool = True) -> Proc:
        """A beat with its own schedule file (SingleBeatScheduler decides whether it sends)."""
        return self.spawn(name, ["beat", "--schedule", str(self.base / f"{name}.schedule"), *extra],
                          BEAT_READY, env=env, wait=wait)

    # state -------------------------------------------------------------------------------------

    def add_account(self, ig_user_id: str, username: str, token: str,
                    rule: tuple[str, str] | None = None) -> Any:
        """An active account in the database and at the fake, with an optional reply rule
        ``(match, reply)``. Returns the Account row."""
        iq = self.iq
        with iq.session() as db:
            account = iq.Account(ig_user_id=ig_user_id, username=username, access_token=token)
            db.add(account)
            db.commit()
            if rule:
                db.add(iq.ReplyRule(account_id=account.id, match=rule[0], reply=rule[1]))
                db.commit()
        self.fake.add_account(ig_user_id, username, token)
        return account

    def log_files(self) -> list[Path]:
        """Every ``*.log`` file under the run's temp dir (processes', and services' started here)."""
        return sorted(p for p in self.base.rglob("*.log") if p.is_file())

    # outcome -----------------------------------------------------------------------------------

    def verdict(self, ok: bool, **counts: Any) -> int:
        """Print ``VERDICT: PASS|FAIL k=v ...``; 0 for PASS, 1 for FAIL."""
        self.passed = bool(ok)
        return print_verdict(ok, **counts)


def print_verdict(ok: bool, **counts: Any) -> int:
    fields = " ".join(f"{k}={v}" for k, v in counts.items())
    print(f"VERDICT: {'PASS' if ok else 'FAIL'}" + (f" {fields}" if fields else ""), flush=True)
    return 0 if ok else 1


# Helpers #####################################################################################

def parse_args(doc: str | None, argv: list[str] | None = None,
               add: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """``--quick`` (CI-sized), ``--keep`` (keep the temp dir after a PASS), ``--seed``; ``add``
    may add a drill's own options."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small, CI-sized run")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) after a PASS")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    if add:
        add(parser)
    return parser.parse_args(argv)


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """Poll ``predicate`` until truthy or ``timeout``; returns its last value (never raises)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def run(main: Callable[[], int]) -> None:
    """``sys.exit(main())``; an exception or interrupt prints ``VERDICT: FAIL`` and exits 1/130."""
    try:
        code = main()
    except KeyboardInterrupt:
        print_verdict(False, error="interrupted")
        code = 130
    except Exception as exc:
        traceback.print_exc()
        print_verdict(False, error=repr(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
        code = 1
    sys.exit(code)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


__all__ = ["DRILL_SETTINGS", "Drill", "FakeGraph", "Proc", "ROOT", "TESTS", "parse_args",
           "print_verdict", "run", "wait_until"]
