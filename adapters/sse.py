"""Relay of an OpenAI-style SSE stream without re-serialising its chunks.

:class:`StreamTap` sits on the byte stream from the engine. It cuts it at event boundaries
(``\\n\\n``), forwards complete events as the very bytes that arrived, and parses JSON only
for the (rare) events that carry a non-null ``usage`` — to capture real token counts, and to
drop the final usage-only chunk when the gateway injected ``stream_options.include_usage``
on behalf of a client that did not ask for it.
"""

from __future__ import annotations

import json
import re
from typing import Any

_USAGE_MARKERS = (b'"usage":{', b'"usage": {')
_DONE = b"data: [DONE]"
#: where an event may carry usage or an error (only those events are parsed)
_MARKER = re.compile(rb'"usage": ?\{|"error"')


def _has_usage(data: bytes) -> bool:
    return _USAGE_MARKERS[0] in data or _USAGE_MARKERS[1] in data


class StreamTap:
    """Feed it upstream bytes; it returns the bytes to send to the client now.

    Attributes after the stream: ``usage`` (the last usage object seen, or ``None``),
    ``done`` (``data: [DONE]`` was seen), ``events`` (data events relayed, a proxy for tokens
    generated so far), ``error`` (an ``error`` object the engine sent in-stream, if any).
    """

    __slots__ = ("_buf", "_sep", "done", "error", "events", "strip_usage", "usage")

    def __init__(self, *, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.done = False
        self.events = 0
        self._buf = b""
        self._sep: bytes | None = None

    def feed(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        sep = self._sep
        if sep is None:
            if b"\r\n\r\n" in buf:
                sep = self._sep = b"\r\n\r\n"
            elif b"\n\n" in buf:
                sep = self._sep = b"\n\n"
            else:
                self._buf = buf
                return b""
        cut = buf.rfind(sep)
        if cut < 0:
            self._buf = buf
            return b""
        end = cut + len(sep)
        complete, self._buf = buf[:end], buf[end:]
        self.events += complete.count(sep)
        if _DONE in complete:
            self.done = True
        if not _has_usage(complete) and b'"error"' not in complete:
            return complete
        return self._inspect(complete, sep)

    def _inspect(self, complete: bytes, sep: bytes) -> bytes:
        """Parse only the events around a marker; relay everything else untouched."""
        out: list[bytes] = []
        pos = 0  # complete[:pos] is dealt with; pos is always at an event boundary
        n = len(sep)
        while (m := _MARKER.search(complete, pos)) is not None:
            start = complete.rfind(sep, pos, m.start())
            start = pos if start < 0 else start + n
            end = complete.find(sep, m.end()) + n  # complete ends with sep: always found
            out.append(complete[pos:start])
            if self._keep(complete[start:end - n]):
                out.append(complete[start:end])
            pos = end
        out.append(complete[pos:])
        return b"".join(out)

    def _keep(self, event: bytes) -> bool:
        """Capture usage / error from one event; False to drop it (injected usage chunk)."""
        payload = _data_of(event)
        if payload is None or not (_has_usage(payload) or b'"error"' in payload):
            return True
        try:
            obj = json.loads(payload)
        except ValueError:
            return True
        keep = True
        if isinstance(obj, dict):
            if isinstance(obj.get("usage"), dict):
                self.usage = obj["usage"]
                if self.strip_usage and not obj.get("choices"):
                    keep = False
            if isinstance(obj.get("error"), dict):
                self.error = obj["error"]
        return keep

    def flush(self) -> bytes:
        """Whatever is left unterminated at end of stream (normally nothing)."""
        rest, self._buf = self._buf, b""
        return rest


def _data_of(event: bytes) -> bytes | None:
    """The concatenated ``data:`` payload of one SSE event, or ``None`` when it has none."""
    lines = [ln for ln in event.splitlines() if ln.startswith(b"data:")]
    if not lines:
        return None
    parts = [ln[5:].lstrip(b" ") for ln in lines]
    return b"\n".join(parts)


def error_event(error: dict[str, Any]) -> bytes:
    """An SSE event carrying an OpenAI error object (the SDK raises ``APIError`` on it)."""
    return b"data: " + json.dumps(error).encode() + b"\n\n"
