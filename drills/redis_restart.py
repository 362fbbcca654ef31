"""Fault drill: Redis (broker, result backend, locks) restarted in the middle of a DM load.

The drill starts its OWN ``redis-server`` on a free port with ``--appendonly yes --appendfsync
always --dir <tmp>`` (so whatever Redis acknowledged is on disk), PostgreSQL and the fake Graph
API as the other drills do (``common.Drill``), one worker and one beat. While DMs arrive at the
fake (300; ``--quick`` 60, a few per sender), it stops Redis with SIGTERM once 40 % of them were
sent, keeps it down ``--down`` seconds (default 3) and starts it again with the same directory.
Worker and beat are NOT restarted: they must reconnect by themselves.

PASS when, once Redis is back: every DM got exactly one reply at the fake (none missing, no
duplicate, every reply recorded on its row), worker and beat are still the processes started at
the beginning, and beat ticks again (its heartbeat in Redis is fresh).

Usage: ``.venv/bin/python drills/redis_restart.py [--quick] [--dms N] [--down S] [--keep]``
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

from common import Drill, parse_args, run
from _faults_common import (RULE_MATCH, RULE_REPLY, DMLoad, OwnRedis, percentile, wait_all_answered, crash_summary)

ACCOUNT = ("17841400000000201", "shop_redis", "TOKEN-drill-redis")


def diagnose(d: Drill, load: DMLoad, worker, beat) -> None:
    """The verdict is FAIL already (a process died); to tell what else the restart cost, start
    what died again by hand and say whether the DMs get answered then."""
    for proc in (worker, beat):
        if not proc.alive():
            proc.start()
    waited = wait_all_answered([load], timeout=120 + 0.1 * len(load.sent_at), settle=4.0)
    ledger = load.ledger()
    print(f"redis_restart: diagnosis: after starting the dead process(es) again by hand, within "
          f"{waited:.0f} s: answered {ledger['answered']}/{ledger['sent']}, missing {ledger['missing']}, "
          f"duplicates {ledger['duplicates']}, rows {ledger['statuses']}")


def main() -> int:
    def options(parser):
        parser.add_argument("--dms", type=int, default=None, help="DMs in the load (300; quick 60)")
        parser.add_argument("--down", type=float, default=3.0, help="seconds Redis stays down (3)")

    args = parse_args(__doc__, add=options)
    dms = args.dms or (60 if args.quick else 300)
    send_for = 8.0 if args.quick else 30.0  # seconds over which the DMs arrive
    rng = random.Random(args.seed)

    redis_dir = Path(tempfile.mkdtemp(prefix="iq-drill-redis-"))
    own = OwnRedis(redis_dir).start()
    os.environ["INSTAQUEUE_TEST_REDIS_URL"] = own.url  # common.Drill takes the Redis from here
    passed = False
    try:
        with Drill("redis_restart", keep=args.keep) as d:
            print(f"redis_restart: own redis-server {own.url} (AOF, fsync always) in {redis_dir}; "
                  f"{dms} DMs over {send_for:g} s; Redis down {args.down:g} s at 40 %", flush=True)
            account = d.add_account(*ACCOUNT, rule=(RULE_MATCH, RULE_REPLY))
            worker = d.worker("w1")
            beat = d.beat("b1")
            worker_pid, beat_pid = worker.pid, beat.pid
            load = DMLoad(d.iq, d.fake, account, first_sender=9_200_000)

            progress = {"sent": 0}
            sender = threading.Thread(target=load.send_paced, args=(dms, send_for, rng),
                                      kwargs={"on_progress": lambda i: progress.__setitem__("sent", i)},
                                      daemon=True)
            sender.start()
            while progress["sent"] < 0.4 * dms and sender.is_alive():
                time.sleep(0.02)
            stopped_at, sent_at_stop = time.time(), progress["sent"]
            status = own.stop()
            time.sleep(args.down)
            own.start()
            back_at = time.time()
            print(f"redis_restart: Redis stopped with SIGTERM after {sent_at_stop} DMs (exit {status}), "
                  f"started again {back_at - stopped_at:.1f} s later", flush=True)
            sender.join()
            last_dm = time.time()
            waited = wait_all_answered([load], timeout=120 + 0.1 * dms, settle=4.0, procs=[worker, beat])

            ledger = load.ledger()
            replies = d.fake.sent_messages(account.ig_user_id)
            after_back = sorted(r["time"].timestamp() for r in replies if r["time"].timestamp() >= back_at)
            first_after = after_back[0] - back_at if after_back else float("nan")
            latencies = list(ledger["latency"].values())
            heartbeat = d.iq.beat_heartbeat_age()
            reconnects = worker.text().count("Connected to redis")
            same_procs = worker.alive() and beat.alive() and worker.pid == worker_pid and beat.pid == beat_pid \
                and worker.starts == 1 and beat.starts == 1
            print(f"redis_restart: DMs {ledger['sent']}, answered {ledger['answered']}, missing {ledger['missing']}, "
                  f"duplicate replies {ledger['duplicates']}, replies not recorded {ledger['unrecorded_replies']}, "
                  f"rows {ledger['statuses']}")
            print(f"redis_restart: waited until {last_dm - back_at + waited:.1f} s after Redis was back "
                  f"(first reply after {first_after:.1f} s); latency p50 {percentile(latencies, 50):.2f} s "
                  f"p95 {percentile(latencies, 95):.2f} s max {max(latencies, default=float('nan')):.2f} s")
            print(f"redis_restart: worker alive {worker.alive()} (starts {worker.starts}, 'Connected to redis' "
                  f"{reconnects}x), beat alive {beat.alive()} (starts {beat.starts}), beat heartbeat "
                  f"{'none' if heartbeat is None else f'{heartbeat:.1f} s old'}")
            if not beat.alive():
                print("redis_restart: beat died:\n" + crash_summary(beat.text()))
            if not worker.alive():
                print("redis_restart: worker died:\n" + crash_summary(worker.text()))
            if ledger["missing_ids"]:
                print(f"redis_restart: e.g. unanswered {ledger['missing_ids']}")
            ok = (ledger["answered"] == dms and ledger["missing"] == 0 and ledger["duplicates"] == 0
                  and ledger["unrecorded_replies"] == 0 and own.starts == 2 and same_procs
                  and heartbeat is not None and heartbeat < 10)
            counts = dict(answered=f"{ledger['answered']}/{dms}", missing=ledger["missing"],
                          duplicates=ledger["duplicates"], redis_restarts=own.starts - 1,
                          worker_restarts=worker.starts - 1 if worker.alive() else "dead",
                          beat_restarts=beat.starts - 1 if beat.alive() else "dead",
                          beat_heartbeat_s=f"{heartbeat:.1f}" if heartbeat is not None else "none")
            if not same_procs:
                diagnose(d, load, worker, beat)
            code = d.verdict(ok, **counts)
            passed = code == 0
            return code
    finally:
        own.stop()
        os.environ.pop("INSTAQUEUE_TEST_REDIS_URL", None)
        if passed and not args.keep:
            shutil.rmtree(redis_dir, ignore_errors=True)
        else:
            print(f"redis_restart: Redis dir kept in {redis_dir}")


if __name__ == "__main__":
    run(main)
