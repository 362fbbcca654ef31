"""Benchmark of instaqueue's daily analytics: wall time and peak memory of one day's run.

Runs against real services, like ``bench/dm_pipeline.py`` (whose figures and helpers it imports):
PostgreSQL and Redis from ``tests/services.py`` (``INSTAQUEUE_TEST_DATABASE_URL`` /
``INSTAQUEUE_TEST_REDIS_URL`` if set, else throwaway PostgreSQL / ``redis-server`` from PATH; the run
itself does not touch Redis, but instaqueue's settings want one) and the fake Graph API of
``tests/fake_graph.py``, which answers the insight calls (``GET /{ig-user-id}`` for the followers
and ``GET /{ig-user-id}/insights``: 2 calls per account) over loopback.

Workload (defaults; ``--quick`` = 100 accounts, 10,000 DMs, 10,000 comments): 1,000 accounts, each
known to the fake with followers and the four insight metrics; 100,000 DMs on one local day spread
over the accounts with a skew (some busy, most quiet; statuses replied / needs_human / failed, a
few still received / sending; ``replied_at`` a few seconds after ``created_time`` for replied);
100,000 comments on one ``MonitoredPost`` per account (mostly no action, some hidden / deleted /
replied / DM'd, in mixed action statuses); 0-3 ``ScheduledPost`` rows per account in mixed
statuses; and per account one DM and one comment just before the day and one exactly at the next
day's midnight, which must not be counted. Rows are bulk-loaded with SQLAlchemy Core
``insert(...)`` executemany (so the models' column defaults apply), then ``VACUUM ANALYZE``.

Measurements: ``instaqueue.generate_daily_analytics([DAY])`` called directly (no worker, no
broker), each time in a fresh child Python process (started through a small launcher process, see
``LAUNCHER``), so that the max RSS growth (``resource.getrusage``: ``ru_maxrss`` after the call
minus before it, the high-water mark first reset to the current RSS through
``/proc/self/clear_refs`` so the import's transient peak does not hide the call's) belongs to that
one call, and neither the bulk load nor the fake's server threads (which live in the parent) are
counted. The child imports instaqueue and opens its database connection before the clock starts;
``daily_analytics`` is emptied before every run, like the nightly run that inserts.

* full: every account active, 2 Graph calls each; the child also times ``build_day``,
  ``read_insights`` and ``save_analytics`` (thin wrappers around instaqueue's functions) and the
  SQL statements (SQLAlchemy cursor events), so the time splits into our grouped SQL, the Graph
  calls and the per-row saves.
* baseline: the same with every account parked (``needs_reauth``), so ``read_insights`` makes no
  Graph call and each row comes out incomplete; everything else is identical.

Each is run ``--repeat`` times (3) for the wall time and RSS, alternating, then once more each
with ``tracemalloc`` on for its peak (tracemalloc slows the code, so those runs are not timed).

Figures are printed, never asserted; the failures are rows that do not add up: the summed
``dms_received`` over all rows must equal the DMs inserted on the day, ``comments_seen`` the
comments, and every account's counters, latencies and insights must be what was loaded. Each
prints a loud MISMATCH line and exits 1.

Usage (from the repository root)::

    .venv/bin/python bench/analytics.py            # 1000 accounts, 100k DMs, 100k comments
    .venv/bin/python bench/analytics.py --quick    # 100 accounts, 10k DMs, 10k comments
    .venv/bin/python bench/analytics.py --accounts 5000 --dms 500000 --comments 500000 --repeat 1
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Iterator

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

# dm_pipeline puts tests/ and the repository root on sys.path.
from dm_pipeline import ROOT, percentile  # noqa: E402
from fake_graph import FakeGraph  # noqa: E402
from services import provide_postgres, provide_redis  # noqa: E402

FIRST_IG_ID = 17841400000100000
#: Rows per executemany (SQLAlchemy sends them in batches of 1000 VALUES tuples).
LOAD_CHUNK = 10_000
#: DM statuses and their shares; replied rows get a replied_at.
DM_STATUSES = {"replied": 74, "needs_human": 16, "failed": 6, "received": 2, "sending": 2}
#: (action, action_status) pairs of comments and their shares.
COMMENT_KINDS = {("none", "none"): 70, ("hide", "done"): 10, ("hide", "failed"): 1, ("hide", "pending"): 0.5,
                 ("delete", "done"): 4, ("delete", "gone"): 0.5, ("reply", "done"): 4, ("reply", "failed"): 0.5,
                 ("reply", "acting"): 0.5, ("dm", "done"): 2, ("dm", "failed"): 0.5}
POST_STATUSES = {"published": 60, "failed": 10, "unconfirmed": 5, "scheduled": 15, "cancelled": 10}
COUNTERS = ("dms_received", "dms_auto_answered", "dms_for_human", "dms_failed", "comments_seen",
            "comments_hidden", "comments_deleted", "comments_replied", "posts_published", "posts_failed",
            "posts_unconfirmed")
INSIGHTS = ("followers", "reach", "views", "profile_views", "accounts_engaged")
#: A child run that fails (instaqueue.py briefly broken by a concurrent edit) is tried again.
CHILD_ATTEMPTS = 5
RETRY_PAUSE = 5.0
MODES = {"full": "full (2 Graph calls/account)", "baseline": "baseline (accounts parked, no Graph)"}


# instaqueue, possibly mid-edit ###############################################################

def import_instaqueue(timeout: float = 120) -> Any:
    """``import instaqueue``, waiting while the file does not import (someone is editing it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            import instaqueue
            return instaqueue
        except Exception as exc:  # SyntaxError, NameError, ... from a half-saved file
            sys.modules.pop("instaqueue", None)
            if time.monotonic() > deadline:
                raise
            print(f"bench: instaqueue.py does not import ({type(exc).__name__}: {exc}); retrying in 3 s",
                  file=sys.stderr, flush=True)
            time.sleep(3)


def source_hash(iq: Any) -> str:
    return hashlib.sha256(Path(iq.__file__).read_bytes()).hexdigest()[:12]


# Child: one measured call ####################################################################

def max_rss_bytes() -> int:
    """The process's max RSS so far (Linux reports KiB, macOS bytes)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def reset_max_rss() -> bool:
    """Lower the process's RSS high-water mark to its current RSS (Linux >= 4.0: ``5`` to
    ``/proc/self/clear_refs``), so the ``ru_maxrss`` after a call is that call's peak rather than
    the import's. False where this is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child_main(mode: str, day: str, trace: bool) -> int:
    """Run ``generate_daily_analytics([day])`` once; print ``RESULT {json}`` on stdout."""
    import tracemalloc

    iq = import_instaqueue(timeout=60)
    digest = source_hash(iq)
    sa = iq.sa
    with iq.session() as db:  # open the pooled connection before the clock starts
        db.execute(sa.text("select 1"))

    timers: Counter[str] = Counter()
    calls: Counter[str] = Counter()

    def timed(name: str) -> None:
        original = getattr(iq, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timers[name] += time.perf_counter() - t0
                calls[name] += 1

        setattr(iq, name, wrapper)

    for name in ("build_day", "read_insights", "save_analytics"):
        timed(name)
    engine = iq.get_engine()
    started: list[float] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _before(*_: Any) -> None:
        started.append(time.perf_counter())

    @sa.event.listens_for(engine, "after_cursor_execute")
    def _after(*_: Any) -> None:
        timers["sql"] += time.perf_counter() - started.pop()
        calls["sql"] += 1

    gc.collect()
    rss_import = max_rss_bytes()
    rss_reset = reset_max_rss()
    rss_before = max_rss_bytes()
    if trace:
        tracemalloc.start()
        tracemalloc.reset_peak()
    t0 = time.perf_counter()
    result = iq.generate_daily_analytics([day])
    wall = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] if trace else None
    if trace:
        tracemalloc.stop()
    rss_after = max_rss_bytes()
    print("RESULT " + json.dumps(dict(
        mode=mode, trace=trace, wall=wall, result=result, timers=dict(timers), calls=dict(calls),
        rss_import=rss_import, rss_reset=rss_reset, rss_before=rss_before, rss_after=rss_after,
        tracemalloc_peak=peak, source=digest)), flush=True)
    return 0


