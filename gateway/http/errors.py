"""HTTP errors in OpenAI's shape, and the HTTP status of each gRPC status the generation path can end with.

Every error body is `{"error": {"message", "type", "param", "code"}}` (what OpenAI answers and what its
clients parse), on every route, /score included, so that a client needs one error parser.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web

from gateway.generations import RequestRejected
from gateway.validation import InvalidRequest

STATUS_BY_CODE = {code.value[0]: code for code in grpc.StatusCode}
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    # nginx's "client closed request": the status a request the client abandoned is counted under.
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
CLIENT_CLOSED = 499
# Codes for the cases a client may want to tell apart without parsing the message.
ERROR_CODE = {429: "rate_limit_exceeded", 503: "unavailable", 504: "deadline_exceeded"}


@dataclass
class HttpError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    @property
    def type(self) -> str:
        if self.status == 429:
            return "rate_limit_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        code = self.code or ERROR_CODE.get(self.status)
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": code}}

    def response(self) -> web.Response:
        return web.Response(
            status=self.status, text=dumps(self.body()), content_type="application/json", headers=self.headers
        )


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def invalid(exc: InvalidRequest) -> HttpError:
    return HttpError(400, str(exc), param=exc.field)


def from_status(code: grpc.StatusCode | int, message: str) -> HttpError:
    status = code if isinstance(code, grpc.StatusCode) else STATUS_BY_CODE.get(code, grpc.StatusCode.UNKNOWN)
    return HttpError(HTTP_STATUS.get(status, 500), message)


def rejected(exc: RequestRejected) -> HttpError:
    """Admission's refusal. A 429 says when to come back: `retry-after` in whole seconds (HTTP's unit) and
    `retry-after-ms`, which OpenAI's clients read first."""
    error = from_status(exc.code, str(exc))
    if error.status == 429:
        ms = exc.retry_after_ms or 1000
        error.headers = {"retry-after": str(math.ceil(ms / 1000)), "retry-after-ms": str(ms)}
    return error
