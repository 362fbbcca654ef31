"""Drill: no access token and no Flower password anywhere a run leaves traces.

(Named ``secret_leaks.py``, not ``secrets.py``: a drill's folder is ``sys.path[0]``, and a
``drills/secrets.py`` would shadow the standard ``secrets`` module for instaqueue and the fake.)

A short load runs on one worker, one beat and Flower (``python -m instaqueue flower`` with
``INSTAQUEUE_FLOWER_BASIC_AUTH`` and ``INSTAQUEUE_FLOWER_ADDRESS=127.0.0.1``; every process gets
the same environment, as from one shared ``.env``), with distinctive tokens:

- account A answers DMs by a rule; its first Send API call answers HTTP 500 (retried);
- account B's token is revoked: its DM poll gets code 190 and parks it;
- a scheduled post of A is published; a watched post of A is polled and a spam comment hidden;
- at the end A's token is refreshed (``refresh_access_tokens``: the one call that carries the
  token in its query string), and one more DM is answered with the new token
  (``--no-refresh`` leaves this out).

Then every trace is scanned for the tokens (old and refreshed; as they are and base64-encoded,
as kombu stores message bodies) and the Flower password:

- every log file of the run (processes', Redis's, PostgreSQL's when it was started here);
- every Redis key: strings, lists (the kombu queues), hashes (``unacked``), sets, sorted sets,
  Celery results -- message bodies decoded -- and each key's DUMP;
- every PostgreSQL table and column, EXCEPT ``account.access_token`` (where a token must be);
- Flower's pages, fetched with the credentials: /workers, /tasks, /api/tasks, /api/workers,
  /broker, each /worker/<name> and up to 40 /task/<id>; and Flower must refuse them without.

PASS: zero hits (each hit is printed with where it is), and the load did what it should.

Usage (from the repository root)::

    .venv/bin/python drills/secret_leaks.py            # 30 DMs on A
    .venv/bin/python drills/secret_leaks.py --quick    # 5 DMs on A
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import socket
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable

import httpx
import redis

from common import Drill, parse_args, run, wait_until

ACCOUNT_A = "17841400000000011"
ACCOUNT_B = "17841400000000012"
RULE = ("price, cost", "Prices start at 20 EUR.")
FLOWER_USER = "drill"


def add_options(parser: Any) -> None:
    parser.add_argument("--dms", type=int, help="DMs to account A (30; quick 5)")
    parser.add_argument("--no-refresh", action="store_true", help="leave the token refresh out of the load")


# What to look for ############################################################################

def needles(secret: str) -> list[bytes]:
    """The secret as it is, and the parts of its base64 (standard and URL-safe) that do not
    depend on its neighbours, at each of the three alignments."""
    raw = secret.encode()
    found = [raw]
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * shift + raw)
            start, end = (shift * 8 + 5) // 6, ((shift + len(raw)) * 8) // 6
            part = encoded[start:end]
            if len(part) >= 16 and part not in found:
                found.append(part)
    return found


class Scanner:
    def __init__(self, secrets_by_name: dict[str, str]) -> None:
        self.needles = {name: needles(value) for name, value in secrets_by_name.items()}
        self.hits: list[str] = []
        self.scanned: dict[str, int] = {}

    def count(self, kind: str, n: int = 1) -> None:
        self.scanned[kind] = self.scanned.get(kind, 0) + n

    def check(self, where: str, data: bytes | str) -> None:
        blob = data.encode(errors="replace") if isinstance(data, str) else data
        for name, forms in self.needles.items():
            for form in forms:
                at = blob.find(form)
                if at >= 0:
                    how = "" if form is forms[0] else " (base64)"
                    context = blob[max(0, at - 60):at + len(form) + 20].decode(errors="replace")
                    self.hits.append(f"{name}{how} in {where}: ...{' '.join(context.split())}...")
                    break

    def check_lines(self, where: str, data: bytes) -> None:
        """A file: hits reported by line number."""
        if not any(form in data for forms in self.needles.values() for form in forms):
            return
        for number, line in enumerate(data.splitlines(), 1):
            self.check(f"{where}:{number}", line)


def decoded(value: bytes) -> Iterable[bytes]:
    """A Redis value, and what kombu and Celery hide inside it: JSON message envelopes whose
    ``body`` is base64, nested in lists (the ``unacked`` hash holds [message, exchange, key])."""
    yield value
    try:
        parsed = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return
    stack = [parsed]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            body = item.get("body")
            if isinstance(body, str):
                try:
                    yield base64.b64decode(body, validate=True)
                except (binascii.Error, ValueError):
                    pass
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


# Where to look ###############################################################################

def scan_files(scanner: Scanner, files: Iterable[Path]) -> None:
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            scanner.hits.append(f"could not read {path}: {exc}")
            continue
        scanner.count("log files")
        scanner.count("log bytes", len(data))
        scanner.check_lines(str(path), data)


def scan_redis(scanner: Scanner, url: str, when: str = "") -> None:
    """Every key's value by its type (message bodies decoded) and its DUMP; ``when`` labels the
    snapshot (hits carry it)."""
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(count=500):
        name = key.decode(errors="replace")
        kind = client.type(key).decode()
        values: list[tuple[str, bytes]] = []
        if kind == "string":
            values = [("", client.get(key) or b"")]
        elif kind == "list":
            values = [(f"[{i}]", v) for i, v in enumerate(client.lrange(key, 0, -1))]
        elif kind == "hash":
            values = [(f"[{k.decode(errors='replace')}]", k + b" " + v) for k, v in client.hgetall(key).items()]
        elif kind == "set":
            values = [("{}", v) for v in client.smembers(key)]
        elif kind == "zset":
            values = [("{}", v) for v, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            values = [(f"<{i.decode()}>", json.dumps({k.decode(): v.decode(errors="replace") for k, v in f.items()}).encode())
                      for i, f in client.xrange(key)]
        scanner.count(f"Redis keys{when}")
        scanner.count(f"Redis values{when}", len(values))
        scanner.check(f"Redis{when} {kind} {name!r} (key name)", key)
        for suffix, value in values:
            for n, blob in enumerate(decoded(value)):
                scanner.check(f"Redis{when} {kind} {name!r}{suffix}" + (" (decoded body)" if n else ""), blob)
        dump = client.dump(key)
        if dump:
            scanner.check(f"Redis{when} DUMP {name!r}", dump)


def scan_database(scanner: Scanner, iq: Any) -> str | None:
    """Every table and column except account.access_token; returns the server's log file when
    it is one this run started (next to the data directory)."""
    sa = iq.sa
    engine = iq.get_engine()
    inspector = sa.inspect(engine)
    with engine.connect() as connection:
        for table in inspector.get_table_names():
            columns = [c["name"] for c in inspector.get_columns(table)
                       if not (table == "account" and c["name"] == "access_token")]
            if not columns:
                continue
            select = sa.text(f"SELECT {', '.join(f'{chr(34)}{c}{chr(34)}' for c in columns)} FROM {chr(34)}{table}{chr(34)}")
            rows = connection.execute(select).all()
            scanner.count("database tables")
            scanner.count("database rows", len(rows))
            for number, row in enumerate(rows, 1):
                for column, value in zip(columns, row):
                    if value is None:
                        continue
                    text = value if isinstance(value, (str, bytes)) else json.dumps(value, default=str)
                    scanner.check(f"PostgreSQL {table}.{column} (row {number})", text)
        try:
            data_dir = connection.execute(sa.text("SHOW data_directory")).scalar()
        except Exception:
            return None
    log = Path(str(data_dir)).parent / "postgres.log"
    return str(log) if log.is_file() else None


def scan_flower(scanner: Scanner, base_url: str, user: str, password: str) -> list[str]:
    """Fetch Flower's pages with the credentials; returns problems with Flower itself."""
    problems: list[str] = []
    auth = httpx.BasicAuth(user, password)
    with httpx.Client(base_url=base_url, timeout=15) as client:
        for path in ("/workers", "/tasks"):
            if client.get(path).status_code != 401:
                problems.append(f"Flower answered {path} without credentials")
        pages = ["/workers", "/tasks", "/api/tasks", "/api/workers", "/broker"]
        answers: dict[str, httpx.Response] = {}
        for path in pages:
            answers[path] = client.get(path, auth=auth)
        try:
            tasks = answers["/api/tasks"].json()
        except ValueError:
            tasks = {}
            problems.append(f"/api/tasks answered {answers['/api/tasks'].status_code}, not JSON")
        try:
            workers = list(answers["/api/workers"].json())
        except ValueError:
            workers = []
        if not tasks:
            problems.append("Flower saw no tasks")
        extra = [f"/worker/{name}" for name in workers] + [f"/task/{task_id}" for task_id in list(tasks)[:40]]
        for path in extra:
            answers[path] = client.get(path, auth=auth)
        for path, response in answers.items():
            scanner.count("Flower pages")
            if response.status_code != 200:
                problems.append(f"Flower {path} answered {response.status_code}")
            scanner.check(f"Flower {path}", response.content)
    return problems