# Workload ####################################################################################

def weighted(rng: random.Random, shares: dict[Any, float], k: int) -> list[Any]:
    return rng.choices(list(shares), weights=list(shares.values()), k=k)


def chunks(rows: Iterator[dict[str, Any]], size: int = LOAD_CHUNK) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def insert_rows(iq: Any, model: Any, rows: Iterator[dict[str, Any]]) -> int:
    """Core ``insert(...)`` executemany, one transaction per chunk; the number of rows."""
    table, count = model.__table__, 0
    for batch in chunks(rows):
        # executemany takes its columns from the first dict: every dict gets the same keys.
        keys = set().union(*batch)
        batch = [dict.fromkeys(keys) | row for row in batch]
        with iq.get_engine().begin() as conn:
            conn.execute(iq.sa.insert(table), batch)
        count += len(batch)
    return count


def empty_database(iq: Any) -> bool:
    with iq.session() as db:
        return not any(db.execute(iq.sa.select(iq.sa.literal(1)).select_from(m.__table__).limit(1)).first()
                       for m in (iq.Account, iq.InboundMessage, iq.Comment, iq.DailyAnalytics))


def load(iq: Any, fake: FakeGraph, args: argparse.Namespace, day: date, rng: random.Random) -> dict[str, Any]:
    """Accounts (in the database and the fake), DMs, comments and posts; what the rows must say."""
    start, end = iq.day_bounds(day, iq.settings.zone)
    span = (end - start).total_seconds()
    now = iq.utcnow()
    sa = iq.sa

    accounts = [dict(ig_user_id=str(FIRST_IG_ID + i), username=f"bench_shop_{i}",
                     access_token=f"TOKEN-bench-analytics-{i}", state="active", token_issued_at=now,
                     created_at=now - timedelta(days=90)) for i in range(args.accounts)]
    with iq.get_engine().begin() as conn:
        table = iq.Account.__table__
        ids = [row[0] for row in conn.execute(
            sa.insert(table).returning(table.c.id, sort_by_parameter_order=True), accounts)]
        mp = iq.MonitoredPost.__table__
        posts = [row[0] for row in conn.execute(
            sa.insert(mp).returning(mp.c.id, sort_by_parameter_order=True),
            [dict(account_id=a, media_id=f"1790{FIRST_IG_ID + i}", poll_interval=300.0, next_poll_at=now,
                  full_read_due_at=now, created_at=now) for i, a in enumerate(ids)])]
    expected: dict[int, dict[str, Any]] = {}
    for i, account_id in enumerate(ids):
        ig = accounts[i]["ig_user_id"]
        insight = dict(followers=rng.randint(100, 500_000), reach=rng.randint(0, 50_000),
                       views=rng.randint(0, 200_000), profile_views=rng.randint(0, 5_000),
                       accounts_engaged=rng.randint(0, 10_000))
        fake.add_account(ig, accounts[i]["username"], accounts[i]["access_token"])
        fake.set_profile(ig, followers_count=insight["followers"])
        fake.set_insights(ig, {k: v for k, v in insight.items() if k != "followers"})
        expected[account_id] = dict.fromkeys(COUNTERS, 0) | insight | {"latencies": []}

    # Skew: a log-normal weight per account (a few busy accounts, a long quiet tail).
    weights = [rng.lognormvariate(0, 1.2) for _ in ids]
    at = lambda: start + timedelta(seconds=rng.uniform(0, span))  # noqa: E731
    before, at_end = start - timedelta(microseconds=1), end

    def dms() -> Iterator[dict[str, Any]]:
        owners = rng.choices(range(len(ids)), weights=weights, k=args.dms)
        statuses = weighted(rng, DM_STATUSES, args.dms)
        for n, (i, status) in enumerate(zip(owners, statuses)):
            account_id, sender = ids[i], str(9_000_000 + rng.randrange(2_000))
            created = at()
            row = dict(account_id=account_id, graph_message_id=f"bench-m-{n}",
                       conversation_id=f"bench-c-{account_id}-{sender}", sender_id=sender,
                       sender_username=f"p{sender}", text=f"hello {n}", created_time=created,
                       received_at=created + timedelta(seconds=rng.uniform(0.3, 2.0)), status=status,
                       attempts=0, next_attempt_at=created)
            e = expected[account_id]
            e["dms_received"] += 1
            if status == "replied":
                latency = round(rng.lognormvariate(math.log(4), 0.8), 6)
                row.update(replied_at=created + timedelta(seconds=latency), reply_text="Thanks!",
                           reply_graph_message_id=f"bench-r-{n}")
                e["dms_auto_answered"] += 1
                e["latencies"].append(latency)
            elif status == "needs_human":
                e["dms_for_human"] += 1
            elif status == "failed":
                e["dms_failed"] += 1
                row.update(last_error="bench: (#10) not allowed", attempts=3)
            yield row
        for k, account_id in enumerate(ids):  # outside the day: must not count
            for m, when in enumerate((before, at_end)):
                yield dict(account_id=account_id, graph_message_id=f"bench-edge-{k}-{m}",
                           conversation_id=f"bench-c-{account_id}-edge", sender_id="9999999",
                           text="edge", created_time=when, received_at=when, status="replied",
                           replied_at=when + timedelta(seconds=1), attempts=0, next_attempt_at=when)

    def comments() -> Iterator[dict[str, Any]]:
        owners = rng.choices(range(len(ids)), weights=weights, k=args.comments)
        kinds = weighted(rng, COMMENT_KINDS, args.comments)
        for n, (i, (action, status)) in enumerate(zip(owners, kinds)):
            account_id = ids[i]
            created = at()
            e = expected[account_id]
            e["comments_seen"] += 1
            if status == "done":
                e[{"hide": "comments_hidden", "delete": "comments_deleted"}.get(action, "comments_replied")] += 1
            yield dict(account_id=account_id, monitored_post_id=posts[i], graph_comment_id=f"bench-k-{n}",
                       text=f"nice {n}", text_key=f"nice {n}", username=f"fan{n % 5000}",
                       from_id=str(8_000_000 + n % 5000), created_time=created, action=action,
                       reason="no rule matched" if action == "none" else "bench rule",
                       action_status=status, acted_at=created + timedelta(seconds=5) if status == "done" else None,
                       attempts=1 if status != "none" else 0, received_at=created + timedelta(seconds=30))
        for k, account_id in enumerate(ids):
            for m, when in enumerate((before, at_end)):
                yield dict(account_id=account_id, monitored_post_id=posts[k], graph_comment_id=f"bench-kedge-{k}-{m}",
                           text="edge", text_key="edge", created_time=when, action="hide", reason="edge",
                           action_status="done", attempts=1, received_at=when)

    def scheduled() -> Iterator[dict[str, Any]]:
        for account_id in ids:
            for status in weighted(rng, POST_STATUSES, rng.randint(0, 3)):
                publish_at = start + timedelta(seconds=rng.uniform(0, span - 3600))
                if status in ("published", "failed", "unconfirmed"):
                    expected[account_id][f"posts_{status}"] += 1
                yield dict(account_id=account_id, kind="image",
                           media=[{"type": "image", "url": "https://example.com/a.jpg"}],
                           caption="bench", publish_at=publish_at, status=status, created_at=now,
                           published_at=publish_at + timedelta(seconds=12) if status == "published" else None,
                           media_id=f"1791{account_id}{rng.randrange(10**6)}" if status == "published" else None)

    t0 = time.perf_counter()
    n_dms = insert_rows(iq, iq.InboundMessage, dms())
    n_comments = insert_rows(iq, iq.Comment, comments())
    n_posts = insert_rows(iq, iq.ScheduledPost, scheduled())
    with iq.get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE"))
    per_account = sorted(e["dms_received"] for e in expected.values())
    return dict(expected=expected, ids=ids, load_s=time.perf_counter() - t0, rows=n_dms + n_comments + n_posts,
                posts=sum(e[f"posts_{s}"] for e in expected.values() for s in ("published", "failed", "unconfirmed")),
                all_posts=n_posts, start=start, end=end, dms_p50=percentile(per_account, 50),
                dms_max=per_account[-1] if per_account else 0)


