"""Configuration: YAML + environment overrides, validated with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.errors import ConfigError
from proxy.config import load_settings, settings_from_dict


def test_example_config_is_valid(repo_root: Path) -> None:
    s = load_settings(repo_root / "config" / "driftsched.example.yaml", environ={})
    assert s.pool is not None and s.pool.engine == "sim"
    assert {t.name for t in s.tenants} == {"acme", "nightly-batch"}


def test_defaults_need_no_file() -> None:
    s = load_settings(None, environ={})
    assert s.store.type == "memory" and s.server.port == 8000 and "premium" in s.classes


def test_env_overrides_are_typed_and_nested(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("server: {port: 9000}\nstore: {type: memory}\n")
    s = load_settings(f, environ={
        "DRIFTSCHED_STORE__TYPE": "redis",
        "DRIFTSCHED_SERVER__PORT": "9100",
        "DRIFTSCHED_SERVER__ACCESS_LOG": "false",
        "DRIFTSCHED_ADMIN_KEY": "secret",
        "DRIFTSCHED_POOL__SIM__TIME_SCALE": "4",
    })
    assert s.store.type == "redis" and s.server.port == 9100 and s.server.access_log is False
    assert s.admin.api_key is not None and s.admin.api_key.get_secret_value() == "secret"
    assert s.pool is not None and s.pool.sim.time_scale == 4.0


def test_config_path_from_env(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("server: {port: 9300}\n")
    assert load_settings(None, environ={"DRIFTSCHED_CONFIG": str(f)}).server.port == 9300


@pytest.mark.parametrize(("data", "needle"), [
    ({"tenants": [{"name": "x", "rpmm": 3}]}, "tenants[0].rpmm"),
    ({"store": {"type": "etcd"}}, "store.type"),
    ({"server": {"port": "http"}}, "server.port"),
    ({"tenants": [{"name": "x", "qos_class": "gold"}]}, "tenants[0].qos_class"),
    ({"tenants": [{"name": "x"}, {"name": "x"}]}, "duplicate"),
    ({"upstreams": [{"name": "u", "url": "ftp://x", "models": ["m"]}]}, "upstreams[0].url"),
    ({"upstreams": [{"name": "u", "url": "http://x", "models": []}]}, "upstreams[0].models"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_config_names_the_key(data: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        settings_from_dict(data)
    assert needle in str(ei.value)


def test_unknown_env_section_is_an_error() -> None:
    with pytest.raises(ConfigError, match="DRIFTSCHED_NOPE__X"):
        load_settings(None, environ={"DRIFTSCHED_NOPE__X": "1"})


def test_unreadable_or_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad, environ={})
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(bad, environ={})
