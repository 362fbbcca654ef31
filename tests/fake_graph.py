"""A fake Instagram Graph API server for instaqueue's tests.

The tests run a real Celery worker in a subprocess. That worker calls this fake over loopback HTTP,
while the test process holds the ``FakeGraph`` object: it seeds state, injects faults and inspects
the calls it recorded. All state is in memory behind one ``threading.Lock``, so every public method
is safe to call from any thread while the server is answering requests.

The fake follows ``/work/shared/instagram-graph-api.md``: the same paths, payload shapes, headers
and error objects as Meta's Graph API (checked against the recorded bodies in
``/work/shared/ig-fixtures/``). Tokens come only as ``Authorization: Bearer <token>``; a token in the
query string is ignored, exactly like a missing one (except on ``/refresh_access_token``, where Meta
requires it there; the fake then records it in ``Call.token`` and redacts it from ``Call.query``).

Usage::

    from fake_graph import FakeGraph          # or: from tests.fake_graph import FakeGraph

    with FakeGraph() as graph:                # binds 127.0.0.1 on a free port
        graph.add_account("17841400000000001", "shop", token="tok-shop")
        graph.add_dm("17841400000000001", "9000001", "hi!", sender_username="alice")
        settings.graph_base_url = graph.url   # "http://127.0.0.1:PORT/v23.0"
        ...                                   # run the worker
        graph.fail(503, times=2, path_contains="/messages")     # inject faults
        graph.delay(2.0, method="POST")                         # effect first, answer late
        graph.rate_limit("17841400000000001", code=80002, minutes=5)
        graph.revoke_token("tok-shop")
        assert graph.sent_messages()[0]["text"] == "thanks"
        assert graph.calls_matching("GET", "/conversations")[0].token == "tok-shop"

        media_id = graph.add_media("17841400000000001", caption="new shoes")
        comment_id = graph.add_comment(media_id, "price?", username="bob")
        graph.add_comments(media_id, 10_000)                     # bulk seeding, fast
        graph.set_video_processing(checks=2)                     # videos: 2 reads IN_PROGRESS
        graph.set_publish_quota(total=50, used=49)               # one post left today
        graph.set_insights("17841400000000001", {"reach": 120, "follower_count": 1000})
        graph.fail_refresh("17841400000000001")                  # next token refresh: 190
        assert graph.published_media()[0]["caption"] == "hello"
        assert graph.comment(comment_id)["private_replies"] == ["see DM"]

Served endpoints (paths below ``/{version}``; parameters may come in the query string, a form
body or a JSON body, except ``access_token``):

* ``GET  /{ig-user-id}/conversations?platform=instagram&fields=...&limit=N[&after=C][&user_id=ID]``
* ``GET  /{conversation-id}?fields=messages`` (or ``messages{...}``, ``participants``, ...)
* ``GET  /{message-id}?fields=id,created_time,from,to,message``
* ``GET  /{ig-user-id}`` and ``GET /me`` (``id``, ``username``, ``followers_count``, ``media_count``)
* ``POST /{ig-user-id}/messages`` and ``POST /me/messages`` (Send API: text messages, and private
  replies with ``recipient: {"comment_id": ...}``)
* ``POST /{ig-user-id}/media`` (create a container), ``GET /{container-id}?fields=status_code,status``,
  ``POST /{ig-user-id}/media_publish?creation_id=...``,
  ``GET /{ig-user-id}/content_publishing_limit?fields=quota_usage,config``
* ``GET  /{ig-user-id}/media`` (newest first, stories excluded), ``GET /{ig-user-id}/stories``,
  ``GET /{ig-media-id}?fields=...``
* ``GET  /{ig-media-id}/comments``, ``GET /{ig-comment-id}[/replies]``,
  ``POST /{ig-comment-id}/replies?message=...``, ``POST /{ig-comment-id}?hide=true|false``,
  ``DELETE /{ig-comment-id}``
* ``GET  /{ig-user-id}/insights?metric=...&period=day[&metric_type=total_value][&since=&until=]``
* ``GET  /refresh_access_token?grant_type=ig_refresh_token&access_token=TOKEN`` (with or without the
  version prefix; the only endpoint that reads its token from the query string)

Anything else answers HTTP 400, code 100 "Unsupported get/post/... request".

Extending: add handler methods to ``FakeGraph`` (in a new section below the DM section) and rows
to ``ROUTES`` at the bottom of this file. A handler receives the parsed request and the regex match,
returns the JSON body (HTTP 200) and raises ``GraphError`` for Meta errors.
"""

from __future__ import annotations

import base64
import binascii
import copy
import itertools
import json
import re
import secrets
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit

__all__ = ["Call", "FakeGraph", "GraphError", "ROUTES", "Route", "format_time"]


# ----------------------------------------------------------------------------------------------
# Constants and small helpers
# ----------------------------------------------------------------------------------------------

META_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S+0000"

#: Only the 20 most recent messages of a conversation can be read.
MESSAGES_READABLE = 20
#: Default page size of the conversations edge.
DEFAULT_CONVERSATIONS_LIMIT = 25
#: Standard messaging window, and the HUMAN_AGENT tag's window.
MESSAGING_WINDOW = timedelta(hours=24)
HUMAN_AGENT_WINDOW = timedelta(days=7)
#: Instagram text messages are limited to 1000 bytes of UTF-8.
MAX_TEXT_BYTES = 1000

RATE_LIMIT_CODES = {4, 17, 32, 613}  # plus every 800xx business-use-case code

_RATE_LIMIT_MESSAGES = {
    4: "(#4) Application request limit reached",
    17: "(#17) User request limit reached",
    32: "(#32) Page request limit reached",
    613: "(#613) Calls to this api have exceeded the rate limit.",
    80002: "(#80002) There have been too many calls to this Instagram account. Wait a bit and try "
    "again. For more info, please refer to "
    "https://developers.facebook.com/docs/graph-api/overview/rate-limiting.",
    80006: "(#80006) There have been too many messenger api calls to this Page account. Wait a bit "
    "and try again. For more info, please refer to "
    "https://developers.facebook.com/docs/graph-api/overview/rate-limiting.",
}

_DEFAULT_APP_USAGE = {"call_count": 1, "total_cputime": 1, "total_time": 1}

# Content publishing -----------------------------------------------------------------------------

MAX_CAPTION_CHARS = 2200
CAROUSEL_MIN_CHILDREN, CAROUSEL_MAX_CHILDREN = 2, 10
#: The publishing quota counts media published through the API in this rolling window.
PUBLISH_WINDOW = timedelta(hours=24)
DEFAULT_PUBLISH_QUOTA = 50
DEFAULT_MEDIA_LIMIT = 25
#: Container kinds (``containers()[i]["kind"]``) and the media they publish as.
CONTAINER_KINDS = ("IMAGE", "VIDEO", "REELS", "STORIES", "CAROUSEL_ITEM", "CAROUSEL")
_MEDIA_TYPE_OF_KIND = {
    "IMAGE": "IMAGE", "VIDEO": "VIDEO", "REELS": "REELS", "STORIES": "STORY",
    "CAROUSEL": "CAROUSEL_ALBUM",
}
MEDIA_TYPES = ("IMAGE", "VIDEO", "REELS", "CAROUSEL_ALBUM", "STORY")
_PRODUCT_TYPE_OF_MEDIA_TYPE = {
    "IMAGE": "FEED", "VIDEO": "FEED", "CAROUSEL_ALBUM": "FEED", "REELS": "REELS", "STORY": "STORY",
}
_CONTAINER_STATUS_TEXT = {
    "IN_PROGRESS": "In Progress: Media is still being processed.",
    "FINISHED": "Finished: Media has been uploaded and it is ready to be published.",
    "ERROR": "Error: Media upload has failed with error code 2207026",
    "EXPIRED": "Expired: Media was not published within 24 hours of its creation.",
    "PUBLISHED": "Published: Media has been successfully published.",
}
_FINAL_VIDEO_STATUSES = ("FINISHED", "ERROR", "EXPIRED")

# Comments ----------------------------------------------------------------------------------------

DEFAULT_COMMENTS_LIMIT = 25
#: The comments and replies edges never answer more than 50 items per page.
MAX_COMMENTS_LIMIT = 50
#: Longest comment or reply the fake accepts (Instagram's caption limit).
MAX_COMMENT_CHARS = 2200

# Insights and tokens ------------------------------------------------------------------------------

#: Account metrics still served: name -> (title, description), as Meta labels them.
INSIGHT_METRICS: dict[str, tuple[str, str]] = {
    "reach": ("Accounts reached", "The number of unique accounts that have seen your content, at "
              "least once, including in ads."),
    "views": ("Views", "The number of times your content was played or displayed."),
    "accounts_engaged": ("Accounts engaged", "The number of accounts that have interacted with "
                         "your content, including in ads."),
    "total_interactions": ("Content interactions", "The total number of post interactions, story "
                           "interactions, reels interactions, video interactions and live video "
                           "interactions, including any interactions on boosted content."),
    "likes": ("Likes", "The number of likes on your posts, reels and videos."),
    "comments": ("Comments", "The number of comments on your posts, reels, videos and live videos."),
    "saves": ("Saves", "The number of saves of your posts, reels and videos."),
    "shares": ("Shares", "The number of shares of your posts, stories, reels, videos and live videos."),
    "follows_and_unfollows": ("Follows and unfollows", "The number of accounts that followed you "
                              "and the number of accounts that unfollowed you or left Instagram."),
    "profile_views": ("Profile views", "The number of times your profile was visited."),
    "follower_count": ("Follower Count", "Total number of unique accounts following this profile"),
}
#: Served only with metric_type=total_value (time-series profile_views is retired).
_TOTAL_VALUE_ONLY_METRICS = {"profile_views", "follows_and_unfollows"}
#: Always answered as a time series (``values``), whatever metric_type says.
_TIME_SERIES_METRICS = {"follower_count"}
#: Retired metrics (any of them fails the whole call with code 100).
RETIRED_METRICS = frozenset({
    "impressions", "plays", "website_clicks", "email_contacts", "phone_call_clicks",
    "text_message_clicks", "get_directions_clicks",
})
#: Meta's longest since..until range for insights.
MAX_INSIGHTS_RANGE = 30 * 86400
#: A refreshed long-lived token lasts about 60 days.
REFRESHED_TOKEN_EXPIRES_IN = 5183944
#: Paths served outside the /{version} prefix too (graph.instagram.com serves it there).
_UNVERSIONED_PATHS = {"/refresh_access_token"}
#: What replaces a token in recorded calls (Call.query / Call.response).
REDACTED = "[redacted]"

# Realistic-looking id prefixes (what Meta's base64-ish ids start with).
_MESSAGE_ID_PREFIX = "aWdfZAG1faXRlbToxOklHTWVzc2FnZAUlEOj"
_CONVERSATION_ID_PREFIX = "aWdfZAG06MTpJR01lc3NhZA2VUaHJlYWQ6"
_CURSOR_PREFIX = "AQH"  # base64 of it starts with "QVFI", like Meta's cursors


