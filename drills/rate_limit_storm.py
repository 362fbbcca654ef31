"""Fault drill: Meta rate-limits two accounts for a minute while a third keeps working.

Three accounts, one worker, one beat, real Redis and PostgreSQL (``common.Drill``), the fake
Graph API. After a baseline (DMs to every account, B's reply latency measured), the fake
rate-limits account A4 with code 4 and account A8 with code 80002, both with
``estimated_time_to_regain_access`` 1 minute (``fake.rate_limit(A, code=..., minutes=1)``, which
also sets the usage headers): A4's limit hits its next call (a DM poll, before a burst of DMs is
read), A8's while a burst of its DMs is being answered (Send API calls in flight). For the next
minute and a bit DMs keep arriving for all three accounts.

PASS when:

* no call for A4 or A8 reaches the fake inside its back-off window, from 1 s after the call that
  was rate-limited (calls already under way may land in that second) until the account row's
  ``backoff_until`` (the calls in that first second are counted and printed too);
* account B is unaffected: never backed off, all its DMs answered, its reply latency during the
  storm within max(2x, +1.5 s) of its own baseline p95;
* afterwards every DM of every account got exactly one reply.

Usage: ``.venv/bin/python drills/rate_limit_storm.py [--quick] [--keep]``
"""

from __future__ import annotations

import random
import threading
import time

from common import Drill, parse_args, run
from _faults_common import RULE_MATCH, RULE_REPLY, DMLoad, percentile, wait_all_answered

A4 = ("17841400000000501", "shop_a4", "TOKEN-drill-rate-a4")
A8 = ("17841400000000502", "shop_a8", "TOKEN-drill-rate-a8")
B = ("17841400000000503", "shop_b", "TOKEN-drill-rate-b")
RATE_LIMIT_CODES = {4, 17, 32, 613, *range(80000, 80100)}
#: Calls already under way when the limit was answered may reach the fake this long after it.
IN_FLIGHT = 1.0


def rate_limited_calls(fake, token: str) -> list:
    out = []
    for call in fake.calls:
        error = call.response.get("error") if isinstance(call.response, dict) else None
        if call.token == token and isinstance(error, dict) and error.get("code") in RATE_LIMIT_CODES:
            out.append(call)
    return out


