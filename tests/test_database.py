"""Tables and database helpers on real PostgreSQL (and SQLite for the embedded default)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlmodel import Session, SQLModel

import instaqueue
from instaqueue import Account, InboundMessage, MessageStatus, insert_once

pytestmark = pytest.mark.integration


def make_message(account_id: int, graph_id: str = "m1") -> dict:
    return dict(account_id=account_id, graph_message_id=graph_id, conversation_id="c1", sender_id="900",
                text="hi", created_time=datetime(2026, 11, 24, 9, tzinfo=timezone.utc), status="received",
                attempts=0, next_attempt_at=instaqueue.utcnow(), received_at=instaqueue.utcnow())


@pytest.fixture
def acc(db):
    with instaqueue.session() as s:
        a = Account(ig_user_id="1", username="u", access_token="T")
        s.add(a)
        s.commit()
        return a


def test_timestamps_come_back_timezone_aware_in_utc(acc):
    berlin = datetime(2026, 3, 29, 3, 30, tzinfo=__import__("zoneinfo").ZoneInfo("Europe/Berlin"))
    with instaqueue.session() as s:
        instaqueue.update_where(s, Account, [Account.id == acc.id], backoff_until=berlin)
        s.commit()
    with instaqueue.session() as s:
        value = s.get(Account, acc.id).backoff_until
    assert value == berlin and value.utcoffset() == timedelta(0)


def test_naive_timestamps_are_refused(acc):
    with instaqueue.session() as s, pytest.raises(sa.exc.StatementError, match="naive datetime"):
        instaqueue.update_where(s, Account, [Account.id == acc.id], backoff_until=datetime(2026, 1, 1))


def test_a_graph_message_id_is_stored_once(acc):
    with instaqueue.session() as s:
        first = insert_once(s, InboundMessage, make_message(acc.id))
        second = insert_once(s, InboundMessage, make_message(acc.id))
        s.commit()
        assert first is not None and second is None
        assert s.exec(sa.select(sa.func.count()).select_from(InboundMessage)).scalar_one() == 1


def test_racing_claims_have_exactly_one_winner(acc):
    with instaqueue.session() as s:
        message_id = insert_once(s, InboundMessage, make_message(acc.id))
        s.commit()
    results, barrier = [], threading.Barrier(8)

    def claim():
        barrier.wait()
        results.append(instaqueue.claim_message(message_id, reply_text="r", rule_id=None))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    token, row = winners[0]
    assert row.status == MessageStatus.sending and row.claim_token == token
    # While the claim is live nobody takes it over; after it runs out, exactly one can.
    assert instaqueue.claim_message(message_id) is None
    with instaqueue.session() as s:
        instaqueue.update_where(s, InboundMessage, [InboundMessage.id == message_id],
                                claimed_until=instaqueue.utcnow() - timedelta(seconds=1))
        s.commit()
    assert instaqueue.claim_message(message_id) is not None
    assert instaqueue.claim_message(message_id) is None


def test_a_late_worker_cannot_overwrite_a_newer_claim(acc):
    with instaqueue.session() as s:
        message_id = insert_once(s, InboundMessage, make_message(acc.id))
        s.commit()
    old_token, _ = instaqueue.claim_message(message_id, reply_text="r")
    instaqueue.release_claim(message_id, old_token)
    new_token, _ = instaqueue.claim_message(message_id)
    instaqueue.finish_message(message_id, old_token, status=MessageStatus.failed)
    with instaqueue.session() as s:
        assert s.get(InboundMessage, message_id).status == MessageStatus.sending
    instaqueue.finish_message(message_id, new_token, status=MessageStatus.replied)
    with instaqueue.session() as s:
        assert s.get(InboundMessage, message_id).status == MessageStatus.replied


def test_the_same_helpers_work_on_sqlite(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    SQLModel.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(Account(ig_user_id="1", username="u", access_token="T"))
        s.commit()
        assert insert_once(s, InboundMessage, make_message(1)) == 1
        assert insert_once(s, InboundMessage, make_message(1)) is None
        s.commit()
        row = s.get(InboundMessage, 1)
        assert row.created_time.tzinfo is not None and row.created_time.hour == 9


def test_account_repr_hides_the_token(acc):
    assert "access_token" not in repr(acc) and "T'" not in repr(acc)


def test_one_reply_can_answer_only_one_dm(acc):
    with instaqueue.session() as s:
        first = insert_once(s, InboundMessage, make_message(acc.id, "m1"))
        second = insert_once(s, InboundMessage, make_message(acc.id, "m2"))
        s.commit()
    token1, _ = instaqueue.claim_message(first, reply_text="r")
    token2, _ = instaqueue.claim_message(second, reply_text="r")
    instaqueue.finish_message(first, token1, status=MessageStatus.replied, reply_graph_message_id="reply-1")
    with pytest.raises(sa.exc.IntegrityError):
        instaqueue.finish_message(second, token2, status=MessageStatus.replied, reply_graph_message_id="reply-1")
