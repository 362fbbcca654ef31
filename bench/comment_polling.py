"""Benchmark of instaqueue's comment polling and moderation: Graph calls per watched post, and
comments moderated per second.

Runs against real services, like ``bench/dm_pipeline.py`` (whose process handling and figures it
imports): Redis and PostgreSQL from ``tests/services.py`` (``INSTAQUEUE_TEST_REDIS_URL`` /
``INSTAQUEUE_TEST_DATABASE_URL`` if set, else throwaway ``redis-server`` / PostgreSQL from PATH),
the fake Graph API of ``tests/fake_graph.py`` in this process, and, for the second figure, a real
worker (concurrency 4) started as a ``python -m instaqueue worker`` subprocess. Settings are
instaqueue's defaults (``comment_poll_interval`` 300 s, ``comment_poll_max_interval`` 1800 s).

1. Graph calls per watched post per day, on a simulated clock (no real day goes by): a quiet
   post (~3 comments a day at random times) and a busy one (~2,000 a day, 70 % of them in three
   peak hours, a tenth of them replies) are watched for 24 simulated hours. ``instaqueue.utcnow``
   is replaced in this process by the simulated clock; before each poll the clock is set to the
   post's ``next_poll_at``, the comments that arrived since are added to the fake with their
   arrival time, and ``instaqueue.poll_post_comments`` runs in-process with the real Graph client.
   Each poll's Graph calls are counted from the fake's call log. The same day (same arrivals) is
   then run again with the interval pinned to 300 s (both bounds set to it): fixed 5-minute
   polling by the same code. Comments-seen latency is the simulated time from a comment's arrival
   to the poll that stored it (the row's ``received_at``). Polls after the 24 h are not counted
   as calls; the first of them stores what arrived at the end of the day. Beat's dispatch (every
   60 s) is not simulated: each poll runs exactly at ``next_poll_at``, so real latencies are up to
   a minute longer.
2. Moderation throughput: N comments (half of them breaking a ``block`` rule whose action is
   ``hide``) on one media; one in-process poll stores and judges them and sends ``moderate_comment``
   tasks; the worker's actions are timed from the first task sent to the last ``acted_at``, next to
   ``instaqueue.noop`` x the same count on the same worker (first enqueue to last result).

Figures are printed, never asserted; the failures are a poll interval outside the settings'
bounds, a poll whose bookkeeping or calls are not what it should be, a comment never stored, or
a flagged comment not hidden exactly once: each prints a loud line and exits 1.

Usage (from the repository root)::

    .venv/bin/python bench/comment_polling.py            # 2000 comments in the throughput phase
    .venv/bin/python bench/comment_polling.py --quick    # 300 comments: a smoke run
    .venv/bin/python bench/comment_polling.py --comments 10000 --busy-per-day 5000 --keep
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

# dm_pipeline puts tests/ and the repository root on sys.path; its Proc stops a process the way
# celery-notes.md asks (TERM to the main PID, then KILL the group).
from dm_pipeline import WARMUP_TASKS, Proc, percentile, run_batch, wait_until  # noqa: E402
from fake_graph import FakeGraph  # noqa: E402
from services import provide_postgres, provide_redis  # noqa: E402

CONCURRENCY = 4
DAY = 86_400.0
FIXED_INTERVAL = 300.0  #: the polling the adaptive interval is compared with
FIXED_PER_DAY = DAY / FIXED_INTERVAL  #: 288
SIM_ACCOUNT = ("17841400000000011", "quiet_and_busy", "TOKEN-bench-comment-sim")
MOD_ACCOUNT = ("17841400000000012", "moderated", "TOKEN-bench-comment-mod")
#: The busy post: this share of its comments falls in these peak hours (simulated UTC, one hour
#: each), front-loaded (a burst right after the hour starts); the rest anywhere in the day.
PEAK_HOURS, PEAK_SHARE = (12.0, 18.0, 20.5), 0.7
#: The busy post: this share of its comments are replies; of those, most go to one of the
#: RECENT_THREADS newest top-level comments, OLD_REPLY_SHARE to any earlier one.
REPLY_SHARE, RECENT_THREADS, OLD_REPLY_SHARE = 0.1, 20, 0.2
BLOCKED_WORD = "spam"
WARMUP_COMMENTS = 40


# Workload ####################################################################################

@dataclass
class Arrival:
    at: float  #: seconds after the start of the simulated day (whole seconds: Graph's precision)
    parent: int | None = None  #: index of the top-level arrival this one replies to
    graph_id: str | None = None  #: set when added to the fake


def quiet_arrivals(count: int, rng: random.Random) -> list[Arrival]:
    return [Arrival(float(t)) for t in sorted(rng.randrange(int(DAY)) for _ in range(count))]


def busy_arrivals(count: int, rng: random.Random) -> list[Arrival]:
    times = []
    for _ in range(count):
        if rng.random() < PEAK_SHARE:
            t = rng.choice(PEAK_HOURS) * 3600 + rng.triangular(0, 3600, 600)
        else:
            t = rng.uniform(0, DAY)
        times.append(float(min(int(t), int(DAY) - 1)))
    arrivals: list[Arrival] = []
    top_level: list[int] = []
    for t in sorted(times):
        if top_level and rng.random() < REPLY_SHARE:
            pool = top_level if rng.random() < OLD_REPLY_SHARE else top_level[-RECENT_THREADS:]
            arrivals.append(Arrival(t, parent=rng.choice(pool)))
        else:
            top_level.append(len(arrivals))
            arrivals.append(Arrival(t))
    return arrivals


# The simulated day ###########################################################################

@dataclass
class Poll:
    at: float  #: simulated seconds since the start of the day
    calls: int
    found: int
    interval: float
    first_call: int  #: index into the fake's call log
    wall: float  #: real seconds the poll took


@dataclass
class Watched:
    label: str
    mode: str
    media_id: str
    post_id: int
    arrivals: list[Arrival]
    start: datetime
    added: int = 0
    polls: list[Poll] = field(default_factory=list)
    drained: bool = False  #: polled once after the day (what arrived at its end is stored)


def calls_so_far(fake: FakeGraph) -> int:
    """How many requests the fake has recorded: ``len(fake.calls)`` without its deep copy of
    every call and response (one copy per poll made a simulated day quadratic). The calls
    themselves are read with ``fake.calls`` once per run and checked poll by poll."""
    recorded = getattr(fake, "_calls", None)
    if recorded is None:
        return len(fake.calls)
    with fake._lock:
        return len(recorded)


def watch(iq: Any, account: Any, media_id: str, at: datetime) -> int:
    """A watched post as ``monitor add`` makes one: the lower bound as interval, due at ``at``."""
    with iq.session() as db:
        row = iq.MonitoredPost(account_id=account.id, media_id=media_id, active=True,
                               poll_interval=iq.settings.comment_poll_interval, next_poll_at=at,
                               created_at=at)
        db.add(row)
        db.commit()
        return row.id


def simulate_day(iq: Any, fake: FakeGraph, account: Any, mode: str, patterns: list[tuple[str, list[Arrival]]],
                 start: datetime, problems: list[str]) -> list[Watched]:
    """Watch one new media per pattern for a simulated day starting at ``start`` (instaqueue's
    clock replaced for the duration); return what each poll did."""
    now = [start]
    original_utcnow = iq.utcnow
    s = iq.settings
    bounds = (s.comment_poll_interval, s.comment_poll_max_interval)
    low, high = (FIXED_INTERVAL, FIXED_INTERVAL) if mode == "fixed" else bounds
    watched: list[Watched] = []
    iq.utcnow = lambda: now[0]
    s.comment_poll_interval, s.comment_poll_max_interval = low, high
    try:
        for label, arrivals in patterns:
            arrivals = [Arrival(a.at, a.parent) for a in arrivals]  # graph ids are per run
            media_id = fake.add_media(account.ig_user_id, caption=f"{label} post ({mode})", timestamp=start)
            watched.append(Watched(label, mode, media_id, watch(iq, account, media_id, start), arrivals, start))
        ids = [w.post_id for w in watched]
        end = start + timedelta(seconds=DAY)
        while not all(w.drained for w in watched):
            with iq.session() as db:
                due = dict(db.exec(iq.select(iq.MonitoredPost.id, iq.MonitoredPost.next_poll_at).where(
                    iq.MonitoredPost.id.in_(ids))).all())
            w = min((w for w in watched if not w.drained), key=lambda w: due[w.post_id])
            at = due[w.post_id]
            now[0] = at
            for other in watched:  # every post's comments that have arrived by now
                while other.added < len(other.arrivals) and start + timedelta(seconds=other.arrivals[other.added].at) <= at:
                    a = other.arrivals[other.added]
                    parent = other.arrivals[a.parent].graph_id if a.parent is not None else None
                    a.graph_id = fake.add_comment(other.media_id, f"comment {other.added} on the {other.label} post",
                                                  username=f"fan{other.added % 997}", parent_id=parent,
                                                  timestamp=start + timedelta(seconds=a.at))
                    other.added += 1
            before = calls_so_far(fake)
            t0 = time.perf_counter()
            found = iq.poll_post_comments(w.post_id)
            wall = time.perf_counter() - t0
            after = calls_so_far(fake)
            with iq.session() as db:
                row = db.get(iq.MonitoredPost, w.post_id)
            sim = (at - start).total_seconds()
            where = f"{w.label} post ({mode}), poll at +{sim:.0f} s"
            if not low <= row.poll_interval <= high:
                problems.append(f"{where}: poll_interval {row.poll_interval:g} s outside [{low:g}, {high:g}]")
            if row.last_polled_at != at:
                problems.append(f"{where}: last_polled_at {row.last_polled_at} is not the poll's time {at}")
            if abs((row.next_poll_at - row.last_polled_at).total_seconds() - row.poll_interval) > 0.01:
                problems.append(f"{where}: next_poll_at - last_polled_at "
                                f"{(row.next_poll_at - row.last_polled_at).total_seconds():g} s != poll_interval "
                                f"{row.poll_interval:g} s")
            if row.next_poll_at <= at:
                problems.append(f"{where}: next_poll_at {row.next_poll_at} does not move forward")
                w.drained = True  # would loop for ever
            if not row.active:
                problems.append(f"{where}: the post stopped being watched")
                w.drained = True
            w.polls.append(Poll(sim, after - before, found, row.poll_interval, before, wall))
            if at >= end:
                w.drained = True
    finally:
        iq.utcnow = original_utcnow
        s.comment_poll_interval, s.comment_poll_max_interval = bounds

    calls = fake.calls  # one copy for the whole run
    for w in watched:
        for p in w.polls:
            for c in calls[p.first_call:p.first_call + p.calls]:
                if c.token != account.access_token or not c.path.startswith(f"/{w.media_id}") or c.method != "GET" \
                        or c.status != 200:
                    problems.append(f"{w.label} post ({mode}), poll at +{p.at:.0f} s: unexpected call "
                                    f"{c.method} {c.path} -> {c.status}")
    return watched


def day_figures(iq: Any, w: Watched) -> dict[str, Any]:
    """Counted: the polls in the day. Latency: arrival (the comment's Graph timestamp, set to its
    simulated arrival) to ``received_at`` (instaqueue's simulated clock when the poll stored it)."""
    in_day = [p for p in w.polls if p.at < DAY]
    with iq.session() as db:
        rows = db.exec(iq.select(iq.Comment.graph_comment_id, iq.Comment.received_at, iq.Comment.created_time).where(
            iq.Comment.monitored_post_id == w.post_id)).all()
    stored = {gid: (received, created) for gid, received, created in rows}
    latencies, missed, missed_replies, wrong_time = [], 0, 0, 0
    for a in w.arrivals:
        if a.graph_id not in stored:
            missed += 1
            missed_replies += a.parent is not None
            continue
        received, created = stored[a.graph_id]
        arrived = w.start + timedelta(seconds=a.at)
        wrong_time += created != arrived
        latencies.append((received - arrived).total_seconds())
    gaps = [b.at - a.at for a, b in zip(in_day, in_day[1:])]
    return dict(polls=len(in_day), calls=sum(p.calls for p in in_day), latencies=latencies, missed=missed,
                missed_replies=missed_replies, wrong_time=wrong_time, stored=len(rows), arrivals=len(w.arrivals),
                gaps=gaps, intervals=[p.interval for p in in_day],
                extra_pages=sum(1 for p in in_day if p.calls > 1 + (p is w.polls[0])),
                wall=[p.wall for p in w.polls], unknown=len(set(stored) - {a.graph_id for a in w.arrivals}))


# Moderation throughput #######################################################################

def add_account(iq: Any, fake: FakeGraph, ig_user_id: str, username: str, token: str) -> Any:
    with iq.session() as db:
        account = iq.Account(ig_user_id=ig_user_id, username=username, access_token=token)
        db.add(account)
        db.commit()
    fake.add_account(ig_user_id, username, token)
    return account


def seed_post(iq: Any, fake: FakeGraph, account: Any, count: int, tag: str) -> tuple[str, int, list[str]]:
    """A media with ``count`` comments, the even-numbered ones breaking the block rule."""
    media_id = fake.add_media(account.ig_user_id, caption=tag)
    ids = fake.add_comments(media_id, count, username="commenter", text_fn=lambda i: (
        f"buy cheap {BLOCKED_WORD.upper()} followers {i}" if i % 2 == 0 else f"love this look {i}"))
    return media_id, watch(iq, account, media_id, iq.utcnow()), ids


def statuses(iq: Any, post_id: int) -> Counter[str]:
    with iq.session() as db:
        return Counter({str(k): n for k, n in db.exec(
            iq.select(iq.Comment.action_status, iq.sa.func.count()).where(
                iq.Comment.monitored_post_id == post_id, iq.Comment.action != "none").group_by(
                iq.Comment.action_status)).all()})


def wait_for_actions(iq: Any, post_id: int, flagged: int, timeout: float) -> Counter[str]:
    def finished() -> Counter[str] | None:
        counts = statuses(iq, post_id)
        return counts if sum(counts[k] for k in ("done", "failed", "gone")) >= flagged else None
    return wait_until(finished, timeout=timeout, interval=0.02) or statuses(iq, post_id)


def timed_poll(iq: Any, post_id: int) -> tuple[int, float, float, float]:
    """``poll_post_comments`` in-process: stored count, total seconds, seconds reading, storing
    and judging (``read_new_comments``), and the ``time.time()`` when it returned (the first
    ``moderate_comment`` is sent right after)."""
    original = iq.read_new_comments
    marks: dict[str, float] = {}

    def timed(*args: Any, **kwargs: Any) -> Any:
        marks["start"] = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            marks["end"], marks["end_wall"] = time.perf_counter(), time.time()

    iq.read_new_comments = timed
    try:
        t0 = time.perf_counter()
        stored = iq.poll_post_comments(post_id)
        total = time.perf_counter() - t0
    finally:
        iq.read_new_comments = original
    return stored, total, marks["end"] - marks["start"], marks["end_wall"]


def moderation_phase(iq: Any, fake: FakeGraph, account: Any, comments: int) -> dict[str, Any]:
    problems: list[str] = []
    # Warm-up: every pool process opens its database, Redis and Graph connections.
    run_batch(lambda i: iq.noop.delay(i), WARMUP_TASKS)
    _, warm_post, _ = seed_post(iq, fake, account, WARMUP_COMMENTS, "warm-up")
    iq.poll_post_comments(warm_post)
    wait_for_actions(iq, warm_post, WARMUP_COMMENTS // 2, timeout=60)

    media_id, post_id, ids = seed_post(iq, fake, account, comments, "measured")
    flagged_ids = ids[0::2]
    pages_before = len(fake.calls_matching("GET", f"/{media_id}/comments"))
    stored, poll_s, read_s, first_send = timed_poll(iq, post_id)
    pages = len(fake.calls_matching("GET", f"/{media_id}/comments")) - pages_before
    counts = wait_for_actions(iq, post_id, len(flagged_ids), timeout=max(120.0, len(flagged_ids) / 5))
    seen_done = time.time()
    with iq.session() as db:
        acted = db.exec(iq.select(iq.sa.func.max(iq.Comment.acted_at)).where(
            iq.Comment.monitored_post_id == post_id)).one()
        actions = Counter(str(a) for a in db.exec(iq.select(iq.Comment.action).where(
            iq.Comment.monitored_post_id == post_id)).all())
    last_act = acted.timestamp() if acted else seen_done
    act_s = last_act - first_send

    noop_s, noop_bad = run_batch(lambda i: iq.noop.delay(i), len(flagged_ids))

    hides = [c for c in fake.calls_matching("POST") if c.token == account.access_token
             and c.path.lstrip("/") in set(flagged_ids)]
    per_comment = Counter(c.path.lstrip("/") for c in hides)
    hidden = sum(fake.comment(i)["hidden"] for i in ids)
    if stored != comments:
        problems.append(f"the poll stored {stored} of {comments} comments")
    if actions.get("hide", 0) != len(flagged_ids):
        problems.append(f"decisions {dict(actions)} (expected {len(flagged_ids)} hide)")
    if counts.get("done", 0) != len(flagged_ids):
        problems.append(f"action statuses {dict(counts)} (expected {len(flagged_ids)} done)")
    if hidden != len(flagged_ids) or not all(fake.comment(i)["hidden"] for i in flagged_ids):
        problems.append(f"{hidden} comments hidden in the fake for {len(flagged_ids)} flagged")
    if len(hides) != len(flagged_ids) or any(n > 1 for n in per_comment.values()):
        problems.append(f"{len(hides)} hide calls for {len(flagged_ids)} flagged comments "
                        f"({sum(1 for n in per_comment.values() if n > 1)} hidden more than once)")
    if noop_bad:
        problems.append(f"{noop_bad} noop tasks failed")
    return dict(comments=comments, flagged=len(flagged_ids), stored=stored, poll_s=poll_s, read_s=read_s,
                pages=pages, act_s=act_s, noop_s=noop_s, counts=counts, problems=problems,
                wait_lag=seen_done - last_act)


# Output ######################################################################################

def secs(value: float) -> str:
    return f"{value:,.0f} s" if value == value else "n/a"


def day_row(label: str, f: dict[str, Any]) -> list[str]:
    lat = f["latencies"]
    gaps = f["gaps"]
    return [label, f"{f['polls']}", f"{f['calls']}", f"{f['calls'] / FIXED_PER_DAY:.2f}x",
            secs(sum(gaps) / len(gaps)) if gaps else "n/a",
            f"{min(gaps):.0f}-{max(gaps):.0f} s" if gaps else "n/a",
            secs(sum(lat) / len(lat)) if lat else "n/a", secs(percentile(lat, 95)) if lat else "n/a",
            secs(max(lat)) if lat else "n/a", f"{f['stored']}/{f['arrivals']}"]


def print_table(header: list[str], rows: list[list[str]], indent: str = "  ") -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print(indent + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


# Main ########################################################################################

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comments", type=int, default=None, help="comments in the moderation phase (2000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 comments in the moderation phase")
    parser.add_argument("--quiet-per-day", type=int, default=3, help="comments a day on the quiet post (3)")
    parser.add_argument("--busy-per-day", type=int, default=2000, help="comments a day on the busy post (2000)")
    parser.add_argument("--seed", type=int, default=1, help="seed for the arrival times")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) even on success")
    args = parser.parse_args(argv)
    args.comments = args.comments if args.comments is not None else (300 if args.quick else 2000)
    if args.comments < 2 or args.quiet_per_day < 0 or args.busy_per_day < 1:
        parser.error("--comments must be at least 2, --busy-per-day at least 1, --quiet-per-day 0 or more")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C and TERM both unwind through the finally below, which stops everything.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background (SIGINT ignored)
    base = Path(tempfile.mkdtemp(prefix="instaqueue-bench-comments-"))
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
        import celery
        import instaqueue as iq
        import redis

        iq.create_tables()
        client = redis.Redis.from_url(redis_service.url)
        client.flushdb()
        sim_account = add_account(iq, fake, *SIM_ACCOUNT)
        mod_account = add_account(iq, fake, *MOD_ACCOUNT)
        with iq.session() as db:
            db.add(iq.ModerationRule(account_id=mod_account.id, kind="block", pattern=BLOCKED_WORD, action="hide"))
            db.commit()

        rng = random.Random(args.seed)
        quiet = quiet_arrivals(args.quiet_per_day, rng)
        busy = busy_arrivals(args.busy_per_day, rng)
        quiet_label, busy_label = f"quiet ({args.quiet_per_day}/day)", f"busy ({args.busy_per_day}/day)"

        s = iq.settings
        now = datetime.now().astimezone()
        print(f"instaqueue comment polling benchmark   {now:%Y-%m-%d %H:%M:%S %Z}")
        print(f"  machine   {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
              f"Python {platform.python_version()}, Celery {celery.__version__}")
        print(f"  services  Redis ({redis_service.how}) broker+results+locks, PostgreSQL ({pg_service.how}), "
              f"fake Graph API in the benchmark process")
        print(f"  settings  comment_poll_interval {s.comment_poll_interval:g} s, comment_poll_max_interval "
              f"{s.comment_poll_max_interval:g} s, comment_watch_days {s.comment_watch_days:g}, dispatch every "
              f"{iq.COMMENT_DISPATCH_INTERVAL:g} s, {iq.COMMENTS_PAGE_SIZE} comments/page, at most "
              f"{iq.MAX_COMMENT_PAGES} pages/poll, poll lock {s.message_lease * 4:g} s, graph_timeout "
              f"{s.graph_timeout:g} s")
        print(f"            worker_concurrency {s.worker_concurrency} (prefork), prefetch "
              f"{iq.app.conf.worker_prefetch_multiplier}, one worker, no beat")
        replies = sum(a.parent is not None for a in busy)
        print(f"  workload  simulated day: quiet post {len(quiet)} comments at random times; busy post "
              f"{len(busy)} comments, {PEAK_SHARE:.0%} in peak hours "
              f"{', '.join(f'{int(h):02d}:{int(h % 1 * 60):02d}' for h in PEAK_HOURS)} UTC (1 h each), "
              f"{replies} of them replies ({OLD_REPLY_SHARE:.0%} to older threads); no moderation rules")
        print(f"            moderation: {args.comments} comments on one media, {args.comments - args.comments // 2} "
              f"breaking a block rule (hide), one in-process poll, actions on the worker "
              f"(+{WARMUP_COMMENTS} comments, {WARMUP_TASKS} noops warm-up)")
        print(f"  logs      {base}", flush=True)

        # 1. A simulated day, adaptive then pinned to 5 minutes (no worker: nothing is sent).
        problems: list[str] = []
        day_start = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        t0 = time.perf_counter()
        patterns = [(quiet_label, quiet), (busy_label, busy)]
        runs = simulate_day(iq, fake, sim_account, "adaptive", patterns, day_start, problems)
        runs += simulate_day(iq, fake, sim_account, "fixed", patterns, day_start, problems)
        sim_wall = time.perf_counter() - t0
        figures = {(w.label, w.mode): day_figures(iq, w) for w in runs}
        for (label, mode), f in figures.items():
            if f["missed"]:
                problems.append(f"{label} post ({mode}): {f['missed']} of {f['arrivals']} comments never stored "
                                f"({f['missed_replies']} of them replies)")
            if f["wrong_time"] or f["unknown"]:
                problems.append(f"{label} post ({mode}): {f['wrong_time']} comments stored with another time "
                                f"than they arrived, {f['unknown']} stored that never arrived")
            if any(x < 0 for x in f["latencies"]):
                problems.append(f"{label} post ({mode}): a comment stored before it arrived")
        client.flushdb()  # nothing should be queued; start the worker on an empty broker

        # 2. Moderation throughput on a real worker.
        env = dict(os.environ)
        worker = Proc("worker", ["worker", "-n", "bench@%h", "--without-gossip", "--without-mingle"],
                      base / "worker.log", env, " ready.")
        procs.append(worker)
        worker.start()
        mod = moderation_phase(iq, fake, mod_account, args.comments)
        problems += mod["problems"]

        print()
        print(f"Graph calls per watched post per day (simulated 24 h from 00:00 UTC, each poll at the post's "
              f"next_poll_at; {sim_wall:.1f} s of real time):")
        header = ["post / polling", "polls", "calls/day", "vs 288", "avg interval", "min-max",
                  "seen: mean", "p95", "max", "stored"]
        rows = []
        for label in (quiet_label, busy_label):
            for mode, name in (("adaptive", "adaptive"), ("fixed", "fixed 5 min")):
                rows.append(day_row(f"{label}, {name}", figures[(label, mode)]))
        rows.append(["fixed 5 min (arithmetic)", f"{FIXED_PER_DAY:.0f}", f"{FIXED_PER_DAY:.0f}", "1.00x", "300 s",
                     "300-300 s", "150 s", "285 s", "300 s", ""])
        print_table(header, rows)
        for label in (quiet_label, busy_label):
            f = figures[(label, "adaptive")]
            walls = f["wall"]
            print(f"  {label}, adaptive: {f['extra_pages']} polls read more than one page, "
                  f"poll run time p50 {percentile(walls, 50) * 1000:.0f} ms, max {max(walls) * 1000:.0f} ms")
        print()
        act_rate, noop_rate = mod["flagged"] / mod["act_s"], mod["flagged"] / mod["noop_s"]
        print(f"Moderation ({mod['comments']} comments, {mod['flagged']} breaking the block rule -> hide, "
              f"worker concurrency {s.worker_concurrency}):")
        label_w = 30
        print(f"  {'poll (in-process) decisions:':<{label_w}}{mod['stored'] / mod['poll_s']:8.0f}/s  "
              f"({mod['stored']} stored and judged in {mod['poll_s']:.2f} s; reading {mod['pages']} pages, "
              f"storing, judging {mod['read_s']:.2f} s = {mod['stored'] / mod['read_s']:.0f}/s; sending "
              f"{mod['flagged']} tasks and the rest {mod['poll_s'] - mod['read_s']:.2f} s)")
        print(f"  {'worker actions (hide):':<{label_w}}{act_rate:8.0f}/s  ({mod['flagged']} done in "
              f"{mod['act_s']:.2f} s, first task sent -> last acted_at; statuses {dict(mod['counts'])})")
        print(f"  {'noop baseline:':<{label_w}}{noop_rate:8.0f}/s  ({mod['flagged']} in {mod['noop_s']:.2f} s, "
              f"first enqueue -> last result)   ratio actions/noop {act_rate / noop_rate:.2f}")
        for problem in problems[:40]:
            print(f"!!! MISMATCH: {problem}")
        if len(problems) > 40:
            print(f"!!! ... and {len(problems) - 40} more")
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
