"""Tests of the fake Instagram Graph API server (tests/fake_graph.py), over real loopback HTTP."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

try:  # tests/ on sys.path (rootdir-less layout) or tests/ as a package
    from fake_graph import REDACTED, Call, FakeGraph, format_time
except ImportError:  # pragma: no cover
    from tests.fake_graph import REDACTED, Call, FakeGraph, format_time

SHARED = Path("/work/shared/ig-fixtures")
APIDATA = SHARED / "python-facebook/instagram/apidata"
ACCOUNT, OTHER = "17841400000000001", "17841400000000002"
TOKEN, OTHER_TOKEN = "tok-shop", "tok-other"
ALICE, BOB = "9000000000000001", "9000000000000002"
EXPANDED = "id,updated_time,messages{id,created_time,from,to,message}"
META_TIME = "%Y-%m-%dT%H:%M:%S+0000"


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with FakeGraph() as graph:
        yield graph


@pytest.fixture
def graph(server):
    server.reset()
    server.add_account(ACCOUNT, "shop", TOKEN)
    server.add_account(OTHER, "other", OTHER_TOKEN)
    return server


@pytest.fixture
def client(graph):
    with httpx.Client(base_url=graph.url, headers={"Authorization": f"Bearer {TOKEN}"},
                      timeout=5) as c:
        yield c


def ago(**kw) -> datetime:
    return datetime.now(timezone.utc) - timedelta(**kw)


def conversations(client, **params):
    return client.get(f"/{ACCOUNT}/conversations", params={"platform": "instagram", **params})


def send(client, recipient=ALICE, text="thanks!", path=f"/{ACCOUNT}/messages"):
    return client.post(path, json={"recipient": {"id": recipient}, "message": {"text": text}})


def error_of(response: httpx.Response) -> dict:
    assert response.headers["content-type"] == "application/json; charset=UTF-8"
    return response.json()["error"]


REFERENCE_ERROR = json.loads((SHARED / "python-facebook/error.json").read_text())["error"]
OPTIONAL_ERROR_KEYS = {"error_subcode": int, "is_transient": bool}


def assert_meta_error(response: httpx.Response, status: int, code: int, subcode: int | None = None):
    """Status, code, subcode, and the body shape of python-facebook's recorded error.json."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    for key, value in REFERENCE_ERROR.items():
        assert key in error, key
        assert type(error[key]) is type(value), key
    for key in set(error) - set(REFERENCE_ERROR):
        assert key in OPTIONAL_ERROR_KEYS, key
        assert type(error[key]) is OPTIONAL_ERROR_KEYS[key], key
    assert error["code"] == code
    assert error.get("error_subcode") == subcode
    assert error["type"] == "OAuthException"
    assert error["fbtrace_id"] == response.headers["x-fb-trace-id"]
    return error


# ----------------------------------------------------------------------------------------------
# Lifecycle, headers, calls
# ----------------------------------------------------------------------------------------------


def test_url_has_version_and_loopback_port(server):
    parts = urlsplit(server.url)
    assert parts.scheme == "http" and parts.hostname == "127.0.0.1" and parts.port
    assert parts.path == "/v23.0"


def test_start_stop_and_context_manager():
    graph = FakeGraph(version="v22.0")
    with pytest.raises(RuntimeError):
        graph.url
    with graph:
        graph.add_account(ACCOUNT, "shop", TOKEN)
        url = graph.url
        assert url.endswith("/v22.0")
        r = httpx.get(f"{url}/me", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.json() == {"id": ACCOUNT, "username": "shop"}
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/me", timeout=1)
    graph.stop()  # idempotent


def test_every_response_carries_meta_headers(graph, client):
    graph.add_dm(ACCOUNT, ALICE, "hi")
    for response in (conversations(client), client.get("/nope"), send(client, BOB)):
        h = response.headers
        assert h["content-type"] == "application/json; charset=UTF-8"
        assert h["x-fb-trace-id"]
        assert json.loads(h["x-app-usage"]) == {"call_count": 1, "total_cputime": 1, "total_time": 1}
        business = json.loads(h["x-business-use-case-usage"])
        assert list(business) == [ACCOUNT]
        (usage,) = business[ACCOUNT]
        assert usage["type"] == "instagram"
        assert usage["estimated_time_to_regain_access"] == 0
        assert 0 <= usage["call_count"] < 50


def test_business_usage_key_is_path_account_or_token_owner(graph, client):
    r = client.get("/me")
    assert list(json.loads(r.headers["x-business-use-case-usage"])) == [ACCOUNT]
    r = client.get(f"/{OTHER}/conversations", params={"platform": "instagram"})
    assert list(json.loads(r.headers["x-business-use-case-usage"])) == [OTHER]
    r = httpx.get(f"{graph.url}/me")  # no token, no account in the path
    assert json.loads(r.headers["x-business-use-case-usage"]) == {}


def test_set_usage_applies_to_every_response(graph, client):
    business = {ACCOUNT: [{"type": "instagram", "call_count": 95, "total_cputime": 20,
                           "total_time": 30, "estimated_time_to_regain_access": 0}]}
    graph.set_usage(app={"call_count": 91, "total_cputime": 10, "total_time": 12}, business=business)
    for response in (client.get("/me"), client.get("/nope")):
        assert json.loads(response.headers["x-app-usage"])["call_count"] == 91
        assert json.loads(response.headers["x-business-use-case-usage"]) == business
    graph.set_usage(app={"call_count": 5, "total_cputime": 1, "total_time": 1})  # business kept
    assert json.loads(client.get("/me").headers["x-business-use-case-usage"]) == business
    graph.reset_usage()
    assert json.loads(client.get("/me").headers["x-app-usage"])["call_count"] == 1


def test_calls_are_recorded_with_token_query_body_and_status(graph, client):
    graph.add_dm(ACCOUNT, ALICE, "hi")
    before = time.time()
    conversations(client, fields=EXPANDED, limit=5)
    send(client)
    httpx.get(f"{graph.url}/me")  # no token
    calls = graph.calls
    assert [(c.method, c.path, c.status) for c in calls] == [
        ("GET", f"/{ACCOUNT}/conversations", 200),
        ("POST", f"/{ACCOUNT}/messages", 200),
        ("GET", "/me", 400),
    ]
    assert all(isinstance(c, Call) and c.time >= before - 1 for c in calls)
    assert calls[0].query == {"platform": "instagram", "fields": EXPANDED, "limit": "5"}
    assert calls[0].token == TOKEN and calls[0].body is None
    assert calls[1].body == {"recipient": {"id": ALICE}, "message": {"text": "thanks!"}}
    assert calls[2].token is None
    assert graph.calls_matching("post") == [calls[1]]
    assert graph.calls_matching(path_contains="/conversations") == [calls[0]]
    assert graph.calls_matching("GET", "/me") == [calls[2]]
    graph.calls.clear()  # a copy
    assert len(graph.calls) == 3


def test_form_bodies_are_recorded_as_dicts(graph, client):
    graph.add_dm(ACCOUNT, ALICE, "hi")
    r = client.post(f"/{ACCOUNT}/messages", data={
        "recipient": json.dumps({"id": ALICE}), "message": json.dumps({"text": "form"})})
    assert r.status_code == 200
    assert graph.calls[-1].body == {"recipient": f'{{"id": "{ALICE}"}}', "message": '{"text": "form"}'}
    assert graph.sent_messages()[-1]["text"] == "form"


def test_reset_forgets_everything(graph, client):
    graph.add_dm(ACCOUNT, ALICE, "hi")
    send(client)
    graph.fail(times=None)
    graph.revoke_token(TOKEN)
    graph.reset()
    assert graph.calls == [] and graph.sent_messages() == []
    r = client.get("/me")
    assert_meta_error(r, 400, 190)  # accounts are gone too, but no fault answered
    graph.add_account(ACCOUNT, "shop", TOKEN)
    assert conversations(client).json() == {"data": []}


def test_wait_helpers(graph, client):
    graph.add_dm(ACCOUNT, ALICE, "hi")
    threading.Timer(0.1, lambda: send(client)).start()
    (sent,) = graph.wait_for_sent(1, timeout=3)
    assert sent["recipient_id"] == ALICE
    assert len(graph.wait_for_calls(1, method="POST", timeout=1)) == 1
    with pytest.raises(TimeoutError):
        graph.wait_for_calls(2, method="POST", timeout=0.1)


# ----------------------------------------------------------------------------------------------
# Conversations
# ----------------------------------------------------------------------------------------------


def test_listing_without_expansion_has_no_messages(graph, client):
    graph.add_dm(ACCOUNT, ALICE, "old", created_time=ago(hours=2))
    graph.add_dm(ACCOUNT, BOB, "new", created_time=ago(hours=1))
    for params in ({}, {"fields": "id,updated_time"}):
        body = conversations(client, **params).json()
        assert [set(c) for c in body["data"]] == [{"id", "updated_time"}] * 2
        assert body["data"][0]["id"] == graph.conversation_id(ACCOUNT, BOB)  # newest first
        assert "next" not in body["paging"]
        assert set(body["paging"]["cursors"]) == {"before", "after"}
    plain = conversations(client, fields="id,messages").json()["data"][0]["messages"]["data"]
    assert [set(m) for m in plain] == [{"id", "created_time"}]


def test_listing_with_expansion(graph, client):
    t1, t2 = ago(hours=3).replace(microsecond=0), ago(hours=2).replace(microsecond=0)
    m1 = graph.add_dm(ACCOUNT, ALICE, "hello", sender_username="alice", created_time=t1)
    m2 = graph.add_dm(ACCOUNT, ALICE, "anyone?", sender_username="alice", created_time=t2)
    graph.add_dm(OTHER, ALICE, "not yours")
    body = conversations(client, fields=EXPANDED).json()
    (conv,) = body["data"]
    assert conv["updated_time"] == t2.strftime(META_TIME)
    assert conv["messages"]["data"] == [
        {"id": m2, "created_time": t2.strftime(META_TIME), "from": {"id": ALICE, "username": "alice"},
         "to": {"data": [{"id": ACCOUNT, "username": "shop"}]}, "message": "anyone?"},
        {"id": m1, "created_time": t1.strftime(META_TIME), "from": {"id": ALICE, "username": "alice"},
         "to": {"data": [{"id": ACCOUNT, "username": "shop"}]}, "message": "hello"},
    ]
    only = conversations(client, fields="messages.limit(1){message}").json()["data"][0]
    assert only == {"id": conv["id"], "messages": {"data": [{"id": m2, "message": "anyone?"}]}}


def test_add_dm_reuses_conversation_and_ids_look_like_meta(graph, client):
    a = graph.add_dm(ACCOUNT, ALICE, "1", sender_username="alice", created_time=ago(hours=1))
    b = graph.add_dm(ACCOUNT, ALICE, "2")  # default username keeps "alice"
    graph.add_dm(ACCOUNT, ALICE, "late-arriving older one", created_time=ago(hours=5))
    (conv_body,) = conversations(client, fields=EXPANDED).json()["data"]
    assert [m["id"] for m in conv_body["messages"]["data"]][:2] == [b, a]
    assert conv_body["updated_time"] == conv_body["messages"]["data"][0]["created_time"]
    assert {m["from"]["username"] for m in conv_body["messages"]["data"]} == {"alice"}
    conv = graph.conversation_id(ACCOUNT, ALICE)
    assert conv and graph.conversation_id(ACCOUNT, BOB) is None
    assert a != b and a.startswith("aWdfZAG1faXRlbToxOklHTWVzc2FnZAUlEOj") and conv.startswith("aWdf")
    assert all(ch.isalnum() or ch in "-_" for ch in a + conv)
    assert format_time(datetime(2026, 11, 24, 9, 0, tzinfo=timezone.utc)) == "2026-11-24T09:00:00+0000"


def test_paging_follows_next_without_token(graph, client):
    for i in range(5):
        graph.add_dm(ACCOUNT, f"90{i}", f"m{i}", created_time=ago(minutes=10 - i))
    expected = [graph.conversation_id(ACCOUNT, f"90{i}") for i in reversed(range(5))]
    seen, pages = [], 0
    response = conversations(client, limit=2, fields=EXPANDED)
    while True:
        body = response.json()
        pages += 1
        seen += [c["id"] for c in body["data"]]
        assert all("messages" in c for c in body["data"])
        nxt = body["paging"].get("next")
        if nxt is None:
            break
        assert nxt.startswith(graph.url + f"/{ACCOUNT}/conversations?")
        assert TOKEN not in nxt and "access_token" not in nxt
        query = parse_qs(urlsplit(nxt).query)
        assert query["after"] == [body["paging"]["cursors"]["after"]]
        assert query["platform"] == ["instagram"] and query["limit"] == ["2"]
        response = client.get(nxt)
    assert (seen, pages) == (expected, 3)
    # the default page size is 25
    for i in range(5, 30):
        graph.add_dm(ACCOUNT, f"90{i}", "x")
    body = conversations(client).json()
    assert len(body["data"]) == 25 and "next" in body["paging"]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 12), limit=st.integers(1, 6))
