"""Benchmark of instaqueue's scheduled publishing: how close to its time each post goes out.

Runs against real services, like ``bench/dm_pipeline.py`` (whose process handling and figures it
imports): Redis and PostgreSQL from ``tests/services.py`` (``INSTAQUEUE_TEST_REDIS_URL`` /
``INSTAQUEUE_TEST_DATABASE_URL`` if set, else throwaway ``redis-server`` / PostgreSQL from PATH),
the fake Graph API of ``tests/fake_graph.py`` in this process, and a real worker (concurrency 4)
and one beat started as ``python -m instaqueue worker|beat`` subprocesses.

Settings are production defaults: INSTAQUEUE_SCHEDULED_CHECK_INTERVAL stays at its 60 s default
(it is NOT shortened as in the tests), and so do the DM poll (0.5 s), the publish grace and the
rest. N image posts are inserted straight into ``scheduled_post``, their times spread uniformly
at random over the next ~150 s (whole and fractional seconds, several sharing one second),
BEFORE beat starts: the check beat sends at start-up and the periodic checks after it both
queue posts. The posts are spread over several accounts so that none of them reaches the
publishing quota (50 posts per 24 h, in the fake as on Instagram).

Measured per post: the time ``media_publish`` created the media at the fake Graph API minus the
post's ``publish_at`` (signed seconds; the product promises ±60 s). Posts are matched to the
fake's media by their unique caption, and cross-checked with the media id stored on the row.
Figures are printed, never asserted; the only failure is a post published twice or not at all
(or a ``media_publish`` count other than the number of posts), which prints a loud line and
exits 1.

Usage (from the repository root)::

    .venv/bin/python bench/publish_accuracy.py             # 120 posts over ~150 s
    .venv/bin/python bench/publish_accuracy.py --quick     # 20 posts: a smoke run (same ~150 s)
    .venv/bin/python bench/publish_accuracy.py --posts 300 --keep
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
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

# dm_pipeline puts tests/ and the repository root on sys.path; its Proc stops a process the way
# celery-notes.md asks (TERM to the main PID, then KILL the group).
from dm_pipeline import ROOT, Proc, percentile, wait_until  # noqa: E402
from fake_graph import FakeGraph  # noqa: E402
from services import provide_postgres, provide_redis  # noqa: E402

CONCURRENCY = 4
#: Posts per account at most: the fake's (and Instagram's) quota is 50 API posts per 24 h.
POSTS_PER_ACCOUNT = 40
#: The scheduling window: posts are due from LEAD_S to LEAD_S + WINDOW_S after they are inserted.
LEAD_S, WINDOW_S = 5.0, 150.0
#: What the product promises: a post goes out within this many seconds of its time.
TOLERANCE_S = 60.0
#: After the last post was due: how long to wait for stragglers.
GRACE_S = 30.0
#: After everything was published: time for a duplicate to show up.
SETTLE_S = 3.0

#: Worker log lines (Celery's default format, local time).
_LOG_TIME = r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/[^\]]*\] "
CHECK_DONE = re.compile(_LOG_TIME + r"Task instaqueue\.check_scheduled_posts\[[^\]]+\] succeeded in ([0-9.e-]+)s: (\S+)", re.M)
PUBLISH_DONE = re.compile(_LOG_TIME + r"Task instaqueue\.publish_scheduled_post\[[^\]]+\] succeeded in ([0-9.e-]+)s: (.*)$", re.M)
PUBLISH_RETRY = re.compile(_LOG_TIME + r"Task instaqueue\.publish_scheduled_post\[[^\]]+\] retry: (.*)$", re.M)


# Workload ####################################################################################

def account_specs(count: int) -> list[tuple[str, str, str]]:
    return [(f"178414000000{k + 1:05d}", f"brand_{k + 1}", f"TOKEN-bench-publish-{k + 1}") for k in range(count)]


def add_accounts(iq: Any, fake: FakeGraph, specs: list[tuple[str, str, str]]) -> list[Any]:
    accounts = []
    with iq.session() as db:
        for ig_user_id, username, token in specs:
            account = iq.Account(ig_user_id=ig_user_id, username=username, access_token=token)
            db.add(account)
            db.commit()
            accounts.append(account)
            fake.add_account(ig_user_id, username, token)
    return accounts


def publish_times(count: int, start: datetime, rng: random.Random) -> list[datetime]:
    """``count`` times in [start, start + WINDOW_S]: a third on a whole second, a third sharing
    the second of an earlier post (at another fraction), the rest anywhere."""
    times: list[datetime] = []
    for i in range(count):
        at = start + timedelta(seconds=rng.uniform(0, WINDOW_S))
        if i % 3 == 0:
            at = at.replace(microsecond=0)
        elif i % 3 == 1 and times:
            at = rng.choice(times).replace(microsecond=rng.randrange(1_000_000))
        times.append(at)
    rng.shuffle(times)
    return times


def insert_posts(iq: Any, accounts: list[Any], times: list[datetime]) -> list[Any]:
    """One image post per time, round-robin over the accounts, caption ``bench post <i>``."""
    with iq.session() as db:
        posts = [iq.ScheduledPost(account_id=accounts[i % len(accounts)].id, kind="image",
                                  media=[{"type": "image", "url": f"https://cdn.example.com/p{i}.jpg"}],
                                  caption=f"bench post {i}", publish_at=at)
                 for i, at in enumerate(times)]
        db.add_all(posts)
        db.commit()
    return posts


# Figures #####################################################################################

def signed(values: list[float]) -> str:
    if not values:
        return "no data"
    return "  ".join(f"{name} {value:+8.3f} s" for name, value in (
        ("p50", percentile(values, 50)), ("p95", percentile(values, 95)),
        ("max", max(values)), ("min", min(values))))


def log_time(stamp: str) -> float:
    """A worker log timestamp (local time, milliseconds) as ``time.time()`` seconds."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def read_worker_log(text: str) -> dict[str, Any]:
    checks = [(log_time(m[1]), float(m[2]), m[3]) for m in CHECK_DONE.finditer(text)]
    runs = [(float(m[2]), m[3].strip().strip("'\"")) for m in PUBLISH_DONE.finditer(text)]
    retries = [m[2] for m in PUBLISH_RETRY.finditer(text)]
    return dict(checks=checks, run_seconds=[s for s, _ in runs], outcomes=Counter(o for _, o in runs),
                retries=retries)