def format_time(dt: datetime) -> str:
    """Format a datetime like Meta does: ``2026-11-24T09:00:00+0000`` (always UTC)."""
    return _utc(dt).strftime(META_TIME_FORMAT)


def _utc(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _unb64(text: str) -> str:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


def _trace_id() -> str:
    return secrets.token_urlsafe(18)[:23]


# ----------------------------------------------------------------------------------------------
# Public records
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request the fake received (failed ones included)."""

    method: str
    path: str  # without the version prefix, e.g. "/1784/conversations"
    query: dict[str, str]
    body: Any  # parsed JSON (normally a dict), a form dict, or None
    token: str | None  # the bearer token, or None
    status: int
    time: float  # time.time() when received
    response: Any = None  # the JSON body answered (added for debugging; may be ignored)


class GraphError(Exception):
    """A Meta error object; raising it from a handler answers it."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        status: int = 400,
        subcode: int | None = None,
        is_transient: bool | None = None,
        error_type: str = "OAuthException",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.subcode = subcode
        self.is_transient = is_transient
        self.error_type = error_type
        self.headers = dict(headers or {})

    def body(self, fbtrace_id: str) -> dict:
        """``{"error": {"message", "type", "code", "error_subcode"?, "is_transient"?, "fbtrace_id"}}``"""
        error: dict[str, Any] = {"message": self.message, "type": self.error_type, "code": self.code}
        if self.subcode is not None:
            error["error_subcode"] = self.subcode
        if self.is_transient is not None:
            error["is_transient"] = self.is_transient
        error["fbtrace_id"] = fbtrace_id
        return {"error": error}


# Canned errors -------------------------------------------------------------------------------


def _unsupported_request(method: str) -> GraphError:
    return GraphError(
        100,
        f"Unsupported {method.lower()} request. Please read the Graph API documentation at "
        "https://developers.facebook.com/docs/graph-api",
    )


def _no_such_object(object_id: str, method: str = "GET") -> GraphError:
    return GraphError(
        100,
        f"Unsupported {method.lower()} request. Object with ID '{object_id}' does not exist, cannot "
        "be loaded due to missing permissions, or does not support this operation. Please read the "
        "Graph API documentation at https://developers.facebook.com/docs/graph-api",
        subcode=33,
    )


def _invalid_param(message: str) -> GraphError:
    return GraphError(100, f"(#100) {message}")


def _bad_token() -> GraphError:
    return GraphError(190, "Invalid OAuth access token - Cannot parse access token")


def _expired_token() -> GraphError:
    return GraphError(
        190,
        "Error validating access token: Session has expired. The current time is later than the "
        "token's expiry time.",
        subcode=463,
    )


def _bad_comment_text(name: str) -> GraphError:
    return _invalid_param(f"Length of param {name} must be less than or equal to {MAX_COMMENT_CHARS}")


def _revoked_token() -> GraphError:
    return GraphError(
        190,
        "Error validating access token: The session has been invalidated because the user changed "
        "their password or Facebook has changed the session for security reasons.",
        subcode=460,
    )


# ----------------------------------------------------------------------------------------------
# Field expansion: fields=id,updated_time,messages.limit(5){id,from,message}
# ----------------------------------------------------------------------------------------------


@dataclass
class _Field:
    name: str
    sub: dict[str, "_Field"] | None = None  # None = no {...} given
    limit: int | None = None


_NAME_RE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*")
_MODIFIER_RE = re.compile(r"\.([A-Za-z_]+)\(([^()]*)\)\s*")


def _parse_fields(text: str | None) -> dict[str, _Field] | None:
    """Parse a ``fields`` parameter; None when absent or empty (meaning: the node's defaults)."""
    if text is None or not text.strip():
        return None
    pos = 0

    def syntax_error(expected: str) -> GraphError:
        return GraphError(
            2500, f'Syntax error "Expected {expected}." at character {pos}: {text}'
        )

    def parse_list(closing: str | None) -> dict[str, _Field]:
        nonlocal pos
        fields: dict[str, _Field] = {}
        while True:
            m = _NAME_RE.match(text, pos)
            if not m:
                raise syntax_error("field name")
            pos = m.end()
            f = _Field(m.group(1))
            while (m := _MODIFIER_RE.match(text, pos)) is not None:
                pos = m.end()
                if m.group(1) != "limit" or not m.group(2).strip().isdigit():
                    raise _invalid_param(f"Unsupported field modifier .{m.group(1)}({m.group(2)})")
                f.limit = int(m.group(2))
            if text.startswith("{", pos):
                pos += 1
                f.sub = parse_list("}")
                if not text.startswith("}", pos):
                    raise syntax_error('"}"')
                pos += 1
                while pos < len(text) and text[pos].isspace():
                    pos += 1
            fields[f.name] = f
            if text.startswith(",", pos):
                pos += 1
                continue
            if closing is None and pos != len(text):
                raise syntax_error("end of string")
            return fields

    return parse_list(None)


def _check_fields(fields: dict[str, _Field], allowed: set[str], node_type: str) -> None:
    for name in fields:
        if name not in allowed:
            raise _invalid_param(
                f"Tried accessing nonexisting field ({name}) on node type ({node_type})"
            )


# ----------------------------------------------------------------------------------------------
# In-memory state
# ----------------------------------------------------------------------------------------------


@dataclass
class _Account:
    id: str
    username: str


@dataclass
class _Message:
    id: str
    conversation_id: str
    seq: int  # insertion order; breaks created_time ties
    created: datetime
    from_id: str
    from_username: str
    to_id: str
    to_username: str
    text: str

    @property
    def sort_key(self) -> tuple[datetime, int]:
        return (self.created, self.seq)


@dataclass
class _Conversation:
    id: str
    account_id: str
    person_id: str
    person_username: str
    messages: list[_Message] = field(default_factory=list)  # oldest first

    @property
    def updated(self) -> datetime:
        return self.messages[-1].created

    @property
    def sort_key(self) -> tuple[datetime, int]:
        return self.messages[-1].sort_key

    def readable(self) -> list[_Message]:
        """The 20 most recent messages, newest first."""
        return list(reversed(self.messages[-MESSAGES_READABLE:]))

    def add(self, msg: _Message) -> None:
        self.messages.append(msg)
        self.messages.sort(key=lambda m: m.sort_key)


@dataclass
class _Container:
    """A media container (``POST /{ig-user-id}/media``)."""

    id: str
    account_id: str
    kind: str  # one of CONTAINER_KINDS
    urls: list[str]  # its media URL, or a carousel's children's URLs
    caption: str
    created: datetime
    is_video: bool
    children: list[str]  # CAROUSEL: child container ids
    status_code: str  # IN_PROGRESS | FINISHED | ERROR | EXPIRED | PUBLISHED
    status: str
    reads_left: int = 0  # IN_PROGRESS: status reads still answered IN_PROGRESS
    final_code: str = "FINISHED"  # IN_PROGRESS: what it becomes afterwards
    final_status: str = ""
    media_id: str | None = None  # PUBLISHED: the media it became


@dataclass
class _Comment:
    id: str
    media_id: str
    seq: int
    text: str
    username: str
    from_id: str
    timestamp: datetime
    parent_id: str | None = None
    hidden: bool = False
    deleted: bool = False
    like_count: int = 0
    replies: list["_Comment"] = field(default_factory=list)  # insertion order
    private_replies: list[str] = field(default_factory=list)

    @property
    def sort_key(self) -> tuple[datetime, int]:
        return (self.timestamp, self.seq)

    def reply_listing(self) -> list["_Comment"]:
        """Live replies, newest first."""
        return sorted((r for r in self.replies if not r.deleted), key=lambda r: r.sort_key,
                      reverse=True)


@dataclass
class _Media:
    id: str
    account_id: str
    seq: int
    media_type: str  # one of MEDIA_TYPES
    caption: str
    timestamp: datetime
    shortcode: str
    media_url: str
    container_id: str | None  # None for add_media() (posted outside the API)
    like_count: int = 0
    comments: list[_Comment] = field(default_factory=list)  # top-level, insertion order
    # (live top-level comments newest first, {id: index}); rebuilt after a change
    _listing: tuple[list[_Comment], dict[str, int]] | None = field(default=None, repr=False)

    @property
    def sort_key(self) -> tuple[datetime, int]:
        return (self.timestamp, self.seq)

    @property
    def permalink(self) -> str:
        return f"https://www.instagram.com/p/{self.shortcode}/"

    def listing(self) -> tuple[list[_Comment], dict[str, int]]:
        if self._listing is None:
            items = sorted((c for c in self.comments if not c.deleted), key=lambda c: c.sort_key,
                           reverse=True)
            self._listing = (items, {c.id: i for i, c in enumerate(items)})
        return self._listing

    def changed(self) -> None:
        self._listing = None

    def comments_count(self) -> int:
        return sum(1 + sum(not r.deleted for r in c.replies) for c in self.listing()[0])


@dataclass
class _Fault:
    kind: str  # "fail" | "delay" | "rate_limit" | "respond"
    remaining: int | None  # None = until clear_faults()
    method: str | None = None
    path_contains: str | None = None
    account_id: str | None = None  # rate_limit: matches calls for this account
    error: GraphError | None = None  # fail / rate_limit
    seconds: float = 0.0  # delay
    body: Any = None  # respond: the raw body answered instead of the real one
    status: int = 200  # respond

    def matches(self, method: str, path: str, account_id: str | None) -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        if self.path_contains is not None and self.path_contains not in path:
            return False
        if self.account_id is not None and self.account_id != account_id:
            return False
        return True


@dataclass
class _Request:
    method: str
    path: str  # without version prefix
    query: dict[str, str]
    body: Any
    token: str | None
    account: _Account | None = None  # the token's owner, set once authenticated


# ----------------------------------------------------------------------------------------------
# The fake
# ----------------------------------------------------------------------------------------------


class FakeGraph:
    """In-memory Instagram Graph API served over loopback HTTP. See the module docstring."""

    def __init__(self, version: str = "v23.0"):
        self.version = version
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        with self._lock:
            self._reset_locked()

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "FakeGraph":
        """Bind 127.0.0.1 on a free port and serve in a daemon thread. Returns self."""
        with self._lock:
            if self._server is not None:
                return self
            server = _Server(self)
            self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"FakeGraph:{server.server_address[1]}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; open keep-alive connections are closed and pending delays cut short."""
        with self._lock:
            server, self._server = self._server, None
            thread, self._thread = self._thread, None
        if server is None:
            return
        server.stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> "FakeGraph":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        server = self._server  # no lock: handlers call this while holding it
        if server is None:
            raise RuntimeError("FakeGraph is not started")
        return server.server_address[1]

    @property
    def url(self) -> str:
        """Base URL including the version, e.g. ``http://127.0.0.1:PORT/v23.0``."""
        return f"http://127.0.0.1:{self.port}/{self.version}"

    def reset(self) -> None:
        """Forget all state, faults, revoked tokens, usage overrides and calls."""
        with self._lock:
            self._reset_locked()

    def _reset_locked(self) -> None:
        self._accounts: dict[str, _Account] = {}
        self._tokens: dict[str, str] = {}  # token -> account id
        self._revoked: set[str] = set()
        self._conversations: dict[str, _Conversation] = {}
        self._conversation_index: dict[tuple[str, str], str] = {}  # (account, person) -> conv id
        self._messages: dict[str, _Message] = {}
        self._sent: list[dict] = []
        self._faults: list[_Fault] = []
        self._calls: list[Call] = []
        self._app_usage: dict | None = None
        self._business_usage: dict[str, list[dict]] | None = None
        # publishing, comments, profile, insights, tokens
        self._containers: dict[str, _Container] = {}
        self._media: dict[str, _Media] = {}
        self._comments: dict[str, _Comment] = {}
        self._people: dict[str, str] = {}  # commenter username -> their id
        self._video_processing: tuple[int, str, str | None] = (0, "FINISHED", None)
        self._quota_total = DEFAULT_PUBLISH_QUOTA
        self._quota_used = 0
        self._profiles: dict[str, dict[str, int]] = {}
        self._insights: dict[str, dict[str, int]] = {}
        self._refresh_failures: dict[str, int | None] = {}  # account -> refreshes left to fail
        self._refreshed: dict[str, list[str]] = {}

    # --- state --------------------------------------------------------------------------------

    def add_account(self, ig_user_id: str, username: str, token: str) -> None:
        """Add an Instagram professional account reachable with ``token``.

        Adding an existing account again updates its username and adds ``token`` as a further
        valid token (its conversations stay).
        """
        ig_user_id = str(ig_user_id)
        with self._lock:
            owner = self._tokens.get(token)
            if owner is not None and owner != ig_user_id:
                raise ValueError(f"token already belongs to account {owner}")
            self._accounts[ig_user_id] = _Account(ig_user_id, username)
            self._tokens[token] = ig_user_id

    def add_dm(
        self,
        account_ig_id: str,
        sender_id: str,
        text: str,
        *,
        sender_username: str = "someone",
        created_time: datetime | None = None,
    ) -> str:
        """A person (``sender_id``, an IGSID) writes to the account. Returns the new message id.

        Creates or reuses the conversation between the account and that sender; the
        conversation's updated_time becomes the latest message's created_time (default now, UTC).
        """
        account_ig_id, sender_id = str(account_ig_id), str(sender_id)
        created = _utc(created_time) if created_time is not None else _now()
        with self._lock:
            account = self._accounts.get(account_ig_id)
            if account is None:
                raise KeyError(f"unknown account {account_ig_id}; call add_account first")
            conv = self._conversation_for(account_ig_id, sender_id, sender_username)
            if sender_username != "someone":  # a later plain add_dm keeps the known username
                conv.person_username = sender_username
            msg = self._new_message(
                conv, created, sender_id, conv.person_username, account.id, account.username, text
            )
            self._cond.notify_all()
            return msg.id

    def conversation_id(self, account_ig_id: str, sender_id: str) -> str | None:
        """The id of the conversation between the account and that person, if any."""
        with self._lock:
            return self._conversation_index.get((str(account_ig_id), str(sender_id)))

    def sent_messages(self, account_ig_id: str | None = None) -> list[dict]:
        """Messages delivered through the Send API, in order.

        Each: ``{"recipient_id", "text", "message_id", "time" (datetime UTC), "account_ig_id"}``.
        """
        with self._lock:
            return [
                dict(m) for m in self._sent
                if account_ig_id is None or m["account_ig_id"] == str(account_ig_id)
            ]

    @property
    def calls(self) -> list[Call]:
        """A copy of every request received so far, in the order they were answered."""
        with self._lock:
            return copy.deepcopy(self._calls)

    def calls_matching(self, method: str | None = None, path_contains: str | None = None) -> list[Call]:
        with self._lock:
            return copy.deepcopy(
                [c for c in self._calls if _call_matches(c, method, path_contains)]
            )

    def wait_for_calls(
        self, count: int = 1, *, method: str | None = None, path_contains: str | None = None,
        timeout: float = 5.0,
    ) -> list[Call]:
        """Block until at least ``count`` matching calls were answered; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [c for c in self._calls if _call_matches(c, method, path_contains)]
                if len(found) >= count:
                    return copy.deepcopy(found)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"expected {count} calls matching {method} {path_contains!r}, got {len(found)}"
                    )
                self._cond.wait(remaining)

    def wait_for_sent(
        self, count: int = 1, *, account_ig_id: str | None = None, timeout: float = 5.0
    ) -> list[dict]:
        """Block until at least ``count`` messages were delivered; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [
                    dict(m) for m in self._sent
                    if account_ig_id is None or m["account_ig_id"] == str(account_ig_id)
                ]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"expected {count} sent messages, got {len(found)}")
                self._cond.wait(remaining)

    # --- state: content publishing -----------------------------------------------------------

    def set_video_processing(
        self, checks: int = 0, final: str = "FINISHED", status: str | None = None
    ) -> None:
        """How video containers (VIDEO, REELS, video STORIES and video carousel items) created
        AFTER this call are processed.

        The first ``checks`` status reads (``GET /{container-id}`` asking for ``status_code`` or
        ``status``) answer ``IN_PROGRESS``; right after the last of them the container becomes
        ``final`` (FINISHED, ERROR or EXPIRED), so the next read and ``media_publish`` see it.
        ``checks=0`` (the default): final at once. ``status`` overrides the final ``status`` text
        (default for ERROR: "Error: Media upload has failed with error code 2207026"). Image
        containers are always FINISHED at once. ``reset()`` restores the defaults.
        """
        final = final.upper()
        if final not in _FINAL_VIDEO_STATUSES:
            raise ValueError(f"final must be one of {_FINAL_VIDEO_STATUSES}, got {final!r}")
        if checks < 0:
            raise ValueError("checks must be >= 0")
        with self._lock:
            self._video_processing = (int(checks), final, status)

    def set_publish_quota(self, total: int = 50, used: int = 0) -> None:
        """Every account's publishing quota: ``quota_total`` = ``total`` posts per 24 h, and
        ``quota_usage`` = media it published through the API in the last 24 h + ``used``.
        ``media_publish`` answers code 9 subcode 2207042 once quota_usage >= quota_total."""
        if total < 0 or used < 0:
            raise ValueError("total and used must be >= 0")
        with self._lock:
            self._quota_total, self._quota_used = int(total), int(used)

    def add_media(
        self, account_ig_id: str, *, caption: str = "", timestamp: datetime | None = None,
        media_type: str = "IMAGE",
    ) -> str:
        """A media the account posted (outside the API: it does not count against the publishing
        quota). Returns its id; it is listed, readable and commentable like a published one, and
        appears in ``published_media()`` with ``container_id`` None. ``media_type=STORY`` is
        listed by ``/stories`` instead of ``/media``."""
        account_ig_id = str(account_ig_id)
        if media_type not in MEDIA_TYPES:
            raise ValueError(f"media_type must be one of {MEDIA_TYPES}, got {media_type!r}")
        created = _utc(timestamp) if timestamp is not None else _now()
        with self._lock:
            self._require_account(account_ig_id)
            return self._new_media(account_ig_id, media_type, caption, created, None).id

    def published_media(self, account_ig_id: str | None = None) -> list[dict]:
        """Every media (published through the API or added with ``add_media``), oldest first.

        Each: ``{"media_id", "container_id" (None for add_media), "caption", "media_type",
        "time" (datetime UTC), "permalink", "account_ig_id"}``.
        """
        with self._lock:
            return [
                {"media_id": m.id, "container_id": m.container_id, "caption": m.caption,
                 "media_type": m.media_type, "time": m.timestamp, "permalink": m.permalink,
                 "account_ig_id": m.account_id}
                for m in sorted(self._media.values(), key=lambda m: m.seq)
                if account_ig_id is None or m.account_id == str(account_ig_id)
            ]

    def containers(self, account_ig_id: str | None = None) -> list[dict]:
        """Every container created through the API, oldest first.

        Each: ``{"container_id", "kind" (IMAGE, VIDEO, REELS, STORIES, CAROUSEL_ITEM, CAROUSEL),
        "status_code", "caption", "urls" (list), "account_ig_id", "created" (datetime UTC)}``.
        """
        with self._lock:
            return [
                {"container_id": c.id, "kind": c.kind, "status_code": c.status_code,
                 "caption": c.caption, "urls": list(c.urls), "account_ig_id": c.account_id,
                 "created": c.created}
                for c in self._containers.values()
                if account_ig_id is None or c.account_id == str(account_ig_id)
            ]

    # --- state: comments ----------------------------------------------------------------------

    def add_comment(
        self, media_id: str, text: str, *, username: str = "someone", from_id: str | None = None,
        parent_id: str | None = None, timestamp: datetime | None = None,
    ) -> str:
        """Someone comments on a media (or replies to comment ``parent_id`` of that media).
        Returns the comment id.

        ``from_id`` defaults to an id the fake keeps per username. Instagram threads are one level
        deep: a reply to a reply becomes a reply to its top-level comment. Default timestamp: now.
        """
        created = _utc(timestamp) if timestamp is not None else _now()
        with self._lock:
            media, parent = self._comment_target(str(media_id), parent_id)
            return self._new_comment(media, text, username, from_id, parent, created).id

    def add_comments(
        self, media_id: str, count: int, *, text_fn: Callable[[int], str] = lambda i: f"comment {i}",
        username: str = "someone", from_id: str | None = None, parent_id: str | None = None,
        timestamp: datetime | None = None,
    ) -> list[str]:
        """Bulk ``add_comment``: ``count`` comments with texts ``text_fn(0..count-1)``, added in that
        order (so the last one is the newest; equal timestamps keep insertion order). Returns ids."""
        created = _utc(timestamp) if timestamp is not None else _now()
        with self._lock:
            media, parent = self._comment_target(str(media_id), parent_id)
            return [
                self._new_comment(media, text_fn(i), username, from_id, parent, created).id
                for i in range(count)
            ]

    def comment(self, comment_id: str) -> dict:
        """What Instagram knows of a comment (deleted ones included); KeyError if unknown.

        ``{"id", "media_id", "text", "username", "from_id", "hidden", "deleted", "parent_id",
        "timestamp" (datetime UTC), "replies" (texts of the live replies by the media's account,
        oldest first), "private_replies" (texts, in order)}``.
        """
        with self._lock:
            c = self._comments.get(str(comment_id))
            if c is None:
                raise KeyError(f"unknown comment {comment_id}")
            owner = self._media[c.media_id].account_id
            return {
                "id": c.id, "media_id": c.media_id, "text": c.text, "username": c.username,
                "from_id": c.from_id, "hidden": c.hidden, "deleted": c.deleted,
                "parent_id": c.parent_id, "timestamp": c.timestamp,
                "replies": [r.text for r in c.replies if r.from_id == owner and not r.deleted],
                "private_replies": list(c.private_replies),
            }

    # --- state: profile, insights, tokens -----------------------------------------------------

    def set_profile(
        self, account_ig_id: str, *, followers_count: int | None = None,
        media_count: int | None = None,
    ) -> None:
        """Values of ``GET /{ig-user-id}?fields=followers_count,media_count``; None keeps the
        current one. Defaults: followers_count 0, media_count = the account's media the fake knows
        (stories excluded)."""
        account_ig_id = str(account_ig_id)
        with self._lock:
            self._require_account(account_ig_id)
            profile = self._profiles.setdefault(account_ig_id, {})
            if followers_count is not None:
                profile["followers_count"] = int(followers_count)
            if media_count is not None:
                profile["media_count"] = int(media_count)

    def set_insights(self, account_ig_id: str, metrics: dict[str, int]) -> None:
        """Values served by ``GET /{ig-user-id}/insights`` (merged into earlier ones). Names must be
        served metrics (``INSIGHT_METRICS``); a metric never set has no data and is left out of
        the answer, as Meta does."""
        account_ig_id = str(account_ig_id)
        unknown = set(metrics) - set(INSIGHT_METRICS)
        if unknown:
            raise ValueError(f"not served metrics: {sorted(unknown)}")
        with self._lock:
            self._require_account(account_ig_id)
            self._insights.setdefault(account_ig_id, {}).update(
                {name: int(value) for name, value in metrics.items()}
            )

    def refreshed_tokens(self, account_ig_id: str) -> list[str]:
        """The tokens ``/refresh_access_token`` issued for the account, in order."""
        with self._lock:
            return list(self._refreshed.get(str(account_ig_id), []))

    # --- faults -------------------------------------------------------------------------------

    def fail(
        self,
        status: int = 500,
        *,
        code: int | None = None,
        subcode: int | None = None,
        message: str = "An unexpected error has occurred. Please retry your request later.",
        is_transient: bool | None = None,
        times: int | None = 1,
        method: str | None = None,
        path_contains: str | None = None,
        headers: dict[str, str] | None = None,
        error_type: str = "OAuthException",
    ) -> None:
        """The next ``times`` matching requests (None = until clear_faults) answer Meta's error.

        ``code`` defaults to 2 (Meta's "unexpected error, retry") for 5xx, 4 for 429 and 100
        otherwise; ``is_transient`` defaults to True for 5xx and is left out otherwise. The
        request has no effect. ``headers`` are added to (or override) the response headers.
        """
        if code is None:
            code = 2 if status >= 500 else 4 if status == 429 else 100
        if is_transient is None and status >= 500:
            is_transient = True
        error = GraphError(
            code, message, status=status, subcode=subcode, is_transient=is_transient,
            error_type=error_type, headers=headers,
        )
        self._add_fault(_Fault("fail", _times(times), method, path_contains, error=error))

    def delay(
        self, seconds: float, *, times: int | None = 1, method: str | None = None,
        path_contains: str | None = None,
    ) -> None:
        """Answer the next matching requests only after ``seconds``.

        The request takes effect BEFORE the delay (a sent message is delivered and recorded at
        once; only the answer is late): "Instagram did it, but the answer never reached us".
        """
        self._add_fault(
            _Fault("delay", _times(times), method, path_contains, seconds=float(seconds))
        )

    def respond(
        self, body: Any, *, status: int = 200, times: int | None = 1, method: str | None = None,
        path_contains: str | None = None,
    ) -> None:
        """Answer the next matching requests with ``body`` (any JSON value, or ``bytes`` sent
        as they are) instead of the real answer, and without effect: for malformed payloads."""
        self._add_fault(
            _Fault("respond", _times(times), method, path_contains, body=body, status=status)
        )

    def rate_limit(
        self, account_ig_id: str, *, code: int = 80002, minutes: int = 5, times: int | None = 1,
        status: int = 400,
    ) -> None:
        """The next ``times`` calls for that account (by path id or token owner) answer Meta's
        rate-limit error with X-Business-Use-Case-Usage call_count 100 and
        estimated_time_to_regain_access = ``minutes`` (code 4 also sets X-App-Usage to 100)."""
        if code not in RATE_LIMIT_CODES and not 80000 <= code <= 80099:
            raise ValueError(f"{code} is not a rate-limit code (4, 17, 32, 613, 800xx)")
        account_ig_id = str(account_ig_id)
        message = _RATE_LIMIT_MESSAGES.get(
            code,
            f"(#{code}) There have been too many calls to this Instagram account. Wait a bit and "
            "try again.",
        )
        usage_type = "messenger" if code == 80006 else "instagram"
        business = {account_ig_id: [{
            "type": usage_type, "call_count": 100, "total_cputime": 1, "total_time": 1,
            "estimated_time_to_regain_access": int(minutes),
        }]}
        headers = {"X-Business-Use-Case-Usage": json.dumps(business)}
        if code == 4:
            headers["X-App-Usage"] = json.dumps(
                {"call_count": 100, "total_cputime": 1, "total_time": 1}
            )
        error = GraphError(code, message, status=status, is_transient=True, headers=headers)
        self._add_fault(_Fault("rate_limit", _times(times), account_id=account_ig_id, error=error))

    def set_usage(
        self, *, app: dict | None = None, business: dict[str, list[dict]] | None = None
    ) -> None:
        """Set the X-App-Usage / X-Business-Use-Case-Usage values sent on every response.

        An argument left as None keeps its current setting; ``reset_usage()`` (or ``reset()``)
        goes back to the defaults: app ``{"call_count": 1, ...}``, business usage for the account
        concerned with small numbers and estimated_time_to_regain_access 0.
        """
        with self._lock:
            if app is not None:
                self._app_usage = copy.deepcopy(app)
            if business is not None:
                self._business_usage = copy.deepcopy(business)

    def reset_usage(self) -> None:
        with self._lock:
            self._app_usage = None
            self._business_usage = None

    def revoke_token(self, token: str) -> None:
        """From now on (until clear_faults/reset), calls with ``token`` answer HTTP 400 code 190
        subcode 460, like an invalidated token."""
        with self._lock:
            self._revoked.add(token)

    def fail_refresh(self, account_ig_id: str, times: int | None = 1) -> None:
        """The next ``times`` token refreshes for that account (None = until clear_faults) answer
        HTTP 400 code 190 subcode 463 (session expired); the token in use keeps working."""
        with self._lock:
            self._refresh_failures[str(account_ig_id)] = _times(times)

    def clear_faults(self) -> None:
        """Drop every pending fail/delay/rate_limit/fail_refresh fault and token revocation."""
        with self._lock:
            self._faults.clear()
            self._revoked.clear()
            self._refresh_failures.clear()

    def _add_fault(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    # --- request pipeline (called from server threads) ----------------------------------------

    def _dispatch(
        self, method: str, raw_path: str, raw_query: str, headers: Any, raw_body: bytes
    ) -> tuple[int, dict[str, str], Any, float]:
        """Handle one request; returns (status, headers, JSON body, delay in seconds)."""
        received = time.time()
        prefix = f"/{self.version}"
        versioned = raw_path == prefix or raw_path.startswith(prefix + "/")
        path = raw_path[len(prefix):] or "/" if versioned else raw_path
        query = dict(parse_qsl(raw_query, keep_blank_values=True))
        body = _parse_body(headers.get("Content-Type", ""), raw_body)
        token = _bearer_token(headers.get("Authorization"))
        recorded_query = dict(query)
        token_in_query = path in _UNVERSIONED_PATHS
        if token_in_query:  # /refresh_access_token: Meta wants the token in the query string
            token = query.get("access_token")
            if "access_token" in recorded_query:
                recorded_query["access_token"] = REDACTED
        req = _Request(method, path, query, body, token)
        trace_id = _trace_id()
        delay = 0.0
        with self._lock:
            owner = self._account_for_token(token)
            usage_account = self._usage_account(path, owner)
            fault = self._take_fault(method, path, usage_account)
            extra_headers: dict[str, str] = {}
            try:
                if fault is not None and fault.error is not None:
                    raise fault.error
                if fault is not None:
                    delay = fault.seconds
                if fault is not None and fault.kind == "respond":
                    status, payload = fault.status, copy.deepcopy(fault.body)
                elif not versioned and path not in _UNVERSIONED_PATHS:
                    raise GraphError(
                        100, f"Unsupported {method.lower()} request. This fake Graph API serves "
                        f"/{self.version} only, got {raw_path}",
                    )
                else:
                    status, payload = 200, self._route(req)
            except GraphError as err:
                status, payload = err.status, err.body(trace_id)
                extra_headers = err.headers
            except Exception:  # a bug in the fake: answer like Meta's unknown error, and say so
                traceback.print_exc(file=sys.stderr)
                status = 500
                payload = GraphError(1, "An unknown error has occurred.", status=500,
                                     is_transient=False).body(trace_id)
            response_headers = self._standard_headers(usage_account, trace_id)
            response_headers.update(extra_headers)
            recorded_response = copy.deepcopy(payload)
            if token_in_query and isinstance(recorded_response, dict) \
                    and "access_token" in recorded_response:
                recorded_response["access_token"] = REDACTED  # see refreshed_tokens()
            self._calls.append(Call(
                method=method, path=path, query=recorded_query, body=copy.deepcopy(body),
                token=token, status=status, time=received, response=recorded_response,
            ))
            self._cond.notify_all()
        return status, response_headers, payload, delay

    def _route(self, req: _Request) -> Any:
        for route in ROUTES:
            m = route.pattern.fullmatch(req.path)
            if m is None or route.method != req.method:
                continue
            if route.auth:
                req.account = self._authenticate(req.token)
            return route.handler(self, req, m)
        self._authenticate(req.token)
        raise _unsupported_request(req.method)

    def _authenticate(self, token: str | None) -> _Account:
        if token is not None and token in self._revoked:
            raise _revoked_token()
        account = self._account_for_token(token)
        if account is None:
            raise _bad_token()
        return account

    def _account_for_token(self, token: str | None) -> _Account | None:
        if token is None or token not in self._tokens:
            return None
        return self._accounts.get(self._tokens[token])

    def _usage_account(self, path: str, owner: _Account | None) -> str | None:
        """The business object a call concerns: the account in the path, else the owner of the
        object in the path, else the token's owner."""
        first = path.strip("/").split("/", 1)[0]
        if first in self._accounts:
            return first
        if first in self._conversations:
            return self._conversations[first].account_id
        if first in self._messages:
            return self._conversations[self._messages[first].conversation_id].account_id
        if first in self._containers:
            return self._containers[first].account_id
        if first in self._media:
            return self._media[first].account_id
        if first in self._comments:
            return self._media[self._comments[first].media_id].account_id
        return owner.id if owner is not None else None

    def _take_fault(self, method: str, path: str, account_id: str | None) -> _Fault | None:
        for fault in self._faults:
            if fault.matches(method, path, account_id):
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                return fault
        return None

    def _standard_headers(self, account_id: str | None, trace_id: str) -> dict[str, str]:
        app = self._app_usage if self._app_usage is not None else _DEFAULT_APP_USAGE
        if self._business_usage is not None:
            business = self._business_usage
        elif account_id is not None:
            business = {account_id: [{
                "type": "instagram", "call_count": 1, "total_cputime": 1, "total_time": 1,
                "estimated_time_to_regain_access": 0,
            }]}
        else:
            business = {}
        return {
            "Content-Type": "application/json; charset=UTF-8",
            "x-fb-trace-id": trace_id,
            "x-fb-rev": "1000000",
            "facebook-api-version": self.version,
            "Cache-Control": "private, no-cache, no-store, must-revalidate",
            "X-App-Usage": json.dumps(app),
            "X-Business-Use-Case-Usage": json.dumps(business),
        }

    # --- shared lookups for handlers (lock held) ----------------------------------------------

    def _account_in_path(self, req: _Request, ig_id: str, method: str = "GET") -> _Account:
        """The account named in the path ("me" = the token's owner); the token must own it."""
        assert req.account is not None
        if ig_id == "me" or ig_id == req.account.id:
            return req.account
        raise _no_such_object(ig_id, method)

    def _conversation_for(self, account_id: str, person_id: str, person_username: str) -> _Conversation:
        conv_id = self._conversation_index.get((account_id, person_id))
        if conv_id is not None:
            return self._conversations[conv_id]
        conv_id = _CONVERSATION_ID_PREFIX + _b64(
            f"{account_id}:{person_id}:{next(self._ids)}:{secrets.randbits(40)}"
        )
        conv = _Conversation(conv_id, account_id, person_id, person_username)
        self._conversations[conv_id] = conv
        self._conversation_index[(account_id, person_id)] = conv_id
        return conv

    def _new_message(
        self, conv: _Conversation, created: datetime, from_id: str, from_username: str,
        to_id: str, to_username: str, text: str,
    ) -> _Message:
        seq = next(self._ids)
        msg_id = _MESSAGE_ID_PREFIX + _b64(
            f"{conv.account_id}:{seq}{secrets.randbits(64):020d}"
        ) + "ZDZD"
        msg = _Message(msg_id, conv.id, seq, created, from_id, from_username, to_id, to_username, text)
        conv.add(msg)
        self._messages[msg_id] = msg
        return msg

    def _require_account(self, account_id: str) -> _Account:
        account = self._accounts.get(account_id)
        if account is None:
            raise KeyError(f"unknown account {account_id}; call add_account first")
        return account

    def _numeric_id(self) -> str:
        """A fresh numeric id like Meta's media/comment/container ids ("17889455560051444")."""
        while True:
            object_id = str(17_900_000_000_000_000 + next(self._ids) * 1000 + secrets.randbelow(1000))
            if object_id not in self._accounts:
                return object_id

    def _new_container(
        self, account_id: str, kind: str, urls: list[str], caption: str, is_video: bool,
        children: list[str],
    ) -> _Container:
        container = _Container(
            self._numeric_id(), account_id, kind, urls, caption, _now(), is_video, children,
            "FINISHED", _CONTAINER_STATUS_TEXT["FINISHED"],
        )
        if is_video:
            checks, final, status = self._video_processing
            container.final_code = final
            container.final_status = status or _CONTAINER_STATUS_TEXT[final]
            container.reads_left = checks
            if checks > 0:
                container.status_code = "IN_PROGRESS"
                container.status = _CONTAINER_STATUS_TEXT["IN_PROGRESS"]
            else:
                container.status_code, container.status = final, container.final_status
        self._containers[container.id] = container
        return container

    def _new_media(
        self, account_id: str, media_type: str, caption: str, created: datetime,
        container_id: str | None,
    ) -> _Media:
        media_id = self._numeric_id()
        extension = "jpg" if media_type in ("IMAGE", "CAROUSEL_ALBUM") else "mp4"
        media = _Media(
            media_id, account_id, next(self._ids), media_type, caption, created,
            shortcode="C" + secrets.token_urlsafe(8)[:10],
            media_url=f"https://scontent.cdninstagram.com/v/t51.29350-15/{media_id}_n.{extension}",
            container_id=container_id,
        )
        self._media[media_id] = media
        self._cond.notify_all()
        return media

    def _person_id(self, username: str) -> str:
        """A stable id per commenter username (below _numeric_id's range)."""
        person_id = self._people.get(username)
        if person_id is None:
            person_id = self._people[username] = str(
                17_841_000_000_000_000 + secrets.randbelow(10**10) * 1000 + next(self._ids) % 1000
            )
        return person_id

    def _comment_target(self, media_id: str, parent_id: str | None) -> tuple[_Media, _Comment | None]:
        media = self._media.get(media_id)
        if media is None:
            raise KeyError(f"unknown media {media_id}; call add_media first")
        if parent_id is None:
            return media, None
        parent = self._comments.get(str(parent_id))
        if parent is None or parent.media_id != media_id:
            raise KeyError(f"no comment {parent_id} on media {media_id}")
        if parent.deleted:
            raise ValueError(f"comment {parent_id} is deleted")
        return media, self._comments[parent.parent_id] if parent.parent_id else parent

    def _new_comment(
        self, media: _Media, text: str, username: str, from_id: str | None,
        parent: _Comment | None, created: datetime,
    ) -> _Comment:
        comment = _Comment(
            self._numeric_id(), media.id, next(self._ids), text, username,
            str(from_id) if from_id is not None else self._person_id(username), created,
            parent_id=parent.id if parent is not None else None,
        )
        self._comments[comment.id] = comment
        if parent is None:
            media.comments.append(comment)
            media.changed()
        else:
            parent.replies.append(comment)
        self._cond.notify_all()
        return comment

    def _media_of(self, req: _Request, media_id: str, method: str = "GET") -> _Media:
        """A media of the token's account; 100/33 otherwise."""
        assert req.account is not None
        media = self._media.get(media_id)
        if media is None or media.account_id != req.account.id:
            raise _no_such_object(media_id, method)
        return media

    def _comment_of(self, req: _Request, comment_id: str, method: str = "GET") -> _Comment:
        """A live comment on a media of the token's account; 100/33 otherwise (deleted too)."""
        assert req.account is not None
        comment = self._comments.get(comment_id)
        if (comment is None or comment.deleted
                or self._media[comment.media_id].account_id != req.account.id):
            raise _no_such_object(comment_id, method)
        return comment

    def _owns_object(self, account: _Account, object_id: str) -> bool:
        """Whether the id names an object of the account that exists (other than a comment)."""
        if object_id in ("me", account.id):
            return True
        owners = (
            (self._conversations.get(object_id), "account_id"),
            (self._containers.get(object_id), "account_id"),
            (self._media.get(object_id), "account_id"),
        )
        if any(obj is not None and getattr(obj, attr) == account.id for obj, attr in owners):
            return True
        msg = self._messages.get(object_id)
        return msg is not None and self._conversations[msg.conversation_id].account_id == account.id

    # --- rendering ----------------------------------------------------------------------------

    _MESSAGE_FIELDS = {"id", "created_time", "from", "to", "message"}
    _CONVERSATION_FIELDS = {"id", "updated_time", "messages", "participants"}
    _ACCOUNT_FIELDS = {"id", "username", "followers_count", "media_count"}
    _CONTAINER_FIELDS = {"id", "status_code", "status"}
    _MEDIA_FIELDS = {
        "id", "caption", "media_type", "media_product_type", "media_url", "permalink", "shortcode",
        "timestamp", "like_count", "comments_count", "username", "owner",
    }
    _COMMENT_FIELDS = {
        "id", "text", "timestamp", "username", "from", "hidden", "like_count", "parent_id",
        "replies", "media",
    }

    def _render_message(self, msg: _Message, fields: dict[str, _Field] | None) -> dict:
        if fields is None:
            fields = {"id": _Field("id"), "created_time": _Field("created_time")}
        _check_fields(fields, self._MESSAGE_FIELDS, "Message")
        out: dict[str, Any] = {"id": msg.id}
        if "created_time" in fields:
            out["created_time"] = format_time(msg.created)
        if "from" in fields:
            out["from"] = {"username": msg.from_username, "id": msg.from_id}
        if "to" in fields:
            out["to"] = {"data": [{"username": msg.to_username, "id": msg.to_id}]}
        if "message" in fields:
            out["message"] = msg.text
        return out

    def _render_conversation(self, conv: _Conversation, fields: dict[str, _Field] | None) -> dict:
        if fields is None:
            fields = {"id": _Field("id"), "updated_time": _Field("updated_time")}
        _check_fields(fields, self._CONVERSATION_FIELDS, "Conversation")
        out: dict[str, Any] = {"id": conv.id}
        if "updated_time" in fields:
            out["updated_time"] = format_time(conv.updated)
        if "participants" in fields:
            account = self._accounts[conv.account_id]
            out["participants"] = {"data": [
                {"username": account.username, "id": account.id},
                {"username": conv.person_username, "id": conv.person_id},
            ]}
        if "messages" in fields:
            spec = fields["messages"]
            messages = conv.readable()
            if spec.limit is not None:
                messages = messages[: spec.limit]
            out["messages"] = {"data": [self._render_message(m, spec.sub) for m in messages]}
        return out

    def _render_account(self, account: _Account, fields: dict[str, _Field] | None) -> dict:
        fields = fields or {"id": _Field("id"), "username": _Field("username")}
        _check_fields(fields, self._ACCOUNT_FIELDS, "User")
        out: dict[str, Any] = {"id": account.id}
        if "username" in fields:
            out["username"] = account.username
        profile = self._profiles.get(account.id, {})
        if "followers_count" in fields:
            out["followers_count"] = profile.get("followers_count", 0)
        if "media_count" in fields:
            out["media_count"] = profile.get("media_count", sum(
                1 for m in self._media.values()
                if m.account_id == account.id and m.media_type != "STORY"
            ))
        return out

    def _render_container(self, container: _Container, fields: dict[str, _Field] | None) -> dict:
        fields = fields or {"id": _Field("id")}
        _check_fields(fields, self._CONTAINER_FIELDS, "ShadowIGMediaBuilder")
        out: dict[str, Any] = {"id": container.id}
        if "status" in fields:
            out["status"] = container.status
        if "status_code" in fields:
            out["status_code"] = container.status_code
        return out

    def _render_media(self, media: _Media, fields: dict[str, _Field] | None) -> dict:
        fields = fields or {"id": _Field("id")}
        _check_fields(fields, self._MEDIA_FIELDS, "IGMedia")
        out: dict[str, Any] = {"id": media.id}
        if "caption" in fields and media.caption:  # Meta leaves out an empty caption
            out["caption"] = media.caption
        values = {
            "media_type": media.media_type,
            "media_product_type": _PRODUCT_TYPE_OF_MEDIA_TYPE[media.media_type],
            "media_url": media.media_url,
            "permalink": media.permalink,
            "shortcode": media.shortcode,
            "timestamp": format_time(media.timestamp),
            "like_count": media.like_count,
            "username": self._accounts[media.account_id].username,
            "owner": {"id": media.account_id},
        }
        for name in fields:
            if name in values:
                out[name] = values[name]
            elif name == "comments_count":
                out[name] = media.comments_count()
        return out

    def _check_comment_fields(self, fields: dict[str, _Field] | None) -> None:
        if fields is None:
            return
        _check_fields(fields, self._COMMENT_FIELDS, "IGComment")
        if "replies" in fields:
            self._check_comment_fields(fields["replies"].sub)

    def _render_comment(self, comment: _Comment, fields: dict[str, _Field] | None) -> dict:
        """Fields checked beforehand (``_check_comment_fields``). Default: id, text, timestamp."""
        if fields is None:
            fields = {"timestamp": _Field("timestamp"), "text": _Field("text"), "id": _Field("id")}
        out: dict[str, Any] = {"id": comment.id}
        if "timestamp" in fields:
            out["timestamp"] = format_time(comment.timestamp)
        if "text" in fields:
            out["text"] = comment.text
        if "username" in fields:
            out["username"] = comment.username
        if "from" in fields:
            out["from"] = {"id": comment.from_id, "username": comment.username}
        if "hidden" in fields:
            out["hidden"] = comment.hidden
        if "like_count" in fields:
            out["like_count"] = comment.like_count
        if "parent_id" in fields and comment.parent_id is not None:  # absent on top-level ones
            out["parent_id"] = comment.parent_id
        if "media" in fields:
            out["media"] = {"id": comment.media_id}
        if "replies" in fields:  # left out when there are none, like any empty expanded edge
            spec = fields["replies"]
            replies = comment.reply_listing()
            if replies:
                limit = min(spec.limit or DEFAULT_COMMENTS_LIMIT, MAX_COMMENTS_LIMIT)
                page = replies[:limit]
                block: dict[str, Any] = {"data": [self._render_comment(r, spec.sub) for r in page]}
                if len(replies) > limit:
                    after = _cursor(page[-1].id)
                    query = {"fields": _fields_text(spec.sub)} if spec.sub else {}
                    query.update(limit=str(limit), after=after)
                    block["paging"] = {
                        "cursors": {"before": _cursor(page[0].id), "after": after},
                        "next": f"{self.url}/{comment.id}/replies?{urlencode(query)}",
                    }
                out["replies"] = block
        return out

    def _paginate(
        self, req: _Request, params: dict[str, Any], items: list, index: dict[str, int], limit: int,
        *, cursors_on_last_page: bool,
    ) -> tuple[list, dict | None]:
        """One page of ``items`` (already in order; ``index`` maps their ids to positions) for
        ``after``/``before``; the paging object (cursors, and ``next`` when more) or None.
        ``cursors_on_last_page`` False: the last page has no paging object at all."""
        if "after" in params:
            start = _cursor_index(params["after"], index) + 1
            page = items[start:start + limit]
        elif "before" in params:
            end = _cursor_index(params["before"], index)
            start = max(0, end - limit)
            page = items[start:end]
        else:
            start = 0
            page = items[:limit]
        more = start + len(page) < len(items)
        if not page or not (more or cursors_on_last_page):
            return page, None
        after = _cursor(page[-1].id)
        paging: dict[str, Any] = {"cursors": {"before": _cursor(page[0].id), "after": after}}
        if more:
            next_query = {
                k: str(v) for k, v in params.items()
                if k not in ("after", "before", "access_token") and isinstance(v, (str, int))
            }
            next_query["limit"] = str(limit)
            next_query["after"] = after
            paging["next"] = f"{self.url}{req.path}?{urlencode(next_query)}"
        return page, paging

    # ------------------------------------------------------------------------------------------
    # Handlers: accounts and generic object reads
    # ------------------------------------------------------------------------------------------

    def _get_object(self, req: _Request, m: re.Match) -> dict:
        object_id = m["object_id"]
        assert req.account is not None
        fields = _parse_fields(req.query.get("fields"))
        if object_id == "me" or object_id == req.account.id:
            return self._render_account(req.account, fields)
        conv = self._conversations.get(object_id)
        if conv is not None and conv.account_id == req.account.id:
            return self._render_conversation(conv, fields)
        msg = self._messages.get(object_id)
        if msg is not None:
            conv = self._conversations[msg.conversation_id]
            # only the 20 most recent messages can be read; older ones look deleted
            if conv.account_id == req.account.id and msg in conv.readable():
                return self._render_message(msg, fields)
        container = self._containers.get(object_id)
        if container is not None and container.account_id == req.account.id:
            return self._read_container(container, fields)
        media = self._media.get(object_id)
        if media is not None and media.account_id == req.account.id:
            return self._render_media(media, fields)
        if object_id in self._comments:
            comment = self._comment_of(req, object_id)
            self._check_comment_fields(fields)
            return self._render_comment(comment, fields)
        raise _no_such_object(object_id)

    def _post_object(self, req: _Request, m: re.Match) -> dict:
        """``POST /{ig-comment-id}`` with ``hide=true|false`` (idempotent)."""
        object_id = m["object_id"]
        assert req.account is not None
        if object_id not in self._comments:
            if self._owns_object(req.account, object_id):
                raise _unsupported_request("POST")
            raise _no_such_object(object_id, "POST")
        comment = self._comment_of(req, object_id, "POST")
        hide = _bool_param(_params(req), "hide")
        if hide is None:
            raise _invalid_param("The parameter hide is required")
        comment.hidden = hide
        return {"success": True}

    def _delete_object(self, req: _Request, m: re.Match) -> dict:
        """``DELETE /{ig-comment-id}``: gone from listings, and from then on 100/33 for every
        operation on it. Its replies go with it, as on Instagram."""
        object_id = m["object_id"]
        assert req.account is not None
        if object_id not in self._comments:
            if self._owns_object(req.account, object_id):
                raise _unsupported_request("DELETE")
            raise _no_such_object(object_id, "DELETE")
        comment = self._comment_of(req, object_id, "DELETE")
        comment.deleted = True
        for reply in comment.replies:
            reply.deleted = True
        self._media[comment.media_id].changed()
        return {"success": True}

    # ------------------------------------------------------------------------------------------
    # Handlers: DMs (conversations and the Send API)
    # ------------------------------------------------------------------------------------------

    def _list_conversations(self, req: _Request, m: re.Match) -> dict:
        account = self._account_in_path(req, m["ig_id"])
        if req.query.get("platform") != "instagram":
            raise _invalid_param("Requires platform=instagram for Instagram conversations")
        fields = _parse_fields(req.query.get("fields"))
        if fields is not None:
            _check_fields(fields, self._CONVERSATION_FIELDS, "Conversation")
        raw_limit = req.query.get("limit", str(DEFAULT_CONVERSATIONS_LIMIT))
        if not raw_limit.isdigit() or int(raw_limit) < 1:
            raise _invalid_param("Param limit must be a positive integer")
        limit = int(raw_limit)

        convs = sorted(
            (c for c in self._conversations.values() if c.account_id == account.id),
            key=lambda c: c.sort_key, reverse=True,
        )
        if "user_id" in req.query:
            convs = [c for c in convs if c.person_id == req.query["user_id"]]
        ids = [c.id for c in convs]
        if "after" in req.query:
            start = ids.index(_cursor_target(req.query["after"], ids)) + 1
            page = convs[start:start + limit]
        elif "before" in req.query:
            end = ids.index(_cursor_target(req.query["before"], ids))
            start = max(0, end - limit)
            page = convs[start:end]
        else:
            start = 0
            page = convs[:limit]

        out: dict[str, Any] = {"data": [self._render_conversation(c, fields) for c in page]}
        if page:
            after = _cursor(page[-1].id)
            out["paging"] = {"cursors": {"before": _cursor(page[0].id), "after": after}}
            if ids.index(page[-1].id) + 1 < len(ids):
                next_query = {
                    k: v for k, v in req.query.items()
                    if k not in ("after", "before", "access_token")
                }
                next_query["limit"] = str(limit)
                next_query["after"] = after
                out["paging"]["next"] = f"{self.url}{req.path}?{urlencode(next_query)}"
        return out

    def _send_message(self, req: _Request, m: re.Match) -> dict:
        """Send API. ``recipient: {"id": IGSID}`` sends a DM (within the messaging window);
        ``recipient: {"comment_id": ID}`` sends a private reply to the author of a live comment
        on the account's media (100/33 otherwise). One private reply per comment: a second one
        answers code 10 subcode 2534023. Private replies show in ``comment()``, not in
        ``sent_messages()``, and open no conversation in the fake."""
        account = self._account_in_path(req, m["ig_id"], "POST")
        params = _params(req)
        recipient = _maybe_json(params.get("recipient"))
        message = _maybe_json(params.get("message"))
        if not isinstance(recipient, dict) or not recipient:
            raise _invalid_param("The parameter recipient is required")
        comment_id = recipient.get("comment_id")
        recipient_id = recipient.get("id")
        if comment_id is None and (not isinstance(recipient_id, (str, int)) or not str(recipient_id)):
            raise _invalid_param("The parameter recipient[id] is required")
        text = message.get("text") if isinstance(message, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise _invalid_param("The parameter message[text] is required")
        if len(text.encode("utf-8")) > MAX_TEXT_BYTES:
            raise _invalid_param(
                f"Length of param message[text] must be less than or equal to {MAX_TEXT_BYTES}"
            )
        if comment_id is not None:
            return self._private_reply(req, str(comment_id), text)
        recipient_id = str(recipient_id)

        conv_id = self._conversation_index.get((account.id, recipient_id))
        if conv_id is None:
            raise GraphError(551, "(#551) This person isn't available right now.", subcode=1545041)
        conv = self._conversations[conv_id]
        now = _now()
        window = HUMAN_AGENT_WINDOW if params.get("tag") == "HUMAN_AGENT" else MESSAGING_WINDOW
        theirs = [msg.created for msg in conv.messages if msg.from_id == recipient_id]
        if not theirs or now - max(theirs) > window:
            raise GraphError(
                10, "(#10) This message is sent outside of allowed window. Learn more about the "
                "new policy here: https://developers.facebook.com/docs/messenger-platform/"
                "policy-overview", subcode=2534022,
            )
        msg = self._new_message(
            conv, now, account.id, account.username, conv.person_id, conv.person_username, text
        )
        self._sent.append({
            "recipient_id": recipient_id, "text": text, "message_id": msg.id, "time": now,
            "account_ig_id": account.id,
        })
        return {"recipient_id": recipient_id, "message_id": msg.id}

    def _private_reply(self, req: _Request, comment_id: str, text: str) -> dict:
        comment = self._comment_of(req, comment_id, "POST")
        if comment.private_replies:
            raise GraphError(
                10, "(#10) Only one private reply can be sent for each comment.", subcode=2534023
            )
        comment.private_replies.append(text)
        message_id = _MESSAGE_ID_PREFIX + _b64(
            f"{comment.media_id}:{next(self._ids)}{secrets.randbits(64):020d}"
        ) + "ZDZD"
        self._cond.notify_all()
        return {"recipient_id": comment.from_id, "message_id": message_id}

    # ------------------------------------------------------------------------------------------
    # Handlers: content publishing
    # ------------------------------------------------------------------------------------------

    def _create_container(self, req: _Request, m: re.Match) -> dict:
        """``POST /{ig-user-id}/media``: image (``image_url``), ``media_type=REELS|VIDEO`` +
        ``video_url``, ``media_type=STORIES`` + ``image_url`` or ``video_url``,
        ``is_carousel_item=true`` + ``image_url`` or (``media_type=VIDEO`` +) ``video_url``, or
        ``media_type=CAROUSEL`` + ``children`` (2-10 FINISHED carousel items of the account, else
        100/2207028); optional ``caption`` (> 2,200 characters: 36004/2207010). Media URLs must
        be http(s) URLs, else 9004/2207052."""
        account = self._account_in_path(req, m["ig_id"], "POST")
        params = _params(req)
        media_type = (_str_param(params, "media_type") or "").upper() or None
        image_url = _str_param(params, "image_url")
        video_url = _str_param(params, "video_url")
        caption = _str_param(params, "caption") or ""
        is_item = bool(_bool_param(params, "is_carousel_item"))
        if len(caption) > MAX_CAPTION_CHARS:
            raise GraphError(
                36004, f"(#36004) The caption is too long: captions are limited to "
                f"{MAX_CAPTION_CHARS:,} characters.", subcode=2207010,
            )

        def need(url: str | None, name: str) -> list[str]:
            if not url:
                raise _invalid_param(f"The parameter {name} is required")
            _check_media_url(url)
            return [url]

        children: list[str] = []
        if is_item:
            if media_type not in (None, "IMAGE", "VIDEO"):
                raise _invalid_param(f"Param media_type={media_type} cannot be a carousel item")
            is_video = media_type == "VIDEO" or (media_type is None and bool(video_url)
                                                 and not image_url)
            kind = "CAROUSEL_ITEM"
            urls = need(video_url, "video_url") if is_video else need(image_url, "image_url")
        elif media_type == "CAROUSEL":
            kind, is_video, children = "CAROUSEL", False, _list_param(params, "children")
            self._check_children(account, children)
            urls = [url for child in children for url in self._containers[child].urls]
        elif media_type in ("REELS", "VIDEO"):
            kind, is_video, urls = media_type, True, need(video_url, "video_url")
        elif media_type == "STORIES":
            if bool(image_url) == bool(video_url):
                raise _invalid_param("Stories need exactly one of image_url and video_url")
            kind, is_video = "STORIES", bool(video_url)
            urls = need(video_url, "video_url") if is_video else need(image_url, "image_url")
        elif media_type in (None, "IMAGE"):
            kind, is_video, urls = "IMAGE", False, need(image_url, "image_url")
        else:
            raise _invalid_param(
                "Param media_type must be one of {CAROUSEL, REELS, STORIES, VIDEO} or omitted"
            )
        container = self._new_container(account.id, kind, urls, caption, is_video, children)
        return {"id": container.id}

    def _check_children(self, account: _Account, children: list[str]) -> None:
        def invalid(why: str) -> GraphError:
            return GraphError(100, f"(#100) Carousel validation failed: {why}", subcode=2207028)

        if not CAROUSEL_MIN_CHILDREN <= len(children) <= CAROUSEL_MAX_CHILDREN:
            raise invalid(f"a carousel needs {CAROUSEL_MIN_CHILDREN} to {CAROUSEL_MAX_CHILDREN} "
                          f"children, got {len(children)}")
        if len(set(children)) != len(children):
            raise invalid("the same child is given twice")
        for child_id in children:
            child = self._containers.get(child_id)
            if child is None or child.account_id != account.id or child.kind != "CAROUSEL_ITEM":
                raise invalid(f"{child_id} is not a carousel item container of this account")
            if child.status_code != "FINISHED":
                raise invalid(f"carousel item {child_id} is {child.status_code}, not FINISHED")

    def _read_container(self, container: _Container, fields: dict[str, _Field] | None) -> dict:
        """A read asking for status_code or status is a status read: it counts down an
        IN_PROGRESS video container, which becomes final right after its last IN_PROGRESS read."""
        out = self._render_container(container, fields)
        if fields is not None and ("status_code" in fields or "status" in fields) \
                and container.status_code == "IN_PROGRESS":
            container.reads_left -= 1
            if container.reads_left <= 0:
                container.status_code, container.status = container.final_code, container.final_status
        return out

    def _publish(self, req: _Request, m: re.Match) -> dict:
        """``POST /{ig-user-id}/media_publish`` with ``creation_id``. Errors, in this order:
        unknown or other account's container 100/33; carousel item 100; already PUBLISHED 100/2207006
        (no second media); IN_PROGRESS or ERROR 9007/2207027 "Media ID is not available" (the
        status tells why); EXPIRED 24/2207008; quota reached 9/2207042."""
        account = self._account_in_path(req, m["ig_id"], "POST")
        creation_id = _str_param(_params(req), "creation_id")
        if not creation_id:
            raise _invalid_param("The parameter creation_id is required")
        container = self._containers.get(creation_id)
        if container is None or container.account_id != account.id:
            raise _no_such_object(creation_id, "POST")
        if container.kind == "CAROUSEL_ITEM":
            raise _invalid_param("A carousel item cannot be published on its own; publish the "
                                 "CAROUSEL container that holds it")
        if container.status_code == "PUBLISHED":
            raise GraphError(100, "The media has already been published", subcode=2207006)
        if container.status_code in ("IN_PROGRESS", "ERROR"):
            raise GraphError(9007, "Media ID is not available", subcode=2207027)
        if container.status_code == "EXPIRED":
            raise GraphError(
                24, f"Media builder expired: the media builder with creation ID {creation_id} does "
                "not exist or has expired.", subcode=2207008,
            )
        if self._quota_usage(account.id) >= self._quota_total:
            raise GraphError(
                9, "(#9) Application request limit reached: the account reached the maximum number "
                "of posts the Content Publishing API allows in 24 hours.", subcode=2207042,
            )
        media = self._new_media(
            account.id, _MEDIA_TYPE_OF_KIND[container.kind], container.caption, _now(), container.id
        )
        container.status_code = "PUBLISHED"
        container.status = _CONTAINER_STATUS_TEXT["PUBLISHED"]
        container.media_id = media.id
        return {"id": media.id}

    def _quota_usage(self, account_id: str) -> int:
        since = _now() - PUBLISH_WINDOW
        return self._quota_used + sum(
            1 for media in self._media.values()
            if media.account_id == account_id and media.container_id is not None
            and media.timestamp > since
        )

    def _publishing_limit(self, req: _Request, m: re.Match) -> dict:
        account = self._account_in_path(req, m["ig_id"])
        fields = _parse_fields(_str_param(_params(req), "fields")) or {"quota_usage": _Field("quota_usage")}
        _check_fields(fields, {"quota_usage", "config"}, "ContentPublishingLimit")
        item: dict[str, Any] = {}
        if "quota_usage" in fields:
            item["quota_usage"] = self._quota_usage(account.id)
        if "config" in fields:
            item["config"] = {
                "quota_total": self._quota_total,
                "quota_duration": int(PUBLISH_WINDOW.total_seconds()),
            }
        return {"data": [item]}

    def _list_media(self, req: _Request, m: re.Match) -> dict:
        """``GET /{ig-user-id}/media`` (``/stories`` for stories): newest first, cursors on every
        non-empty page, ``next`` while there are more."""
        account = self._account_in_path(req, m["ig_id"])
        stories = m["edge"] == "stories"
        params = _params(req)
        fields = _parse_fields(_str_param(params, "fields"))
        if fields is not None:
            _check_fields(fields, self._MEDIA_FIELDS, "IGMedia")
        limit = _limit_param(params, DEFAULT_MEDIA_LIMIT)
        items = sorted(
            (x for x in self._media.values()
             if x.account_id == account.id and (x.media_type == "STORY") == stories),
            key=lambda x: x.sort_key, reverse=True,
        )
        index = {x.id: i for i, x in enumerate(items)}
        page, paging = self._paginate(req, params, items, index, limit, cursors_on_last_page=True)
        out: dict[str, Any] = {"data": [self._render_media(x, fields) for x in page]}
        if paging is not None:
            out["paging"] = paging
        return out

    # ------------------------------------------------------------------------------------------
    # Handlers: comments and moderation
    # ------------------------------------------------------------------------------------------

    def _list_comments(self, req: _Request, m: re.Match) -> dict:
        """Top-level comments, newest first, at most 50 per page (default 25); the paging object
        (cursors and ``next``) only while there are more. A cursor whose comment was deleted is
        invalid (code 100)."""
        media = self._media_of(req, m["object_id"])
        params = _params(req)
        fields = _parse_fields(_str_param(params, "fields"))
        self._check_comment_fields(fields)
        limit = _limit_param(params, DEFAULT_COMMENTS_LIMIT, MAX_COMMENTS_LIMIT)
        items, index = media.listing()
        page, paging = self._paginate(req, params, items, index, limit, cursors_on_last_page=False)
        out: dict[str, Any] = {"data": [self._render_comment(c, fields) for c in page]}
        if paging is not None:
            out["paging"] = paging
        return out

    def _list_replies(self, req: _Request, m: re.Match) -> dict:
        """Replies to a comment, newest first, paged like the comments edge."""
        comment = self._comment_of(req, m["object_id"])
        params = _params(req)
        fields = _parse_fields(_str_param(params, "fields"))
        self._check_comment_fields(fields)
        limit = _limit_param(params, DEFAULT_COMMENTS_LIMIT, MAX_COMMENTS_LIMIT)
        items = comment.reply_listing()
        index = {r.id: i for i, r in enumerate(items)}
        page, paging = self._paginate(req, params, items, index, limit, cursors_on_last_page=False)
        out: dict[str, Any] = {"data": [self._render_comment(r, fields) for r in page]}
        if paging is not None:
            out["paging"] = paging
        return out

    def _reply(self, req: _Request, m: re.Match) -> dict:
        """``POST /{ig-comment-id}/replies`` with ``message``: a reply by the account (to the
        top-level comment when the target is itself a reply)."""
        comment = self._comment_of(req, m["object_id"], "POST")
        assert req.account is not None
        text = _str_param(_params(req), "message")
        if not text or not text.strip():
            raise _invalid_param("The parameter message is required")
        if len(text) > MAX_COMMENT_CHARS:
            raise _bad_comment_text("message")
        media = self._media[comment.media_id]
        parent = self._comments[comment.parent_id] if comment.parent_id else comment
        reply = self._new_comment(media, text, req.account.username, req.account.id, parent, _now())
        return {"id": reply.id}

    # ------------------------------------------------------------------------------------------
    # Handlers: insights and tokens
    # ------------------------------------------------------------------------------------------

    def _insights(self, req: _Request, m: re.Match) -> dict:
        """Account insights. ``metric_type=total_value`` items carry ``total_value: {value}``,
        others ``values: [{value, end_time}]`` (``follower_count`` always so). One retired or
        unknown metric fails the whole call with code 100; a metric without data is left out."""
        account = self._account_in_path(req, m["ig_id"])
        params = _params(req)
        names = [n.strip() for n in (_str_param(params, "metric") or "").split(",") if n.strip()]
        if not names:
            raise _invalid_param("The parameter metric is required")
        metric_type = _str_param(params, "metric_type") or "time_series"
        if metric_type not in ("time_series", "total_value"):
            raise _invalid_param("Param metric_type must be one of {time_series, total_value}")
        total = metric_type == "total_value"
        period = _str_param(params, "period")
        if period is None:
            raise _invalid_param("The parameter period is required")
        if period != "day":
            raise _invalid_param(f"Param period must be one of {{day}} for these metrics, got {period}")
        since, until = _int_param(params, "since"), _int_param(params, "until")
        if since is not None and until is not None:
            if since > until:
                raise _invalid_param("Param since must be before until")
            if until - since > MAX_INSIGHTS_RANGE:
                raise _invalid_param("There cannot be more than 30 days (2592000 s) between since "
                                     "and until")
        allowed = [
            name for name in INSIGHT_METRICS if total or name not in _TOTAL_VALUE_ONLY_METRICS
        ]
        for i, name in enumerate(names):
            if name not in allowed:
                raise _invalid_param(
                    f"metric[{i}] must be one of the following values: {', '.join(allowed)}"
                )
        if until is not None:
            end_time = datetime.fromtimestamp(until, timezone.utc)
        else:
            end_time = _now().replace(hour=7, minute=0, second=0, microsecond=0)
        data = []
        values = self._insights.get(account.id, {})
        for name in dict.fromkeys(names):
            if name not in values:
                continue
            title, description = INSIGHT_METRICS[name]
            item: dict[str, Any] = {"name": name, "period": period}
            if total and name not in _TIME_SERIES_METRICS:
                item["total_value"] = {"value": values[name]}
            else:
                item["values"] = [{"value": values[name], "end_time": format_time(end_time)}]
            item.update(title=title, description=description,
                        id=f"{account.id}/insights/{name}/{period}")
            data.append(item)
        return {"data": data}

    def _refresh_token(self, req: _Request, m: re.Match) -> dict:
        """``GET /refresh_access_token?grant_type=ig_refresh_token&access_token=TOKEN``: the token
        comes in the query (a bearer header is not read here). The new token replaces the old one,
        which then answers 190. ``fail_refresh`` makes it answer 190/463 instead."""
        account = self._authenticate(req.token)
        if req.query.get("grant_type") != "ig_refresh_token":
            raise _invalid_param("Param grant_type must be ig_refresh_token")
        if account.id in self._refresh_failures:
            left = self._refresh_failures[account.id]
            if left is not None:
                if left <= 1:
                    del self._refresh_failures[account.id]
                else:
                    self._refresh_failures[account.id] = left - 1
            raise _expired_token()
        assert req.token is not None
        new_token = "IGAA" + secrets.token_urlsafe(48)
        del self._tokens[req.token]
        self._tokens[new_token] = account.id
        self._refreshed.setdefault(account.id, []).append(new_token)
        return {
            "access_token": new_token, "token_type": "bearer",
            "expires_in": REFRESHED_TOKEN_EXPIRES_IN,
        }


# ----------------------------------------------------------------------------------------------
# Route table: (method, regex over the path without the version, handler[, needs a token]).
# First match wins, so specific paths go before the generic "/{object-id}".
# ----------------------------------------------------------------------------------------------


class Route(NamedTuple):
    method: str
    pattern: re.Pattern[str]
    handler: Callable[[FakeGraph, _Request, re.Match], Any]
    auth: bool = True


_ID = r"[A-Za-z0-9_\-]+"

ROUTES: list[Route] = [
    # tokens (the token is in the query string; the handler checks it)
    Route("GET", re.compile(r"/refresh_access_token"), FakeGraph._refresh_token, auth=False),
    # DMs (and private replies to comments)
    Route("GET", re.compile(rf"/(?P<ig_id>{_ID})/conversations"), FakeGraph._list_conversations),
    Route("POST", re.compile(rf"/(?P<ig_id>{_ID})/messages"), FakeGraph._send_message),
    # content publishing
    Route("POST", re.compile(rf"/(?P<ig_id>{_ID})/media"), FakeGraph._create_container),
    Route("POST", re.compile(rf"/(?P<ig_id>{_ID})/media_publish"), FakeGraph._publish),
    Route("GET", re.compile(rf"/(?P<ig_id>{_ID})/content_publishing_limit"),
          FakeGraph._publishing_limit),
    Route("GET", re.compile(rf"/(?P<ig_id>{_ID})/(?P<edge>media|stories)"), FakeGraph._list_media),
    # insights
    Route("GET", re.compile(rf"/(?P<ig_id>{_ID})/insights"), FakeGraph._insights),
    # comments and moderation
    Route("GET", re.compile(rf"/(?P<object_id>{_ID})/comments"), FakeGraph._list_comments),
    Route("GET", re.compile(rf"/(?P<object_id>{_ID})/replies"), FakeGraph._list_replies),
    Route("POST", re.compile(rf"/(?P<object_id>{_ID})/replies"), FakeGraph._reply),
    # generic nodes: accounts, /me, conversations, messages, containers, media, comments
    Route("GET", re.compile(rf"/(?P<object_id>{_ID})"), FakeGraph._get_object),
    Route("POST", re.compile(rf"/(?P<object_id>{_ID})"), FakeGraph._post_object),  # hide
    Route("DELETE", re.compile(rf"/(?P<object_id>{_ID})"), FakeGraph._delete_object),
]


# ----------------------------------------------------------------------------------------------
# Request parsing helpers
# ----------------------------------------------------------------------------------------------


def _times(times: int | None) -> int | None:
    if times is not None and times < 1:
        raise ValueError("times must be >= 1 or None")
    return times


def _call_matches(call: Call, method: str | None, path_contains: str | None) -> bool:
    if method is not None and call.method != method.upper():
        return False
    return path_contains is None or path_contains in call.path


def _bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _parse_body(content_type: str, raw: bytes) -> Any:
    if not raw:
        return None
    content_type = content_type.split(";")[0].strip().lower()
    text = raw.decode("utf-8", errors="replace")
    if content_type == "application/x-www-form-urlencoded":
        return dict(parse_qsl(text, keep_blank_values=True))
    try:
        return json.loads(text)
    except ValueError:
        return None


def _maybe_json(value: Any) -> Any:
    """Graph accepts object parameters as JSON strings (form or query) as well as JSON bodies."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def _params(req: _Request) -> dict[str, Any]:
    """Parameters from the query string, with those of a form or JSON body on top."""
    params: dict[str, Any] = dict(req.query)
    if isinstance(req.body, dict):
        params.update(req.body)
    return params


def _str_param(params: dict[str, Any], name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise _invalid_param(f"Param {name} must be a string")


def _bool_param(params: dict[str, Any], name: str) -> bool | None:
    value = params.get(name)
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise _invalid_param(f"Param {name} must be a boolean")


def _int_param(params: dict[str, Any], name: str) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise _invalid_param(f"Param {name} must be an integer")


def _list_param(params: dict[str, Any], name: str) -> list[str]:
    """A list given as "a,b,c", as a JSON array string, or as a JSON array."""
    value = params.get(name)
    if isinstance(value, str) and value.strip().startswith("["):
        value = _maybe_json(value)
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    if isinstance(value, (str, int)):
        return [v.strip() for v in str(value).split(",") if v.strip()]
    return []


def _limit_param(params: dict[str, Any], default: int, maximum: int | None = None) -> int:
    limit = _int_param(params, "limit") if "limit" in params else default
    if limit is None or limit < 1:
        raise _invalid_param("Param limit must be a positive integer")
    return min(limit, maximum) if maximum is not None else limit


def _check_media_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise GraphError(
            9004, "Media download has failed. The media URI doesn't meet our requirements.",
            subcode=2207052,
        )


def _fields_text(fields: dict[str, _Field]) -> str:
    """The inverse of ``_parse_fields``."""
    parts = []
    for f in fields.values():
        text = f.name + (f".limit({f.limit})" if f.limit is not None else "")
        if f.sub is not None:
            text += "{" + _fields_text(f.sub) + "}"
        parts.append(text)
    return ",".join(parts)


def _cursor(item_id: str) -> str:
    return _b64(_CURSOR_PREFIX + item_id)


def _cursor_target(cursor: str, ids: list[str]) -> str:
    try:
        target = _unb64(cursor)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        target = ""
    target = target[len(_CURSOR_PREFIX):] if target.startswith(_CURSOR_PREFIX) else ""
    if target not in ids:
        raise _invalid_param("Invalid cursor")
    return target


def _cursor_index(cursor: Any, index: dict[str, int]) -> int:
    """The position of the item a cursor names; code 100 if it names none (deleted included)."""
    try:
        target = _unb64(str(cursor))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        target = ""
    target = target[len(_CURSOR_PREFIX):] if target.startswith(_CURSOR_PREFIX) else ""
    if target not in index:
        raise _invalid_param("Invalid cursor")
    return index[target]


# ----------------------------------------------------------------------------------------------
# HTTP plumbing
# ----------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # listen backlog; socketserver's default of 5 drops bursts

    def __init__(self, fake: FakeGraph):
        self.fake = fake
        self.stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._connections_lock:
            (self._connections.add if alive else self._connections.discard)(conn)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that gave up (timeout during a delay) is normal here; anything else is a bug
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self._connections_lock:
            conns = list(self._connections)
            self._connections.clear()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like Meta
    server_version = "FakeGraph/1.0"
    timeout = 30  # idle keep-alive connections give up after this
    server: _Server

    def setup(self) -> None:
        super().setup()
        # headers and body are written separately: without this, Nagle + delayed ACK cost 40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self) -> None:
        if self.server.stopping.is_set():
            self.close_connection = True
            return
        split = urlsplit(self.path)
        raw_body = self._read_body()
        status, headers, payload, delay = self.server.fake._dispatch(
            self.command, split.path, split.query, self.headers, raw_body
        )
        if delay > 0 and self.server.stopping.wait(delay):
            self.close_connection = True  # stopped while late: the answer never comes
            return
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle
