"""Fault drill: the Graph API answers 5xx to about 30 % of the calls for a minute.

The fake Graph API (``tests/fake_graph.py``, unchanged) is switched between failing every call
with HTTP 503 code 2 (``fake.fail(503, code=2, times=None)``: Meta's "unexpected error, retry",
with no effect) and answering normally (``fake.clear_faults()``), in short random bursts that
add up to about 30 % of a 60 s window (``--quick``: 15 s). Meanwhile DMs arrive (300; quick 60,
one per sender, so that every call at the fake can be told apart by DM) and a few scheduled
posts fall due (5; quick 3). One worker, one beat, real Redis and PostgreSQL (``common.Drill``).

The retry policy is scaled for the drill: ``INSTAQUEUE_RETRY_BASE=1``, ``INSTAQUEUE_RETRY_CAP=8``
(so retries after 1, 2, 4, 8, 8, ... s, each +-20 %), and ``INSTAQUEUE_MAX_RETRIES=10``: with
the default 3 a DM that fails 4 times in a row (0.3^4, about 1 in 120 at random) would be
failed on purpose, which is not what this drill is about.

PASS when, after the window, every DM got exactly one reply at the fake, every post was
published exactly once, and for every retried DM the gap between a failed call and the DM's next
call at the fake is at least 0.8x the nominal delay ``min(cap, base * 2**(n-1))`` of its n-th
failure (the fake's own call times; the smallest ratio is printed, and one DM's gaps in full).
Whether a Send lands in a burst is chance, so after the window one probe DM is sent whose
first three Send calls fail (``fake.fail(503, code=2, times=3, ...)``): its three gaps (nominal 1,
2 and 4 s) are always checked.

Usage: ``.venv/bin/python drills/graph_errors.py [--quick] [--window S] [--dms N] [--keep]``
"""

from __future__ import annotations

import json
import random
import threading
import time

from common import Drill, parse_args, run
from _faults_common import (RULE_MATCH, RULE_REPLY, DMLoad, percentile, post_ledger, posts_done, schedule_posts,
                            wait_all_answered)

ACCOUNT = ("17841400000000401", "shop_errors", "TOKEN-drill-errors")
RETRY_BASE, RETRY_CAP, MAX_RETRIES = 1.0, 8.0, 10
SETTINGS = {
    "INSTAQUEUE_RETRY_BASE": str(RETRY_BASE),
    "INSTAQUEUE_RETRY_CAP": str(RETRY_CAP),
    "INSTAQUEUE_MAX_RETRIES": str(MAX_RETRIES),
    "INSTAQUEUE_SCHEDULED_CHECK_INTERVAL": "2",
    "INSTAQUEUE_PUBLISH_STUCK_AFTER": "10",
}
FAIL_SHARE = 0.30
MIN_RATIO = 0.8


def flap(fake, window: float, rng: random.Random, log: list[tuple[float, float]], stop: threading.Event) -> None:
    """Toggle the 503s on and off in random bursts for ``window`` seconds, about FAIL_SHARE of
    the time on; ``log`` gets each burst's (start, end) in time.time()."""
    end = time.monotonic() + window
    while time.monotonic() < end and not stop.is_set():
        off = rng.uniform(0.1, 0.5) * (1 - FAIL_SHARE) / FAIL_SHARE
        if stop.wait(min(off, max(0.0, end - time.monotonic()))) or time.monotonic() >= end:
            break
        on = min(rng.uniform(0.1, 0.5), end - time.monotonic())
        start = time.time()
        fake.fail(503, code=2, times=None)
        stop.wait(on)
        fake.clear_faults()
        log.append((start, time.time()))
    fake.clear_faults()


def nominal(failures: int) -> float:
    return min(RETRY_CAP, RETRY_BASE * 2 ** (failures - 1))


