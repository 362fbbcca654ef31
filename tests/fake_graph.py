"""A fake Instagram Graph API server for instaqueue's tests.

The tests run a real Celery worker in a subprocess. That worker calls this fake over loopback HTTP,
while the test process holds the ``FakeGraph`` object: it seeds state, injects faults and inspects
the calls it recorded. All state is in memory behind one ``threading.Lock``, so every public method
is safe to call from any thread while the server is answering requests.

The fake follows ``/work/shared/instagram-graph-api.md``: the same paths, payload shapes, headers
and error objects as Meta's Graph API (checked against the recorded bodies in
``/work/shared/ig-fixtures/``). Tokens come only as ``Authorization: Bearer <token>``; a token in the
query string is ignored, exactly like a missing one.

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

Served endpoints (paths below ``/{version}``):

* ``GET  /{ig-user-id}/conversations?platform=instagram&fields=...&limit=N[&after=C][&user_id=ID]``
* ``GET  /{conversation-id}?fields=messages`` (or ``messages{...}``, ``participants``, ...)
* ``GET  /{message-id}?fields=id,created_time,from,to,message``
* ``GET  /{ig-user-id}`` and ``GET /me`` (``id``, ``username``)
* ``POST /{ig-user-id}/messages`` and ``POST /me/messages`` (Send API, text messages)

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
class _Fault:
    kind: str  # "fail" | "delay" | "rate_limit"
    remaining: int | None  # None = until clear_faults()
    method: str | None = None
    path_contains: str | None = None
    account_id: str | None = None  # rate_limit: matches calls for this account
    error: GraphError | None = None  # fail / rate_limit
    seconds: float = 0.0  # delay

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

    def clear_faults(self) -> None:
        """Drop every pending fail/delay/rate_limit fault and every token revocation."""
        with self._lock:
            self._faults.clear()
            self._revoked.clear()

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
                if not versioned:
                    raise GraphError(
                        100, f"Unsupported {method.lower()} request. This fake Graph API serves "
                        f"/{self.version} only, got {raw_path}",
                    )
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
            self._calls.append(Call(
                method=method, path=path, query=dict(query), body=copy.deepcopy(body),
                token=token, status=status, time=received, response=copy.deepcopy(payload),
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

    # --- rendering ----------------------------------------------------------------------------

    _MESSAGE_FIELDS = {"id", "created_time", "from", "to", "message"}
    _CONVERSATION_FIELDS = {"id", "updated_time", "messages", "participants"}
    _ACCOUNT_FIELDS = {"id", "username"}

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

    # ------------------------------------------------------------------------------------------
    # Handlers: accounts and generic object reads
    # ------------------------------------------------------------------------------------------

    def _get_object(self, req: _Request, m: re.Match) -> dict:
        object_id = m["object_id"]
        assert req.account is not None
        fields = _parse_fields(req.query.get("fields"))
        if object_id == "me" or object_id == req.account.id:
            fields = fields or {"id": _Field("id"), "username": _Field("username")}
            _check_fields(fields, self._ACCOUNT_FIELDS, "User")
            out = {"id": req.account.id}
            if "username" in fields:
                out["username"] = req.account.username
            return out
        conv = self._conversations.get(object_id)
        if conv is not None and conv.account_id == req.account.id:
            return self._render_conversation(conv, fields)
        msg = self._messages.get(object_id)
        if msg is not None:
            conv = self._conversations[msg.conversation_id]
            # only the 20 most recent messages can be read; older ones look deleted
            if conv.account_id == req.account.id and msg in conv.readable():
                return self._render_message(msg, fields)
        raise _no_such_object(object_id)

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
        account = self._account_in_path(req, m["ig_id"], "POST")
        params: dict[str, Any] = dict(req.query)
        if isinstance(req.body, dict):
            params.update(req.body)
        recipient = _maybe_json(params.get("recipient"))
        message = _maybe_json(params.get("message"))
        if not isinstance(recipient, dict) or not recipient:
            raise _invalid_param("The parameter recipient is required")
        if "comment_id" in recipient:
            raise _invalid_param("Private replies (recipient.comment_id) are not served by the fake yet")
        recipient_id = recipient.get("id")
        if not isinstance(recipient_id, (str, int)) or not str(recipient_id):
            raise _invalid_param("The parameter recipient[id] is required")
        recipient_id = str(recipient_id)
        text = message.get("text") if isinstance(message, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise _invalid_param("The parameter message[text] is required")
        if len(text.encode("utf-8")) > MAX_TEXT_BYTES:
            raise _invalid_param(
                f"Length of param message[text] must be less than or equal to {MAX_TEXT_BYTES}"
            )

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
    # DMs
    Route("GET", re.compile(rf"/(?P<ig_id>{_ID})/conversations"), FakeGraph._list_conversations),
    Route("POST", re.compile(rf"/(?P<ig_id>{_ID})/messages"), FakeGraph._send_message),
    # generic node reads: accounts, /me, conversations, messages
    Route("GET", re.compile(rf"/(?P<object_id>{_ID})"), FakeGraph._get_object),
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
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle
