"""Environment overrides are read as the type of the setting they name (issue 14): ``null``
cannot switch the admin API off, and ``DRIFTSCHED_*`` variables that are not settings are
left to their owners."""

from __future__ import annotations

import pytest

from adapters.errors import ConfigError
from proxy.config import load_settings, redacted, settings_from_dict


def test_null_admin_key_is_a_key_not_unset() -> None:
    s = load_settings(None, environ={"DRIFTSCHED_ADMIN__API_KEY": "null"})
    assert s.admin.api_key is not None and s.admin.api_key.get_secret_value() == "null"
    s = load_settings(None, environ={"DRIFTSCHED_ADMIN_KEY": "~"})
    assert s.admin.api_key is not None and s.admin.api_key.get_secret_value() == "~"


def test_an_empty_admin_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"admin\.api_key"):
        load_settings(None, environ={"DRIFTSCHED_ADMIN_KEY": ""})


def test_other_string_settings_keep_their_text() -> None:
    s = load_settings(None, environ={"DRIFTSCHED_STORE__PREFIX": "007",
                                     "DRIFTSCHED_SERVER__HOST": "yes"})
    assert s.store.prefix == "007" and s.server.host == "yes"  # YAML: 7 and True


def test_numbers_booleans_and_null_for_optional_numbers() -> None:
    s = load_settings(None, environ={
        "DRIFTSCHED_SERVER__PORT": "9100",
        "DRIFTSCHED_SERVER__ACCESS_LOG": "false",
        "DRIFTSCHED_SCHEDULER__MAX_QUEUED": "null",
        "DRIFTSCHED_SCHEDULER__GOVERNOR__ENABLED": "true",
    })
    assert s.server.port == 9100 and s.server.access_log is False
    assert s.scheduler.max_queued is None and s.scheduler.governor.enabled is True
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_settings(None, environ={"DRIFTSCHED_SERVER__PORT": "null"})
    with pytest.raises(ConfigError, match="auth_cache_ttl_s"):
        load_settings(None, environ={"DRIFTSCHED_SERVER__AUTH_CACHE_TTL_S": ".inf"})


def test_lists_and_mappings_are_json() -> None:
    s = load_settings(None, environ={"DRIFTSCHED_POOL__ARGS": '["--x", "1"]'})
    assert s.pool is not None and s.pool.args == ["--x", "1"]
    with pytest.raises(ConfigError, match="DRIFTSCHED_POOL__ARGS: not valid JSON"):
        load_settings(None, environ={"DRIFTSCHED_POOL__ARGS": "[--x"})


def test_variables_that_are_not_settings_are_ignored() -> None:
    s = load_settings(None, environ={"DRIFTSCHED_SHARED_DATA": "/data", "DRIFTSCHED_URL": "x",
                                     "DRIFTSCHED_VLLM_VENV": "/v", "DRIFTSCHED_BIND": "0.0.0.0"})
    assert s.server.port == 8000


@pytest.mark.parametrize(("name", "needle"), [
    ("DRIFTSCHED_SERVER_PORT", "DRIFTSCHED_SERVER__PORT"),  # one underscore: a typo
    ("DRIFTSCHED_ADMIN_API_KEY", "DRIFTSCHED_ADMIN__API_KEY"),
    ("DRIFTSCHED_TENANTS", "whole section"),
    ("DRIFTSCHED_NOPE__X", "unknown setting"),
])
def test_typos_of_settings_are_errors(name: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_settings(None, environ={name: "1"})


def test_keys_are_secrets() -> None:
    s = settings_from_dict({"admin": {"api_key": "adm-123456"},
                            "tenants": [{"name": "t", "api_keys": ["dsk-abcdefgh-SECRET"]}]})
    assert "adm-123456" not in repr(s) and "SECRET" not in repr(s)
    assert "adm-123456" not in str(redacted(s)) and "SECRET" not in str(redacted(s))
    # a JSON dump round-trips (the keys work again when loaded back)
    again = settings_from_dict(s.model_dump(mode="json"))
    assert again.tenants[0].api_keys[0].get_secret_value() == "dsk-abcdefgh-SECRET"
