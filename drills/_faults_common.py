"""Helpers shared by the fault drills redis_restart, postgres_restart, graph_errors,
rate_limit_storm and bad_input, on top of ``common.py`` (the shared harness; nothing here
changes it):

* :class:`OwnRedis` -- a ``redis-server`` of the drill's own (AOF on, fsync always) that can be
  stopped with SIGTERM and started again on the same port and directory;
* :class:`OwnPostgres` -- a PostgreSQL cluster of the drill's own (``initdb`` / ``pg_ctl`` run as
  the unprivileged user ``tests/services.py`` uses) that can be restarted with
  ``pg_ctl restart -m fast``;
* :class:`DMLoad` -- sends DMs to the fake (a few per sender, so each conversation stays inside
  the 20 messages Graph lets us read) and checks at the fake that each was answered exactly once;
* :func:`schedule_posts` / :func:`post_ledger` -- scheduled posts, and whether each went out
  exactly once.

A drill that brings its own Redis or PostgreSQL points ``INSTAQUEUE_TEST_REDIS_URL`` /
``INSTAQUEUE_TEST_DATABASE_URL`` at it before entering ``common.Drill``, whose
``tests/services.py`` then uses it as given.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from common import ROOT  # noqa: F401  (sets sys.path for tests/)
from services import (  # noqa: E402
    _die_with_parent, _free_port, _pg_binaries, _redis_ping, _stop_postgres, _tail, _unprivileged)

RULE_MATCH = "price, cost"
RULE_REPLY = "Prices start at 20 EUR."
#: DMs per sender: with our replies a conversation holds at most 2x this many messages, well
#: inside the 20 Graph lets us read (a reply looked up after a crash must still be readable).
DMS_PER_SENDER = 5


# Services of the drill's own #################################################################

class OwnRedis:
    """``redis-server`` on a free loopback port with ``--appendonly yes --appendfsync always``
    in its own directory: what it acknowledged survives a SIGTERM and a start again."""

    def __init__(self, workdir: Path) -> None:
        self.exe = shutil.which("redis-server")
        if not self.exe:
            raise RuntimeError("redis_restart needs redis-server on PATH (it restarts its own Redis)")
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "redis.log"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30) -> "OwnRedis":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir),
                 "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not _redis_ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer on port {self.port}: {_tail(self.log, 3)}")
            time.sleep(0.05)
        # PONG comes before the AOF is loaded (LOADING errors until then): wait for the data.
        while b"loading:1" in self._info():
            time.sleep(0.05)
        return self

    def _info(self) -> bytes:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"INFO persistence\r\n")
                return sock.recv(65536)
        except OSError:
            return b""

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM (Redis flushes the AOF and exits); the exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode


class OwnPostgres:
    """A PostgreSQL cluster of the drill's own, made and driven with ``initdb`` / ``pg_ctl`` like
    ``tests/services.py`` does (as an unprivileged user when we are root), so that the drill can
    restart it: ``restart()`` is ``pg_ctl restart -m fast`` (open connections are cut)."""

    def __init__(self) -> None:
        binaries = _pg_binaries()
        if binaries is None:
            raise RuntimeError("postgres_restart needs initdb and pg_ctl (PATH or /usr/lib/postgresql/*/bin)")
        self.initdb, self.pg_ctl = binaries
        runas = _unprivileged()
        if isinstance(runas, str):
            raise RuntimeError(runas)
        self.prefix, user = runas
        # The unix socket lives here: a short path an unprivileged user can reach.
        self.workdir = Path(tempfile.mkdtemp(prefix="iq-drill-pg-"))
        if user is not None:
            os.chown(self.workdir, user.pw_uid, user.pw_gid)
            os.chmod(self.workdir, 0o700)
        self.data, self.log = self.workdir / "data", self.workdir / "postgres.log"
        self.port, self.options = 0, ""
        self.running = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/test"

    def _run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.prefix + args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              cwd=self.workdir, timeout=timeout)

    def start(self) -> "OwnPostgres":
        import psycopg

        done = self._run([self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                          "--locale=C"], timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {(done.stderr or done.stdout).strip()[-300:]}")
        for _attempt in range(3):  # the free port may be taken before postgres binds it
            self.port = _free_port()
            self.options = options = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
            done = self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", options,
                              "-w", "-t", "30", "start"], timeout=45)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"pg_ctl start failed: {_tail(self.log, 3) or done.stderr.strip()}")
        self.running = True
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             connect_timeout=5, autocommit=True) as conn:
            conn.execute("CREATE DATABASE test")
        return self

    def restart(self, down: float = 0.0) -> float:
        """``pg_ctl restart -m fast`` (the options of the last start are reused); with ``down``,
        ``pg_ctl stop -m fast``, that many seconds, then ``pg_ctl start``. Seconds taken."""
        started = time.monotonic()
        steps = [["-m", "fast", "restart"]] if not down else [["-m", "fast", "stop"], ["-o", self.options, "start"]]
        for i, step in enumerate(steps):
            if i:
                time.sleep(down)
            done = self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", *step],
                             timeout=90)
            if done.returncode != 0:
                raise RuntimeError(f"pg_ctl {step[-1]} failed: {_tail(self.log, 3) or done.stderr.strip()}")
        return time.monotonic() - started

    def stop(self) -> None:
        if self.running:
            self.running = False
            _stop_postgres(self.prefix, self.pg_ctl, self.data, self.workdir, own_dir=True)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


# DMs #########################################################################################

@dataclass
class DMLoad:
    """DMs sent to one account at the fake, and the check that each got exactly one reply."""

    iq: Any
    fake: Any
    account: Any
    first_sender: int
    per_sender: int = DMS_PER_SENDER
    sent_at: dict[str, float] = field(default_factory=dict)  # graph message id -> time.time()
    sender_of: dict[str, str] = field(default_factory=dict)  # graph message id -> sender id
    _next: int = 0

    def send(self, text: str | None = None) -> str:
        """One DM from the next sender in turn (each sender writes at most ``per_sender``)."""
        n = self._next
        self._next += 1
        sender = str(self.first_sender + n // self.per_sender)
        graph_id = self.fake.add_dm(self.account.ig_user_id, sender, text or f"Hi! What's the price of item {n}?",
                                    sender_username=f"p{sender}")
        self.sent_at[graph_id] = time.time()
        self.sender_of[graph_id] = sender
        return graph_id

    def send_paced(self, count: int, seconds: float, rng: random.Random,
                   on_progress: Any = None) -> None:
        """``count`` DMs spread over about ``seconds`` (random gaps); ``on_progress(i)`` after each."""
        gap = seconds / max(1, count)
        next_at = time.monotonic()
        for i in range(count):
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.send()
            if on_progress:
                on_progress(i + 1)
            next_at += rng.uniform(0.5 * gap, 1.5 * gap)

    def rows(self) -> list[Any]:
        iq = self.iq
        with iq.session() as db:
            return list(db.exec(iq.select(iq.InboundMessage).where(
                iq.InboundMessage.account_id == self.account.id)).all())

    def answered(self) -> int:
        """DMs whose row is replied (cheap enough to poll)."""
        iq = self.iq
        with iq.session() as db:
            return db.exec(iq.select(iq.sa.func.count()).select_from(iq.InboundMessage).where(
                iq.InboundMessage.account_id == self.account.id,
                iq.InboundMessage.status == iq.MessageStatus.replied)).one()

    def done(self) -> bool:
        return self.answered() >= len(self.sent_at) and \
            len(self.fake.sent_messages(self.account.ig_user_id)) >= len(self.sent_at)

    def ledger(self) -> dict[str, Any]:
        """What reached Instagram against what was sent: answered (exactly one reply recorded
        and delivered), missing, duplicates (replies beyond one per DM), per-DM latency."""
        replies = self.fake.sent_messages(self.account.ig_user_id)
        reply_time = {r["message_id"]: r["time"].timestamp() for r in replies}
        rows = {r.graph_message_id: r for r in self.rows()}
        per_recipient = Counter(r["recipient_id"] for r in replies)
        written = Counter(self.sender_of.values())
        latency: dict[str, float] = {}
        statuses: Counter[str] = Counter()
        missing = []
        for graph_id, t0 in self.sent_at.items():
            row = rows.get(graph_id)
            statuses[str(row.status) if row else "not stored"] += 1
            t1 = reply_time.get(row.reply_graph_message_id or "") if row else None
            if row is None or row.status != self.iq.MessageStatus.replied or t1 is None:
                missing.append(graph_id)
                continue
            latency[graph_id] = t1 - t0
        recorded = {r.reply_graph_message_id for r in rows.values() if r.reply_graph_message_id}
        duplicates = sum(max(0, per_recipient[s] - n) for s, n in written.items()) \
            + sum(n for s, n in per_recipient.items() if s not in written)
        unrecorded = sum(1 for r in replies if r["message_id"] not in recorded)
        return dict(sent=len(self.sent_at), answered=len(latency), missing=len(missing), duplicates=duplicates,
                    replies=len(replies), unrecorded_replies=unrecorded, statuses=dict(statuses),
                    latency=latency, missing_ids=missing[:5])


def wait_all_answered(loads: list[DMLoad], timeout: float, settle: float = 3.0, procs: Any = ()) -> float:
    """Wait until every DM of ``loads`` is answered (or ``timeout``, or one of ``procs`` has
    died: nothing will answer then), then ``settle`` more seconds in which a duplicate would
    show up. Seconds waited before the settle."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline and not all(load.done() for load in loads):
        if any(not proc.alive() for proc in procs):
            break
        time.sleep(0.25)
    waited = time.monotonic() - started
    time.sleep(settle)
    return waited


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    k = (len(ordered) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# Scheduled posts #############################################################################

def schedule_posts(iq: Any, account: Any, times: list[Any], prefix: str) -> dict[int, str]:
    """One image post per time in ``times`` (aware datetimes), captions ``PREFIX i``; id -> caption."""
    out = {}
    with iq.session() as db:
        for i, at in enumerate(times):
            caption = f"{prefix} {i}"
            post = iq.ScheduledPost(account_id=account.id, kind=iq.PostKind.image, caption=caption, publish_at=at,
                                    media=[{"type": "image", "url": f"https://cdn.example.com/{prefix.replace(' ', '-')}-{i}.jpg"}])
            db.add(post)
            db.commit()
            out[post.id] = caption
    return out


def spread_times(iq: Any, count: int, start_in: float, over: float) -> list[Any]:
    now = iq.utcnow()
    step = over / max(1, count)
    return [now + timedelta(seconds=start_in + i * step) for i in range(count)]


def post_ledger(iq: Any, fake: Any, account: Any, posts: dict[int, str]) -> dict[str, Any]:
    """Each post published exactly once: its row published, one media with its caption at the fake."""
    with iq.session() as db:
        rows = {p.id: p for p in db.exec(iq.select(iq.ScheduledPost).where(
            iq.ScheduledPost.id.in_(list(posts)))).all()}
    media = Counter(m["caption"] for m in fake.published_media(account.ig_user_id))
    statuses = Counter(str(rows[p].status) if p in rows else "missing" for p in posts)
    published = sum(1 for p, caption in posts.items()
                    if p in rows and rows[p].status == iq.PostStatus.published and media[caption] >= 1)
    duplicates = sum(max(0, media[caption] - 1) for caption in posts.values())
    return dict(posts=len(posts), published=published, duplicates=duplicates, statuses=dict(statuses))


def posts_done(iq: Any, posts: dict[int, str]) -> bool:
    with iq.session() as db:
        statuses = db.exec(iq.select(iq.ScheduledPost.status).where(iq.ScheduledPost.id.in_(list(posts)))).all()
    return len(statuses) == len(posts) and all(s in iq.FINAL_POST_STATES for s in statuses)


def crash_summary(text: str, limit: int = 4) -> str:
    """The CRITICAL/ERROR lines of a process log and the instaqueue.py frames of its last
    traceback, compactly (Celery's beat writes a traceback one fragment per log line)."""
    lines = text.splitlines()
    loud = [line for line in lines if "CRITICAL/" in line or "ERROR/" in line][-limit:]
    frames, seen = [], set()
    for line in lines:
        if 'instaqueue.py", line' in line:
            frame = line[line.index("File "):].strip()
            if frame not in seen:
                seen.add(frame)
                frames.append(frame)
    return "\n".join(["  " + line[:300] for line in loud] + ["  " + f for f in frames[-limit:]]) or "  (nothing logged)"
