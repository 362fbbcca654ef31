"""instaqueue: the background-job engine of an Instagram automation product.

It answers an Instagram business account's DMs (keyword rules, then a knowledge base and an
optional LLM), moderates comments on watched posts, publishes scheduled posts on the second
and exactly once, and rolls up daily analytics; on Celery with Redis as broker and result
backend, PostgreSQL (or SQLite) as the store, and one beat as the scheduler.

Run it::

    python -m instaqueue run                 # worker with embedded beat, on embedded defaults
    python -m instaqueue worker              # queues high,default,low; extra arguments go to celery
    python -m instaqueue beat                # the scheduler: a second one stands by
    python -m instaqueue flower              # monitoring UI on port 5555 (needs credentials)
    python -m instaqueue health | status [--json]
    python -m instaqueue accounts add --ig-user-id 1784... --username shop --access-token ...
    python -m instaqueue rules add --account 1 --match "price, cost" --reply "From 20 EUR."
    python -m instaqueue kb add|import|list|remove ...      conversations list|resume ID
    python -m instaqueue posts schedule --account 1 --at 2026-12-01T09:30+01:00 --image-url https://...
    python -m instaqueue monitor add --account 1 --media-id 1790...
    python -m instaqueue moderation add --account 1 --block "spam" --action hide
    python -m instaqueue analytics backfill|show|export ...
    celery -A instaqueue worker -Q high,default,low     # works too

Environment (prefix ``INSTAQUEUE_``, also read from ``.env``):

- ``INSTAQUEUE_REDIS_URL``: broker, result backend and locks. Unset, instaqueue runs on embedded
  defaults: kombu's ``filesystem://`` broker and a SQLite result store under the data dir.
- ``INSTAQUEUE_DATABASE_URL``: ``postgresql+psycopg://...`` in production; default a SQLite file
  in ``INSTAQUEUE_DATA_DIR`` (default ``./.instaqueue``).
- ``INSTAQUEUE_GRAPH_API_URL``: the Graph host with a pinned API version.
- ``INSTAQUEUE_LLM_URL``: an OpenAI-compatible chat-completions endpoint (optional).
- Intervals, the retry policy and the rest: see :class:`Settings`.

Sections, in dependency order (grep ``^# .* ###``): Settings, Errors, Tables, Database helpers,
Locks, Graph API client, Pure logic, Replies from the knowledge base and an LLM, Celery app,
Tasks, Beat schedule, CLI.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # ``python -m instaqueue`` runs this file as ``__main__``. Anything importing ``instaqueue``
    # (Celery's worker does) would then execute it a second time and make a second app with the
    # same task names. Run the CLI from the real module instead, and stop here.
    import instaqueue

    sys.exit(instaqueue.main())

import argparse
import contextlib
import csv
import enum
import fcntl
import io
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from datetime import date, datetime, time as dtime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
import sqlalchemy as sa
from celery import Celery, signals
from celery.beat import PersistentScheduler
from celery.schedules import crontab
from kombu import Queue
from pydantic import SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlmodel import Field, Session, SQLModel, select

log = logging.getLogger("instaqueue")
# httpx logs every request's full URL at INFO; the token refresh call must carry the token in
# its query string, so those lines stay off (they were also most of a busy worker's log).
logging.getLogger("httpx").setLevel(logging.WARNING)


# Settings ####################################################################################

#: Graph API version pinned in the default base URL; Meta changes payloads between versions.
GRAPH_API_VERSION = "v23.0"


class ConfigError(Exception):
    """Bad configuration, said in one line that names the variable."""


class Settings(BaseSettings):
    """Every knob, read from ``INSTAQUEUE_*`` variables and ``.env``; seconds unless named."""

    model_config = SettingsConfigDict(env_prefix="INSTAQUEUE_", env_file=".env", extra="ignore")

    #: Broker, result backend and locks; unset means the embedded filesystem broker.
    redis_url: str | None = None
    #: Where the embedded broker, result store and default database live.
    data_dir: Path = Path(".instaqueue")
    #: SQLAlchemy URL of the store; default ``sqlite:///<data_dir>/instaqueue.db``.
    database_url: str | None = None
    graph_api_url: str = f"https://graph.instagram.com/{GRAPH_API_VERSION}"
    #: Read timeout of one Graph call; the connect timeout is the smaller of this and 5 s.
    graph_timeout: float = 10.0

    dm_poll_interval: float = 0.5
    #: A watched post's comment poll interval adapts between these bounds.
    comment_poll_interval: float = 300.0
    comment_poll_max_interval: float = 1800.0
    #: Posts older than this many days stop being watched.
    comment_watch_days: float = 30.0
    scheduled_check_interval: float = 60.0
    #: A post found more than this late at its first run fails as missed instead of going out.
    publish_grace: float = 300.0
    #: Seconds between status checks of a video container, and how many checks at most.
    container_check_interval: float = 30.0
    container_check_limit: int = 20
    #: A post left queued or publishing this long past its expected time is taken up again.
    publish_stuck_after: float = 300.0
    #: Daily analytics run at this local time (``HH:MM``) in ``timezone``.
    analytics_at: str = "00:00"
    timezone: str = "UTC"

    #: Shared retry policy: ``retry_base * 2**n`` seconds, capped, each ``±retry_jitter``.
    retry_base: float = 60.0
    retry_cap: float = 600.0
    retry_jitter: float = 0.2
    max_retries: int = 3
    #: How long a rate limit backs an account off when Meta does not say.
    rate_limit_backoff: float = 300.0
    #: Usage (percent of a Graph allowance) from which an account's polling slows down.
    usage_slowdown_percent: float = 75.0

    #: OpenAI-compatible chat-completions endpoint for grounded replies; unset, no LLM is used.
    llm_url: str | None = None
    llm_model: str = "gpt-4o-mini"
    llm_api_key: SecretStr | None = None
    llm_timeout: float = 20.0
    #: A knowledge-base answer is sent as the reply only at or above this relevance score
    #: (PostgreSQL's ts_rank scale: a good match scores about 0.05 to 0.2).
    kb_min_score: float = 0.08
    #: Phrases that hand a conversation to a human (comma-separated, whole words).
    handoff_phrases: str = "agent, human, real person"

    worker_concurrency: int = 4
    #: On SIGTERM a worker finishes running tasks for this long, then requeues what is left.
    shutdown_grace: float = 60.0
    #: Flower's ``user:password`` (several comma-separated); required unless Flower is bound
    #: to loopback with ``flower_insecure_local`` set.
    flower_basic_auth: SecretStr | None = None
    flower_address: str = "0.0.0.0"
    flower_insecure_local: bool = False
    #: Redis redelivers a message not acked within this time (kombu looks for such messages
    #: only every ~100 s, or when a worker starts); every ETA must stay far below it.
    visibility_timeout: float = 3600.0

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("expected a redis://, rediss:// or unix:// URL")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("the URL has no host")
        try:
            parts.port
        except ValueError:
            raise ValueError("the URL's port is not a number from 0 to 65535") from None
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError("not a database URL (e.g. postgresql+psycopg://user@host/db)") from None
        if url.get_backend_name() not in ("postgresql", "sqlite"):
            raise ValueError("only postgresql+psycopg:// and sqlite:// are supported")
        return value

    @field_validator("llm_url")
    @classmethod
    def _check_llm_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected the http(s) URL of a chat-completions endpoint")
        return value

    @field_validator("graph_api_url")
    @classmethod
    def _check_graph_api_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http(s) URL such as https://graph.instagram.com/v23.0")
        return value.rstrip("/")

    @field_validator(
        "graph_timeout", "dm_poll_interval", "comment_poll_interval", "comment_poll_max_interval",
        "scheduled_check_interval", "retry_base", "retry_cap", "rate_limit_backoff",
        "visibility_timeout", "publish_grace", "container_check_interval", "publish_stuck_after",
        "comment_watch_days", "shutdown_grace", "llm_timeout",
    )
    @classmethod
    def _check_positive(cls, value: float) -> float:
        if not value > 0 or math.isinf(value):
            raise ValueError("must be a positive number of seconds")
        return value

    @field_validator("retry_jitter")
    @classmethod
    def _check_jitter(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise ValueError("must be a fraction from 0 to below 1, e.g. 0.2 for ±20 %")
        return value

    @field_validator("max_retries", "container_check_limit")
    @classmethod
    def _check_retries(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 or more")
        return value

    @field_validator("worker_concurrency")
    @classmethod
    def _check_concurrency(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be 1 or more")
        return value

    @field_validator("usage_slowdown_percent")
    @classmethod
    def _check_percent(cls, value: float) -> float:
        if not 0 < value < 100:
            raise ValueError("must be a percentage between 0 and 100")
        return value

    @field_validator("flower_basic_auth")
    @classmethod
    def _check_basic_auth(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        for pair in value.get_secret_value().split(","):
            user, _, password = pair.partition(":")
            if not user.strip() or not password:
                raise ValueError("expected user:password (several separated by commas)")
        return value

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("unknown time zone (use an IANA name such as Europe/Berlin)") from None
        return value

    @field_validator("analytics_at")
    @classmethod
    def _check_time_of_day(cls, value: str) -> str:
        match = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", value.strip())
        if not match:
            raise ValueError("expected a time of day as HH:MM, e.g. 00:00")
        return f"{int(match[1]):02d}:{match[2]}"

    @model_validator(mode="after")
    def _check_policy(self) -> Settings:
        if self.comment_poll_max_interval < self.comment_poll_interval:
            raise ValueError(
                "INSTAQUEUE_COMMENT_POLL_MAX_INTERVAL: must not be below INSTAQUEUE_COMMENT_POLL_INTERVAL")
        longest_wait = max(self.retry_cap * (1 + self.retry_jitter), 2 * self.scheduled_check_interval,
                           self.container_check_interval) + self.message_lease
        if self.redis_url and self.visibility_timeout <= longest_wait:
            raise ValueError(
                f"INSTAQUEUE_VISIBILITY_TIMEOUT: must exceed the longest delay of a task (retry, "
                f"post ETA, container check) plus a claim lease ({longest_wait:g} s), or Redis "
                f"delivers delayed tasks twice")
        return self

    @property
    def message_lease(self) -> float:
        """How long a claimed DM is held before another delivery may take it over: a claim
        covers at most two Graph calls (look, then send), each bounded by the timeout."""
        return 3 * self.graph_timeout + 5

    @property
    def stale_after(self) -> float:
        """How long past its expected time a DM waits before the poll sends its task again:
        after Redis would have redelivered it (the embedded broker never redelivers)."""
        return (self.visibility_timeout if self.redis_url else 60.0) + self.message_lease

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir.resolve() / 'instaqueue.db'}"

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, or :class:`ConfigError` with one line per problem."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_input=False, include_url=False):
            name = "INSTAQUEUE_" + "_".join(str(p) for p in error["loc"]).upper()
            message = str(error["msg"]).removeprefix("Value error, ")
            lines.append(message if not error["loc"] else f"{name}: {message}")
        raise ConfigError("; ".join(lines)) from None


try:
    #: The process's settings, read once at import so that a bad value stops start-up at once.
    settings = load_settings()
except ConfigError as _exc:
    raise SystemExit(f"instaqueue: bad configuration: {_exc}") from None


# Errors ######################################################################################

class GraphAPIError(Exception):
    """An error answered by (or on the way to) the Graph API; ``retryable`` says whether
    trying again later can help. The message never carries an access token."""

    retryable = False

    def __init__(self, message: str, *, code: int | None = None, subcode: int | None = None,
                 status: int | None = None, fbtrace_id: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.subcode = subcode
        self.status = status
        self.fbtrace_id = fbtrace_id
        self.retry_after = retry_after

    def __str__(self) -> str:
        detail = ", ".join(
            f"{k} {v}" for k, v in (("HTTP", self.status), ("code", self.code), ("subcode", self.subcode))
            if v is not None)
        return f"{self.message} ({detail})" if detail else self.message


class TransientError(GraphAPIError):
    """5xx, timeouts, ``is_transient``, codes 1 and 2: retry on the schedule."""

    retryable = True


class RateLimited(GraphAPIError):
    """An app, account or business-use-case limit; ``retry_after`` seconds when Meta says."""

    retryable = True


class TokenInvalid(GraphAPIError):
    """Code 190: the account needs re-authorisation; never retried."""


class PermissionDenied(GraphAPIError):
    """Codes 10 and 200-299: a permission is missing or the action is not allowed."""


class BadRequest(GraphAPIError):
    """Code 100 and everything else Meta refuses: retrying the same call cannot help."""


class AccountUnavailable(Exception):
    """The account is parked (needs re-auth or disabled); no Graph call is made for it."""


class MalformedPayload(ValueError):
    """A Graph payload without the fields or types we rely on."""


# Tables ######################################################################################

def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(sa.types.TypeDecorator):
    """Timezone-aware timestamps on every backend: stored in UTC, returned aware (SQLite keeps
    no offset, so a naive value read back is UTC by construction)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: instaqueue stores timezone-aware timestamps only")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


def _timestamp(**kwargs: Any) -> Any:
    return Field(sa_type=UTCDateTime, **kwargs)


class AccountState(enum.StrEnum):
    active = "active"
    needs_reauth = "needs_reauth"
    disabled = "disabled"


class MessageStatus(enum.StrEnum):
    """received → (needs_human | sending → replied | failed). ``sending`` means the reply was
    chosen and a Send API call may have happened: whoever claims it next looks before sending."""

    received = "received"
    sending = "sending"
    replied = "replied"
    needs_human = "needs_human"
    failed = "failed"


#: Message states that no task changes any more.
FINAL_MESSAGE_STATES = (MessageStatus.replied, MessageStatus.needs_human, MessageStatus.failed)


