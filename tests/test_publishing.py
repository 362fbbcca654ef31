"""Scheduled publishing end to end: real worker and beat, real Redis and PostgreSQL, the fake
Graph API. Posts are checked every second in tests (conftest), so ETAs stay short."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from conftest import wait_until

import instaqueue
from instaqueue import PostKind, PostStatus, ScheduledPost, select

pytestmark = pytest.mark.integration

IMG = {"type": "image", "url": "https://cdn.example.com/shoe.jpg"}
VID = {"type": "video", "url": "https://cdn.example.com/shoe.mp4"}


def schedule(account, *, at, kind=PostKind.image, media=(IMG,), caption="New shoes #sale") -> int:
    with instaqueue.session() as s:
        post = ScheduledPost(account_id=account.id, kind=kind, media=list(media), caption=caption, publish_at=at)
        s.add(post)
        s.commit()
        return post.id


def post(post_id: int) -> ScheduledPost:
    with instaqueue.session() as s:
        return s.get(ScheduledPost, post_id)


def posts() -> list[ScheduledPost]:
    with instaqueue.session() as s:
        return list(s.exec(select(ScheduledPost).order_by(ScheduledPost.id)).all())


def publish_calls(fake) -> list:
    return fake.calls_matching("POST", "/media_publish")


def soon(seconds: float):
    return instaqueue.utcnow() + timedelta(seconds=seconds)


def test_twenty_posts_each_go_out_once_within_two_seconds_of_their_time(account, fake_graph, spawn):
    spawn("worker")
    spawn("beat")
    start = instaqueue.utcnow()
    due = {schedule(account, at=start + timedelta(seconds=5 + 2 * i), caption=f"post {i}"): i for i in range(20)}
    wait_until(lambda: len(fake_graph.published_media(account.ig_user_id)) >= 20, timeout=70, what="20 posts")
    time.sleep(2)
    media = fake_graph.published_media(account.ig_user_id)
    assert sorted(m["caption"] for m in media) == sorted(f"post {i}" for i in range(20))
    assert len(publish_calls(fake_graph)) == 20
    for row in posts():
        assert row.status == PostStatus.published and row.media_id and row.permalink.startswith("https://")
        published = next(m for m in media if m["media_id"] == row.media_id)
        error = (published["time"] - row.publish_at).total_seconds()
        assert -1 <= error <= 2, (due[row.id], error)


def test_two_workers_and_racing_checks_publish_each_post_once(account, fake_graph, spawn):
    spawn("worker")
    spawn("worker")
    spawn("beat")
    ids = [schedule(account, at=soon(3 + i % 5), caption=f"p{i}") for i in range(15)]
    threads = [threading.Thread(target=lambda: [instaqueue.check_scheduled_posts.delay() for _ in range(10)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_until(lambda: all(post(i).status == PostStatus.published for i in ids), timeout=40, what="all posts")
    time.sleep(2)
    calls = publish_calls(fake_graph)
    created = [c.query.get("creation_id") or (c.body or {}).get("creation_id") for c in calls]
    assert len(calls) == 15 and len(set(created)) == 15
    assert len(fake_graph.published_media(account.ig_user_id)) == 15


def test_sigkill_between_container_creation_and_publish_ends_in_one_media(account, fake_graph, spawn):
    fake_graph.delay(5, times=1, method="POST", path_contains="/media")  # the container exists; its id is late
    worker = spawn("worker")
    spawn("beat")
    post_id = schedule(account, at=soon(1))
    wait_until(lambda: fake_graph.containers(account.ig_user_id), what="the container")
    worker.kill()
    assert publish_calls(fake_graph) == []
    spawn("worker")
    wait_until(lambda: post(post_id).status == PostStatus.published, timeout=60, what="the post")
    time.sleep(1)
    assert len(fake_graph.published_media(account.ig_user_id)) == 1
    assert len(publish_calls(fake_graph)) == 1


def test_sigkill_right_after_media_publish_ends_in_one_media(account, fake_graph, spawn):
    fake_graph.delay(5, times=1, method="POST", path_contains="/media_publish")  # published; answer late
    worker = spawn("worker")
    spawn("beat")
    post_id = schedule(account, at=soon(1))
    wait_until(lambda: fake_graph.published_media(account.ig_user_id), what="the publish to reach Instagram")
    worker.kill()
    assert post(post_id).publish_called_at is not None
    restarted = spawn("worker")
    wait_until(lambda: post(post_id).status == PostStatus.published, timeout=60, what="the reconciliation")
    time.sleep(1)
    [media] = fake_graph.published_media(account.ig_user_id)
    assert post(post_id).media_id == media["media_id"]
    assert len(publish_calls(fake_graph)) == 1
    assert "found published on Instagram" in restarted.text()


def test_a_timeout_after_instagram_published_is_reconciled_not_republished(account, fake_graph, spawn):
    fake_graph.delay(3, times=1, method="POST", path_contains="/media_publish")  # > the 1.5 s Graph timeout
    spawn("worker")
    spawn("beat")
    post_id = schedule(account, at=soon(1))
    wait_until(lambda: post(post_id).status == PostStatus.published, timeout=30, what="the post")
    [media] = fake_graph.published_media(account.ig_user_id)
    assert post(post_id).media_id == media["media_id"] and post(post_id).attempts == 1
    assert len(publish_calls(fake_graph)) == 1


def test_a_5xx_before_publish_is_retried_and_reuses_the_container(account, fake_graph, spawn):
    fake_graph.fail(500, code=2, times=2, method="GET", path_contains="/content_publishing_limit")
    spawn("worker")
    spawn("beat")
    post_id = schedule(account, at=soon(1))
    wait_until(lambda: post(post_id).status == PostStatus.published, timeout=30, what="the post")
    assert post(post_id).attempts == 2
    assert len(fake_graph.containers(account.ig_user_id)) == 1


def test_a_video_in_progress_for_several_checks_is_published_once(account, fake_graph, spawn):
    fake_graph.set_video_processing(checks=4)
    spawn("worker")
    spawn("beat")
    post_id = schedule(account, at=soon(1), kind=PostKind.reel, media=[VID])
    wait_until(lambda: post(post_id).status == PostStatus.published, timeout=40, what="the reel")
    row = post(post_id)
    assert row.container_checks == 4
    assert len(fake_graph.containers(account.ig_user_id)) == 1
    assert len(fake_graph.published_media(account.ig_user_id)) == 1


def test_a_video_that_instagram_cannot_process_fails_with_its_reason(account, fake_graph, spawn):
    fake_graph.set_video_processing(checks=1, final="ERROR", status="Error: 2207026 unsupported video format")
    spawn("worker")
    spawn("beat")
    post_id = schedule(account, at=soon(1), kind=PostKind.video, media=[VID])
    wait_until(lambda: post(post_id).status == PostStatus.failed, timeout=30, what="the failure")
    assert "unsupported video format" in post(post_id).last_error
    assert publish_calls(fake_graph) == []


def test_a_carousel_creates_children_then_parent(account, fake_graph, spawn):
    spawn("worker")
    spawn("beat")
    post_id = schedule(account, at=soon(1), kind=PostKind.carousel, media=[IMG, VID, IMG])
    wait_until(lambda: post(post_id).status == PostStatus.published, timeout=30, what="the carousel")
    kinds = sorted(c["kind"] for c in fake_graph.containers(account.ig_user_id))
    assert kinds == ["CAROUSEL", "CAROUSEL_ITEM", "CAROUSEL_ITEM", "CAROUSEL_ITEM"]
    assert len(post(post_id).child_container_ids) == 3


def test_at_the_publishing_limit_the_post_waits_and_goes_out_when_quota_returns(account, fake_graph, spawn):
    fake_graph.set_publish_quota(total=5, used=5)
    spawn("worker")
    spawn("beat")
    post_id = schedule(account, at=soon(1))
    wait_until(lambda: "publishing limit reached" in (post(post_id).last_error or ""), what="the wait")
    time.sleep(3)
    assert post(post_id).status in (PostStatus.queued, PostStatus.publishing)
    assert publish_calls(fake_graph) == []
    fake_graph.set_publish_quota(total=5, used=0)
    wait_until(lambda: post(post_id).status == PostStatus.published, timeout=30, what="the post")
    assert post(post_id).attempts == 0


def test_an_invalid_post_fails_at_once_without_a_graph_call(account, fake_graph, spawn):
    spawn("worker")
    spawn("beat")
    post_id = schedule(account, at=soon(1), caption="#" + " #".join(f"t{i}" for i in range(40)))
    missed = schedule(account, at=soon(-3600))
    wait_until(lambda: post(post_id).status == post(missed).status == PostStatus.failed, what="the failures")
    assert "40 hashtags" in post(post_id).last_error
    assert "in the past" in post(missed).last_error
    assert [c.path for c in fake_graph.calls if not c.path.endswith("/conversations")] == []  # DM polls only


def test_a_cancelled_or_rescheduled_post_never_goes_out_at_its_old_time(account, fake_graph, spawn, db):
    from test_cli import cli
    spawn("worker")
    spawn("beat")
    cancelled = schedule(account, at=soon(6), caption="cancelled")
    moved = schedule(account, at=soon(6), caption="moved")
    # Queued (with their ETAs sent) 1.5 s before their time; change them in that last moment.
    wait_until(lambda: post(cancelled).status == post(moved).status == PostStatus.queued, what="both queued")
    assert instaqueue.main(["posts", "cancel", str(cancelled)]) == 0
    new_time = soon(6)
    assert instaqueue.main(["posts", "reschedule", str(moved), "--at", new_time.isoformat()]) == 0
    wait_until(lambda: post(moved).status == PostStatus.published, timeout=30, what="the moved post")
    [media] = fake_graph.published_media(account.ig_user_id)
    assert media["caption"] == "moved"
    assert abs((media["time"] - new_time).total_seconds()) <= 2
    assert post(cancelled).status == PostStatus.cancelled
    refused = cli("posts", "cancel", str(moved))
    assert refused.returncode == 2 and "is published" in refused.stderr


def test_posts_cli_schedules_lists_and_rejects_bad_input(account, db):
    from test_cli import cli
    at = soon(3600).isoformat()
    ok = cli("posts", "schedule", "--account", str(account.id), "--at", at, "--image-url", IMG["url"],
             "--image-url", IMG["url"], "--caption", "two")
    assert ok.returncode == 0 and "carousel" in ok.stdout, ok.stderr
    listed = cli("posts", "list", "--status", "scheduled")
    assert "carousel" in listed.stdout and "scheduled" in listed.stdout
    for args, says in [
        (["--at", "tomorrow", "--image-url", IMG["url"]], "ISO 8601"),
        (["--at", at], "give the media"),
        (["--at", at, "--image-url", "http://x.com/a.jpg"], "not a public https:// URL"),
        (["--at", soon(-60).isoformat(), "--image-url", IMG["url"]], "in the past"),
        (["--at", at, "--image-url", IMG["url"], "--reel"], "--reel needs exactly one --video-url"),
        (["--at", at, "--video-url", VID["url"], "--reel", "--story"], "not allowed with"),
    ]:
        done = cli("posts", "schedule", "--account", str(account.id), *args)
        assert done.returncode == 2 and says in done.stderr and done.stderr.count("\n") == 1, (args, done.stderr)
    assert cli("posts", "cancel", "999").returncode == 2
