"""Every log line is scrubbed of secrets: configured keys, DriftSched keys past their display
prefix, bearer tokens (issue 14: secrets redacted in every log)."""

from __future__ import annotations

import json
import logging

from proxy.logs import JsonFormatter


def line(fmt: JsonFormatter, msg: str, **extra: object) -> str:
    rec = logging.LogRecord("t", logging.INFO, __file__, 1, msg, (), None)
    rec.__dict__.update(extra)
    return fmt.format(rec)


def test_configured_secrets_are_redacted_everywhere() -> None:
    fmt = JsonFormatter(secrets=["adm-top-secret", 'sk-"quoted"-key'])
    out = line(fmt, "admin key adm-top-secret failed", detail={"k": 'sk-"quoted"-key'})
    assert "adm-top-secret" not in out and "quoted" not in out
    assert json.loads(out)["msg"] == "admin key <redacted> failed"


def test_keys_keep_only_their_prefix_and_bearer_tokens_go() -> None:
    fmt = JsonFormatter()
    out = line(fmt, "got dsk-abcd1234-SECRETSECRETSECRET", header="Bearer tok-123 rest")
    assert "SECRET" not in out and "dsk-abcd1234" in out
    assert "tok-123" not in out and json.loads(out)["header"] == "Bearer <redacted> rest"


def test_an_exception_text_is_scrubbed_too() -> None:
    fmt = JsonFormatter(secrets=["sk-upstream-123"])
    try:
        raise RuntimeError("auth with sk-upstream-123 refused")
    except RuntimeError:
        import sys

        rec = logging.LogRecord("t", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
    out = fmt.format(rec)
    assert "sk-upstream-123" not in out and "<redacted>" in out
