"""Daily analytics and the token lifecycle, on real PostgreSQL and the fake Graph API."""

from __future__ import annotations

import csv
import io
import json
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

import instaqueue
from instaqueue import (Account, AccountState, Comment, DailyAnalytics, InboundMessage, MonitoredPost, ScheduledPost,
                        select)

pytestmark = pytest.mark.integration

BERLIN = ZoneInfo("Europe/Berlin")
DAY = date(2026, 11, 20)


@pytest.fixture
def berlin(monkeypatch):
    monkeypatch.setattr(instaqueue.settings, "timezone", "Europe/Berlin")


def local(day: date, h: int, m: int = 0, s: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, h, m, s, tzinfo=BERLIN)


def add_dm(account, n: int, created: datetime, status: str, latency: float | None = None) -> None:
    with instaqueue.session() as s:
        s.add(InboundMessage(account_id=account.id, graph_message_id=f"m{account.id}-{n}", conversation_id="c",
                             sender_id="900", text="t", created_time=created, status=status,
                             replied_at=created + timedelta(seconds=latency) if latency is not None else None))
        s.commit()


def rows(account_id: int | None = None) -> list[DailyAnalytics]:
    with instaqueue.session() as s:
        query = select(DailyAnalytics).order_by(DailyAnalytics.account_id, DailyAnalytics.day)
        if account_id:
            query = query.where(DailyAnalytics.account_id == account_id)
        return list(s.exec(query).all())


def seed_day(account) -> None:
    # DMs on the edges of the local day: 00:00:00 and 23:59:59 count, the neighbours do not.
    add_dm(account, 1, local(DAY, 0, 0, 0), "replied", 2)
    add_dm(account, 2, local(DAY, 23, 59, 59), "replied", 4)
    add_dm(account, 3, local(DAY, 12), "replied", 6)
    add_dm(account, 4, local(DAY, 13), "replied", 100)
    add_dm(account, 5, local(DAY, 14), "needs_human")
    add_dm(account, 6, local(DAY, 15), "failed")
    add_dm(account, 7, local(DAY - timedelta(days=1), 23, 59, 59), "replied", 1)
    add_dm(account, 8, local(DAY + timedelta(days=1), 0, 0, 0), "replied", 1)
    with instaqueue.session() as s:
        watched = MonitoredPost(account_id=account.id, media_id="1790", poll_interval=300)
        s.add(watched)
        s.commit()
        for n, (action, status, when) in enumerate([
                ("hide", "done", local(DAY, 1)), ("delete", "done", local(DAY, 2)), ("reply", "done", local(DAY, 3)),
                ("dm", "done", local(DAY, 4)), ("hide", "failed", local(DAY, 5)), ("none", "none", local(DAY, 6)),
                ("hide", "done", local(DAY + timedelta(days=1), 0, 0, 1))]):
            s.add(Comment(account_id=account.id, monitored_post_id=watched.id, graph_comment_id=f"c{n}", text="x",
                          created_time=when, action=action, action_status=status))
        for n, (status, when) in enumerate([("published", local(DAY, 9)), ("failed", local(DAY, 10)),
                                            ("unconfirmed", local(DAY, 11)), ("scheduled", local(DAY, 12)),
                                            ("published", local(DAY - timedelta(days=1), 23))]):
            s.add(ScheduledPost(account_id=account.id, kind="image", media=[], publish_at=when, status=status,
                                published_at=when if status == "published" else None))
        s.commit()