def measure(iq: Any, fake: FakeGraph, accounts: list[Any], posts: list[Any]) -> dict[str, Any]:
    """Match the fake's media and calls to the posts; the figures and the problems."""
    by_caption = {p.caption: p for p in posts}
    media = [m for a in accounts for m in fake.published_media(a.ig_user_id)]
    publish_calls = fake.calls_matching("POST", "/media_publish")
    container_calls = [c for c in fake.calls_matching("POST", "/media") if not c.path.endswith("/media_publish")]
    with iq.session() as db:
        rows = {r.id: r for r in db.exec(iq.select(iq.ScheduledPost).where(
            iq.ScheduledPost.id.in_([p.id for p in posts]))).all()}

    def caption_of(call: Any) -> str | None:
        body = call.body if isinstance(call.body, dict) else {}
        return call.query.get("caption") or body.get("caption")

    container_at: dict[str, float] = {}  # caption -> time.time() of its (first) container call
    for call in container_calls:
        caption = caption_of(call)
        if caption in by_caption and call.status == 200:
            container_at.setdefault(caption, call.time)

    per_caption = Counter(m["caption"] for m in media)
    errors, to_container, container_to_media = [], [], []
    problems: list[str] = []
    wrong_id = 0
    for m in media:
        post = by_caption.get(m["caption"])
        if post is None:
            continue
        scheduled = post.publish_at.timestamp()
        published = m["time"].timestamp()
        errors.append(published - scheduled)
        if m["caption"] in container_at:
            to_container.append(container_at[m["caption"]] - scheduled)
            container_to_media.append(published - container_at[m["caption"]])
        row = rows.get(post.id)
        if row is not None and row.media_id is not None and row.media_id != m["media_id"]:
            wrong_id += 1
    missing = [c for c in by_caption if per_caption[c] == 0]
    twice = {c: n for c, n in per_caption.items() if c in by_caption and n > 1}
    unknown = [c for c in per_caption if c not in by_caption]
    statuses = Counter(str(r.status) for r in rows.values())
    ok_calls = sum(1 for c in publish_calls if c.status == 200)
    if missing:
        problems.append(f"{len(missing)} posts never published, e.g. {missing[:5]} (statuses: {dict(statuses)})")
    if twice:
        problems.append(f"{len(twice)} posts published more than once: {dict(list(twice.items())[:5])}")
    if unknown:
        problems.append(f"media published that no post has: {unknown[:5]}")
    if len(publish_calls) != len(posts):
        problems.append(f"{len(publish_calls)} media_publish calls for {len(posts)} posts "
                        f"({ok_calls} answered 200)")
    if statuses.get("published", 0) != len(posts):
        problems.append(f"post rows: {dict(statuses)} (expected {len(posts)} published)")
    if wrong_id:
        problems.append(f"{wrong_id} rows record a media id other than the one published with their caption")
    return dict(errors=errors, to_container=to_container, container_to_media=container_to_media,
                published=sum(per_caption[c] for c in by_caption), publish_calls=len(publish_calls),
                ok_calls=ok_calls, statuses=statuses, problems=problems)


