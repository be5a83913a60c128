"""What the load generator records about one request, and how a streamed answer fills it in.

Times are ``time.perf_counter()`` seconds relative to the replay's start (``t0``). A record
is filled by one client (:mod:`experiments.clients`) on the event loop; it is not shared
between tasks.

SSE events are inspected without decoding JSON on the hot path: the first token is the first
``data:`` event whose ``delta.content`` (chat) or ``text`` (completions) is a non-empty
string -- a bare ``"content":"`` can only be structural, as quotes inside a JSON string are
escaped -- and only the few events that carry ``usage``, a ``finish_reason`` or an
``error`` are decoded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

# outcome codes besides the OpenAI error codes the server returns
TIMEOUT = "timeout"  # no complete answer within --request-timeout
CONNECT_ERROR = "connect_error"  # could not connect / connection lost before any answer
STREAM_BROKEN = "stream_broken"  # connection lost mid-stream
INCOMPLETE = "incomplete"  # the stream ended without data: [DONE]
CANCELLED = "cancelled"  # still running when the replay's deadline passed
OVERFLOW = "loadgen_overflow"  # not sent: --max-inflight requests were already in flight

_NON_EMPTY = (b'"content":"', b'"text":"')
_EMPTY = (b'"content":""', b'"text":""')


@dataclass(slots=True)
class Record:
    """One CSV row. ``status`` is the HTTP status (0: no response); ``error`` is empty on
    success, else the server's OpenAI error ``code`` (``http_<status>`` when it has none)
    or one of this module's outcome codes."""

    request_id: str
    tenant: str
    qos_class: str
    intended_s: float
    #: when the generator started this request (before getting a connection)
    dispatched_s: float | None = None
    #: when the request's bytes were written (after connecting, if it had to)
    sent_s: float | None = None
    first_token_s: float | None = None
    done_s: float | None = None
    status: int = 0
    error: str = ""
    retry_after_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str = ""
    n_events: int = 0
    expected_prompt_tokens: int = 0
    expected_output_tokens: int = 0
    saw_done: bool = False

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error

    @property
    def lag_s(self) -> float | None:
        """The generator's own lateness: dispatched - intended."""
        return None if self.dispatched_s is None else self.dispatched_s - self.intended_s

    @property
    def connect_s(self) -> float | None:
        """Time to get a connection and write the request (a busy server accepts late)."""
        if self.sent_s is None or self.dispatched_s is None:
            return None
        return self.sent_s - self.dispatched_s

    # -- filling it in -------------------------------------------------------------------
    def on_headers(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        ms = headers.get("retry-after-ms")
        s = headers.get("retry-after")
        try:
            if ms is not None:
                self.retry_after_s = float(ms) / 1000.0
            elif s is not None:
                self.retry_after_s = float(s)
        except ValueError:
            pass

    def on_error_body(self, body: bytes) -> None:
        """A non-200 answer: take the OpenAI error code from its body."""
        code = None
        try:
            err = json.loads(body).get("error")
            if isinstance(err, dict):
                code = err.get("code") or err.get("type")
        except (ValueError, AttributeError):
            pass
        self.error = str(code) if code else f"http_{self.status}"

    def on_line(self, line: bytes, now: float) -> None:
        """One line of an SSE stream (without its newline)."""
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        self.n_events += 1
        if payload == b"[DONE]":
            self.saw_done = True
            return
        if (
            self.first_token_s is None
            and any(m in payload for m in _NON_EMPTY)
            and not any(m in payload for m in _EMPTY)
        ):
            self.first_token_s = now
        if b'"usage":{' in payload or b'"finish_reason":"' in payload or b'"error":' in payload:
            try:
                obj = json.loads(payload)
            except ValueError:
                return
            self.on_chunk(obj)

    def on_chunk(self, obj: Any) -> None:
        """A decoded stream event (the openai client hands these over directly)."""
        if not isinstance(obj, dict):
            return
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = usage.get("prompt_tokens")
            self.completion_tokens = usage.get("completion_tokens")
        err = obj.get("error")
        if isinstance(err, dict) and not self.error:
            self.error = str(err.get("code") or err.get("type") or "stream_error")
        for c in obj.get("choices") or ():
            if isinstance(c, dict) and c.get("finish_reason"):
                self.finish_reason = str(c["finish_reason"])

    def finish(self, now: float) -> None:
        """The answer ended (normally or not)."""
        self.done_s = now
        if self.status == 200 and not self.error and not self.saw_done:
            self.error = INCOMPLETE

    def fail(self, code: str, now: float) -> None:
        if not self.error:
            self.error = code
        if self.done_s is None:
            self.done_s = now


COLUMNS = [
    "request_id",
    "tenant",
    "qos_class",
    "intended_s",
    "dispatched_s",
    "sent_s",
    "lag_s",
    "connect_s",
    "first_token_s",
    "done_s",
    "ttft_s",
    "e2e_s",
    "status",
    "error",
    "retry_after_s",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
    "n_events",
    "expected_prompt_tokens",
    "expected_output_tokens",
]
_FIELDS = {f.name for f in fields(Record)}


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6f}"
    return v


def csv_row(r: Record) -> list[Any]:
    """The record as CSV cells in :data:`COLUMNS` order (empty cell: unknown)."""
    start = r.dispatched_s
    derived = {
        "lag_s": r.lag_s,
        "connect_s": r.connect_s,
        "ttft_s": None if r.first_token_s is None or start is None else r.first_token_s - start,
        "e2e_s": None if r.done_s is None or start is None or not r.ok else r.done_s - start,
    }
    return [_fmt(derived[c] if c in derived else getattr(r, c)) for c in COLUMNS]


assert set(COLUMNS) - {"lag_s", "connect_s", "ttft_s", "e2e_s"} <= _FIELDS