def test_paging_yields_every_conversation_once(server, n, limit):
    server.reset()
    server.add_account(ACCOUNT, "shop", TOKEN)
    for i in range(n):
        server.add_dm(ACCOUNT, f"p{i}", "x", created_time=ago(minutes=100 - i))
    url, seen = f"{server.url}/{ACCOUNT}/conversations?platform=instagram&limit={limit}", []
    with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        while url:
            body = c.get(url).json()
            assert len(body["data"]) <= limit
            seen += [conv["id"] for conv in body["data"]]
            url = body.get("paging", {}).get("next")
    assert seen == [server.conversation_id(ACCOUNT, f"p{i}") for i in reversed(range(n))]


def test_listing_needs_platform_and_valid_params(graph, client):
    assert_meta_error(client.get(f"/{ACCOUNT}/conversations"), 400, 100)
    assert_meta_error(conversations(client, limit="zero"), 400, 100)
    assert_meta_error(conversations(client, after="garbage"), 400, 100)
    assert_meta_error(conversations(client, fields="id,bogus"), 400, 100)


def test_outgoing_messages_appear_in_the_thread(graph, client):
    graph.add_dm(ACCOUNT, ALICE, "hi", sender_username="alice", created_time=ago(hours=1))
    graph.add_dm(ACCOUNT, BOB, "yo", created_time=ago(minutes=30))
    message_id = send(client, ALICE, "hello alice").json()["message_id"]
    first = conversations(client, fields=EXPANDED).json()["data"][0]  # alice's thread is newest now
    assert first["id"] == graph.conversation_id(ACCOUNT, ALICE)
    newest = first["messages"]["data"][0]
    assert newest["id"] == message_id
    assert newest["from"] == {"id": ACCOUNT, "username": "shop"}
    assert newest["to"] == {"data": [{"id": ALICE, "username": "alice"}]}
    assert newest["message"] == "hello alice"
    assert first["updated_time"] == newest["created_time"]


def test_conversation_node_and_message_node(graph, client):
    mid = graph.add_dm(ACCOUNT, ALICE, "hi ✨", sender_username="alice")
    conv = graph.conversation_id(ACCOUNT, ALICE)
    body = client.get(f"/{conv}", params={"fields": "messages"}).json()
    created = body["messages"]["data"][0]["created_time"]
    assert body == {"id": conv, "messages": {"data": [{"id": mid, "created_time": created}]}}
    msg = client.get(f"/{mid}", params={"fields": "id,created_time,from,to,message"}).json()
    assert set(msg) == {"id", "created_time", "from", "to", "message"}
    assert msg["message"] == "hi ✨" and msg["from"] == {"id": ALICE, "username": "alice"}
    datetime.strptime(msg["created_time"], META_TIME)
    participants = client.get(f"/{conv}", params={"fields": "participants"}).json()["participants"]
    assert {p["id"] for p in participants["data"]} == {ACCOUNT, ALICE}


def test_only_twenty_most_recent_messages_are_readable(graph, client):
    ids = [graph.add_dm(ACCOUNT, ALICE, f"m{i}", created_time=ago(minutes=60 - i)) for i in range(25)]
    conv = graph.conversation_id(ACCOUNT, ALICE)
    listed = conversations(client, fields=EXPANDED).json()["data"][0]["messages"]["data"]
    assert [m["id"] for m in listed] == ids[:-21:-1]
    assert [m["message"] for m in listed][:2] == ["m24", "m23"]
    node = client.get(f"/{conv}", params={"fields": "messages"}).json()["messages"]["data"]
    assert [m["id"] for m in node] == ids[:-21:-1]
    assert all(set(m) == {"id", "created_time"} for m in node)
    assert client.get(f"/{ids[5]}", params={"fields": "message"}).json()["message"] == "m5"
    assert_meta_error(client.get(f"/{ids[4]}", params={"fields": "message"}), 400, 100, 33)


def test_unknown_ids_and_other_accounts_objects(graph, client):
    mine = graph.add_dm(ACCOUNT, ALICE, "x")
    theirs = graph.add_dm(OTHER, ALICE, "y")
    error = assert_meta_error(client.get("/aWdfZAGunknown"), 400, 100, 33)
    assert error["message"].startswith(
        "Unsupported get request. Object with ID 'aWdfZAGunknown' does not exist, cannot be loaded "
        "due to missing permissions, or does not support this operation.")
    assert_meta_error(client.get(f"/{theirs}"), 400, 100, 33)
    assert_meta_error(client.get(f"/{graph.conversation_id(OTHER, ALICE)}"), 400, 100, 33)
    assert_meta_error(client.get(f"/{OTHER}/conversations", params={"platform": "instagram"}), 400, 100, 33)
    assert_meta_error(client.get(f"/{OTHER}"), 400, 100, 33)
    assert client.get(f"/{mine}").status_code == 200


def test_unsupported_requests(graph, client):
    for response, verb in ((client.get(f"/{ACCOUNT}/nothing"), "get"),
                           (client.post(f"/{ACCOUNT}/nothing", json={}), "post"),
                           (client.delete(f"/{ACCOUNT}"), "delete")):
        error = assert_meta_error(response, 400, 100)
        assert error["message"].startswith(f"Unsupported {verb} request")
    # a wrong version prefix is refused too
    r = httpx.get(graph.url.replace("v23.0", "v1.0") + "/me", headers={"Authorization": f"Bearer {TOKEN}"})
    assert_meta_error(r, 400, 100)


# ----------------------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------------------


def test_missing_unknown_and_query_string_tokens_answer_190(graph):
    url = f"{graph.url}/{ACCOUNT}/conversations"
    assert_meta_error(httpx.get(url, params={"platform": "instagram"}), 400, 190)
    assert_meta_error(httpx.get(url, params={"platform": "instagram"},
                                headers={"Authorization": "Bearer nope"}), 400, 190)
    assert_meta_error(httpx.get(url, params={"platform": "instagram", "access_token": TOKEN}), 400, 190)
    assert_meta_error(httpx.post(f"{graph.url}/me/messages", json={}), 400, 190)


def test_revoke_token(graph, client):
    graph.add_account(ACCOUNT, "shop", "tok-second")
    assert client.get("/me").status_code == 200
    graph.revoke_token(TOKEN)
    for response in (client.get("/me"), send(client), conversations(client)):
        error = assert_meta_error(response, 400, 190, 460)
        assert "Error validating access token" in error["message"]
    assert graph.calls[-1].token == TOKEN and graph.calls[-1].status == 400
    ok = httpx.get(f"{graph.url}/me", headers={"Authorization": "Bearer tok-second"})
    assert ok.json()["id"] == ACCOUNT
    graph.clear_faults()
    assert client.get("/me").status_code == 200


# ----------------------------------------------------------------------------------------------
# Send API
# ----------------------------------------------------------------------------------------------


def test_send_api_success_on_both_paths(graph, client):
    graph.add_dm(ACCOUNT, ALICE, "hi")
    graph.add_dm(OTHER, BOB, "hey")
    r1 = send(client, ALICE, "one")
    r2 = send(client, ALICE, "two", path="/me/messages")
    r3 = httpx.post(f"{graph.url}/me/messages", headers={"Authorization": f"Bearer {OTHER_TOKEN}"},
                    json={"recipient": {"id": BOB}, "message": {"text": "three"}})
    assert r1.status_code == r2.status_code == r3.status_code == 200
    assert set(r1.json()) == {"recipient_id", "message_id"} and r1.json()["recipient_id"] == ALICE
    sent = graph.sent_messages()
    assert [(m["account_ig_id"], m["recipient_id"], m["text"]) for m in sent] == [
        (ACCOUNT, ALICE, "one"), (ACCOUNT, ALICE, "two"), (OTHER, BOB, "three")]
    assert [m["message_id"] for m in sent] == [r.json()["message_id"] for r in (r1, r2, r3)]
    assert all(m["time"].tzinfo is not None and abs(time.time() - m["time"].timestamp()) < 5 for m in sent)
    assert [m["text"] for m in graph.sent_messages(OTHER)] == ["three"]


@pytest.mark.parametrize("payload", [
    {"message": {"text": "x"}},
    {"recipient": {}, "message": {"text": "x"}},
    {"recipient": {"id": ALICE}},
    {"recipient": {"id": ALICE}, "message": {"text": ""}},
    {"recipient": {"id": ALICE}, "message": {"text": "é" * 501}},  # > 1000 bytes
    None,
])
def test_send_api_invalid_parameters(graph, client, payload):
    graph.add_dm(ACCOUNT, ALICE, "hi")
    r = client.post(f"/{ACCOUNT}/messages", json=payload) if payload else client.post(f"/{ACCOUNT}/messages")
    assert_meta_error(r, 400, 100)
    assert graph.sent_messages() == []


