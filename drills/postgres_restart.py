"""Fault drill: PostgreSQL restarted (``pg_ctl restart -m fast``) in the middle of a load of DMs
and scheduled posts.

The drill makes its OWN PostgreSQL cluster (``initdb`` / ``pg_ctl`` as the unprivileged user
``tests/services.py`` uses; ``INSTAQUEUE_TEST_DATABASE_URL`` is ignored), takes Redis as the
other drills do (``common.Drill``), and runs the fake Graph API, one worker and one beat. While
DMs arrive (300; ``--quick`` 60) and scheduled posts fall due (10; ``--quick`` 6, several of
them right at the restart), it restarts PostgreSQL once 40 % of the DMs were sent: every open
connection is cut, and for a moment none can be made. Worker and beat are not restarted.

PASS when afterwards every DM got exactly one reply at the fake and every post was published
exactly once (one media per post at the fake, the row ``published``), with worker and beat
still the processes started at the beginning.

Usage: ``.venv/bin/python drills/postgres_restart.py [--quick] [--dms N] [--posts N] [--restarts N] [--down S] [--keep]``
"""

from __future__ import annotations

import os
import random
import re
import shutil
import threading
import time
from collections import Counter

from common import Drill, parse_args, run
from _faults_common import (RULE_MATCH, RULE_REPLY, DMLoad, OwnPostgres, percentile, post_ledger, posts_done,
                            schedule_posts, wait_all_answered, crash_summary)

ACCOUNT = ("17841400000000301", "shop_pg", "TOKEN-drill-postgres")
#: Posts are checked every 2 s; a post stuck in publishing is taken up again 6 s after it was
#: due; visibility 20 s covers the longest task delay (retry cap 5 s +20 %, 2 checks) plus a
#: claim lease (3 * graph timeout 2 + 5 = 11 s).
SETTINGS = {
    "INSTAQUEUE_SCHEDULED_CHECK_INTERVAL": "2",
    "INSTAQUEUE_PUBLISH_STUCK_AFTER": "6",
    "INSTAQUEUE_VISIBILITY_TIMEOUT": "20",
}


