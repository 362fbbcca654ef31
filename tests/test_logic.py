"""Pure logic: the retry schedule, reply rules, polling pace and payload parsing."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from hypothesis import given, settings as hsettings, strategies as st

import instaqueue
from instaqueue import (ReplyRule, choose_reply, next_retry_delay, normalize_text, parse_conversation_page,
                        retry_delay, rule_matches, usage_poll_interval)

SEED = SimpleNamespace(retry_base=60, retry_cap=600, retry_jitter=0.2, max_retries=3)
ACCOUNT = "17841400000000001"


# Retry schedule ###########################################################################

@given(attempt=st.integers(min_value=0, max_value=10_000), r=st.floats(min_value=0, max_value=1))
def test_retry_delay_stays_within_twenty_percent_of_the_capped_doubling(attempt, r):
    delay = retry_delay(attempt, base=60, cap=600, jitter=0.2, rand=lambda: r)
    nominal = min(600, 60 * 2 ** min(attempt, 64))
    assert 0 <= 0.8 * nominal - 1e-9 <= delay <= 1.2 * nominal + 1e-9


@given(rands=st.lists(st.floats(min_value=0, max_value=1), min_size=10, max_size=10))
def test_exactly_three_retries_at_60_120_240_then_failure(rands):
    source = iter(rands)
    delays = [next_retry_delay(n, policy=SEED, rand=lambda: next(source)) for n in range(1, 6)]
    assert delays[3:] == [None, None]
    for delay, nominal in zip(delays[:3], (60, 120, 240)):
        assert 0.8 * nominal <= delay <= 1.2 * nominal


@given(r=st.floats())
def test_a_broken_random_source_cannot_push_the_delay_out_of_bounds(r):
    delay = retry_delay(1, base=60, cap=600, jitter=0.2, rand=lambda: r)
    assert 96 <= delay <= 144


def test_the_cap_applies_before_the_jitter():
    assert retry_delay(20, base=60, cap=600, jitter=0.2, rand=lambda: 1.0) == pytest.approx(720)
    assert retry_delay(20, base=60, cap=600, jitter=0.2, rand=lambda: 0.0) == pytest.approx(480)


# Reply rules ##############################################################################

def rule(match: str, reply: str = "r", minute: int = 0, enabled: bool = True) -> ReplyRule:
    return ReplyRule(id=minute + 1, account_id=1, match=match, reply=reply, enabled=enabled,
                     created_at=datetime(2026, 1, 1, 0, minute, tzinfo=timezone.utc))


@pytest.mark.parametrize("text", [
    "What's the PRICE?", "price", "Ｐｒｉｃｅ please", "pri\u200bce?", "how much does it cost",
    "Le  prïce ?", "price!!!",
])
def test_rule_matches_whole_words_through_case_width_accents_and_invisible_characters(text):
    assert rule_matches("price, cost", text)


@pytest.mark.parametrize("text", ["priceless", "costume party", "", "pricing"])
def test_rule_does_not_match_inside_other_words(text):
    assert not rule_matches("price, cost", text)


def test_phrases_match_across_any_spacing():
    assert rule_matches("opening hours", "what are your opening\n\thours?")
    assert not rule_matches("opening hours", "opening soon, hours later")


def test_first_enabled_rule_in_creation_order_wins():
    rules = [rule("price", "second", minute=2), rule("price", "disabled", minute=0, enabled=False),
             rule("price", "first", minute=1)]
    assert choose_reply("price?", rules).reply == "first"
    assert choose_reply("hello", rules) is None


@given(st.text())
def test_any_text_is_safe_for_the_matcher(text):
    assert isinstance(normalize_text(text), str)
    rule_matches("price, cost, a.b*", text)


# Polling pace from usage headers ##########################################################

@given(a=st.floats(min_value=0, max_value=150), b=st.floats(min_value=0, max_value=150))
def test_poll_interval_never_shrinks_as_usage_grows(a, b):
    low, high = sorted((a, b))
    assert usage_poll_interval(low, 0.5, slow_from=75) <= usage_poll_interval(high, 0.5, slow_from=75)


def test_poll_interval_slows_before_the_limit():
    assert usage_poll_interval(50, 0.5, slow_from=75) == 0.5
    assert usage_poll_interval(90, 0.5, slow_from=75) == pytest.approx(4.0)
    assert usage_poll_interval(100, 0.5, slow_from=75) == usage_poll_interval(400, 0.5, slow_from=75) == 16.0


# Conversation pages #######################################################################

def msg(i: int, sender: str = "900", text: str = "hi", when: str = "2026-11-24T09:00:00+0000") -> dict:
    return {"id": f"m{i}", "created_time": when, "from": {"id": sender, "username": "u"},
            "to": {"data": [{"id": ACCOUNT, "username": "shop"}]}, "message": text}


def test_page_keeps_inbound_messages_and_drops_the_accounts_own():
    payload = {"data": [{"id": "c1", "updated_time": "2026-11-24T09:00:05+0000",
                         "messages": {"data": [msg(2, sender=ACCOUNT), msg(1)]}}],
               "paging": {"cursors": {"after": "A"}, "next": "https://x/next"}}
    page = parse_conversation_page(payload, account_ig_id=ACCOUNT, since=None)
    assert [m.graph_message_id for m in page.messages] == ["m1"]
    assert page.after == "A" and not page.problems
    assert page.newest == datetime(2026, 11, 24, 9, 0, 5, tzinfo=timezone.utc)


def test_page_stops_at_conversations_older_than_the_cursor():
    since = datetime(2026, 11, 24, 9, 0, 0, tzinfo=timezone.utc)
    payload = {"data": [
        {"id": "new", "updated_time": "2026-11-24T09:00:01+0000", "messages": {"data": [msg(1)]}},
        {"id": "old", "updated_time": "2026-11-24T08:59:59+0000", "messages": {"data": [msg(2)]}}]}
    page = parse_conversation_page(payload, account_ig_id=ACCOUNT, since=since)
    assert [m.graph_message_id for m in page.messages] == ["m1"] and page.reached_old
    assert page.after is None


def test_conversation_without_expansion_is_listed_for_the_fallback():
    page = parse_conversation_page({"data": [{"id": "c9", "updated_time": "2026-11-24T09:00:01+0000"}]},
                                   account_ig_id=ACCOUNT, since=None)
    assert page.without_messages == ["c9"] and page.messages == []


junk = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.sampled_from(["id", "data", "from", "message", "created_time",
                                                        "updated_time", "messages", "paging", "to"]),
                                      children, max_size=5), max_leaves=20)


@hsettings(max_examples=300)
@given(bad=st.lists(junk, max_size=5), good_at=st.integers(min_value=0, max_value=5), top=junk)
def test_malformed_items_are_reported_and_skipped_never_costing_the_good_ones(bad, good_at, top):
    good = {"id": "cgood", "updated_time": "2026-11-24T09:00:01+0000", "messages": {"data": [msg(1), *bad]}}
    data = list(bad)
    data.insert(min(good_at, len(data)), good)
    page = parse_conversation_page({"data": data}, account_ig_id=ACCOUNT, since=None)
    assert "m1" in [m.graph_message_id for m in page.messages]
    assert all(isinstance(p, str) for p in page.problems)
    # Any top-level shape at all is survived.
    parse_conversation_page(top, account_ig_id=ACCOUNT, since=None)


@pytest.mark.parametrize("field, value", [
    ("id", None), ("id", 5), ("from", "900"), ("from", {}), ("created_time", "yesterday"),
    ("created_time", 1700000000), ("message", ["hi"]),
])
def test_each_malformed_message_field_is_named_in_the_problem(field, value):
    bad = msg(2)
    bad[field] = value
    page = parse_conversation_page({"data": [{"id": "c", "updated_time": "2026-11-24T09:00:01+0000",
                                              "messages": {"data": [bad, msg(1)]}}]},
                                   account_ig_id=ACCOUNT, since=None)
    assert [m.graph_message_id for m in page.messages] == ["m1"]
    assert len(page.problems) == 1


def test_sent_reply_is_found_only_for_that_recipient_text_and_time():
    since = datetime(2026, 11, 24, 9, 0, 0, tzinfo=timezone.utc)
    mine = lambda i, to, text, when: {**msg(i, sender=ACCOUNT, text=text, when=when),  # noqa: E731
                                      "to": {"data": [{"id": to}]}}
    items = [mine(5, "900", "Prices", "2026-11-24T09:00:03+0000"),
             mine(4, "901", "Prices", "2026-11-24T09:00:02+0000"),
             mine(3, "900", "Other", "2026-11-24T09:00:02+0000"),
             mine(2, "900", "Prices", "2026-11-24T08:59:00+0000"), msg(1)]
    found = instaqueue.find_sent_replies(items, account_ig_id=ACCOUNT, recipient_id="900", text="Prices",
                                         not_before=since)
    assert found == ["m5"]
    assert instaqueue.find_sent_replies("junk", account_ig_id=ACCOUNT, recipient_id="900", text="x",
                                        not_before=since) == []


# Post validation ##########################################################################

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
IMG = {"type": "image", "url": "https://cdn.example.com/a.jpg"}
VID = {"type": "video", "url": "https://cdn.example.com/a.mp4"}


def problems(kind="image", media=(IMG,), caption="", publish_at=NOW):
    return instaqueue.post_problems(kind=kind, media=list(media), caption=caption, publish_at=publish_at,
                                    now=NOW, grace=300)


def test_a_good_post_has_no_problems():
    assert problems() == []
    assert problems("carousel", [IMG, VID, IMG], caption="#a #b @c hi") == []
    assert problems("reel", [VID]) == problems("story", [VID]) == problems("story", [IMG]) == []


@pytest.mark.parametrize("args, says", [
    (dict(caption="x" * 2201), "2201 characters"),
    (dict(caption=" ".join(f"#t{i}" for i in range(31))), "31 hashtags"),
    (dict(caption=" ".join(f"@u{i}" for i in range(21))), "21 @mentions"),
    (dict(kind="carousel", media=[IMG]), "2 to 10 items, not 1"),
    (dict(kind="carousel", media=[IMG] * 11), "2 to 10 items, not 11"),
    (dict(media=[IMG, IMG]), "exactly one media URL"),
    (dict(media=[{"type": "image", "url": "http://cdn.example.com/a.jpg"}]), "not a public https:// URL"),
    (dict(media=[{"type": "image", "url": "https:///nohost"}]), "not a public https:// URL"),
    (dict(kind="reel", media=[IMG]), "cannot carry image media"),
    (dict(kind="story", caption="hello"), "stories have no caption"),
    (dict(publish_at=NOW - timedelta(seconds=301)), "301 s in the past"),
    (dict(kind="gif"), "unknown post kind"),
])
def test_each_rule_rejects_with_a_reason(args, says):
    found = problems(**args)
    assert found and any(says in p for p in found), found


def test_emails_and_html_entities_are_not_mentions_or_hashtags():
    assert problems(caption=" ".join(["me@example.com"] * 25 + ["&#39;"] * 35)) == []


@hsettings(max_examples=300)
@given(kind=st.sampled_from(["image", "video", "reel", "carousel", "story", "x"]),
       media=st.lists(st.fixed_dictionaries({"type": st.sampled_from(["image", "video", "gif"]),
                                             "url": st.one_of(st.text(max_size=30),
                                                              st.builds(lambda h: f"https://{h}/a.jpg",
                                                                        st.from_regex(r"[a-z]{1,10}\.com", fullmatch=True)))}),
                      max_size=12),
       caption=st.text(max_size=2500), late=st.floats(min_value=-1e6, max_value=1e6))
def test_validation_never_crashes_and_every_rejection_is_explained(kind, media, caption, late):
    found = problems(kind, media, caption, NOW - timedelta(seconds=late))
    assert all(isinstance(p, str) and p for p in found)
    if len(caption) > 2200 or late > 300 or kind == "x":
        assert found


# Comment moderation #######################################################################

from instaqueue import ModerationRule, find_blocked, moderate, next_comment_interval  # noqa: E402


def mod_rule(kind, pattern="", action="hide", minute=0, enabled=True):
    return ModerationRule(id=minute + 1, account_id=1, kind=kind, pattern=pattern, action=action, enabled=enabled,
                          created_at=datetime(2026, 1, 1, 0, minute, tzinfo=timezone.utc))


@pytest.mark.parametrize("text", [
    "this is SPAM", "spám everywhere", "ｓｐａｍ", "s\u200bp\u200ba\u200bm", "s p a m", "s.p.a.m!", "S-P-A-M",
    "Spam.", "buy now spam", "ŚPÄM",
])
def test_blocked_word_is_caught_through_evasions(text):
    assert find_blocked("spam, buy followers", text) == "spam"


@pytest.mark.parametrize("text", ["spammer", "antispam", "s pam", "a spa meeting", "", "Spamalot tickets"])
def test_innocent_words_that_merely_contain_it_pass(text):
    assert find_blocked("spam", text) is None


def test_blocked_phrase_and_class_versus_ass():
    assert find_blocked("buy followers", "Want to BUY   followers?") == "buy followers"
    assert find_blocked("ass", "first class service") is None


@pytest.mark.parametrize("kind, pattern, text, hit", [
    ("links", "", "visit shop.example.com now", True),
    ("links", "", "see https://x.y/z", True),
    ("links", "", "www.deals", True),
    ("links", "", "bit . ly", False),
    ("links", "", "great photo!", False),
    ("mentions", "3", "@a @b @c look", True),
    ("mentions", "3", "@a @b look, mail me@x.com", False),
    ("regex", r"\d{3}-\d{4}", "call 555-1234", True),
    ("regex", r"\d{3}-\d{4}", "call me", False),
])
def test_each_rule_kind(kind, pattern, text, hit):
    decision = moderate(text, [mod_rule(kind, pattern)])
    assert (decision.rule_id == 1) is hit
    assert decision.reason and (hit or decision.reason == "no rule matched")


def test_repeats_count_earlier_comments_by_the_same_author():
    rule = [mod_rule("repeats", "3", action="delete")]
    assert moderate("buy now", rule, same_text_count=1).action == "none"
    decision = moderate("buy now", rule, same_text_count=2)
    assert decision.action == "delete" and "3 times" in decision.reason


def test_first_enabled_rule_in_creation_order_decides():
    rules = [mod_rule("links", action="delete", minute=2), mod_rule("block", "spam", action="reply", minute=1),
             mod_rule("block", "spam", action="hide", minute=0, enabled=False)]
    assert moderate("spam at x.com", rules).action == "reply"


@hsettings(max_examples=500)
@given(text=st.text(), count=st.integers(min_value=0, max_value=100))
def test_any_text_never_crashes_the_rule_engine(text, count):
    rules = [mod_rule("block", "spam, buy followers"), mod_rule("links", minute=1), mod_rule("mentions", "3", minute=2),
             mod_rule("repeats", "2", minute=3), mod_rule("regex", r"(a+)+$", minute=4), mod_rule("regex", "(", minute=5)]
    decision = moderate(text, rules, same_text_count=count)
    assert decision.reason


@given(current=st.floats(min_value=1, max_value=10_000), found=st.integers(min_value=0, max_value=1000))
def test_the_comment_interval_stays_in_bounds_and_moves_the_right_way(current, found):
    nxt = next_comment_interval(current, found=found, low=300, high=1800)
    assert 300 <= nxt <= 1800
    bounded = min(1800, max(300, current))
    assert (nxt <= bounded) if found else (nxt >= bounded)


def test_rate_limits_wait_for_the_back_off_without_counting(monkeypatch):
    monkeypatch.setattr(instaqueue.settings, "retry_cap", 600)
    assert instaqueue.next_attempt(instaqueue.RateLimited("x", retry_after=120), 2) == (2, 120)
    assert instaqueue.next_attempt(instaqueue.RateLimited("x", retry_after=7200), 2) == (2, 600)
    failures, delay = instaqueue.next_attempt(instaqueue.TransientError("x"), 3)
    assert failures == 4 and (delay is None) is (instaqueue.settings.max_retries < 4)


def test_graph_ids_and_text_are_made_safe_to_store():
    assert instaqueue.graph_id("aWdf_123", "message") == "aWdf_123"
    for bad in ("", None, 5, "a/b", "a b", "x\x00", "x" * 256, "a?b"):
        with pytest.raises(instaqueue.MalformedPayload):
            instaqueue.graph_id(bad, "message")
    assert instaqueue.clean_text("a\x00b\ud800c") == "ab?c"
    with pytest.raises(instaqueue.MalformedPayload, match="future"):
        instaqueue.parse_graph_time("2999-01-01T00:00:00+0000", not_after=datetime.now(timezone.utc))
    with pytest.raises(instaqueue.MalformedPayload):
        instaqueue.parse_graph_time("9999-12-31T23:59:59-14:00")