def retry_gaps(fake, account, load: DMLoad) -> dict[str, list[tuple[int, float, float]]]:
    """Per DM (one per sender): [(failure number, gap to the DM's next call, nominal delay)]
    from the fake's call log. A DM's calls are its Send API calls (``POST /messages`` to its
    sender) and the look-ups of its conversation before a resend (``GET /{conversation}``
    asking for messages)."""
    calls = fake.calls
    conversation_of = {s: fake.conversation_id(account.ig_user_id, s) for s in set(load.sender_of.values())}
    per_sender: dict[str, list] = {s: [] for s in conversation_of}
    by_conversation = {c: s for s, c in conversation_of.items()}
    for call in calls:
        if call.method == "POST" and call.path.endswith("/messages") and isinstance(call.body, dict):
            recipient = call.body.get("recipient")
            if isinstance(recipient, str):
                try:
                    recipient = json.loads(recipient)
                except ValueError:
                    recipient = None
            sender = str(recipient.get("id")) if isinstance(recipient, dict) else None
            if sender in per_sender:
                per_sender[sender].append(call)
        elif call.method == "GET" and "messages" in call.query.get("fields", ""):
            sender = by_conversation.get(call.path.strip("/"))
            if sender is not None:
                per_sender[sender].append(call)
    gaps: dict[str, list[tuple[int, float, float]]] = {}
    for sender, own in per_sender.items():
        own.sort(key=lambda c: c.time)
        failures, found = 0, []
        for call, following in zip(own, own[1:]):
            if call.status >= 500:
                failures += 1
                found.append((failures, following.time - call.time, nominal(failures)))
        if found:
            gaps[sender] = found
    return gaps


