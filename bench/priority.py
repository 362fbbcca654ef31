"""Benchmark of instaqueue's queue priority: latency of ``high`` tasks behind a ``low`` backlog.

Runs against real services, like ``bench/dm_pipeline.py`` (whose process handling and figures it
imports): Redis and PostgreSQL from ``tests/services.py`` (``INSTAQUEUE_TEST_REDIS_URL`` /
``INSTAQUEUE_TEST_DATABASE_URL`` if set, else throwaway ``redis-server`` / PostgreSQL from PATH)
and a real worker (concurrency 4, prefetch multiplier 1: instaqueue's config) on queues
``high,default,low``. No beat runs and no Graph call is made (only ``instaqueue.noop`` runs), so
the fake Graph API is started only to give the worker the same settings as the other benchmarks.

Two workers are measured one after the other on the same broker, in the same run:

- **priority**: ``python -m instaqueue worker``, whose broker transport options say
  ``queue_order_strategy: priority`` (``high`` is always read first);
- **round-robin**: the same app with that one option removed (kombu's default, which rotates
  between the queues), started as ``python -m celery -A iq_round_robin worker -Q high,default,low
  -c 4`` from a tiny module written to the temp dir that imports instaqueue and rewrites
  ``app.conf.broker_transport_options``; instaqueue.py is not touched.

For each worker: first *idle* (empty queues), then *backlog*: N ``low`` noops are queued as fast
as one producer can (the worker starts draining at once), then one ``high`` noop is sent every
50 ms until the ``low`` queue is empty. A high task's latency is its result's ``date_done`` (set
by the worker when the noop, which returns nothing, finishes: practically its start) minus
``time.time()`` just before ``apply_async``. Figures are p50/p95/max and the backlog/idle ratio
on the same worker (target: priority p95 <= 2x idle).

Figures are printed, never asserted; the only failure is a task that did not succeed or a high
task without a result, which prints a loud line and exits 1.

Usage (from the repository root)::

    .venv/bin/python bench/priority.py            # 10,000 low tasks, 300 idle samples
    .venv/bin/python bench/priority.py --quick    # 1,000 low tasks, 100 idle samples
    .venv/bin/python bench/priority.py --backlog 20000 --keep
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

# dm_pipeline puts tests/ and the repository root on sys.path; its Proc stops a process the way
# celery-notes.md asks (TERM to the main PID, then KILL the group).
from dm_pipeline import ROOT, WARMUP_TASKS, Proc, percentile, run_batch, wait_until  # noqa: E402
from fake_graph import FakeGraph  # noqa: E402
from services import provide_postgres, provide_redis  # noqa: E402

CONCURRENCY = 4
HIGH_EVERY = 0.05  #: seconds between two high tasks
#: The round-robin launcher: instaqueue's app, kombu's default queue order.
ROUND_ROBIN_MODULE = "iq_round_robin"
ROUND_ROBIN_SOURCE = '''\
"""instaqueue's app with kombu's default queue order (round robin); written by bench/priority.py."""
import sys

from instaqueue import app

options = {k: v for k, v in app.conf.broker_transport_options.items() if k != "queue_order_strategy"}
app.conf.broker_transport_options = options
print(f"round-robin launcher: broker_transport_options = {options}", file=sys.stderr, flush=True)
'''


class CommandProc(Proc):
    """Like dm_pipeline's Proc, for any command (Proc always runs ``python -m instaqueue``)."""

    def __init__(self, name: str, command: list[str], log: Path, env: dict[str, str], ready: str) -> None:
        super().__init__(name, [], log, env, ready)
        self.command = command

    def start(self, timeout: float = 60) -> "CommandProc":
        with open(self.log, "ab") as handle:
            self.popen = subprocess.Popen(
                self.command, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=handle,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.ready not in self.text():
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.text()[-3000:]}")
            time.sleep(0.1)
        return self


# Phases ######################################################################################

def queued(client: Any, iq: Any) -> int:
    return sum(client.llen(q) for q in iq.QUEUES)


