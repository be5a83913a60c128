"""StreamTap: relays SSE bytes unchanged whatever the chunking, captures and strips usage."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from adapters.sse import StreamTap
from proxy.shaping import format_reset


def ev(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


CHUNKS = [ev({"choices": [{"delta": {"content": f"t{i}"}}], "usage": None}) for i in range(5)]
USAGE = ev({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}})
STREAM = b"".join(CHUNKS) + USAGE + b"data: [DONE]\n\n"


def feed_split(tap: StreamTap, data: bytes, cuts: list[int]) -> bytes:
    out = b""
    prev = 0
    for c in sorted(set(cuts)):
        out += tap.feed(data[prev:c])
        prev = c
    out += tap.feed(data[prev:])
    return out + tap.flush()


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_relay_is_byte_exact_without_stripping(cuts: list[int]) -> None:
    tap = StreamTap(strip_usage=False)
    assert feed_split(tap, STREAM, cuts) == STREAM
    assert tap.usage == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert tap.done


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_injected_usage_chunk_is_stripped(cuts: list[int]) -> None:
    tap = StreamTap(strip_usage=True)
    assert feed_split(tap, STREAM, cuts) == b"".join(CHUNKS) + b"data: [DONE]\n\n"
    assert tap.usage is not None and tap.usage["completion_tokens"] == 5


def test_usage_on_a_chunk_with_choices_is_kept() -> None:
    # continuous usage stats: usage rides on content chunks, which must never be dropped
    data = ev({"choices": [{"delta": {"content": "x"}}], "usage": {"completion_tokens": 1}})
    tap = StreamTap(strip_usage=True)
    assert tap.feed(data) == data


def test_crlf_streams_and_error_events() -> None:
    data = b'data: {"error": {"message": "boom", "code": 500}}\r\n\r\n'
    tap = StreamTap(strip_usage=False)
    assert tap.feed(data) == data
    assert tap.error == {"message": "boom", "code": 500}
    assert not tap.done


def test_nothing_is_emitted_before_an_event_is_complete() -> None:
    tap = StreamTap(strip_usage=False)
    assert tap.feed(CHUNKS[0][:10]) == b""
    assert tap.feed(CHUNKS[0][10:]) == CHUNKS[0]
    assert tap.events == 1


def test_format_reset_matches_openai() -> None:
    assert format_reset(0.02) == "20ms"
    assert format_reset(1.5) == "1.5s"
    assert format_reset(360) == "6m0s"
    assert format_reset(3723) == "1h2m3s"
    assert format_reset(0) == "0s"
