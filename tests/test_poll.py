"""The DM poll against the fake Graph API and real PostgreSQL: cursor, history, and malformed
payloads that are logged and skipped without costing the good messages."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

import instaqueue
from instaqueue import Account, InboundMessage, read_new_messages, select

pytestmark = pytest.mark.integration

ACCOUNT_ID = "17841400000000001"
_clock = itertools.count(1)


def fresh_account() -> Account:
    with instaqueue.session() as db:
        return db.get(Account, 1)


def stored_ids() -> set[str]:
    with instaqueue.session() as db:
        return set(db.exec(select(InboundMessage.graph_message_id)).all())


def good_conversation(n: int) -> tuple[dict, str]:
    """A valid conversation updated ``n`` seconds after now, with one inbound message."""
    when = (instaqueue.utcnow() + timedelta(seconds=n)).strftime("%Y-%m-%dT%H:%M:%S+0000")
    message_id = f"good-{n}"
    return {"id": f"conv-{n}", "updated_time": when, "messages": {"data": [
        {"id": message_id, "created_time": when, "from": {"id": "900", "username": "ana"},
         "to": {"data": [{"id": ACCOUNT_ID, "username": "shop"}]}, "message": "price?"}]}}, message_id


def test_poll_stores_each_inbound_message_once_and_skips_the_accounts_own(account, fake_graph):
    fake_graph.add_dm(account.ig_user_id, "900", "price?")
    fake_graph.add_dm(account.ig_user_id, "901", "hello")
    new: list[int] = []
    assert read_new_messages(fresh_account(), on_stored=new.extend) == 2
    assert len(new) == 2
    assert read_new_messages(fresh_account(), on_stored=new.extend) == 0  # re-polling is harmless
    with instaqueue.session() as db:
        rows = db.exec(select(InboundMessage)).all()
    assert sorted(r.sender_id for r in rows) == ["900", "901"]
    assert fresh_account().dm_cursor is not None


def test_history_from_before_the_account_was_added_is_not_answered(account, fake_graph):
    fake_graph.add_dm(account.ig_user_id, "900", "old question",
                      created_time=account.created_at - timedelta(hours=3))
    fake_graph.add_dm(account.ig_user_id, "901", "new question")
    read_new_messages(fresh_account(), on_stored=lambda ids: None)
    with instaqueue.session() as db:
        assert [r.text for r in db.exec(select(InboundMessage)).all()] == ["new question"]


def test_unknown_ids_in_the_fallback_are_skipped(account, fake_graph):
    good, good_id = good_conversation(next(_clock))
    fake_graph.respond({"data": [{"id": "no-such-conversation", "updated_time": good["updated_time"]}, good]},
                       path_contains="/conversations")
    read_new_messages(fresh_account(), on_stored=lambda ids: None)
    assert good_id in stored_ids()
    assert fake_graph.calls_matching("GET", "/no-such-conversation")[0].status == 400


def test_conversation_without_expansion_is_read_message_by_message(account, fake_graph):
    fake_graph.add_dm(account.ig_user_id, "900", "price?")
    conversation = fake_graph.conversation_id(account.ig_user_id, "900")
    page = fake_graph.calls  # nothing yet
    assert page == []
    fake_graph.respond({"data": [{"id": conversation, "updated_time": instaqueue.utcnow().strftime(
        "%Y-%m-%dT%H:%M:%S+0000")}]}, path_contains="/conversations")
    read_new_messages(fresh_account(), on_stored=lambda ids: None)
    with instaqueue.session() as db:
        assert [r.text for r in db.exec(select(InboundMessage)).all()] == ["price?"]


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.sampled_from(["id", "data", "from", "message", "created_time", "updated_time", "messages", "to"]),
        c, max_size=4),
    max_leaves=12)


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=st.lists(junk, max_size=3), after=st.lists(junk, max_size=3), paging=junk)
def test_malformed_pages_never_crash_the_poll_or_lose_good_messages(account, fake_graph, before, after, paging):
    good, good_id = good_conversation(next(_clock))
    fake_graph.respond({"data": [*before, good, *after], "paging": paging}, path_contains="/conversations")
    fake_graph.respond({"data": []}, path_contains="/conversations")  # a second page, if one is asked for
    read_new_messages(fresh_account(), on_stored=lambda ids: None)
    assert good_id in stored_ids()
    fake_graph.clear_faults()


@pytest.mark.parametrize("body", [{}, [], {"data": None}, {"data": "x"}, b"not json", {"data": [], "paging": 5}])
def test_a_page_that_is_not_a_page_is_survived(account, fake_graph, body):
    fake_graph.respond(body, path_contains="/conversations")
    try:
        read_new_messages(fresh_account(), on_stored=lambda ids: None)
    except instaqueue.GraphAPIError:
        pass  # a body that is not JSON is a transient error: the next poll tries again
    fake_graph.add_dm(account.ig_user_id, "900", "price?")
    read_new_messages(fresh_account(), on_stored=lambda ids: None)
    assert len(stored_ids()) == 1


def test_nul_surrogates_bad_ids_and_future_times_never_block_the_poll(account, fake_graph):
    when = instaqueue.utcnow().strftime("%Y-%m-%dT%H:%M:%S+0000")
    future = (instaqueue.utcnow() + timedelta(days=3650)).strftime("%Y-%m-%dT%H:%M:%S+0000")
    message = lambda mid, text, t=when: {"id": mid, "created_time": t, "from": {"id": "900"},  # noqa: E731
                                         "message": text}
    fake_graph.respond({"data": [
        {"id": "c-future", "updated_time": future, "messages": {"data": [message("m-future", "hi")]}},
        {"id": "c1", "updated_time": when, "messages": {"data": [
            message("m-nul", "price\x00?"), message("m-surrogate", "hi \ud800 there"), message("bad\x1fid", "x"),
            message("x" * 300, "long id"), message("m-late", "x", future), message("m-ok", "price?")]}},
        {"id": "c\x00bad", "updated_time": when}]}, path_contains="/conversations")
    read_new_messages(fresh_account(), on_stored=lambda ids: None)
    with instaqueue.session() as db:
        rows = {r.graph_message_id: r.text for r in db.exec(select(InboundMessage)).all()}
    assert rows == {"m-nul": "price?", "m-surrogate": "hi ? there", "m-ok": "price?"}
    assert fresh_account().dm_cursor < instaqueue.utcnow() + timedelta(minutes=1)  # not poisoned
    fake_graph.add_dm(account.ig_user_id, "901", "still read afterwards")
    read_new_messages(fresh_account(), on_stored=lambda ids: None)
    assert len(stored_ids()) == 4  # the account's polling goes on
