"""Drill: SIGKILL workers under load; every DM answered once, every post published once.

Two workers (``python -m instaqueue worker``, concurrency 2 each) and one beat run against real
Redis and PostgreSQL and the fake Graph API. While DMs arrive from many senders and scheduled
posts come due, a worker -- its whole process group: main process and pool children -- is
SIGKILLed every few seconds, alternating between the two, and started again at once (so one
worker is usually up). The Send API and ``media_publish`` answer 0.3 s late (the fake acts
first), so kills land in the "Instagram did it, the answer never came back" window too.

When the load is in, the kills stop and the drill waits (generously) for every DM to be
answered and every post published, then a little longer for late duplicates, and counts at
the fake: replies per sender (``sent_messages``), media per post caption (``published_media``)
and ``POST /media_publish`` calls.

PASS: every DM answered exactly once (no sender got more or fewer replies than DMs, every
stored DM replied with its own reply), every post published exactly once, and kills happened.

Usage (from the repository root)::

    .venv/bin/python drills/kill_workers.py            # 1,000 DMs, 50 posts, a kill every ~5 s
    .venv/bin/python drills/kill_workers.py --quick    # 100 DMs, 10 posts, a kill every ~3 s
    .venv/bin/python drills/kill_workers.py --dms 300 --posts 20 --kill-every 4 --keep
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from datetime import timedelta
from typing import Any

from common import Drill, parse_args, run, wait_until

ACCOUNT = ("17841400000000001", "shop", "TOKEN-drill-kill-workers")
RULE = ("price, cost", "Prices start at 20 EUR.")
#: DMs per sender: a conversation stays well under the 20 messages Graph lets us read.
DMS_PER_SENDER = 5
#: The Send API and media_publish answer this late (the effect is immediate).
ANSWER_DELAY = 0.3
#: Settings for fast redelivery (see DRILL_SETTINGS in common.py for why these fit together).
SETTINGS = {
    "INSTAQUEUE_VISIBILITY_TIMEOUT": "30",
    "INSTAQUEUE_GRAPH_TIMEOUT": "2",
    "INSTAQUEUE_RETRY_BASE": "1",
    "INSTAQUEUE_RETRY_CAP": "5",
    "INSTAQUEUE_SCHEDULED_CHECK_INTERVAL": "5",
    "INSTAQUEUE_PUBLISH_STUCK_AFTER": "10",
    "INSTAQUEUE_CONTAINER_CHECK_INTERVAL": "2",
    "INSTAQUEUE_WORKER_CONCURRENCY": "2",
}


def add_options(parser: Any) -> None:
    parser.add_argument("--dms", type=int, help="DMs (1000; quick 100)")
    parser.add_argument("--posts", type=int, help="scheduled posts (50; quick 10)")
    parser.add_argument("--feed-seconds", type=float, help="DMs arrive over this long (120; quick 20)")
    parser.add_argument("--kill-every", type=float, help="seconds between kills, ±30 %% (5; quick 3)")
    parser.add_argument("--timeout", type=float, help="wait this long for completion after the load (600; quick 150)")


class Killer(threading.Thread):
    """Every ``interval`` (±30 %) SIGKILL one worker's process group, alternating, and start it
    again at once; until ``stop`` is set."""

    def __init__(self, workers: list[Any], interval: float, rng: random.Random) -> None:
        super().__init__(name="killer", daemon=True)
        self.workers, self.interval, self.rng = workers, interval, rng
        self.stop_event = threading.Event()
        self.kills = 0
        self.restart_failures: list[str] = []
        self.restart_seconds: list[float] = []

    def run(self) -> None:
        turn, last_kill = 0, time.monotonic()
        # The interval runs from one kill to the next (a restart's start-up is part of it).
        while not self.stop_event.wait(max(0.2, last_kill + self.interval * self.rng.uniform(0.7, 1.3)
                                           - time.monotonic())):
            worker = self.workers[turn % len(self.workers)]
            turn += 1
            worker.kill()
            self.kills += 1
            started = last_kill = time.monotonic()
            try:
                worker.start(timeout=60)
                self.restart_seconds.append(time.monotonic() - started)
            except Exception as exc:  # keep killing the other one; report at the end
                self.restart_failures.append(f"{worker.name}: {str(exc).splitlines()[0]}")
                try:
                    worker.start(timeout=60)
                except Exception:
                    pass

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=120)


def schedule_posts(d: Drill, account: Any, count: int, first_at: float, last_at: float) -> list[str]:
    """``count`` image posts due between ``first_at`` and ``last_at`` seconds from now; their captions."""
    iq = d.iq
    now = iq.utcnow()
    captions = []
    with iq.session() as db:
        for i in range(count):
            offset = first_at + (last_at - first_at) * (i / max(1, count - 1))
            caption = f"kill drill post {i:03d}"
            captions.append(caption)
            db.add(iq.ScheduledPost(
                account_id=account.id, kind=iq.PostKind.image, caption=caption,
                media=[{"type": "image", "url": f"https://cdn.example.com/drill/{i}.jpg"}],
                publish_at=now + timedelta(seconds=offset)))
        db.commit()
    return captions


def feed_dms(d: Drill, account: Any, dms: int, seconds: float, rng: random.Random) -> Counter[str]:
    """``dms`` DMs from ``ceil(dms / 5)`` senders, spread evenly over ``seconds``; DMs per sender."""
    senders = [str(9_200_000 + i) for i in range(max(1, math.ceil(dms / DMS_PER_SENDER)))]
    order = [senders[i % len(senders)] for i in range(dms)]
    rng.shuffle(order)
    per_sender: Counter[str] = Counter()
    start = time.monotonic()
    for i, sender in enumerate(order):
        delay = start + seconds * i / dms - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        d.fake.add_dm(account.ig_user_id, sender, f"Hello, what is the price of item {i}?",
                      sender_username=f"person{sender}")
        per_sender[sender] += 1
    return per_sender


def tally(d: Drill, account: Any, per_sender: Counter[str], captions: list[str]) -> dict[str, Any]:
    iq = d.iq
    replies = d.fake.sent_messages(account.ig_user_id)
    got = Counter(r["recipient_id"] for r in replies)
    duplicates = sum(max(0, got[s] - n) for s, n in per_sender.items()) + \
        sum(n for s, n in got.items() if s not in per_sender)
    missing = sum(max(0, n - got[s]) for s, n in per_sender.items())
    answered = sum(min(n, got[s]) for s, n in per_sender.items())
    with iq.session() as db:
        rows = db.exec(iq.select(iq.InboundMessage).where(iq.InboundMessage.account_id == account.id)).all()
        posts = db.exec(iq.select(iq.ScheduledPost).where(iq.ScheduledPost.account_id == account.id)).all()
    statuses = Counter(str(r.status) for r in rows)
    reply_ids = [r.reply_graph_message_id for r in rows if r.status == iq.MessageStatus.replied]
    delivered_ids = {r["message_id"] for r in replies}
    own_reply = len({i for i in reply_ids if i in delivered_ids})  # distinct delivered replies recorded

    media = d.fake.published_media(account.ig_user_id)
    per_caption = Counter(m["caption"] for m in media)
    calls = d.fake.calls_matching("POST", "/media_publish")
    post_statuses = Counter(str(p.status) for p in posts)
    return dict(
        dms=sum(per_sender.values()), senders=len(per_sender), replies=len(replies), answered=answered,
        duplicates=duplicates, missing=missing, stored=len(rows), statuses=dict(statuses),
        recorded_distinct=own_reply, recorded_shared=len(reply_ids) - own_reply,
        posts=len(captions), published=sum(1 for c in captions if per_caption[c] >= 1),
        duplicate_publishes=sum(max(0, per_caption[c] - 1) for c in captions),
        missing_posts=sum(1 for c in captions if per_caption[c] == 0),
        publish_calls=len(calls), publish_calls_ok=sum(1 for c in calls if c.status == 200),
        post_statuses=dict(post_statuses),
    )


def done(d: Drill, account: Any, dms: int, posts: int) -> bool:
    iq = d.iq
    with iq.session() as db:
        final = db.exec(iq.select(iq.sa.func.count()).select_from(iq.InboundMessage).where(
            iq.InboundMessage.status.in_(iq.FINAL_MESSAGE_STATES))).one()
        published = db.exec(iq.select(iq.sa.func.count()).select_from(iq.ScheduledPost).where(
            iq.ScheduledPost.status.in_(iq.FINAL_POST_STATES))).one()
    return final >= dms and published >= posts and len(d.fake.sent_messages()) >= dms


def main() -> int:
    args = parse_args(__doc__, add=add_options)
    dms = args.dms if args.dms is not None else (100 if args.quick else 1000)
    posts = args.posts if args.posts is not None else (10 if args.quick else 50)
    feed_seconds = args.feed_seconds if args.feed_seconds is not None else (20.0 if args.quick else 120.0)
    kill_every = args.kill_every if args.kill_every is not None else (3.0 if args.quick else 5.0)
    timeout = args.timeout if args.timeout is not None else (150.0 if args.quick else 600.0)
    rng = random.Random(args.seed)

    with Drill("kill_workers", settings=SETTINGS, keep=args.keep) as d:
        account = d.add_account(*ACCOUNT, rule=RULE)
        d.fake.set_publish_quota(total=10_000)
        d.fake.delay(ANSWER_DELAY, method="POST", path_contains="/messages", times=None)
        d.fake.delay(ANSWER_DELAY, method="POST", path_contains="/media_publish", times=None)
        # Posts come due over the load, the first ones after the workers are up.
        captions = schedule_posts(d, account, posts, first_at=8.0, last_at=max(10.0, feed_seconds))
        print(f"kill_workers: {dms} DMs from {math.ceil(dms / DMS_PER_SENDER)} senders over "
              f"{feed_seconds:g} s, {posts} posts due over the run, 2 workers x concurrency "
              f"{d.iq.settings.worker_concurrency}, a SIGKILL every ~{kill_every:g} s", flush=True)

        workers = [d.worker("w1"), d.worker("w2")]
        d.beat("beat")
        killer = Killer(workers, kill_every, rng)
        started = time.monotonic()
        killer.start()
        per_sender = feed_dms(d, account, dms, feed_seconds, rng)
        # Keep killing until the last post is due and a few seconds after.
        while time.monotonic() - started < max(10.0, feed_seconds) + 3:
            time.sleep(0.2)
        killer.stop()
        load_s = time.monotonic() - started
        for worker in workers:  # the killer may have left one down when a restart failed
            if not worker.alive():
                worker.start(timeout=60)
        print(f"kill_workers: load done in {load_s:.0f} s, {killer.kills} kills "
              f"(restart {max(killer.restart_seconds, default=0):.1f} s at most); waiting for completion",
              flush=True)

        wait_start = time.monotonic()
        completed = wait_until(lambda: done(d, account, dms, posts), timeout=timeout, interval=1.0)
        drain_s = time.monotonic() - wait_start
        time.sleep(5 if args.quick else 15)  # time for a late duplicate to show up
        t = tally(d, account, per_sender, captions)

        print(f"DMs:   sent {t['dms']} from {t['senders']} senders; replies delivered {t['replies']}; "
              f"answered {t['answered']}, duplicates {t['duplicates']}, missing {t['missing']}; "
              f"stored {t['stored']} {t['statuses']}; recorded replies: {t['recorded_distinct']} own, "
              f"{t['recorded_shared']} not delivered or shared")
        print(f"posts: {t['posts']} scheduled; published {t['published']}, duplicate publishes "
              f"{t['duplicate_publishes']}, missing {t['missing_posts']}; media_publish calls "
              f"{t['publish_calls']} ({t['publish_calls_ok']} accepted); statuses {t['post_statuses']}")
        logs = "".join(w.text() for w in workers) + d.procs[-1].text()
        print(f"recovery: {logs.count('not sending again')} DMs found already answered after a kill, "
              f"{logs.count('not publishing again')} posts found already published, "
              f"{logs.count('so it was not published')} publish calls found not to have happened; "
              f"re-sent by the sweepers: {logs.count('stale DMs again')} times DMs, "
              f"{logs.count('were stuck; taking them up again')} times posts")
        print(f"kills: {killer.kills} SIGKILLs of a worker group; restart failures {len(killer.restart_failures)}"
              + (f" ({killer.restart_failures[:3]})" if killer.restart_failures else ""))
        print(f"time:  load {load_s:.0f} s, completion {drain_s:.0f} s after the load"
              + ("" if completed else f" (NOT complete after {timeout:.0f} s)"))
        ok = (completed and t["answered"] == dms and t["duplicates"] == 0 and t["missing"] == 0
              and t["stored"] == dms and t["recorded_distinct"] == dms
              and t["published"] == posts and t["duplicate_publishes"] == 0
              and t["publish_calls_ok"] == posts and t["post_statuses"].get("published", 0) == posts
              and killer.kills > 0)
        return d.verdict(ok, answered=f"{t['answered']}/{dms}", duplicates=t["duplicates"],
                         missing=t["missing"], posts_published=f"{t['published']}/{posts}",
                         duplicate_publishes=t["duplicate_publishes"], publish_calls=t["publish_calls"],
                         kills=killer.kills, drain_s=round(drain_s))


if __name__ == "__main__":
    run(main)
