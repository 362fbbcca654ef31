"""Tests of the fake Instagram Graph API server (tests/fake_graph.py), over real loopback HTTP."""

from __future__ import annotations

import json
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
    from fake_graph import Call, FakeGraph, format_time
except ImportError:  # pragma: no cover
    from tests.fake_graph import Call, FakeGraph, format_time

SHARED = Path("/work/shared/ig-fixtures")
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
