"""Running it like production: one beat with a standby, health and status, Flower behind
credentials, and a worker's graceful shutdown. Real processes throughout."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from datetime import datetime

import httpx
import pytest
from conftest import Proc, wait_until
from test_cli import cli

import instaqueue
from instaqueue import InboundMessage, MessageStatus, select

pytestmark = pytest.mark.integration

SENT = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/MainProcess\] Scheduler: Sending due task", re.M)


def send_times(proc: Proc) -> list[float]:
    return [datetime.strptime(m, "%Y-%m-%d %H:%M:%S,%f").timestamp() for m in SENT.findall(proc.text())]


def test_a_standby_beat_takes_over_after_sigkill_and_both_never_send(db, spawn):
    first = spawn("beat")
    first.wait_for_log("this beat is now the active one", timeout=15)
    second = spawn("beat")
    second.wait_for_log("another beat is active; this one stands by", timeout=15)
    time.sleep(3)
    assert send_times(first) and not send_times(second)
    first.kill()
    killed_at = time.time()
    second.wait_for_log("this beat is now the active one", timeout=20)
    wait_until(lambda: send_times(second), timeout=5, what="the standby's first send")
    takeover = send_times(second)[0] - killed_at
    assert takeover <= 15, takeover
    assert max(send_times(first)) < min(send_times(second))  # never both


def test_health_needs_broker_database_a_worker_and_a_fresh_beat(db, spawn):
    without = cli("health")
    assert without.returncode == 1
    lines = without.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["broker", "database", "workers", "beat"]
    assert lines[0].startswith("broker: ok") and lines[1].startswith("database: ok")
    assert lines[2].startswith("workers: FAIL") and lines[3].startswith("beat: FAIL")
    spawn("worker")
    spawn("beat").wait_for_log("this beat is now the active one", timeout=15)
    healthy = cli("health")
    assert healthy.returncode == 0, healthy.stdout
    assert all(" ok (" in line for line in healthy.stdout.splitlines())


def test_health_fails_on_an_unreachable_database_in_one_line(db):
    done = cli("health", env={**os.environ, "INSTAQUEUE_DATABASE_URL": "postgresql+psycopg://u:secret9@127.0.0.1:1/x"})
    assert done.returncode == 1
    line = next(line for line in done.stdout.splitlines() if line.startswith("database:"))
    assert "FAIL" in line and "secret9" not in done.stdout


def test_status_reports_queues_workers_beat_and_waiting_work(account, spawn):
    for i in range(3):
        instaqueue.noop.apply_async((i,), queue="low")
    with instaqueue.session() as s:
        s.add(InboundMessage(account_id=account.id, graph_message_id="m1", conversation_id="c", sender_id="9",
                             text="hi", created_time=instaqueue.utcnow()))
        s.commit()
    report = json.loads(cli("status", "--json").stdout)
    assert report["queues"] == {"high": 0, "default": 0, "low": 3}
    assert report["workers_online"] == 0 and report["beat_heartbeat_age_s"] is None
    assert report["dms_waiting"] == 1 and report["accounts_needing_reauth"] == 0
    text = cli("status").stdout
    assert "queues: high 0, default 0, low 3" in text and "dms waiting: 1" in text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flower_refuses_to_start_without_credentials(db):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INSTAQUEUE_FLOWER", "FLOWER_"))}
    env["INSTAQUEUE_FLOWER_BASIC_AUTH"] = ""  # empty, so that a developer's .env cannot supply one
    done = cli("flower", env=env)
    assert done.returncode == 2 and "refusing to start Flower without credentials" in done.stderr
    assert done.stderr.count("\n") == 1
    loopback_only = cli("flower", env={**env, "INSTAQUEUE_FLOWER_INSECURE_LOCAL": "true"})
    assert loopback_only.returncode == 2  # the opt-out needs a loopback address too


def test_flower_answers_401_without_credentials_and_lists_workers_with_them(db, spawn, tmp_path):
    spawn("worker")
    port = free_port()
    env = {**os.environ, "INSTAQUEUE_FLOWER_BASIC_AUTH": "ops:s3cret-pw", "INSTAQUEUE_FLOWER_ADDRESS": "127.0.0.1",
           "FLOWER_UNAUTHENTICATED_API": "true"}
    flower = Proc(["flower", f"--port={port}"], tmp_path / "flower.log", env, None).start()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(f"{base}/healthcheck"), timeout=30, what="Flower")
        assert httpx.get(f"{base}/api/workers").status_code == 401
        assert httpx.get(f"{base}/", follow_redirects=True).status_code == 401
        workers = wait_until(lambda: httpx.get(f"{base}/api/workers?refresh=1", auth=("ops", "s3cret-pw")).json(),
                             timeout=20, what="the worker list")
        assert any(name.startswith("w0@") for name in workers)
        result = instaqueue.noop.apply_async(("x",), queue="low", countdown=30)
        revoked = httpx.post(f"{base}/api/task/revoke/{result.id}", auth=("ops", "s3cret-pw"))
        assert revoked.status_code == 200
        assert httpx.post(f"{base}/api/task/revoke/{result.id}", auth=("ops", "wrong")).status_code == 401
    finally:
        flower.stop()
    assert "s3cret-pw" not in flower.text()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_sigterm_finishes_or_requeues_running_work_within_the_grace(account, fake_graph, spawn):
    fake_graph.delay(8, times=1, method="POST", path_contains="/messages")  # a send that hangs past the grace
    worker = spawn("worker", env={"INSTAQUEUE_SHUTDOWN_GRACE": "2", "INSTAQUEUE_GRAPH_TIMEOUT": "10",
                                  "INSTAQUEUE_VISIBILITY_TIMEOUT": "60"})
    spawn("beat")
    fake_graph.add_dm(account.ig_user_id, "900", "price?")
    wait_until(lambda: fake_graph.sent_messages(account.ig_user_id), what="the send to be under way")
    started = time.monotonic()
    worker.popen.send_signal(signal.SIGTERM)
    worker.popen.wait(20)
    took = time.monotonic() - started
    assert took < 2 + 5, took
    spawn("worker")
    wait_until(lambda: _rows(status=MessageStatus.replied), timeout=60, what="the requeued DM")
    assert len(fake_graph.sent_messages(account.ig_user_id)) == 1


def _rows(**where):
    with instaqueue.session() as s:
        query = select(InboundMessage)
        for key, value in where.items():
            query = query.where(getattr(InboundMessage, key) == value)
        return s.exec(query).all()
