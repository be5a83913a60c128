"""The one exception tree of DriftSched, and its mapping to OpenAI's error shape.

Every failure a client can see is a :class:`GatewayError`; it renders itself as OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with the right status and headers.
Nothing else is mapped to HTTP anywhere else.

    GatewayError
    ├── InvalidRequest          400 invalid_request_error
    │   ├── BodyTooLarge        413 invalid_request_error / request_too_large
    │   └── ClientTimeout       408 invalid_request_error / request_timeout (headers or
    │                               body not received in time; the connection is closed)
    ├── AuthenticationFailed    401 invalid_request_error / invalid_api_key
    ├── PermissionDenied        403 invalid_request_error / model_not_allowed
    ├── NotFound                404 invalid_request_error / model_not_found
    ├── RateLimited             429 requests|tokens / rate_limit_exceeded   (retry)
    │   └── QuotaExceeded       429 insufficient_quota / insufficient_quota (no retry)
    ├── QueueTimeout            503 server_error / queue_timeout            (retry)
    ├── StoreUnavailable        503 server_error / store_unavailable        (retry)
    ├── ServerOverloaded        503 server_error / server_overloaded        (retry; at the
    │                               connection limit)
    ├── DeadlineExceeded        504 server_error / deadline_exceeded        (no retry; ran
    │                               past server.max_request_duration_s)
    ├── UpstreamError           502 server_error / upstream_error
    │   ├── UpstreamUnavailable 503 server_error / no_healthy_backend
    │   └── UpstreamTimeout     504 server_error / upstream_timeout
    └── InternalError           500 server_error / internal_error

``ConfigError`` is separate: it stops start-up and never reaches a client.
"""

from __future__ import annotations

import json
import math


class ConfigError(Exception):
    """Invalid configuration; the message names the offending key."""


class GatewayError(Exception):
    status: int = 500
    error_type: str = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def type(self) -> str:
        return self.error_type

    def to_dict(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return json.dumps(self.to_dict()).encode()


class InvalidRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    """The request can never run: it does not fit any engine serving its model."""

    default_code = "context_length_exceeded"


class BodyTooLarge(InvalidRequest):
    status = 413
    default_code = "request_too_large"


class AuthenticationFailed(GatewayError):
    status = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    error_type = "invalid_request_error"
    default_code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


def retry_headers(wait_s: float) -> dict[str, str]:
    """``retry-after`` (whole seconds, rounded up) and ``retry-after-ms`` for a real wait."""
    wait_s = max(0.0, wait_s)
    return {
        "retry-after": str(max(1, math.ceil(wait_s))),
        "retry-after-ms": str(max(1, math.ceil(wait_s * 1000))),
    }


class RateLimited(GatewayError):
    """Slow down: the request may succeed after ``retry_after_s``."""

    status = 429
    default_code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float,
        limit_type: str = "requests",
        code: str | None = None,
        headers: dict[str, str] | None = None,
        should_retry: bool = True,
    ) -> None:
        merged = retry_headers(retry_after_s)
        if not should_retry:
            merged["x-should-retry"] = "false"
        merged.update(headers or {})
        super().__init__(message, code=code, headers=merged)
        self.retry_after_s = retry_after_s
        self.limit_type = limit_type

    @property
    def type(self) -> str:
        return self.limit_type


class QueueFull(RateLimited):
    """The tenant's or the gateway's admission queue is at its depth limit."""

    default_code = "queue_full"


class QuotaExceeded(RateLimited):
    """The tenant's token quota for the period is used up; retrying now is pointless."""

    default_code = "insufficient_quota"

    def __init__(
        self, message: str, *, retry_after_s: float, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(
            message,
            retry_after_s=retry_after_s,
            limit_type="insufficient_quota",
            headers=headers,
            should_retry=False,
        )


class QueueTimeout(GatewayError):
    status = 503
    default_code = "queue_timeout"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message, headers=retry_headers(retry_after_s))
        self.retry_after_s = retry_after_s


class SloUnattainable(QueueTimeout):
    """The request could no longer meet its TTFT SLO while queued and the policy sheds such
    requests (``driftsched`` with ``feasibility: shed``): a queue timeout that came early."""

    default_code = "slo_unattainable"


class StoreUnavailable(GatewayError):
    """The state store (Redis) did not answer; limits cannot be checked."""

    status = 503
    default_code = "store_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers=retry_headers(1.0))


class ClientTimeout(InvalidRequest):
    """The client did not send its request (headers or body) in time."""

    status = 408
    default_code = "request_timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"connection": "close"})


class ServerOverloaded(GatewayError):
    """The server is at its connection limit."""

    status = 503
    default_code = "server_overloaded"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers=retry_headers(1.0))


class DeadlineExceeded(GatewayError):
    """The request ran longer than the gateway allows any request to run; retrying the same
    request would most likely run as long again (``x-should-retry: false`` tells the SDKs)."""

    status = 504
    default_code = "deadline_exceeded"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"x-should-retry": "false"})


class UpstreamError(GatewayError):
    status = 502
    default_code = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    status = 503
    default_code = "no_healthy_backend"


class UpstreamTimeout(UpstreamError):
    status = 504
    default_code = "upstream_timeout"


class InternalError(GatewayError):
    status = 500
    default_code = "internal_error"