def measure(iq: Any, client: Any, *, backlog: int, samples: int) -> dict[str, Any]:
    """Queue ``backlog`` low noops, then send a high noop every ``HIGH_EVERY`` s until the low
    queue is empty (or ``samples`` of them when there is no backlog); the latencies."""
    problems: list[str] = []
    lows: list[Any] = []
    t_backlog = time.time()
    if backlog:
        with iq.app.producer_or_acquire() as producer:
            lows = [iq.noop.apply_async(queue=iq.QUEUE_LOW, producer=producer) for _ in range(backlog)]
    enqueue_s = time.time() - t_backlog
    left_at_start = client.llen(iq.QUEUE_LOW)

    highs: list[tuple[float, Any]] = []
    next_at = time.monotonic()
    deadline = time.monotonic() + 900
    while (client.llen(iq.QUEUE_LOW) > 0) if backlog else (len(highs) < samples):
        if time.monotonic() > deadline:
            problems.append("the low backlog did not drain within 900 s")
            break
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        t0 = time.time()
        highs.append((t0, iq.noop.apply_async(queue=iq.QUEUE_HIGH)))
        next_at += HIGH_EVERY

    latencies = []
    for t0, result in highs:
        try:
            result.get(timeout=120, propagate=False)
        except Exception as exc:  # a timeout: counted below
            problems.append(f"high task {result.id}: {type(exc).__name__}")
            continue
        if not result.successful() or result.date_done is None:
            problems.append(f"high task {result.id}: {result.state}")
            continue
        latencies.append(result.date_done.timestamp() - t0)
    low_bad, low_done = 0, []
    for result in lows:
        result.get(timeout=300, propagate=False)
        if not result.successful():
            low_bad += 1
        elif result.date_done is not None:
            low_done.append(result.date_done.timestamp())
    if low_bad:
        problems.append(f"{low_bad} of {backlog} low tasks did not succeed")
    drain_s = (max(low_done) - t_backlog) if low_done else None
    # Let the worker go idle before the next phase: nothing queued, nothing reserved.
    wait_until(lambda: queued(client, iq) == 0, timeout=60)
    time.sleep(1.0)
    return dict(backlog=backlog, latencies=latencies, highs=len(highs), enqueue_s=enqueue_s,
                left_at_start=left_at_start, drain_s=drain_s, problems=problems)


