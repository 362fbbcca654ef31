"""Comment polling and moderation against the fake Graph API and real PostgreSQL; actions on a
real worker."""

from __future__ import annotations

import time
from datetime import timedelta

import httpx
import pytest
from conftest import wait_until

import instaqueue
from instaqueue import ActionStatus, Comment, ModerationRule, MonitoredPost, select

pytestmark = pytest.mark.integration


def watch(account, media_id: str, interval: float = 300) -> int:
    with instaqueue.session() as s:
        watched = MonitoredPost(account_id=account.id, media_id=media_id, poll_interval=interval)
        s.add(watched)
        s.commit()
        return watched.id


def add_rule(account, kind, pattern="", action="hide", text=None) -> int:
    with instaqueue.session() as s:
        rule = ModerationRule(account_id=account.id, kind=kind, pattern=pattern, action=action, text=text)
        s.add(rule)
        s.commit()
        return rule.id


def comments(**where) -> list[Comment]:
    with instaqueue.session() as s:
        query = select(Comment).order_by(Comment.id)
        for key, value in where.items():
            query = query.where(getattr(Comment, key) == value)
        return list(s.exec(query).all())


def watched_row(watched_id: int) -> MonitoredPost:
    with instaqueue.session() as s:
        return s.get(MonitoredPost, watched_id)


def test_ten_thousand_comments_are_read_completely_once(account, fake_graph):
    media = fake_graph.add_media(account.ig_user_id, caption="launch")
    fake_graph.add_comments(media, 10_000, text_fn=lambda i: "buy SPAM now" if i % 100 == 0 else f"nice {i}")
    add_rule(account, "block", "spam")
    watched = watch(account, media)
    assert instaqueue.poll_post_comments(watched) == 10_000
    assert len(fake_graph.calls_matching("GET", f"/{media}/comments")) == 200
    rows = comments()
    assert len(rows) == len({r.graph_comment_id for r in rows}) == 10_000
    flagged = [r for r in rows if r.action == "hide"]
    assert len(flagged) == 100 and all("blocked word 'spam'" in r.reason for r in flagged)
    assert all(r.reason == "no rule matched" for r in rows if r.action == "none")
    # A second poll reads one page, meets known comments and makes no new decision.
    assert instaqueue.poll_post_comments(watched) == 0
    assert len(fake_graph.calls_matching("GET", f"/{media}/comments")) == 201
    assert len(comments()) == 10_000


def test_new_comments_and_replies_since_the_last_poll_are_read(account, fake_graph):
    media = fake_graph.add_media(account.ig_user_id)
    first = fake_graph.add_comment(media, "first")
    watched = watch(account, media)
    assert instaqueue.poll_post_comments(watched) == 1
    fake_graph.add_comment(media, "second")
    fake_graph.add_comment(media, "a reply", parent_id=first)
    assert instaqueue.poll_post_comments(watched) == 2
    assert [r.parent_id for r in comments(text="a reply")] == [first]


def test_the_interval_shortens_on_activity_and_lengthens_when_quiet(account, fake_graph):
    media = fake_graph.add_media(account.ig_user_id)
    watched = watch(account, media, interval=1200)
    instaqueue.poll_post_comments(watched)  # quiet
    assert watched_row(watched).poll_interval == 1800
    fake_graph.add_comment(media, "hello")
    instaqueue.poll_post_comments(watched)
    row = watched_row(watched)
    assert row.poll_interval == 900
    assert timedelta(seconds=899) < row.next_poll_at - row.last_polled_at < timedelta(seconds=901)


def test_an_old_post_stops_being_watched(account, fake_graph):
    media = fake_graph.add_media(account.ig_user_id, timestamp=instaqueue.utcnow() - timedelta(days=31))
    watched = watch(account, media)
    instaqueue.poll_post_comments(watched)
    assert not watched_row(watched).active