def main() -> int:
    def options(parser):
        parser.add_argument("--window", type=float, default=None, help="seconds of 5xx bursts (60; quick 15)")
        parser.add_argument("--dms", type=int, default=None, help="DMs in the window (300; quick 60)")
        parser.add_argument("--posts", type=int, default=None, help="scheduled posts (5; quick 3)")

    args = parse_args(__doc__, add=options)
    window = args.window or (15.0 if args.quick else 60.0)
    dms = args.dms or (60 if args.quick else 300)
    n_posts = args.posts or (3 if args.quick else 5)
    rng = random.Random(args.seed)

    with Drill("graph_errors", settings=SETTINGS, keep=args.keep) as d:
        iq = d.iq
        print(f"graph_errors: 503 code 2 in random bursts, ~{FAIL_SHARE:.0%} of a {window:g} s window; {dms} DMs "
              f"(one per sender), {n_posts} posts; INSTAQUEUE_RETRY_BASE={RETRY_BASE:g} "
              f"INSTAQUEUE_RETRY_CAP={RETRY_CAP:g} INSTAQUEUE_MAX_RETRIES={MAX_RETRIES}", flush=True)
        account = d.add_account(*ACCOUNT, rule=(RULE_MATCH, RULE_REPLY))
        worker = d.worker("w1")
        beat = d.beat("b1")
        load = DMLoad(iq, d.fake, account, first_sender=9_400_000, per_sender=1)
        now = iq.utcnow()
        posts = schedule_posts(iq, account, [now + iq.timedelta(seconds=2 + (i + 0.5) * window / n_posts)
                                             for i in range(n_posts)], "errors drill post")

        bursts: list[tuple[float, float]] = []
        stop = threading.Event()
        flapper = threading.Thread(target=flap, args=(d.fake, window, random.Random(args.seed + 1), bursts, stop),
                                   daemon=True)
        window_start = time.time()
        flapper.start()
        try:
            load.send_paced(dms, window * 0.95, rng)
            flapper.join()
        finally:
            stop.set()
            flapper.join()
            d.fake.clear_faults()
        window_end = time.time()
        on_share = sum(e - s for s, e in bursts) / (window_end - window_start)
        deadline = time.monotonic() + 120 + 0.1 * dms
        waited = wait_all_answered([load], timeout=deadline - time.monotonic(), settle=0, procs=[worker, beat])
        while time.monotonic() < deadline and not posts_done(iq, posts) and worker.alive():
            time.sleep(0.25)
        # The schedule probe: one more DM, once nothing else is retrying, whose first three sends
        # fail (retries after 1, 2, 4 s), so that the schedule is checked however the bursts fell.
        d.fake.fail(503, code=2, times=3, method="POST", path_contains="/messages")
        probe = load.send()
        probe_sender = load.sender_of[probe]
        dms += 1
        wait_all_answered([load], timeout=40, settle=0, procs=[worker, beat])
        time.sleep(4)  # time for a duplicate to show up

        ledger = load.ledger()
        posts_out = post_ledger(iq, d.fake, account, posts)
        calls = d.fake.calls
        in_window = [c for c in calls if window_start <= c.time <= window_end]
        failed_calls = sum(1 for c in in_window if c.status >= 500)
        publish_ok = sum(1 for c in calls if c.method == "POST" and c.path.endswith("/media_publish") and c.status == 200)
        gaps = retry_gaps(d.fake, account, load)
        ratios = [gap / nom for found in gaps.values() for _, gap, nom in found]
        too_soon = [(s, n, round(g, 2), nom) for s, found in gaps.items() for n, g, nom in found if g < MIN_RATIO * nom]
        probe_gaps = gaps.get(probe_sender, [])
        deepest = max(((s, f) for s, f in gaps.items() if s != probe_sender), key=lambda kv: len(kv[1]), default=None)
        with iq.session() as db:
            attempts = db.exec(iq.select(iq.InboundMessage.attempts).where(
                iq.InboundMessage.account_id == account.id)).all()
        latencies = list(ledger["latency"].values())

        print(f"graph_errors: bursts {len(bursts)}, 503s on {on_share:.0%} of the window; calls in the window "
              f"{len(in_window)}, answered 503 {failed_calls} ({failed_calls / max(1, len(in_window)):.0%})")
        print(f"graph_errors: DMs {ledger['sent']}, answered {ledger['answered']}, missing {ledger['missing']}, "
              f"duplicate replies {ledger['duplicates']}, replies not recorded {ledger['unrecorded_replies']}, "
              f"rows {ledger['statuses']}; transient failures per DM max {max(attempts, default=0)}, "
              f"DMs retried {sum(1 for a in attempts if a)}")
        print(f"graph_errors: posts {posts_out['posts']}, published {posts_out['published']}, duplicate media "
              f"{posts_out['duplicates']}, media_publish answered 200: {publish_ok}, rows {posts_out['statuses']}")
        print(f"graph_errors: all answered {waited:.1f} s after the window; latency p50 {percentile(latencies, 50):.2f} s "
              f"p95 {percentile(latencies, 95):.2f} s max {max(latencies, default=float('nan')):.2f} s")
        print(f"graph_errors: retry gaps checked {len(ratios)} ({len(gaps) - bool(probe_gaps)} DMs retried in the window "
              f"and the probe); gap / nominal delay min "
              f"{min(ratios, default=float('nan')):.2f}, median {percentile(ratios, 50):.2f}; below {MIN_RATIO}: "
              f"{len(too_soon)} {too_soon[:5]}")
        for label, found in (("the probe DM", probe_gaps), (f"e.g. the DM from {deepest[0]}" if deepest else "", 
                                                          deepest[1] if deepest else [])):
            if found:
                print(f"graph_errors: {label}: " + ", ".join(
                    f"failure {n}: next call after {g:.2f} s (nominal {nom:g} s)" for n, g, nom in found))
        for p in posts_out["statuses"]:
            if p != "published":
                print(f"graph_errors: some posts are {p}")
        ok = (ledger["answered"] == dms and ledger["missing"] == 0 and ledger["duplicates"] == 0
              and ledger["unrecorded_replies"] == 0 and posts_out["published"] == n_posts
              and posts_out["duplicates"] == 0 and publish_ok == n_posts and len(probe_gaps) == 3 and not too_soon
              and worker.alive() and beat.alive() and failed_calls > 0)
        return d.verdict(ok, answered=f"{ledger['answered']}/{dms}", missing=ledger["missing"],
                         duplicates=ledger["duplicates"], published=f"{posts_out['published']}/{n_posts}",
                         duplicate_posts=posts_out["duplicates"], failed_calls=failed_calls,
                         fail_share=f"{on_share:.2f}", retry_gaps=len(ratios),
                         min_gap_ratio=f"{min(ratios, default=float('nan')):.2f}", too_soon=len(too_soon))


if __name__ == "__main__":
    run(main)