def test_send_api_person_not_available(graph, client):
    graph.add_dm(OTHER, ALICE, "talking to the other account")
    error = assert_meta_error(send(client, ALICE), 400, 551, 1545041)
    assert "This person isn't available right now." in error["message"]
    assert graph.sent_messages() == []


def test_send_api_outside_the_24h_window(graph, client):
    graph.add_dm(ACCOUNT, ALICE, "old", created_time=ago(hours=24, minutes=1))
    graph.add_dm(ACCOUNT, BOB, "recent enough", created_time=ago(hours=23, minutes=59))
    assert_meta_error(send(client, ALICE), 400, 10, 2534022)
    assert send(client, BOB).status_code == 200
    # our own later message does not reopen the window
    assert_meta_error(send(client, ALICE), 400, 10, 2534022)
    assert [m["recipient_id"] for m in graph.sent_messages()] == [BOB]
    # the HUMAN_AGENT tag allows 7 days
    r = client.post(f"/{ACCOUNT}/messages", json={
        "recipient": {"id": ALICE}, "message": {"text": "agent"}, "tag": "HUMAN_AGENT"})
    assert r.status_code == 200


def test_send_api_to_another_accounts_id(graph, client):
    graph.add_dm(OTHER, ALICE, "hi")
    assert_meta_error(send(client, ALICE, path=f"/{OTHER}/messages"), 400, 100, 33)
    assert graph.sent_messages() == []


def test_concurrent_sends_are_thread_safe(graph):
    graph.add_dm(ACCOUNT, ALICE, "hi")

    def one(i):
        return httpx.post(f"{graph.url}/me/messages", headers={"Authorization": f"Bearer {TOKEN}"},
                          json={"recipient": {"id": ALICE}, "message": {"text": f"n{i}"}}, timeout=10)

    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(one, range(50)))
    assert all(r.status_code == 200 for r in responses)
    ids = {r.json()["message_id"] for r in responses}
    assert len(ids) == 50
    sent = graph.sent_messages(ACCOUNT)
    assert {m["message_id"] for m in sent} == ids and {m["text"] for m in sent} == {f"n{i}" for i in range(50)}
    assert len(graph.calls_matching("POST", "/messages")) == 50


# ----------------------------------------------------------------------------------------------
# Faults
# ----------------------------------------------------------------------------------------------


def test_fail_times_then_success(graph, client):
    graph.add_dm(ACCOUNT, ALICE, "hi")
    graph.fail(times=2, method="POST", path_contains="/messages")
    assert conversations(client).status_code == 200  # other requests are not affected
    for _ in range(2):
        error = assert_meta_error(send(client), 500, 2)
        assert error["is_transient"] is True
        assert error["message"] == "An unexpected error has occurred. Please retry your request later."
    assert send(client).status_code == 200
    assert len(graph.sent_messages()) == 1  # failed requests had no effect
    assert [c.status for c in graph.calls_matching("POST")] == [500, 500, 200]
    assert all(c.token == TOKEN for c in graph.calls)


def test_fail_with_code_subcode_headers_and_until_cleared(graph, client):
    graph.fail(400, code=368, subcode=1390008, message="(#368) Blocked", is_transient=False,
               times=None, path_contains="/me", headers={"Retry-After": "7"})
    for _ in range(3):
        r = client.get("/me")
        error = assert_meta_error(r, 400, 368, 1390008)
        assert error["message"] == "(#368) Blocked" and error["is_transient"] is False
        assert r.headers["retry-after"] == "7"
        assert "x-app-usage" in r.headers
    graph.clear_faults()
    assert client.get("/me").status_code == 200


def test_first_matching_fault_wins(graph, client):
    graph.fail(503, code=1, times=1, method="GET")
    graph.fail(500, times=1)
    assert_meta_error(client.get("/me"), 503, 1)
    assert_meta_error(client.get("/me"), 500, 2)
    assert client.get("/me").status_code == 200
    with pytest.raises(ValueError):
        graph.fail(times=0)


def test_delay_applies_the_effect_before_answering(graph, client):
    graph.add_dm(ACCOUNT, ALICE, "hi")
    graph.delay(0.6, method="POST", path_contains="/messages")
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        client.post(f"/{ACCOUNT}/messages", timeout=0.2,
                    json={"recipient": {"id": ALICE}, "message": {"text": "late"}})
    assert time.monotonic() - started < 0.5
    # Instagram delivered it although the answer never reached us
    (sent,) = graph.sent_messages()
    assert sent["text"] == "late"
    assert graph.calls[-1].status == 200
    # times=1: the next answer is prompt
    started = time.monotonic()
    assert send(client).status_code == 200
    assert time.monotonic() - started < 0.3


def test_delay_answers_late_with_the_real_response(graph, client):
    graph.delay(0.3, times=2, path_contains="/me")
    started = time.monotonic()
    assert client.get("/me").json()["id"] == ACCOUNT
    assert client.get("/me").status_code == 200
    assert time.monotonic() - started >= 0.6
    assert conversations(client).status_code == 200