# Runs ########################################################################################

def set_parked(iq: Any, parked: bool) -> None:
    with iq.get_engine().begin() as conn:
        conn.execute(iq.sa.update(iq.Account.__table__).values(
            state="needs_reauth" if parked else "active",
            state_reason="bench: baseline without Graph calls" if parked else None, backoff_until=None))


#: The launcher: a bare Python that starts the measured children. On Linux a process starts with
#: the ``ru_maxrss`` of whoever forked it (the kernel keeps the old memory's high-water mark
#: across exec), so children of this script (100+ MB after the load) would inherit that; children
#: of a bare launcher inherit ~10 MB, well below their own figures.
LAUNCHER = r"""
import json, subprocess, sys
for line in sys.stdin:
    job = json.loads(line)
    p = subprocess.run(job["command"], cwd=job["cwd"], env=job["env"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True)
    print(json.dumps({"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}), flush=True)
"""


class Launcher:
    """Runs commands in a small long-lived process (see ``LAUNCHER``), in its own process group."""

    def __init__(self) -> None:
        self.popen = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, start_new_session=True)

    def run(self, command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
        assert self.popen.stdin and self.popen.stdout
        self.popen.stdin.write(json.dumps(dict(command=command, env=env, cwd=str(cwd))) + "\n")
        self.popen.stdin.flush()
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"the launcher exited with {self.popen.wait()}")
        out = json.loads(line)
        return subprocess.CompletedProcess(command, out["rc"], out["stdout"], out["stderr"])

    def stop(self) -> None:
        """Close its input (it exits), then KILL the group: a child still running goes too."""
        try:
            if self.popen.stdin:
                self.popen.stdin.close()
        except OSError:
            pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass


