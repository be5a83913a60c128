"""Where the store's Redis is: a plain URL, or Sentinels to ask for the current primary.

One question: *which Redis does a store URL name?* ``redis://`` and ``rediss://`` (TLS) URLs
go to redis-py as they are. A Sentinel-managed Redis is named by the URL form that
redis-py's users meet in Celery, Kombu and the ``redis-sentinel-url`` package::

    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db][?opts]

* the hosts are the Sentinels (port 26379 by default), tried in order; ``service_name`` is
  the monitored master's name (``sentinel monitor <service_name> ...``), ``db`` defaults to 0;
* ``user:password`` authenticate to the primary (and replicas), not to the Sentinels;
* options: ``sentinel_password`` (and ``sentinel_username``) when the Sentinels require AUTH;
* ``rediss+sentinel://`` uses TLS to the Sentinels and to the primary.

:func:`parse_sentinel_url` is pure (no I/O, no redis import), so configuration is validated
with it at load time; :func:`proxy.redisconn.connect` connects with its result.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["SENTINEL_SCHEMES", "SentinelTarget", "is_sentinel_url", "parse_sentinel_url"]

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379
_OPTIONS = frozenset({"sentinel_password", "sentinel_username"})


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A parsed ``redis+sentinel://`` URL. ``repr`` hides the passwords."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False

    def __repr__(self) -> str:
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"SentinelTarget({hosts}/{self.service_name}/{self.db}, ssl={self.ssl})"


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


def _host_port(item: str, url: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_s = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError(f"a sentinel URL lists an empty host: {url!r}")
    try:
        port = int(port_s) if port_s else DEFAULT_SENTINEL_PORT
    except ValueError:
        raise ValueError(f"a sentinel URL has a bad port {port_s!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"a sentinel URL has a bad port {port}")
    return host, port


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The Sentinels, service and credentials of a ``redis+sentinel://`` URL.

    Raises :class:`ValueError` naming what is wrong (never echoing a password).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a sentinel URL (scheme {scheme!r}; expected redis+sentinel://)")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, has_pw, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if has_pw else None
    shown = f"{scheme}://{hostlist}{parts.path}"  # no credentials
    sentinels = tuple(_host_port(h.strip(), shown) for h in hostlist.split(",") if h.strip())
    if not sentinels:
        raise ValueError(f"a sentinel URL needs at least one sentinel host: {shown!r}")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError(f"a sentinel URL's path is /service_name[/db]: {shown!r}")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise ValueError(f"a sentinel URL's db must be a number: {shown!r}")
        db = int(path[1])
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - _OPTIONS)
    if unknown:
        raise ValueError(f"unknown sentinel URL option(s) {unknown}; known: {sorted(_OPTIONS)}")

    def opt(name: str) -> str | None:
        values = query.get(name)
        return values[-1] if values else None

    return SentinelTarget(
        sentinels=sentinels,
        service_name=unquote(path[0]),
        db=db,
        username=username,
        password=password,
        sentinel_username=opt("sentinel_username"),
        sentinel_password=opt("sentinel_password"),
        ssl=scheme == "rediss+sentinel",
    )