def test_a_day_is_counted_exactly_in_the_local_timezone(berlin, account, fake_graph):
    seed_day(account)
    fake_graph.set_profile(account.ig_user_id, followers_count=1234)
    fake_graph.set_insights(account.ig_user_id, {"reach": 500, "views": 900, "profile_views": 42, "accounts_engaged": 77})
    result = instaqueue.generate_daily_analytics([DAY.isoformat()])
    assert result == {"rows": 1, "incomplete": 0, "days": 1}
    [row] = rows()
    assert (row.day, row.dms_received, row.dms_auto_answered, row.dms_for_human, row.dms_failed) == (DAY, 6, 4, 1, 1)
    assert row.reply_latency_median_s == pytest.approx(5.0)
    assert row.reply_latency_p95_s == pytest.approx(6 + 0.85 * 94)
    assert (row.comments_seen, row.comments_hidden, row.comments_deleted, row.comments_replied) == (6, 1, 1, 2)
    assert (row.posts_published, row.posts_failed, row.posts_unconfirmed) == (1, 1, 1)
    assert (row.followers, row.reach, row.views, row.profile_views, row.accounts_engaged) == (1234, 500, 900, 42, 77)
    assert row.complete and row.problems is None
    [call] = fake_graph.calls_matching("GET", "/insights")
    start, end = instaqueue.day_bounds(DAY, BERLIN)
    assert call.query["since"] == str(int(start.timestamp())) and call.query["until"] == str(int(end.timestamp()))
    assert call.query["metric_type"] == "total_value" and "impressions" not in call.query["metric"]


def test_day_bounds_follow_daylight_saving_time():
    start, end = instaqueue.day_bounds(date(2026, 3, 29), BERLIN)  # spring forward: 23 hours
    assert end - start == timedelta(hours=23) and start == datetime(2026, 3, 28, 23, tzinfo=timezone.utc)


def test_a_rerun_replaces_the_days_row(berlin, account, fake_graph):
    seed_day(account)
    instaqueue.generate_daily_analytics([DAY.isoformat()])
    instaqueue.generate_daily_analytics([DAY.isoformat()])
    assert len(rows()) == 1
    add_dm(account, 99, local(DAY, 18), "needs_human")
    instaqueue.generate_daily_analytics([DAY.isoformat()])
    [row] = rows()
    assert row.dms_received == 7 and row.dms_for_human == 2


def test_three_missed_days_are_caught_up_in_one_run_on_a_worker(account, fake_graph, spawn):
    today = instaqueue.utcnow().date()
    with instaqueue.session() as s:
        s.add(DailyAnalytics(account_id=account.id, day=today - timedelta(days=4)))
        instaqueue.update_where(s, Account, [Account.id == account.id],
                                created_at=instaqueue.utcnow() - timedelta(days=10))
        s.commit()
    spawn("worker")
    result = instaqueue.generate_daily_analytics.delay().get(timeout=60)
    assert result["rows"] == 3
    assert [r.day for r in rows()] == [today - timedelta(days=n) for n in (4, 3, 2, 1)]
    assert instaqueue.generate_daily_analytics.delay().get(timeout=60)["rows"] == 0  # nothing left to do


def test_insight_errors_give_an_incomplete_row_not_a_failed_task(berlin, account, fake_graph):
    seed_day(account)
    fake_graph.fail(500, code=2, times=None, path_contains="/insights")
    result = instaqueue.generate_daily_analytics([DAY.isoformat()])
    [row] = rows()
    assert result["incomplete"] == 1 and not row.complete
    assert "reach,views,profile_views,accounts_engaged" in row.problems
    assert row.dms_received == 6 and row.reach is None


def test_a_refused_metric_is_asked_again_alone(berlin, account, fake_graph):
    fake_graph.set_insights(account.ig_user_id, {"reach": 5, "views": 6, "profile_views": 7, "accounts_engaged": 8})
    fake_graph.fail(400, code=100, times=2, path_contains="/insights")
    instaqueue.generate_daily_analytics([DAY.isoformat()])
    [row] = rows()
    # The batch is refused, then "reach" alone: the other three metrics still arrive.
    assert (row.reach, row.views, row.profile_views, row.accounts_engaged) == (None, 6, 7, 8)
    assert row.problems.startswith("reach: ") and "views" not in row.problems
    assert len(fake_graph.calls_matching("GET", "/insights")) == 5  # the batch, then one per metric
    assert not row.complete