@pytest.mark.parametrize("code", [4, 17, 32, 613, 80002, 80006])
def test_rate_limit_codes_and_headers(graph, client, code):
    graph.add_dm(ACCOUNT, ALICE, "hi")
    graph.rate_limit(ACCOUNT, code=code, minutes=7, times=2)
    # other accounts are not limited
    other = httpx.get(f"{graph.url}/me", headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
    assert other.status_code == 200
    for response in (send(client), conversations(client)):
        error = assert_meta_error(response, 400, code)
        assert error["is_transient"] is True and error["message"].startswith(f"(#{code})")
        usage = json.loads(response.headers["x-business-use-case-usage"])[ACCOUNT][0]
        assert usage["call_count"] == 100 and usage["estimated_time_to_regain_access"] == 7
        assert usage["type"] == ("messenger" if code == 80006 else "instagram")
        if code == 4:
            assert json.loads(response.headers["x-app-usage"])["call_count"] == 100
    assert graph.sent_messages() == []
    ok = conversations(client)
    assert ok.status_code == 200
    assert json.loads(ok.headers["x-business-use-case-usage"])[ACCOUNT][0]["call_count"] < 100


def test_rate_limit_matches_objects_of_the_account_and_custom_status(graph, client):
    mid = graph.add_dm(ACCOUNT, ALICE, "hi")
    graph.rate_limit(ACCOUNT, code=17, status=403, times=None)
    assert_meta_error(client.get(f"/{mid}"), 403, 17)
    assert_meta_error(client.get("/me"), 403, 17)
    graph.clear_faults()
    assert client.get(f"/{mid}").status_code == 200
    with pytest.raises(ValueError):
        graph.rate_limit(ACCOUNT, code=100)


# ----------------------------------------------------------------------------------------------
# Error bodies match the recorded ones
# ----------------------------------------------------------------------------------------------


def test_recorded_error_fixtures_share_the_reference_shape():
    """The airbyte recordings use the same core keys as python-facebook's error.json."""
    for path in sorted((SHARED / "airbyte").glob("*error*.json")):
        error = json.loads(path.read_text())["error"]
        for key, value in REFERENCE_ERROR.items():
            assert type(error[key]) is type(value), (path.name, key)
        if "error_subcode" in error:
            assert isinstance(error["error_subcode"], int)


def test_every_error_kind_has_the_recorded_shape(graph, client):
    """One request per error the fake can produce, each checked against error.json."""
    graph.add_dm(ACCOUNT, ALICE, "old", created_time=ago(days=2))
    graph.add_dm(OTHER, BOB, "hi")
    checks = [
        (httpx.get(f"{graph.url}/me"), 400, 190, None),
        (client.get("/nope"), 400, 100, 33),
        (client.get(f"/{ACCOUNT}/nothing"), 400, 100, None),
        (client.get(f"/{ACCOUNT}/conversations"), 400, 100, None),
        (client.post("/me/messages", json={}), 400, 100, None),
        (send(client, BOB), 400, 551, 1545041),
        (send(client, ALICE), 400, 10, 2534022),
    ]
    graph.fail(502, times=1)
    checks.append((client.get("/me"), 502, 2, None))
    graph.rate_limit(ACCOUNT)
    checks.append((client.get("/me"), 400, 80002, None))
    graph.revoke_token(TOKEN)
    checks.append((client.get("/me"), 400, 190, 460))
    for response, status, code, subcode in checks:
        assert_meta_error(response, status, code, subcode)


# ----------------------------------------------------------------------------------------------
# Shapes of the recorded bodies
# ----------------------------------------------------------------------------------------------


def recorded(relative: str):
    """A recorded body: "publish/container_info.json" (python-facebook) or "airbyte/..."."""
    base = SHARED if relative.startswith("airbyte/") else APIDATA
    return json.loads((base / relative).read_text())


def assert_same_shape(actual, reference, where="body"):
    """Where both have a key, the values have the same JSON type, recursively (each item of a
    list against the reference's first item); dicts must share at least one key."""
    if isinstance(reference, dict):
        assert isinstance(actual, dict), where
        common = set(actual) & set(reference)
        assert common, f"{where}: no key in common with {sorted(reference)}"
        for key in common:
            assert_same_shape(actual[key], reference[key], f"{where}.{key}")
    elif isinstance(reference, list):
        assert isinstance(actual, list), where
        if reference:
            for item in actual:
                assert_same_shape(item, reference[0], f"{where}[]")
    else:
        assert type(actual) is type(reference), f"{where}: {actual!r} vs {reference!r}"


# ----------------------------------------------------------------------------------------------
# Content publishing
# ----------------------------------------------------------------------------------------------

IMG, VID = "https://cdn.example.com/p/1.jpg", "https://cdn.example.com/v/1.mp4"
STATUS_FIELDS = {"fields": "id,status_code,status"}


def create(client, how="form", account=ACCOUNT, **params):
    """POST /{account}/media with the parameters in the query string, a form or a JSON body."""
    if how == "query":
        return client.post(f"/{account}/media", params=params)
    if how == "json":
        return client.post(f"/{account}/media", json=params)
    return client.post(f"/{account}/media", data=params)


def container(client, **params) -> str:
    r = create(client, **params)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def publish(client, creation_id, account=ACCOUNT, **kw):
    return client.post(f"/{account}/media_publish", params={"creation_id": creation_id}, **kw)


def status_of(client, container_id) -> dict:
    return client.get(f"/{container_id}", params=STATUS_FIELDS).json()


def quota(client, account=ACCOUNT) -> dict:
    r = client.get(f"/{account}/content_publishing_limit", params={"fields": "quota_usage,config"})
    assert r.status_code == 200, r.text
    return r.json()["data"][0]


@pytest.mark.parametrize("how", ["query", "form", "json"])
def test_image_is_created_and_published(graph, client, how):
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    r = create(client, how, image_url=IMG, caption="new shoes #shop")
    assert r.status_code == 200 and set(r.json()) == {"id"}
    cid = r.json()["id"]
    assert cid.isdigit() and len(cid) == 17
    assert graph.containers() == [{
        "container_id": cid, "kind": "IMAGE", "status_code": "FINISHED",
        "caption": "new shoes #shop", "urls": [IMG], "account_ig_id": ACCOUNT,
        "created": graph.containers()[0]["created"],
    }]
    assert graph.containers()[0]["created"] >= before
    assert status_of(client, cid) == {
        "id": cid, "status_code": "FINISHED",
        "status": "Finished: Media has been uploaded and it is ready to be published."}
    assert client.get(f"/{cid}").json() == {"id": cid}  # default fields

    r = publish(client, cid)
    assert r.status_code == 200 and set(r.json()) == {"id"}
    media_id = r.json()["id"]
    assert media_id.isdigit() and media_id != cid
    assert status_of(client, cid)["status_code"] == "PUBLISHED"
    assert graph.containers()[0]["status_code"] == "PUBLISHED"
    (media,) = graph.published_media()
    assert media["media_id"] == media_id and media["container_id"] == cid
    assert (media["caption"], media["media_type"], media["account_ig_id"]) == (
        "new shoes #shop", "IMAGE", ACCOUNT)
    assert before <= media["time"] <= datetime.now(timezone.utc)
    node = client.get(f"/{media_id}", params={
        "fields": "id,caption,media_type,permalink,timestamp,like_count,comments_count"}).json()
    assert node == {"id": media_id, "caption": "new shoes #shop", "media_type": "IMAGE",
                    "permalink": media["permalink"], "timestamp": format_time(media["time"]),
                    "like_count": 0, "comments_count": 0}
    assert re.fullmatch(r"https://www\.instagram\.com/p/[A-Za-z0-9_-]{11}/", media["permalink"])
    call = graph.calls_matching("POST", "/media")[0]
    assert call.token == TOKEN and call.status == 200
    expected_body = {"query": None, "form": {"image_url": IMG, "caption": "new shoes #shop"},
                     "json": {"image_url": IMG, "caption": "new shoes #shop"}}[how]
    assert call.body == expected_body


def test_container_kinds_publish_as_their_media_types(graph, client):
    cases = [
        ({"image_url": IMG}, "IMAGE", "IMAGE", "FEED"),
        ({"image_url": IMG, "media_type": "image"}, "IMAGE", "IMAGE", "FEED"),
        ({"media_type": "REELS", "video_url": VID}, "REELS", "REELS", "REELS"),
        ({"media_type": "VIDEO", "video_url": VID}, "VIDEO", "VIDEO", "FEED"),
        ({"media_type": "STORIES", "image_url": IMG}, "STORIES", "STORY", "STORY"),
        ({"media_type": "STORIES", "video_url": VID}, "STORIES", "STORY", "STORY"),
    ]
    for params, kind, media_type, product in cases:
        cid = container(client, **params)
        media_id = publish(client, cid).json()["id"]
        assert graph.containers()[-1]["kind"] == kind
        node = client.get(f"/{media_id}", params={"fields": "media_type,media_product_type"}).json()
        assert (node["media_type"], node["media_product_type"]) == (media_type, product), params
    # carousel: children created with is_carousel_item, parent with children (string or list)
    a = container(client, image_url=IMG, is_carousel_item="true")
    b = container(client, how="json", video_url=VID, media_type="VIDEO", is_carousel_item=True)
    c = container(client, video_url=VID, is_carousel_item="true")  # video without media_type
    kinds = {x["container_id"]: x for x in graph.containers()}
    assert [kinds[x]["kind"] for x in (a, b, c)] == ["CAROUSEL_ITEM"] * 3
    parent = container(client, media_type="CAROUSEL", children=f"{a},{b}", caption="album")
    parent2 = container(client, how="json", media_type="CAROUSEL", children=[b, c])
    assert {x["container_id"]: x for x in graph.containers()}[parent]["urls"] == [IMG, VID]
    album = publish(client, parent).json()["id"]
    assert publish(client, parent2).status_code == 200
    assert client.get(f"/{album}", params={"fields": "media_type,caption"}).json() == {
        "id": album, "media_type": "CAROUSEL_ALBUM", "caption": "album"}
    assert [m["media_type"] for m in graph.published_media()] == [
        "IMAGE", "IMAGE", "REELS", "VIDEO", "STORY", "STORY", "CAROUSEL_ALBUM", "CAROUSEL_ALBUM"]
    # stories are listed by /stories, not by /media
    listed = client.get(f"/{ACCOUNT}/media", params={"fields": "media_type", "limit": 50}).json()
    assert "STORY" not in {m["media_type"] for m in listed["data"]} and len(listed["data"]) == 6
    stories = client.get("/me/stories", params={"fields": "media_type"}).json()["data"]
    assert [m["media_type"] for m in stories] == ["STORY", "STORY"]


@pytest.mark.parametrize("params, code, subcode", [
    ({}, 100, None),
    ({"caption": "no media"}, 100, None),
    ({"image_url": "ftp://cdn.example.com/1.jpg"}, 9004, 2207052),
    ({"image_url": "cdn.example.com/1.jpg"}, 9004, 2207052),
    ({"image_url": "https://"}, 9004, 2207052),
    ({"media_type": "REELS", "video_url": "file:///etc/passwd"}, 9004, 2207052),
    ({"media_type": "STORIES", "video_url": "javascript:alert(1)"}, 9004, 2207052),
    ({"image_url": IMG, "is_carousel_item": "true", "caption": "x"}, None, None),  # allowed
    ({"media_type": "REELS"}, 100, None),
    ({"media_type": "REELS", "image_url": IMG}, 100, None),
    ({"media_type": "STORIES"}, 100, None),
    ({"media_type": "STORIES", "image_url": IMG, "video_url": VID}, 100, None),
    ({"media_type": "BOGUS", "image_url": IMG}, 100, None),
    ({"media_type": "REELS", "video_url": VID, "is_carousel_item": "true"}, 100, None),
    ({"image_url": IMG, "is_carousel_item": "maybe"}, 100, None),
    ({"image_url": IMG, "caption": "x" * 2201}, 36004, 2207010),
    ({"media_type": "CAROUSEL"}, 100, 2207028),
])
def test_invalid_containers_are_refused(graph, client, params, code, subcode):
    r = create(client, **params)
    if code is None:
        assert r.status_code == 200
        return
    assert_meta_error(r, 400, code, subcode)
    assert graph.containers() == []


def test_caption_limit_and_messages(graph, client):
    assert create(client, image_url=IMG, caption="é" * 2200).status_code == 200
    error = assert_meta_error(create(client, image_url=IMG, caption="x" * 2201), 400, 36004, 2207010)
    assert "caption" in error["message"]
    error = assert_meta_error(create(client, image_url="ftp://x/1.jpg"), 400, 9004, 2207052)
    assert error["message"] == ("Media download has failed. The media URI doesn't meet our "
                                "requirements.")
    assert_meta_error(create(client, account=OTHER, image_url=IMG), 400, 100, 33)
    assert len(graph.containers()) == 1


def test_carousel_children_must_be_2_to_10_finished_items_of_the_account(graph, client):
    items = [container(client, image_url=IMG, is_carousel_item="true") for _ in range(11)]
    image = container(client, image_url=IMG)
    with httpx.Client(base_url=graph.url, headers={"Authorization": f"Bearer {OTHER_TOKEN}"}) as other:
        theirs = container(other, account=OTHER, image_url=IMG, is_carousel_item="true")
    graph.set_video_processing(checks=1)
    busy = container(client, video_url=VID, media_type="VIDEO", is_carousel_item="true")
    for children in ([items[0]], items, [items[0], "17900000000000000"], [items[0], theirs],
                     [items[0], image], [items[0], busy], [items[0], items[0]], []):
        r = create(client, media_type="CAROUSEL", children=",".join(children))
        assert_meta_error(r, 400, 100, 2207028)
    assert status_of(client, busy)["status_code"] == "IN_PROGRESS"  # its one IN_PROGRESS read
    assert create(client, media_type="CAROUSEL", children=f"{items[0]},{busy}").status_code == 200
    assert create(client, media_type="CAROUSEL", children=",".join(items[:10])).status_code == 200
    assert create(client, how="json", media_type="CAROUSEL",
                  children=json.dumps(items[:2])).status_code == 200
    assert [c["kind"] for c in graph.containers(ACCOUNT)][-3:] == ["CAROUSEL"] * 3
    assert [c["container_id"] for c in graph.containers(OTHER)] == [theirs]


def test_video_stays_in_progress_for_n_status_reads(graph, client):
    early = container(client, media_type="REELS", video_url=VID)  # before the setting: at once
    graph.set_video_processing(checks=3)
    image = container(client, image_url=IMG)
    reel = container(client, media_type="REELS", video_url=VID, caption="reel")
    assert status_of(client, early)["status_code"] == "FINISHED"
    assert status_of(client, image)["status_code"] == "FINISHED"
    for _ in range(3):
        assert_meta_error(publish(client, reel), 400, 9007, 2207027)
        assert client.get(f"/{reel}").json() == {"id": reel}  # not a status read
        body = status_of(client, reel)
        assert body == {"id": reel, "status_code": "IN_PROGRESS",
                        "status": "In Progress: Media is still being processed."}
    # after the third IN_PROGRESS read processing is over
    assert [c["status_code"] for c in graph.containers() if c["container_id"] == reel] == ["FINISHED"]
    assert status_of(client, reel)["status_code"] == "FINISHED"
    assert client.get(f"/{reel}", params={"fields": "status_code"}).json() == {
        "id": reel, "status_code": "FINISHED"}
    assert publish(client, reel).status_code == 200
    assert [m["caption"] for m in graph.published_media()] == ["reel"]
    error = assert_meta_error(publish(client, container(client, media_type="VIDEO", video_url=VID)),
                              400, 9007, 2207027)
    assert error["message"] == "Media ID is not available"


def test_video_processing_can_end_in_error_or_expired(graph, client):
    graph.set_video_processing(checks=1, final="ERROR")
    failed = container(client, media_type="REELS", video_url=VID)
    assert status_of(client, failed)["status_code"] == "IN_PROGRESS"
    body = status_of(client, failed)
    assert body["status_code"] == "ERROR" and "2207026" in body["status"]
    assert_meta_error(publish(client, failed), 400, 9007, 2207027)
    graph.set_video_processing(final="error", status="Error: 2207053 unknown upload error")
    story = container(client, media_type="STORIES", video_url=VID)
    assert status_of(client, story) == {"id": story, "status_code": "ERROR",
                                        "status": "Error: 2207053 unknown upload error"}
    graph.set_video_processing(final="EXPIRED")
    expired = container(client, media_type="REELS", video_url=VID)
    assert status_of(client, expired)["status_code"] == "EXPIRED"
    assert_meta_error(publish(client, expired), 400, 24, 2207008)
    assert graph.published_media() == []
    for bad in ({"final": "PUBLISHED"}, {"final": "IN_PROGRESS"}, {"checks": -1}):
        with pytest.raises(ValueError):
            graph.set_video_processing(**bad)
    graph.reset()
    graph.add_account(ACCOUNT, "shop", TOKEN)
    assert status_of(client, container(client, media_type="REELS", video_url=VID))[
        "status_code"] == "FINISHED"


def test_publishing_a_container_twice_makes_one_media(graph, client):
    cid = container(client, image_url=IMG)
    first = publish(client, cid)
    assert first.status_code == 200
    error = assert_meta_error(publish(client, cid), 400, 100, 2207006)
    assert error["message"] == "The media has already been published"
    assert [m["media_id"] for m in graph.published_media()] == [first.json()["id"]]
    # the same container published from 20 threads at once: still one media
    cid = container(client, image_url=IMG, caption="race")

    def one(_):
        return httpx.post(f"{graph.url}/{ACCOUNT}/media_publish", params={"creation_id": cid},
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)

    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(one, range(20)))
    assert sorted(r.status_code for r in responses) == [200] + [400] * 19
    assert all(r.json()["error"]["error_subcode"] == 2207006 for r in responses if r.status_code == 400)
    assert [m["caption"] for m in graph.published_media()] == ["", "race"]


