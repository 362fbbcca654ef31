"""Benchmark of instaqueue's operations features: beat fail-over, worker shutdown, Flower.

Runs against real services, like ``bench/dm_pipeline.py`` (whose helpers it reuses): Redis and
PostgreSQL from ``tests/services.py``, the fake Graph API of ``tests/fake_graph.py`` in this
process, and real ``python -m instaqueue worker|beat|flower`` subprocesses.

1. Beat take-over: two ``beat --schedule <tmp>/beat-N`` processes on one Redis, one active and
   one standing by (``SingleBeatScheduler`` / ``LeaderLock``, lock TTL ``BEAT_LOCK_TTL``).
   The active one's process group is SIGKILLed; the figure is the time from the kill to the
   standby's first ``Scheduler: Sending due task`` log line (log timestamps, ms). Each round
   also checks that the killed beat's last send precedes the new one's first (never both) and
   that the standby sent nothing before. A fresh standby is started for the next round.
2. Worker shutdown: SIGTERM to a worker's main pid (concurrency 4), time until it exits.
   Idle, then busy with real DM work: a few hundred ``process_instagram_message`` tasks on
   pre-inserted rows with a matching rule, the fake's Send API answering only after
   ``--send-delay`` seconds (the reply is delivered at once, only the answer is late). With
   ``INSTAQUEUE_SHUTDOWN_GRACE`` at its default (60 s) and at 5 s. After each, the delay is
   lifted and a new worker drains the queue: every DM must be replied exactly once at the
   fake. The send delay (15 s) is longer than the short grace, so the grace has something to
   cut; the Graph timeout is raised above it (``--send-delay`` + 10 s) so a send is slow, not
   failed.
3. Flower: a worker and ``flower --port=<free>`` (basic auth, loopback) started before any task
   is sent; median of 5 GETs of ``/tasks`` (HTML), ``/api/tasks?limit=100`` and
   ``/tasks/datatable`` (the query the tasks page sends: first page of 15, newest first) with
   100 ``instaqueue.noop`` tasks in Flower's history, then again with 10,000.

Figures are printed, never asserted; the only failures are a beat overlap, a wrong number of
replies (missing or duplicated) or a Flower page not answering 200, each of which prints a loud
``!!! MISMATCH`` line and exits 1.

Usage (from the repository root)::

    .venv/bin/python bench/operations.py            # 5 rounds, 300 DMs, 10,000 tasks
    .venv/bin/python bench/operations.py --quick    # 2 rounds, 40 DMs, 1,000 tasks: a smoke run
    .venv/bin/python bench/operations.py --send-delay 5 --keep
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dm_pipeline import (  # noqa: E402  (also puts tests/ and the root on sys.path)
    CONCURRENCY, ROOT, Proc, _interrupt, add_account, make_rows, run_batch, wait_until)
from fake_graph import FakeGraph  # noqa: E402
from services import provide_postgres, provide_redis  # noqa: E402

SENT = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/MainProcess\] Scheduler: Sending due task", re.M)
ACTIVE = "this beat is now the active one"
STANDBY = "another beat is active; this one stands by"
#: Seconds both beats run side by side before the kill (the standby must stay silent).
SIDE_BY_SIDE = 3.0
SHORT_GRACE = 5.0
FLOWER_AUTH = ("bench", "pw")
FLOWER_SMALL = 100
REPEATS = 5
#: Columns of Flower's tasks page (its default ``tasks_columns``); the page sorts by "received".
TASK_COLUMNS = ("name", "uuid", "state", "received", "runtime", "worker")
ROOT_ACCOUNT_ID = 17841400000000100


# Helpers #####################################################################################

def wait_log(proc: Proc, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while needle not in proc.text():
        if proc.popen is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name}: no {needle!r} after {timeout:.0f} s:\n{proc.text()[-3000:]}")
        time.sleep(0.05)


def send_times(proc: Proc) -> list[float]:
    return [datetime.strptime(m, "%Y-%m-%d %H:%M:%S,%f").timestamp() for m in SENT.findall(proc.text())]


def kill_group(proc: Proc) -> None:
    """SIGKILL the whole process group: main process and children, no goodbye."""
    assert proc.popen is not None
    os.killpg(proc.popen.pid, signal.SIGKILL)


def group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mmm(values: list[float], unit: str = "s", scale: float = 1.0, fmt: str = "6.2f") -> str:
    if not values:
        return "no data"
    v = [x * scale for x in values]
    return (f"median {statistics.median(v):{fmt}} {unit}  min {min(v):{fmt}} {unit}  "
            f"max {max(v):{fmt}} {unit}")


def purge_queues(iq: Any, client: Any) -> None:
    """Drop whatever a previous phase left in the task queues (e.g. beat's polls)."""
    keys = [k for q in iq.QUEUES for k in client.scan_iter(match=f"{q}*")]
    if keys:
        client.delete(*keys)


# Phase 1: beat take-over #####################################################################

def beat_phase(base: Path, env: dict[str, str], procs: list[Proc], rounds: int, ttl: float) -> dict[str, Any]:
    counter = iter(range(1000))

    def start_beat() -> Proc:
        n = next(counter)
        proc = Proc(f"beat-{n}", ["beat", "--schedule", str(base / f"beat-{n}")], base / f"beat-{n}.log",
                    env, "beat: Starting")
        procs.append(proc)
        return proc.start()

    takeovers: list[float] = []
    gaps: list[float] = []  # killed beat's last send -> new beat's first send
    problems: list[str] = []
    active = start_beat()
    wait_log(active, ACTIVE, timeout=15)
    for round_no in range(1, rounds + 1):
        standby = start_beat()
        wait_log(standby, STANDBY, timeout=15)
        time.sleep(SIDE_BY_SIDE)
        if not send_times(active):
            problems.append(f"beat round {round_no}: the active beat ({active.name}) sent nothing")
        if send_times(standby) or ACTIVE in standby.text():
            problems.append(f"beat round {round_no}: the standby ({standby.name}) sent while the other was active")
        kill_group(active)
        killed_at = time.time()
        assert active.popen is not None
        active.popen.wait(10)
        wait_log(standby, ACTIVE, timeout=ttl + 15)
        wait_until(lambda: send_times(standby), timeout=5)
        first_new = min(send_times(standby)) if send_times(standby) else None
        last_old = max(send_times(active), default=None)
        if first_new is None:
            problems.append(f"beat round {round_no}: the new active beat sent nothing within 5 s of taking over")
        else:
            takeovers.append(first_new - killed_at)
            if last_old is not None:
                gaps.append(first_new - last_old)
                if not last_old < first_new:
                    problems.append(f"beat round {round_no}: overlap, the killed beat's last send "
                                    f"{last_old:.3f} is not before the new one's first {first_new:.3f}")
            if first_new < killed_at:
                problems.append(f"beat round {round_no}: the standby sent {killed_at - first_new:.3f} s "
                                f"before the kill")
        active = standby
    active.stop()
    return dict(takeovers=takeovers, gaps=gaps, problems=problems, rounds=rounds)


# Phase 2: worker shutdown ####################################################################

def start_worker(name: str, base: Path, env: dict[str, str], procs: list[Proc]) -> Proc:
    proc = Proc(name, ["worker", "-n", f"{name}@%h", "--without-gossip", "--without-mingle"],
                base / f"{name}.log", env, " ready.")
    procs.append(proc)
    return proc.start()


def term_and_time(proc: Proc, timeout: float) -> tuple[float, bool, int | None]:
    """SIGTERM the main pid; seconds until it exits, whether anything of its group survived it,
    and its exit code (None when it did not exit within ``timeout``)."""
    assert proc.popen is not None
    popen = proc.popen
    started = time.monotonic()
    popen.send_signal(signal.SIGTERM)
    try:
        code: int | None = popen.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    took = time.monotonic() - started
    time.sleep(0.2)
    return took, group_alive(popen.pid), code


def idle_shutdown(base: Path, env: dict[str, str], procs: list[Proc], grace: float | None) -> dict[str, Any]:
    wenv = dict(env)
    if grace is not None:
        wenv["INSTAQUEUE_SHUTDOWN_GRACE"] = f"{grace:g}"
    worker = start_worker(f"idle-{'default' if grace is None else f'{grace:g}'}", base, wenv, procs)
    time.sleep(2)
    took, leftovers, code = term_and_time(worker, timeout=90)
    worker.stop()
    return dict(took=took, leftovers=leftovers, code=code)


def loaded_shutdown(iq: Any, fake: FakeGraph, base: Path, env: dict[str, str], procs: list[Proc],
                    account: Any, dms: int, send_delay: float, grace: float | None,
                    first_sender: int) -> dict[str, Any]:
    label = "default" if grace is None else f"{grace:g}"
    problems: list[str] = []
    rows = make_rows(iq, fake, account, dms, first_sender=first_sender)
    senders = {str(first_sender + i) for i in range(dms)}
    fake.delay(send_delay, times=None, method="POST", path_contains="/messages")
    wenv = dict(env)
    if grace is not None:
        wenv["INSTAQUEUE_SHUTDOWN_GRACE"] = f"{grace:g}"
    worker = start_worker(f"busy-{label}", base, wenv, procs)
    for message_id in rows:
        iq.process_instagram_message.delay(message_id)
    # Every pool process is one second into a send that answers after send_delay.
    fake.wait_for_sent(CONCURRENCY, account_ig_id=account.ig_user_id, timeout=60)
    time.sleep(1.0)
    in_flight = len(fake.sent_messages(account.ig_user_id))
    took, leftovers, code = term_and_time(worker, timeout=(grace or 60.0) + send_delay + 60)
    worker.stop()
    if code is None:
        problems.append(f"shutdown grace {label}: the worker had not exited {took:.0f} s after SIGTERM")

    def statuses() -> Counter[str]:
        with iq.session() as db:
            return Counter(str(s) for s in db.exec(
                iq.select(iq.InboundMessage.status).where(iq.InboundMessage.id.in_(rows))).all())

    at_exit = statuses()
    delivered_at_exit = len(fake.sent_messages(account.ig_user_id))

    # Drain: the Send API answers at once again; a new worker takes what is left (including any
    # task requeued by the cold shutdown, whose claim must run out first).
    fake.clear_faults()
    drain_started = time.monotonic()
    drainer = start_worker(f"drain-{label}", base, env, procs)
    final = {str(s) for s in iq.FINAL_MESSAGE_STATES}
    lease = iq.settings.message_lease
    wait_until(lambda: sum(n for s, n in statuses().items() if s not in final) == 0,
               timeout=lease + 120, interval=0.5)
    drain_s = time.monotonic() - drain_started
    time.sleep(3)  # time for a duplicate to show up
    drainer.stop()
    after = statuses()
    per_recipient = Counter(m["recipient_id"] for m in fake.sent_messages(account.ig_user_id))
    once = sum(1 for s in senders if per_recipient[s] == 1)
    twice = {s: n for s, n in per_recipient.items() if n > 1}
    missing = [s for s in senders if per_recipient[s] == 0]
    if after.get("replied", 0) != dms:
        problems.append(f"shutdown grace {label}: after the drain rows are {dict(after)} (expected {dms} replied)")
    if once != dms:
        problems.append(f"shutdown grace {label}: {once}/{dms} DMs replied exactly once at the fake; "
                        f"missing {len(missing)}, duplicated {len(twice)} {dict(list(twice.items())[:5])}")
    if set(per_recipient) - senders:
        problems.append(f"shutdown grace {label}: replies to unknown recipients")
    return dict(took=took, leftovers=leftovers, code=code, in_flight=in_flight,
                replied_at_exit=at_exit.get("replied", 0), statuses_at_exit=at_exit,
                delivered_at_exit=delivered_at_exit, once=once, drain_s=drain_s, dms=dms,
                problems=problems)


# Phase 3: Flower #############################################################################

def datatable_query(length: int = 15, search: str = "") -> str:
    """What Flower's tasks page POSTs to /tasks/datatable (jQuery DataTables, server side):
    the column slugs, ordered by "received" descending, first page (the handler takes GET too)."""
    params: dict[str, Any] = {"draw": 1, "start": 0, "length": length, "search[value]": search,
                              "order[0][column]": TASK_COLUMNS.index("received"), "order[0][dir]": "desc"}
    for i, name in enumerate(TASK_COLUMNS):
        params[f"columns[{i}][data]"] = name
    return "/tasks/datatable?" + urlencode(params)


FLOWER_PAGES = (
    ("/tasks (HTML)", "/tasks"),
    ("/api/tasks?limit=100", "/api/tasks?limit=100"),
    ("/tasks/datatable (15 newest)", datatable_query()),
)


def flower_successes(client: Any, base_url: str) -> int:
    try:
        answer = client.get(base_url + datatable_query(length=1, search="state:SUCCESS"), timeout=30)
        return int(answer.json().get("recordsFiltered", 0)) if answer.status_code == 200 else 0
    except Exception:
        return 0


def time_pages(client: Any, base_url: str, repeats: int) -> dict[str, dict[str, Any]]:
    out = {}
    for label, path in FLOWER_PAGES:
        client.get(base_url + path, timeout=120)  # warm-up (template compiled, caches filled)
        times, status, size = [], 0, 0
        for _ in range(repeats):
            started = time.perf_counter()
            answer = client.get(base_url + path, timeout=120)
            times.append(time.perf_counter() - started)
            status, size = answer.status_code, len(answer.content)
        out[label] = dict(times=times, status=status, size=size)
    return out


def flower_phase(iq: Any, base: Path, env: dict[str, str], procs: list[Proc], total: int) -> dict[str, Any]:
    import httpx

    problems: list[str] = []
    worker = start_worker("flower-worker", base, env, procs)
    port = free_port()
    fenv = {**env, "INSTAQUEUE_FLOWER_BASIC_AUTH": f"{FLOWER_AUTH[0]}:{FLOWER_AUTH[1]}",
            "INSTAQUEUE_FLOWER_ADDRESS": "127.0.0.1"}
    flower = Proc("flower", ["flower", f"--port={port}"], base / "flower.log", fenv, "")
    procs.append(flower)
    flower.start()
    base_url = f"http://127.0.0.1:{port}"
    with httpx.Client(auth=FLOWER_AUTH) as client:
        def healthy() -> bool:
            if flower.popen is not None and flower.popen.poll() is not None:
                raise RuntimeError(f"flower exited with {flower.popen.returncode}:\n{flower.text()[-3000:]}")
            try:
                return client.get(base_url + "/healthcheck", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        if not wait_until(healthy, timeout=60, interval=0.2):
            raise RuntimeError(f"Flower not answering after 60 s:\n{flower.text()[-3000:]}")
        unauthenticated = httpx.get(base_url + "/api/tasks?limit=1", timeout=10).status_code
        if unauthenticated != 401:
            problems.append(f"Flower answered {unauthenticated} to a request without credentials")

        # Flower sees the worker through its events: from then on it records every task.
        def sees_worker() -> bool:
            try:
                alive = client.get(base_url + "/api/workers?status=1", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                return False
            return any(name.startswith("flower-worker@") and up for name, up in alive.items())

        if not wait_until(sees_worker, timeout=30, interval=0.2):
            raise RuntimeError("Flower does not see the worker's events after 30 s")

        figures: dict[int, dict[str, Any]] = {}
        sent = 0
        for size in (FLOWER_SMALL, total):
            elapsed, bad = run_batch(lambda i: iq.noop.delay(i), size - sent)
            if bad:
                problems.append(f"{bad} noop tasks failed")
            sent = size
            seen = wait_until(lambda: flower_successes(client, base_url) >= size, timeout=180, interval=0.5)
            if not seen:
                problems.append(f"Flower shows {flower_successes(client, base_url)} succeeded tasks, expected {size}")
            pages = time_pages(client, base_url, REPEATS)
            for label, page in pages.items():
                if page["status"] != 200:
                    problems.append(f"Flower {label} answered {page['status']} with {size} tasks")
            figures[size] = dict(pages=pages, send_s=elapsed)
    flower.stop()
    worker.stop()
    if f"{FLOWER_AUTH[0]}:{FLOWER_AUTH[1]}" in flower.text():
        problems.append("Flower's log shows the basic-auth password")
    return dict(figures=figures, problems=problems, total=total)


# Main ########################################################################################

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="beat take-over rounds (5)")
    parser.add_argument("--dms", type=int, default=None, help="DMs queued for each shutdown under load (300)")
    parser.add_argument("--send-delay", type=float, default=15.0,
                        help="seconds the fake's Send API takes to answer during the shutdown runs (15)")
    parser.add_argument("--flower-tasks", type=int, default=None, help="tasks in Flower's history (10000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 40 DMs, 1000 tasks")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) even on success")
    args = parser.parse_args(argv)
    args.rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    args.dms = args.dms if args.dms is not None else (40 if args.quick else 300)
    args.flower_tasks = args.flower_tasks if args.flower_tasks is not None else (1000 if args.quick else 10_000)
    if args.rounds < 1 or args.dms < CONCURRENCY or args.send_delay <= 0:
        parser.error(f"--rounds must be at least 1, --dms at least {CONCURRENCY}, --send-delay positive")
    if args.flower_tasks <= FLOWER_SMALL:
        parser.error(f"--flower-tasks must be more than {FLOWER_SMALL}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    base = Path(tempfile.mkdtemp(prefix="instaqueue-bench-ops-"))
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

        for name in [n for n in os.environ if n.startswith(("INSTAQUEUE_", "FLOWER_"))
                     and not n.startswith("INSTAQUEUE_TEST_")]:
            del os.environ[name]
        graph_timeout = max(10.0, args.send_delay + 10)
        os.environ.update({
            "INSTAQUEUE_REDIS_URL": redis_service.url,
            "INSTAQUEUE_DATABASE_URL": pg_service.url,
            "INSTAQUEUE_GRAPH_API_URL": fake.url,
            "INSTAQUEUE_DATA_DIR": str(base / "data"),
            "INSTAQUEUE_WORKER_CONCURRENCY": str(CONCURRENCY),
            "INSTAQUEUE_GRAPH_TIMEOUT": f"{graph_timeout:g}",
        })
        import celery
        import flower as flower_pkg
        import instaqueue as iq
        import redis

        iq.create_tables()
        client = redis.Redis.from_url(redis_service.url)
        client.flushdb()

        s = iq.settings
        now = datetime.now().astimezone()
        print(f"instaqueue operations benchmark   {now:%Y-%m-%d %H:%M:%S %Z}")
        print(f"  machine   {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
              f"Python {platform.python_version()}, Celery {celery.__version__}, Flower {flower_pkg.__version__}")
        print(f"  services  Redis ({redis_service.how}) broker+results+beat lock, PostgreSQL ({pg_service.how}), "
              f"fake Graph API in the benchmark process")
        print(f"  settings  BEAT_LOCK_TTL {iq.BEAT_LOCK_TTL:g} s, standby retry {iq.BEAT_STANDBY_RETRY:g} s, "
              f"dm_poll_interval {s.dm_poll_interval:g} s; shutdown_grace {s.shutdown_grace:g} s (default) "
              f"and {SHORT_GRACE:g} s, soft shutdown {iq.app.conf.worker_soft_shutdown_timeout:g} s, "
              f"worker_concurrency {s.worker_concurrency}, graph_timeout {s.graph_timeout:g} s "
              f"(message lease {s.message_lease:g} s)")
        print(f"  workload  {args.rounds} beat take-overs; {args.dms} DMs queued per shutdown, Send API "
              f"answering after {args.send_delay:g} s; {FLOWER_SMALL} then {args.flower_tasks} noop tasks in Flower")
        print(f"  logs      {base}", flush=True)

        env = dict(os.environ)

        beat = beat_phase(base, env, procs, args.rounds, iq.BEAT_LOCK_TTL)
        purge_queues(iq, client)

        idle_default = idle_shutdown(base, env, procs, None)
        idle_short = idle_shutdown(base, env, procs, SHORT_GRACE)
        account_a = add_account(iq, fake, str(ROOT_ACCOUNT_ID + 1), "shop_a", "TOKEN-bench-ops-a")
        account_b = add_account(iq, fake, str(ROOT_ACCOUNT_ID + 2), "shop_b", "TOKEN-bench-ops-b")
        busy_default = loaded_shutdown(iq, fake, base, env, procs, account_a, args.dms, args.send_delay,
                                       None, first_sender=6_000_000)
        busy_short = loaded_shutdown(iq, fake, base, env, procs, account_b, args.dms, args.send_delay,
                                     SHORT_GRACE, first_sender=6_100_000)
        purge_queues(iq, client)

        flw = flower_phase(iq, base, env, procs, args.flower_tasks)

        # Table ###############################################################################
        lines: list[tuple[str, str]] = []
        lines.append((f"beat take-over after SIGKILL ({len(beat['takeovers'])} rounds):",
                      mmm(beat["takeovers"])))
        lines.append(("  killed beat's last send -> new first send:", mmm(beat["gaps"])))
        lines.append(("  overlap (both sending):",
                      "none" if not any("overlap" in p for p in beat["problems"]) else "YES"))

        def shutdown_line(r: dict[str, Any]) -> str:
            extra = "" if r["code"] is not None else " (still running: killed)"
            if r["leftovers"]:
                extra += ", pool processes outlived the main one"
            return f"{r['took']:6.2f} s  exit code {r['code']}{extra}"

        lines.append((f"worker shutdown after SIGTERM, idle, grace {s.shutdown_grace:g} s:", shutdown_line(idle_default)))
        lines.append((f"  idle, grace {SHORT_GRACE:g} s:", shutdown_line(idle_short)))
        for r, grace in ((busy_default, s.shutdown_grace), (busy_short, SHORT_GRACE)):
            lines.append((f"  {r['dms']} DMs queued, {args.send_delay:g} s sends, grace {grace:g} s:",
                          f"{shutdown_line(r)}; replied by then {r['replied_at_exit']}/{r['dms']} "
                          f"(delivered at the fake {r['delivered_at_exit']}, rows "
                          f"{dict(sorted(r['statuses_at_exit'].items()))})"))
            lines.append((f"    then drained by a new worker:",
                          f"{r['drain_s']:6.2f} s; replied exactly once {r['once']}/{r['dms']}"))
        small, big = flw["figures"][FLOWER_SMALL], flw["figures"][flw["total"]]
        for label, _ in FLOWER_PAGES:
            a, b = small["pages"][label], big["pages"][label]
            ma, mb = statistics.median(a["times"]), statistics.median(b["times"])
            lines.append((f"Flower GET {label}:",
                          f"{FLOWER_SMALL} tasks {ma * 1000:8.1f} ms   {flw['total']} tasks "
                          f"{mmm(b['times'], 'ms', 1000, '8.1f')}   ratio {mb / ma:6.1f}x  "
                          f"({b['size'] / 1024:.0f} KiB)"))
        width = max(len(label) for label, _ in lines)
        print()
        for label, value in lines:
            print(f"{label:<{width}}  {value}")
        problems = beat["problems"] + busy_default["problems"] + busy_short["problems"] + flw["problems"]
        for problem in problems:
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