def test_moderation_actions_happen_once_on_a_real_worker(account, fake_graph, spawn):
    media = fake_graph.add_media(account.ig_user_id)
    add_rule(account, "block", "spam", action="hide")
    add_rule(account, "links", action="delete")
    add_rule(account, "block", "price", action="reply", text="See our DMs!")
    add_rule(account, "block", "size", action="dm", text="Which size do you need?")
    hidden = fake_graph.add_comment(media, "Ｓ Ｐ Ａ Ｍ", from_id="501")
    deleted = fake_graph.add_comment(media, "cheap at deals.example.com", from_id="502")
    replied = fake_graph.add_comment(media, "price?", from_id="503")
    dmed = fake_graph.add_comment(media, "what size?", from_id="504")
    fine = fake_graph.add_comment(media, "lovely", from_id="505")
    watched = watch(account, media)
    spawn("worker")
    instaqueue.poll_post_comments(watched)
    wait_until(lambda: all(c.action_status in ("done", "none") for c in comments()), what="the actions")
    assert fake_graph.comment(hidden)["hidden"] is True
    assert fake_graph.comment(deleted)["deleted"] is True
    assert fake_graph.comment(replied)["replies"] == ["See our DMs!"]
    assert fake_graph.comment(dmed)["private_replies"] == ["Which size do you need?"]
    assert comments(graph_comment_id=fine)[0].reason == "no rule matched"
    # Acting again does nothing more: a new poll makes no decisions, a rerun of each task no call.
    calls = len(fake_graph.calls)
    instaqueue.poll_post_comments(watched)
    for c in comments():
        assert instaqueue.moderate_comment.delay(c.id).get(timeout=20) in ("done", "none")
    assert fake_graph.comment(replied)["replies"] == ["See our DMs!"]
    assert len([c for c in fake_graph.calls[calls:] if c.method != "GET"]) == 0


def test_a_hide_that_fails_transiently_is_retried_and_happens_once(account, fake_graph, spawn):
    media = fake_graph.add_media(account.ig_user_id)
    add_rule(account, "block", "spam")
    target = fake_graph.add_comment(media, "spam")
    fake_graph.fail(500, code=2, times=2, method="POST", path_contains=f"/{target}")
    watched = watch(account, media)
    spawn("worker")
    instaqueue.poll_post_comments(watched)
    wait_until(lambda: comments()[0].action_status == ActionStatus.done, timeout=30, what="the hide")
    hides = fake_graph.calls_matching("POST", f"/{target}")
    assert [c.status for c in hides] == [500, 500, 200]
    assert hides[2].time - hides[1].time >= 0.8  # the second retry waits about 1 s (scaled schedule)
    assert comments()[0].attempts == 2 and fake_graph.comment(target)["hidden"] is True


def test_a_public_reply_whose_answer_was_lost_is_not_sent_twice(account, fake_graph, spawn):
    media = fake_graph.add_media(account.ig_user_id)
    add_rule(account, "block", "price", action="reply", text="Check your DMs")
    target = fake_graph.add_comment(media, "price?")
    fake_graph.delay(3, times=1, method="POST", path_contains=f"/{target}/replies")  # > 1.5 s timeout
    watched = watch(account, media)
    spawn("worker")
    instaqueue.poll_post_comments(watched)
    wait_until(lambda: comments()[0].action_status == ActionStatus.done, timeout=30, what="the reply")
    assert fake_graph.comment(target)["replies"] == ["Check your DMs"]
    assert comments()[0].reply_id


def test_a_comment_deleted_before_the_action_is_recorded_not_retried(account, fake_graph, spawn):
    media = fake_graph.add_media(account.ig_user_id)
    add_rule(account, "block", "spam")
    target = fake_graph.add_comment(media, "spam")
    watched = watch(account, media)
    instaqueue.poll_post_comments(watched)  # decided, its task waits in the queue
    httpx.delete(f"{fake_graph.url}/{target}", headers={"Authorization": f"Bearer {account.access_token}"})
    spawn("worker")
    wait_until(lambda: comments()[0].action_status == ActionStatus.gone, timeout=30, what="the record")
    time.sleep(2)
    assert len(fake_graph.calls_matching("POST", f"/{target}")) == 1
    assert "no longer exists" in comments()[0].action_error