def main() -> int:
    def options(parser):
        parser.add_argument("--dms", type=int, default=None, help="DMs in the load (300; quick 60)")
        parser.add_argument("--posts", type=int, default=None, help="scheduled posts (10; quick 6)")
        parser.add_argument("--restarts", type=int, default=None, help="restarts during the load (3; quick 1)")
        parser.add_argument("--down", type=float, default=0.0,
                            help="instead of pg_ctl restart: pg_ctl stop -m fast, S seconds down, start (0)")

    args = parse_args(__doc__, add=options)
    dms = args.dms or (60 if args.quick else 300)
    n_posts = args.posts or (6 if args.quick else 10)
    send_for = 10.0 if args.quick else 30.0
    restarts = args.restarts or (1 if args.quick else 3)
    at_fractions = [0.4] if restarts == 1 else [(k + 1) / (restarts + 1) for k in range(restarts)]
    rng = random.Random(args.seed)

    pg = OwnPostgres()
    os.environ.pop("INSTAQUEUE_TEST_DATABASE_URL", None)
    try:
        pg.start()
        os.environ["INSTAQUEUE_TEST_DATABASE_URL"] = pg.url  # common.Drill takes the database from here
        with Drill("postgres_restart", settings=SETTINGS, keep=args.keep) as d:
            iq = d.iq
            print(f"postgres_restart: own PostgreSQL {pg.url} (data {pg.data}); {dms} DMs over {send_for:g} s, "
                  f"{n_posts} posts; """
                  f"{'pg_ctl restart -m fast' if not args.down else f'down {args.down:g} s'} at "
                  f"{', '.join(f'{f:.0%}' for f in at_fractions)}", flush=True)
            account = d.add_account(*ACCOUNT, rule=(RULE_MATCH, RULE_REPLY))
            worker = d.worker("w1")
            beat = d.beat("b1")
            worker_pid, beat_pid = worker.pid, beat.pid
            load = DMLoad(iq, d.fake, account, first_sender=9_300_000)

            # Half the posts due right at a restart, the others spread over the load.
            offsets = sorted([at_fractions[i % restarts] * send_for + rng.uniform(-1.0, 1.5)
                              for i in range(n_posts // 2)]
                             + [rng.uniform(0.2, 0.8) * send_for for _ in range(n_posts - n_posts // 2)])
            now = iq.utcnow()
            posts = schedule_posts(iq, account, [now + iq.timedelta(seconds=2 + o) for o in offsets], "pg drill post")

            progress = {"sent": 0}
            sender = threading.Thread(target=load.send_paced, args=(dms, send_for, rng),
                                      kwargs={"on_progress": lambda i: progress.__setitem__("sent", i)},
                                      daemon=True)
            sender.start()
            for fraction in at_fractions:
                while progress["sent"] < fraction * dms and sender.is_alive():
                    time.sleep(0.02)
                sent_at_restart = progress["sent"]
                took = pg.restart(down=args.down)
                print(f"postgres_restart: restarted PostgreSQL after {sent_at_restart} DMs; it took {took:.1f} s",
                      flush=True)
            sender.join()
            deadline = time.monotonic() + 150 + 0.1 * dms
            waited = wait_all_answered([load], timeout=deadline - time.monotonic(), settle=0, procs=[worker, beat])
            while time.monotonic() < deadline and not posts_done(iq, posts) and worker.alive():
                time.sleep(0.25)
            time.sleep(4)  # time for a duplicate reply or post to show up

            ledger = load.ledger()
            posts_out = post_ledger(iq, d.fake, account, posts)
            latencies = list(ledger["latency"].values())
            publish_calls = [c for c in d.fake.calls_matching("POST", "/media_publish") if c.status == 200]
            log = worker.text()
            db_errors = log.count("OperationalError")
            failed_tasks = Counter(m.group(1) for m in re.finditer(r"Task (instaqueue\.\w+)\[[^\]]*\] raised unexpected", log))
            same_procs = worker.alive() and beat.alive() and worker.pid == worker_pid and beat.pid == beat_pid \
                and worker.starts == 1 and beat.starts == 1
            with iq.session() as db:
                post_rows = db.exec(iq.select(iq.ScheduledPost).where(iq.ScheduledPost.id.in_(list(posts)))).all()
            late = [(p.published_at - p.publish_at).total_seconds() for p in post_rows if p.published_at]
            print(f"postgres_restart: DMs {ledger['sent']}, answered {ledger['answered']}, missing {ledger['missing']}, "
                  f"duplicate replies {ledger['duplicates']}, replies not recorded {ledger['unrecorded_replies']}, "
                  f"rows {ledger['statuses']}")
            print(f"postgres_restart: posts {posts_out['posts']}, published {posts_out['published']}, duplicate "
                  f"media {posts_out['duplicates']}, media_publish calls answered 200: {len(publish_calls)}, "
                  f"rows {posts_out['statuses']}, late by up to {max(late, default=float('nan')):.1f} s")
            print(f"postgres_restart: waited {waited:.1f} s after the last DM; latency p50 "
                  f"{percentile(latencies, 50):.2f} s p95 {percentile(latencies, 95):.2f} s max "
                  f"{max(latencies, default=float('nan')):.2f} s; 'OperationalError' in the worker log {db_errors}x; "
                  f"tasks that raised: {dict(failed_tasks) or 'none'}")
            print(f"postgres_restart: worker alive {worker.alive()} (starts {worker.starts}), beat alive {beat.alive()} "
                  f"(starts {beat.starts})")
            for proc in (worker, beat):
                if not proc.alive():
                    print(f"postgres_restart: {proc.name} died:\n" + crash_summary(proc.text()))
            for p in post_rows:
                if p.status != iq.PostStatus.published:
                    print(f"postgres_restart: post {p.id} is {p.status}: {p.last_error}")
            try:  # the cluster's directory goes with it; keep its log with the drill's logs
                shutil.copy(pg.log, d.base / "postgres.log")
            except OSError:
                pass
            ok = (ledger["answered"] == dms and ledger["missing"] == 0 and ledger["duplicates"] == 0
                  and ledger["unrecorded_replies"] == 0 and posts_out["published"] == n_posts
                  and posts_out["duplicates"] == 0 and len(publish_calls) == n_posts and same_procs)
            return d.verdict(ok, answered=f"{ledger['answered']}/{dms}", missing=ledger["missing"],
                             duplicate_replies=ledger["duplicates"],
                             published=f"{posts_out['published']}/{n_posts}", duplicate_posts=posts_out["duplicates"],
                             publish_calls=len(publish_calls), pg_restarts=restarts,
                             worker_restarts=worker.starts - 1 if worker.alive() else "dead",
                             beat_restarts=beat.starts - 1 if beat.alive() else "dead")
    finally:
        os.environ.pop("INSTAQUEUE_TEST_DATABASE_URL", None)
        pg.stop()


if __name__ == "__main__":
    run(main)
