"""The DM pipeline end to end: real worker and beat processes, real Redis and PostgreSQL, and the
fake Graph API over loopback. Retry delays are scaled down through settings (conftest)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from conftest import ROOT, wait_until

import instaqueue
from instaqueue import Account, AccountState, InboundMessage, MessageStatus, select

pytestmark = pytest.mark.integration

REPLY = "Prices start at 20 EUR."


def rows(**where) -> list[InboundMessage]:
    with instaqueue.session() as db:
        query = select(InboundMessage).order_by(InboundMessage.id)
        for key, value in where.items():
            query = query.where(getattr(InboundMessage, key) == value)
        return list(db.exec(query).all())


def account_row(account_id: int) -> Account:
    with instaqueue.session() as db:
        return db.get(Account, account_id)


def posts_to_messages(fake, token):
    return [c for c in fake.calls_matching("POST", "/messages") if c.token == token]


def test_dm_is_answered_exactly_once_by_rule(account, fake_graph, spawn):
    spawn("worker")
    spawn("beat")
    graph_id = fake_graph.add_dm(account.ig_user_id, "900", "Hi! What's the PRICE?", sender_username="ana")
    sent = wait_until(lambda: fake_graph.sent_messages(account.ig_user_id), what="the reply")
    time.sleep(3)  # six more polls see the same thread, now with our own reply in it
    sent = fake_graph.sent_messages(account.ig_user_id)
    assert [(s["recipient_id"], s["text"]) for s in sent] == [("900", REPLY)]
    [row] = rows()
    assert (row.graph_message_id, row.status, row.sender_username) == (graph_id, MessageStatus.replied, "ana")
    assert row.reply_graph_message_id == sent[0]["message_id"] and row.replied_at.tzinfo is not None
    assert row.attempts == 0 and row.last_error is None


def test_a_dm_no_rule_answers_is_left_for_a_human(account, fake_graph, spawn):
    spawn("worker")
    spawn("beat")
    fake_graph.add_dm(account.ig_user_id, "901", "hello, is anyone there?")
    wait_until(lambda: rows(status=MessageStatus.needs_human), what="hand-off to a human")
    assert fake_graph.sent_messages(account.ig_user_id) == []
    assert posts_to_messages(fake_graph, account.access_token) == []


def test_many_dms_from_many_people_each_get_one_reply(account, fake_graph, spawn):
    spawn("worker")
    spawn("beat")
    for i in range(30):
        fake_graph.add_dm(account.ig_user_id, str(1000 + i), f"price for item {i}?")
    wait_until(lambda: len(fake_graph.sent_messages(account.ig_user_id)) >= 30, timeout=40, what="30 replies")
    time.sleep(2)
    recipients = sorted(s["recipient_id"] for s in fake_graph.sent_messages(account.ig_user_id))
    assert recipients == sorted(str(1000 + i) for i in range(30))
    assert {r.status for r in rows()} == {MessageStatus.replied}


def test_dm_during_an_outage_is_retried_on_the_schedule_and_answered_after(account, fake_graph, spawn):
    fake_graph.fail(500, code=2, is_transient=True, times=2, method="POST", path_contains="/messages")
    spawn("worker")
    spawn("beat")
    fake_graph.add_dm(account.ig_user_id, "900", "price?")
    wait_until(lambda: rows(status=MessageStatus.replied), timeout=30, what="the reply after the outage")
    posts = posts_to_messages(fake_graph, account.access_token)
    assert [c.status for c in posts] == [500, 500, 200]
    gaps = [b.time - a.time for a, b in zip(posts, posts[1:])]
    # Scaled schedule: 0.5 s then 1 s, each ±20 %, plus the look-before-resend call.
    assert 0.4 <= gaps[0] <= 0.6 + 1.0, gaps
    assert 0.8 <= gaps[1] <= 1.2 + 1.0, gaps
    assert len(fake_graph.sent_messages(account.ig_user_id)) == 1
    [row] = rows()
    assert row.attempts == 2


def test_dm_fails_with_the_reason_after_three_retries(account, fake_graph, spawn):
    fake_graph.fail(503, code=1, times=None, method="POST", path_contains="/messages",
                    message="Service temporarily unavailable")
    spawn("worker")
    spawn("beat")
    fake_graph.add_dm(account.ig_user_id, "900", "price?")
    [row] = wait_until(lambda: rows(status=MessageStatus.failed), timeout=30, what="the failure")
    assert len(posts_to_messages(fake_graph, account.access_token)) == 4  # first try + 3 retries
    assert row.attempts == 4
    assert "gave up after 4 attempts" in row.last_error and "Service temporarily unavailable" in row.last_error


def test_a_permanent_error_fails_at_once(account, fake_graph, spawn):
    fake_graph.fail(400, code=10, subcode=2534022, times=None, method="POST", path_contains="/messages",
                    message="This message is sent outside of allowed window.")
    spawn("worker")
    spawn("beat")
    fake_graph.add_dm(account.ig_user_id, "900", "price?")
    [row] = wait_until(lambda: rows(status=MessageStatus.failed), what="the failure")
    assert len(posts_to_messages(fake_graph, account.access_token)) == 1
    assert "outside of allowed window" in row.last_error and row.attempts == 0


def test_token_invalid_parks_the_account_and_stops_calling_for_it(db, account, fake_graph, spawn):
    with instaqueue.session() as s:
        other = Account(ig_user_id="17841400000000002", username="other", access_token="TOKEN-other")
        s.add(other)
        s.commit()
        s.add(instaqueue.ReplyRule(account_id=other.id, match="price", reply="Other prices."))
        s.commit()
    fake_graph.add_account(other.ig_user_id, other.username, other.access_token)
    fake_graph.revoke_token(account.access_token)
    spawn("worker")
    spawn("beat")
    fake_graph.add_dm(other.ig_user_id, "900", "price?")
    wait_until(lambda: account_row(account.id).state == AccountState.needs_reauth, what="parking")
    assert "access token rejected" in account_row(account.id).state_reason
    assert account.access_token not in account_row(account.id).state_reason
    calls_then = len([c for c in fake_graph.calls if c.token == account.access_token])
    wait_until(lambda: fake_graph.sent_messages(other.ig_user_id), what="the other account's reply")
    time.sleep(2)
    assert len([c for c in fake_graph.calls if c.token == account.access_token]) == calls_then == 1


def test_a_rate_limit_backs_the_account_off_for_metas_estimate(account, fake_graph, spawn):
    fake_graph.rate_limit(account.ig_user_id, code=80002, minutes=1, times=1)
    spawn("worker")
    spawn("beat")
    fake_graph.add_dm(account.ig_user_id, "900", "price?")
    wait_until(lambda: account_row(account.id).backoff_until, what="the back-off")
    until = account_row(account.id).backoff_until
    assert timedelta(seconds=50) < until - instaqueue.utcnow() <= timedelta(seconds=61)
    calls_then = len(fake_graph.calls)
    time.sleep(3)
    assert len(fake_graph.calls) == calls_then, "no call inside the back-off window"
    with instaqueue.session() as s:  # let the window pass
        instaqueue.update_where(s, Account, [Account.id == account.id], backoff_until=instaqueue.utcnow())
        s.commit()
    wait_until(lambda: fake_graph.sent_messages(account.ig_user_id), what="the reply after the back-off")


def test_high_usage_slows_the_accounts_polling(account, fake_graph, spawn):
    spawn("worker")
    spawn("beat")
    time.sleep(3)
    normal = len(fake_graph.calls_matching("GET", "/conversations"))
    fake_graph.set_usage(business={account.ig_user_id: [{"type": "instagram", "call_count": 95,
                                                          "total_cputime": 10, "total_time": 10,
                                                          "estimated_time_to_regain_access": 0}]})
    wait_until(lambda: account_row(account.id).dm_next_poll_at, what="the slowdown")
    start = len(fake_graph.calls_matching("GET", "/conversations"))
    time.sleep(3)
    slowed = len(fake_graph.calls_matching("GET", "/conversations")) - start
    assert normal >= 4 and slowed <= 1, (normal, slowed)


def test_sigkill_while_sending_still_ends_in_exactly_one_reply(account, fake_graph, spawn):
    # Instagram takes the message, then its answer is late: the worker dies waiting for it.
    fake_graph.delay(5, times=1, method="POST", path_contains="/messages")
    worker = spawn("worker")
    spawn("beat")
    fake_graph.add_dm(account.ig_user_id, "900", "price?")
    wait_until(lambda: fake_graph.sent_messages(account.ig_user_id), what="the send to reach Instagram")
    worker.kill()
    [row] = rows()
    assert row.status == MessageStatus.sending
    restarted = spawn("worker")
    [row] = wait_until(lambda: rows(status=MessageStatus.replied), timeout=60, what="the reply to be recorded")
    sent = fake_graph.sent_messages(account.ig_user_id)
    assert len(sent) == 1
    assert row.reply_graph_message_id == sent[0]["message_id"]
    assert "reply already sent" in restarted.text()


def test_sigkill_before_the_send_ends_in_exactly_one_reply(account, fake_graph, spawn):
    # The look-before-resend and the send both wait; kill while the first attempt is in flight.
    fake_graph.fail(500, code=2, is_transient=True, times=1, method="POST", path_contains="/messages")
    fake_graph.delay(5, times=1, method="GET", path_contains="/aWdf")
    worker = spawn("worker")
    spawn("beat")
    fake_graph.add_dm(account.ig_user_id, "900", "price?")
    wait_until(lambda: fake_graph.calls_matching("GET", "/aWdf"), timeout=20, what="the look before resending")
    worker.kill()
    assert fake_graph.sent_messages(account.ig_user_id) == []
    spawn("worker")
    wait_until(lambda: rows(status=MessageStatus.replied), timeout=60, what="the reply")
    time.sleep(1)
    assert len(fake_graph.sent_messages(account.ig_user_id)) == 1


def test_task_sent_from_another_process_runs_on_python_m_worker(account, fake_graph, spawn, tmp_path):
    worker = spawn("worker")
    graph_id = fake_graph.add_dm(account.ig_user_id, "900", "what does it cost")
    with instaqueue.session() as s:
        row = InboundMessage(account_id=account.id, graph_message_id=graph_id, conversation_id=fake_graph.
                             conversation_id(account.ig_user_id, "900"), sender_id="900", text="what does it cost",
                             created_time=instaqueue.utcnow())
        s.add(row)
        s.commit()
    code = ("import instaqueue; r = instaqueue.process_instagram_message.delay(%d); print(r.get(timeout=30)); "
            "print(instaqueue.noop.apply_async(('pong',), queue='low').get(timeout=30))" % row.id)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["replied", "pong"]
    assert len(fake_graph.sent_messages(account.ig_user_id)) == 1
    log = worker.text()
    assert "instaqueue.process_instagram_message" in log
    assert "unregistered" not in log.lower() and "__main__" not in log


def test_high_is_served_first_under_a_backlog(db, spawn):
    low = [instaqueue.noop.apply_async((i,), queue="low") for i in range(30)]
    default = [instaqueue.noop.apply_async((i,), queue="default") for i in range(10)]
    high = instaqueue.noop.apply_async(("high",), queue="high")
    spawn("worker", "-c", "1")
    assert high.get(timeout=30) == "high"
    for r in low + default:
        r.get(timeout=60)
    order = sorted([(r.date_done, "low") for r in low] + [(r.date_done, "default") for r in default]
                   + [(high.date_done, "high")])
    kinds = [k for _, k in order]
    assert kinds.index("high") <= 1, kinds[:5]
    assert max(i for i, k in enumerate(kinds) if k == "default") < min(i for i, k in enumerate(kinds) if k == "low") + 2


def test_the_token_appears_in_no_log_argument_or_result(account, fake_graph, spawn):
    fake_graph.revoke_token("nothing")  # unrelated; the account's own token works
    fake_graph.fail(500, code=2, times=1, method="POST", path_contains="/messages",
                    message=f"Echoing {account.access_token} back")
    worker = spawn("worker")
    beat = spawn("beat")
    fake_graph.add_dm(account.ig_user_id, "900", "price?")
    wait_until(lambda: rows(status=MessageStatus.replied), timeout=30, what="the reply")
    import redis
    client = redis.Redis.from_url(os.environ["INSTAQUEUE_REDIS_URL"])
    stored = b"".join(client.dump(k) or b"" for k in client.keys("*"))
    assert account.access_token.encode() not in stored
    assert account.access_token not in worker.text() + beat.text()
    [row] = rows()
    assert account.access_token not in (row.last_error or "")


def test_polls_go_after_replies_but_before_default_and_low_work(db, spawn):
    """kombu reads message priority before queue order: each queue's band keeps the order."""
    low = [instaqueue.noop.apply_async((i,), queue="low", priority=instaqueue.PRIORITY_LOW_QUEUE) for i in range(20)]
    default = [instaqueue.noop.apply_async((i,), queue="default", priority=instaqueue.PRIORITY_DEFAULT_QUEUE)
               for i in range(10)]
    poll = instaqueue.noop.apply_async(("poll",), queue="high", priority=instaqueue.POLL_PRIORITY)
    reply = instaqueue.noop.apply_async(("reply",), queue="high")
    spawn("worker", "-c", "1")
    for r in [poll, reply, *default, *low]:
        r.get(timeout=60)
    order = [k for _, k in sorted([(r.date_done, "low") for r in low] + [(r.date_done, "default") for r in default]
                                  + [(poll.date_done, "poll"), (reply.date_done, "reply")])]
    assert order[:2] == ["reply", "poll"], order[:5]
    assert set(order[2:12]) == {"default"}, order
