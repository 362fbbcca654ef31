"""Graph API client: Meta's error objects mapped to the hierarchy, usage headers, recorded bodies,
and the client over loopback against the fake Graph API."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from hypothesis import given, strategies as st

import instaqueue
from instaqueue import (BadRequest, GraphClient, PermissionDenied, RateLimited, TokenInvalid, TransientError,
                        error_from_response, parse_usage)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "ig-fixtures"


def err(code, status=400, subcode=None, transient=None, message="m"):
    body = {"error": {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": "A"}}
    if subcode is not None:
        body["error"]["error_subcode"] = subcode
    if transient is not None:
        body["error"]["is_transient"] = transient
    return error_from_response(status, body)


@pytest.mark.parametrize("code, status, transient, expected", [
    (1, 400, None, TransientError), (2, 500, True, TransientError), (100, 400, True, TransientError),
    (None, 503, None, TransientError),
    (4, 400, None, RateLimited), (17, 400, None, RateLimited), (32, 400, None, RateLimited),
    (613, 400, None, RateLimited), (80002, 400, None, RateLimited), (80006, 400, None, RateLimited),
    (80001, 400, None, RateLimited), (100, 429, None, RateLimited),
    (190, 400, None, TokenInvalid), (190, 401, True, TokenInvalid),
    (10, 403, None, PermissionDenied), (200, 403, None, PermissionDenied), (299, 400, None, PermissionDenied),
    (100, 400, None, BadRequest), (551, 400, None, BadRequest), (9004, 400, None, BadRequest),
])
def test_error_codes_map_to_the_hierarchy(code, status, transient, expected):
    error = err(code, status, transient=transient)
    assert type(error) is expected
    assert error.retryable is (expected in (TransientError, RateLimited))


def test_rate_limit_takes_its_back_off_from_the_business_usage_header():
    usage = parse_usage({"x-business-use-case-usage": json.dumps(
        {"1784": [{"type": "instagram", "call_count": 100, "total_cputime": 5, "total_time": 5,
                   "estimated_time_to_regain_access": 7}]})})
    error = error_from_response(400, {"error": {"message": "limit", "code": 80002}}, usage=usage)
    assert isinstance(error, RateLimited) and error.retry_after == 420
    assert isinstance(err(4), RateLimited) and err(4).retry_after is None


def test_the_token_never_survives_into_an_error_message():
    error = error_from_response(400, {"error": {"message": "Bad token TOKEN-123 given", "code": 190}},
                                token="TOKEN-123")
    assert "TOKEN-123" not in str(error) and "TOKEN-123" not in repr(error)


@pytest.mark.parametrize("body, status, expected", [
    (None, 502, TransientError), ("<html>", 500, TransientError), (None, 200, TransientError),
    ([], 400, BadRequest), ({"error": "text"}, 400, BadRequest), ({"error": {"code": "x"}}, 400, BadRequest),
])
def test_bodies_without_an_error_object_still_map(body, status, expected):
    assert type(error_from_response(status, body)) is expected


def fixture_files():
    return sorted(p for p in FIXTURES.rglob("*.json"))


@pytest.mark.parametrize("path", fixture_files(), ids=lambda p: str(p.relative_to(FIXTURES)))
def test_every_recorded_body_parses_and_errors_map_to_their_class(path):
    body = json.loads(path.read_text())
    assert isinstance(body, dict)
    if "error" not in body:
        return
    error = error_from_response(400, body)
    code = body["error"]["code"]
    expected = {100: BadRequest, 10: PermissionDenied}.get(code, BadRequest)
    if body["error"].get("is_transient") or code in (1, 2):
        expected = TransientError
    assert type(error) is expected, (code, type(error))
    assert error.code == code and error.fbtrace_id == body["error"].get("fbtrace_id")


def test_recorded_fixtures_are_present():
    names = {p.name for p in fixture_files()}
    assert {"error.json", "user_insights_for_error_code_10.json", "comments_p1.json"} <= names


def test_usage_headers_take_the_highest_percentage_for_the_account():
    usage = parse_usage({
        "x-app-usage": json.dumps({"call_count": 28, "total_cputime": 25, "total_time": 40}),
        "x-business-use-case-usage": json.dumps({"1784": [
            {"type": "instagram", "call_count": 95, "total_cputime": 20, "total_time": 30,
             "estimated_time_to_regain_access": 0}]}),
    })
    assert usage.app_percent == 40
    assert usage.percent_for("1784") == 95
    assert usage.percent_for("other") == 40


@given(st.dictionaries(st.sampled_from(["x-app-usage", "x-business-use-case-usage"]),
                       st.one_of(st.text(max_size=50), st.builds(json.dumps, st.recursive(
                           st.none() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                           max_leaves=10)))))
def test_any_usage_header_is_survived(headers):
    usage = parse_usage(headers)
    assert usage.percent_for("1784") >= 0


# Over loopback, against the fake Graph API #################################################

def test_client_sends_the_token_only_in_the_authorization_header(fake_graph):
    fake_graph.add_account("1784", "shop", "TOKEN-A")
    client = GraphClient(fake_graph.url, timeout=2)
    response = client.request("GET", "1784/conversations", token="TOKEN-A",
                              params={"platform": "instagram", "fields": instaqueue.CONVERSATION_FIELDS})
    assert response.data["data"] == []
    call = fake_graph.calls[-1]
    assert call.token == "TOKEN-A"
    assert "TOKEN-A" not in json.dumps(call.query)


def test_client_maps_a_slow_answer_to_a_transient_timeout(fake_graph):
    fake_graph.add_account("1784", "shop", "TOKEN-A")
    fake_graph.delay(3, path_contains="conversations")
    client = GraphClient(fake_graph.url, timeout=0.5)
    with pytest.raises(TransientError, match="timed out"):
        client.request("GET", "1784/conversations", token="TOKEN-A", params={"platform": "instagram"})


def test_client_maps_an_unreachable_host_to_transient():
    with pytest.raises(TransientError, match="unreachable"):
        GraphClient("http://127.0.0.1:9/v23.0", timeout=0.5).request("GET", "me", token="T")


@pytest.mark.parametrize("status, code, expected", [
    (500, 1, TransientError), (400, 80002, RateLimited), (400, 190, TokenInvalid), (403, 10, PermissionDenied),
    (400, 100, BadRequest),
])
def test_client_raises_the_mapped_error_with_usage(fake_graph, status, code, expected):
    fake_graph.add_account("1784", "shop", "TOKEN-A")
    fake_graph.fail(status, code=code, message="Something about TOKEN-A went wrong")
    with pytest.raises(expected) as caught:
        GraphClient(fake_graph.url, timeout=2).request("GET", "1784/conversations", token="TOKEN-A",
                                                       params={"platform": "instagram"})
    assert caught.value.status == status and caught.value.code == code
    assert "TOKEN-A" not in str(caught.value)


def test_rate_limited_answer_carries_metas_estimate(fake_graph):
    fake_graph.add_account("1784", "shop", "TOKEN-A")
    fake_graph.rate_limit("1784", code=80002, minutes=4)
    with pytest.raises(RateLimited) as caught:
        GraphClient(fake_graph.url, timeout=2).request("GET", "1784/conversations", token="TOKEN-A",
                                                       params={"platform": "instagram"})
    assert caught.value.retry_after == 240


def test_one_connection_pool_per_process():
    assert instaqueue.graph() is instaqueue.graph()
    assert isinstance(instaqueue.graph()._http, httpx.Client)