def test_publish_errors(graph, client):
    item = container(client, image_url=IMG, is_carousel_item="true")
    with httpx.Client(base_url=graph.url, headers={"Authorization": f"Bearer {OTHER_TOKEN}"}) as other:
        theirs = container(other, account=OTHER, image_url=IMG)
    mine = container(client, image_url=IMG)
    assert_meta_error(client.post(f"/{ACCOUNT}/media_publish"), 400, 100)
    assert_meta_error(publish(client, "17900000000000000"), 400, 100, 33)
    assert_meta_error(publish(client, theirs), 400, 100, 33)
    assert_meta_error(publish(client, theirs, account=OTHER), 400, 100, 33)  # not our account
    assert_meta_error(publish(client, item), 400, 100)
    assert graph.published_media() == []
    r = client.post("/me/media_publish", data={"creation_id": mine})  # form body, /me
    assert r.status_code == 200


def test_publishing_quota(graph, client):
    assert quota(client) == {"quota_usage": 0, "config": {"quota_total": 50, "quota_duration": 86400}}
    graph.set_publish_quota(total=3, used=1)
    graph.add_media(ACCOUNT, caption="posted in the app")  # does not count
    assert quota(client) == {"quota_usage": 1, "config": {"quota_total": 3, "quota_duration": 86400}}
    for _ in range(2):
        assert publish(client, container(client, image_url=IMG)).status_code == 200
    assert quota(client)["quota_usage"] == 3
    blocked = container(client, image_url=IMG)
    assert_meta_error(publish(client, blocked), 400, 9, 2207042)
    assert status_of(client, blocked)["status_code"] == "FINISHED"
    assert len(graph.published_media(ACCOUNT)) == 3  # the seeded one + 2
    # the quota is per account
    with httpx.Client(base_url=graph.url, headers={"Authorization": f"Bearer {OTHER_TOKEN}"}) as other:
        assert quota(other, OTHER)["quota_usage"] == 1
        assert publish(other, container(other, account=OTHER, image_url=IMG), OTHER).status_code == 200
    graph.set_publish_quota(total=5)
    assert publish(client, blocked).status_code == 200
    # default fields, bad fields, other account
    r = client.get(f"/{ACCOUNT}/content_publishing_limit")
    assert r.json() == {"data": [{"quota_usage": 3}]}
    assert_meta_error(client.get("/me/content_publishing_limit", params={"fields": "bogus"}), 400, 100)
    assert_meta_error(client.get(f"/{OTHER}/content_publishing_limit"), 400, 100, 33)
    with pytest.raises(ValueError):
        graph.set_publish_quota(total=-1)


def test_delay_on_media_publish_still_publishes(graph, client):
    cid = container(client, image_url=IMG, caption="late answer")
    graph.delay(0.6, method="POST", path_contains="/media_publish")
    with pytest.raises(httpx.ReadTimeout):
        publish(client, cid, timeout=0.2)
    (media,) = graph.published_media()  # Instagram published it; the answer never came
    assert media["container_id"] == cid
    assert graph.calls_matching("POST", "/media_publish")[0].status == 200
    # the retry is refused, and the media can be found to reconcile
    assert_meta_error(publish(client, cid), 400, 100, 2207006)
    listed = client.get(f"/{ACCOUNT}/media", params={"fields": "id,caption,timestamp,permalink,media_type"})
    assert listed.json()["data"][0] == {
        "id": media["media_id"], "caption": "late answer", "timestamp": format_time(media["time"]),
        "permalink": media["permalink"], "media_type": "IMAGE"}
    assert len(graph.published_media()) == 1


def test_media_listing_is_newest_first_and_paged(graph, client):
    ids = [graph.add_media(ACCOUNT, caption=f"m{i}", timestamp=ago(minutes=30 - i)) for i in range(7)]
    graph.add_media(ACCOUNT, media_type="STORY")
    graph.add_media(OTHER, caption="theirs")
    seen, pages = [], 0
    response = client.get(f"/{ACCOUNT}/media", params={"fields": "id,caption", "limit": 3})
    while True:
        body = response.json()
        pages += 1
        assert len(body["data"]) <= 3
        seen += [m["id"] for m in body["data"]]
        assert set(body["paging"]["cursors"]) == {"before", "after"}
        nxt = body["paging"].get("next")
        if nxt is None:
            break
        assert nxt.startswith(f"{graph.url}/{ACCOUNT}/media?") and "access_token" not in nxt
        assert parse_qs(urlsplit(nxt).query)["fields"] == ["id,caption"]
        response = client.get(nxt)
    assert (seen, pages) == (ids[::-1], 3)
    assert client.get("/me/media").json()["data"][0] == {"id": ids[-1]}  # default fields: id
    before = client.get(f"/{ACCOUNT}/media", params={
        "limit": 2, "before": _cursor_of(client, ids[2])}).json()
    assert [m["id"] for m in before["data"]] == [ids[4], ids[3]]
    for _ in range(30):
        graph.add_media(ACCOUNT)
    body = client.get(f"/{ACCOUNT}/media").json()
    assert len(body["data"]) == 25 and "next" in body["paging"]
    assert_meta_error(client.get(f"/{ACCOUNT}/media", params={"after": "junk"}), 400, 100)
    assert_meta_error(client.get(f"/{ACCOUNT}/media", params={"limit": "0"}), 400, 100)
    assert_meta_error(client.get(f"/{ACCOUNT}/media", params={"fields": "id,bogus"}), 400, 100)
    assert_meta_error(client.get(f"/{OTHER}/media"), 400, 100, 33)
    assert client.get(f"/{ACCOUNT}/stories").json()["data"][0].keys() == {"id"}


def _cursor_of(client, media_id):
    """The `after` cursor naming a media (read from a listing page)."""
    url = f"/{ACCOUNT}/media"
    params = {"limit": 1}
    while True:
        body = client.get(url, params=params).json()
        if body["data"][0]["id"] == media_id:
            return body["paging"]["cursors"]["after"]
        params = {"limit": 1, "after": body["paging"]["cursors"]["after"]}


def test_media_node_and_listing_match_the_recorded_bodies(graph, client):
    plain = graph.add_media(ACCOUNT, timestamp=datetime(2021, 8, 13, 8, 25, 28, tzinfo=timezone.utc))
    graph.add_media(ACCOUNT, caption="with caption", media_type="REELS")
    fields = "id,comments_count,like_count,media_type,media_url,permalink,timestamp"
    node = client.get(f"/{plain}", params={"fields": fields}).json()
    reference = recorded("users/medias_p1.json")
    assert set(node) == set(reference["data"][0])  # no caption key when there is none
    assert_same_shape(node, reference["data"][0])
    assert node["timestamp"] == "2021-08-13T08:25:28+0000"
    body = client.get(f"/{ACCOUNT}/media", params={"fields": fields + ",caption", "limit": 1}).json()
    assert set(body) == set(reference) and set(body["paging"]) == set(reference["paging"])
    assert set(body["paging"]["cursors"]) == set(reference["paging"]["cursors"])
    assert_same_shape(body, reference)
    assert body["data"][0]["caption"] == "with caption"
    everything = client.get(f"/{plain}", params={
        "fields": "id,media_product_type,shortcode,username,owner"}).json()
    assert everything["username"] == "shop" and everything["owner"] == {"id": ACCOUNT}
    assert everything["media_product_type"] == "FEED" and len(everything["shortcode"]) == 11
    assert_meta_error(client.get(f"/{plain}", params={"fields": "id,bogus"}), 400, 100)
    theirs = graph.add_media(OTHER)
    assert_meta_error(client.get(f"/{theirs}"), 400, 100, 33)
    with pytest.raises(ValueError):
        graph.add_media(ACCOUNT, media_type="CAROUSEL")
    with pytest.raises(KeyError):
        graph.add_media("999")


def test_publishing_bodies_match_the_recorded_bodies(graph, client):
    photo = create(client, image_url=IMG).json()
    assert set(photo) == set(recorded("publish/create_photo.json"))
    assert_same_shape(photo, recorded("publish/create_photo.json"))
    video = create(client, media_type="REELS", video_url=VID).json()
    assert_same_shape(video, recorded("publish/create_video.json"))
    info = status_of(client, photo["id"])
    assert set(info) == set(recorded("publish/container_info.json"))
    assert_same_shape(info, recorded("publish/container_info.json"))
    assert info["status"] == recorded("publish/container_info.json")["status"]
    published = publish(client, photo["id"]).json()
    assert set(published) == set(recorded("publish/publish_container.json"))
    assert_same_shape(published, recorded("publish/publish_container.json"))
    limit = client.get(f"/{ACCOUNT}/content_publishing_limit",
                       params={"fields": "quota_usage,config"}).json()
    for name in ("publish/publish_limit_resp.json", "users/content_publish_limit.json"):
        reference = recorded(name)
        assert set(limit["data"][0]) == set(reference["data"][0])
        assert set(limit["data"][0]["config"]) == set(reference["data"][0]["config"])
        assert_same_shape(limit, reference)


# ----------------------------------------------------------------------------------------------
# Comments and moderation
# ----------------------------------------------------------------------------------------------

FULL_COMMENT = "id,text,timestamp,username,from,hidden,like_count,parent_id"


def comments(client, media_id, **params):
    return client.get(f"/{media_id}/comments", params=params)


def all_pages(client, response) -> list[dict]:
    """Follow `next` links to the end; every item of every page."""
    items = []
    while True:
        assert response.status_code == 200, response.text
        body = response.json()
        items += body["data"]
        nxt = body.get("paging", {}).get("next")
        if nxt is None:
            return items
        assert "access_token" not in nxt
        response = client.get(nxt)


