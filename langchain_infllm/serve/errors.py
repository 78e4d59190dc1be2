"""Errors in OpenAI's shape, so every OpenAI client raises its own typed exception.

The body is ``{"error": {"message", "type", "param", "code"}}``; the SDKs map the HTTP
status to `AuthenticationError` (401), `BadRequestError` (400), `RateLimitError` (429)
and so on, which is what users of those clients already handle.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error the server answers with `status` and an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """The JSON body of an error response (also sent as the last SSE event of a stream
    that fails after its headers went out)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unauthorized(message: str = "Invalid or missing API key.") -> APIError:
    return APIError(401, message, type="invalid_request_error", code="invalid_api_key")


def too_many(message: str) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="rate_limit_exceeded")


def not_found(message: str, param: str | None = None) -> APIError:
    return APIError(404, message, param=param, code="model_not_found")


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"Request body larger than {limit} bytes.",
        code="request_too_large",
    )
