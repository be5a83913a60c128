"""Structured logs: one JSON object per line on stderr, with secrets redacted.

Keys are never logged on purpose (only their display prefixes), and the formatter makes sure
of it: every line is scrubbed of the configured secrets (the admin key, tenants' seeded keys,
upstream credentials: :func:`proxy.config.secret_values`), of anything shaped like a
DriftSched key past its prefix (``dsk-<id>-…``) and of ``Bearer`` tokens.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
REDACTED = "<redacted>"
#: a DriftSched key: its 12-character display prefix is kept, the secret part is not
_KEY = re.compile(r"(dsk-[a-z0-9]{8})-[A-Za-z0-9_-]+")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
#: secrets shorter than this are not scrubbed by value (they would mangle ordinary text)
_MIN_SECRET = 6


class JsonFormatter(logging.Formatter):
    """``secrets``: values to replace by ``<redacted>`` wherever they appear."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        forms: set[str] = set()
        for s in secrets:
            if len(s) >= _MIN_SECRET:
                forms.add(s)
                forms.add(json.dumps(s)[1:-1])  # as it appears inside a JSON string
        # longest first, so a secret that contains another is replaced whole
        self._secrets = sorted(forms, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _RESERVED and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return self.redact(json.dumps(out, default=str))

    def redact(self, line: str) -> str:
        for s in self._secrets:
            if s in line:
                line = line.replace(s, REDACTED)
        if "dsk-" in line:
            line = _KEY.sub(r"\1-…", line)
        return _BEARER.sub(r"\1" + REDACTED, line)


def configure_logging(level: str = "info", secrets: Iterable[str] = ()) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_driftsched", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets))
    handler._driftsched = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "LiteLLM", "litellm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