def test_comments_listing_matches_the_recorded_bodies(graph, client):
    media = graph.add_media(ACCOUNT)
    old = graph.add_comment(media, "Beautiful!", username="ana",
                            timestamp=datetime(2020, 6, 1, 10, 16, 39, tzinfo=timezone.utc))
    new = graph.add_comment(media, "Beautiful!", username="lixiang",
                            timestamp=datetime(2020, 6, 1, 10, 56, 52, tzinfo=timezone.utc))
    oldest = graph.add_comment(media, "@ikroskun", username="ikroskun",
                               timestamp=datetime(2020, 2, 24, 9, 11, tzinfo=timezone.utc))
    p1, p2 = recorded("medias/comments_p1.json"), recorded("medias/comments_p2.json")
    first = comments(client, media, limit=2).json()  # default fields: timestamp, text, id
    assert [c["id"] for c in first["data"]] == [new, old]
    assert first["data"][0] == {"id": new, "timestamp": "2020-06-01T10:56:52+0000", "text": "Beautiful!"}
    assert set(first) == set(p1) and set(first["data"][0]) == set(p1["data"][0])
    assert set(p1["paging"]) <= set(first["paging"]) and "after" in first["paging"]["cursors"]
    assert_same_shape(first, p1)
    query = parse_qs(urlsplit(first["paging"]["next"]).query)
    assert query["limit"] == ["2"] and query["after"] == [first["paging"]["cursors"]["after"]]
    second = client.get(first["paging"]["next"]).json()
    assert second == {"data": [{"id": oldest, "timestamp": "2020-02-24T09:11:00+0000", "text": "@ikroskun"}]}
    assert set(second) == set(p2)  # the last page has no paging object
    assert_same_shape(second, p2)
    node = client.get(f"/{new}", params={"fields": "id,like_count,text,timestamp,username"}).json()
    assert set(node) == set(recorded("comments/comment_fields.json"))
    assert_same_shape(node, recorded("comments/comment_fields.json"))
    assert client.get(f"/{new}").json() == first["data"][0]
    full = comments(client, media, fields=FULL_COMMENT).json()["data"][0]
    assert full == {"id": new, "text": "Beautiful!", "timestamp": "2020-06-01T10:56:52+0000",
                    "username": "lixiang", "from": {"id": graph.comment(new)["from_id"],
                                                    "username": "lixiang"},
                    "hidden": False, "like_count": 0}  # no parent_id on a top-level comment
    assert comments(client, graph.add_media(ACCOUNT)).json() == {"data": []}


def test_ten_thousand_comments_are_paged_completely(graph, client):
    media = graph.add_media(ACCOUNT)
    started = time.perf_counter()
    ids = graph.add_comments(media, 10_000)
    assert time.perf_counter() - started < 1.0
    assert len(set(ids)) == 10_000 and all(i.isdigit() for i in ids)
    seen, pages = [], 0
    response = comments(client, media, fields="id,text", limit=100)  # capped at 50
    while True:
        body = response.json()
        pages += 1
        assert len(body["data"]) == 50
        seen += [c["id"] for c in body["data"]]
        if "paging" not in body:
            break
        response = client.get(body["paging"]["next"])
    assert pages == 200 and len(set(seen)) == len(seen) == 10_000
    assert seen == ids[::-1]  # newest first: the last added is the newest
    assert body["data"][-1]["text"] == "comment 0"


def test_comment_pages_hold_25_by_default_and_50_at_most(graph, client):
    media = graph.add_media(ACCOUNT)
    graph.add_comments(media, 60)
    assert len(comments(client, media).json()["data"]) == 25
    assert len(comments(client, media, limit=1000).json()["data"]) == 50
    assert len(comments(client, media, limit=7).json()["data"]) == 7
    for bad in ("0", "-3", "many"):
        assert_meta_error(comments(client, media, limit=bad), 400, 100)
    assert len(all_pages(client, comments(client, media, limit=50))) == 60


@settings(max_examples=15, deadline=None)
@given(n=st.integers(0, 80), limit=st.integers(1, 60), deleted=st.sets(st.integers(0, 79)))
def test_comment_paging_yields_every_live_comment_once(server, n, limit, deleted):
    server.reset()
    server.add_account(ACCOUNT, "shop", TOKEN)
    media = server.add_media(ACCOUNT)
    ids = server.add_comments(media, n, timestamp=ago(minutes=5))
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        for i in sorted(deleted):
            if i < n:
                assert c.delete(f"/{ids[i]}").json() == {"success": True}
        seen = [x["id"] for x in all_pages(c, comments(c, media, limit=limit))]
    assert seen == [x for i, x in enumerate(ids) if i not in deleted][::-1]


def test_replies_expansion_and_replies_edge(graph, client):
    media = graph.add_media(ACCOUNT)
    busy = graph.add_comment(media, "busy", timestamp=ago(minutes=10))
    reply_ids = graph.add_comments(media, 30, parent_id=busy, text_fn=lambda i: f"r{i}",
                                   username="fan")
    quiet = graph.add_comment(media, "quiet", timestamp=ago(minutes=5))
    single = graph.add_comment(media, "single", timestamp=ago(minutes=1))
    only = graph.add_comment(media, "only reply", parent_id=single)
    body = comments(client, media, fields="id,text,replies.limit(10){id,text,parent_id,from}").json()
    by_id = {c["id"]: c for c in body["data"]}
    assert list(by_id) == [single, quiet, busy]
    assert "replies" not in by_id[quiet]  # no replies: no key, like any empty expanded edge
    assert by_id[single]["replies"] == {"data": [{
        "id": only, "text": "only reply", "parent_id": single,
        "from": {"id": graph.comment(only)["from_id"], "username": "someone"}}]}
    block = by_id[busy]["replies"]
    assert [r["text"] for r in block["data"]] == [f"r{i}" for i in range(29, 19, -1)]
    assert all(r["parent_id"] == busy for r in block["data"])
    nxt = block["paging"]["next"]
    assert nxt.startswith(f"{graph.url}/{busy}/replies?")
    assert parse_qs(urlsplit(nxt).query)["fields"] == ["id,text,parent_id,from"]
    rest = all_pages(client, client.get(nxt))
    assert [r["id"] for r in block["data"] + rest] == reply_ids[::-1]
    # default expansion size is 25; the edge itself pages like comments
    default = comments(client, media, fields="replies{id}").json()["data"][2]["replies"]
    assert len(default["data"]) == 25 and "next" in default["paging"]
    edge = client.get(f"/{busy}/replies", params={"limit": 12}).json()
    assert len(edge["data"]) == 12 and set(edge["data"][0]) == {"id", "timestamp", "text"}
    assert len(all_pages(client, client.get(f"/{busy}/replies"))) == 30
    assert client.get(f"/{quiet}/replies").json() == {"data": []}
    single_body = client.get(f"/{single}/replies").json()
    reference = recorded("comments/replies.json")
    assert set(single_body) == set(reference) and set(single_body["data"][0]) == set(reference["data"][0])
    assert_same_shape(single_body, reference)
    # a reply to a reply belongs to the top-level comment
    nested = graph.add_comment(media, "nested", parent_id=only)
    assert graph.comment(nested)["parent_id"] == single
    # bad fields are refused even where nothing would be rendered
    assert_meta_error(comments(client, media, fields="id,replies{bogus}"), 400, 100)
    assert_meta_error(client.get(f"/{quiet}/replies", params={"fields": "bogus"}), 400, 100)
    assert_meta_error(client.get(f"/{busy}/replies", params={"after": "junk"}), 400, 100)


def test_hide_and_unhide_a_comment(graph, client):
    media = graph.add_media(ACCOUNT)
    cid = graph.add_comment(media, "spam!!!")
    for response in (client.post(f"/{cid}", params={"hide": "true"}),
                     client.post(f"/{cid}", data={"hide": "true"}),  # idempotent
                     client.post(f"/{cid}", json={"hide": True})):
        assert response.status_code == 200 and response.json() == {"success": True}
    assert graph.comment(cid)["hidden"] is True
    assert client.get(f"/{cid}", params={"fields": "hidden"}).json() == {"id": cid, "hidden": True}
    assert comments(client, media, fields="id,hidden").json()["data"] == [{"id": cid, "hidden": True}]
    assert client.post(f"/{cid}", json={"hide": "false"}).json() == {"success": True}
    assert graph.comment(cid)["hidden"] is False
    assert_meta_error(client.post(f"/{cid}", params={"hide": "maybe"}), 400, 100)
    assert_meta_error(client.post(f"/{cid}"), 400, 100)
    error = assert_meta_error(client.post(f"/{media}", params={"hide": "true"}), 400, 100)
    assert error["message"].startswith("Unsupported post request")
    theirs = graph.add_comment(graph.add_media(OTHER), "not yours")
    assert_meta_error(client.post(f"/{theirs}", params={"hide": "true"}), 400, 100, 33)
    assert_meta_error(client.post("/17900000000000000", params={"hide": "true"}), 400, 100, 33)
    assert graph.comment(theirs)["hidden"] is False


def test_deleted_comments_are_gone_for_every_operation(graph, client):
    media = graph.add_media(ACCOUNT)
    keep = graph.add_comment(media, "keep", timestamp=ago(minutes=2))
    cid = graph.add_comment(media, "delete me", timestamp=ago(minutes=1))
    reply = graph.add_comment(media, "a reply", parent_id=cid)
    first_page = comments(client, media, limit=1).json()
    stale_cursor = first_page["paging"]["cursors"]["after"]  # names the comment deleted below
    count = client.get(f"/{media}", params={"fields": "comments_count"}).json()["comments_count"]
    assert count == 3
    assert client.delete(f"/{cid}").json() == {"success": True}
    for response in (client.get(f"/{cid}"), client.post(f"/{cid}", params={"hide": "true"}),
                     client.delete(f"/{cid}"), client.get(f"/{cid}/replies"),
                     client.post(f"/{cid}/replies", params={"message": "hi"}),
                     client.post("/me/messages", json={"recipient": {"comment_id": cid},
                                                       "message": {"text": "hi"}}),
                     client.get(f"/{reply}")):  # its replies went with it
        assert_meta_error(response, 400, 100, 33)
    assert [c["id"] for c in comments(client, media).json()["data"]] == [keep]
    assert_meta_error(comments(client, media, after=stale_cursor), 400, 100)
    assert client.get(f"/{media}", params={"fields": "comments_count"}).json()["comments_count"] == 1
    state = graph.comment(cid)
    assert state["deleted"] is True and state["text"] == "delete me"
    assert graph.comment(reply)["deleted"] is True
    error = assert_meta_error(client.delete(f"/{media}"), 400, 100)  # media cannot be deleted
    assert error["message"].startswith("Unsupported delete request")
    assert_meta_error(client.delete("/17900000000000000"), 400, 100, 33)
    theirs = graph.add_comment(graph.add_media(OTHER), "not yours")
    assert_meta_error(client.delete(f"/{theirs}"), 400, 100, 33)
    assert graph.comment(theirs)["deleted"] is False


