"""workers.redisurl: Redis and Sentinel locations, passwords kept out of sight."""

import pytest
from redis.sentinel import SentinelConnectionPool

from workers import config as config_mod
from workers import redisurl

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
