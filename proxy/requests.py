"""Parse and validate an OpenAI request body once; keep the raw bytes for forwarding.

Only what the gateway needs is checked (model, the prompt field, stream flags, token caps);
every other field — including vLLM extras such as ``top_k``, ``min_tokens``, ``ignore_eos`` —
passes through untouched. The body is re-serialised only when the gateway must change it
(injecting ``stream_options.include_usage``). Prompt tokens are counted here with the
heuristic (:data:`adapters.tokens.HEURISTIC`); :mod:`proxy.tokens` recounts them with the
model's tokenizer once the model is known to be served.

Every malformed input is an :class:`~adapters.errors.InvalidRequest` (400), never another
exception: bytes that are not JSON in UTF-8/16/32, JSON nested deeper than the parser takes
(``RecursionError``), strings holding lone UTF-16 surrogates (``"\\ud800"``, which no
engine can encode), and token counts out of :data:`MAX_TOKENS`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from adapters.errors import InvalidRequest
from adapters.tokens import HEURISTIC
from policies.features import prompt_text

Endpoint = Literal["chat", "completions", "embeddings"]

PATHS: dict[str, Endpoint] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
UPSTREAM_PATH: dict[Endpoint, str] = {v: k for k, v in PATHS.items()}

#: the largest ``max_tokens`` / ``max_completion_tokens`` taken (int32, what engines take);
#: larger is a 400, so a charge can never overflow the stores' arithmetic
MAX_TOKENS = 2**31 - 1
#: ``n`` (choices per request) is 1..MAX_N, as in OpenAI's API
MAX_N = 128
#: ``priority`` (vLLM's) is a signed 32-bit integer
PRIORITY_RANGE = (-(2**31), 2**31 - 1)
#: a ``\\uD800``-``\\uDFFF`` escape: the body may hold a lone surrogate (checked further)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: strict JSON: ``NaN`` / ``Infinity`` (which Python's json takes) are refused
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    endpoint: Endpoint
    model: str
    stream: bool
    #: bytes to send upstream (the client's own bytes unless the gateway had to change them)
    body: bytes
    prompt_tokens: int
    #: ``max_tokens`` / ``max_completion_tokens`` if the client set one
    max_tokens: int | None
    #: the gateway injected include_usage; hide the usage chunk from this client
    strip_usage: bool
    n_messages: int
    priority: int | None
    #: what the output-length estimator reads (last user message / the prompt)
    prompt_text: str = ""
    #: what is counted: the chat ``messages``, or the ``prompt`` / ``input`` as sent
    source: Any = None
    #: the client's claimed output length, read only with ``estimator.kind: oracle``
    #: (:func:`proxy.estimation.with_oracle_length`); None otherwise
    oracle_output_tokens: int | None = None


def _bad(message: str, param: str | None = None, code: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def parse_request(endpoint: Endpoint, raw: bytes) -> ParsedRequest:
    """The validated request; raises :class:`InvalidRequest` (400) for any malformed body."""
    if not raw:
        raise _bad("Request body is empty; expected a JSON object.")
    try:
        return _parse(endpoint, raw)
    except RecursionError:
        raise _bad("The JSON body of your request is nested too deeply.") from None


def decode_json(raw: bytes) -> Any:
    """The JSON value of ``raw``, strictly: :class:`InvalidRequest` for anything that is not
    JSON text in UTF-8/16/32, for ``NaN`` / ``Infinity``, lone surrogates and nesting deeper
    than the parser takes. (The admin API checks its bodies with it too.)"""
    try:
        return _loads(raw)[0]
    except RecursionError:
        raise _bad("The JSON body of your request is nested too deeply.") from None


def _loads(raw: bytes) -> tuple[Any, bool]:
    """The JSON value of ``raw`` and whether ``raw`` is UTF-8 (json also takes UTF-16/32)."""
    encoding = json.detect_encoding(raw)
    try:
        # strict decoding: surrogates encoded as bytes (CESU-8) are refused here
        text = raw.decode(encoding)
        body = _DECODER.decode(text.removeprefix("\ufeff"))
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, over-long int literals
        raise _bad(f"We could not parse the JSON body of your request: {e}.") from None
    if _SURROGATE_ESCAPE.search(text) is not None:
        # valid surrogate pairs (an emoji) are fine; a lone one cannot be encoded anywhere
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise _bad("The JSON body of your request holds an invalid Unicode escape "
                       "(a lone UTF-16 surrogate).") from None
    return body, encoding == "utf-8"


def _parse(endpoint: Endpoint, raw: bytes) -> ParsedRequest:
    body, utf8 = _loads(raw)
    if not isinstance(body, dict):
        raise _bad("Request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("you must provide a model parameter", param="model")

    n_messages = 0
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' must be a non-empty array", param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad(f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]")
        prompt_tokens = HEURISTIC.count_chat(messages)
        source: Any = messages
        n_messages = len(messages)
        text = prompt_text(messages)
    elif endpoint == "completions":
        if "prompt" not in body or body["prompt"] is None:
            raise _bad("you must provide a prompt parameter", param="prompt")
        if not isinstance(body["prompt"], str | list):
            raise _bad("'prompt' must be a string or an array", param="prompt")
        source = p = body["prompt"]
        prompt_tokens = HEURISTIC.count_prompt(p)
        text = p if isinstance(p, str) else (p[0] if p and isinstance(p[0], str) else "")
    else:
        if "input" not in body or not isinstance(body["input"], str | list):
            raise _bad("'input' must be a string or an array", param="input")
        source = body["input"]
        prompt_tokens = HEURISTIC.count_prompt(source)
        text = ""

    max_tokens = _max_tokens(body)
    _check_n(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", param="stream")
    if endpoint == "embeddings" and stream:
        raise _bad("embeddings cannot be streamed", param="stream")
    priority = body.get("priority")
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)
                                 or not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]):
        raise _bad("'priority' must be a 32-bit integer", param="priority")

    strip_usage = False
    # engines take UTF-8 JSON: a UTF-16/32 body is re-encoded, any other is forwarded as sent
    out = raw if utf8 else json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    if stream:
        so = body.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise _bad("'stream_options' must be an object", param="stream_options")
        if not (so and so.get("include_usage") is True):
            body["stream_options"] = {**(so or {}), "include_usage": True}
            strip_usage = True
            out = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return ParsedRequest(
        endpoint=endpoint,
        model=model,
        stream=stream,
        body=out,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        strip_usage=strip_usage,
        n_messages=n_messages,
        priority=priority,
        prompt_text=text,
        source=source,
    )


def _max_tokens(body: dict[str, Any]) -> int | None:
    """``max_completion_tokens``, else ``max_tokens`` (both are checked: both go upstream)."""
    found: int | None = None
    for name in ("max_completion_tokens", "max_tokens"):
        v = body.get(name)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_TOKENS:
            raise _bad(f"'{name}' must be an integer from 1 to {MAX_TOKENS}", param=name)
        if found is None:
            found = v
    return found


def _check_n(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N):
        raise _bad(f"'n' must be an integer from 1 to {MAX_N}", param="n")
