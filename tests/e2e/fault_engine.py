"""An engine process that answers the ways a real one can fail (``python -m tests.e2e.fault_engine``).

A real HTTP server (uvicorn) over loopback, for the hardening tests; the request's
``"fault"`` field picks the answer:

* ``"401"`` / ``"403"`` / ``"429"``: that status, with an OpenAI error body whose message
  names an internal address (as a provider or a proxy in front of vLLM would);
* ``"stream_error"``: a 200 SSE stream with one token, then an in-stream ``error`` event;
* ``"bad_usage"``: a 200 answer whose ``usage`` counts are not integers;
* none: a normal completion (2 tokens) with usage.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import uvicorn

INTERNAL = "http://10.1.2.3:8000"


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/health":
        await _send(send, 200, b"{}")
        return
    if scope["path"] == "/v1/models":
        await _send(send, 200, json.dumps({"object": "list", "data": [
            {"id": "fault", "object": "model", "owned_by": "test"}]}).encode())
        return
    raw = b""
    while True:
        msg = await receive()
        raw += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    body = json.loads(raw)
    fault = body.get("fault")
    head = {"id": "x", "object": "chat.completion.chunk", "model": "fault"}
    if fault in ("401", "403", "429"):
        err = {"error": {"message": f"key rejected by the proxy at {INTERNAL}",
                         "type": "invalid_request_error", "param": None,
                         "code": "invalid_api_key" if fault != "429" else "rate_limit_exceeded"}}
        await _send(send, int(fault), json.dumps(err).encode())
    elif fault == "stream_error":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        tok = {**head, "choices": [{"index": 0, "delta": {"content": " tok"}}]}
        err = {"error": {"message": "engine failed mid-stream", "type": "server_error",
                         "param": None, "code": None}}
        for ev in (_sse(tok), _sse(err), b"data: [DONE]\n\n"):
            await send({"type": "http.response.body", "body": ev, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    else:
        usage: dict[str, Any] = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        if fault == "bad_usage":
            usage = {"prompt_tokens": "three", "completion_tokens": [2], "total_tokens": None}
        out = {"id": "x", "object": "chat.completion", "model": "fault",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": " tok tok"},
                            "finish_reason": "length"}], "usage": usage}
        await _send(send, 200, json.dumps(out).encode())


async def _send(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
