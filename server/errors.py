"""Errors that carry their own HTTP status; turned into JSON in one place (server.http.app)."""

from __future__ import annotations

from typing import Any

ECHO_CHARS = 100  # a client's value quoted back in a message, at most
MESSAGE_CHARS = 2000  # a whole message, at most: a backstop for whatever echoes input


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """``value`` as quoted back to the client, cut to ``limit`` characters: a 200 KB model
    name must not make a 200 KB error."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class ApiError(Exception):
    """An error a client can act on: status, machine code, message and optional details."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        message = echo(message, MESSAGE_CHARS)
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message, "code": self.code}
        if self.details:
            out["details"] = self.details
        return out


def validation_error(message: str, loc: list[Any], msg: str | None = None) -> ApiError:
    """A 422 with one field path, for checks made outside pydantic."""
    return ApiError(422, "validation_error", message, [{"loc": loc, "msg": msg or message}])


def not_found(what: str, message: str) -> ApiError:
    return ApiError(404, f"{what}_not_found", message)


def message_only(err: ApiError, request_id: str = "") -> tuple[int, dict[str, Any]]:
    """The error shape of TF Serving and the Open Inference Protocol: ``{"error": message}``,
    with their INVALID_ARGUMENT (400) where the native API says 422."""
    return (400 if err.status == 422 else err.status), {"error": err.message}
