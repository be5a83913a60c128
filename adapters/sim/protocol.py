"""OpenAI request bodies (validated at the edge) and vLLM-shaped response bytes.

Unknown request fields are ignored, as vLLM does for fields it does not use here (sampling
parameters, tools, ...). Responses are built as bytes from per-request templates: the hot
path of a stream is one string format per SSE event.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def json_bytes(obj: object) -> bytes:
    """Compact JSON bytes (what orjson.dumps gave, with the standard library)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


FILLER = " tok"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False
    priority: int = 0

    def limit(self) -> int | None:
        return self.max_tokens


class ChatBody(_Body):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def limit(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


class CompletionBody(_Body):
    prompt: str | list[int] | list[str]


Kind = Literal["chat", "text"]


def error_body(status: int, message: str, *, param: str | None = None) -> bytes:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return json_bytes({"error": {"message": message, "type": kind, "param": param, "code": status}})


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
    }


def full_response(
    kind: Kind, rid: str, created: int, model: str, prompt: int, completion: int, finish: str
) -> bytes:
    text = FILLER * completion
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "tool_calls": [],
                "reasoning_content": None,
            },
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
        }
        obj = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
            "prompt_logprobs": None,
        }
        obj = "text_completion"
    return json_bytes(
        {
            "id": rid,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage(prompt, completion),
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }
    )


class ChunkWriter:
    """SSE events of one streamed response, in vLLM's chunk shapes."""

    __slots__ = ("_head", "_kind", "_tail", "include_usage")

    def __init__(self, kind: Kind, rid: str, created: int, model: str, include_usage: bool) -> None:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self._kind = kind
        self.include_usage = include_usage
        self._head = (
            f'data: {{"id":"{rid}","object":"{obj}","created":{created},'
            f'"model":{json_bytes(model).decode()},"choices":['
        )
        self._tail = '],"usage":null}\n\n' if include_usage else "]}\n\n"

    def role(self) -> str:
        return (
            self._head + '{"index":0,"delta":{"role":"assistant","content":""},'
            '"logprobs":null,"finish_reason":null}' + self._tail
        )

    def tokens(self, count: int, finish: str | None = None) -> str:
        fin = "null" if finish is None else f'"{finish}"'
        text = FILLER * count
        if self._kind == "chat":
            choice = (
                f'{{"index":0,"delta":{{"content":"{text}"}},"logprobs":null,"finish_reason":{fin}'
            )
        else:
            choice = f'{{"index":0,"text":"{text}","logprobs":null,"finish_reason":{fin}'
        if finish is not None:
            choice += ',"stop_reason":null'
        return self._head + choice + "}" + self._tail

    def usage(self, prompt: int, completion: int) -> str:
        u = json_bytes(usage(prompt, completion)).decode()
        return self._head + '],"usage":' + u + "}\n\n"

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"
