"""API keys: generation, digests and display prefixes. Keys are never stored or logged.

A key looks like ``dsk-<8 id chars>-<43 secret chars>``. The first 12 characters
(``dsk-<id>``) are its display prefix, safe to log and to list by.
"""

from __future__ import annotations

import hashlib
import secrets
import string

from pydantic import SecretStr

from proxy.store.base import KeyRecord

KEY_PREFIX = "dsk-"
PREFIX_LEN = len(KEY_PREFIX) + 8
_ID_ALPHABET = string.ascii_lowercase + string.digits


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def display_prefix(key: str) -> str:
    """What may be shown or logged of a key: never more than its first 12 characters."""
    return key[:PREFIX_LEN] if key.startswith(KEY_PREFIX) else key[:6] + "..."


def new_key(tenant: str, now: float, name: str = "") -> tuple[str, KeyRecord]:
    """A fresh random key and the record to store (which holds only its digest)."""
    ident = "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))
    key = f"{KEY_PREFIX}{ident}-{secrets.token_urlsafe(32)}"
    record = KeyRecord(
        key_id=f"key_{ident}",
        tenant=tenant,
        digest=digest(key),
        prefix=key[:PREFIX_LEN],
        name=name,
        created_at=now,
    )
    return key, record


def seeded_record(key: str | SecretStr, tenant: str, now: float) -> KeyRecord:
    """The record for a key given in configuration; its id is stable across restarts."""
    if isinstance(key, SecretStr):
        key = key.get_secret_value()
    d = digest(key)
    return KeyRecord(
        key_id=f"key_cfg{d[:10]}",
        tenant=tenant,
        digest=d,
        prefix=display_prefix(key),
        name="from config",
        created_at=now,
    )
