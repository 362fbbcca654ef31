"""The command line: one clear line for bad input, no secret printed, and `run` on embedded defaults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, Proc, wait_until

TOKEN = "IGQVJ-secret-token-123"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI with the test environment, or exactly ``env`` when given."""
    return subprocess.run([sys.executable, "-m", "instaqueue", *args], cwd=ROOT, env=os.environ if env is None else env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.integration
def test_accounts_and_rules_round_trip_without_printing_the_token(db):
    added = cli("accounts", "add", "--ig-user-id", "17841400000000009", "--username", "@shop.de",
                "--access-token", TOKEN)
    assert added.returncode == 0, added.stderr
    assert "account 1 added: @shop.de" in added.stdout
    listed = cli("accounts", "list")
    assert "17841400000000009" in listed.stdout and "active" in listed.stdout
    rule = cli("rules", "add", "--account", "1", "--match", " price ,, cost ", "--reply", "From 20 EUR.")
    assert rule.returncode == 0 and "rule 1 added" in rule.stdout
    assert "price, cost" in cli("rules", "list", "--account", "1").stdout
    for output in (added, listed, rule):
        assert TOKEN not in output.stdout + output.stderr


@pytest.mark.integration
@pytest.mark.parametrize("args, says", [
    (["accounts", "add", "--ig-user-id", "abc", "--username", "x", "--access-token", "t"], "Instagram user id is a number"),
    (["accounts", "add", "--ig-user-id", "1", "--username", "no spaces", "--access-token", "t"], "username"),
    (["accounts", "add", "--ig-user-id", "1", "--username", "x", "--access-token", " "], "access token is empty"),
    (["accounts", "add", "--ig-user-id", "1"], "required"),
    (["rules", "add", "--account", "7", "--match", "a", "--reply", "b"], "no account with id 7"),
    (["rules", "add", "--account", "-1", "--match", "a", "--reply", "b"], "whole number from 1"),
    (["posts", "cancel", "2147483648"], "whole number from 1 to 2147483647"),
    (["rules", "add", "--account", "1", "--match", " , ", "--reply", "b"], "at least one word"),
    (["rules", "add", "--account", "1", "--match", "a", "--reply", "x" * 1001], "longer than 1000 bytes"),
    (["frobnicate"], "invalid choice"),
    (["accounts", "list", "--verbose"], "unrecognized arguments"),
])
def test_bad_input_gets_one_line_and_a_non_zero_exit(db, args, says):
    done = cli(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.integration
def test_a_second_account_with_the_same_id_is_refused(db):
    assert cli("accounts", "add", "--ig-user-id", "5", "--username", "a", "--access-token", "t").returncode == 0
    again = cli("accounts", "add", "--ig-user-id", "5", "--username", "b", "--access-token", "t")
    assert again.returncode == 2 and "exists already (id 1)" in again.stderr


def test_an_unreachable_database_is_one_line(tmp_path):
    done = cli("accounts", "list", env={**os.environ, "INSTAQUEUE_DATABASE_URL": "postgresql+psycopg://u:pw123@127.0.0.1:1/x"})
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "cannot use the database at" in done.stderr
    assert "pw123" not in done.stderr


def test_run_answers_a_dm_on_embedded_defaults_with_nothing_installed(fake_graph, tmp_path):
    """No Redis, no PostgreSQL: filesystem broker, SQLite results and database in the data dir."""
    env = {k: v for k, v in os.environ.items() if k not in ("INSTAQUEUE_REDIS_URL", "INSTAQUEUE_DATABASE_URL")}
    env["INSTAQUEUE_DATA_DIR"] = str(tmp_path / "data")
    assert cli("accounts", "add", "--ig-user-id", "1784", "--username", "solo", "--access-token", TOKEN,
               env=env).returncode == 0
    assert cli("rules", "add", "--account", "1", "--match", "hours", "--reply", "9 to 5.", env=env).returncode == 0
    fake_graph.add_account("1784", "solo", TOKEN)
    proc = Proc(["run"], tmp_path / "run.log", env, " ready.")
    try:
        proc.start(timeout=60)
        proc.wait_for_log("beat: Starting", timeout=30)
        fake_graph.add_dm("1784", "900", "opening hours?")
        wait_until(lambda: fake_graph.sent_messages("1784"), timeout=30, what="the reply on embedded defaults")
        assert [m["text"] for m in fake_graph.sent_messages("1784")] == ["9 to 5."]
    finally:
        proc.stop()
    assert (tmp_path / "data" / "instaqueue.db").exists() and (tmp_path / "data" / "broker").is_dir()
    assert TOKEN not in proc.text()