class Account(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    ig_user_id: str = Field(sa_type=sa.String(64), unique=True, index=True)
    username: str = Field(sa_type=sa.String(64))
    access_token: str = Field(sa_type=sa.Text, repr=False)
    state: AccountState = Field(default=AccountState.active, sa_type=sa.String(20))
    state_reason: str | None = None
    #: Newest conversation ``updated_time`` fully read by the DM poll.
    dm_cursor: datetime | None = _timestamp(default=None)
    #: No Graph call for this account before this time (rate limits).
    backoff_until: datetime | None = _timestamp(default=None)
    #: Next DM poll when usage headers asked us to slow down; None polls on every tick.
    dm_next_poll_at: datetime | None = _timestamp(default=None)
    #: When the long-lived token was issued (or last refreshed) and when it expires.
    token_issued_at: datetime = _timestamp(default_factory=utcnow)
    token_expires_at: datetime | None = _timestamp(default=None)
    created_at: datetime = _timestamp(default_factory=utcnow)


class ReplyRule(SQLModel, table=True):
    __tablename__ = "reply_rule"

    id: int | None = Field(default=None, primary_key=True)
    account_id: int = Field(foreign_key="account.id", index=True, ondelete="CASCADE")
    #: Comma-separated words or phrases; any one, as whole words, case-insensitive, matches.
    match: str
    reply: str
    enabled: bool = True
    created_at: datetime = _timestamp(default_factory=utcnow)


class InboundMessage(SQLModel, table=True):
    __tablename__ = "inbound_message"
    __table_args__ = (sa.Index("ix_inbound_message_account_status", "account_id", "status"),
                      sa.Index("ix_inbound_message_created_time", "created_time"),
                      sa.Index("ix_inbound_message_conversation", "conversation_id", "created_time"))

    id: int | None = Field(default=None, primary_key=True)
    account_id: int = Field(foreign_key="account.id", ondelete="CASCADE")
    graph_message_id: str = Field(sa_type=sa.String(255), unique=True)
    conversation_id: str = Field(sa_type=sa.String(255))
    sender_id: str = Field(sa_type=sa.String(64))
    sender_username: str | None = None
    text: str = ""
    created_time: datetime = _timestamp()
    received_at: datetime = _timestamp(default_factory=utcnow)
    status: MessageStatus = Field(default=MessageStatus.received, sa_type=sa.String(20))
    reply_text: str | None = None
    reply_rule_id: int | None = None
    #: Which path chose the reply: rule, llm, kb, or human (nobody: left for a person).
    reply_path: str | None = Field(default=None, sa_type=sa.String(10))
    #: Knowledge-base entries the reply was grounded in.
    reply_entry_ids: list[int] = Field(default_factory=list, sa_type=sa.JSON)
    #: Unique: one reply answers one DM, even when two DMs look for it at once after a crash.
    reply_graph_message_id: str | None = Field(default=None, sa_type=sa.String(255), unique=True)
    replied_at: datetime | None = _timestamp(default=None)
    #: Transient failures so far; the retry schedule is computed from it.
    attempts: int = 0
    last_error: str | None = None
    #: A claim in ``sending`` is held until then; a later delivery may take it over after.
    claimed_until: datetime | None = _timestamp(default=None)
    #: Random token of the current claim, so a late worker cannot overwrite a newer one.
    claim_token: str | None = Field(default=None, sa_type=sa.String(32))
    #: When this message is next expected to be worked on; long past it, the poll re-sends it.
    next_attempt_at: datetime = _timestamp(default_factory=utcnow)


class PostKind(enum.StrEnum):
    image = "image"
    video = "video"  #: published as a reel shared to the feed (Instagram's only video post)
    reel = "reel"
    carousel = "carousel"
    story = "story"


class PostStatus(enum.StrEnum):
    """scheduled → queued → publishing → published | failed | unconfirmed; cancelled by hand.
    ``unconfirmed``: ``media_publish`` was called and its outcome is unknown; the next step
    is to look at Instagram, never to publish again."""

    scheduled = "scheduled"
    queued = "queued"
    publishing = "publishing"
    published = "published"
    failed = "failed"
    unconfirmed = "unconfirmed"
    cancelled = "cancelled"


#: Post states no task changes any more.
FINAL_POST_STATES = (PostStatus.published, PostStatus.failed, PostStatus.cancelled)


class ScheduledPost(SQLModel, table=True):
    __tablename__ = "scheduled_post"
    __table_args__ = (sa.Index("ix_scheduled_post_status_publish_at", "status", "publish_at"),)

    id: int | None = Field(default=None, primary_key=True)
    account_id: int = Field(foreign_key="account.id", index=True, ondelete="CASCADE")
    kind: PostKind = Field(sa_type=sa.String(20))
    #: ``[{"type": "image"|"video", "url": "https://..."}]``: one item, or 2-10 for a carousel.
    media: list[dict[str, str]] = Field(sa_type=sa.JSON)
    caption: str = ""
    publish_at: datetime = _timestamp()
    status: PostStatus = Field(default=PostStatus.scheduled, sa_type=sa.String(20))
    #: Carousel children's container ids, by position, stored the moment Instagram returns each.
    child_container_ids: list[str | None] = Field(default_factory=list, sa_type=sa.JSON)
    #: The container that gets published (the carousel parent, or the only one).
    container_id: str | None = None
    container_checks: int = 0
    #: Set just before ``media_publish`` is called: from then on, look before publishing again.
    publish_called_at: datetime | None = _timestamp(default=None)
    media_id: str | None = None
    permalink: str | None = None
    published_at: datetime | None = _timestamp(default=None)
    attempts: int = 0
    last_error: str | None = None
    #: When a task first picked the post up (the missed-time check applies only then).
    started_at: datetime | None = _timestamp(default=None)
    claimed_until: datetime | None = _timestamp(default=None)
    claim_token: str | None = Field(default=None, sa_type=sa.String(32))
    #: When a task is next expected to touch the post; long past it, the sweeper sends one.
    next_attempt_at: datetime | None = _timestamp(default=None)
    created_at: datetime = _timestamp(default_factory=utcnow)


class ModerationKind(enum.StrEnum):
    block = "block"  #: blocked words or phrases (``pattern``: comma-separated)
    regex = "regex"  #: a regular expression (``pattern``)
    links = "links"  #: any link
    mentions = "mentions"  #: at least ``pattern`` @mentions
    repeats = "repeats"  #: the same text from one author at least ``pattern`` times


class ModerationAction(enum.StrEnum):
    none = "none"
    hide = "hide"
    delete = "delete"
    reply = "reply"  #: a public reply under the comment
    dm = "dm"  #: a private reply to the author


class ActionStatus(enum.StrEnum):
    """none (nothing to do) | pending → acting → done | failed | gone (the comment was deleted)."""

    none = "none"
    pending = "pending"
    acting = "acting"
    done = "done"
    failed = "failed"
    gone = "gone"


class MonitoredPost(SQLModel, table=True):
    __tablename__ = "monitored_post"
    __table_args__ = (sa.UniqueConstraint("account_id", "media_id"),)

    id: int | None = Field(default=None, primary_key=True)
    account_id: int = Field(foreign_key="account.id", index=True, ondelete="CASCADE")
    media_id: str = Field(sa_type=sa.String(64))
    active: bool = True
    #: Seconds until the next poll; shortens on activity, lengthens when quiet.
    poll_interval: float
    next_poll_at: datetime = _timestamp(default_factory=utcnow)
    #: Newest top-level comment seen; paging stops when it meets a comment already stored.
    last_comment_id: str | None = None
    #: From then on the next poll reads every page (replies under older comments do not
    #: surface on the first pages): at the first poll, daily, and after a poll cut short.
    full_read_due_at: datetime = _timestamp(default_factory=utcnow)
    #: Instagram's time of the media (read at the first poll); old posts stop being watched.
    media_timestamp: datetime | None = _timestamp(default=None)
    last_polled_at: datetime | None = _timestamp(default=None)
    created_at: datetime = _timestamp(default_factory=utcnow)


class ModerationRule(SQLModel, table=True):
    __tablename__ = "moderation_rule"

    id: int | None = Field(default=None, primary_key=True)
    account_id: int = Field(foreign_key="account.id", index=True, ondelete="CASCADE")
    kind: ModerationKind = Field(sa_type=sa.String(20))
    pattern: str = ""
    action: ModerationAction = Field(sa_type=sa.String(20))
    #: The reply for the reply and dm actions.
    text: str | None = None
    enabled: bool = True
    created_at: datetime = _timestamp(default_factory=utcnow)


class Comment(SQLModel, table=True):
    __table_args__ = (sa.Index("ix_comment_author_text", "account_id", "from_id", "text_key"),
                      sa.Index("ix_comment_created_time", "created_time"))

    id: int | None = Field(default=None, primary_key=True)
    account_id: int = Field(foreign_key="account.id", ondelete="CASCADE")
    monitored_post_id: int = Field(foreign_key="monitored_post.id", index=True, ondelete="CASCADE")
    graph_comment_id: str = Field(sa_type=sa.String(64), unique=True)
    parent_id: str | None = Field(default=None, sa_type=sa.String(64))
    text: str = ""
    #: The text folded for matching (repeats are counted on it).
    text_key: str = Field(default="", sa_type=sa.String(255))
    username: str | None = None
    from_id: str | None = Field(default=None, sa_type=sa.String(64))
    created_time: datetime = _timestamp()
    action: ModerationAction = Field(default=ModerationAction.none, sa_type=sa.String(20))
    rule_id: int | None = None
    #: Why: the rule that matched and on what, or "no rule matched".
    reason: str = ""
    action_status: ActionStatus = Field(default=ActionStatus.none, sa_type=sa.String(20))
    action_error: str | None = None
    #: The public reply's comment id, or the private reply's message id.
    reply_id: str | None = None
    acted_at: datetime | None = _timestamp(default=None)
    attempts: int = 0
    claimed_until: datetime | None = _timestamp(default=None)
    claim_token: str | None = Field(default=None, sa_type=sa.String(32))
    received_at: datetime = _timestamp(default_factory=utcnow)


class DailyAnalytics(SQLModel, table=True):
    """One row per account and local day; re-running a day replaces its row."""

    __tablename__ = "daily_analytics"
    __table_args__ = (sa.UniqueConstraint("account_id", "day"),)

    id: int | None = Field(default=None, primary_key=True)
    account_id: int = Field(foreign_key="account.id", ondelete="CASCADE")
    #: The day in the configured timezone.
    day: date = Field(sa_type=sa.Date)
    dms_received: int = 0
    dms_auto_answered: int = 0
    dms_for_human: int = 0
    dms_failed: int = 0
    reply_latency_median_s: float | None = None
    reply_latency_p95_s: float | None = None
    comments_seen: int = 0
    comments_hidden: int = 0
    comments_deleted: int = 0
    comments_replied: int = 0
    posts_published: int = 0
    posts_failed: int = 0
    posts_unconfirmed: int = 0
    followers: int | None = None
    reach: int | None = None
    views: int | None = None
    profile_views: int | None = None
    accounts_engaged: int | None = None
    #: False when some insight could not be read; ``problems`` says which and why.
    complete: bool = True
    problems: str | None = None
    generated_at: datetime = _timestamp(default_factory=utcnow)


class KnowledgeEntry(SQLModel, table=True):
    """An account's knowledge-base entry. On PostgreSQL a generated ``search`` tsvector column
    with a GIN index (added by DDL below) serves the match; when a question's words match a
    large share of the entries, PostgreSQL rightly prefers scanning them to rank them all
    (about 9 ms for 10,000 entries in bench/retrieval.py)."""

    __tablename__ = "knowledge_entry"

    id: int | None = Field(default=None, primary_key=True)
    account_id: int = Field(foreign_key="account.id", index=True, ondelete="CASCADE")
    title: str
    answer: str
    tags: str = ""
    enabled: bool = True
    created_at: datetime = _timestamp(default_factory=utcnow)


#: PostgreSQL text-search configuration for the knowledge base (stemming, stop words).
KB_SEARCH_CONFIG = "english"
#: ts_rank weights for {D, C, B, A} = {-, answer, tags, title}, with length normalisation 1:
#: on the 30 paraphrased questions of the tests, 29 rank their entry first (26 with the
#: default weights and no normalisation).
KB_RANK_WEIGHTS = sa.literal_column("'{0.2,0.4,0.8,1.0}'::real[]")

sa.event.listen(KnowledgeEntry.__table__, "after_create", sa.DDL(
    f"ALTER TABLE knowledge_entry ADD COLUMN search tsvector GENERATED ALWAYS AS ("
    f"setweight(to_tsvector('{KB_SEARCH_CONFIG}', coalesce(title, '')), 'A') || "
    f"setweight(to_tsvector('{KB_SEARCH_CONFIG}', coalesce(tags, '')), 'B') || "
    f"setweight(to_tsvector('{KB_SEARCH_CONFIG}', coalesce(answer, '')), 'C')) STORED; "
    f"CREATE INDEX ix_knowledge_entry_search ON knowledge_entry USING GIN (search)").execute_if(dialect="postgresql"))


class ConversationState(SQLModel, table=True):
    """A conversation handed to a human: no automatic reply until someone resumes it."""

    __tablename__ = "conversation_state"
    __table_args__ = (sa.UniqueConstraint("account_id", "conversation_id"),)

    id: int | None = Field(default=None, primary_key=True)
    account_id: int = Field(foreign_key="account.id", ondelete="CASCADE")
    conversation_id: str = Field(sa_type=sa.String(255))
    handed_off_at: datetime | None = _timestamp(default=None)
    reason: str | None = None


# Database helpers ############################################################################

_engine: sa.Engine | None = None


def get_engine() -> sa.Engine:
    """The process's engine, made on first use (and again in each forked pool child)."""
    global _engine
    if _engine is None:
        url = make_url(settings.effective_database_url)
        if url.get_backend_name() == "sqlite":
            if url.database:
                Path(url.database).parent.mkdir(parents=True, exist_ok=True)
            _engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
            sa.event.listen(_engine, "connect", _sqlite_pragmas)
        else:
            _engine = sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    return _engine


def session() -> Session:
    return Session(get_engine(), expire_on_commit=False)


def create_tables() -> None:
    SQLModel.metadata.create_all(get_engine())


def dialect_insert(db: Session, model: type[SQLModel]) -> Any:
    """An INSERT with ``on_conflict_do_*`` for the session's backend (PostgreSQL or SQLite)."""
    if db.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(model.__table__)


def insert_once(db: Session, model: type[SQLModel], values: dict[str, Any]) -> int | None:
    """Insert a row unless a unique key already has it; the new id, or None for a repeat."""
    statement = dialect_insert(db, model).values(**values).on_conflict_do_nothing().returning(model.__table__.c.id)
    return db.execute(statement).scalar_one_or_none()


def update_where(db: Session, model: type[SQLModel], where: Sequence[Any], **values: Any) -> int:
    """One conditional UPDATE: the only way state changes, so a race has one winner."""
    result = db.execute(sa.update(model).where(*where).values(**values))
    return result.rowcount


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# Locks #######################################################################################

_redis: Any = None


def get_redis() -> Any:
    """The process's Redis client (locks), or None on the embedded defaults."""
    global _redis
    if _redis is None and settings.redis_url:
        import redis

        _redis = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    return _redis


_RELEASE_SCRIPT = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


@contextlib.contextmanager
def try_lock(name: str, ttl: float) -> Iterator[bool]:
    """Hold a named lock for the block if nobody else does; yields whether it was taken.

    On Redis the lock expires after ``ttl`` seconds, so a killed holder frees it by itself. On
    the embedded defaults (one machine) it is an ``flock`` that the kernel frees with its holder.
    """
    client = get_redis()
    if client is not None:
        key, token = f"instaqueue:lock:{name}", secrets.token_hex(8)
        taken = bool(client.set(key, token, nx=True, px=max(1, int(ttl * 1000))))
        try:
            yield taken
        finally:
            if taken:
                client.eval(_RELEASE_SCRIPT, 1, key, token)
        return
    folder = settings.data_dir / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_RENEW_SCRIPT = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
                 "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0")


class LeaderLock:
    """A lock one process keeps for as long as it renews it: beat's, so exactly one beat
    sends. On Redis the key expires ``ttl`` seconds after the last renewal, so a killed
    holder is replaced within ``ttl``; on the embedded defaults (one machine) it is an
    ``flock`` held for the process's life, which the kernel frees when the process dies."""

    def __init__(self, name: str, ttl: float) -> None:
        self.name, self.ttl, self.token = name, ttl, secrets.token_hex(8)
        self._handle: Any = None

    def hold(self) -> bool:
        """Take or renew the lock; False while another process holds it."""
        client = get_redis()
        if client is not None:
            key, ttl_ms = f"instaqueue:lock:{self.name}", int(self.ttl * 1000)
            if client.eval(_RENEW_SCRIPT, 1, key, self.token, ttl_ms) == 1:
                return True
            return bool(client.set(key, self.token, nx=True, px=ttl_ms))
        if self._handle is None:
            folder = settings.data_dir / "locks"
            folder.mkdir(parents=True, exist_ok=True)
            handle = open(folder / f"{self.name}.leader", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                return False
            self._handle = handle
        return True


#: Where beat's heartbeat lives (Redis key, or a file on the embedded defaults).
BEAT_HEARTBEAT_KEY = "instaqueue:beat:heartbeat"


def record_beat_heartbeat() -> None:
    client = get_redis()
    if client is not None:
        client.set(BEAT_HEARTBEAT_KEY, repr(time.time()), ex=3600)
        return
    path = settings.data_dir / "beat.heartbeat"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(repr(time.time()))


def beat_heartbeat_age() -> float | None:
    """Seconds since the active beat's last tick; None when no beat ever ticked."""
    client = get_redis()
    if client is not None:
        value = client.get(BEAT_HEARTBEAT_KEY)
    else:
        path = settings.data_dir / "beat.heartbeat"
        value = path.read_text() if path.exists() else None
    return time.time() - float(value) if value else None


# Graph API client ############################################################################

#: Error codes that mean a rate limit (800xx business-use-case codes are matched by range).
RATE_LIMIT_CODES = frozenset({4, 17, 32, 613})
#: Error codes Meta documents as temporary.
TRANSIENT_CODES = frozenset({1, 2})
#: Error codes for a missing permission (200-299 are matched by range).
PERMISSION_CODES = frozenset({10})
#: Code for an invalid or expired access token.
TOKEN_INVALID_CODE = 190


@dataclass(frozen=True)
class Usage:
    """Rate-limit usage from ``X-App-Usage`` and ``X-Business-Use-Case-Usage`` (percentages)."""

    app_percent: float = 0.0
    business: dict[str, float] = field(default_factory=dict)
    regain_minutes: dict[str, float] = field(default_factory=dict)

    def percent_for(self, object_id: str) -> float:
        return max(self.app_percent, self.business.get(object_id, 0.0))


@dataclass(frozen=True)
class GraphResponse:
    data: dict[str, Any]
    usage: Usage


class GraphClient:
    """A small Graph API client: one connection pool per process, the token only in the
    ``Authorization`` header, and every failure turned into a :class:`GraphAPIError`."""

    def __init__(self, base_url: str, timeout: float) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/") + "/",
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            limits=httpx.Limits(max_connections=20, max_keepalive_connections=10),
            headers={"User-Agent": "instaqueue"},
        )

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, token: str, params: dict[str, Any] | None = None,
                json_body: dict[str, Any] | None = None) -> GraphResponse:
        try:
            response = self._http.request(
                method, path.lstrip("/"), params=params, json=json_body,
                headers={"Authorization": f"Bearer {token}"})
        except httpx.TimeoutException as exc:
            raise TransientError(f"Graph API timed out ({type(exc).__name__}) on {method} {path}") from None
        except httpx.TransportError as exc:
            raise TransientError(f"Graph API unreachable ({type(exc).__name__}) on {method} {path}") from None
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, UnicodeError) as exc:
            raise BadRequest(f"not a usable Graph path ({type(exc).__name__}): {path[:80]!r}") from None
        usage = parse_usage(response.headers)
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400 or not isinstance(body, dict) or "error" in body:
            raise error_from_response(response.status_code, body, usage=usage, token=token)
        return GraphResponse(body, usage)


def error_from_response(status: int, body: Any, *, usage: Usage | None = None,
                        token: str | None = None) -> GraphAPIError:
    """Map Meta's error object (or its absence) to the error hierarchy."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        message = "Graph API answered without a JSON object" if status < 400 else f"Graph API answered HTTP {status}"
        cls = TransientError if status >= 500 or status < 400 else (RateLimited if status == 429 else BadRequest)
        return cls(message, status=status)
    code, subcode = _as_int(error.get("code")), _as_int(error.get("error_subcode"))
    message = str(error.get("message") or "no message")
    if token:
        message = message.replace(token, "[token]")
    kwargs = dict(code=code, subcode=subcode, status=status, fbtrace_id=error.get("fbtrace_id"))
    if code == TOKEN_INVALID_CODE:
        return TokenInvalid(message, **kwargs)
    if code in RATE_LIMIT_CODES or (code is not None and 80000 <= code < 80100) or status == 429:
        minutes = max((usage.regain_minutes.values() if usage else ()), default=0)
        return RateLimited(message, retry_after=minutes * 60 or None, **kwargs)
    if error.get("is_transient") is True or code in TRANSIENT_CODES or status >= 500:
        return TransientError(message, **kwargs)
    if code in PERMISSION_CODES or (code is not None and 200 <= code < 300):
        return PermissionDenied(message, **kwargs)
    return BadRequest(message, **kwargs)


def parse_usage(headers: Any) -> Usage:
    """Read the usage headers; a header that is missing or not JSON counts as no usage."""
    app_percent = 0.0
    app = _json_header(headers.get("x-app-usage"))
    if isinstance(app, dict):
        app_percent = max((_as_float(app.get(k)) for k in ("call_count", "total_cputime", "total_time")), default=0.0)
    business: dict[str, float] = {}
    regain: dict[str, float] = {}
    buc = _json_header(headers.get("x-business-use-case-usage"))
    if isinstance(buc, dict):
        for object_id, entries in buc.items():
            for entry in entries if isinstance(entries, list) else []:
                if not isinstance(entry, dict):
                    continue
                percent = max(_as_float(entry.get(k)) for k in ("call_count", "total_cputime", "total_time"))
                business[str(object_id)] = max(business.get(str(object_id), 0.0), percent)
                minutes = _as_float(entry.get("estimated_time_to_regain_access"))
                regain[str(object_id)] = max(regain.get(str(object_id), 0.0), minutes)
    return Usage(app_percent, business, regain)


_client: GraphClient | None = None


def graph() -> GraphClient:
    """The process's Graph client (one connection pool per process)."""
    global _client
    if _client is None:
        _client = GraphClient(settings.graph_api_url, settings.graph_timeout)
    return _client


def graph_call(account: Account, method: str, path: str, *, params: dict[str, Any] | None = None,
               json_body: dict[str, Any] | None = None) -> dict[str, Any]:
    """Call Graph for an account and keep the account's state in step with the answer:
    a 190 parks it, a rate limit backs it off, high usage slows its polling. An account that
    is parked or backing off is not called at all."""
    if account.state != AccountState.active:
        raise AccountUnavailable(f"account {account.id} is {account.state}")
    now = utcnow()
    if account.backoff_until and account.backoff_until > now:
        raise RateLimited(f"account {account.id} is backing off until {account.backoff_until:%H:%M:%S}",
                          retry_after=(account.backoff_until - now).total_seconds())
    try:
        response = graph().request(method, path, token=account.access_token, params=params, json_body=json_body)
    except TokenInvalid as exc:
        park_account(account.id, f"access token rejected: {exc}")
        account.state = AccountState.needs_reauth
        raise
    except RateLimited as exc:
        if exc.retry_after is None:
            exc.retry_after = settings.rate_limit_backoff
        back_off_account(account.id, exc.retry_after)
        account.backoff_until = utcnow() + timedelta(seconds=exc.retry_after)
        raise
    slow_for = usage_poll_interval(response.usage.percent_for(account.ig_user_id), settings.dm_poll_interval)
    if slow_for > settings.dm_poll_interval:
        with session() as db:
            update_where(db, Account, [Account.id == account.id],
                         dm_next_poll_at=utcnow() + timedelta(seconds=slow_for))
            db.commit()
    return response.data


def park_account(account_id: int, reason: str) -> None:
    log.warning("account %s parked: needs re-auth (%s)", account_id, reason)
    with session() as db:
        update_where(db, Account, [Account.id == account_id],
                     state=AccountState.needs_reauth, state_reason=reason[:500])
        db.commit()


def back_off_account(account_id: int, seconds: float) -> None:
    log.warning("account %s rate limited: no calls for %.0f s", account_id, seconds)
    with session() as db:
        update_where(db, Account, [Account.id == account_id],
                     backoff_until=utcnow() + timedelta(seconds=seconds))
        db.commit()


def _json_header(value: str | None) -> Any:
    try:
        return json.loads(value) if value else None
    except ValueError:
        return None


def _as_int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def _as_float(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


# Pure logic ##################################################################################

def retry_delay(attempt: int, *, base: float, cap: float, jitter: float,
                rand: Callable[[], float] = random.random) -> float:
    """Seconds before retry number ``attempt`` (0 for the first): ``base * 2**attempt`` capped
    at ``cap``, then spread by ``±jitter`` so that retries after an outage do not all land at once."""
    nominal = min(cap, base * 2.0 ** min(max(attempt, 0), 64))
    r = rand()
    r = r if 0.0 <= r <= 1.0 else 0.5  # a broken random source (NaN, out of range) gets no jitter
    low, high = nominal * (1 - jitter), nominal * (1 + jitter)
    return min(max(nominal * (1 + jitter * (2 * r - 1)), low), high)


def next_retry_delay(failures: int, *, policy: Settings | None = None,
                     rand: Callable[[], float] = random.random) -> float | None:
    """The delay after the ``failures``-th transient failure, or None when retries are spent."""
    policy = policy or settings
    if failures > policy.max_retries:
        return None
    return retry_delay(failures - 1, base=policy.retry_base, cap=policy.retry_cap,
                       jitter=policy.retry_jitter, rand=rand)


def next_attempt(exc: Exception, failures: int) -> tuple[int, float | None]:
    """The shared retry policy applied to an error after ``failures`` counted failures: the
    new count and the delay, or None when the retries are spent. A rate limit waits for the
    account's back-off (capped, so the ETA stays far below Redis's redelivery) and does not
    count; anything else counts and follows the schedule."""
    if isinstance(exc, RateLimited):
        return failures, min(max(exc.retry_after or settings.rate_limit_backoff, 1.0), settings.retry_cap)
    return failures + 1, next_retry_delay(failures + 1)


#: Longest automatic reply, in bytes (the Send API's limit for a text message).
MAX_REPLY_BYTES = 1000

#: Characters that render as nothing and are used to slip words past filters.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)


def normalize_text(text: str) -> str:
    """Fold text for matching: NFKC (full-width letters), no accents, no invisible characters,
    case-folded, whitespace collapsed."""
    folded = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text).translate(_INVISIBLE))
    folded = "".join(ch for ch in folded if not unicodedata.combining(ch)).casefold()
    return " ".join(folded.split())