def key_summary(client: Any) -> str:
    keys = sorted(k.decode(errors="replace") for k in client.scan_iter(count=500))
    kinds = Counter("celery-task-meta-*" if k.startswith("celery-task-meta-") else k for k in keys)
    return ", ".join(k + (f" x{n}" if n > 1 else "") for k, n in sorted(kinds.items()))


# The drill ###################################################################################

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    args = parse_args(__doc__, add=add_options)
    dms = args.dms if args.dms is not None else (5 if args.quick else 30)
    token_a = "IGQWRA" + secrets.token_hex(20) + "A"
    token_b = "IGQWRB" + secrets.token_hex(20) + "B"
    flower_password = "flowerpw" + secrets.token_hex(12)
    settings = {
        "INSTAQUEUE_FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{flower_password}",
        "INSTAQUEUE_FLOWER_ADDRESS": "127.0.0.1",
        "INSTAQUEUE_COMMENT_POLL_INTERVAL": "3",
    }
    with Drill("secret_leaks", settings=settings, keep=args.keep) as d:
        iq, fake = d.iq, d.fake
        a = d.add_account(ACCOUNT_A, "shop_a", token_a, rule=RULE)
        b = d.add_account(ACCOUNT_B, "shop_b", token_b, rule=RULE)
        fake.revoke_token(token_b)
        fake.fail(500, times=1, method="POST", path_contains="/messages")
        now = iq.utcnow()
        media_id = fake.add_media(ACCOUNT_A, caption="summer sale", timestamp=now - timedelta(hours=1))
        spam = fake.add_comment(media_id, "get cheap followers now", username="spammer")
        fake.add_comment(media_id, "love it", username="fan")
        with iq.session() as db:
            db.add(iq.ScheduledPost(account_id=a.id, kind=iq.PostKind.image, caption="secret drill post",
                                    media=[{"type": "image", "url": "https://cdn.example.com/drill/post.jpg"}],
                                    publish_at=now + timedelta(seconds=12)))
            db.add(iq.ModerationRule(account_id=a.id, kind=iq.ModerationKind.block, pattern="cheap followers",
                                     action=iq.ModerationAction.hide))
            db.add(iq.MonitoredPost(account_id=a.id, media_id=media_id, poll_interval=3.0, next_poll_at=now))
            if not args.no_refresh:  # A's token is due for its refresh (issued 50 days ago, 10 left)
                account = db.get(iq.Account, a.id)
                account.token_issued_at = now - timedelta(days=50)
                account.token_expires_at = now + timedelta(days=5)
                db.add(account)
            db.commit()

        port = free_port()
        flower_url = f"http://127.0.0.1:{port}"
        d.spawn("flower", ["flower", f"--port={port}"], ready=f":{port}")
        d.worker("worker")
        d.beat("beat")
        for i in range(dms):
            fake.add_dm(ACCOUNT_A, str(9_300_000 + i % 3), f"what is the price of item {i}?",
                        sender_username=f"buyer{i % 3}")
        fake.add_dm(ACCOUNT_B, "9400001", "price?", sender_username="other")
        # A snapshot of Redis mid-load, while messages wait in the queues and in ``unacked``
        # (the post's task waits there for its ETA); the final scan finds them drained.
        client = redis.Redis.from_url(d.redis_url)
        waited = time.monotonic()
        held = wait_until(lambda: client.hlen("unacked"), timeout=20, interval=0.05)
        print(f"secret_leaks: mid-load snapshot after {time.monotonic() - waited:.1f} s, {held} message(s) unacked",
              flush=True)
        scanner = Scanner({"token A": token_a, "token B": token_b, "Flower password": flower_password})
        scan_redis(scanner, d.redis_url, when=" (mid-load)")
        mid_keys = key_summary(client)

        def parked() -> bool:
            with iq.session() as db:
                return db.get(iq.Account, b.id).state == iq.AccountState.needs_reauth

        def load_done() -> bool:
            return (len(fake.sent_messages(ACCOUNT_A)) >= dms and parked()
                    and any(m["caption"] == "secret drill post" for m in fake.published_media(ACCOUNT_A))
                    and fake.comment(spam)["hidden"])

        finished = wait_until(load_done, timeout=120, interval=0.5)
        problems = [] if finished else [
            f"load incomplete after 120 s: A replies {len(fake.sent_messages(ACCOUNT_A))}/{dms}, B parked "
            f"{parked()}, post published {bool(fake.published_media(ACCOUNT_A)[1:])}, spam hidden "
            f"{fake.comment(spam)['hidden']}"]
        if not any(c.status == 500 for c in fake.calls_matching("POST", "/messages")):
            problems.append("the Send API never answered 500")
        refreshed: list[str] = []
        if not args.no_refresh:
            result = iq.refresh_access_tokens.delay()
            print(f"secret_leaks: refresh_access_tokens -> {result.get(timeout=60)}", flush=True)
            refreshed = fake.refreshed_tokens(ACCOUNT_A)
            if not refreshed:
                problems.append("A's token was not refreshed")
            fake.add_dm(ACCOUNT_A, "9300009", "and the cost of shipping?", sender_username="late")
            if not wait_until(lambda: len(fake.sent_messages(ACCOUNT_A)) >= dms + 1, timeout=60):
                problems.append("no reply with the refreshed token")
        time.sleep(2)  # Flower takes in the last events

        secrets_by_name = {"token A": token_a, "token B": token_b, "Flower password": flower_password}
        for i, token in enumerate(refreshed):
            secrets_by_name[f"refreshed token A#{i + 1}"] = token
        scanner.needles.update((name, needles(value)) for name, value in secrets_by_name.items())
        problems += scan_flower(scanner, flower_url, FLOWER_USER, flower_password)
        for proc in reversed(d.procs):  # their logs complete, shutdown included
            proc.stop()
        pg_log = scan_database(scanner, iq)
        scan_redis(scanner, d.redis_url)
        # Self-check, so that zero hits means something: a canary in a kombu message body
        # (base64) must be found in Redis, the base64 forms at every alignment, and the token
        # where it must be, in account.access_token.
        canary = "canary" + secrets.token_hex(12)
        iq.noop.apply_async((canary,), queue="drill-canary")
        canary_scan = Scanner({"canary": canary})
        scan_redis(canary_scan, d.redis_url)
        for key in client.scan_iter(match="*drill-canary*"):
            client.delete(key)
        token_scan = Scanner({"token A": refreshed[-1] if refreshed else token_a, "canary": canary})
        with iq.session() as db:
            token_scan.check("account.access_token", db.get(iq.Account, a.id).access_token)
        for shift in range(3):
            token_scan.check(f"base64 at +{shift}", base64.b64encode(b"x" * shift + canary.encode() + b"yz"))
        if not any("(decoded body)" in hit for hit in canary_scan.hits) or len(token_scan.hits) != 4:
            problems.append(f"the scanner missed planted secrets: {canary_scan.hits} {token_scan.hits}")
        files = d.log_files() + ([Path(pg_log)] if pg_log else [])
        scan_files(scanner, files)

        published = sum(1 for m in fake.published_media(ACCOUNT_A) if m["caption"] == "secret drill post")
        print(f"load: A answered {len(fake.sent_messages(ACCOUNT_A))} DMs (Send API 500s: "
              f"{sum(1 for c in fake.calls_matching('POST', '/messages') if c.status == 500)}, retried), B parked "
              f"{parked()} (190s: {sum(1 for c in fake.calls if c.status == 400 and c.token == token_b)}), post "
              f"published {published}x, spam comment hidden {fake.comment(spam)['hidden']}, token refreshed "
              f"{len(refreshed)}x")
        print("scanned: " + ", ".join(f"{v} {k}" for k, v in scanner.scanned.items()))
        print(f"  log files: {', '.join(p.name for p in files)}")
        print(f"  Redis keys mid-load: {mid_keys}")
        print(f"  Redis keys at the end: {key_summary(client)}")
        for problem in problems:
            print(f"PROBLEM: {problem}")
        for hit in scanner.hits:
            print(f"HIT: {hit}")
        ok = not scanner.hits and not problems
        return d.verdict(ok, hits=len(scanner.hits), problems=len(problems),
                         log_files=scanner.scanned.get("log files", 0),
                         redis_keys=scanner.scanned.get("Redis keys", 0),
                         db_rows=scanner.scanned.get("database rows", 0),
                         flower_pages=scanner.scanned.get("Flower pages", 0))


if __name__ == "__main__":
    run(main)
