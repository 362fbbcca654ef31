"""Settings: the seed's defaults, embedded defaults, and one clear line for bad configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import instaqueue
from instaqueue import ConfigError, Settings, broker_config, load_settings

ROOT = Path(__file__).resolve().parent.parent


def clean_settings(**overrides) -> Settings:
    """Settings with no environment or .env influence."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("INSTAQUEUE_")}
    try:
        return Settings(_env_file=None, **overrides)
    finally:
        os.environ.update(saved)


def test_defaults_are_the_seeds():
    s = clean_settings()
    assert s.redis_url is None
    assert s.dm_poll_interval == 0.5
    assert (s.comment_poll_interval, s.comment_poll_max_interval) == (300, 1800)
    assert s.scheduled_check_interval == 60
    assert (s.analytics_at, s.timezone) == ("00:00", "UTC")
    assert (s.retry_base, s.retry_cap, s.retry_jitter, s.max_retries) == (60, 600, 0.2, 3)
    assert s.worker_concurrency == 4
    assert s.graph_api_url == f"https://graph.instagram.com/{instaqueue.GRAPH_API_VERSION}"
    assert s.effective_database_url.startswith("sqlite:///") and s.effective_database_url.endswith(".instaqueue/instaqueue.db")


def test_embedded_defaults_use_filesystem_broker_and_sqlite_results(tmp_path):
    s = clean_settings(data_dir=tmp_path)
    config = broker_config(s)
    assert config["broker_url"] == "filesystem://"
    assert config["result_backend"] == f"db+sqlite:///{tmp_path / 'results.sqlite'}"
    options = config["broker_transport_options"]
    assert options["data_folder_in"] == options["data_folder_out"] == str(tmp_path / "broker")


def test_redis_config_serves_queues_in_priority_order():
    config = broker_config(clean_settings(redis_url="redis://127.0.0.1:6379/3"))
    assert config["broker_url"] == config["result_backend"] == "redis://127.0.0.1:6379/3"
    assert config["broker_transport_options"]["queue_order_strategy"] == "priority"


def test_app_is_configured_for_flower_json_and_priorities():
    conf = instaqueue.app.conf
    assert instaqueue.app.main == "instaqueue"
    assert conf.task_serializer == conf.result_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.worker_send_task_events and conf.task_send_sent_event
    assert conf.worker_prefetch_multiplier == 1
    assert [q.name for q in conf.task_queues] == ["high", "default", "low"]
    task = instaqueue.process_instagram_message
    assert task.acks_late and task.reject_on_worker_lost and task.max_retries == 3


@pytest.mark.parametrize("name, expected_queue", [
    ("instaqueue.poll_instagram_messages", "high"),
    ("instaqueue.process_instagram_message", "high"),
    ("instaqueue.poll_post_comments", "default"),
    ("instaqueue.publish_scheduled_post", "default"),
    ("instaqueue.generate_daily_analytics", "low"),
])
def test_routes_by_task_name(name, expected_queue):
    route = instaqueue.app.amqp.router.route({}, name)
    assert route["queue"].name == expected_queue


@pytest.mark.parametrize("variable, value, says", [
    ("REDIS_URL", "http://localhost:6379", "INSTAQUEUE_REDIS_URL: expected a redis://"),
    ("REDIS_URL", "redis://localhost:99999", "INSTAQUEUE_REDIS_URL: the URL's port"),
    ("DATABASE_URL", "not a url", "INSTAQUEUE_DATABASE_URL: not a database URL"),
    ("DATABASE_URL", "mysql://u@h/db", "INSTAQUEUE_DATABASE_URL: only postgresql"),
    ("GRAPH_API_URL", "graph.instagram.com", "INSTAQUEUE_GRAPH_API_URL: expected an http(s) URL"),
    ("DM_POLL_INTERVAL", "-1", "INSTAQUEUE_DM_POLL_INTERVAL: must be a positive number"),
    ("DM_POLL_INTERVAL", "soon", "INSTAQUEUE_DM_POLL_INTERVAL: Input should be a valid number"),
    ("RETRY_JITTER", "1.5", "INSTAQUEUE_RETRY_JITTER: must be a fraction"),
    ("MAX_RETRIES", "-2", "INSTAQUEUE_MAX_RETRIES: must be 0 or more"),
    ("TIMEZONE", "Mars/Olympus_Mons", "INSTAQUEUE_TIMEZONE: unknown time zone"),
    ("ANALYTICS_AT", "25:00", "INSTAQUEUE_ANALYTICS_AT: expected a time of day"),
    ("WORKER_CONCURRENCY", "0", "INSTAQUEUE_WORKER_CONCURRENCY: must be 1 or more"),
])
def test_bad_configuration_names_the_variable(variable, value, says):
    with pytest.raises(ConfigError) as caught:
        clean = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("INSTAQUEUE_")}
        try:
            os.environ[f"INSTAQUEUE_{variable}"] = value
            load_settings(_env_file=None)
        finally:
            os.environ.pop(f"INSTAQUEUE_{variable}", None)
            os.environ.update(clean)
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


def test_visibility_timeout_must_outlast_the_longest_retry():
    with pytest.raises(ConfigError, match="INSTAQUEUE_VISIBILITY_TIMEOUT: must exceed"):
        load_settings(_env_file=None, redis_url="redis://localhost/0", retry_cap=600, visibility_timeout=300)


def test_secret_in_a_bad_url_is_not_echoed():
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None, redis_url="http://user:hunter2@host:6379")
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("command", [["worker"], ["beat"], ["accounts", "list"]])
def test_bad_configuration_stops_start_up_with_one_line(command, tmp_path):
    env = {**os.environ, "INSTAQUEUE_DM_POLL_INTERVAL": "-0.5", "INSTAQUEUE_TIMEZONE": "Nowhere/Land"}
    done = subprocess.run([sys.executable, "-m", "instaqueue", *command], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "INSTAQUEUE_DM_POLL_INTERVAL" in lines[0] and "INSTAQUEUE_TIMEZONE" in lines[0]
    assert "Traceback" not in done.stderr