def test_monitor_and_moderation_cli(account, db):
    from test_cli import cli
    assert cli("monitor", "add", "--account", str(account.id), "--media-id", "17900000000000001").returncode == 0
    assert "17900000000000001" in cli("monitor", "list").stdout
    added = cli("moderation", "add", "--account", str(account.id), "--block", "spam, scam", "--action", "hide")
    assert added.returncode == 0 and "block spam, scam -> hide" in added.stdout, added.stderr
    assert "spam, scam" in cli("moderation", "list").stdout
    for args, says in [
        (["--regex", "(", "--action", "hide"], "not a valid regular expression"),
        (["--links", "--action", "reply"], "needs --text"),
        (["--links", "--mentions", "3", "--action", "hide"], "not allowed with"),
        (["--links", "--action", "ban"], "invalid choice"),
    ]:
        done = cli("moderation", "add", "--account", str(account.id), *args)
        assert done.returncode == 2 and says in done.stderr and done.stderr.count("\n") == 1, (args, done.stderr)
    assert cli("monitor", "remove", "1").returncode == 0
    assert cli("monitor", "remove", "99").returncode == 2


def test_replies_under_older_comments_are_found_by_the_full_read(account, fake_graph):
    media = fake_graph.add_media(account.ig_user_id)
    oldest = fake_graph.add_comment(media, "the oldest")
    fake_graph.add_comments(media, 120)
    watched = watch(account, media)
    assert instaqueue.poll_post_comments(watched) == 121  # the first poll reads everything
    fake_graph.add_comment(media, "late reply", parent_id=oldest)
    assert instaqueue.poll_post_comments(watched) == 0  # a normal poll stops at the first known page
    assert watched_row(watched).full_read_due_at > instaqueue.utcnow() + timedelta(hours=23)
    with instaqueue.session() as s:
        instaqueue.update_where(s, MonitoredPost, [MonitoredPost.id == watched], full_read_due_at=instaqueue.utcnow())
        s.commit()
    assert instaqueue.poll_post_comments(watched) == 1
    assert comments(text="late reply")[0].parent_id == oldest


def test_every_reply_of_a_long_thread_is_read(account, fake_graph):
    media = fake_graph.add_media(account.ig_user_id)
    thread = fake_graph.add_comment(media, "giveaway!")
    fake_graph.add_comments(media, 80, parent_id=thread, text_fn=lambda i: f"me {i}")
    watched = watch(account, media)
    assert instaqueue.poll_post_comments(watched) == 81
    assert len(comments(parent_id=thread)) == 80


def test_a_poll_cut_short_reads_everything_next_time_and_loses_no_action(account, fake_graph):
    media = fake_graph.add_media(account.ig_user_id)
    add_rule(account, "block", "spam")
    fake_graph.add_comments(media, 60, text_fn=lambda i: "spam" if i == 0 else f"ok {i}")  # the spam is the oldest
    watched = watch(account, media)
    instaqueue.poll_post_comments(watched)
    fake_graph.add_comments(media, 60, text_fn=lambda i: f"new {i}")
    fake_graph.fail(500, code=2, times=1, method="GET", path_contains=f"/{media}/comments")
    with instaqueue.session() as s:  # make this poll a normal one, then break its second page
        instaqueue.update_where(s, MonitoredPost, [MonitoredPost.id == watched],
                                full_read_due_at=instaqueue.utcnow() + timedelta(hours=1))
        s.commit()
    instaqueue.poll_post_comments(watched)
    assert watched_row(watched).full_read_due_at <= instaqueue.utcnow()
    instaqueue.poll_post_comments(watched)
    assert len(comments()) == 120
    assert [c.text for c in comments(action="hide")] == ["spam"]