def main() -> int:
    def options(parser):
        parser.add_argument("--burst", type=int, default=None, help="DMs per limited account at the limit (30; quick 15)")

    args = parse_args(__doc__, add=options)
    burst = args.burst or (15 if args.quick else 30)
    b_gap = 1.0 if args.quick else 0.4  # seconds between B's DMs during the storm
    a_gap = 4.0 if args.quick else 1.5  # seconds between A4's / A8's DMs during the storm
    rng = random.Random(args.seed)

    with Drill("rate_limit_storm", keep=args.keep) as d:
        iq = d.iq
        accounts = {name: d.add_account(*spec, rule=(RULE_MATCH, RULE_REPLY))
                    for name, spec in (("A4", A4), ("A8", A8), ("B", B))}
        loads = {name: DMLoad(iq, d.fake, acc, first_sender=9_500_000 + 10_000 * i)
                 for i, (name, acc) in enumerate(accounts.items())}
        token = {"A4": A4[2], "A8": A8[2], "B": B[2]}
        print(f"rate_limit_storm: A4 code 4, A8 code 80002, 1 minute each; B untouched; bursts of {burst}, "
              f"B writes every {b_gap:g} s, A4/A8 every {a_gap:g} s", flush=True)
        worker = d.worker("w1")
        beat = d.beat("b1")

        # Baseline: every account works; B's latency without a storm.
        for i in range(10):
            for load in loads.values():
                load.send()
            time.sleep(0.3)
        wait_all_answered(list(loads.values()), timeout=30, settle=1.0, procs=[worker, beat])
        baseline = list(loads["B"].ledger()["latency"].values())

        # The storm. A4: limited before its burst is read (the next call is a poll).
        d.fake.rate_limit(A4[0], code=4, minutes=1)
        for _ in range(burst):
            loads["A4"].send()
        # A8: limited while its burst is being answered.
        replied_before = len(d.fake.sent_messages(A8[0]))
        for _ in range(burst):
            loads["A8"].send()
        deadline = time.monotonic() + 20
        while len(d.fake.sent_messages(A8[0])) <= replied_before and time.monotonic() < deadline:
            time.sleep(0.005)
        d.fake.rate_limit(A8[0], code=80002, minutes=1)
        storm_start = time.time()

        backoffs: dict[str, set] = {"A4": set(), "A8": set(), "B": set()}
        stop = threading.Event()

        def sample() -> None:  # the rows' backoff_until as they change
            while not stop.is_set():
                with iq.session() as db:
                    for name, acc in accounts.items():
                        value = db.get(iq.Account, acc.id).backoff_until
                        if value is not None:
                            backoffs[name].add(value.timestamp())
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        b_storm: set[str] = set()
        next_b, next_a = time.monotonic(), time.monotonic() + a_gap
        storm_until = time.monotonic() + 66
        while time.monotonic() < storm_until:
            now = time.monotonic()
            if now >= next_b:
                b_storm.add(loads["B"].send())
                next_b += rng.uniform(0.5, 1.5) * b_gap
            if now >= next_a:
                loads["A4"].send()
                loads["A8"].send()
                next_a += rng.uniform(0.5, 1.5) * a_gap
            time.sleep(0.02)
        waited = wait_all_answered(list(loads.values()), timeout=60, settle=4.0, procs=[worker, beat])
        stop.set()
        sampler.join()

        # Back-off windows against the fake's call log.
        ok = True
        lines, counts = [], {}
        for name in ("A4", "A8"):
            limited = rate_limited_calls(d.fake, token[name])
            own_calls = [c for c in d.fake.calls if c.token == token[name]]
            violations, in_flight, windows = [], [], []
            for hit in limited:
                ends = [u for u in backoffs[name] if hit.time < u <= hit.time + 70]
                until = max(ends, default=None)
                if until is None:
                    ok = False
                    lines.append(f"{name}: limited at +{hit.time - storm_start:.2f} s but no backoff_until recorded")
                    continue
                windows.append((hit.time, until))
                for c in own_calls:
                    if c is hit or not hit.time < c.time < until:
                        continue
                    (in_flight if c.time < hit.time + IN_FLIGHT else violations).append(c)
            first = limited[0] if limited else None
            lines.append(
                f"{name}: rate-limited calls {len(limited)} ({first.method} {first.path.split('?')[0]} at "
                f"{first.time - storm_start:+.2f} s from the storm's start)" if first else f"{name}: never rate-limited")
            for start, until in windows:
                lines.append(f"{name}: back-off window {until - start:.1f} s (row backoff_until); calls inside: "
                             f"{len(violations)} after the first {IN_FLIGHT:g} s, {len(in_flight)} within it "
                             + ", ".join(f"{c.method} {c.path} +{c.time - start:.3f} s" for c in (violations + in_flight)[:6]))
            ok &= bool(limited) and bool(windows) and not violations
            counts[f"{name}_limited"] = len(limited)
            counts[f"{name}_calls_in_backoff"] = len(violations)
            counts[f"{name}_calls_first_{IN_FLIGHT:g}s"] = len(in_flight)

        # B: never limited, never backed off, latency as before.
        ledger_b = loads["B"].ledger()
        storm_lat = [ledger_b["latency"][g] for g in b_storm if g in ledger_b["latency"]]
        base_p95, storm_p95 = percentile(baseline, 95), percentile(storm_lat, 95)
        bound = max(2 * base_p95, base_p95 + 1.5)
        b_ok = (not backoffs["B"] and not rate_limited_calls(d.fake, token["B"]) and len(storm_lat) == len(b_storm)
                and storm_p95 <= bound)
        ok &= b_ok
        lines.append(f"B: baseline {len(baseline)} DMs p50 {percentile(baseline, 50):.2f} s p95 {base_p95:.2f} s; "
                     f"during the storm {len(storm_lat)}/{len(b_storm)} answered, p50 {percentile(storm_lat, 50):.2f} s "
                     f"p95 {storm_p95:.2f} s max {max(storm_lat, default=float('nan')):.2f} s (bound {bound:.2f} s); "
                     f"backed off {'never' if not backoffs['B'] else 'YES'}")

        # Everyone answered exactly once.
        totals = {}
        for name, load in loads.items():
            ledger = load.ledger()
            totals[name] = ledger
            lines.append(f"{name}: DMs {ledger['sent']}, answered {ledger['answered']}, missing {ledger['missing']}, "
                         f"duplicates {ledger['duplicates']}, rows {ledger['statuses']}")
            ok &= ledger["answered"] == ledger["sent"] and ledger["duplicates"] == 0 and \
                ledger["unrecorded_replies"] == 0
        ok &= worker.alive() and beat.alive()
        for line in lines:
            print(f"rate_limit_storm: {line}")
        print(f"rate_limit_storm: all answered {waited:.1f} s after the storm's DMs stopped")
        return d.verdict(ok, **counts, B_p95=f"{storm_p95:.2f}s", B_baseline_p95=f"{base_p95:.2f}s",
                         answered=" ".join(f"{n}:{t['answered']}/{t['sent']}" for n, t in totals.items()).replace(" ", ","),
                         duplicates=sum(t["duplicates"] for t in totals.values()))


if __name__ == "__main__":
    run(main)