# Main ########################################################################################

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posts", type=int, default=None, help="posts to schedule (120)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 posts")
    parser.add_argument("--seed", type=int, default=1, help="seed for the publish times")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) even on success")
    args = parser.parse_args(argv)
    args.posts = args.posts if args.posts is not None else (20 if args.quick else 120)
    if args.posts < 1:
        parser.error("--posts must be at least 1")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C and TERM both unwind through the finally below, which stops everything.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background (SIGINT ignored)
    base = Path(tempfile.mkdtemp(prefix="instaqueue-bench-publish-"))
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
        # inherited (a stray INSTAQUEUE_* would change what is measured). In particular the
        # scheduled-post check interval stays at its production default.
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
        specs = account_specs(math.ceil(args.posts / POSTS_PER_ACCOUNT))
        accounts = add_accounts(iq, fake, specs)

        s = iq.settings
        now = datetime.now().astimezone()
        print(f"instaqueue scheduled publishing benchmark   {now:%Y-%m-%d %H:%M:%S %Z}")
        print(f"  machine   {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
              f"Python {platform.python_version()}, Celery {celery.__version__}")
        print(f"  services  Redis ({redis_service.how}) broker+results, PostgreSQL ({pg_service.how}), "
              f"fake Graph API in the benchmark process")
        print(f"  settings  production defaults: scheduled_check_interval {s.scheduled_check_interval:g} s "
              f"(not changed), publish_grace {s.publish_grace:g} s, dm_poll_interval {s.dm_poll_interval:g} s, "
              f"worker_concurrency {s.worker_concurrency} (prefork), prefetch "
              f"{iq.app.conf.worker_prefetch_multiplier}, one worker + one beat")
        print(f"  logs      {base}", flush=True)

        env = dict(os.environ)
        worker = Proc("worker", ["worker", "-n", "bench@%h", "--without-gossip", "--without-mingle"],
                      base / "worker.log", env, " ready.")
        procs.append(worker)
        worker.start()

        # The posts go in before beat starts: its start-up check and the periodic ones queue them.
        inserted = time.time()
        start = datetime.fromtimestamp(inserted, timezone.utc) + timedelta(seconds=LEAD_S)
        times = publish_times(args.posts, start, random.Random(args.seed))
        posts = insert_posts(iq, accounts, times)
        shared = sum(n for n in Counter(t.replace(microsecond=0) for t in times).values() if n > 1)
        whole = sum(1 for t in times if t.microsecond == 0)
        print(f"  workload  {args.posts} image posts over {len(accounts)} account{'s' * (len(accounts) > 1)} (at most "
              f"{POSTS_PER_ACCOUNT} each: quota 50/24 h), due {LEAD_S:g}-{LEAD_S + WINDOW_S:g} s after "
              f"insertion, uniform; {whole} on a whole second, {shared} sharing a second with another; "
              f"inserted before beat starts", flush=True)

        beat = Proc("beat", ["beat", "--schedule", str(base / "beat")], base / "beat.log", env, "beat: Starting")
        procs.append(beat)
        beat.start()
        beat_ready = time.time()

        last_due = max(times).timestamp()
        wanted = {p.caption for p in posts}

        def all_published() -> bool:
            return wanted <= {m["caption"] for a in accounts for m in fake.published_media(a.ig_user_id)}

        done = wait_until(all_published, timeout=max(1.0, last_due + GRACE_S - time.time()), interval=0.2)
        finished = time.time()
        time.sleep(SETTLE_S)  # time for a duplicate to show up

        fig = measure(iq, fake, accounts, posts)
        logged = read_worker_log(worker.text())
        errors = fig["errors"]
        within = sum(1 for e in errors if abs(e) <= TOLERANCE_S)
        checks = "  ".join(f"+{t - inserted:.1f} s: {n}" for t, _, n in logged["checks"]) or "none logged"
        runs = logged["run_seconds"]

        label = f"publish time - scheduled ({len(errors)} posts):"
        width = max(len(label), 34)
        print()
        print(f"{label:<{width}}  {signed(errors)}   tolerance ±{TOLERANCE_S:g} s: "
              f"{within}/{args.posts} within")
        print(f"{'  scheduled -> container call:':<{width}}  {signed(fig['to_container'])}")
        print(f"{'  container call -> published:':<{width}}  {signed(fig['container_to_media'])}")
        if runs:
            print(f"{'  publish task run time:':<{width}}  p50 {percentile(runs, 50):.3f} s  "
                  f"p95 {percentile(runs, 95):.3f} s  max {max(runs):.3f} s  "
                  f"outcomes {dict(logged['outcomes'])}  retries {len(logged['retries'])}")
        print(f"{'checks (since insert: queued):':<{width}}  {checks}   beat ready +{beat_ready - inserted:.1f} s")
        print(f"{'counts:':<{width}}  posts {args.posts}  published {fig['published']}  "
              f"media_publish calls {fig['publish_calls']} ({fig['ok_calls']} answered 200)  "
              f"rows {dict(fig['statuses'])}")
        print(f"{'  last post published:':<{width}}  {'' if done else 'NOT ALL, gave up '}"
              f"{finished - last_due:+.1f} s after the last was due")
        for problem in fig["problems"]:
            print(f"!!! MISMATCH: {problem}")
        if fig["problems"]:
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
