"""Benchmark of instaqueue's DM pipeline: reply latency and task throughput.

Runs against real services, like the integration tests: Redis and PostgreSQL from
``tests/services.py`` (``INSTAQUEUE_TEST_REDIS_URL`` / ``INSTAQUEUE_TEST_DATABASE_URL`` if set,
else throwaway ``redis-server`` / PostgreSQL from PATH), the fake Graph API of
``tests/fake_graph.py`` in this process, and a real worker (concurrency 4) and beat started as
``python -m instaqueue worker|beat`` subprocesses.

1. DM latency: DMs arrive one every 0.1-0.3 s from a few dozen senders; for each, the time from
   ``FakeGraph.add_dm`` returning to its reply being delivered to the fake's Send API (the reply
   is matched to its DM through the stored row: ``graph_message_id`` -> ``reply_graph_message_id``).
   The poll interval is instaqueue's default (0.5 s) unless ``--poll-interval`` says otherwise.
2. Throughput: with beat stopped, N ``process_instagram_message`` tasks (rows pre-inserted, a
   matching rule, the fake answering the Send API) against N ``instaqueue.noop`` tasks on the
   same worker and broker; both timed from the first enqueue to the last result ``.get()``.

Figures are printed, never asserted; the only failure is a wrong number of replies (missing or
duplicated), which prints a loud line and exits 1.

Usage (from the repository root)::

    .venv/bin/python bench/dm_pipeline.py            # 200 DMs, 1000 tasks of each kind
    .venv/bin/python bench/dm_pipeline.py --quick    # 40 DMs, 200 tasks: a smoke run
    .venv/bin/python bench/dm_pipeline.py --dms 500 --tasks 5000 --keep
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from fake_graph import FakeGraph  # noqa: E402
from services import provide_postgres, provide_redis  # noqa: E402

CONCURRENCY = 4
RULE_MATCH = "price, cost"
RULE_REPLY = "Prices start at 20 EUR."
LATENCY_ACCOUNT = ("17841400000000001", "shop", "TOKEN-bench-latency")
THROUGHPUT_ACCOUNT = ("17841400000000002", "shop_two", "TOKEN-bench-throughput")
#: DMs per sender in the latency phase (senders = ceil(dms / this)): a few dozen for 200 DMs,
#: and each conversation stays well under the 20 messages Graph lets us read.
DMS_PER_SENDER = 5
WARMUP_TASKS = 40


# Processes ###################################################################################

class Proc:
    """``python -m instaqueue ARGS`` in its own process group, logging to a file."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str], ready: str) -> None:
        self.name, self.args, self.log, self.env, self.ready = name, args, log, env, ready
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> "Proc":
        with open(self.log, "ab") as handle:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "instaqueue", *self.args], cwd=ROOT, env=self.env,
                stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.ready not in self.text():
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.text()[-3000:]}")
            time.sleep(0.1)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        """TERM to the main process (Celery's warm shutdown), then KILL the whole group."""
        popen, self.popen = self.popen, None
        if popen is None:
            return
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            pass


# Figures #####################################################################################

def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    k = (len(ordered) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def spread(values: list[float]) -> str:
    if not values:
        return "no data"
    return "  ".join(f"{name} {percentile(values, p):5.2f} s" for name, p in
                     (("p50", 50), ("p95", 95), ("p99", 99))) + f"  max {max(values):5.2f} s"


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# Phases ######################################################################################

def add_account(iq: Any, fake: FakeGraph, ig_user_id: str, username: str, token: str) -> Any:
    with iq.session() as db:
        account = iq.Account(ig_user_id=ig_user_id, username=username, access_token=token)
        db.add(account)
        db.commit()
        db.add(iq.ReplyRule(account_id=account.id, match=RULE_MATCH, reply=RULE_REPLY))
        db.commit()
    fake.add_account(ig_user_id, username, token)
    return account


def latency_phase(iq: Any, fake: FakeGraph, account: Any, dms: int, rng: random.Random) -> dict[str, Any]:
    """Send ``dms`` DMs spread out in time; match each reply to its DM; return the figures."""
    senders = [str(9_100_000 + i) for i in range(max(1, math.ceil(dms / DMS_PER_SENDER)))]
    sent_at: dict[str, float] = {}  # graph message id -> time.time() after add_dm returned
    from_sender: Counter[str] = Counter()
    order = [senders[i % len(senders)] for i in range(dms)]
    rng.shuffle(order)
    next_at = time.monotonic()
    for i, sender in enumerate(order):
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        graph_id = fake.add_dm(account.ig_user_id, sender, f"Hi! What's the price of item {i}?",
                               sender_username=f"person{sender}")
        sent_at[graph_id] = time.time()
        from_sender[sender] += 1
        next_at += rng.uniform(0.1, 0.3)
    last_dm = time.monotonic()
    try:
        fake.wait_for_sent(dms, account_ig_id=account.ig_user_id, timeout=60)
    except TimeoutError:
        pass
    drain = time.monotonic() - last_dm
    time.sleep(3)  # six more polls: time for a duplicate to show up

    replies = fake.sent_messages(account.ig_user_id)
    reply_time = {r["message_id"]: r["time"].timestamp() for r in replies}
    with iq.session() as db:
        rows = db.exec(iq.select(iq.InboundMessage).where(iq.InboundMessage.account_id == account.id)).all()
    latencies, to_stored, stored_to_reply = [], [], []
    problems: list[str] = []
    matched: set[str] = set()
    for row in rows:
        t0 = sent_at.get(row.graph_message_id)
        if t0 is None:
            problems.append(f"stored a DM the benchmark did not send: {row.graph_message_id}")
            continue
        to_stored.append(row.received_at.timestamp() - t0)
        t1 = reply_time.get(row.reply_graph_message_id or "")
        if t1 is None:
            continue
        matched.add(row.reply_graph_message_id)
        latencies.append(t1 - t0)
        stored_to_reply.append(t1 - row.received_at.timestamp())
    statuses = Counter(str(row.status) for row in rows)
    per_recipient = Counter(r["recipient_id"] for r in replies)
    extra = {s: per_recipient[s] - n for s, n in from_sender.items() if per_recipient[s] > n}
    unknown = set(per_recipient) - set(from_sender)
    if len(replies) != dms:
        problems.append(f"{len(replies)} replies for {dms} DMs")
    if len(rows) != dms:
        problems.append(f"{len(rows)} DMs stored for {dms} sent")
    if len(latencies) != dms:
        problems.append(f"{dms - len(latencies)} DMs without a recorded reply (statuses: {dict(statuses)})")
    if len(replies) != len(matched):
        problems.append(f"{len(replies) - len(matched)} replies delivered that no stored DM records (duplicates?)")
    if extra:
        problems.append(f"senders answered more often than they wrote: {dict(list(extra.items())[:5])}")
    if unknown:
        problems.append(f"replies to unknown recipients: {sorted(unknown)[:5]}")
    return dict(dms=dms, senders=len(senders), latencies=latencies, to_stored=to_stored,
                stored_to_reply=stored_to_reply, replies=len(replies), problems=problems,
                drain=drain, statuses=statuses)


def make_rows(iq: Any, fake: FakeGraph, account: Any, count: int, first_sender: int) -> list[int]:
    """``count`` received DMs (one per sender, known to the fake so the Send API accepts)."""
    values = []
    now = iq.utcnow()
    for i in range(count):
        sender = str(first_sender + i)
        graph_id = fake.add_dm(account.ig_user_id, sender, f"price of item {i}?", sender_username=f"p{sender}")
        values.append(dict(
            account_id=account.id, graph_message_id=graph_id,
            conversation_id=fake.conversation_id(account.ig_user_id, sender), sender_id=sender,
            sender_username=f"p{sender}", text=f"price of item {i}?", created_time=now, received_at=now,
            status=iq.MessageStatus.received, attempts=0, next_attempt_at=now))
    with iq.session() as db:
        ids = db.execute(iq.sa.insert(iq.InboundMessage.__table__).returning(iq.InboundMessage.id), values)
        result = [row[0] for row in ids]
        db.commit()
    return result


def run_batch(send: Callable[[int], Any], count: int, timeout: float = 600) -> tuple[float, int]:
    """Enqueue ``count`` tasks, then ``.get()`` every result; seconds from the first enqueue to
    the last result, and how many results were not what the task should return."""
    start = time.perf_counter()
    results = [send(i) for i in range(count)]
    deadline = time.monotonic() + timeout
    for result in results:
        result.get(timeout=max(1.0, deadline - time.monotonic()), propagate=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(1 for r in results if not r.successful())


def throughput_phase(iq: Any, fake: FakeGraph, account: Any, tasks: int) -> dict[str, Any]:
    rows = make_rows(iq, fake, account, WARMUP_TASKS + tasks, first_sender=7_000_000)
    warm, measured = rows[:WARMUP_TASKS], rows[WARMUP_TASKS:]

    def process(i: int, ids: list[int]) -> Any:
        return iq.process_instagram_message.delay(ids[i])

    # Warm-up: every pool process opens its database, Redis and Graph connections.
    run_batch(lambda i: iq.noop.delay(i), WARMUP_TASKS)
    run_batch(lambda i: process(i, warm), WARMUP_TASKS)

    noop_s, noop_bad = run_batch(lambda i: iq.noop.delay(i), tasks)
    sent_before = len(fake.sent_messages(account.ig_user_id))
    proc_s, proc_bad = run_batch(lambda i: process(i, measured), tasks)
    with iq.session() as db:
        statuses = Counter(str(s) for s in db.exec(
            iq.select(iq.InboundMessage.status).where(iq.InboundMessage.id.in_(measured))).all())
    sent = len(fake.sent_messages(account.ig_user_id)) - sent_before
    problems = []
    if statuses.get("replied", 0) != tasks:
        problems.append(f"process_instagram_message rows: {dict(statuses)} (expected {tasks} replied)")
    if sent != tasks:
        problems.append(f"process_instagram_message sent {sent} replies for {tasks} rows")
    if noop_bad or proc_bad:
        problems.append(f"failed tasks: noop {noop_bad}, process_instagram_message {proc_bad}")
    return dict(tasks=tasks, noop_s=noop_s, proc_s=proc_s, problems=problems)


# Main ########################################################################################

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dms", type=int, default=None, help="DMs in the latency phase (200)")
    parser.add_argument("--tasks", type=int, default=None, help="tasks of each kind in the throughput phase (1000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 DMs, 200 tasks")
    parser.add_argument("--poll-interval", type=float, default=None,
                        help="set INSTAQUEUE_DM_POLL_INTERVAL (default: instaqueue's own, 0.5 s)")
    parser.add_argument("--seed", type=int, default=1, help="seed for DM spacing and senders")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) even on success")
    args = parser.parse_args(argv)
    args.dms = args.dms if args.dms is not None else (40 if args.quick else 200)
    args.tasks = args.tasks if args.tasks is not None else (200 if args.quick else 1000)
    if args.dms < 1 or args.tasks < 1:
        parser.error("--dms and --tasks must be at least 1")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C and TERM both unwind through the finally below, which stops everything.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background (SIGINT ignored)
    base = Path(tempfile.mkdtemp(prefix="instaqueue-bench-"))
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

        # Settings are read when instaqueue is imported: the environment first, and nothing
        # inherited (a stray INSTAQUEUE_* would change what is measured).
        for name in [n for n in os.environ if n.startswith("INSTAQUEUE_") and not n.startswith("INSTAQUEUE_TEST_")]:
            del os.environ[name]
        os.environ.update({
            "INSTAQUEUE_REDIS_URL": redis_service.url,
            "INSTAQUEUE_DATABASE_URL": pg_service.url,
            "INSTAQUEUE_GRAPH_API_URL": fake.url,
            "INSTAQUEUE_DATA_DIR": str(base / "data"),
            "INSTAQUEUE_WORKER_CONCURRENCY": str(CONCURRENCY),
        })
        if args.poll_interval is not None:
            os.environ["INSTAQUEUE_DM_POLL_INTERVAL"] = str(args.poll_interval)
        import celery
        import instaqueue as iq
        import redis

        iq.create_tables()
        redis.Redis.from_url(redis_service.url).flushdb()
        latency_account = add_account(iq, fake, *LATENCY_ACCOUNT)
        throughput_account = add_account(iq, fake, *THROUGHPUT_ACCOUNT)

        s = iq.settings
        now = datetime.now().astimezone()
        print(f"instaqueue DM pipeline benchmark   {now:%Y-%m-%d %H:%M:%S %Z}")
        print(f"  machine   {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
              f"Python {platform.python_version()}, Celery {celery.__version__}")
        print(f"  services  Redis ({redis_service.how}) broker+results, PostgreSQL ({pg_service.how}), "
              f"fake Graph API in the benchmark process")
        print(f"  settings  dm_poll_interval {s.dm_poll_interval:g} s, worker_concurrency "
              f"{s.worker_concurrency} (prefork), prefetch {iq.app.conf.worker_prefetch_multiplier}, "
              f"graph_timeout {s.graph_timeout:g} s, one worker + one beat")
        print(f"  workload  {args.dms} DMs, one every 0.1-0.3 s from "
              f"{math.ceil(args.dms / DMS_PER_SENDER)} senders; {args.tasks} tasks of each kind "
              f"(+{WARMUP_TASKS} warm-up), beat stopped")
        print(f"  logs      {base}", flush=True)

        env = dict(os.environ)
        worker = Proc("worker", ["worker", "-n", "bench@%h", "--without-gossip", "--without-mingle"],
                      base / "worker.log", env, " ready.")
        procs.append(worker)
        worker.start()
        beat = Proc("beat", ["beat", "--schedule", str(base / "beat")], base / "beat.log", env, "beat: Starting")
        procs.append(beat)
        beat.start()

        lat = latency_phase(iq, fake, latency_account, args.dms, random.Random(args.seed))

        beat.stop()
        # Polls already sent expire after 2 poll intervals; let them and their tasks drain.
        time.sleep(max(2.0, 3 * s.dm_poll_interval))
        client = redis.Redis.from_url(redis_service.url)
        wait_until(lambda: sum(client.llen(q) for q in iq.QUEUES) == 0, timeout=30)

        thr = throughput_phase(iq, fake, throughput_account, args.tasks)

        proc_rate, noop_rate = thr["tasks"] / thr["proc_s"], thr["tasks"] / thr["noop_s"]
        label = f"DM latency ({lat['dms']} DMs, poll {s.dm_poll_interval:g} s):"
        label2 = f"throughput ({thr['tasks']} tasks, concurrency {s.worker_concurrency}):"
        width = max(len(label), len(label2))
        print()
        print(f"{label:<{width}}  {spread(lat['latencies'])}  replies {lat['replies']}/{lat['dms']}")
        print(f"{'  DM -> stored by the poll:':<{width}}  {spread(lat['to_stored'])}")
        print(f"{'  stored -> reply delivered:':<{width}}  {spread(lat['stored_to_reply'])}")
        print(f"{'  last reply after last DM:':<{width}}  {lat['drain']:5.2f} s")
        print(f"{label2:<{width}}  process_instagram_message {proc_rate:.0f}/s ({thr['proc_s']:.2f} s)  "
              f"noop {noop_rate:.0f}/s ({thr['noop_s']:.2f} s)  ratio {proc_rate / noop_rate:.2f}")
        problems = lat["problems"] + thr["problems"]
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
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
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