def test_an_expired_token_parks_the_account_and_the_others_still_get_rows(berlin, account, fake_graph):
    with instaqueue.session() as s:
        other = Account(ig_user_id="17841400000000002", username="other", access_token="TOKEN-other")
        s.add(other)
        s.commit()
    fake_graph.add_account(other.ig_user_id, "other", "TOKEN-other")
    fake_graph.set_insights(other.ig_user_id, {"reach": 1})
    fake_graph.revoke_token(account.access_token)
    instaqueue.generate_daily_analytics([DAY.isoformat()])
    mine, theirs = rows()
    assert not mine.complete and "190" in mine.problems
    assert theirs.complete and theirs.reach == 1
    with instaqueue.session() as s:
        assert s.get(Account, account.id).state == AccountState.needs_reauth


@pytest.mark.parametrize("issued_days_ago, expires_in_days, refreshed", [
    (50, 9, True), (0.4, 5, False), (30, 30, False), (59, 1, True), (61, -1, True),
])
def test_tokens_are_refreshed_only_inside_their_window(account, fake_graph, issued_days_ago, expires_in_days, refreshed):
    now = instaqueue.utcnow()
    with instaqueue.session() as s:
        instaqueue.update_where(s, Account, [Account.id == account.id],
                                token_issued_at=now - timedelta(days=issued_days_ago),
                                token_expires_at=now + timedelta(days=expires_in_days))
        s.commit()
    result = instaqueue.refresh_access_tokens()
    assert result["refreshed"] == int(refreshed)
    with instaqueue.session() as s:
        row = s.get(Account, account.id)
    if refreshed:
        assert row.access_token == fake_graph.refreshed_tokens(account.ig_user_id)[-1] != account.access_token
        assert row.token_expires_at - instaqueue.utcnow() > timedelta(days=59)
    else:
        assert row.access_token == account.access_token and not fake_graph.calls


def test_a_failed_refresh_parks_the_account_and_reauth_brings_it_back(account, fake_graph):
    from test_cli import cli
    with instaqueue.session() as s:
        instaqueue.update_where(s, Account, [Account.id == account.id],
                                token_issued_at=instaqueue.utcnow() - timedelta(days=55))
        s.commit()
    fake_graph.fail_refresh(account.ig_user_id)
    assert instaqueue.refresh_access_tokens() == {"refreshed": 0, "parked": 1}
    listed = cli("accounts", "list")
    assert "needs_reauth" in listed.stdout and "token refresh refused" in listed.stdout
    assert account.access_token not in listed.stdout
    assert cli("accounts", "reauth", str(account.id), "--access-token", "NEW-TOKEN").returncode == 0
    with instaqueue.session() as s:
        row = s.get(Account, account.id)
    assert row.state == AccountState.active and row.access_token == "NEW-TOKEN"
    assert [c.query.get("access_token") for c in fake_graph.calls] == ["[redacted]"]


def test_analytics_cli_backfill_show_and_export(account, fake_graph):
    from test_cli import cli
    today = instaqueue.utcnow().date()
    done = cli("analytics", "backfill", "--from", (today - timedelta(days=3)).isoformat(),
               "--to", (today - timedelta(days=1)).isoformat())
    assert done.returncode == 0 and "3 rows written for 3 days" in done.stdout, done.stderr
    shown = cli("analytics", "show", "--account", str(account.id), "--days", "5")
    assert shown.returncode == 0 and shown.stdout.count("\n") == 4 and "followers" in shown.stdout
    exported = json.loads(cli("analytics", "export", "--format", "json").stdout)
    assert len(exported) == 3 and exported[0]["account_id"] == account.id
    table = list(csv.DictReader(io.StringIO(cli("analytics", "export", "--format", "csv").stdout)))
    assert [r["day"] for r in table] == [e["day"] for e in exported]
    bad = cli("analytics", "backfill", "--from", "2026-11-20", "--to", "2026-11-01")
    assert bad.returncode == 2 and "--to is before --from" in bad.stderr
    assert cli("analytics", "show", "--account", "77").returncode == 2
