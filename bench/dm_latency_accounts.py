"""Benchmark of instaqueue's DM latency as the number of polled accounts grows.

Runs against real services, like ``bench/dm_pipeline.py`` (whose process handling and figures it
imports): Redis and PostgreSQL from ``tests/services.py`` (``INSTAQUEUE_TEST_REDIS_URL`` /
``INSTAQUEUE_TEST_DATABASE_URL`` if set, else throwaway ``redis-server`` / PostgreSQL from PATH),
the fake Graph API of ``tests/fake_graph.py`` in this process, and a real worker (concurrency 4)
and one beat started as ``python -m instaqueue worker|beat`` subprocesses, with instaqueue's
default DM poll interval (0.5 s) unless ``--poll-interval`` says otherwise.

For each setting (1, 10 and 100 active accounts; ``--quick``: 1 and 10) a fresh worker and beat
are started on a flushed broker, with the accounts of earlier settings disabled and the fake
reset. About 200 DMs (``--quick``: 50) then arrive one every 0.1-0.3 s, dealt round-robin to the
accounts in a shuffled order so that every account receives DMs spread over the run (a few senders
per account, at most 5 DMs each). A DM's latency is from ``FakeGraph.add_dm`` returning to its
reply being delivered to the fake's Send API (matched through the stored row, as dm_pipeline does).

The load that polling puts on the system is shown by the fake's ``GET /<ig-id>/conversations``
calls per second while the DMs arrive (one call per poll task that ran; the expected rate is
accounts / poll interval), and by the worker log's count of poll tasks run and of poll tasks
discarded because they expired in the queue (``expires`` = 2 poll intervals).

Figures are printed, never asserted; the only failure is a wrong number of replies (missing or
duplicated), which prints a loud line and exits 1.

Usage (from the repository root)::

    .venv/bin/python bench/dm_latency_accounts.py            # 1, 10, 100 accounts, 200 DMs each
    .venv/bin/python bench/dm_latency_accounts.py --quick    # 1, 10 accounts, 50 DMs each
    .venv/bin/python bench/dm_latency_accounts.py --accounts 1,50,200 --dms 300 --keep
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import re
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
from dm_pipeline import (  # noqa: E402
    DMS_PER_SENDER, RULE_MATCH, RULE_REPLY, Proc, percentile, wait_until)
from fake_graph import FakeGraph  # noqa: E402
from services import provide_postgres, provide_redis  # noqa: E402

CONCURRENCY = 4
DRAIN_TIMEOUT = 120.0  #: seconds after the last DM to wait for the last reply
POLL_TASK = "instaqueue.poll_account_messages"


# Phases ######################################################################################

def add_accounts(iq: Any, fake: FakeGraph, setting: int, count: int) -> list[Any]:
    accounts = []
    with iq.session() as db:
        for i in range(count):
            ig_id = f"178414{setting:03d}{i:08d}"
            account = iq.Account(ig_user_id=ig_id, username=f"shop_{setting}_{i}", access_token=f"TOKEN-{ig_id}")
            db.add(account)
            accounts.append(account)
        db.commit()
        for account in accounts:
            db.add(iq.ReplyRule(account_id=account.id, match=RULE_MATCH, reply=RULE_REPLY))
        db.commit()
    for account in accounts:
        fake.add_account(account.ig_user_id, account.username, account.access_token)
    return accounts


def disable_all(iq: Any) -> None:
    with iq.session() as db:
        db.exec(iq.sa.update(iq.Account).values(state=iq.AccountState.disabled, state_reason="earlier bench setting"))
        db.commit()


def send_dms(fake: FakeGraph, accounts: list[Any], dms: int, rng: random.Random) -> dict[str, Any]:
    """``dms`` DMs, dealt round-robin to the accounts, in a shuffled order, 0.1-0.3 s apart."""
    per_account = Counter(accounts[i % len(accounts)].ig_user_id for i in range(dms))
    order: list[tuple[str, str]] = []
    for n, account in enumerate(accounts):
        count = per_account[account.ig_user_id]
        senders = [f"{9_200_000 + n * 100 + k}" for k in range(max(1, math.ceil(count / DMS_PER_SENDER)))]
        order += [(account.ig_user_id, senders[k % len(senders)]) for k in range(count)]
    rng.shuffle(order)
    sent_at: dict[str, float] = {}
    from_sender: Counter[tuple[str, str]] = Counter()
    next_at = time.monotonic()
    first = time.time()
    for i, (ig_id, sender) in enumerate(order):
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        graph_id = fake.add_dm(ig_id, sender, f"Hi! What's the price of item {i}?", sender_username=f"person{sender}")
        sent_at[graph_id] = time.time()
        from_sender[(ig_id, sender)] += 1
        next_at += rng.uniform(0.1, 0.3)
    return dict(sent_at=sent_at, from_sender=from_sender, first=first, last=time.time())


def collect(iq: Any, fake: FakeGraph, accounts: list[Any], sent: dict[str, Any], dms: int) -> dict[str, Any]:
    replies = fake.sent_messages()
    reply_time = {r["message_id"]: r["time"].timestamp() for r in replies}
    ids = [a.id for a in accounts]
    with iq.session() as db:
        rows = db.exec(iq.select(iq.InboundMessage).where(iq.InboundMessage.account_id.in_(ids))).all()
    latencies, to_stored, stored_to_reply, problems = [], [], [], []
    matched: set[str] = set()
    for row in rows:
        t0 = sent["sent_at"].get(row.graph_message_id)
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
    per_recipient = Counter((r["account_ig_id"], r["recipient_id"]) for r in replies)
    extra = {k: per_recipient[k] - n for k, n in sent["from_sender"].items() if per_recipient[k] > n}
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
    return dict(latencies=latencies, to_stored=to_stored, stored_to_reply=stored_to_reply, replies=len(replies),
                problems=problems)


def poll_figures(fake: FakeGraph, worker_log: str, first: float, last: float) -> dict[str, Any]:
    calls = [c for c in fake.calls_matching("GET", "/conversations") if c.path.endswith("/conversations")]
    window = [c for c in calls if first <= c.time <= last]
    # Fairness: polls of each account while the DMs arrived, and its longest gap between polls.
    per_account: dict[str, list[float]] = {}
    for c in window:
        per_account.setdefault(c.path.strip("/").split("/")[0], []).append(c.time)
    gaps = []
    for times in per_account.values():
        marks = [first, *sorted(times), last]
        gaps.append(max(b - a for a, b in zip(marks, marks[1:])))
    run_times = [float(m) for m in re.findall(
        rf"Task {re.escape(POLL_TASK)}\[[^\]]+\] succeeded in ([0-9.]+)s", worker_log)]
    return dict(
        conv_per_s=len(window) / max(last - first, 1e-9), conv_total=len(calls),
        per_account=sorted(len(t) for t in per_account.values()), gaps=gaps,
        received=len(re.findall(rf"Task {re.escape(POLL_TASK)}\[[^\]]+\] received", worker_log)),
        succeeded=len(run_times), run_times=run_times,
        discarded=len(re.findall(rf"Discarding revoked task: {re.escape(POLL_TASK)}\[", worker_log)),
        dispatches=len(re.findall(r"Task instaqueue\.poll_instagram_messages\[[^\]]+\] succeeded", worker_log)),
        dispatches_discarded=len(re.findall(r"Discarding revoked task: instaqueue\.poll_instagram_messages\[",
                                            worker_log)),
        failed_polls=len(re.findall(r"DM poll of account \S+ failed", worker_log)))


def run_setting(iq: Any, fake: FakeGraph, client: Any, base: Path, env: dict[str, str], procs: list[Proc],
                setting: int, accounts_n: int, dms: int, rng: random.Random) -> dict[str, Any]:
    fake.reset()
    disable_all(iq)
    client.flushdb()
    accounts = add_accounts(iq, fake, setting, accounts_n)
    worker = Proc(f"worker-{accounts_n}", ["worker", "-n", f"bench{accounts_n}@%h", "--without-gossip",
                                             "--without-mingle"], base / f"worker-{accounts_n}.log", env, " ready.")
    beat = Proc(f"beat-{accounts_n}", ["beat", "--schedule", str(base / f"beat-{accounts_n}")],
                base / f"beat-{accounts_n}.log", env, "beat: Starting")
    procs += [worker, beat]
    try:
        worker.start()
        beat.start()
        # Warm: every account polled at least once (every pool process has its connections).
        wait_until(lambda: len({c.path for c in fake.calls_matching("GET", "/conversations")}) >= accounts_n,
                   timeout=30, interval=0.2)
        time.sleep(1.0)
        sent = send_dms(fake, accounts, dms, rng)
        try:
            fake.wait_for_sent(dms, timeout=DRAIN_TIMEOUT)
        except TimeoutError:
            pass
        drain = time.time() - sent["last"]
        time.sleep(3)  # six more polls: time for a duplicate to show up
        figures = collect(iq, fake, accounts, sent, dms)
        beat.stop()
        worker.stop()
        figures.update(poll_figures(fake, worker.text(), sent["first"], sent["last"]))
    finally:
        beat.stop()
        worker.stop()
    figures.update(accounts=accounts_n, dms=dms, drain=drain, duration=sent["last"] - sent["first"])
    return figures


# Main ########################################################################################

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", default=None, help="comma-separated account counts (1,10,100)")
    parser.add_argument("--dms", type=int, default=None, help="DMs per setting (200)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 and 10 accounts, 50 DMs each")
    parser.add_argument("--poll-interval", type=float, default=None,
                        help="set INSTAQUEUE_DM_POLL_INTERVAL (default: instaqueue's own, 0.5 s)")
    parser.add_argument("--seed", type=int, default=1, help="seed for DM spacing and order")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) even on success")
    args = parser.parse_args(argv)
    text = args.accounts or ("1,10" if args.quick else "1,10,100")
    try:
        args.accounts = [int(x) for x in text.split(",")]
    except ValueError:
        parser.error("--accounts: integers separated by commas")
    args.dms = args.dms if args.dms is not None else (50 if args.quick else 200)
    if args.dms < 1 or any(n < 1 for n in args.accounts):
        parser.error("--dms and every account count must be at least 1")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def ms(values: list[float], p: float) -> str:
    return f"{percentile(values, p):6.2f}" if values else "   n/a"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    base = Path(tempfile.mkdtemp(prefix="instaqueue-bench-accounts-"))
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
        if args.poll_interval is not None:
            os.environ["INSTAQUEUE_DM_POLL_INTERVAL"] = str(args.poll_interval)
        import celery
        import instaqueue as iq
        import redis

        iq.create_tables()
        client = redis.Redis.from_url(redis_service.url)
        s = iq.settings
        now = datetime.now().astimezone()
        print(f"instaqueue DM latency by account count   {now:%Y-%m-%d %H:%M:%S %Z}")
        print(f"  machine   {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
              f"Python {platform.python_version()}, Celery {celery.__version__}")
        print(f"  services  Redis ({redis_service.how}) broker+results+locks, PostgreSQL ({pg_service.how}), "
              f"fake Graph API in the benchmark process")
        print(f"  settings  dm_poll_interval {s.dm_poll_interval:g} s (poll tasks expire after "
              f"{iq.dm_poll_expiry():g} s), worker_concurrency {s.worker_concurrency} (prefork), prefetch "
              f"{iq.app.conf.worker_prefetch_multiplier}, one worker + one beat, fresh per setting")
        print(f"  workload  {args.dms} DMs per setting, one every 0.1-0.3 s, dealt to "
              f"{', '.join(str(n) for n in args.accounts)} accounts (at most {DMS_PER_SENDER} per sender)")
        print(f"  logs      {base}", flush=True)

        env = dict(os.environ)
        results = []
        for setting, accounts_n in enumerate(args.accounts):
            fig = run_setting(iq, fake, client, base, env, procs, setting, accounts_n, args.dms,
                              random.Random(args.seed + setting))
            results.append(fig)
            print(f"  ... {accounts_n} accounts: {fig['replies']}/{fig['dms']} replies, "
                  f"p95 {percentile(fig['latencies'], 95):.2f} s", flush=True)

        print()
        print(f"DM latency (s, DM arrival at the fake -> reply at the fake), poll every {s.dm_poll_interval:g} s, "
              f"concurrency {s.worker_concurrency}:")
        print(f"  {'accounts':>8}{'DMs':>6}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}"
              f"{'  to stored p50/p95':>20}{'  stored->reply p95':>20}{'  drain':>8}"
              f"{'  polls/s':>9}{'  expected':>10}{'  polls run':>11}{'  expired':>10}{'  poll p95':>10}")
        for f in results:
            lat = f["latencies"]
            dropped = f["discarded"] / f["received"] * 100 if f["received"] else 0.0
            run_p95 = percentile(f["run_times"], 95) * 1000 if f["run_times"] else math.nan
            print(f"  {f['accounts']:>8}{f['dms']:>6}{ms(lat, 50):>8}{ms(lat, 95):>8}{ms(lat, 99):>8}"
                  f"{(max(lat) if lat else math.nan):>8.2f}"
                  f"{ms(f['to_stored'], 50) + ' /' + ms(f['to_stored'], 95):>20}{ms(f['stored_to_reply'], 95):>20}"
                  f"{f['drain']:>8.2f}{f['conv_per_s']:>9.1f}{f['accounts'] / s.dm_poll_interval:>10.1f}"
                  f"{f['succeeded']:>11}{f['discarded']:>6} {dropped:2.0f}%{run_p95:>8.0f}ms")
        print("  polls/s: the fake's GET /<ig-id>/conversations calls per second while the DMs arrived "
              "(one per poll task run); expected = accounts / poll interval;")
        print("  polls run / expired: poll_account_messages tasks the worker ran / discarded as expired "
              "(whole setting, warm-up and drain included); poll p95: its run time from the worker log")
        print("  fairness while the DMs arrived (polls of one account; longest time one account went unpolled):")
        for f in results:
            counts, missing = f["per_account"], f["accounts"] - len(f["per_account"])
            print(f"    {f['accounts']:>4} accounts: polls per account min {min(counts, default=0)}"
                  f"{f' ({missing} accounts never polled)' if missing else ''}, p50 "
                  f"{percentile(counts, 50):.0f}, max {max(counts, default=0)} over {f['duration']:.1f} s; "
                  f"longest gap p50 {percentile(f['gaps'], 50):.2f} s, max {max(f['gaps'], default=math.nan):.2f} s")
        print("  beat's dispatcher (poll_instagram_messages, same queue): " + ", ".join(
            f"{f['accounts']} accounts {f['dispatches']} run / {f['dispatches_discarded']} expired"
            + (f", {f['failed_polls']} polls failed" if f["failed_polls"] else "") for f in results))
        if len(results) > 1:
            base_p95 = percentile(results[0]["latencies"], 95)
            print("  p95 vs 1st setting: " + ", ".join(
                f"{f['accounts']} accounts {percentile(f['latencies'], 95) / base_p95:.2f}x" for f in results))
        problems = [f"{f['accounts']} accounts: {p}" for f in results for p in f["problems"]]
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