def test_replying_to_a_comment(graph, client):
    media = graph.add_media(ACCOUNT)
    cid = graph.add_comment(media, "price?", username="bob", timestamp=ago(minutes=5))
    ids = []
    for response in (client.post(f"/{cid}/replies", params={"message": "DM'd you"}),
                     client.post(f"/{cid}/replies", data={"message": "form"}),
                     client.post(f"/{cid}/replies", json={"message": "json"})):
        assert response.status_code == 200 and set(response.json()) == {"id"}
        ids.append(response.json()["id"])
    assert graph.comment(cid)["replies"] == ["DM'd you", "form", "json"]
    listed = client.get(f"/{cid}/replies", params={"fields": "id,text,from,username,parent_id"}).json()
    assert [r["id"] for r in listed["data"]] == ids[::-1]
    assert listed["data"][0] == {"id": ids[2], "text": "json", "from": {"id": ACCOUNT, "username": "shop"},
                                 "username": "shop", "parent_id": cid}
    # replying to a reply lands on the top-level comment; someone else's replies are not "ours"
    theirs = graph.add_comment(media, "thanks", parent_id=cid, username="bob")
    nested = client.post(f"/{theirs}/replies", json={"message": "welcome"}).json()["id"]
    assert graph.comment(nested)["parent_id"] == cid
    assert graph.comment(cid)["replies"] == ["DM'd you", "form", "json", "welcome"]
    # only top-level comments are listed on the media
    assert [c["id"] for c in comments(client, media).json()["data"]] == [cid]
    assert_meta_error(client.post(f"/{cid}/replies"), 400, 100)
    assert_meta_error(client.post(f"/{cid}/replies", json={"message": "  "}), 400, 100)
    assert_meta_error(client.post(f"/{cid}/replies", json={"message": "x" * 2201}), 400, 100)
    other = graph.add_comment(graph.add_media(OTHER), "not yours")
    assert_meta_error(client.post(f"/{other}/replies", json={"message": "hi"}), 400, 100, 33)
    assert graph.comment(other)["replies"] == []


def test_private_reply_to_a_comment(graph, client):
    media = graph.add_media(ACCOUNT)
    cid = graph.add_comment(media, "how much?", username="bob", from_id="9123")
    r = client.post(f"/{ACCOUNT}/messages", json={
        "recipient": {"comment_id": cid}, "message": {"text": "sent you the price"}})
    assert r.status_code == 200 and set(r.json()) == {"recipient_id", "message_id"}
    assert r.json()["recipient_id"] == "9123"
    again = client.post("/me/messages", json={"recipient": {"comment_id": cid},
                                              "message": {"text": "again"}})
    error = assert_meta_error(again, 400, 10, 2534023)
    assert error["message"].startswith("(#10)")
    assert graph.comment(cid)["private_replies"] == ["sent you the price"]
    assert graph.sent_messages() == []  # private replies are inspected with comment()
    # form body with JSON strings; commenters without from_id get one id per username
    c1 = graph.add_comment(media, "one", username="carol")
    c2 = graph.add_comment(media, "two", username="carol")
    answers = [client.post("/me/messages", data={"recipient": json.dumps({"comment_id": c}),
                                                 "message": json.dumps({"text": "hi"})})
               for c in (c1, c2)]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].json()["recipient_id"] == answers[1].json()["recipient_id"] == graph.comment(c1)["from_id"]
    assert graph.comment(c1)["from_id"] != graph.comment(cid)["from_id"]
    theirs = graph.add_comment(graph.add_media(OTHER), "not yours")
    for comment_id in ("17900000000000000", theirs):
        r = client.post("/me/messages", json={"recipient": {"comment_id": comment_id},
                                              "message": {"text": "hi"}})
        assert_meta_error(r, 400, 100, 33)
    fresh = graph.add_comment(media, "fresh")
    assert_meta_error(client.post("/me/messages", json={
        "recipient": {"comment_id": fresh}, "message": {"text": ""}}), 400, 100)
    assert graph.comment(fresh)["private_replies"] == [] and graph.comment(theirs)["private_replies"] == []


def test_comment_seeding_and_inspection(graph, client):
    media = graph.add_media(ACCOUNT)
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    cid = graph.add_comment(media, "hello", username="ana", from_id="777", timestamp=when)
    assert graph.comment(cid) == {
        "id": cid, "media_id": media, "text": "hello", "username": "ana", "from_id": "777",
        "hidden": False, "deleted": False, "parent_id": None, "timestamp": when,
        "replies": [], "private_replies": [],
    }
    replies = graph.add_comments(media, 3, parent_id=cid, text_fn=lambda i: f"#{i}", username="z")
    assert [graph.comment(r)["text"] for r in replies] == ["#0", "#1", "#2"]
    assert {graph.comment(r)["parent_id"] for r in replies} == {cid}
    assert graph.comment(cid)["replies"] == []  # none of them by the account
    other_media = graph.add_media(ACCOUNT)
    with pytest.raises(KeyError):
        graph.add_comment("17900000000000000", "x")
    with pytest.raises(KeyError):
        graph.add_comment(other_media, "x", parent_id=cid)  # parent on another media
    with pytest.raises(KeyError):
        graph.comment("nope")
    client.delete(f"/{cid}")
    with pytest.raises(ValueError):
        graph.add_comment(media, "x", parent_id=cid)
    assert graph.add_comments(media, 0) == []


def test_comment_endpoints_refuse_other_accounts_and_unknown_ids(graph, client):
    mine = graph.add_media(ACCOUNT)
    theirs = graph.add_media(OTHER)
    graph.add_comment(theirs, "x")
    cid = container(client, image_url=IMG)
    for media_id in (theirs, "17900000000000000", cid, ACCOUNT):
        assert_meta_error(comments(client, media_id), 400, 100, 33)
    assert_meta_error(comments(client, mine, fields="id,bogus"), 400, 100)
    assert_meta_error(comments(client, mine, after="QVFIbm9wZQ"), 400, 100)
    assert_meta_error(client.get("/17900000000000000/replies"), 400, 100, 33)


# ----------------------------------------------------------------------------------------------
# Account fields, insights, token refresh
# ----------------------------------------------------------------------------------------------


def test_account_fields_and_set_profile(graph, client):
    graph.add_media(ACCOUNT)
    graph.add_media(ACCOUNT, media_type="STORY")
    fields = {"fields": "followers_count,media_count,username,id"}
    assert client.get(f"/{ACCOUNT}", params=fields).json() == {
        "id": ACCOUNT, "username": "shop", "followers_count": 0, "media_count": 1}
    graph.set_profile(ACCOUNT, followers_count=64363, media_count=427)
    graph.set_profile(ACCOUNT, followers_count=64364)  # media_count kept
    body = client.get("/me", params=fields).json()
    assert body == {"id": ACCOUNT, "username": "shop", "followers_count": 64364, "media_count": 427}
    reference = recorded("users/user_fields.json")
    assert set(body) <= set(reference)
    assert_same_shape(body, reference)
    assert client.get("/me", params={"fields": "media_count"}).json() == {"id": ACCOUNT, "media_count": 427}
    assert client.get("/me").json() == {"id": ACCOUNT, "username": "shop"}
    assert_meta_error(client.get("/me", params={"fields": "biography"}), 400, 100)
    with pytest.raises(KeyError):
        graph.set_profile("999", followers_count=1)


def insights(client, account=ACCOUNT, **params):
    return client.get(f"/{account}/insights", params={"period": "day", **params})


def test_insights_total_value_and_time_series(graph, client):
    graph.set_insights(ACCOUNT, {"reach": 500, "views": 900, "profile_views": 12})
    graph.set_insights(ACCOUNT, {"follower_count": 1000, "accounts_engaged": 40})  # merged
    body = insights(client, metric="reach,profile_views,follower_count,views",
                    metric_type="total_value").json()
    assert set(body) == {"data"}
    assert [(i["name"], i.get("total_value"), i.get("values", [{}])[0].get("value"))
            for i in body["data"]] == [
        ("reach", {"value": 500}, None), ("profile_views", {"value": 12}, None),
        ("follower_count", None, 1000), ("views", {"value": 900}, None)]
    reference = recorded("users/user_insights_new.json")["data"][0]
    total_item = body["data"][0]
    assert set(total_item) == set(reference)
    assert_same_shape(total_item, reference)
    assert total_item["id"] == f"{ACCOUNT}/insights/reach/day" and total_item["period"] == "day"
    series_reference = recorded("airbyte/user_insights.json")
    follower_item = body["data"][2]
    assert set(follower_item) == set(series_reference["data"][0])
    assert_same_shape({"data": [follower_item]}, series_reference)
    assert_same_shape({"data": [follower_item]}, recorded("users/user_insights.json"))
    # time series: values with end_time; since/until sets end_time
    until = int(datetime(2024, 1, 15, 7, tzinfo=timezone.utc).timestamp())
    series = insights(client, metric="follower_count,reach", since=until - 86400, until=until).json()
    assert series == {"data": [
        {"name": "follower_count", "period": "day",
         "values": [{"value": 1000, "end_time": "2024-01-15T07:00:00+0000"}],
         "title": "Follower Count", "description": series["data"][0]["description"],
         "id": f"{ACCOUNT}/insights/follower_count/day"},
        {"name": "reach", "period": "day",
         "values": [{"value": 500, "end_time": "2024-01-15T07:00:00+0000"}],
         "title": "Accounts reached", "description": series["data"][1]["description"],
         "id": f"{ACCOUNT}/insights/reach/day"},
    ]}
    assert_same_shape(series, series_reference)
    datetime.strptime(insights(client, metric="reach").json()["data"][0]["values"][0]["end_time"], META_TIME)
    # /me, and parameters in a form body
    r = client.request("GET", "/me/insights", data={"metric": "accounts_engaged", "period": "day",
                                                    "metric_type": "total_value"})
    assert r.json()["data"][0]["total_value"] == {"value": 40}


@pytest.mark.parametrize("metric, metric_type, index", [
    ("impressions", None, 0),
    ("reach,plays", "total_value", 1),
    ("reach,views,website_clicks", None, 2),
    ("profile_views", None, 0),  # time-series profile_views is retired
    ("follows_and_unfollows", None, 0),
    ("reach,bogus", "total_value", 1),
])
def test_retired_or_unknown_metrics_fail_the_whole_call(graph, client, metric, metric_type, index):
    graph.set_insights(ACCOUNT, {"reach": 5, "views": 6})
    params = {"metric": metric, **({"metric_type": metric_type} if metric_type else {})}
    error = assert_meta_error(insights(client, **params), 400, 100)
    assert error["message"].startswith(
        f"(#100) metric[{index}] must be one of the following values: reach, views, ")