def rule_matches(match: str, text: str) -> bool:
    """Whether any comma-separated word or phrase of ``match`` stands in ``text`` as whole words."""
    haystack = normalize_text(text)
    for needle in (normalize_text(part) for part in match.split(",")):
        if needle and re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", haystack):
            return True
    return False


def choose_reply(text: str, rules: Sequence[ReplyRule]) -> ReplyRule | None:
    """The first enabled rule, in creation order, whose words stand in the message."""
    for rule in sorted(rules, key=lambda r: (r.created_at, r.id or 0)):
        if rule.enabled and rule_matches(rule.match, text):
            return rule
    return None


#: Each 5 points of usage above the slowdown threshold doubles the poll interval.
USAGE_DOUBLING_POINTS = 5.0


def usage_poll_interval(percent: float, base: float, *, slow_from: float | None = None) -> float:
    """The poll interval for an account at ``percent`` of a Graph allowance: ``base`` below the
    threshold, then doubling every 5 points, so polling eases off well before 100 %."""
    slow_from = settings.usage_slowdown_percent if slow_from is None else slow_from
    if not percent > slow_from:
        return base
    return base * 2 ** ((min(percent, 100.0) - slow_from) / USAGE_DOUBLING_POINTS)


@dataclass(frozen=True)
class ParsedMessage:
    graph_message_id: str
    conversation_id: str
    sender_id: str
    sender_username: str | None
    text: str
    created_time: datetime


#: A Graph time further ahead of our clock than this is refused: stored as a cursor it
#: would hide every later message.
MAX_FUTURE_SKEW = timedelta(hours=1)


def parse_graph_time(value: Any, *, not_after: datetime | None = None) -> datetime:
    """Meta's ``2026-11-24T09:00:00+0000`` (and ISO 8601 generally) as an aware UTC datetime;
    with ``not_after``, a time later than that is malformed too."""
    if not isinstance(value, str):
        raise MalformedPayload(f"time is not a string: {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        parsed = (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise MalformedPayload(f"unparsable time {clean_text(value)[:40]!r}") from None
    if not_after is not None and parsed > not_after:
        raise MalformedPayload(f"time {value[:40]!r} lies in the future")
    return parsed


def clean_text(value: str) -> str:
    """Text safe to store: no NUL characters, no lone surrogates (PostgreSQL refuses both)."""
    return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def graph_id(value: Any, what: str, *, limit: int = 255) -> str:
    """A Graph object id fit to store and to put in a URL, or :class:`MalformedPayload`."""
    if not isinstance(value, str) or not value:
        raise MalformedPayload(f"{what} without an id")
    if len(value) > limit or not value.isprintable() or any(c in value for c in "/?#% "):
        raise MalformedPayload(f"{what} with an unusable id {clean_text(value)[:40]!r}")
    return value


def parse_message(raw: Any, conversation_id: str) -> ParsedMessage:
    """One message object of a conversation, or :class:`MalformedPayload`."""
    if not isinstance(raw, dict):
        raise MalformedPayload(f"message is a {type(raw).__name__}, not an object")
    message_id = graph_id(raw.get("id"), "message")
    sender = raw.get("from")
    if not isinstance(sender, dict):
        raise MalformedPayload(f"message {message_id[:40]} without a sender id")
    sender_id = graph_id(sender.get("id"), f"sender of message {message_id[:40]}", limit=64)
    text = raw.get("message", "")
    if not isinstance(text, str):
        raise MalformedPayload(f"message {message_id[:40]} text is a {type(text).__name__}")
    username = sender.get("username")
    return ParsedMessage(message_id, conversation_id, sender_id,
                         clean_text(username)[:255] if isinstance(username, str) else None, clean_text(text),
                         parse_graph_time(raw.get("created_time"), not_after=utcnow() + MAX_FUTURE_SKEW))


@dataclass
class ConversationPage:
    """What one page of ``/conversations`` gave: inbound messages, the newest update time seen,
    whether an older conversation than ``since`` was met, the next cursor, and the problems."""

    messages: list[ParsedMessage] = field(default_factory=list)
    newest: datetime | None = None
    reached_old: bool = False
    after: str | None = None
    without_messages: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def parse_conversation_page(payload: Any, *, account_ig_id: str, since: datetime | None) -> ConversationPage:
    """Pick the inbound messages out of a conversations page. Bad items are reported in
    ``problems`` and skipped; they never cost the other messages."""
    page = ConversationPage()
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        page.problems.append("conversations page without a data list")
        return page
    for raw in data:
        try:
            if not isinstance(raw, dict):
                raise MalformedPayload("conversation is not an object")
            graph_id(raw.get("id"), "conversation")
            updated = parse_graph_time(raw.get("updated_time"), not_after=utcnow() + MAX_FUTURE_SKEW)
        except MalformedPayload as exc:
            page.problems.append(str(exc))
            continue
        if since is not None and updated < since:
            page.reached_old = True
            continue
        page.newest = max(page.newest or updated, updated)
        messages = raw.get("messages")
        if messages is None:
            page.without_messages.append(raw["id"])
            continue
        items = messages.get("data") if isinstance(messages, dict) else None
        if not isinstance(items, list):
            page.problems.append(f"conversation {raw['id'][:40]}: messages without a data list")
            continue
        for item in items:
            try:
                message = parse_message(item, raw["id"])
            except MalformedPayload as exc:
                page.problems.append(f"conversation {raw['id'][:40]}: {exc}")
                continue
            if message.sender_id != account_ig_id:
                page.messages.append(message)
    paging = payload.get("paging")
    if isinstance(paging, dict) and paging.get("next"):
        cursors = paging.get("cursors")
        after = cursors.get("after") if isinstance(cursors, dict) else None
        page.after = after if isinstance(after, str) and after else None
    return page


def find_sent_replies(messages: Any, *, account_ig_id: str, recipient_id: str, text: str,
                      not_before: datetime) -> list[str]:
    """Ids of messages the account sent to ``recipient_id`` with exactly ``text`` at or after
    ``not_before``, oldest first, among a conversation's messages."""
    found: list[tuple[datetime, str]] = []
    for raw in messages if isinstance(messages, list) else []:
        try:
            message = parse_message(raw, "")
        except MalformedPayload:
            continue
        to = raw["to"].get("data") if isinstance(raw.get("to"), dict) else None
        recipients = {r.get("id") for r in to if isinstance(r, dict)} if isinstance(to, list) else set()
        if (message.sender_id == account_ig_id and message.text == text
                and message.created_time >= not_before and (not recipients or recipient_id in recipients)):
            found.append((message.created_time, message.graph_message_id))
    return [message_id for _, message_id in sorted(found)]


#: Hashtags and @mentions as Instagram counts them (not inside e-mail addresses or entities).
_HASHTAG = re.compile(r"(?<![\w#&])#\w+")
_MENTION = re.compile(r"(?<![\w@])@[A-Za-z0-9._]+")


@dataclass(frozen=True)
class Decision:
    """What to do with a comment and why; ``rule_id`` None means no rule matched."""

    action: ModerationAction
    reason: str
    rule_id: int | None = None


#: Links, with or without a scheme ("shop.example.com", "bit.ly/x", "www.x").
_LINK = re.compile(r"(?:https?://|www\.)\S+|\b[\w-]+(?:\.[\w-]+)*\.(?:com|net|org|io|ly|me|co|shop|store|xyz|"
                   r"info|biz|link|site|online|ru|cn|de|app|gg|tk|top|club)\b(?:/\S*)?", re.IGNORECASE)
#: Runs of single characters split by spaces or punctuation: "s p a m", "s.p.a.m".
_SPACED_OUT = re.compile(r"(?<!\w)\w(?:[\W_]+\w(?!\w)){2,}")
#: Longest regular expression a moderation rule may hold.
MAX_RULE_REGEX = 500


def text_variants(text: str) -> tuple[str, ...]:
    """The folded text, and the same with spaced-out letters joined ("s p a m" → "spam")."""
    folded = normalize_text(text)
    joined = _SPACED_OUT.sub(lambda m: re.sub(r"[\W_]+", "", m.group()), folded)
    return (folded,) if joined == folded else (folded, joined)


def find_blocked(words: str, text: str) -> str | None:
    """The first blocked word or phrase standing in ``text`` as whole words, through case,
    width, accents, invisible characters and spacing tricks; None when there is none."""
    variants = text_variants(text)
    for needle in (normalize_text(w) for w in words.split(",")):
        if needle and any(re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", v) for v in variants):
            return needle
    return None


def moderate(text: str, rules: Sequence[ModerationRule], *, same_text_count: int = 0) -> Decision:
    """The first enabled rule (in creation order) that the comment breaks, as a decision with
    its reason; "no rule matched" otherwise. ``same_text_count``: earlier comments with the
    same folded text by the same author."""
    for rule in sorted(rules, key=lambda r: (r.created_at, r.id or 0)):
        if not rule.enabled:
            continue
        reason = _rule_reason(rule, text, same_text_count)
        if reason:
            return Decision(ModerationAction(rule.action), f"rule {rule.id} ({rule.kind}): {reason}", rule.id)
    return Decision(ModerationAction.none, "no rule matched")


def _rule_reason(rule: ModerationRule, text: str, same_text_count: int) -> str | None:
    if rule.kind == ModerationKind.block:
        word = find_blocked(rule.pattern, text)
        return f"blocked word {word!r}" if word else None
    if rule.kind == ModerationKind.links:
        found = next((m.group() for v in text_variants(text) for m in [_LINK.search(v)] if m), None)
        return f"link {found[:60]!r}" if found else None
    if rule.kind == ModerationKind.mentions:
        count = len(_MENTION.findall(normalize_text(text)))
        return f"{count} @mentions" if count >= max(1, _as_int(rule.pattern) or 1) else None
    if rule.kind == ModerationKind.repeats:
        times = same_text_count + 1
        return f"the same text {times} times" if times >= max(2, _as_int(rule.pattern) or 2) else None
    if rule.kind == ModerationKind.regex:
        try:
            match = re.search(rule.pattern, unicodedata.normalize("NFKC", text), re.IGNORECASE)
        except re.error:
            return None
        return f"matches /{rule.pattern[:60]}/" if match else None
    return None


def next_comment_interval(current: float, *, found: int, low: float, high: float) -> float:
    """A poll that found comments halves the interval, a quiet one lengthens it by half;
    always within [low, high]."""
    interval = current / 2 if found else current * 1.5
    return min(high, max(low, interval))


#: Instagram's caption limits.
MAX_CAPTION_CHARS, MAX_HASHTAGS, MAX_MENTIONS = 2200, 30, 20
#: Children of a carousel.
CAROUSEL_MIN, CAROUSEL_MAX = 2, 10


def post_problems(*, kind: str, media: list[dict[str, str]], caption: str, publish_at: datetime | None,
                  now: datetime, grace: float) -> list[str]:
    """Everything Instagram would refuse in a post, found before any call; empty when fine.
    ``publish_at`` None skips the time check (a post already under way)."""
    problems: list[str] = []
    if kind not in PostKind.__members__:
        return [f"unknown post kind {kind!r}"]
    if len(caption) > MAX_CAPTION_CHARS:
        problems.append(f"caption has {len(caption)} characters; Instagram takes at most {MAX_CAPTION_CHARS}")
    if (tags := len(_HASHTAG.findall(caption))) > MAX_HASHTAGS:
        problems.append(f"caption has {tags} hashtags; Instagram takes at most {MAX_HASHTAGS}")
    if (mentions := len(_MENTION.findall(caption))) > MAX_MENTIONS:
        problems.append(f"caption has {mentions} @mentions; Instagram takes at most {MAX_MENTIONS}")
    if kind == PostKind.story and caption.strip():
        problems.append("stories have no caption")
    if kind == PostKind.carousel and not CAROUSEL_MIN <= len(media) <= CAROUSEL_MAX:
        problems.append(f"a carousel has {CAROUSEL_MIN} to {CAROUSEL_MAX} items, not {len(media)}")
    if kind != PostKind.carousel and len(media) != 1:
        problems.append(f"a {kind} post has exactly one media URL, not {len(media)}")
    wanted = {PostKind.image: {"image"}, PostKind.video: {"video"}, PostKind.reel: {"video"}}.get(
        PostKind(kind), {"image", "video"})
    for item in media:
        kind_of_item, url = (item.get("type"), item.get("url")) if isinstance(item, dict) else (None, None)
        parts = urlsplit(url) if isinstance(url, str) else None
        if not parts or parts.scheme != "https" or not parts.hostname or any(c.isspace() for c in url):
            problems.append(f"media URL {str(url)[:80]!r} is not a public https:// URL")
        elif kind_of_item not in wanted:
            problems.append(f"a {kind} post cannot carry {kind_of_item or 'untyped'} media")
    if publish_at is not None:
        late = (now - publish_at).total_seconds()
        if late > grace:
            problems.append(f"publish time {publish_at:%Y-%m-%d %H:%M:%S %Z} is {late:.0f} s in the past "
                            f"(more than the {grace:.0f} s grace)")
    return problems


# Replies from the knowledge base and an LLM ###################################################

#: Entries retrieved for a DM, and turns of the conversation given to the LLM.
KB_TOP_K = 3
LLM_HISTORY_TURNS = 3
#: Instagram's standard messaging window: no automatic reply after it.
REPLY_WINDOW = timedelta(hours=24)
_WORD = re.compile(r"\w+")
_SUFFIXES = ("ings", "ing", "ies", "es", "ed", "s")
#: The SQLite overlap score (0 to 1) times this is on PostgreSQL's ts_rank scale.
SIMPLE_SCORE_SCALE = 0.2


def keywords(text: str) -> list[str]:
    """The words of a message worth searching for, folded, at most 32."""
    return list(dict.fromkeys(w for w in _WORD.findall(normalize_text(text)) if len(w) > 1))[:32]


def _stem(word: str) -> str:
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def simple_score(question: str, entry: KnowledgeEntry) -> float:
    """Relevance in [0, 1] for the SQLite development store: the share of the question's
    stemmed words found in the title (weight 1), tags (0.6) or answer (0.3)."""
    words = {_stem(w) for w in keywords(question)}
    if not words:
        return 0.0
    fields = [({_stem(w) for w in keywords(text)}, weight)
              for text, weight in ((entry.title, 1.0), (entry.tags, 0.6), (entry.answer, 0.3))]
    return sum(max((weight for found, weight in fields if w in found), default=0.0) for w in words) / len(words)


def retrieve_entries(account_id: int, question: str, limit: int = KB_TOP_K) -> list[tuple[KnowledgeEntry, float]]:
    """The account's enabled entries that best answer ``question``, best first, with scores.
    PostgreSQL: full-text search on the generated tsvector (GIN index), any word may match
    (``websearch_to_tsquery`` of "w1 or w2 ..."), ranked by ``ts_rank``. SQLite: a simple
    word-overlap score, good enough for development."""
    words = keywords(question)
    if not words:
        return []
    with session() as db:
        if db.get_bind().dialect.name == "postgresql":
            query = sa.func.websearch_to_tsquery(KB_SEARCH_CONFIG, " or ".join(words))
            search = sa.literal_column("knowledge_entry.search")
            score = sa.func.ts_rank(KB_RANK_WEIGHTS, search, query, 1).label("score")
            rows = db.exec(select(KnowledgeEntry, score).where(
                KnowledgeEntry.account_id == account_id, KnowledgeEntry.enabled, search.op("@@")(query),
            ).order_by(score.desc(), KnowledgeEntry.id).limit(limit)).all()
            return [(entry, float(value)) for entry, value in rows]
        entries = db.exec(select(KnowledgeEntry).where(KnowledgeEntry.account_id == account_id,
                                                       KnowledgeEntry.enabled)).all()
    scored = sorted(((e, simple_score(question, e)) for e in entries), key=lambda p: (-p[1], p[0].id or 0))
    # Scaled to ts_rank's range so that one threshold (kb_min_score) serves both stores.
    return [(e, score * SIMPLE_SCORE_SCALE) for e, score in scored[:limit] if score > 0]


def build_llm_messages(question: str, entries: Sequence[KnowledgeEntry], history: Sequence[tuple[str, str]],
                       *, username: str) -> list[dict[str, str]]:
    """The chat: only the retrieved entries and the recent turns, with an instruction to say
    so when the entries do not hold the answer rather than invent one."""
    listed = "\n".join(f"[{i}] {e.title}\n{e.answer}" for i, e in enumerate(entries, 1))
    system = (f"You answer Instagram direct messages for @{username}. Use only the knowledge-base entries "
              f"below. If they do not contain the answer, say that you do not know and that a person from the "
              f"team will follow up; never invent facts, prices, dates or promises. Reply in the customer's "
              f"language, in plain text, in at most three short sentences.\n\nKnowledge base:\n{listed}")
    messages = [{"role": "system", "content": system}]
    for asked, answered in history:
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    return messages + [{"role": "user", "content": question}]


def truncate_bytes(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, at a word boundary, with an ellipsis."""
    if len(text.encode()) <= limit:
        return text
    cut = text.encode()[: limit - len("…".encode())].decode(errors="ignore")
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut).rstrip(" ,.;:") + "…"


_llm: httpx.Client | None = None


def ask_llm(messages: list[dict[str, str]]) -> str:
    """One chat completion: the answer text, or TransientError (timeout, 5xx, 429) or
    MalformedPayload (no usable answer, or one over the Send API's size) for the caller's
    fallback. The API key is sent only in the Authorization header."""
    global _llm
    if _llm is None:
        _llm = httpx.Client(timeout=httpx.Timeout(settings.llm_timeout, connect=min(settings.llm_timeout, 5.0)))
    headers = {"Authorization": f"Bearer {settings.llm_api_key.get_secret_value()}"} if settings.llm_api_key else {}
    try:
        response = _llm.post(settings.llm_url, json={"model": settings.llm_model, "temperature": 0,
                                                     "messages": messages}, headers=headers)
    except httpx.TimeoutException:
        raise TransientError("the LLM timed out") from None
    except httpx.TransportError as exc:
        raise TransientError(f"the LLM is unreachable ({type(exc).__name__})") from None
    if response.status_code >= 500 or response.status_code == 429:
        raise TransientError(f"the LLM answered HTTP {response.status_code}")
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, LookupError, TypeError):
        raise MalformedPayload(f"the LLM answered HTTP {response.status_code} without a message") from None
    if not isinstance(content, str) or not content.strip():
        raise MalformedPayload("the LLM answered an empty message")
    if len(content.strip().encode()) > MAX_REPLY_BYTES:
        raise MalformedPayload(f"the LLM's answer is over {MAX_REPLY_BYTES} bytes")
    return content.strip()


@dataclass(frozen=True)
class ReplyChoice:
    """The reply for a DM and the path that chose it; ``text`` None leaves it for a person."""

    text: str | None
    path: str
    reason: str = ""
    rule_id: int | None = None
    entry_ids: tuple[int, ...] = ()


def choose_reply_for(message: InboundMessage, account: Account, rules: Sequence[ReplyRule], *,
                     llm_may_retry: bool) -> ReplyChoice:
    """Rule, then an LLM answer grounded in the best entries, then the best entry itself when
    it scores high enough, then a person. Never outside the 24-hour window, never in a
    conversation handed to a human. An LLM that fails falls back down the chain; a transient
    failure is raised instead while ``llm_may_retry``."""
    if utcnow() - message.created_time > REPLY_WINDOW:
        return ReplyChoice(None, "human", "outside Instagram's 24-hour reply window")
    if handed_off(account.id, message.conversation_id):
        return ReplyChoice(None, "human", "conversation handed to a human")
    if find_blocked(settings.handoff_phrases, message.text):
        hand_off(account.id, message.conversation_id, f"asked for a person: {message.text[:200]}")
        return ReplyChoice(None, "human", "asked for a person")
    rule = choose_reply(message.text, rules)
    if rule is not None:
        return ReplyChoice(rule.reply, "rule", rule_id=rule.id)
    found = retrieve_entries(account.id, message.text)
    if found and settings.llm_url:
        try:
            answer = ask_llm(build_llm_messages(message.text, [e for e, _ in found],
                                                conversation_history(message), username=account.username))
            return ReplyChoice(answer, "llm", entry_ids=tuple(e.id for e, _ in found))
        except TransientError:
            if llm_may_retry:
                raise
            log.warning("DM %s: the LLM stayed unavailable; falling back", message.id)
        except MalformedPayload as exc:
            log.warning("DM %s: unusable LLM answer (%s); falling back", message.id, exc)
    if found and found[0][1] >= settings.kb_min_score:
        best = found[0][0]
        return ReplyChoice(truncate_bytes(best.answer, MAX_REPLY_BYTES), "kb", entry_ids=(best.id,))
    return ReplyChoice(None, "human", "no rule or knowledge-base entry answers it")


def conversation_history(message: InboundMessage) -> list[tuple[str, str]]:
    """The last answered turns of the conversation before this message."""
    with session() as db:
        earlier = db.exec(select(InboundMessage.text, InboundMessage.reply_text).where(
            InboundMessage.conversation_id == message.conversation_id, InboundMessage.id != message.id,
            InboundMessage.created_time <= message.created_time, InboundMessage.status == MessageStatus.replied,
        ).order_by(InboundMessage.created_time.desc()).limit(LLM_HISTORY_TURNS)).all()
    return [(asked, answered or "") for asked, answered in reversed(earlier)]


def handed_off(account_id: int, conversation_id: str) -> bool:
    with session() as db:
        return db.exec(select(ConversationState.id).where(
            ConversationState.account_id == account_id, ConversationState.conversation_id == conversation_id,
            ConversationState.handed_off_at.is_not(None))).first() is not None


def hand_off(account_id: int, conversation_id: str, reason: str) -> None:
    with session() as db:
        statement = dialect_insert(db, ConversationState).values(
            account_id=account_id, conversation_id=conversation_id, handed_off_at=utcnow(), reason=reason)
        db.execute(statement.on_conflict_do_update(index_elements=["account_id", "conversation_id"],
                                                   set_={"handed_off_at": utcnow(), "reason": reason}))
        db.commit()
    log.info("account %s: conversation %s handed to a human", account_id, conversation_id[:40])


# Celery app ##################################################################################

#: Queues, served in this order whenever more than one has work waiting.
QUEUE_HIGH, QUEUE_DEFAULT, QUEUE_LOW = "high", "default", "low"
QUEUES = (QUEUE_HIGH, QUEUE_DEFAULT, QUEUE_LOW)

#: Message priorities (Redis serves 0 first). kombu reads priority before queue order, so
#: each queue's tasks carry their own band: high 0 (DM polls 3, below their replies), default
#: 6, low 9; with the queues' order this serves replies, polls, default, then low.
PRIORITY_DEFAULT_QUEUE, PRIORITY_LOW_QUEUE = 6, 9

#: Routes by task name: DMs go first, comments and publishing next, analytics last.
TASK_ROUTES = {
    "instaqueue.poll_instagram_messages": {"queue": QUEUE_HIGH},
    "instaqueue.poll_account_messages": {"queue": QUEUE_HIGH},
    "instaqueue.process_instagram_message": {"queue": QUEUE_HIGH},
    "instaqueue.*comment*": {"queue": QUEUE_DEFAULT, "priority": PRIORITY_DEFAULT_QUEUE},
    "instaqueue.*post*": {"queue": QUEUE_DEFAULT, "priority": PRIORITY_DEFAULT_QUEUE},
    "instaqueue.*analytics*": {"queue": QUEUE_LOW, "priority": PRIORITY_LOW_QUEUE},
    "instaqueue.refresh_access_tokens": {"queue": QUEUE_LOW, "priority": PRIORITY_LOW_QUEUE},
}


def broker_config(config: Settings) -> dict[str, Any]:
    """Redis for broker and results when configured; else the embedded filesystem broker and a
    SQLite result store, so a machine with nothing installed can run instaqueue."""
    if config.redis_url:
        return {
            "broker_url": config.redis_url,
            "result_backend": config.redis_url,
            # Serve queues in -Q order (high first); kombu's default rotates between them.
            "broker_transport_options": {
                "queue_order_strategy": "priority",
                "visibility_timeout": config.visibility_timeout,
            },
            "result_backend_transport_options": {"visibility_timeout": config.visibility_timeout},
        }
    data = config.data_dir.resolve()
    return {
        "broker_url": "filesystem://",
        "result_backend": f"db+sqlite:///{data / 'results.sqlite'}",
        "broker_transport_options": {
            "data_folder_in": str(data / "broker"),
            "data_folder_out": str(data / "broker"),
            "control_folder": str(data / "control"),
            "store_processed": False,
        },
    }


def ensure_data_dirs(config: Settings) -> None:
    """Create the embedded broker's folders (producer and consumer must share them)."""
    options = broker_config(config)["broker_transport_options"]
    for key in ("data_folder_in", "control_folder"):
        if options.get(key):
            Path(options[key]).mkdir(parents=True, exist_ok=True)


app = Celery("instaqueue")
app.conf.update(
    broker_config(settings),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_queues=[Queue(name, routing_key=name) for name in QUEUES],
    task_default_queue=QUEUE_DEFAULT,
    task_routes=TASK_ROUTES,
    # Flower sees every task: sent, received, started, succeeded, retried, failed.
    worker_send_task_events=True,
    task_send_sent_event=True,
    task_track_started=True,
    # One message at a time per process: prefetched messages would run regardless of priority.
    worker_prefetch_multiplier=1,
    worker_concurrency=settings.worker_concurrency,
    broker_connection_retry_on_startup=True,
    result_expires=timedelta(days=1),
    # After SIGTERM's grace (below), the cold shutdown first gives tasks this soft second,
    # then stops them and requeues their messages (late acks).
    worker_soft_shutdown_timeout=1.0,
    worker_enable_soft_shutdown_on_idle=True,
    timezone=settings.timezone,
    enable_utc=True,
)
if not settings.redis_url:
    ensure_data_dirs(settings)


@signals.worker_process_init.connect
def _forget_inherited_connections(**_: Any) -> None:
    """A forked pool child must not share its parent's sockets: make its own on first use."""
    global _engine, _client, _redis, _llm
    if _engine is not None:
        _engine.dispose(close=False)
    _engine, _client, _redis, _llm = None, None, None, None


@signals.worker_shutting_down.connect
def _bound_the_warm_shutdown(how: str | None = None, **_: Any) -> None:
    """Celery's warm shutdown (SIGTERM) waits for running tasks without limit. After the grace
    period, turn it into a cold shutdown: running tasks are stopped and, acked late, their
    messages go back to the queue for another worker."""
    if how == "Warm":
        timer = threading.Timer(settings.shutdown_grace, os.kill, (os.getpid(), signal.SIGQUIT))
        timer.daemon = True
        timer.start()


# Tasks #######################################################################################

#: Task options for losing the database for a moment (a PostgreSQL restart): try again after
#: 5, 10, 20, 40, 60... s instead of failing. Graph errors follow the shared policy instead.
DATABASE_RETRY = dict(autoretry_for=(sa.exc.OperationalError, sa.exc.InterfaceError), retry_backoff=5,
                      retry_backoff_max=60, retry_jitter=False, retry_kwargs={"max_retries": 10})

#: Overlap when re-reading conversations, for Meta's second-precision ``updated_time``.
CURSOR_OVERLAP = timedelta(seconds=2)
#: Messages older than the account's addition by more than this are history, never answered.
HISTORY_GRACE = timedelta(minutes=1)
CONVERSATIONS_PAGE_SIZE = 25
#: Pages one poll reads at most; the rest waits for the next poll (the cursor stays behind).
MAX_CONVERSATION_PAGES = 10
MESSAGE_FIELDS = "id,created_time,from,to,message"
CONVERSATION_FIELDS = f"id,updated_time,messages{{{MESSAGE_FIELDS}}}"
#: Stale DMs re-sent per poll at most.
REDISPATCH_BATCH = 100


@app.task(name="instaqueue.poll_instagram_messages", ignore_result=True)
def poll_instagram_messages() -> int:
    """Send one DM poll per account that is active, not backing off and not slowed down, and
    has no poll waiting in the queue already. When workers cannot keep up, polls must not
    pile up, and the same accounts must not always be last: the order is shuffled each tick,
    and polls go at a lower priority than the replies they produce."""
    now = utcnow()
    with session() as db:
        account_ids = list(db.exec(select(Account.id).where(
            Account.state == AccountState.active,
            sa.or_(Account.backoff_until.is_(None), Account.backoff_until <= now),
            sa.or_(Account.dm_next_poll_at.is_(None), Account.dm_next_poll_at <= now),
        )).all())
    random.shuffle(account_ids)
    client, expiry = get_redis(), dm_poll_expiry()
    sent = 0
    for account_id in account_ids:
        if client is not None and not client.set(f"{POLL_QUEUED_KEY}:{account_id}", 1, nx=True,
                                                 px=int(expiry * 1000)):
            continue  # its previous poll has not started yet
        poll_account_messages.apply_async((account_id,), expires=expiry, priority=POLL_PRIORITY)
        sent += 1
    return sent


#: Redis key (per account) marking a poll sent and not started yet.
POLL_QUEUED_KEY = "instaqueue:dm-poll-queued"
#: Message priority of polls within the high queue (0 is served first on Redis; replies have 0).
POLL_PRIORITY = 3


def dm_poll_expiry() -> float:
    """A poll that waited longer than this in the queue is dropped: the next one is coming."""
    return max(1.0, 2 * settings.dm_poll_interval)


@app.task(name="instaqueue.poll_account_messages", ignore_result=True)
def poll_account_messages(account_id: int) -> int:
    """Read an account's new inbound DMs, store each once and send it to be answered.
    Polls of one account never overlap; a failed poll is simply followed by the next one."""
    stored = 0
    client = get_redis()
    if client is not None:
        client.delete(f"{POLL_QUEUED_KEY}:{account_id}")
    with try_lock(f"dm-poll:{account_id}", settings.message_lease) as mine:
        if not mine:
            return 0
        with session() as db:
            account = db.get(Account, account_id)
        if account is None or account.state != AccountState.active:
            return 0
        try:
            stored = read_new_messages(account, on_stored=_dispatch_messages)
        except (GraphAPIError, AccountUnavailable) as exc:
            log.warning("DM poll of account %s failed: %s", account_id, exc)
        _dispatch_messages(take_stale_messages(account_id))
    return stored


def read_new_messages(account: Account, *, on_stored: Callable[[list[int]], None]) -> int:
    """Page through conversations updated since the account's cursor, store their inbound
    messages once (``on_stored`` gets the new ids after each page is committed) and advance
    the cursor. Returns how many messages were new."""
    not_before = account.created_at - HISTORY_GRACE
    since = account.dm_cursor - CURSOR_OVERLAP if account.dm_cursor else not_before
    params: dict[str, Any] = {"platform": "instagram", "fields": CONVERSATION_FIELDS,
                              "limit": CONVERSATIONS_PAGE_SIZE}
    newest, total = account.dm_cursor, 0
    deadline = time.monotonic() + settings.message_lease / 2  # well inside the poll lock's expiry
    for _ in range(MAX_CONVERSATION_PAGES):
        payload = graph_call(account, "GET", f"{account.ig_user_id}/conversations", params=params)
        page = parse_conversation_page(payload, account_ig_id=account.ig_user_id, since=since)
        for problem in page.problems:
            log.warning("account %s: skipped a malformed Graph item: %s", account.id, problem)
        messages = page.messages + fetch_messages_one_by_one(account, page.without_messages)
        new_ids = store_inbound(account, [m for m in messages if m.created_time >= not_before])
        total += len(new_ids)
        on_stored(new_ids)
        if page.newest and (newest is None or page.newest > newest):
            newest = page.newest
        if page.reached_old or not page.after:
            break
        if time.monotonic() > deadline:
            return total  # the cursor stays behind: the next poll reads the rest
        params = {**params, "after": page.after}
    else:
        return total  # more pages than one poll reads: the cursor stays behind
    if newest and newest != account.dm_cursor:
        with session() as db:
            update_where(db, Account, [Account.id == account.id,
                                       sa.or_(Account.dm_cursor.is_(None), Account.dm_cursor < newest)],
                         dm_cursor=newest)
            db.commit()
    return total


def fetch_messages_one_by_one(account: Account, conversation_ids: list[str]) -> list[ParsedMessage]:
    """The fallback when a conversation came without its messages: list their ids, then read
    each one we do not have yet (one call per message). A conversation or message that Graph
    refuses (deleted, unknown id) is logged and skipped; transient errors end the poll."""
    found: list[ParsedMessage] = []
    for conversation_id in conversation_ids:
        try:
            payload = graph_call(account, "GET", conversation_id, params={"fields": "messages"})
        except (BadRequest, PermissionDenied) as exc:
            log.warning("account %s: skipped conversation %s: %s", account.id, conversation_id[:40], exc)
            continue
        items = payload["messages"].get("data") if isinstance(payload.get("messages"), dict) else None
        ids = []
        for item in items if isinstance(items, list) else []:
            try:
                ids.append(graph_id(item.get("id") if isinstance(item, dict) else None, "message"))
            except MalformedPayload as exc:
                log.warning("account %s: skipped a malformed Graph message: %s", account.id, exc)
        with session() as db:
            known = set(db.exec(select(InboundMessage.graph_message_id)
                                .where(InboundMessage.graph_message_id.in_(ids))).all()) if ids else set()
        for message_id in ids:
            if message_id in known:
                continue
            try:
                message = parse_message(graph_call(account, "GET", message_id, params={"fields": MESSAGE_FIELDS}),
                                        conversation_id)
            except (BadRequest, PermissionDenied, MalformedPayload) as exc:
                log.warning("account %s: skipped message %s: %s", account.id, message_id[:40], exc)
                continue
            if message.sender_id != account.ig_user_id:
                found.append(message)
    return found


def store_inbound(account: Account, messages: list[ParsedMessage]) -> list[int]:
    """Store messages not stored before (the Graph id is unique); the ids of the new rows."""
    if not messages:
        return []
    new_ids: list[int] = []
    with session() as db:
        known = set(db.exec(select(InboundMessage.graph_message_id).where(
            InboundMessage.graph_message_id.in_([m.graph_message_id for m in messages]))).all())
        for message in messages:
            if message.graph_message_id in known:
                continue
            known.add(message.graph_message_id)
            new_id = insert_once(db, InboundMessage, dict(
                account_id=account.id, graph_message_id=message.graph_message_id,
                conversation_id=message.conversation_id, sender_id=message.sender_id,
                sender_username=message.sender_username, text=message.text,
                created_time=message.created_time, received_at=utcnow(),
                status=MessageStatus.received, attempts=0, next_attempt_at=utcnow()))
            if new_id is not None:
                new_ids.append(new_id)
        db.commit()
    return new_ids


def take_stale_messages(account_id: int) -> list[int]:
    """DMs of an active account that nobody has worked on long after they were due (a send
    lost in a crash, an account back from re-auth); they are due again from now."""
    now = utcnow()
    with session() as db:
        ids = db.exec(select(InboundMessage.id).where(
            InboundMessage.account_id == account_id,
            InboundMessage.status.in_([MessageStatus.received, MessageStatus.sending]),
            InboundMessage.next_attempt_at < now - timedelta(seconds=settings.stale_after),
        ).limit(REDISPATCH_BATCH)).all()
        if ids:
            update_where(db, InboundMessage, [InboundMessage.id.in_(ids)], next_attempt_at=now)
            db.commit()
            log.warning("account %s: sending %d stale DMs again", account_id, len(ids))
    return list(ids)


def _dispatch_messages(message_ids: list[int]) -> None:
    """Send a task per stored DM. Ones the broker refused are marked due at once, so the next
    poll's sweep sends them again instead of waiting for the stale period."""
    failed = []
    for message_id in message_ids:
        try:
            process_instagram_message.delay(message_id)
        except Exception as exc:  # the broker is away; the rows are safe in the database
            failed.append(message_id)
            last = exc
    if failed:
        log.warning("%d stored DMs could not be queued (%s); the next poll sends them", len(failed),
                    type(last).__name__)
        with session() as db:
            update_where(db, InboundMessage, [InboundMessage.id.in_(failed)],
                         next_attempt_at=utcnow() - timedelta(seconds=settings.stale_after + 1))
            db.commit()


@app.task(name="instaqueue.process_instagram_message", bind=True, max_retries=settings.max_retries,
          acks_late=True, reject_on_worker_lost=True, **DATABASE_RETRY)
def process_instagram_message(self: Any, message_id: int) -> str:
    """Answer one inbound DM by the account's rules, exactly once.

    Safe to run twice or after a crash: the message is claimed with a conditional UPDATE, and a
    message found in ``sending`` (a previous attempt may have reached Instagram) is first looked
    up in its conversation; only a reply proven missing is sent. Transient errors retry on the
    shared schedule, counted in the table; permanent errors fail the message with the reason.
    """
    with session() as db:
        message = db.get(InboundMessage, message_id)
        account = db.get(Account, message.account_id) if message else None
        rules = db.exec(select(ReplyRule).where(ReplyRule.account_id == message.account_id)).all() if message else []
    if message is None or account is None:
        log.warning("DM %s is not in the database; nothing to do", message_id)
        return "missing"
    if message.status in FINAL_MESSAGE_STATES:
        return message.status
    if account.state != AccountState.active:
        return "account parked"  # the poll sends it again once the account is back
    if message.status == MessageStatus.received:
        try:
            choice = choose_reply_for(message, account, rules,
                                      llm_may_retry=message.attempts < settings.max_retries)
        except TransientError as exc:  # the LLM: the shared schedule, then the fallback
            failures = message.attempts + 1
            delay = next_retry_delay(failures) or settings.retry_base
            with session() as db:
                update_where(db, InboundMessage, [InboundMessage.id == message_id,
                                                  InboundMessage.status == MessageStatus.received],
                             attempts=failures, last_error=str(exc), next_attempt_at=utcnow() + timedelta(seconds=delay))
                db.commit()
            raise self.retry(countdown=delay, max_retries=None, exc=exc)
        if choice.text is None:
            with session() as db:
                update_where(db, InboundMessage, [InboundMessage.id == message_id,
                                                  InboundMessage.status == MessageStatus.received],
                             status=MessageStatus.needs_human, reply_path=choice.path, last_error=choice.reason)
                db.commit()
            return MessageStatus.needs_human
        claim = claim_message(message_id, reply_text=choice.text, rule_id=choice.rule_id, path=choice.path,
                              entry_ids=list(choice.entry_ids))
        look_first = False
    else:
        claim = claim_message(message_id)
        look_first = True
    if claim is None:
        with session() as db:
            current = db.get(InboundMessage, message_id)
        if current is None or current.status in FINAL_MESSAGE_STATES:
            return current.status if current else "missing"
        wait = max(1.0, ((current.claimed_until or utcnow()) - utcnow()).total_seconds() + 1)
        raise self.retry(countdown=min(wait, settings.retry_cap), max_retries=None)
    token, message = claim
    try:
        sent_id = look_for_sent_reply(account, message) if look_first else None
        if sent_id is None:
            answer = graph_call(account, "POST", f"{account.ig_user_id}/messages", json_body={
                "recipient": {"id": message.sender_id}, "message": {"text": message.reply_text}})
            sent_id = answer.get("message_id") if isinstance(answer.get("message_id"), str) else None
            if sent_id is None:
                log.warning("DM %s: Send API answered without a message_id", message_id)
    except (TransientError, RateLimited) as exc:
        return retry_message_later(self, message, token, exc)
    except (AccountUnavailable, TokenInvalid):
        release_claim(message_id, token)
        return "account parked"
    except GraphAPIError as exc:
        finish_message(message_id, token, status=MessageStatus.failed, last_error=str(exc))
        return MessageStatus.failed
    try:
        finish_message(message_id, token, status=MessageStatus.replied, reply_graph_message_id=sent_id,
                       replied_at=utcnow(), last_error=None)
    except sa.exc.IntegrityError:
        # Another DM of this person recorded the same reply first (two looked at once after a
        # crash): that reply is theirs. Look again; this time it is excluded.
        release_claim(message_id, token)
        raise self.retry(countdown=1, max_retries=None) from None
    return MessageStatus.replied


def claim_message(message_id: int, *, reply_text: str | None = None, rule_id: int | None = None,
                  path: str = "rule", entry_ids: list[int] | None = None) -> tuple[str, InboundMessage] | None:
    """Take a fresh message (with its chosen reply) or, without ``reply_text``, one left in
    ``sending`` whose claim has run out. Returns the claim token and the claimed row."""
    now, token = utcnow(), secrets.token_hex(8)
    lease_end = now + timedelta(seconds=settings.message_lease)
    if reply_text is not None:
        where = [InboundMessage.status == MessageStatus.received]
        values = dict(reply_text=reply_text, reply_rule_id=rule_id, reply_path=path, reply_entry_ids=entry_ids or [])
    else:
        where = [InboundMessage.status == MessageStatus.sending,
                 sa.or_(InboundMessage.claimed_until.is_(None), InboundMessage.claimed_until <= now)]
        values = {}
    with session() as db:
        row = db.exec(sa.update(InboundMessage).where(InboundMessage.id == message_id, *where).values(
            status=MessageStatus.sending, claimed_until=lease_end, claim_token=token, next_attempt_at=lease_end,
            **values).returning(InboundMessage)).first()
        db.commit()
    return (token, InboundMessage.model_validate(row[0])) if row else None


def look_for_sent_reply(account: Account, message: InboundMessage) -> str | None:
    """Before sending again, look in the conversation for the reply a previous attempt may
    have sent; a reply already recorded for another DM does not count."""
    payload = graph_call(account, "GET", message.conversation_id,
                         params={"fields": f"messages{{{MESSAGE_FIELDS}}}"})
    items = payload.get("messages", {}).get("data") if isinstance(payload.get("messages"), dict) else None
    candidates = find_sent_replies(items, account_ig_id=account.ig_user_id, recipient_id=message.sender_id,
                                   text=message.reply_text or "", not_before=message.created_time)
    if not candidates:
        return None
    with session() as db:
        taken = set(db.exec(select(InboundMessage.reply_graph_message_id).where(
            InboundMessage.reply_graph_message_id.in_(candidates))).all())
    found = next((c for c in candidates if c not in taken), None)
    if found:
        log.info("DM %s: reply already sent before a crash or timeout (%s); not sending again", message.id, found)
    return found


def retry_message_later(task: Any, message: InboundMessage, token: str, exc: GraphAPIError) -> str:
    """The shared retry policy for a DM: transient errors count toward the limit, rate limits
    wait for the back-off without counting. The claim is released for the retry, which will
    look in the conversation before sending."""
    failures, delay = next_attempt(exc, message.attempts)
    if delay is None:
        finish_message(message.id, token, status=MessageStatus.failed, attempts=failures,
                       last_error=f"gave up after {failures} attempts: {exc}")
        return MessageStatus.failed
    with session() as db:
        update_where(db, InboundMessage, [InboundMessage.id == message.id, InboundMessage.claim_token == token],
                     claimed_until=utcnow(), attempts=failures, last_error=str(exc)[:1000],
                     next_attempt_at=utcnow() + timedelta(seconds=delay))
        db.commit()
    log.info("DM %s: %s; retry %d in %.1f s", message.id, exc, failures, delay)
    raise task.retry(countdown=delay, max_retries=None, exc=exc)


def release_claim(message_id: int, token: str) -> None:
    with session() as db:
        update_where(db, InboundMessage, [InboundMessage.id == message_id, InboundMessage.claim_token == token],
                     claimed_until=utcnow())
        db.commit()


def finish_message(message_id: int, token: str, **values: Any) -> None:
    """Record the outcome, only while our claim is the current one."""
    if isinstance(values.get("last_error"), str):
        values["last_error"] = values["last_error"][:1000]
    with session() as db:
        done = update_where(db, InboundMessage, [InboundMessage.id == message_id, InboundMessage.claim_token == token],
                            claimed_until=None, **values)
        db.commit()
    if not done:
        log.error("DM %s: claim was taken over before its outcome (%s) was recorded", message_id, values.get("status"))


#: Posts one check queues at most; the rest wait for the next check.
CHECK_BATCH = 500
#: A post's task that runs this much before the post's time was sent for an older time.
EARLY_TOLERANCE = timedelta(seconds=1)
#: Clock difference allowed when matching our post to Instagram's media timestamps.
MEDIA_MATCH_SKEW = timedelta(minutes=2)
#: Instagram's codes for "the container is not ready yet" and "publishing quota reached".
NOT_READY = (9007, 2207027)
QUOTA_REACHED = (9, 2207042)
#: Subcode of "this container was published already".
ALREADY_PUBLISHED_SUBCODE = 2207006


@app.task(name="instaqueue.check_scheduled_posts", ignore_result=True)
def check_scheduled_posts() -> int:
    """Queue every post due before the next check, each with an ETA at its own time, and
    send a task again for posts stuck in queued, publishing or unconfirmed."""
    now = utcnow()
    horizon = now + timedelta(seconds=1.5 * settings.scheduled_check_interval)
    claimed = claim_due_posts(horizon)
    for post_id, publish_at in claimed:
        publish_scheduled_post.apply_async((post_id,), eta=max(publish_at, now))
    stuck = take_stuck_posts(now)
    for post_id in stuck:
        publish_scheduled_post.delay(post_id)
    if claimed or stuck:
        log.info("scheduled posts: %d queued, %d stuck taken up again", len(claimed), len(stuck))
    return len(claimed)


def claim_due_posts(horizon: datetime) -> list[tuple[int, datetime]]:
    """Move posts due before ``horizon`` from scheduled to queued in one statement. Racing
    checks never claim a post twice: PostgreSQL skips rows another check has locked, and the
    status guard makes the UPDATE itself conditional (all SQLite needs)."""
    due = (select(ScheduledPost.id)
           .where(ScheduledPost.status == PostStatus.scheduled, ScheduledPost.publish_at <= horizon)
           .order_by(ScheduledPost.publish_at).limit(CHECK_BATCH).with_for_update(skip_locked=True))
    with session() as db:
        rows = db.exec(sa.update(ScheduledPost)
                       .where(ScheduledPost.id.in_(due.scalar_subquery()),
                              ScheduledPost.status == PostStatus.scheduled)
                       .values(status=PostStatus.queued, next_attempt_at=ScheduledPost.publish_at)
                       .returning(ScheduledPost.id, ScheduledPost.publish_at)).all()
        db.commit()
    return [(row[0], row[1]) for row in rows]


def take_stuck_posts(now: datetime) -> list[int]:
    """Posts that no task has touched long after it was expected (a lost message, a killed
    worker past Redis's redelivery); due again from now. Their task reconciles first."""
    cutoff = now - timedelta(seconds=settings.publish_stuck_after)
    with session() as db:
        ids = db.exec(select(ScheduledPost.id).where(
            ScheduledPost.status.in_([PostStatus.queued, PostStatus.publishing, PostStatus.unconfirmed]),
            ScheduledPost.next_attempt_at < cutoff,
            sa.or_(ScheduledPost.claimed_until.is_(None), ScheduledPost.claimed_until < now),
        ).limit(CHECK_BATCH)).all()
        if ids:
            update_where(db, ScheduledPost, [ScheduledPost.id.in_(ids)], next_attempt_at=now)
            db.commit()
            log.warning("scheduled posts %s were stuck; taking them up again", list(ids))
    return list(ids)


class _Wait(Exception):
    """Come back later without counting a failure: quota, or a container still processing."""

    def __init__(self, seconds: float, reason: str) -> None:
        super().__init__(reason)
        self.seconds = seconds


class _Fail(Exception):
    """The post cannot go out; the message says why."""


@app.task(name="instaqueue.publish_scheduled_post", bind=True, max_retries=settings.max_retries,
          acks_late=True, reject_on_worker_lost=True, **DATABASE_RETRY)
def publish_scheduled_post(self: Any, post_id: int) -> str:
    """Publish one post exactly once, at its time.

    Every container id is stored the moment Instagram returns it, so a retry reuses it.
    ``media_publish`` is called at most once per container: a timeout or an ambiguous error
    after the call marks the post unconfirmed, and the next run first looks at Instagram
    (the container's status, then the account's recent media); only a post proven
    unpublished is published again. Waiting for quota or video processing re-schedules the
    task; it never sleeps in a worker slot.
    """
    with session() as db:
        post = db.get(ScheduledPost, post_id)
        account = db.get(Account, post.account_id) if post else None
    if post is None or account is None:
        log.warning("scheduled post %s is not in the database; nothing to do", post_id)
        return "missing"
    if post.status in FINAL_POST_STATES or post.status == PostStatus.scheduled:
        return post.status  # done, cancelled, or rescheduled (a check queues it again)
    if post.publish_at - utcnow() > EARLY_TOLERANCE:
        return "not due"  # rescheduled later while queued: the task for the new time comes
    claim = claim_post(post_id)
    if claim is None:
        with session() as db:
            current = db.get(ScheduledPost, post_id)
        if current is None or current.status in FINAL_POST_STATES or current.status == PostStatus.scheduled:
            return current.status if current else "missing"
        wait = max(1.0, ((current.claimed_until or utcnow()) - utcnow()).total_seconds() + 1)
        raise self.retry(countdown=min(wait, settings.retry_cap), max_retries=None)
    token, post, first_run = claim
    published_called = False
    try:
        if account.state != AccountState.active:
            raise _Fail(f"account @{account.username} needs re-authorisation")
        problems = post_problems(kind=post.kind, media=post.media, caption=post.caption,
                                 publish_at=post.publish_at if first_run else None, now=utcnow(),
                                 grace=settings.publish_grace)
        if problems:
            raise _Fail("; ".join(problems))
        if post.publish_called_at and not post.media_id:
            if reconcile_post(account, post, token):
                return PostStatus.published
        check_publishing_quota(account)
        container_id = ensure_containers(account, post, token)
        published_called = True
        mark_post(post.id, token, publish_called_at=utcnow())
        try:
            answer = graph_call(account, "POST", f"{account.ig_user_id}/media_publish",
                                params={"creation_id": container_id})
        except TransientError:
            raise  # a timeout or 5xx after the call: it may have gone through; look next time
        except GraphAPIError as exc:
            if exc.subcode == ALREADY_PUBLISHED_SUBCODE and reconcile_post(account, post, token):
                return PostStatus.published
            mark_post(post.id, token, publish_called_at=None)  # refused outright: not published
            published_called = False
            if (exc.code, exc.subcode) == NOT_READY:
                raise _Wait(settings.container_check_interval, f"container not ready: {exc}") from None
            if (exc.code, exc.subcode) == QUOTA_REACHED:
                raise _Wait(settings.retry_cap, f"publishing limit reached: {exc}") from None
            raise
        media_id = answer.get("id") if isinstance(answer.get("id"), str) else None
        record_published(account, post.id, token, media_id)
        return PostStatus.published
    except _Wait as wait:
        return wait_for_post(self, post, token, wait)
    except _Fail as exc:
        finish_post(post.id, token, status=PostStatus.failed, last_error=str(exc))
        return PostStatus.failed
    except (TransientError, RateLimited) as exc:
        return retry_post_later(self, post, token, exc, unconfirmed=published_called)
    except (GraphAPIError, AccountUnavailable) as exc:
        status = PostStatus.unconfirmed if published_called else PostStatus.failed
        finish_post(post.id, token, status=status, last_error=str(exc))
        return status


def claim_post(post_id: int) -> tuple[str, ScheduledPost, bool] | None:
    """Take a queued or unconfirmed post, or one whose publishing claim ran out. Returns the
    claim token, the claimed row and whether this is the post's first run."""
    now, token = utcnow(), secrets.token_hex(8)
    lease_end = now + timedelta(seconds=settings.message_lease)
    with session() as db:
        row = db.exec(sa.update(ScheduledPost).where(
            ScheduledPost.id == post_id,
            sa.or_(ScheduledPost.status.in_([PostStatus.queued, PostStatus.unconfirmed]),
                   sa.and_(ScheduledPost.status == PostStatus.publishing,
                           sa.or_(ScheduledPost.claimed_until.is_(None), ScheduledPost.claimed_until <= now))),
        ).values(status=PostStatus.publishing, claimed_until=lease_end, claim_token=token, next_attempt_at=lease_end,
                 started_at=sa.func.coalesce(ScheduledPost.started_at, now))
          .returning(ScheduledPost)).first()
        db.commit()
    if row is None:
        return None
    post = ScheduledPost.model_validate(row[0])
    return token, post, post.started_at == now


def check_publishing_quota(account: Account) -> None:
    """Wait (not fail) when the account's rolling 24-hour publishing quota is used up."""
    answer = graph_call(account, "GET", f"{account.ig_user_id}/content_publishing_limit",
                        params={"fields": "quota_usage,config"})
    data = answer.get("data")
    item = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    config = item.get("config") if isinstance(item.get("config"), dict) else {}
    usage, total = _as_int(item.get("quota_usage")), _as_int(config.get("quota_total"))
    if usage is not None and total is not None and usage >= total:
        raise _Wait(settings.retry_cap, f"publishing limit reached ({usage} of {total} in 24 h)")


def ensure_containers(account: Account, post: ScheduledPost, token: str) -> str:
    """Create what is missing of the post's containers, storing each id at once, and return
    the container to publish once every video in it has finished processing."""
    has_video = any(item["type"] == "video" for item in post.media)
    if post.kind == PostKind.carousel:
        children = list(post.child_container_ids) + [None] * (len(post.media) - len(post.child_container_ids))
        for index, item in enumerate(post.media):
            if children[index] is None:
                children[index] = create_container(account, {"is_carousel_item": "true", **_media_params(item)})
                mark_post(post.id, token, child_container_ids=list(children))
        for index, item in enumerate(post.media):
            if item["type"] == "video":
                wait_until_finished(account, post, token, children[index])
        if post.container_id is None:
            post.container_id = create_container(account, {
                "media_type": "CAROUSEL", "children": ",".join(children), "caption": post.caption})
            mark_post(post.id, token, container_id=post.container_id)
        return post.container_id
    if post.container_id is None:
        item = post.media[0]
        params = _media_params(item)
        if post.kind == PostKind.story:
            params["media_type"] = "STORIES"
        else:
            params["caption"] = post.caption
            if item["type"] == "video":
                params.update(media_type="REELS", share_to_feed="true" if post.kind == PostKind.video else "false")
        post.container_id = create_container(account, params)
        mark_post(post.id, token, container_id=post.container_id)
    if has_video:
        wait_until_finished(account, post, token, post.container_id)
    return post.container_id


def create_container(account: Account, params: dict[str, str]) -> str:
    answer = graph_call(account, "POST", f"{account.ig_user_id}/media", params=params)
    container_id = answer.get("id")
    if not isinstance(container_id, str) or not container_id:
        raise TransientError("Instagram answered a container creation without an id")
    return container_id


def wait_until_finished(account: Account, post: ScheduledPost, token: str, container_id: str) -> None:
    """Return when the container is FINISHED; wait (re-scheduling the task) while it is
    IN_PROGRESS; fail with Instagram's reason on ERROR or EXPIRED."""
    code, detail = container_status(account, container_id)
    if code in ("FINISHED", "PUBLISHED"):
        return
    if code in ("ERROR", "EXPIRED"):
        raise _Fail(f"Instagram could not process the media ({code}): {detail or 'no reason given'}")
    post.container_checks += 1
    mark_post(post.id, token, container_checks=post.container_checks)
    if post.container_checks > settings.container_check_limit:
        raise _Fail(f"the media was still processing after {settings.container_check_limit} checks")
    raise _Wait(settings.container_check_interval, f"container {container_id} is {code or 'not ready'}")


def container_status(account: Account, container_id: str) -> tuple[str | None, str | None]:
    answer = graph_call(account, "GET", container_id, params={"fields": "status_code,status"})
    code, detail = answer.get("status_code"), answer.get("status")
    return (code if isinstance(code, str) else None), (detail if isinstance(detail, str) else None)


def reconcile_post(account: Account, post: ScheduledPost, token: str) -> bool:
    """After an unconfirmed ``media_publish``: find out whether the post went live. True when it
    did (and it is recorded); False when it is proven unpublished (and may be published);
    a failure to find out is raised, leaving the post unconfirmed."""
    code, _ = container_status(account, post.container_id) if post.container_id else (None, None)
    if code in ("FINISHED", "IN_PROGRESS"):
        mark_post(post.id, token, publish_called_at=None)
        log.info("post %s: container %s is %s, so it was not published; publishing", post.id, post.container_id, code)
        return False
    media_id = find_published_media(account, post)
    if media_id or code == "PUBLISHED":
        log.info("post %s: found published on Instagram (%s); not publishing again", post.id, media_id or code)
        record_published(account, post.id, token, media_id)
        return True
    raise TransientError(f"could not confirm whether post {post.id} was published (container {code or 'unknown'})")


def find_published_media(account: Account, post: ScheduledPost) -> str | None:
    """The account's recent media that matches the post by caption and time, not recorded
    for another post."""
    answer = graph_call(account, "GET", f"{account.ig_user_id}/media",
                        params={"fields": "id,caption,timestamp,permalink,media_type", "limit": 25})
    not_before = (post.publish_called_at or post.publish_at) - MEDIA_MATCH_SKEW
    candidates = []
    for item in answer.get("data") if isinstance(answer.get("data"), list) else []:
        try:
            when = parse_graph_time(item.get("timestamp")) if isinstance(item, dict) else None
        except MalformedPayload:
            continue
        if when and when >= not_before and (item.get("caption") or "") == post.caption and isinstance(item.get("id"), str):
            candidates.append(item["id"])
    if not candidates:
        return None
    with session() as db:
        taken = set(db.exec(select(ScheduledPost.media_id).where(ScheduledPost.media_id.in_(candidates))).all())
    return next((c for c in candidates if c not in taken), None)


def record_published(account: Account, post_id: int, token: str, media_id: str | None) -> None:
    """Record the outcome; the permalink and Instagram's time are best effort."""
    permalink, published_at = None, utcnow()
    if media_id:
        try:
            answer = graph_call(account, "GET", media_id, params={"fields": "permalink,timestamp"})
            permalink = answer.get("permalink") if isinstance(answer.get("permalink"), str) else None
            published_at = parse_graph_time(answer.get("timestamp"))
        except (GraphAPIError, MalformedPayload, AccountUnavailable) as exc:
            log.warning("post %s published as %s; its permalink could not be read: %s", post_id, media_id, exc)
    finish_post(post_id, token, status=PostStatus.published, media_id=media_id, permalink=permalink,
                published_at=published_at, last_error=None)


def wait_for_post(task: Any, post: ScheduledPost, token: str, wait: _Wait) -> str:
    """Come back after ``wait.seconds`` without counting a failure."""
    with session() as db:
        update_where(db, ScheduledPost, [ScheduledPost.id == post.id, ScheduledPost.claim_token == token],
                     status=PostStatus.queued, claimed_until=None, last_error=str(wait)[:1000],
                     next_attempt_at=utcnow() + timedelta(seconds=wait.seconds))
        db.commit()
    log.info("post %s: %s; checking again in %.0f s", post.id, wait, wait.seconds)
    raise task.retry(countdown=wait.seconds, max_retries=None)


def retry_post_later(task: Any, post: ScheduledPost, token: str, exc: GraphAPIError, *, unconfirmed: bool) -> str:
    """The shared retry policy for a post. After the retries, a post whose publish call may
    have gone through stays unconfirmed (the sweeper looks again); any other fails."""
    failures, delay = next_attempt(exc, post.attempts)
    status = PostStatus.unconfirmed if unconfirmed else PostStatus.queued
    if delay is None:
        finish_post(post.id, token, status=PostStatus.unconfirmed if unconfirmed else PostStatus.failed,
                    attempts=failures, last_error=f"gave up after {failures} attempts: {exc}")
        return PostStatus.unconfirmed if unconfirmed else PostStatus.failed
    with session() as db:
        update_where(db, ScheduledPost, [ScheduledPost.id == post.id, ScheduledPost.claim_token == token],
                     status=status, claimed_until=None, attempts=failures, last_error=str(exc)[:1000],
                     next_attempt_at=utcnow() + timedelta(seconds=delay))
        db.commit()
    log.info("post %s: %s; retry %d in %.1f s", post.id, exc, failures, delay)
    raise task.retry(countdown=delay, max_retries=None, exc=exc)


def mark_post(post_id: int, token: str, **values: Any) -> None:
    """Store progress (a container id, the publish call) at once, while our claim holds."""
    with session() as db:
        update_where(db, ScheduledPost, [ScheduledPost.id == post_id, ScheduledPost.claim_token == token], **values)
        db.commit()


def finish_post(post_id: int, token: str, **values: Any) -> None:
    if isinstance(values.get("last_error"), str):
        values["last_error"] = values["last_error"][:1000]
    with session() as db:
        done = update_where(db, ScheduledPost, [ScheduledPost.id == post_id, ScheduledPost.claim_token == token],
                            claimed_until=None, next_attempt_at=None, **values)
        db.commit()
    if not done:
        log.error("post %s: claim was taken over before its outcome (%s) was recorded", post_id, values.get("status"))


def _media_params(item: dict[str, str]) -> dict[str, str]:
    if item["type"] == "video":
        return {"video_url": item["url"], "media_type": "VIDEO"}
    return {"image_url": item["url"]}


#: How often beat looks for watched posts whose next poll has come.
COMMENT_DISPATCH_INTERVAL = 60.0
#: Comments per page (Graph's maximum for this edge).
COMMENTS_PAGE_SIZE = 50
COMMENT_FIELDS = "id,text,timestamp,username,from,hidden,parent_id"
#: Pages one comment poll reads at most (20,000 comments); a poll cut short makes the next
#: poll a full read.
MAX_COMMENT_PAGES = 400
#: How often a watched post's comments are read in full, for replies under older comments.
FULL_READ_EVERY = timedelta(hours=24)


@app.task(name="instaqueue.poll_all_monitored_posts", ignore_result=True)
def poll_all_monitored_posts() -> int:
    """Send ``poll_post_comments`` for each watched post whose next poll has come, of
    accounts that are active and not backing off."""
    now = utcnow()
    with session() as db:
        ids = db.exec(select(MonitoredPost.id).join(Account, Account.id == MonitoredPost.account_id).where(
            MonitoredPost.active, MonitoredPost.next_poll_at <= now, Account.state == AccountState.active,
            sa.or_(Account.backoff_until.is_(None), Account.backoff_until <= now))).all()
    for post_id in ids:
        poll_post_comments.apply_async((post_id,), expires=COMMENT_DISPATCH_INTERVAL)
    return len(ids)


@app.task(name="instaqueue.poll_post_comments", ignore_result=True)
def poll_post_comments(post_id: int) -> int:
    """Read a watched post's new comments (and their replies), newest first, until a comment
    already stored; store each once, decide on each by the account's rules (the decision and
    its reason are stored, "no rule matched" included) and send the actions. Then move the
    post's next poll: sooner after activity, later when quiet; stop watching old posts."""
    with try_lock(f"comment-poll:{post_id}", settings.message_lease * 4) as mine:
        if not mine:
            return 0
        with session() as db:
            watched = db.get(MonitoredPost, post_id)
            account = db.get(Account, watched.account_id) if watched else None
            rules = db.exec(select(ModerationRule).where(ModerationRule.account_id == watched.account_id)).all() \
                if watched else []
        if watched is None or account is None or not watched.active:
            return 0
        found = 0

        def on_stored(new_ids: list[int], acts: list[int]) -> None:
            nonlocal found
            found += len(new_ids)
            _dispatch_comments(acts)

        full = utcnow() >= watched.full_read_due_at
        complete = False
        try:
            if watched.media_timestamp is None:
                media = graph_call(account, "GET", watched.media_id, params={"fields": "id,timestamp"})
                watched.media_timestamp = parse_graph_time(media.get("timestamp"))
            complete = read_new_comments(account, watched, list(rules), full=full, on_stored=on_stored)
        except BadRequest as exc:
            log.warning("watched post %s (media %s) is gone or unreadable; no longer watched: %s",
                        post_id, watched.media_id, exc)
            with session() as db:
                update_where(db, MonitoredPost, [MonitoredPost.id == post_id], active=False)
                db.commit()
            return found
        except (GraphAPIError, AccountUnavailable, MalformedPayload) as exc:
            log.warning("comment poll of watched post %s failed: %s", post_id, exc)
        _dispatch_comments(take_stale_comments(post_id))
        interval = next_comment_interval(watched.poll_interval, found=found, low=settings.comment_poll_interval,
                                         high=settings.comment_poll_max_interval)
        too_old = watched.media_timestamp and utcnow() - watched.media_timestamp > timedelta(days=settings.comment_watch_days)
        full_read_due = (utcnow() + FULL_READ_EVERY if full else watched.full_read_due_at) if complete else utcnow()
        with session() as db:
            update_where(db, MonitoredPost, [MonitoredPost.id == post_id], poll_interval=interval,
                         next_poll_at=utcnow() + timedelta(seconds=interval), last_polled_at=utcnow(),
                         media_timestamp=watched.media_timestamp, active=not too_old, full_read_due_at=full_read_due)
            db.commit()
        if too_old:
            log.info("watched post %s is older than %g days; no longer watched", post_id, settings.comment_watch_days)
        return found


def read_new_comments(account: Account, watched: MonitoredPost, rules: list[ModerationRule], *, full: bool,
                      on_stored: Callable[[list[int], list[int]], None]) -> bool:
    """Page through the post's comments, newest first, with their replies (following the
    replies' own pages), until a page that holds an already stored top-level comment, or to
    the end when ``full``. Each page is stored, judged and handed to ``on_stored`` (new ids,
    ids with an action) before the next is read. True when the read was complete."""
    params: dict[str, Any] = {"fields": f"{COMMENT_FIELDS},replies{{{COMMENT_FIELDS}}}", "limit": COMMENTS_PAGE_SIZE}
    newest: str | None = None
    complete = False
    for _ in range(MAX_COMMENT_PAGES):
        page = graph_call(account, "GET", f"{watched.media_id}/comments", params=params)
        items = _usable_comments(page.get("data"), watched.id)
        flat: list[dict[str, Any]] = []
        for item in items:
            flat.append(item)
            flat.extend(read_replies(account, item))
        newest = newest or (items[0]["id"] if items else None)
        met_known, new_ids, acts = store_comments(account, watched, flat, rules, top_level={i["id"] for i in items})
        on_stored(new_ids, acts)
        after = _next_cursor(page)
        if (met_known and not full) or after is None:
            complete = True
            break
        params = {**params, "after": after}
    if newest:
        with session() as db:
            update_where(db, MonitoredPost, [MonitoredPost.id == watched.id], last_comment_id=newest)
            db.commit()
    return complete


def read_replies(account: Account, comment: dict[str, Any]) -> list[dict[str, Any]]:
    """A comment's replies: those embedded in the page, then their further pages."""
    embedded = comment.get("replies") if isinstance(comment.get("replies"), dict) else {}
    replies = _usable_comments(embedded.get("data"), None)
    after = _next_cursor(embedded)
    for _ in range(MAX_COMMENT_PAGES):
        if after is None:
            break
        page = graph_call(account, "GET", f"{comment['id']}/replies",
                          params={"fields": COMMENT_FIELDS, "limit": COMMENTS_PAGE_SIZE, "after": after})
        replies += _usable_comments(page.get("data"), None)
        after = _next_cursor(page)
    return replies


def _usable_comments(data: Any, watched_id: int | None) -> list[dict[str, Any]]:
    """The comment objects of a page whose id can be stored and used in a URL; the rest are
    logged and skipped."""
    usable = []
    for item in data if isinstance(data, list) else []:
        try:
            graph_id(item.get("id") if isinstance(item, dict) else None, "comment", limit=64)
        except MalformedPayload as exc:
            log.warning("watched post %s: skipped a malformed comment: %s", watched_id, exc)
            continue
        usable.append(item)
    return usable


def take_stale_comments(post_id: int) -> list[int]:
    """Comments of the post whose action was decided but never carried out (a poll cut short
    before its tasks were sent, a lost task); due again from now."""
    now = utcnow()
    with session() as db:
        ids = db.exec(select(Comment.id).where(
            Comment.monitored_post_id == post_id,
            Comment.action_status.in_([ActionStatus.pending, ActionStatus.acting]),
            Comment.received_at < now - timedelta(seconds=settings.stale_after),
            sa.or_(Comment.claimed_until.is_(None), Comment.claimed_until < now),
        ).limit(REDISPATCH_BATCH)).all()
        if ids:
            update_where(db, Comment, [Comment.id.in_(ids)], received_at=now)
            db.commit()
            log.warning("watched post %s: sending %d unfinished moderation actions again", post_id, len(ids))
    return list(ids)


def _dispatch_comments(comment_ids: list[int]) -> None:
    for comment_id in comment_ids:
        moderate_comment.delay(comment_id)


def _next_cursor(page: dict[str, Any]) -> str | None:
    """The ``after`` cursor when Graph says there is a next page (used within one read only:
    cursors die when items are deleted, so they are never stored)."""
    paging = page.get("paging") if isinstance(page.get("paging"), dict) else {}
    cursors = paging.get("cursors") if isinstance(paging.get("cursors"), dict) else {}
    after = cursors.get("after")
    return after if paging.get("next") and isinstance(after, str) and after else None


def store_comments(account: Account, watched: MonitoredPost, items: list[dict[str, Any]],
                   rules: list[ModerationRule], *, top_level: set[Any]) -> tuple[bool, list[int], list[int]]:
    """Store the comments not stored before, each with its moderation decision. Returns
    whether a known top-level comment was met, the new ids, and the ids with an action."""
    if not items:
        return False, [], []
    new_ids, acts = [], []
    counts_repeats = any(r.enabled and r.kind == ModerationKind.repeats for r in rules)
    with session() as db:
        known = set(db.exec(select(Comment.graph_comment_id).where(
            Comment.graph_comment_id.in_([i["id"] for i in items]))).all())
        met_known = any(i["id"] in known for i in items if i["id"] in top_level)
        for item in items:
            if item["id"] in known:
                continue
            known.add(item["id"])
            try:
                comment = _parse_comment(item)
            except MalformedPayload as exc:
                log.warning("watched post %s: skipped comment %s: %s", watched.id, item["id"][:40], exc)
                continue
            if comment["from_id"] == account.ig_user_id:
                decision = Decision(ModerationAction.none, "the account's own comment")
            else:
                same = db.exec(select(sa.func.count()).select_from(Comment).where(
                    Comment.account_id == account.id, Comment.from_id == comment["from_id"],
                    Comment.text_key == comment["text_key"])).one() if comment["from_id"] and counts_repeats else 0
                decision = moderate(comment["text"], rules, same_text_count=same)
            new_id = insert_once(db, Comment, dict(
                account_id=account.id, monitored_post_id=watched.id, **comment, action=decision.action,
                rule_id=decision.rule_id, reason=decision.reason[:500], received_at=utcnow(), attempts=0,
                action_status=ActionStatus.none if decision.action == ModerationAction.none else ActionStatus.pending))
            if new_id is None:
                continue
            new_ids.append(new_id)
            if decision.action != ModerationAction.none:
                acts.append(new_id)
        db.commit()
    return met_known, new_ids, acts


def _parse_comment(item: dict[str, Any]) -> dict[str, Any]:
    comment_id = graph_id(item.get("id"), "comment", limit=64)
    text = item.get("text", "")
    if not isinstance(text, str):
        raise MalformedPayload(f"text is a {type(text).__name__}")
    text = clean_text(text)
    sender = item.get("from") if isinstance(item.get("from"), dict) else {}
    username = item.get("username") if isinstance(item.get("username"), str) else sender.get("username")
    from_id, parent = sender.get("id"), item.get("parent_id")
    return dict(graph_comment_id=comment_id, text=text, text_key=normalize_text(text)[:255],
                username=clean_text(username)[:255] if isinstance(username, str) else None,
                from_id=graph_id(from_id, "comment author", limit=64) if from_id is not None else None,
                parent_id=graph_id(parent, "parent comment", limit=64) if parent is not None else None,
                created_time=parse_graph_time(item.get("timestamp"), not_after=utcnow() + MAX_FUTURE_SKEW))


#: Graph's answer for a private reply to a comment that already has one.
ALREADY_REPLIED_PRIVATELY = (10, 2534023)


@app.task(name="instaqueue.moderate_comment", bind=True, max_retries=settings.max_retries,
          acks_late=True, reject_on_worker_lost=True, **DATABASE_RETRY)
def moderate_comment(self: Any, comment_id: int) -> str:
    """Carry out a comment's moderation action once. Hiding twice is harmless; a deleted
    comment counts as deleted; a public reply is first looked for among the comment's
    replies when a previous attempt may have sent it; a second private reply is refused by
    Instagram and counts as done. A comment that no longer exists is recorded as gone."""
    with session() as db:
        comment = db.get(Comment, comment_id)
        account = db.get(Account, comment.account_id) if comment else None
        rule = db.get(ModerationRule, comment.rule_id) if comment and comment.rule_id else None
    if comment is None or account is None:
        return "missing"
    if comment.action_status not in (ActionStatus.pending, ActionStatus.acting):
        return comment.action_status
    now, token = utcnow(), secrets.token_hex(8)
    with session() as db:
        row = db.exec(sa.update(Comment).where(
            Comment.id == comment_id,
            sa.or_(Comment.action_status == ActionStatus.pending,
                   sa.and_(Comment.action_status == ActionStatus.acting,
                           sa.or_(Comment.claimed_until.is_(None), Comment.claimed_until <= now))),
        ).values(action_status=ActionStatus.acting, claim_token=token,
                 claimed_until=now + timedelta(seconds=settings.message_lease)).returning(Comment.id)).first()
        db.commit()
    if row is None:
        return "claimed elsewhere"
    looked_before = comment.action_status == ActionStatus.acting
    text = (rule.text if rule else None) or ""
    reply_id: str | None = None
    try:
        if comment.action == ModerationAction.hide:
            graph_call(account, "POST", comment.graph_comment_id, params={"hide": "true"})
        elif comment.action == ModerationAction.delete:
            graph_call(account, "DELETE", comment.graph_comment_id)
        elif comment.action == ModerationAction.reply:
            reply_id = find_own_reply(account, comment, text) if looked_before else None
            if reply_id is None:
                answer = graph_call(account, "POST", f"{comment.graph_comment_id}/replies", params={"message": text})
                reply_id = answer.get("id") if isinstance(answer.get("id"), str) else None
        elif comment.action == ModerationAction.dm:
            try:
                answer = graph_call(account, "POST", f"{account.ig_user_id}/messages", json_body={
                    "recipient": {"comment_id": comment.graph_comment_id}, "message": {"text": text}})
                reply_id = answer.get("message_id") if isinstance(answer.get("message_id"), str) else None
            except PermissionDenied as exc:
                if (exc.code, exc.subcode) != ALREADY_REPLIED_PRIVATELY:
                    raise
    except (TransientError, RateLimited) as exc:
        failures, delay = next_attempt(exc, comment.attempts)
        if delay is None:
            _finish_comment(comment_id, token, action_status=ActionStatus.failed, attempts=failures,
                            action_error=f"gave up after {failures} attempts: {exc}")
            return ActionStatus.failed
        _finish_comment(comment_id, token, action_status=ActionStatus.acting, attempts=failures,
                        action_error=str(exc)[:1000])
        raise self.retry(countdown=delay, max_retries=None, exc=exc)
    except BadRequest as exc:
        if exc.code == 100 and exc.subcode == 33:
            status = ActionStatus.done if comment.action == ModerationAction.delete else ActionStatus.gone
            _finish_comment(comment_id, token, action_status=status, acted_at=utcnow(),
                            action_error=f"the comment no longer exists: {exc}"[:1000])
            return status
        _finish_comment(comment_id, token, action_status=ActionStatus.failed, action_error=str(exc)[:1000])
        return ActionStatus.failed
    except (GraphAPIError, AccountUnavailable) as exc:
        _finish_comment(comment_id, token, action_status=ActionStatus.failed, action_error=str(exc)[:1000])
        return ActionStatus.failed
    _finish_comment(comment_id, token, action_status=ActionStatus.done, acted_at=utcnow(), reply_id=reply_id,
                    action_error=None)
    return ActionStatus.done


def find_own_reply(account: Account, comment: Comment, text: str) -> str | None:
    """The account's public reply with ``text`` under the comment, if a previous attempt sent it."""
    answer = graph_call(account, "GET", f"{comment.graph_comment_id}/replies", params={"fields": COMMENT_FIELDS})
    for item in answer.get("data") if isinstance(answer.get("data"), list) else []:
        sender = item.get("from") if isinstance(item, dict) and isinstance(item.get("from"), dict) else {}
        if sender.get("id") == account.ig_user_id and item.get("text") == text and isinstance(item.get("id"), str):
            return item["id"]
    return None


def _finish_comment(comment_id: int, token: str, **values: Any) -> None:
    with session() as db:
        update_where(db, Comment, [Comment.id == comment_id, Comment.claim_token == token],
                     claimed_until=None, **values)
        db.commit()


#: Days one analytics run catches up at most, per account.
ANALYTICS_CATCH_UP_DAYS = 31
#: Account insights the current Graph version still serves, asked as ``total_value``.
INSIGHT_METRICS = ("reach", "views", "profile_views", "accounts_engaged")
#: Refresh a long-lived token once it is this old, when it expires within REFRESH_WINDOW.
TOKEN_MIN_AGE = timedelta(hours=24)
REFRESH_WINDOW = timedelta(days=10)
#: A long-lived Instagram token's life when Meta does not say.
TOKEN_LIFETIME = timedelta(days=60)


def day_bounds(day: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC instants where a local day starts and the next one starts (23, 24 or 25 h)."""
    start = datetime.combine(day, dtime(0), tzinfo=zone)
    end = datetime.combine(day + timedelta(days=1), dtime(0), tzinfo=zone)
    return start.astimezone(timezone.utc), end.astimezone(timezone.utc)


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Linear-interpolated percentile (like PostgreSQL's percentile_cont); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def token_needs_refresh(issued_at: datetime, expires_at: datetime | None, now: datetime) -> bool:
    """Meta refreshes tokens at least 24 h old; we refresh those expiring within 10 days."""
    expires = expires_at or issued_at + TOKEN_LIFETIME
    return now - issued_at >= TOKEN_MIN_AGE and expires - now <= REFRESH_WINDOW


@app.task(name="instaqueue.generate_daily_analytics", ignore_result=False)
def generate_daily_analytics(days: list[str] | None = None) -> dict[str, int]:
    """Write each account's row for every finished local day not written yet (up to a month
    back, so days missed while nothing ran are caught up), or for ``days`` (ISO dates, a
    backfill), replacing rows that exist. Insight failures mark a row incomplete; they never
    fail the task or cost another account its row."""
    zone = settings.zone
    today = utcnow().astimezone(zone).date()
    with session() as db:
        accounts = db.exec(select(Account).order_by(Account.id)).all()
        last = dict(db.exec(select(DailyAnalytics.account_id, sa.func.max(DailyAnalytics.day))
                            .group_by(DailyAnalytics.account_id)).all())
    wanted: dict[date, list[Account]] = {}
    for account in accounts:
        if days is not None:
            todo = [date.fromisoformat(d) for d in days]
        else:
            first = max(last[account.id] + timedelta(days=1) if account.id in last
                        else account.created_at.astimezone(zone).date(),
                        today - timedelta(days=ANALYTICS_CATCH_UP_DAYS))
            todo = [first + timedelta(days=n) for n in range((today - first).days)]
        for day in todo:
            wanted.setdefault(day, []).append(account)
    written = incomplete = 0
    for day in sorted(wanted):
        rows = build_day(day, wanted[day], zone)
        save_analytics(rows)
        written += len(rows)
        incomplete += sum(not row["complete"] for row in rows)
    log.info("daily analytics: %d rows written (%d incomplete) for %d days", written, incomplete, len(wanted))
    return {"rows": written, "incomplete": incomplete, "days": len(wanted)}


def build_day(day: date, accounts: Sequence[Account], zone: ZoneInfo) -> list[dict[str, Any]]:
    """The rows of one local day: counts from our tables (one grouped query per table for all
    the accounts), then each account's insights from the Graph API."""
    start, end = day_bounds(day, zone)
    ids = [a.id for a in accounts]
    rows = {a.id: dict(account_id=a.id, day=day, generated_at=utcnow(), complete=True, problems=None)
            for a in accounts}
    with session() as db:
        for account_id, status, count in db.exec(
                select(InboundMessage.account_id, InboundMessage.status, sa.func.count())
                .where(InboundMessage.account_id.in_(ids), InboundMessage.created_time >= start,
                       InboundMessage.created_time < end)
                .group_by(InboundMessage.account_id, InboundMessage.status)).all():
            row = rows[account_id]
            row["dms_received"] = row.get("dms_received", 0) + count
            key = {MessageStatus.replied: "dms_auto_answered", MessageStatus.needs_human: "dms_for_human",
                   MessageStatus.failed: "dms_failed"}.get(status)
            if key:
                row[key] = count
        latencies: dict[int, list[float]] = {}
        for account_id, created, replied in db.exec(
                select(InboundMessage.account_id, InboundMessage.created_time, InboundMessage.replied_at)
                .where(InboundMessage.account_id.in_(ids), InboundMessage.status == MessageStatus.replied,
                       InboundMessage.replied_at.is_not(None),
                       InboundMessage.created_time >= start, InboundMessage.created_time < end)).all():
            latencies.setdefault(account_id, []).append(_aware(replied).timestamp() - _aware(created).timestamp())
        for account_id, values in latencies.items():
            rows[account_id].update(reply_latency_median_s=percentile(values, 0.5),
                                    reply_latency_p95_s=percentile(values, 0.95))
        for account_id, action, status, count in db.exec(
                select(Comment.account_id, Comment.action, Comment.action_status, sa.func.count())
                .where(Comment.account_id.in_(ids), Comment.created_time >= start, Comment.created_time < end)
                .group_by(Comment.account_id, Comment.action, Comment.action_status)).all():
            row = rows[account_id]
            row["comments_seen"] = row.get("comments_seen", 0) + count
            if status == ActionStatus.done:
                key = {ModerationAction.hide: "comments_hidden", ModerationAction.delete: "comments_deleted",
                       ModerationAction.reply: "comments_replied", ModerationAction.dm: "comments_replied"}.get(action)
                if key:
                    row[key] = row.get(key, 0) + count
        for account_id, status, count in db.exec(
                select(ScheduledPost.account_id, ScheduledPost.status, sa.func.count())
                .where(ScheduledPost.account_id.in_(ids),
                       ScheduledPost.status.in_([PostStatus.published, PostStatus.failed, PostStatus.unconfirmed]),
                       sa.func.coalesce(ScheduledPost.published_at, ScheduledPost.publish_at) >= start,
                       sa.func.coalesce(ScheduledPost.published_at, ScheduledPost.publish_at) < end)
                .group_by(ScheduledPost.account_id, ScheduledPost.status)).all():
            rows[account_id][f"posts_{status}"] = count
    for account in accounts:
        problems = read_insights(account, rows[account.id], start, end)
        if problems:
            rows[account.id].update(complete=False, problems="; ".join(problems)[:2000])
    return list(rows.values())


def read_insights(account: Account, row: dict[str, Any], start: datetime, end: datetime) -> list[str]:
    """Fill the row's followers and insights; return what could not be read and why. A
    metric refused with code 100 is asked again alone, so one retired metric does not cost
    the others; missing data (an empty ``data``) stays empty, not 0."""
    if account.state != AccountState.active:
        return [f"account {account.state}: no insights"]
    problems: list[str] = []
    try:
        profile = graph_call(account, "GET", account.ig_user_id, params={"fields": "followers_count,media_count"})
        row["followers"] = _as_int(profile.get("followers_count"))
    except (GraphAPIError, AccountUnavailable) as exc:
        problems.append(f"followers: {exc}")
        if isinstance(exc, (TokenInvalid, AccountUnavailable)):
            return problems
    base = {"period": "day", "metric_type": "total_value", "since": int(start.timestamp()),
            "until": int(end.timestamp())}
    batches: list[tuple[str, ...]] = [INSIGHT_METRICS]
    while batches:
        metrics = batches.pop(0)
        try:
            answer = graph_call(account, "GET", f"{account.ig_user_id}/insights",
                                params={**base, "metric": ",".join(metrics)})
        except BadRequest as exc:
            if len(metrics) > 1:
                batches.extend((m,) for m in metrics)
                continue
            problems.append(f"{metrics[0]}: {exc}")
            continue
        except (GraphAPIError, AccountUnavailable) as exc:
            problems.append(f"{','.join(metrics)}: {exc}")
            if isinstance(exc, (TokenInvalid, AccountUnavailable)):
                break
            continue
        for item in answer.get("data") if isinstance(answer.get("data"), list) else []:
            name = item.get("name") if isinstance(item, dict) else None
            if name in INSIGHT_METRICS:
                total = item.get("total_value")
                values = item.get("values")
                if isinstance(total, dict):
                    row[name] = _as_int(total.get("value"))
                elif isinstance(values, list) and values and isinstance(values[-1], dict):
                    row[name] = _as_int(values[-1].get("value"))
    return problems


def save_analytics(rows: list[dict[str, Any]]) -> None:
    """Insert the rows of a day, replacing those of the same account and day, in one
    transaction (one statement for all of them)."""
    if not rows:
        return
    values = [DailyAnalytics.model_validate(row).model_dump(exclude={"id"}) for row in rows]
    with session() as db:
        statement = dialect_insert(db, DailyAnalytics)
        db.execute(statement.on_conflict_do_update(index_elements=["account_id", "day"],
                                                   set_={k: statement.excluded[k] for k in values[0]}), values)
        db.commit()


@app.task(name="instaqueue.refresh_access_tokens", ignore_result=False)
def refresh_access_tokens() -> dict[str, int]:
    """Refresh long-lived tokens at least 24 h old that expire within 10 days. A refresh that
    Instagram refuses parks the account for re-auth; a transient failure waits for tomorrow
    (the window is ten days wide)."""
    now = utcnow()
    with session() as db:
        accounts = db.exec(select(Account).where(Account.state == AccountState.active)).all()
    refreshed = parked = 0
    for account in accounts:
        if not token_needs_refresh(account.token_issued_at, account.token_expires_at, now):
            continue
        root = urlsplit(settings.graph_api_url)
        try:
            answer = graph().request("GET", f"{root.scheme}://{root.netloc}/refresh_access_token",
                                     token=account.access_token,
                                     params={"grant_type": "ig_refresh_token", "access_token": account.access_token})
            token = answer.data.get("access_token")
            if not isinstance(token, str) or not token:
                raise BadRequest("refresh answered without a token")
        except (TransientError, RateLimited) as exc:
            log.warning("account %s: token refresh failed for now (%s); trying again tomorrow", account.id, exc)
            continue
        except GraphAPIError as exc:
            park_account(account.id, f"token refresh refused: {exc}")
            parked += 1
            continue
        lifetime = _as_float(answer.data.get("expires_in")) or TOKEN_LIFETIME.total_seconds()
        with session() as db:
            update_where(db, Account, [Account.id == account.id, Account.access_token == account.access_token],
                         access_token=token, token_issued_at=utcnow(),
                         token_expires_at=utcnow() + timedelta(seconds=lifetime))
            db.commit()
        refreshed += 1
        log.info("account %s: access token refreshed; valid for %.0f days", account.id, lifetime / 86400)
    return {"refreshed": refreshed, "parked": parked}


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


@app.task(name="instaqueue.noop")
def noop(value: Any = None) -> Any:
    """Does nothing: the baseline for benchmarks and a probe of the queue path."""
    return value


# Beat schedule ###############################################################################

app.conf.beat_schedule = {
    "poll-instagram-messages": {
        "task": "instaqueue.poll_instagram_messages",
        "schedule": settings.dm_poll_interval,
        "options": {"expires": dm_poll_expiry()},
    },
    "poll-monitored-posts": {
        "task": "instaqueue.poll_all_monitored_posts",
        "schedule": min(COMMENT_DISPATCH_INTERVAL, settings.comment_poll_interval),
        "options": {"expires": min(COMMENT_DISPATCH_INTERVAL, settings.comment_poll_interval)},
    },
    "generate-daily-analytics": {
        "task": "instaqueue.generate_daily_analytics",
        "schedule": crontab(hour=int(settings.analytics_at[:2]), minute=int(settings.analytics_at[3:])),
    },
    "refresh-access-tokens": {
        "task": "instaqueue.refresh_access_tokens",
        "schedule": crontab(hour=int(settings.analytics_at[:2]), minute=int(settings.analytics_at[3:])),
    },
    "check-scheduled-posts": {
        "task": "instaqueue.check_scheduled_posts",
        "schedule": settings.scheduled_check_interval,
        "options": {"expires": settings.scheduled_check_interval},
    },
}


#: The active beat's lock expires this long after its last tick; a standby takes over then.
BEAT_LOCK_TTL = 10.0
#: How often a standby beat tries to take over.
BEAT_STANDBY_RETRY = 1.0


class SingleBeatScheduler(PersistentScheduler):
    """Celery's scheduler, sending only while it holds beat's lock, renewed on every tick, so
    that exactly one beat sends however many are started. A standby checks every second and
    takes over within ``BEAT_LOCK_TTL`` of the active one's death. On taking over it checks
    scheduled posts at once: beat's first interval run comes one interval after start, and a
    post due in the first minute after a deploy would go out late."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lock = LeaderLock("beat", BEAT_LOCK_TTL)
        self._leading: bool | None = None
        super().__init__(*args, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            leading = self._lock.hold()
        except Exception as exc:  # Redis is away: send nothing, keep trying, never exit
            if self._leading is not False:
                log.error("beat lock unreachable (%s); sending nothing until Redis answers", type(exc).__name__)
            self._leading = False
            return BEAT_STANDBY_RETRY
        if not leading:
            if self._leading is not False:
                log.warning("another beat is active; this one stands by")
            self._leading = False
            return BEAT_STANDBY_RETRY
        try:
            if not self._leading:
                log.warning("this beat is now the active one")
                check_scheduled_posts.apply_async()
            self._leading = True
            record_beat_heartbeat()
        except Exception as exc:  # the broker went away between the lock and the send
            log.error("beat could not reach the broker (%s); trying again", type(exc).__name__)
            return BEAT_STANDBY_RETRY
        return min(super().tick(*args, **kwargs), BEAT_LOCK_TTL / 4)


app.conf.beat_scheduler = SingleBeatScheduler


# CLI #########################################################################################

#: What ``worker`` serves, in priority order.
WORKER_QUEUES = ",".join(QUEUES)


class CommandError(Exception):
    """Bad input to a command: said in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line, not a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        one_line = " ".join(message.split())[:300]
        self.exit(2, f"{self.prog}: {one_line} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="instaqueue", description="Instagram automation job engine.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, text in (("worker", "run a worker on queues high,default,low"),
                       ("run", "run a worker with embedded beat (one machine, development)"),
                       ("beat", "run the scheduler (exactly one per deployment)"),
                       ("flower", "run the Flower monitoring UI on port 5555")):
        commands.add_parser(name, help=text, description=f"{text}; extra arguments go to celery")
    commands.add_parser("initdb", help="create the tables")
    commands.add_parser("health", help="exit 0 only when broker, database, a worker and beat answer")
    status = commands.add_parser("status", help="queues, workers, beat, and what waits")
    status.add_argument("--json", action="store_true", help="one JSON object")

    accounts = commands.add_parser("accounts", help="Instagram accounts").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    add = accounts.add_parser("add", help="connect an account")
    add.add_argument("--ig-user-id", required=True, type=_ig_id)
    add.add_argument("--username", required=True, type=_username)
    add.add_argument("--access-token", required=True, type=_token)
    add.add_argument("--expires-in-days", type=_positive_int, default=60, help="token lifetime (default 60)")
    accounts.add_parser("list", help="accounts, their state and token expiry")
    reauth = accounts.add_parser("reauth", help="give a parked account a new token and make it active")
    reauth.add_argument("id", type=_positive_int)
    reauth.add_argument("--access-token", required=True, type=_token)
    reauth.add_argument("--expires-in-days", type=_positive_int, default=60)

    rules = commands.add_parser("rules", help="keyword reply rules").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    add = rules.add_parser("add", help="reply with TEXT to DMs containing any of WORDS")
    add.add_argument("--account", required=True, type=_positive_int, help="account id (see accounts list)")
    add.add_argument("--match", required=True, type=_match_words, help='comma-separated, e.g. "price, cost"')
    add.add_argument("--reply", required=True, type=_reply_text)
    listing = rules.add_parser("list", help="reply rules")
    listing.add_argument("--account", type=_positive_int)

    posts = commands.add_parser("posts", help="scheduled posts").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    schedule = posts.add_parser("schedule", help="schedule a post; several --image-url/--video-url make a carousel")
    schedule.add_argument("--account", required=True, type=_positive_int, help="account id (see accounts list)")
    schedule.add_argument("--at", required=True, type=_moment, help="ISO 8601; without an offset, in INSTAQUEUE_TIMEZONE")
    schedule.add_argument("--image-url", action="append", default=[], metavar="URL")
    schedule.add_argument("--video-url", action="append", default=[], metavar="URL")
    shape = schedule.add_mutually_exclusive_group()
    shape.add_argument("--reel", action="store_true", help="publish the one video as a reel (not shared to the feed)")
    shape.add_argument("--story", action="store_true", help="publish the one image or video as a story")
    schedule.add_argument("--caption", default="")
    listing = posts.add_parser("list", help="scheduled posts, soonest first")
    listing.add_argument("--status", choices=[s.value for s in PostStatus])
    listing.add_argument("--account", type=_positive_int)
    cancel = posts.add_parser("cancel", help="never publish this post")
    cancel.add_argument("id", type=_positive_int)
    reschedule = posts.add_parser("reschedule", help="move a post to another time (also retries a failed one)")
    reschedule.add_argument("id", type=_positive_int)
    reschedule.add_argument("--at", required=True, type=_moment)

    analytics = commands.add_parser("analytics", help="daily analytics").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    backfill = analytics.add_parser("backfill", help="(re)build the rows of these days")
    backfill.add_argument("--from", dest="start", required=True, type=_day)
    backfill.add_argument("--to", dest="end", required=True, type=_day)
    show = analytics.add_parser("show", help="an account's recent days as a table")
    show.add_argument("--account", required=True, type=_positive_int)
    show.add_argument("--days", type=_positive_int, default=14)
    export = analytics.add_parser("export", help="all rows to standard output")
    export.add_argument("--format", required=True, choices=["csv", "json"])
    export.add_argument("--account", type=_positive_int)

    kb = commands.add_parser("kb", help="knowledge base for replies").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    add = kb.add_parser("add", help="add an entry")
    add.add_argument("--account", required=True, type=_positive_int)
    add.add_argument("--title", required=True, type=_nonempty)
    add.add_argument("--answer", required=True, type=_nonempty)
    add.add_argument("--tags", default="")
    load = kb.add_parser("import", help="add entries from a CSV (title,answer[,tags]) or JSONL file")
    load.add_argument("--account", required=True, type=_positive_int)
    load.add_argument("file", type=Path)
    listing = kb.add_parser("list", help="entries")
    listing.add_argument("--account", type=_positive_int)
    remove = kb.add_parser("remove", help="delete an entry")
    remove.add_argument("id", type=_positive_int)
    conversations = commands.add_parser("conversations", help="conversations handed to a human").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    conversations.add_parser("list", help="conversations waiting for a person")
    resume = conversations.add_parser("resume", help="let automatic replies answer this conversation again")
    resume.add_argument("id", type=_positive_int, help="id from conversations list")

    monitor = commands.add_parser("monitor", help="posts whose comments are watched").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    add = monitor.add_parser("add", help="watch a post's comments")
    add.add_argument("--account", required=True, type=_positive_int)
    add.add_argument("--media-id", required=True, type=_ig_id)
    listing = monitor.add_parser("list", help="watched posts")
    listing.add_argument("--account", type=_positive_int)
    remove = monitor.add_parser("remove", help="stop watching a post")
    remove.add_argument("id", type=_positive_int)

    moderation = commands.add_parser("moderation", help="comment moderation rules").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    add = moderation.add_parser("add", help="act on comments that break a rule")
    add.add_argument("--account", required=True, type=_positive_int)
    kind = add.add_mutually_exclusive_group(required=True)
    kind.add_argument("--block", type=_match_words, metavar="WORDS", help="comma-separated words or phrases")
    kind.add_argument("--regex", type=_regex, metavar="RE")
    kind.add_argument("--links", action="store_true", help="any link")
    kind.add_argument("--mentions", type=_positive_int, metavar="N", help="N or more @mentions")
    kind.add_argument("--repeats", type=_positive_int, metavar="N", help="the same text N times from one author")
    add.add_argument("--action", required=True, choices=["hide", "delete", "reply", "dm"], dest="action_")
    add.add_argument("--text", type=_reply_text, help="the reply, for --action reply or dm")
    listing = moderation.add_parser("list", help="moderation rules")
    listing.add_argument("--account", type=_positive_int)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in _CELERY_COMMANDS:
        parser.error(f"unrecognized arguments: {' '.join(extra)[:200]!r}")
    args.celery_args = extra
    try:
        return _COMMANDS[args.command](args) or 0
    except CommandError as exc:
        print(f"instaqueue {args.command}: {exc}", file=sys.stderr)
        return 2
    except sa.exc.OperationalError as exc:
        where = make_url(settings.effective_database_url).render_as_string(hide_password=True)
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        print(f"instaqueue {args.command}: cannot use the database at {where}: {reason}", file=sys.stderr)
        return 1


def _cmd_celery(args: argparse.Namespace) -> int:
    create_tables()
    if not settings.redis_url:
        ensure_data_dirs(settings)
    extra = [a for a in args.celery_args if a != "--"]
    if args.command in ("worker", "run"):
        argv = ["worker", "-Q", WORKER_QUEUES, "-c", str(settings.worker_concurrency), "-l", "INFO"]
        if args.command == "run":
            argv += ["-B", "--schedule", str(settings.data_dir.resolve() / "beat-schedule")]
        app.worker_main(argv + extra)
    elif args.command == "beat":
        app.start(["beat", "-l", "INFO", "--schedule", str(settings.data_dir.resolve() / "beat-schedule"), *extra])
    else:
        auth = settings.flower_basic_auth
        loopback = settings.flower_address in ("127.0.0.1", "::1", "localhost")
        if auth is None and not (loopback and settings.flower_insecure_local):
            raise CommandError("refusing to start Flower without credentials: set INSTAQUEUE_FLOWER_BASIC_AUTH="
                               "user:password, or bind INSTAQUEUE_FLOWER_ADDRESS=127.0.0.1 and opt out with "
                               "INSTAQUEUE_FLOWER_INSECURE_LOCAL=true")
        # Flower reads its options from FLOWER_* variables: the password stays out of argv
        # (and so out of ps), and its unauthenticated API stays off.
        os.environ.pop("FLOWER_UNAUTHENTICATED_API", None)
        if auth is not None:
            os.environ["FLOWER_BASIC_AUTH"] = auth.get_secret_value()
        app.start(["flower", f"--address={settings.flower_address}", "--port=5555", *extra])
    return 0


#: Beat's heartbeat older than this fails the health check (beat ticks at least every 2.5 s).
BEAT_HEARTBEAT_MAX_AGE = 30.0


def _cmd_health(args: argparse.Namespace) -> int:
    checks = [("broker", _check_broker), ("database", _check_database), ("workers", _check_workers),
              ("beat", _check_beat)]
    healthy = True
    for name, check in checks:
        try:
            ok, detail = check()
        except Exception as exc:  # any failure of a probe is that check failing, said in one line
            ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        healthy &= ok
        print(f"{name}: {'ok' if ok else 'FAIL'} ({detail})")
    return 0 if healthy else 1


def _check_broker() -> tuple[bool, str]:
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=3)
        return True, connection.as_uri()


def _check_database() -> tuple[bool, str]:
    with get_engine().connect() as connection:
        connection.execute(sa.text("SELECT 1"))
    return True, make_url(settings.effective_database_url).render_as_string(hide_password=True)


def _check_workers() -> tuple[bool, str]:
    replies = app.control.ping(timeout=2)
    return bool(replies), f"{len(replies)} answered" + (f": {', '.join(sorted(k for r in replies for k in r))}"
                                                       if replies else "")


def _check_beat() -> tuple[bool, str]:
    age = beat_heartbeat_age()
    if age is None:
        return False, "no heartbeat: is a beat running?"
    return age <= BEAT_HEARTBEAT_MAX_AGE, f"heartbeat {age:.1f} s ago"


def _cmd_status(args: argparse.Namespace) -> int:
    create_tables()
    now = utcnow()
    report: dict[str, Any] = {"queues": queue_depths()}
    try:
        report["workers_online"] = len(app.control.ping(timeout=1))
    except Exception:  # the broker is down: say so, keep the rest of the report
        report["workers_online"] = None
    age = beat_heartbeat_age()
    report["beat_heartbeat_age_s"] = round(age, 1) if age is not None else None
    with session() as db:
        def count(model: Any, *where: Any) -> int:
            return db.exec(select(sa.func.count()).select_from(model).where(*where)).one()

        report.update(
            dms_waiting=count(InboundMessage, InboundMessage.status.in_([MessageStatus.received, MessageStatus.sending])),
            dms_for_human=count(InboundMessage, InboundMessage.status == MessageStatus.needs_human),
            dms_failed=count(InboundMessage, InboundMessage.status == MessageStatus.failed),
            posts_due=count(ScheduledPost, ScheduledPost.status.in_([PostStatus.scheduled, PostStatus.queued]),
                            ScheduledPost.publish_at <= now + timedelta(seconds=settings.scheduled_check_interval)),
            posts_failed=count(ScheduledPost, ScheduledPost.status == PostStatus.failed),
            posts_unconfirmed=count(ScheduledPost, ScheduledPost.status == PostStatus.unconfirmed),
            moderation_pending=count(Comment, Comment.action_status.in_([ActionStatus.pending, ActionStatus.acting])),
            accounts_needing_reauth=count(Account, Account.state == AccountState.needs_reauth),
        )
    if args.json:
        print(json.dumps(report, sort_keys=True))
        return 0
    depths = report.pop("queues")
    print("queues: " + ", ".join(f"{q} {n if n is not None else '?'}" for q, n in depths.items()))
    for key, value in report.items():
        print(f"{key.replace('_', ' ')}: {'?' if value is None else value}")
    return 0


def queue_depths() -> dict[str, int | None]:
    """Messages waiting per queue: on Redis every priority list of the queue; on the embedded
    broker the message files for it. None for a queue that could not be read."""
    client = get_redis()
    depths: dict[str, int | None] = {}
    for queue in QUEUES:
        try:
            if client is not None:
                depths[queue] = sum(client.llen(key) for key in [queue, *client.scan_iter(f"{queue}\x06\x16*")])
            else:
                folder = Path(broker_config(settings)["broker_transport_options"]["data_folder_in"])
                depths[queue] = sum(1 for f in folder.glob(f"*.{queue}.msg")) if folder.exists() else 0
        except Exception:  # noqa: BLE001 - the broker is down; the report says '?'
            depths[queue] = None
    return depths


def _cmd_initdb(args: argparse.Namespace) -> int:
    create_tables()
    print(f"tables ready in {make_url(settings.effective_database_url).render_as_string(hide_password=True)}")
    return 0


def _cmd_accounts(args: argparse.Namespace) -> int:
    create_tables()
    with session() as db:
        if args.action == "add":
            existing = db.exec(select(Account).where(Account.ig_user_id == args.ig_user_id)).first()
            if existing:
                raise CommandError(f"an account with ig user id {args.ig_user_id} exists already (id {existing.id})")
            account = Account(ig_user_id=args.ig_user_id, username=args.username, access_token=args.access_token,
                              token_expires_at=utcnow() + timedelta(days=args.expires_in_days))
            db.add(account)
            db.commit()
            print(f"account {account.id} added: @{account.username} (ig user id {account.ig_user_id})")
            return 0
        if args.action == "reauth":
            if not update_where(db, Account, [Account.id == args.id], access_token=args.access_token,
                                state=AccountState.active, state_reason=None, backoff_until=None,
                                token_issued_at=utcnow(), token_expires_at=utcnow() + timedelta(days=args.expires_in_days)):
                raise CommandError(f"no account with id {args.id} (see: instaqueue accounts list)")
            db.commit()
            print(f"account {args.id} is active again with its new token")
            return 0
        rows = db.exec(select(Account).order_by(Account.id)).all()
    _print_table(["id", "ig_user_id", "username", "state", "token_expires", "backoff_until", "reason"],
                 [[a.id, a.ig_user_id, "@" + a.username, a.state, _when(a.token_expires_at), _when(a.backoff_until),
                   (a.state_reason or "-")[:60]] for a in rows])
    return 0


def _cmd_rules(args: argparse.Namespace) -> int:
    create_tables()
    with session() as db:
        if args.action == "add":
            if db.get(Account, args.account) is None:
                raise CommandError(f"no account with id {args.account} (see: instaqueue accounts list)")
            rule = ReplyRule(account_id=args.account, match=args.match, reply=args.reply)
            db.add(rule)
            db.commit()
            print(f"rule {rule.id} added for account {rule.account_id}")
            return 0
        query = select(ReplyRule).order_by(ReplyRule.id)
        if args.account:
            query = query.where(ReplyRule.account_id == args.account)
        rows = db.exec(query).all()
    _print_table(["id", "account", "match", "reply", "enabled"],
                 [[r.id, r.account_id, r.match, r.reply, "yes" if r.enabled else "no"] for r in rows])
    return 0


#: Commands that start a Celery program; arguments we do not know are passed on to it.
_CELERY_COMMANDS = ("worker", "run", "beat", "flower")

def _cmd_posts(args: argparse.Namespace) -> int:
    create_tables()
    now = utcnow()
    if args.action == "schedule":
        media = [{"type": "image", "url": u} for u in args.image_url] + [{"type": "video", "url": u} for u in args.video_url]
        if not media:
            raise CommandError("give the media: --image-url URL (several for a carousel) or --video-url URL")
        kind = (PostKind.story if args.story else PostKind.carousel if len(media) > 1
                else PostKind.reel if args.reel else PostKind(media[0]["type"]))
        if args.reel and media[0]["type"] != "video":
            raise CommandError("--reel needs exactly one --video-url")
        problems = post_problems(kind=kind, media=media, caption=args.caption, publish_at=args.at, now=now, grace=0)
        if problems:
            raise CommandError("; ".join(problems))
        with session() as db:
            if db.get(Account, args.account) is None:
                raise CommandError(f"no account with id {args.account} (see: instaqueue accounts list)")
            post = ScheduledPost(account_id=args.account, kind=kind, media=media, caption=args.caption, publish_at=args.at)
            db.add(post)
            db.commit()
        print(f"post {post.id} scheduled: {kind} for account {post.account_id} at {_when(post.publish_at)}")
        _check_posts_now(post.publish_at)
        return 0
    if args.action == "list":
        with session() as db:
            query = select(ScheduledPost).order_by(ScheduledPost.publish_at, ScheduledPost.id)
            if args.status:
                query = query.where(ScheduledPost.status == args.status)
            if args.account:
                query = query.where(ScheduledPost.account_id == args.account)
            rows = db.exec(query).all()
        _print_table(["id", "account", "kind", "publish_at", "status", "attempts", "media", "last_error"],
                     [[p.id, p.account_id, p.kind, _when(p.publish_at), p.status, p.attempts,
                       p.permalink or p.media_id or "-", (p.last_error or "-")[:80]] for p in rows])
        return 0
    with session() as db:
        post = db.get(ScheduledPost, args.id)
    if post is None:
        raise CommandError(f"no post with id {args.id} (see: instaqueue posts list)")
    if args.action == "cancel":
        movable = [PostStatus.scheduled, PostStatus.queued, PostStatus.failed]
        values: dict[str, Any] = dict(status=PostStatus.cancelled, next_attempt_at=None)
    else:
        if (problems := post_problems(kind=post.kind, media=post.media, caption=post.caption, publish_at=args.at,
                                      now=now, grace=0)):
            raise CommandError("; ".join(problems))
        movable = [PostStatus.scheduled, PostStatus.queued, PostStatus.failed]
        values = dict(status=PostStatus.scheduled, publish_at=args.at, attempts=0, last_error=None, started_at=None,
                      container_id=None, child_container_ids=[], container_checks=0, next_attempt_at=None)
    with session() as db:
        # Conditional on the state, and never while a task holds the post: a queued post's
        # task finds it scheduled (or cancelled) and does nothing.
        changed = update_where(db, ScheduledPost, [
            ScheduledPost.id == args.id, ScheduledPost.status.in_(movable),
            sa.or_(ScheduledPost.claimed_until.is_(None), ScheduledPost.claimed_until < now)], **values)
        db.commit()
    if not changed:
        with session() as db:
            post = db.get(ScheduledPost, args.id)
        raise CommandError(f"post {args.id} is {post.status}; only a scheduled, queued or failed post can be "
                           f"{'cancelled' if args.action == 'cancel' else 'rescheduled'}")
    if args.action == "cancel":
        print(f"post {args.id} cancelled")
    else:
        print(f"post {args.id} rescheduled to {_when(args.at)}")
        _check_posts_now(args.at)
    return 0


#: Columns of ``analytics show``: (header, attribute).
_ANALYTICS_SHOWN = [("day", "day"), ("dms", "dms_received"), ("auto", "dms_auto_answered"), ("human", "dms_for_human"),
                    ("failed", "dms_failed"), ("p50_s", "reply_latency_median_s"), ("p95_s", "reply_latency_p95_s"),
                    ("comments", "comments_seen"), ("hidden", "comments_hidden"), ("deleted", "comments_deleted"),
                    ("replied", "comments_replied"), ("posts", "posts_published"), ("followers", "followers"),
                    ("reach", "reach"), ("views", "views"), ("complete", "complete")]


def _cmd_analytics(args: argparse.Namespace) -> int:
    create_tables()
    if args.action == "backfill":
        if args.end < args.start:
            raise CommandError("--to is before --from")
        days = [(args.start + timedelta(days=n)).isoformat() for n in range((args.end - args.start).days + 1)]
        if len(days) > 366:
            raise CommandError("backfill at most 366 days at a time")
        result = generate_daily_analytics(days)
        print(f"{result['rows']} rows written for {len(days)} days ({result['incomplete']} incomplete)")
        return 0
    with session() as db:
        query = select(DailyAnalytics).order_by(DailyAnalytics.account_id, DailyAnalytics.day)
        if args.account:
            if db.get(Account, args.account) is None:
                raise CommandError(f"no account with id {args.account} (see: instaqueue accounts list)")
            query = query.where(DailyAnalytics.account_id == args.account)
        if args.action == "show":
            query = query.where(DailyAnalytics.day > utcnow().astimezone(settings.zone).date() - timedelta(days=args.days + 1))
        rows = db.exec(query).all()
    if args.action == "show":
        def cell(value: Any) -> str:
            return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else \
                ("yes" if value else "NO") if isinstance(value, bool) else str(value)
        _print_table([h for h, _ in _ANALYTICS_SHOWN], [[cell(getattr(r, a)) for _, a in _ANALYTICS_SHOWN] for r in rows])
        return 0
    records = [r.model_dump(exclude={"id"}, mode="json") for r in rows]
    if args.format == "json":
        json.dump(records, sys.stdout, indent=1)
        print()
    else:
        writer = csv.DictWriter(sys.stdout, fieldnames=[c.name for c in DailyAnalytics.__table__.columns if c.name != "id"])
        writer.writeheader()
        writer.writerows(records)
    return 0


def _cmd_kb(args: argparse.Namespace) -> int:
    create_tables()
    with session() as db:
        if args.action in ("add", "import") and db.get(Account, args.account) is None:
            raise CommandError(f"no account with id {args.account} (see: instaqueue accounts list)")
        if args.action == "add":
            entry = KnowledgeEntry(account_id=args.account, title=args.title, answer=args.answer, tags=args.tags)
            db.add(entry)
            db.commit()
            print(f"entry {entry.id} added for account {args.account}")
            return 0
        if args.action == "import":
            entries = read_kb_file(args.file)
            for item in entries:
                db.add(KnowledgeEntry(account_id=args.account, **item))
            db.commit()
            print(f"{len(entries)} entries imported for account {args.account}")
            return 0
        if args.action == "remove":
            entry = db.get(KnowledgeEntry, args.id)
            if entry is None:
                raise CommandError(f"no entry with id {args.id} (see: instaqueue kb list)")
            db.delete(entry)
            db.commit()
            print(f"entry {args.id} removed")
            return 0
        query = select(KnowledgeEntry).order_by(KnowledgeEntry.id)
        if args.account:
            query = query.where(KnowledgeEntry.account_id == args.account)
        rows = db.exec(query).all()
    _print_table(["id", "account", "title", "answer", "tags"],
                 [[e.id, e.account_id, e.title[:40], e.answer[:60], e.tags or "-"] for e in rows])
    return 0


def read_kb_file(path: Path) -> list[dict[str, str]]:
    """Entries from CSV (a header with title and answer, tags optional) or JSONL (objects with
    the same keys); any bad line stops the import with its number, so nothing is half-loaded."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read {path}: {exc}") from None
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except ValueError as exc:
                raise CommandError(f"{path}:{number}: not JSON ({exc})") from None
    else:
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"title", "answer"} <= {f.strip().lower() for f in reader.fieldnames}:
            raise CommandError(f"{path}: a CSV needs a header with title and answer (and optionally tags)")
        rows = [(number, {k.strip().lower(): v for k, v in row.items() if k}) for number, row in enumerate(reader, 2)]
    entries = []
    for number, row in rows:
        if not isinstance(row, dict):
            raise CommandError(f"{path}:{number}: expected an object with title and answer")
        title, answer, tags = (str(row.get(k) or "").strip() for k in ("title", "answer", "tags"))
        if not title or not answer:
            raise CommandError(f"{path}:{number}: title and answer must not be empty")
        entries.append({"title": title, "answer": answer, "tags": tags})
    if not entries:
        raise CommandError(f"{path}: no entries found")
    return entries


def _cmd_conversations(args: argparse.Namespace) -> int:
    create_tables()
    with session() as db:
        if args.action == "resume":
            if not update_where(db, ConversationState, [ConversationState.id == args.id,
                                                        ConversationState.handed_off_at.is_not(None)],
                                handed_off_at=None):
                raise CommandError(f"no conversation {args.id} waiting for a person (see: instaqueue conversations list)")
            db.commit()
            print(f"conversation {args.id}: automatic replies resumed")
            return 0
        rows = db.exec(select(ConversationState).where(ConversationState.handed_off_at.is_not(None))
                       .order_by(ConversationState.id)).all()
    _print_table(["id", "account", "conversation", "since", "reason"],
                 [[c.id, c.account_id, c.conversation_id[:30], _when(c.handed_off_at), (c.reason or "-")[:60]]
                  for c in rows])
    return 0


def _cmd_monitor(args: argparse.Namespace) -> int:
    create_tables()
    with session() as db:
        if args.action == "add":
            if db.get(Account, args.account) is None:
                raise CommandError(f"no account with id {args.account} (see: instaqueue accounts list)")
            new_id = insert_once(db, MonitoredPost, dict(account_id=args.account, media_id=args.media_id, active=True,
                                                         poll_interval=settings.comment_poll_interval,
                                                         next_poll_at=utcnow(), created_at=utcnow()))
            if new_id is None:
                update_where(db, MonitoredPost, [MonitoredPost.account_id == args.account,
                                                 MonitoredPost.media_id == args.media_id], active=True)
            db.commit()
            print(f"watching comments on media {args.media_id} for account {args.account}")
            return 0
        if args.action == "remove":
            if not update_where(db, MonitoredPost, [MonitoredPost.id == args.id], active=False):
                raise CommandError(f"no watched post with id {args.id} (see: instaqueue monitor list)")
            db.commit()
            print(f"no longer watching post {args.id}")
            return 0
        query = select(MonitoredPost).order_by(MonitoredPost.id)
        if args.account:
            query = query.where(MonitoredPost.account_id == args.account)
        rows = db.exec(query).all()
        counts = dict(db.exec(select(Comment.monitored_post_id, sa.func.count()).group_by(Comment.monitored_post_id)).all())
    _print_table(["id", "account", "media_id", "active", "interval_s", "next_poll", "comments"],
                 [[w.id, w.account_id, w.media_id, "yes" if w.active else "no", f"{w.poll_interval:.0f}",
                   _when(w.next_poll_at), counts.get(w.id, 0)] for w in rows])
    return 0


def _cmd_moderation(args: argparse.Namespace) -> int:
    create_tables()
    with session() as db:
        if args.action == "add":
            if db.get(Account, args.account) is None:
                raise CommandError(f"no account with id {args.account} (see: instaqueue accounts list)")
            if args.action_ in ("reply", "dm") and not args.text:
                raise CommandError(f"--action {args.action_} needs --text")
            kind, pattern = next((k, str(v)) for k, v in (
                ("block", args.block), ("regex", args.regex), ("mentions", args.mentions), ("repeats", args.repeats),
                ("links", "" if args.links else None)) if v is not None)
            rule = ModerationRule(account_id=args.account, kind=kind, pattern=pattern, action=args.action_, text=args.text)
            db.add(rule)
            db.commit()
            print(f"moderation rule {rule.id} added: {kind} {pattern} -> {rule.action}".rstrip())
            return 0
        query = select(ModerationRule).order_by(ModerationRule.id)
        if args.account:
            query = query.where(ModerationRule.account_id == args.account)
        rows = db.exec(query).all()
    _print_table(["id", "account", "kind", "pattern", "action", "text", "enabled"],
                 [[r.id, r.account_id, r.kind, r.pattern or "-", r.action, r.text or "-", "yes" if r.enabled else "no"]
                  for r in rows])
    return 0


def _check_posts_now(publish_at: datetime) -> None:
    """A post due before the next periodic check is queued right away."""
    if publish_at - utcnow() > timedelta(seconds=settings.scheduled_check_interval):
        return
    try:
        check_scheduled_posts.apply_async(retry=False)
    except Exception as exc:  # the broker is down: the periodic check will queue it
        print(f"note: could not reach the broker ({type(exc).__name__}); the next check will queue the post",
              file=sys.stderr)


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "worker": _cmd_celery, "run": _cmd_celery, "beat": _cmd_celery, "flower": _cmd_celery,
    "initdb": _cmd_initdb, "accounts": _cmd_accounts, "rules": _cmd_rules, "posts": _cmd_posts,
    "monitor": _cmd_monitor, "moderation": _cmd_moderation, "analytics": _cmd_analytics,
    "health": _cmd_health, "status": _cmd_status, "kb": _cmd_kb, "conversations": _cmd_conversations,
}

def _ig_id(value: str) -> str:
    if not re.fullmatch(r"[0-9]{1,30}", value.strip()):
        raise argparse.ArgumentTypeError("an Instagram user id is a number, e.g. 17841400000000000")
    return value.strip()


def _username(value: str) -> str:
    name = value.strip().removeprefix("@")
    if not re.fullmatch(r"[A-Za-z0-9._]{1,30}", name):
        raise argparse.ArgumentTypeError("an Instagram username has 1 to 30 letters, digits, dots or underscores")
    return name


def _token(value: str) -> str:
    if not value.strip() or any(ch.isspace() for ch in value.strip()):
        raise argparse.ArgumentTypeError("the access token is empty or contains spaces")
    return value.strip()


def _nonempty(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value.strip()


def _day(value: str) -> date:
    try:
        return date.fromisoformat(value.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date as YYYY-MM-DD, got {value[:40]!r}") from None


def _regex(value: str) -> str:
    if not value or len(value) > MAX_RULE_REGEX:
        raise argparse.ArgumentTypeError(f"a regular expression of 1 to {MAX_RULE_REGEX} characters")
    try:
        re.compile(value)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"not a valid regular expression: {exc}") from None
    return value


def _moment(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO 8601 time such as 2026-12-01T09:30:00+01:00, "
                                         f"got {value[:40]!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=settings.zone)


#: Ids and counts on the command line fit the database's integer column.
MAX_CLI_INT = 2**31 - 1


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= MAX_CLI_INT:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {MAX_CLI_INT}, got {value[:40]!r}")
    return number


def _match_words(value: str) -> str:
    words = [w.strip() for w in value.split(",") if normalize_text(w)]
    if not words:
        raise argparse.ArgumentTypeError("give at least one word or phrase, comma-separated")
    return ", ".join(words)


def _reply_text(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("the reply is empty")
    if len(value.encode()) > MAX_REPLY_BYTES:
        raise argparse.ArgumentTypeError(f"the reply is longer than {MAX_REPLY_BYTES} bytes")
    return value.strip()


def _when(value: datetime | None) -> str:
    return value.astimezone(settings.zone).strftime("%Y-%m-%d %H:%M:%S %Z") if value else "-"


def _print_table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    if not rows:
        print("(none)")
