"""Locks: on Redis with an expiry, and flock on the embedded defaults."""

from __future__ import annotations

import time

import pytest

import instaqueue
from instaqueue import try_lock


@pytest.mark.integration
def test_redis_lock_is_exclusive_and_expires(db):
    assert instaqueue.get_redis() is not None
    with try_lock("t", ttl=0.5) as first:
        with try_lock("t", ttl=0.5) as second:
            assert first and not second
    with try_lock("t", ttl=0.3) as again:
        assert again  # released on exit
        time.sleep(0.5)
        with try_lock("t", ttl=5) as after_expiry:
            assert after_expiry  # a holder that outlives its ttl (or died) loses the lock


@pytest.mark.integration
def test_releasing_an_expired_lock_never_frees_the_next_holders(db):
    first = try_lock("u", ttl=0.2)
    assert first.__enter__()
    time.sleep(0.3)
    second = try_lock("u", ttl=5)
    assert second.__enter__()
    first.__exit__(None, None, None)  # the first holder finishes late
    with try_lock("u", ttl=5) as third:
        assert not third  # its exit did not delete the second holder's lock
    second.__exit__(None, None, None)


def test_flock_lock_on_embedded_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(instaqueue, "get_redis", lambda: None)
    monkeypatch.setattr(instaqueue.settings, "data_dir", tmp_path)
    with try_lock("dm-poll:1", ttl=1) as first:
        with try_lock("dm-poll:1", ttl=1) as second:
            assert first and not second
    with try_lock("dm-poll:1", ttl=1) as again:
        assert again
