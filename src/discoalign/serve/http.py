"""What every route of `discoalign serve` does with a request before its own work: the API key, the body (size and
time limits), the JSON (depth, lone surrogates), and errors as JSON `{"error": "..."}` with their status."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
from typing import Any

from .settings import API_KEY_ENV, ServeSettings

LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class RequestError(Exception):
    """A request the server refuses: `status` and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def _digest(text: str) -> bytes:
    # Starlette decodes header bytes as latin-1: encoding back gives the bytes the client sent.
    return hashlib.sha256(text.encode("latin-1", "replace")).digest()


def check_api_key(headers, settings: ServeSettings) -> None:
    """With an API key set, the request must send `Authorization: Bearer <key>` (compared in constant time)."""
    if settings.api_key is None:
        return
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(_digest(token.strip()), _digest(settings.api_key)):
        raise RequestError(401, "this server needs an API key: send the header `Authorization: Bearer <key>` with "
                                f"the key it was started with (--api-key or {API_KEY_ENV})",
                           headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


async def read_body(request, settings: ServeSettings) -> bytes:
    """The request's body, at most `max_request_bytes` (413, checked while it arrives) within `body_timeout` seconds
    (408: a client that stops sending cannot hold the connection)."""
    limit = settings.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the body has {declared} bytes, more than the server's limit of {limit} "
                                "(--max-request-bytes); send fewer items per request")  # fmt: skip

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the body has more than {limit} bytes, the server's limit "
                                        "(--max-request-bytes)")  # fmt: skip
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), timeout=settings.body_timeout)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the body did not arrive within {settings.body_timeout:g} s (--body-timeout)",
                           headers={"Connection": "close"}) from None  # fmt: skip


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A JSON object; 400 for invalid JSON, nesting deeper than Python's parser goes, or another JSON type."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON ({e})") from None
    except RecursionError:
        raise RequestError(400, "the body nests JSON arrays or objects too deeply to read") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, not {type(body).__name__}")
    return body


def check_text(value: str, where: str) -> str:
    """A string that is valid Unicode text: JSON's `\\ud800` escapes can make lone surrogates, which no tokenizer
    encodes (was a 500)."""
    match = LONE_SURROGATE.search(value)
    if match:
        raise RequestError(400, f"`{where}` holds a lone surrogate (U+{ord(match.group()):04X} at character "
                                f"{match.start()}), which is not text; encode characters beyond U+FFFF as a "
                                "surrogate pair or as UTF-8")  # fmt: skip
    return value


class ApiKeyMiddleware:
    """ASGI middleware: every HTTP request (any path, /health included) needs the API key when one is set."""

    def __init__(self, app, settings: ServeSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.settings.api_key is not None:
            from starlette.datastructures import Headers

            try:
                check_api_key(Headers(scope=scope), self.settings)
            except RequestError as e:
                await error_response(e.status, e.message, e.headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_starlette(routes, settings: ServeSettings, lifespan=None):
    """A Starlette app with `routes`, JSON errors for wrong paths / methods, and the API key check."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware

    async def http_error(request, exc: HTTPException):
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan,
                     middleware=[Middleware(ApiKeyMiddleware, settings=settings)])  # fmt: skip