def run_child(iq: Any, fake: FakeGraph, launcher: Launcher, mode: str, day: date, trace: bool,
              base: Path) -> dict[str, Any]:
    """One measured call in a fresh process; retried while instaqueue.py is broken mid-edit."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--day", day.isoformat()]
    command += ["--trace"] if trace else []
    for attempt in range(1, CHILD_ATTEMPTS + 1):
        with iq.get_engine().begin() as conn:
            conn.execute(iq.sa.delete(iq.DailyAnalytics.__table__))
        set_parked(iq, mode == "baseline")
        calls_before = len(fake.calls)
        proc = launcher.run(command, dict(os.environ), ROOT)
        graph_calls = len(fake.calls) - calls_before
        with open(base / "children.log", "a") as log:
            log.write(f"--- {mode} trace={trace} attempt {attempt}: rc {proc.returncode}\n{proc.stdout}{proc.stderr}\n")
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode == 0 and lines:
            out = json.loads(lines[-1][len("RESULT "):])
            out["graph_calls"] = graph_calls
            return out
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"bench: {mode} run failed (rc {proc.returncode}: {tail}); attempt {attempt}/{CHILD_ATTEMPTS}",
              file=sys.stderr, flush=True)
        if attempt < CHILD_ATTEMPTS:
            time.sleep(RETRY_PAUSE)
    raise RuntimeError(f"the {mode} run failed {CHILD_ATTEMPTS} times; see {base / 'children.log'}")


def check_rows(iq: Any, run: dict[str, Any], loaded: dict[str, Any], args: argparse.Namespace,
               day: date) -> list[str]:
    """The rows the run wrote against what was loaded: totals first, then every account."""
    label = f"{run['mode']}{' (traced)' if run['trace'] else ''}"
    with iq.session() as db:
        rows = db.exec(iq.select(iq.DailyAnalytics)).all()
        not_active = db.execute(iq.sa.select(iq.sa.func.count()).select_from(iq.Account.__table__)
                                .where(iq.Account.state != "active")).scalar_one()
    problems: list[str] = []
    dms, comments = sum(r.dms_received for r in rows), sum(r.comments_seen for r in rows)
    if dms != args.dms:
        problems.append(f"{label}: summed dms_received {dms} != {args.dms} DMs inserted on {day}")
    if comments != args.comments:
        problems.append(f"{label}: summed comments_seen {comments} != {args.comments} comments inserted on {day}")
    if len(rows) != args.accounts or {r.day for r in rows} != {day}:
        problems.append(f"{label}: {len(rows)} rows for days {sorted({str(r.day) for r in rows})}, "
                        f"expected {args.accounts} for {day}")
    if run["result"].get("rows") != args.accounts:
        problems.append(f"{label}: generate_daily_analytics returned {run['result']}")
    full = run["mode"] == "full"
    if full and not_active:
        problems.append(f"{label}: {not_active} accounts no longer active after the run")
    wrong = []
    for row in rows:
        e = loaded["expected"].get(row.account_id)
        if e is None:
            wrong.append(f"row for unknown account {row.account_id}")
            continue
        got = {k: getattr(row, k) for k in COUNTERS}
        want = {k: e[k] for k in COUNTERS}
        if full:
            got |= {k: getattr(row, k) for k in INSIGHTS} | {"complete": row.complete}
            want |= {k: e[k] for k in INSIGHTS} | {"complete": True}
        else:
            got |= {"followers": row.followers, "complete": row.complete}
            want |= {"followers": None, "complete": False}
        diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        lat = e["latencies"]
        for name, p in (("reply_latency_median_s", 50), ("reply_latency_p95_s", 95)):
            value, should = getattr(row, name), (percentile(lat, p) if lat else None)
            if (value is None) != (should is None) or (value is not None and abs(value - should) > 1e-3):
                diff[name] = (value, should)
        if diff:
            wrong.append(f"account {row.account_id}: "
                         + ", ".join(f"{k} {g} (expected {w})" for k, (g, w) in diff.items()))
    if wrong:
        problems.append(f"{label}: {len(wrong)} of {len(rows)} rows differ from the loaded data; first: "
                        + "; ".join(wrong[:3]))
    return problems


# Figures #####################################################################################

def mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MB"


def median(values: list[float]) -> float:
    return percentile(values, 50)


def summary(timed: list[dict[str, Any]], traced: dict[str, Any], accounts: int) -> dict[str, Any]:
    def part(name: str) -> float:
        return median([r["timers"].get(name, 0.0) for r in timed])

    walls = [r["wall"] for r in timed]
    wall = median(walls)
    build, insights, save, sql = part("build_day"), part("read_insights"), part("save_analytics"), part("sql")
    return dict(
        wall=wall, walls=walls, per_account_ms=wall / accounts * 1000, build=build, insights=insights,
        grouped=build - insights, save=save, rest=wall - build - save, sql=sql,
        statements=median([r["calls"].get("sql", 0) for r in timed]),
        graph_calls=median([r["graph_calls"] for r in timed]),
        incomplete=timed[0]["result"].get("incomplete"),
        rss=median([r["rss_after"] - r["rss_before"] for r in timed]),
        rss_before=median([r["rss_before"] for r in timed]),
        rss_after=median([r["rss_after"] for r in timed]),
        rss_import=median([r["rss_import"] for r in timed]), rss_reset=all(r["rss_reset"] for r in timed),
        peak=traced["tracemalloc_peak"], traced_wall=traced["wall"])


def report(s: dict[str, Any], label: str, accounts: int) -> None:
    w = 44
    walls = s["walls"]
    print(f"{label + ':':<{w}}wall {s['wall']:6.2f} s (runs {', '.join(f'{x:.2f}' for x in walls)})  "
          f"= {s['per_account_ms']:.2f} ms/account   {s['graph_calls']:.0f} Graph calls, "
          f"{s['incomplete']} incomplete rows")
    print(f"{'  grouped SQL (build_day minus insights):':<{w}}{s['grouped']:6.2f} s  "
          f"= {s['grouped'] / accounts * 1000:.2f} ms/account")
    calls = s["graph_calls"]
    per_call = f", {s['insights'] / calls * 1000:.2f} ms/call" if calls else ""
    print(f"{'  read_insights (Graph calls):':<{w}}{s['insights']:6.2f} s  "
          f"= {s['insights'] / accounts * 1000:.2f} ms/account{per_call}")
    print(f"{'  save_analytics (one transaction a row):':<{w}}{s['save']:6.2f} s  "
          f"= {s['save'] / accounts * 1000:.2f} ms/account")
    print(f"{'  rest (accounts, last days, loop):':<{w}}{s['rest']:6.2f} s")
    print(f"{'  SQL statements (cursor execute):':<{w}}{s['sql']:6.2f} s in {s['statements']:.0f} statements")
    print(f"{'  peak memory, tracemalloc:':<{w}}{mb(s['peak'])} (in the traced run, {s['traced_wall']:.2f} s)")
    how = ("high-water mark reset to the RSS at the call's start" if s["rss_reset"]
           else f"could not reset the high-water mark ({mb(s['rss_import'])} after import): a lower bound")
    print(f"{'  peak memory, max RSS growth:':<{w}}+{mb(s['rss'])} (ru_maxrss {mb(s['rss_before'])} -> "
          f"{mb(s['rss_after'])}; {how})")


# Main ########################################################################################

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=None, help="accounts (1000)")
    parser.add_argument("--dms", type=int, default=None, help="DMs on the day (100000)")
    parser.add_argument("--comments", type=int, default=None, help="comments on the day (100000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 accounts, 10000 DMs and comments")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each kind (3)")
    parser.add_argument("--day", type=date.fromisoformat, default=None,
                        help="the day (ISO date; default: yesterday in the configured timezone)")
    parser.add_argument("--seed", type=int, default=1, help="seed for the workload")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) even on success")
    parser.add_argument("--child", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.accounts = args.accounts if args.accounts is not None else (100 if args.quick else 1000)
    args.dms = args.dms if args.dms is not None else (10_000 if args.quick else 100_000)
    args.comments = args.comments if args.comments is not None else (10_000 if args.quick else 100_000)
    if args.accounts < 1 or args.dms < 0 or args.comments < 0 or args.repeat < 1:
        parser.error("--accounts and --repeat must be at least 1, --dms and --comments at least 0")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.day.isoformat(), args.trace)
    # Ctrl-C and TERM both unwind through the finally below, which stops everything.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background (SIGINT ignored)
    base = Path(tempfile.mkdtemp(prefix="instaqueue-bench-analytics-"))
    launcher = Launcher()  # first, while this process is still small
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
        # inherited (a stray INSTAQUEUE_* would change what is measured). The children inherit it.
        for name in [n for n in os.environ if n.startswith("INSTAQUEUE_") and not n.startswith("INSTAQUEUE_TEST_")]:
            del os.environ[name]
        os.environ.update({
            "INSTAQUEUE_REDIS_URL": redis_service.url,
            "INSTAQUEUE_DATABASE_URL": pg_service.url,
            "INSTAQUEUE_GRAPH_API_URL": fake.url,
            "INSTAQUEUE_DATA_DIR": str(base / "data"),
        })
        iq = import_instaqueue()
        digest = source_hash(iq)
        iq.create_tables()
        if not empty_database(iq):
            print(f"bench: the database at {pg_service.url} already holds accounts, messages, comments or "
                  f"analytics; the totals need an empty one (unset INSTAQUEUE_TEST_DATABASE_URL)",
                  file=sys.stderr)
            return 2
        zone = iq.settings.zone
        day = args.day or iq.utcnow().astimezone(zone).date() - timedelta(days=1)
        loaded = load(iq, fake, args, day, random.Random(args.seed))
        with iq.session() as db:
            pg_version = db.execute(iq.sa.text("show server_version")).scalar_one().split()[0]
            durability = ", ".join(f"{name} {db.execute(iq.sa.text(f'show {name}')).scalar_one()}"
                                   for name in ("fsync", "synchronous_commit"))

        s = iq.settings
        now = datetime.now().astimezone()
        print(f"instaqueue daily analytics benchmark   {now:%Y-%m-%d %H:%M:%S %Z}")
        print(f"  machine   {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
              f"Python {platform.python_version()}, PostgreSQL {pg_version}, SQLAlchemy {iq.sa.__version__}, "
              f"load average {os.getloadavg()[0]:.2f}")
        print(f"  services  PostgreSQL ({pg_service.how}; {durability}), "
              f"Redis ({redis_service.how}; not used by the run), "
              f"fake Graph API in the parent process over loopback")
        print(f"  settings  timezone {s.timezone}, graph_timeout {s.graph_timeout:g} s; day {day} = "
              f"{loaded['start']:%Y-%m-%d %H:%M} .. {loaded['end']:%Y-%m-%d %H:%M} UTC")
        dm_mix = ", ".join(f"{k} {v:g}%" for k, v in DM_STATUSES.items())
        print(f"  workload  {args.accounts} accounts (followers + 4 insight metrics each in the fake); "
              f"{args.dms} DMs ({dm_mix}), per account median {loaded['dms_p50']:.0f}, max {loaded['dms_max']}")
        print(f"            {args.comments} comments on {args.accounts} monitored posts "
              f"({COMMENT_KINDS[('none', 'none')]:g}% no action, the rest hide/delete/reply/dm in mixed statuses); "
              f"{loaded['all_posts']} scheduled posts ({loaded['posts']} published/failed/unconfirmed); "
              f"+{2 * args.accounts} DMs and +{2 * args.accounts} comments at the day's edges (not counted)")
        print(f"  loaded    {loaded['rows']} rows in {loaded['load_s']:.1f} s (Core insert executemany, "
              f"{LOAD_CHUNK} rows a transaction), then VACUUM ANALYZE")
        print(f"  runs      each in a fresh child process: generate_daily_analytics(['{day}']) called directly "
              f"(no worker), connection opened first, daily_analytics emptied before; {args.repeat} timed run(s) "
              f"of each kind (median shown), then one of each with tracemalloc")
        print(f"  logs      {base}", flush=True)

        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
        traced: dict[str, dict[str, Any]] = {}
        problems: list[str] = []
        for _ in range(args.repeat):
            for mode in MODES:
                run = run_child(iq, fake, launcher, mode, day, False, base)
                runs[mode].append(run)
                problems += check_rows(iq, run, loaded, args, day)
        for mode in MODES:
            traced[mode] = run_child(iq, fake, launcher, mode, day, True, base)
            problems += check_rows(iq, traced[mode], loaded, args, day)
        set_parked(iq, False)
        hashes = {r["source"] for rs in runs.values() for r in rs} | {r["source"] for r in traced.values()} | {digest}
        if len(hashes) > 1:
            print(f"!!! instaqueue.py changed during the benchmark ({len(hashes)} versions ran): "
                  f"the runs may not be comparable")

        full = summary(runs["full"], traced["full"], args.accounts)
        base_ = summary(runs["baseline"], traced["baseline"], args.accounts)
        print()
        print(f"generate_daily_analytics, {args.accounts} accounts, {args.dms} DMs, {args.comments} comments:")
        report(full, MODES["full"], args.accounts)
        report(base_, MODES["baseline"], args.accounts)
        # The split comes from inside the full runs (the wrappers), not from full minus baseline,
        # which mixes in the noise between runs.
        print(f"{'ratio full / baseline:':<44}{full['wall'] / base_['wall']:6.2f}x   within the full run: "
              f"Graph calls {full['insights'] / full['wall']:.0%} "
              f"({full['insights'] / args.accounts * 1000:.2f} ms/account), saves {full['save'] / full['wall']:.0%}, "
              f"grouped SQL {full['grouped'] / full['wall']:.0%} ({full['grouped']:.2f} s for all accounts)")
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
        launcher.stop()
        fake.stop()
        for service in services:
            service.stop()
        if ok and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        elif not ok:
            print(f"logs kept in {base}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
