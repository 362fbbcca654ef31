"""Benchmark of instaqueue's worker memory: RSS per process as tasks go through.

Runs against real services, like ``bench/dm_pipeline.py`` (whose process handling and helpers it
imports): Redis and PostgreSQL from ``tests/services.py`` (``INSTAQUEUE_TEST_REDIS_URL`` /
``INSTAQUEUE_TEST_DATABASE_URL`` if set, else throwaway ``redis-server`` / PostgreSQL from PATH),
the fake Graph API of ``tests/fake_graph.py`` in this process, and a real worker (concurrency 4,
prefork) started as ``python -m instaqueue worker``; no beat.

The workload is a realistic mix, one ``process_instagram_message`` then one ``instaqueue.noop``
and so on: each DM task answers a pre-inserted row (a matching rule, a sender known to the fake,
so the Send API accepts). The worker's RSS (``VmRSS`` of ``/proc/<pid>/status``) is read for its
main process and each pool child (children from ``/proc/<pid>/task/*/children``) at rest after
start, then after 1,000, 5,000 and 10,000 tasks in all (``--quick``: 200, 1,000, 2,000), each
batch enqueued at once and every result fetched before the reading. The growth printed is from
the first checkpoint (warm-up: every child has opened its database, Redis and Graph connections)
to the last one, per process (target: flat after warm-up). Pages shared between the main process
and its forked children are counted in each of them, so the sum over-counts.

Figures are printed, never asserted; the only failures are a DM not replied exactly once, a task
that failed, or a pool child that was replaced during the run (its growth would mean nothing):
each prints a loud line and exits 1.

Usage (from the repository root)::

    .venv/bin/python bench/memory.py                       # checkpoints 1000, 5000, 10000
    .venv/bin/python bench/memory.py --quick               # 200, 1000, 2000
    .venv/bin/python bench/memory.py --checkpoints 1000,20000 --keep
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

# dm_pipeline puts tests/ and the repository root on sys.path; its Proc stops a process the way
# celery-notes.md asks (TERM to the main PID, then KILL the group).
from dm_pipeline import Proc, add_account, make_rows, run_batch  # noqa: E402
from fake_graph import FakeGraph  # noqa: E402
from services import provide_postgres, provide_redis  # noqa: E402

CONCURRENCY = 4
ACCOUNT = ("17841400000000021", "shop_memory", "TOKEN-bench-memory")
FIRST_SENDER = 6_000_000
SETTLE = 1.0  #: seconds between the last result of a batch and the reading


# /proc #######################################################################################

def rss_kib(pid: int) -> int | None:
    """``VmRSS`` in KiB, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def children(pid: int) -> list[int]:
    found: set[int] = set()
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found.update(int(c) for c in path.read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return sorted(found)


def snapshot(main_pid: int) -> dict[int, int]:
    """pid -> VmRSS KiB for the worker's main process and each child."""
    out = {}
    for pid in [main_pid, *children(main_pid)]:
        value = rss_kib(pid)
        if value is not None:
            out[pid] = value
    return out


# Main ########################################################################################

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", default=None,
                        help="comma-separated task totals at which RSS is read (1000,5000,10000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: checkpoints 200,1000,2000")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) even on success")
    args = parser.parse_args(argv)
    text = args.checkpoints or ("200,1000,2000" if args.quick else "1000,5000,10000")
    try:
        args.checkpoints = [int(x) for x in text.split(",")]
    except ValueError:
        parser.error("--checkpoints: integers separated by commas")
    if len(args.checkpoints) < 2 or any(b <= a for a, b in zip(args.checkpoints, args.checkpoints[1:])) \
            or args.checkpoints[0] < 2:
        parser.error("--checkpoints: at least two increasing totals, the first at least 2")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    base = Path(tempfile.mkdtemp(prefix="instaqueue-bench-memory-"))
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
        redis.Redis.from_url(redis_service.url).flushdb()
        account = add_account(iq, fake, *ACCOUNT)
        total = args.checkpoints[-1]
        dm_count = (total + 1) // 2  # task i is a DM when i is even
        t0 = time.perf_counter()
        rows = make_rows(iq, fake, account, dm_count, first_sender=FIRST_SENDER)
        rows_s = time.perf_counter() - t0

        s = iq.settings
        now = datetime.now().astimezone()
        print(f"instaqueue worker memory benchmark   {now:%Y-%m-%d %H:%M:%S %Z}")
        print(f"  machine   {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
              f"Python {platform.python_version()}, Celery {celery.__version__}")
        print(f"  services  Redis ({redis_service.how}) broker+results, PostgreSQL ({pg_service.how}), "
              f"fake Graph API in the benchmark process")
        print(f"  settings  worker_concurrency {s.worker_concurrency} (prefork), prefetch "
              f"{iq.app.conf.worker_prefetch_multiplier}, max_tasks_per_child "
              f"{iq.app.conf.worker_max_tasks_per_child}, max_memory_per_child "
              f"{iq.app.conf.worker_max_memory_per_child}, one worker, no beat")
        print(f"  workload  {total} tasks alternating process_instagram_message (on {dm_count} pre-inserted "
              f"rows, {rows_s:.1f} s to insert) and noop; RSS at rest and after "
              f"{', '.join(str(c) for c in args.checkpoints)} tasks")
        print(f"  logs      {base}", flush=True)

        worker = Proc("worker", ["worker", "-n", "bench@%h", "--without-gossip", "--without-mingle"],
                      base / "worker.log", dict(os.environ), " ready.")
        procs.append(worker)
        worker.start()
        main_pid = worker.popen.pid
        wait_children = time.monotonic() + 30
        while len(children(main_pid)) < CONCURRENCY and time.monotonic() < wait_children:
            time.sleep(0.1)
        time.sleep(2.0)  # at rest
        readings: list[tuple[str, dict[int, int], float]] = [("at rest", snapshot(main_pid), 0.0)]
        problems: list[str] = []
        done = 0
        dm_used = 0
        results_bad = 0
        for checkpoint in args.checkpoints:
            count = checkpoint - done
            first = done
            dm_ids = rows[dm_used:dm_used + sum(1 for i in range(first, checkpoint) if i % 2 == 0)]
            dm_used += len(dm_ids)
            dms = iter(dm_ids)

            def send(i: int, first: int = first, dms: Any = dms) -> Any:
                if (first + i) % 2 == 0:
                    return iq.process_instagram_message.delay(next(dms))
                return iq.noop.delay(first + i)

            elapsed, bad = run_batch(send, count, timeout=1800)
            results_bad += bad
            done = checkpoint
            time.sleep(SETTLE)
            readings.append((f"after {checkpoint}", snapshot(main_pid), count / elapsed))
            print(f"  ... {checkpoint} tasks done ({count} in {elapsed:.1f} s, {count / elapsed:.0f}/s)", flush=True)

        with iq.session() as db:
            statuses = Counter(str(st) for st in db.exec(
                iq.select(iq.InboundMessage.status).where(iq.InboundMessage.id.in_(rows[:dm_used]))).all())
        sent = len(fake.sent_messages(account.ig_user_id))
        if statuses.get("replied", 0) != dm_used:
            problems.append(f"process_instagram_message rows: {dict(statuses)} (expected {dm_used} replied)")
        if sent != dm_used:
            problems.append(f"{sent} replies sent for {dm_used} DMs")
        if results_bad:
            problems.append(f"{results_bad} tasks did not succeed")

        # Rows: the main process, then the children seen at rest, then any child seen later.
        pids = [main_pid] + [p for p in readings[0][1] if p != main_pid]
        for _, snap, _ in readings[1:]:
            pids += [p for p in snap if p not in pids]
        replaced = [p for p in pids if any(p not in snap for _, snap, _ in readings)]
        if replaced:
            problems.append(f"pool processes came or went during the run (pids {replaced}): a replaced child "
                            f"starts afresh")

        warm, last = readings[1], readings[-1]
        print()
        print(f"Worker RSS (VmRSS, MiB) per process; growth from the reading {warm[0]} tasks (warm-up) to the "
              f"one {last[0]} tasks:")
        head = ["process", *(label for label, _, _ in readings), "growth", "growth %", "KiB/1000 tasks"]
        widths = [16] + [12] * len(readings) + [10, 10, 16]
        print("  " + "".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(head, widths))))
        per_k = 1000 / (args.checkpoints[-1] - args.checkpoints[0])
        totals = {label: 0 for label, _, _ in readings}
        for n, pid in enumerate(pids):
            name = f"main {pid}" if pid == main_pid else f"child{n} {pid}"
            cells = [mib(snap.get(pid)) for _, snap, _ in readings]
            for label, snap, _ in readings:
                totals[label] += snap.get(pid, 0)
            a, b = warm[1].get(pid), last[1].get(pid)
            growth = [f"{(b - a) / 1024:+.1f}", f"{(b - a) / a * 100:+.1f}%", f"{(b - a) * per_k:+.0f}"] \
                if a and b else ["-", "-", "-"]
            row = [name, *cells, *growth]
            print("  " + "".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))))
        a, b = totals[warm[0]], totals[last[0]]
        row = ["sum", *(mib(totals[label]) for label, _, _ in readings),
               f"{(b - a) / 1024:+.1f}", f"{(b - a) / a * 100:+.1f}%", f"{(b - a) * per_k:+.0f}"]
        print("  " + "".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))))
        rates = "  ".join(f"{label}: {rate:.0f}/s" for label, _, rate in readings[1:])
        print(f"  task rate per batch (first enqueue -> last result): {rates}")
        children_growth = [(last[1][p] - warm[1][p]) / 1024 for p in pids
                           if p != main_pid and p in warm[1] and p in last[1]]
        if children_growth:
            print(f"  pool children: growth min {min(children_growth):+.1f} MiB, max {max(children_growth):+.1f} MiB "
                  f"over {args.checkpoints[-1] - args.checkpoints[0]} tasks")
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