def run_worker(iq: Any, client: Any, proc: Proc, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    proc.start()
    try:
        run_batch(lambda i: iq.noop.apply_async(queue=iq.QUEUE_HIGH), WARMUP_TASKS)  # every pool process forked and warm
        run_batch(lambda i: iq.noop.apply_async(queue=iq.QUEUE_LOW), WARMUP_TASKS)
        time.sleep(1.0)
        idle = measure(iq, client, backlog=0, samples=args.idle)
        busy = measure(iq, client, backlog=args.backlog, samples=0)
    finally:
        proc.stop()
    return idle, busy


# Main ########################################################################################

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=None, help="low tasks queued first (10000)")
    parser.add_argument("--idle", type=int, default=None, help="high tasks sent on empty queues (300)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1000 low tasks, 100 idle samples")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) even on success")
    args = parser.parse_args(argv)
    args.backlog = args.backlog if args.backlog is not None else (1000 if args.quick else 10_000)
    args.idle = args.idle if args.idle is not None else (100 if args.quick else 300)
    if args.backlog < 1 or args.idle < 1:
        parser.error("--backlog and --idle must be at least 1")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    base = Path(tempfile.mkdtemp(prefix="instaqueue-bench-priority-"))
    procs: list[Proc] = []
    services: list[Any] = []
    fake = FakeGraph()
    ok = False
    try:
        redis_service = provide_redis(base / "redis")
        services.append(redis_service)
        pg_service = provide_postgres(base / "pg")
        services.append(pg_service)
        for service in (redis_service, pg_service):
            if not service.url:
                print(f"bench: {service.problem}", file=sys.stderr)
                return 2
        fake.start()

        for name in [n for n in os.environ if n.startswith("INSTAQUEUE_") and not n.startswith("INSTAQUEUE_TEST_")]:
            del os.environ[name]
        os.environ.update({
            "INSTAQUEUE_REDIS_URL": redis_service.url,
            "INSTAQUEUE_DATABASE_URL": pg_service.url,
            "INSTAQUEUE_GRAPH_API_URL": fake.url,
            "INSTAQUEUE_DATA_DIR": str(base / "data"),
            "INSTAQUEUE_WORKER_CONCURRENCY": str(CONCURRENCY),
        })
        import celery
        import instaqueue as iq
        import redis

        iq.create_tables()
        client = redis.Redis.from_url(redis_service.url)
        client.flushdb()
        rr_dir = base / "rr"
        rr_dir.mkdir()
        (rr_dir / f"{ROUND_ROBIN_MODULE}.py").write_text(ROUND_ROBIN_SOURCE)

        s = iq.settings
        now = datetime.now().astimezone()
        print(f"instaqueue queue priority benchmark   {now:%Y-%m-%d %H:%M:%S %Z}")
        print(f"  machine   {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
              f"Python {platform.python_version()}, Celery {celery.__version__}")
        print(f"  services  Redis ({redis_service.how}) broker+results, PostgreSQL ({pg_service.how}); "
              f"no beat, no Graph calls")
        print(f"  settings  worker_concurrency {s.worker_concurrency} (prefork), prefetch "
              f"{iq.app.conf.worker_prefetch_multiplier}, queues {iq.WORKER_QUEUES}; priority worker: "
              f"transport options {dict(iq.app.conf.broker_transport_options)}; round-robin worker: "
              f"the same without queue_order_strategy")
        print(f"  workload  per worker: {args.idle} high noops one every {HIGH_EVERY * 1000:.0f} ms on empty "
              f"queues, then {args.backlog} low noops queued and a high noop every "
              f"{HIGH_EVERY * 1000:.0f} ms until the low queue is empty (+{WARMUP_TASKS} warm-up per queue)")
        print(f"  logs      {base}", flush=True)

        env = dict(os.environ)
        prio = Proc("worker-priority", ["worker", "-n", "prio@%h", "--without-gossip", "--without-mingle"],
                    base / "worker-priority.log", env, " ready.")
        rr_env = {**env, "PYTHONPATH": os.pathsep.join([str(rr_dir), str(ROOT)])}
        rr = CommandProc("worker-round-robin",
                         [sys.executable, "-m", "celery", "-A", ROUND_ROBIN_MODULE, "worker", "-Q", iq.WORKER_QUEUES,
                          "-c", str(CONCURRENCY), "-l", "INFO", "-n", "rr@%h", "--without-gossip", "--without-mingle"],
                         base / "worker-round-robin.log", rr_env, " ready.")
        procs += [prio, rr]
        prio_idle, prio_busy = run_worker(iq, client, prio, args)
        rr_idle, rr_busy = run_worker(iq, client, rr, args)
        problems = [f"priority: {p}" for p in prio_idle["problems"] + prio_busy["problems"]]
        problems += [f"round-robin: {p}" for p in rr_idle["problems"] + rr_busy["problems"]]
        if "round-robin launcher: broker_transport_options" not in rr.text() or "queue_order_strategy" in \
                rr.text().split("round-robin launcher: broker_transport_options", 1)[1].splitlines()[0]:
            problems.append("the round-robin worker did not report transport options without queue_order_strategy")

        print()
        print(f"High-task latency (send -> result date_done), one high noop every {HIGH_EVERY * 1000:.0f} ms:")
        header = f"  {'setting':<28}{'high tasks':>11}{'p50':>12}{'p95':>12}{'max':>12}{'p50/idle':>10}{'p95/idle':>10}"
        print(header)
        rows = [("idle, priority worker", prio_idle, prio_idle), ("backlog + priority", prio_busy, prio_idle),
                ("idle, round-robin worker", rr_idle, rr_idle), ("backlog + round-robin", rr_busy, rr_idle)]
        for label, fig, ref in rows:
            lat, ref_lat = fig["latencies"], ref["latencies"]
            p50, p95 = percentile(lat, 50), percentile(lat, 95)
            r50, r95 = p50 / percentile(ref_lat, 50), p95 / percentile(ref_lat, 95)
            print(f"  {label:<28}{len(lat):>11}{fmt_ms(p50):>12}{fmt_ms(p95):>12}"
                  f"{fmt_ms(max(lat) if lat else float('nan')):>12}{r50:>9.2f}x{r95:>9.2f}x")
        for label, fig in (("priority", prio_busy), ("round-robin", rr_busy)):
            drain = fig["drain_s"]
            print(f"  {label} backlog: {fig['backlog']} low noops queued in {fig['enqueue_s']:.2f} s "
                  f"({fig['left_at_start']} still queued when high sends began), drained "
                  f"{'in %.2f s (%.0f/s)' % (drain, fig['backlog'] / drain) if drain else 'n/a'}")
        ratio = percentile(prio_busy["latencies"], 95) / percentile(prio_idle["latencies"], 95)
        print(f"  target priority p95 <= 2x idle: {'met' if ratio <= 2 else 'NOT met'} ({ratio:.2f}x); "
              f"round-robin p95 / priority p95 under backlog: "
              f"{percentile(rr_busy['latencies'], 95) / percentile(prio_busy['latencies'], 95):.2f}x")
        for problem in problems[:40]:
            print(f"!!! MISMATCH: {problem}")
        if problems:
            print(f"!!! logs kept in {base}")
            return 1
        ok = True
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for proc in reversed(procs):
            proc.stop()
        fake.stop()
        for service in services:
            service.stop()
        if ok and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        elif not ok:
            print(f"logs kept in {base}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