def test_insights_parameters_and_missing_data(graph, client):
    graph.set_insights(ACCOUNT, {"reach": 5})
    assert insights(client, metric="views", metric_type="total_value").json() == {"data": []}
    assert [i["name"] for i in insights(client, metric="views,reach").json()["data"]] == ["reach"]
    now = int(time.time())
    for params in ({}, {"metric": ""}, {"metric": "reach", "metric_type": "sum"},
                   {"metric": "reach", "period": "week"},
                   {"metric": "reach", "since": now, "until": now - 1},
                   {"metric": "reach", "since": now - 31 * 86400, "until": now},
                   {"metric": "reach", "since": "yesterday"}):
        assert_meta_error(insights(client, **params), 400, 100)
    assert_meta_error(client.get(f"/{ACCOUNT}/insights", params={"metric": "reach"}), 400, 100)
    assert_meta_error(insights(client, OTHER, metric="reach"), 400, 100, 33)
    assert insights(client, metric="reach", since=now - 30 * 86400, until=now).status_code == 200
    with pytest.raises(ValueError):
        graph.set_insights(ACCOUNT, {"impressions": 1})
    with pytest.raises(KeyError):
        graph.set_insights("999", {"reach": 1})


def refresh(graph, token, versioned=True, **kw):
    base = graph.url if versioned else graph.url.rsplit("/", 1)[0]
    return httpx.get(f"{base}/refresh_access_token",
                     params={"grant_type": "ig_refresh_token", "access_token": token}, **kw)


def test_refresh_access_token(graph, client):
    graph.add_account(ACCOUNT, "shop", "tok-second")
    r = refresh(graph, TOKEN)  # no bearer header
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"access_token", "token_type", "expires_in"}
    assert body["token_type"] == "bearer" and body["expires_in"] == 5183944
    new = body["access_token"]
    assert new != TOKEN and graph.refreshed_tokens(ACCOUNT) == [new]
    assert_meta_error(client.get("/me"), 400, 190)  # the old token stopped working
    assert httpx.get(f"{graph.url}/me", headers={"Authorization": f"Bearer {new}"}).json()["id"] == ACCOUNT
    assert httpx.get(f"{graph.url}/me", headers={"Authorization": "Bearer tok-second"}).status_code == 200
    # without the version prefix too, and again with the new token
    newer = refresh(graph, new, versioned=False).json()["access_token"]
    assert graph.refreshed_tokens(ACCOUNT) == [new, newer] and graph.refreshed_tokens(OTHER) == []
    # recorded with the token in Call.token, never in Call.query or Call.response
    calls = graph.calls_matching("GET", "/refresh_access_token")
    assert [(c.path, c.token, c.status) for c in calls] == [
        ("/refresh_access_token", TOKEN, 200), ("/refresh_access_token", new, 200)]
    for call in calls:
        assert call.query == {"grant_type": "ig_refresh_token", "access_token": REDACTED}
        assert call.response["access_token"] == REDACTED
        for secret in (TOKEN, new, newer):
            assert secret not in json.dumps([call.query, call.body, call.response])
    assert list(json.loads(r.headers["x-business-use-case-usage"])) == [ACCOUNT]


def test_fail_refresh(graph, client):
    graph.fail_refresh(ACCOUNT, times=2)
    for _ in range(2):
        error = assert_meta_error(refresh(graph, TOKEN), 400, 190, 463)
        assert error["message"].startswith("Error validating access token")
    assert client.get("/me").status_code == 200  # the token in use still works
    assert refresh(graph, OTHER_TOKEN).status_code == 200  # other accounts are not affected
    assert refresh(graph, TOKEN).status_code == 200
    assert len(graph.refreshed_tokens(ACCOUNT)) == 1
    graph.fail_refresh(OTHER, times=None)
    new_other = graph.refreshed_tokens(OTHER)[0]
    for _ in range(3):
        assert_meta_error(refresh(graph, new_other), 400, 190, 463)
    graph.clear_faults()
    assert refresh(graph, new_other).status_code == 200
    with pytest.raises(ValueError):
        graph.fail_refresh(ACCOUNT, times=0)


def test_refresh_errors_and_faults(graph, client):
    base = f"{graph.url}/refresh_access_token"
    assert_meta_error(httpx.get(base, params={"grant_type": "ig_refresh_token"}), 400, 190)
    assert_meta_error(refresh(graph, "nope"), 400, 190)
    # the token must be in the query string here, a bearer header is not read
    assert_meta_error(httpx.get(base, params={"grant_type": "ig_refresh_token"},
                                headers={"Authorization": f"Bearer {TOKEN}"}), 400, 190)
    assert_meta_error(httpx.get(base, params={"grant_type": "password", "access_token": TOKEN}), 400, 100)
    graph.fail(500, times=1, path_contains="/refresh_access_token")
    assert_meta_error(refresh(graph, TOKEN), 500, 2)
    graph.rate_limit(ACCOUNT, code=4)  # matched through the query token's owner
    assert_meta_error(refresh(graph, TOKEN), 400, 4)
    assert graph.refreshed_tokens(ACCOUNT) == [] and client.get("/me").status_code == 200
    graph.revoke_token(TOKEN)
    assert_meta_error(refresh(graph, TOKEN), 400, 190, 460)
    graph.clear_faults()
    # a late answer: the new token is issued (and the old one dead) before the answer comes
    graph.delay(0.6, path_contains="/refresh_access_token")
    with pytest.raises(httpx.ReadTimeout):
        refresh(graph, TOKEN, timeout=0.2)
    assert len(graph.refreshed_tokens(ACCOUNT)) == 1
    assert_meta_error(client.get("/me"), 400, 190)
    assert all(TOKEN not in json.dumps(c.query) for c in graph.calls_matching(path_contains="/refresh"))
    # only this path is served outside the version prefix
    unversioned = graph.url.rsplit("/", 1)[0]
    assert_meta_error(httpx.get(f"{unversioned}/me", headers={"Authorization": f"Bearer {OTHER_TOKEN}"}),
                      400, 100)


# ----------------------------------------------------------------------------------------------
# Tokens, faults, usage headers and call records on the new endpoints
# ----------------------------------------------------------------------------------------------


def test_new_endpoints_need_a_bearer_token(graph, client):
    media = graph.add_media(ACCOUNT)
    cid = graph.add_comment(media, "x")
    box = container(client, image_url=IMG)
    requests = [
        ("POST", f"/{ACCOUNT}/media", {"params": {"image_url": IMG}}),
        ("POST", f"/{ACCOUNT}/media_publish", {"params": {"creation_id": box}}),
        ("GET", f"/{box}", {"params": STATUS_FIELDS}),
        ("GET", f"/{ACCOUNT}/content_publishing_limit", {}),
        ("GET", f"/{ACCOUNT}/media", {}),
        ("GET", f"/{media}", {}),
        ("GET", f"/{media}/comments", {}),
        ("GET", f"/{cid}/replies", {}),
        ("POST", f"/{cid}/replies", {"params": {"message": "hi"}}),
        ("POST", f"/{cid}", {"params": {"hide": "true"}}),
        ("DELETE", f"/{cid}", {}),
        ("POST", "/me/messages", {"json": {"recipient": {"comment_id": cid}, "message": {"text": "x"}}}),
        ("GET", f"/{ACCOUNT}/insights", {"params": {"metric": "reach", "period": "day"}}),
    ]
    with httpx.Client(base_url=graph.url, timeout=5) as anonymous:
        for method, path, kw in requests:
            for headers in ({}, {"Authorization": "Bearer nope"}):
                assert_meta_error(anonymous.request(method, path, headers=headers, **kw), 400, 190)
            r = anonymous.request(method, path, json=kw.get("json"),
                                  params={"access_token": TOKEN, **kw.get("params", {})})
            assert_meta_error(r, 400, 190)  # a query-string token is ignored here
    graph.revoke_token(TOKEN)
    for method, path, kw in requests:
        assert_meta_error(client.request(method, path, **kw), 400, 190, 460)
    assert [m["container_id"] for m in graph.published_media()] == [None]  # nothing published
    assert graph.comment(cid)["deleted"] is False and len(graph.containers()) == 1


def test_faults_rate_limits_and_usage_headers_apply_to_new_endpoints(graph, client):
    media = graph.add_media(ACCOUNT)
    cid = graph.add_comment(media, "x")
    box = container(client, image_url=IMG)
    # usage headers are keyed by the account owning the object in the path
    for r in (client.get(f"/{box}"), client.get(f"/{media}/comments"), client.get(f"/{cid}"),
              insights(client, metric="reach")):
        assert list(json.loads(r.headers["x-business-use-case-usage"])) == [ACCOUNT]
        assert json.loads(r.headers["x-app-usage"])["call_count"] == 1
    graph.fail(503, times=1, method="POST", path_contains="/media_publish")
    assert_meta_error(publish(client, box), 503, 2)
    assert [m["container_id"] for m in graph.published_media()] == [None]  # only the seeded one
    graph.fail(400, code=368, subcode=2207051, times=1, path_contains="/replies")
    assert_meta_error(client.post(f"/{cid}/replies", params={"message": "hi"}), 400, 368, 2207051)
    assert graph.comment(cid)["replies"] == []
    graph.rate_limit(ACCOUNT, code=80002, minutes=9, times=None)
    for r in (client.get(f"/{box}", params=STATUS_FIELDS), client.get(f"/{media}/comments"),
              client.post(f"/{cid}", params={"hide": "true"}), client.delete(f"/{cid}"),
              publish(client, box), insights(client, metric="reach"),
              client.get(f"/{ACCOUNT}/content_publishing_limit")):
        assert_meta_error(r, 400, 80002)
        usage = json.loads(r.headers["x-business-use-case-usage"])[ACCOUNT][0]
        assert usage["estimated_time_to_regain_access"] == 9
    assert graph.comment(cid)["hidden"] is False and graph.comment(cid)["deleted"] is False
    graph.clear_faults()
    graph.set_usage(app={"call_count": 93, "total_cputime": 1, "total_time": 1})
    assert json.loads(publish(client, box).headers["x-app-usage"])["call_count"] == 93
    calls = graph.calls_matching("POST", "/media_publish")
    assert [c.status for c in calls] == [503, 400, 200]
    assert all(c.token == TOKEN and c.query == {"creation_id": box} for c in calls)
    assert calls[-1].response == {"id": graph.published_media()[-1]["media_id"]}


def test_respond_answers_a_raw_body_once_without_effect():
    with FakeGraph() as fake:
        fake.add_account("1784", "shop", "T")
        fake.respond({"data": [{"id": 5}]}, path_contains="/conversations")
        fake.respond(b"<html>oops</html>", status=502, path_contains="/conversations")
        headers = {"Authorization": "Bearer T"}
        url = f"{fake.url}/1784/conversations?platform=instagram"
        assert httpx.get(url, headers=headers).json() == {"data": [{"id": 5}]}
        second = httpx.get(url, headers=headers)
        assert second.status_code == 502 and second.content == b"<html>oops</html>"
        assert httpx.get(url, headers=headers).json()["data"] == []
