"""workers.redisurl: Redis and Sentinel locations, passwords kept out of sight."""

import ast
from pathlib import Path

import pytest
from redis.sentinel import SentinelConnectionPool

from workers import config as config_mod
from workers import redisurl

REPO = Path(__file__).resolve().parents[2]
SENTINELS = "sentinel://127.0.0.1:26379/2;sentinel://127.0.0.1:26380;sentinel://h3"


def test_a_sentinel_url_lists_every_sentinel_with_the_first_entrys_database():
    parsed = redisurl.parse_sentinel(SENTINELS)
    assert parsed.sentinels == (("127.0.0.1", 26379), ("127.0.0.1", 26380), ("h3", redisurl.DEFAULT_SENTINEL_PORT))
    assert parsed.db == 2
    assert parsed.password is None


@pytest.mark.parametrize("url, words", [
    ("sentinel://127.0.0.1:26379;redis://127.0.0.1:6379", ["entry 2", "sentinel://"]),
    ("sentinel://:26379", ["entry 1", "no host"]),
    ("sentinel://h1:26379/zero", ["database", "zero"]),
    ("sentinel://h1:99999", ["bad port"]),
])
def test_a_bad_sentinel_url_names_the_entry(url, words):
    problem = redisurl.check(url)
    assert problem is not None
    for word in words:
        assert word in problem


def test_a_password_goes_to_the_data_servers_and_never_shows():
    url = redisurl.with_password(SENTINELS, "s3cr/et")
    assert redisurl.parse_sentinel(url).password == "s3cr/et"
    assert redisurl.has_password(url)
    shown = redisurl.redact(url)
    assert "s3cr" not in shown and "***" in shown
    assert shown.count(";") == 2


def test_config_takes_a_sentinel_url_and_the_password_from_the_environment(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("clock_measurement:\n  ntp:\n    servers: [127.0.0.1:1123]\n"
                    f"ntp_service:\n  redis_url: '{SENTINELS}'\n  redis_master_name: ntp-master\n")
    config = config_mod.load(path, environ={config_mod.ENV_REDIS_PASSWORD: "pw"})
    assert config.service.redis_master_name == "ntp-master"
    assert redisurl.parse_sentinel(config.service.redis_url).password == "pw"
    assert "pw" not in config.service.redis_url_redacted


def test_config_refuses_a_password_in_a_sentinel_url(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("clock_measurement:\n  ntp:\n    servers: [127.0.0.1:1123]\n"
                    "ntp_service:\n  redis_url: 'sentinel://h1:26379;sentinel://:hunter2@h2:26379'\n")
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.load(path, environ={})
    assert caught.value.key == "ntp_service.redis_url"
    assert "hunter2" not in str(caught.value)


def test_a_sentinel_client_asks_the_sentinels_and_a_plain_one_does_not():
    client = redisurl.connect(SENTINELS, "ntp-master")
    assert isinstance(client.connection_pool, SentinelConnectionPool)
    assert client.connection_pool.service_name == "ntp-master"
    plain = redisurl.connect("redis://127.0.0.1:6379/0")
    assert not isinstance(plain.connection_pool, SentinelConnectionPool)


def test_celery_gets_the_master_name_only_for_sentinels():
    assert redisurl.celery_transport_options(SENTINELS, "m")["master_name"] == "m"
    assert redisurl.celery_transport_options("redis://127.0.0.1:6379/0", "m") == {}


# -- replies as text, set once (issue #27) ---------------------------------------------------------------

SERVICE_PACKAGES = ("workers", "orchestrator", "relay")
#: The calls that make a Redis client: only workers/redisurl.py makes one (``connect``), so every client reads text.
CLIENT_MAKERS = {"Redis", "StrictRedis", "from_url", "Sentinel", "ConnectionPool", "SentinelConnectionPool"}


def test_every_client_connect_makes_decodes_replies_sentinel_or_not():
    for client in (redisurl.connect(SENTINELS, "ntp-master"), redisurl.connect("redis://127.0.0.1:6379/0"),
                   redisurl.connect("unix:///run/redis.sock", retry=False)):
        assert client.connection_pool.connection_kwargs["decode_responses"] is True
        assert client.get_encoder().decode_responses


def test_celerys_own_connections_keep_their_settings():
    """The broker's and result backend's connections are kombu's and Celery's: no decode_responses from us."""
    settings = redisurl.celery_settings("redis://127.0.0.1:6379/0")
    assert "decode_responses" not in settings["broker_transport_options"]
    assert not any("decode" in key for key in settings)


def test_the_service_makes_no_redis_client_but_through_connect():
    made = []
    for package in SERVICE_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if path == REPO / "workers" / "redisurl.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
                    if name in CLIENT_MAKERS:
                        made.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}(...)")
    assert not made, "a Redis client made outside workers.redisurl.connect:\n" + "\n".join(made)


def test_a_connected_client_reads_text_from_every_kind_of_reply(redis_url, key_prefix):
    """Strings, hashes, sets, streams, a script's reply and TIME: text (or numbers), never bytes."""
    client = redisurl.connect(redis_url)
    try:
        key = f"{key_prefix}:text"
        client.set(key, "v")
        client.hset(f"{key}:h", mapping={"f": 1})
        client.sadd(f"{key}:s", "m")
        entry_id = client.xadd(f"{key}:x", {"record": "{}"})
        assert client.get(key) == "v"
        assert client.hgetall(f"{key}:h") == {"f": "1"}
        assert client.smembers(f"{key}:s") == {"m"}
        assert isinstance(entry_id, str) and client.xrange(f"{key}:x") == [(entry_id, {"record": "{}"})]
        assert client.eval("return {KEYS[1], 7}", 1, "k") == ["k", 7]
        seconds, micros = client.time()
        assert isinstance(seconds, int) and isinstance(micros, int)
    finally:
        client.delete(*client.keys(f"{key_prefix}:*"))
        client.close()
