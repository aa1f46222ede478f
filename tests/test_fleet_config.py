"""Fleet mode's settings: ``store.postgresql`` parsed, refused next to ``origins_file``, and its password never
shown (in errors, in the settings' repr, in ``corsproxy check``); row checks shared with every other write path."""

from __future__ import annotations

import pytest

from corsproxy.config import ConfigError, parse_config
from corsproxy.core.settings import redact_dsn
from corsproxy.origins.sync import check_row
from tests.support.config import BASE_CONFIG, merge

pytestmark = pytest.mark.filterwarnings("error")

SECRET = "s3cret-pa55word"
URL = f"postgresql://corsproxy:{SECRET}@db.internal:5432/corsproxy"


def test_a_url_or_a_mapping_and_the_environment_wins() -> None:
    config = parse_config(merge(BASE_CONFIG, {"store": {"postgresql": URL}}), env={})
    assert config.store.postgresql is not None
    assert config.store.postgresql.url == URL
    assert config.store.postgresql.poll_interval == 1.0
    assert SECRET not in repr(config)
    assert config.store.postgresql.display == "postgresql://corsproxy:***@db.internal:5432/corsproxy"
    spec = {"url": URL, "poll_interval": 0.5, "change_retention": "2d", "batch_size": 100}
    config = parse_config(merge(BASE_CONFIG, {"store": {"postgresql": spec}}), env={})
    assert config.store.postgresql is not None
    assert (config.store.postgresql.change_retention, config.store.postgresql.batch_size) == (2 * 86400, 100)
    other = "postgresql://app@other.internal/corsproxy"
    config = parse_config(BASE_CONFIG, env={"CORSPROXY_DATABASE_URL": other})
    assert config.store.postgresql is not None and config.store.postgresql.url == other
    assert parse_config(BASE_CONFIG, env={}).store.postgresql is None


@pytest.mark.parametrize(
    ("override", "where", "words"),
    [
        ({"store": {"postgresql": URL}, "origins_file": "/tmp/o.txt"}, "origins_file", "second one"),
        ({"store": {"postgresql": {"url": URL, "batch_size": 0}}}, "store.postgresql.batch_size", "from 1"),
        ({"store": {"postgresql": {"url": URL, "change_retention": "soon"}}}, "store.postgresql.change_retention", ""),
        ({"store": {"postgresql": {"url": URL, "pool": 3}}}, "store.postgresql.pool", "unknown key"),
        ({"store": {"postgresql": f"mysql://u:{SECRET}@h/db"}}, "store.postgresql", "not a PostgreSQL URL"),
        ({"store": {"postgresql": {"poll_interval": 1}}}, "store.postgresql", "CORSPROXY_DATABASE_URL"),
    ],
    ids=["with-origins-file", "batch-size", "retention", "unknown-key", "not-postgresql", "no-url"],
)
def test_refused_settings_name_the_key_and_never_the_password(
    override: dict[str, object], where: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(merge(BASE_CONFIG, override), env={})
    text = str(caught.value)
    assert f"{where}:" in text and words in text
    assert SECRET not in text


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        (URL, "postgresql://corsproxy:***@db.internal:5432/corsproxy"),
        ("postgresql://u@h/db?password=x&sslmode=require", "postgresql://u@h/db?password=***&sslmode=require"),
        ("host=h password=secret user=u", "host=h password=*** user=u"),
        ("host=h password='a b' user=u", "host=h password=*** user=u"),
        ("postgresql://h/db", "postgresql://h/db"),
    ],
)
def test_redaction(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown


def test_rows_are_checked_like_every_other_write() -> None:
    config = parse_config(BASE_CONFIG, env={})  # its default policy allows credentials
    record, why = check_row("https://a.customer.test", None, None, "n", config.safety)
    assert record is not None and (record.policy, record.source, record.note) == ("default", "postgresql", "n")
    for origin, words in [
        ("*", "allow_credentials"),
        ("null", "sandboxed"),
        ("https://*.com", "public suffix"),
        ("^https://.*$", ""),
        ("https://A.customer.test", "write it as 'https://a.customer.test'"),
        ("http://plain.customer.test", "plain http"),
    ]:
        record, why = check_row(origin, None, None, None, config.safety)
        assert record is None and words in why, (origin, why)
    record, why = check_row("https://a.customer.test", "nope", None, None, config.safety)
    assert record is None and "unknown policy 'nope'" in why


def test_the_shipped_fleet_example_validates() -> None:
    from pathlib import Path

    import yaml

    deploy = Path(__file__).resolve().parent.parent / "deploy"
    env = {"CORSPROXY_DATABASE_URL": URL, "CORSPROXY_ADMIN_TOKEN": "a-token-for-validation-only-0123"}
    config = parse_config(yaml.safe_load((deploy / "fleet/config.yaml").read_text()), env=env)
    assert config.store.postgresql is not None and config.store.postgresql.url == URL
    compose = yaml.safe_load((deploy / "docker-compose.fleet.yaml").read_text())
    services = compose["services"]
    assert services["migrate"]["command"][:2] == ["db", "migrate"]
    for name in ("corsproxy-a", "corsproxy-b"):
        service = services[name]
        assert service["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert "CORSPROXY_DATABASE_URL" in service["environment"]
        assert service["read_only"] is True
    # Each replica has its own store volume: replicas share PostgreSQL, never an LMDB directory.
    stores = [v for name in ("corsproxy-a", "corsproxy-b") for v in services[name]["volumes"] if "/var/lib" in v]
    assert len(set(stores)) == 2
