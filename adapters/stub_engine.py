"""A fast, deterministic OpenAI-compatible stub engine, for benchmarks and failure tests.

Unlike the simulator it models nothing: it answers at once (or after a fixed delay) with a
fixed number of tokens, so a benchmark measures the gateway and not the engine. Raw ASGI,
pre-rendered chunks, no JSON encoding per token.

Request fields it understands besides the OpenAI ones (they pass through the gateway
untouched, like any vLLM extra):

* ``stub_echo: true`` — the response carries ``"echo": <the request body it received>``;
* ``stub_fault``: ``"500"`` / ``"400"`` / ``"429"`` (that status, OpenAI error body),
  ``"hang"`` (never answers), ``"break"`` (drops the connection mid-stream),
  ``"truncate"`` (ends the stream without ``[DONE]``), ``"garbage"`` (non-JSON 200);
* ``stub_delay_ms``: wait before answering; ``stub_chunk_delay_ms``: wait between chunks.

Run: ``python -m adapters.stub_engine --port 9000 [--model stub] [--chunks 32]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from typing import Any

Scope = dict[str, Any]


class StubEngine:
    def __init__(self, model: str = "stub", chunks: int = 32,
                 max_model_len: int | None = None) -> None:
        self.model = model
        #: reported in ``/v1/models`` as vLLM does (None: not reported)
        self.max_model_len = max_model_len
        self.chunks = chunks
        self.requests = 0
        self.active = 0
        self.cancelled = 0
        created = int(time.time())
        head = {
            "id": "chatcmpl-stub",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        self._role = self._event(
            {
                **head,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                ],
            }
        )
        self._tok = self._event(
            {**head, "choices": [{"index": 0, "delta": {"content": " tok"}, "finish_reason": None}]}
        )
        self._stop = self._event(
            {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
        )
        self._created = created

    @staticmethod
    def _event(obj: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        if path == "/health":
            await self._respond(send, 200, b"")
            return
        if path == "/v1/models":
            await self._json(
                send,
                200,
                {
                    "object": "list",
                    "data": [
                        {
                            "id": self.model,
                            "object": "model",
                            "created": self._created,
                            "owned_by": "stub",
                            **({"max_model_len": self.max_model_len}
                               if self.max_model_len is not None else {}),
                        }
                    ],
                },
            )
            return
        if path == "/metrics":
            body = (
                f'vllm:num_requests_running{{model_name="{self.model}"}} {self.active}\n'
                f'vllm:num_requests_waiting{{model_name="{self.model}"}} 0\n'
                f'vllm:kv_cache_usage_perc{{model_name="{self.model}"}} 0.0\n'
                f'vllm:num_preemptions_total{{model_name="{self.model}"}} 0\n'
                f"stub_requests_total {self.requests}\nstub_cancelled_total {self.cancelled}\n"
            ).encode()
            await self._respond(send, 200, body, b"text/plain; version=0.0.4")
            return
        raw = b""
        while True:
            msg = await receive()
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.requests += 1
        self.active += 1
        # like vLLM: abort the request when the client disconnects
        work = asyncio.ensure_future(self._complete(path, raw, send))
        watch = asyncio.ensure_future(receive())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                watch.cancel()
                try:
                    work.result()
                except OSError:
                    self.cancelled += 1
            else:
                work.cancel()
                self.cancelled += 1
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await work
        finally:
            self.active -= 1

    async def _complete(self, path: str, raw: bytes, send: Any) -> None:
        try:
            body = json.loads(raw)
        except ValueError:
            await self._json(send, 400, _err("invalid JSON", 400))
            return
        fault = body.get("stub_fault")
        if body.get("stub_delay_ms"):
            await asyncio.sleep(float(body["stub_delay_ms"]) / 1000)
        if fault in ("500", "400", "429"):
            await self._json(send, int(fault), _err(f"stub fault {fault}", int(fault)))
            return
        if fault == "hang":
            await asyncio.sleep(3600)
        if fault == "garbage":
            await self._respond(send, 200, b"<html>not json</html>", b"application/json")
            return
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or self.chunks)
        n = min(n, self.chunks) if not body.get("ignore_eos") else n
        prompt_tokens = max(1, len(raw) // 4)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n,
            "total_tokens": prompt_tokens + n,
        }
        if path == "/v1/embeddings":
            inputs = body.get("input")
            count = (
                len(inputs)
                if isinstance(inputs, list) and inputs and isinstance(inputs[0], str)
                else 1
            )
            await self._json(
                send,
                200,
                {
                    "object": "list",
                    "model": self.model,
                    "data": [
                        {"object": "embedding", "index": i, "embedding": [0.0, 0.1, 0.2, 0.3]}
                        for i in range(count)
                    ],
                    "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
                },
            )
            return
        if not body.get("stream"):
            out: dict[str, Any]
            if path == "/v1/completions":
                out = {
                    "id": "cmpl-stub",
                    "object": "text_completion",
                    "created": self._created,
                    "model": self.model,
                    "choices": [
                        {
                            "index": 0,
                            "text": " tok" * n,
                            "finish_reason": "length",
                            "logprobs": None,
                        }
                    ],
                    "usage": usage,
                }
            else:
                out = {
                    "id": "chatcmpl-stub",
                    "object": "chat.completion",
                    "created": self._created,
                    "model": self.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": " tok" * n},
                            "finish_reason": "length",
                        }
                    ],
                    "usage": usage,
                }
            if body.get("stub_echo"):
                out["echo"] = body
            await self._json(send, 200, out)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        delay = float(body.get("stub_chunk_delay_ms") or 0) / 1000
        await send({"type": "http.response.body", "body": self._role, "more_body": True})
        for i in range(n):
            if delay:
                await asyncio.sleep(delay)
            if fault == "break" and i == n // 2:
                raise OSError("stub: connection dropped on purpose")
            await send({"type": "http.response.body", "body": self._tok, "more_body": True})
        tail = self._stop
        so = body.get("stream_options") or {}
        if so.get("include_usage"):
            tail += self._event(
                {
                    "id": "chatcmpl-stub",
                    "object": "chat.completion.chunk",
                    "created": self._created,
                    "model": self.model,
                    "choices": [],
                    "usage": usage,
                }
            )
        if fault != "truncate":
            tail += b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    async def _json(self, send: Any, status: int, obj: dict[str, Any]) -> None:
        await self._respond(send, status, json.dumps(obj).encode(), b"application/json")

    @staticmethod
    async def _respond(send: Any, status: int, body: bytes, ctype: bytes = b"text/plain") -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _err(message: str, status: int) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": "BadRequestError" if status < 500 else "InternalServerError",
            "param": None,
            "code": status,
        }
    }


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(
        prog="python -m adapters.stub_engine",
        description="Fast deterministic OpenAI-compatible stub engine.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--model", default="stub")
    p.add_argument("--chunks", type=int, default=32, help="tokens per response (default 32)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length reported in /v1/models (default: not reported)")
    a = p.parse_args(argv)
    uvicorn.run(
        StubEngine(a.model, a.chunks, a.max_model_len),
        host=a.host,
        port=a.port,
        access_log=False,
        log_level="warning",
        lifespan="on",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
