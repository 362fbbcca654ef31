"""Drill: two beats started at once send as one; a killed active beat is replaced.

Two ``python -m instaqueue beat`` processes (each with its own schedule file) start at the same
moment against one Redis. ``SingleBeatScheduler`` must let exactly one of them send. Midway
the active one (the one that has sent) is SIGKILLed, process group and all; the standby must
take over within the beat lock's TTL. At the end both logs' ``Scheduler: Sending due task
<name>`` lines are parsed with their timestamps.

PASS when
- at no moment did both send: the two sets of send times never interleave (every send of one
  beat precedes every send of the other, or only one beat sent), and the first beat's sends
  stop at its kill;
- the standby took over, within ``BEAT_LOCK_TTL`` (+5 s of slack on a loaded machine);
- ``poll-instagram-messages`` was sent about once per ``dm_poll_interval`` (0.5 s) while a beat
  was active: between 0.75x and 1.25x of (window - take-over gap) / interval -- two sending
  beats would double it.

Usage (from the repository root)::

    .venv/bin/python drills/two_beats.py            # a 90 s window, the kill at 45 s
    .venv/bin/python drills/two_beats.py --quick    # a 30 s window, the kill at 15 s
    .venv/bin/python drills/two_beats.py --seconds 120 --keep
"""

from __future__ import annotations

import re
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from common import Drill, parse_args, run

SEND = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): [A-Z]+/[^\]]*\] "
                  r"Scheduler: Sending due task (\S+)", re.M)
ACTIVE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): [A-Z]+/[^\]]*\] this beat is now the active one",
                    re.M)
STANDBY = "another beat is active; this one stands by"
POLL = "poll-instagram-messages"
#: Slack on top of BEAT_LOCK_TTL for the take-over on a loaded 2-CPU machine.
TAKEOVER_SLACK = 5.0


def add_options(parser: Any) -> None:
    parser.add_argument("--seconds", type=float, help="the window, from start to stop (90; quick 30)")


def stamp(text: str) -> float:
    """A log timestamp (local time, as logging writes it) as epoch seconds."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def sends(log: Path) -> list[tuple[float, str]]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return [(stamp(m[1]), m[2]) for m in SEND.finditer(text)]


def became_active(log: Path) -> list[float]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return [stamp(m[1]) for m in ACTIVE.finditer(text)]


def main() -> int:
    args = parse_args(__doc__, add=add_options)
    seconds = args.seconds if args.seconds is not None else (30.0 if args.quick else 90.0)
    with Drill("two_beats", keep=args.keep) as d:
        iq = d.iq
        ttl, interval = iq.BEAT_LOCK_TTL, iq.settings.dm_poll_interval
        if seconds / 2 < ttl + TAKEOVER_SLACK:
            raise SystemExit(f"--seconds must be at least {2 * (ttl + TAKEOVER_SLACK):g} (a take-over needs {ttl:g} s)")
        print(f"two_beats: 2 beats started at once, a {seconds:g} s window, the active one SIGKILLed at "
              f"{seconds / 2:g} s; beat lock TTL {ttl:g} s, poll interval {interval:g} s", flush=True)

        start = time.time()
        beats = [d.beat("beat-a", wait=False), d.beat("beat-b", wait=False)]
        for beat in beats:
            beat.wait_for_log("beat: Starting", timeout=60)
        ready = time.time()

        time.sleep(max(0.0, start + seconds / 2 - time.time()))
        sent_by = {b.name: sends(b.log) for b in beats}
        active = max(beats, key=lambda b: (len(sent_by[b.name]), -beats.index(b)))
        standby = next(b for b in beats if b is not active)
        killed_at = time.time()
        active.kill()
        print(f"two_beats: {active.name} was active ({len(sent_by[active.name])} sends, "
              f"{standby.name} {len(sent_by[standby.name])}); SIGKILLed it at {killed_at - start:.1f} s", flush=True)

        time.sleep(max(0.0, start + seconds - time.time()))
        end = time.time()
        standby.stop()

        a_sends = [s for s in sends(active.log) if start <= s[0] <= end]
        b_sends = [s for s in sends(standby.log) if start <= s[0] <= end]
        a_times, b_times = [t for t, _ in a_sends], [t for t, _ in b_sends]
        interleaved = bool(a_times and b_times) and not (max(a_times) < min(b_times) or max(b_times) < min(a_times))
        both_before_kill = [t for t in b_times if t < killed_at]
        after_kill_a = [t for t in a_times if t > killed_at + 0.05]
        takeover_line = [t for t in became_active(standby.log) if t >= killed_at]
        takeover = (min(b_times) - killed_at) if [t for t in b_times if t >= killed_at] else None
        takeover_active = (takeover_line[0] - killed_at) if takeover_line else None
        polls = sum(1 for _, name in a_sends + b_sends if name == POLL)
        window = end - start
        # A beat was active from its first send to the kill, and from the take-over to the end.
        sending_time = (killed_at - min(a_times, default=killed_at)) + \
            (end - killed_at - takeover if takeover is not None else 0.0)
        expected = sending_time / interval
        naive = window / interval
        per_task = Counter(name for _, name in a_sends + b_sends)
        stood_by = STANDBY in standby.text()

        print(f"start: both beats up {ready - start:.1f} s after their start")
        print(f"sends: {active.name} {len(a_times)} (first {min(a_times, default=start) - start:.1f} s, "
              f"last {max(a_times, default=start) - start:.1f} s), {standby.name} {len(b_times)} (first "
              f"{min(b_times, default=start) - start:.1f} s, last {max(b_times, default=start) - start:.1f} s); "
              f"per task {dict(per_task)}")
        print(f"overlap: interleaved {interleaved}; {standby.name} sent {len(both_before_kill)} times before the "
              f"kill; {active.name} logged 'stands by' {STANDBY in active.text()}, {standby.name} {stood_by}")
        print("take-over: " + (f"first send {takeover:.1f} s after the kill" if takeover is not None else "NONE")
              + (f", 'now the active one' {takeover_active:.1f} s after" if takeover_active is not None else "")
              + f" (lock TTL {ttl:g} s)")
        print(f"polls: {polls} {POLL} sends in {window:.1f} s; {expected:.0f} expected while a beat was active "
              f"({sending_time:.1f} s / {interval:g} s), {naive:.0f} for the whole window, {2 * expected:.0f} if doubled")
        ok = (not interleaved and not both_before_kill and not after_kill_a and bool(a_times)
              and takeover is not None and takeover <= ttl + TAKEOVER_SLACK
              and 0.75 * expected <= polls <= 1.25 * expected)
        return d.verdict(ok, interleaved=interleaved, sends_a=len(a_times), sends_b=len(b_times),
                         polls=polls, polls_expected=round(expected), polls_window=round(naive),
                         takeover_s=(round(takeover, 1) if takeover is not None else None))


if __name__ == "__main__":
    run(main)
