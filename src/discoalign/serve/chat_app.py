"""`discoalign serve --model <policy>`: OpenAI's chat completions API for a trained policy, so existing clients (the
`openai` package, curl, chat UIs) can talk to it.

    POST /v1/chat/completions  {"messages": [...], "max_tokens": 64, "temperature": 0.7, "top_p": 1, "stream": false}
    GET  /v1/models            the one model served
    GET  /health

`stream: true` answers with server-sent events, `data: {chat.completion.chunk}` per piece of text and `data: [DONE]`
at the end, as OpenAI's API does. One answer is generated at a time (requests wait their turn, at most `max_queue`
of them, then 503). Errors are JSON `{"error": "..."}` with the statuses of the reward server (`serve.app`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import ConfigError
from .chat_engine import ChatEngine, check_messages
from .http import RequestError, build_starlette, check_text, error_response, parse_json_object, read_body
from .settings import ServeSettings

DEFAULT_MAX_TOKENS = 256


def parse_chat_request(body: dict[str, Any], settings: ServeSettings) -> dict[str, Any]:
    """The generation arguments of a chat completions body; RequestError(400) naming what is wrong."""
    try:
        messages = check_messages(body.get("messages"))
    except ConfigError as e:
        raise RequestError(400, str(e)) from None
    for i, message in enumerate(messages):
        check_text(message["content"], f"messages[{i}].content")
    n = body.get("n", 1)
    if n not in (1, None):
        raise RequestError(400, f"`n` is {n!r}; this server returns one choice per request")
    if body.get("stop") not in (None, [], ""):
        raise RequestError(400, "`stop` sequences are not supported; answers end at the model's stop token")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = min(DEFAULT_MAX_TOKENS, settings.max_new_tokens) if max_tokens is None else max_tokens
    if (
        isinstance(max_tokens, bool)
        or not isinstance(max_tokens, int)
        or not 1 <= max_tokens <= settings.max_new_tokens
    ):
        raise RequestError(400, f"`max_tokens` is {max_tokens!r}; it must be an integer from 1 to "
                                f"{settings.max_new_tokens} (--max-new-tokens)")  # fmt: skip
    numbers = {}
    for key, default, low, high in (("temperature", 1.0, 0.0, 2.0), ("top_p", 1.0, 1e-6, 1.0)):
        value = body.get(key, default)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise RequestError(400, f"`{key}` is {value!r}; it must be a number in [{low:g}, {high:g}]")
        numbers[key] = float(value)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, f"`seed` is {seed!r}; it must be an integer")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"`stream` is {stream!r}; it must be true or false")
    return {"messages": messages, "max_new_tokens": max_tokens, "seed": seed, "stream": stream, **numbers}


def build_chat_app(engine: ChatEngine, settings: ServeSettings | None = None, model_id: str | None = None):
    """The Starlette app serving `engine` with OpenAI's chat completions API."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    settings = settings or ServeSettings()
    settings.check()
    model_id = model_id or engine.model_dir
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="discoalign-chat")
    state = {"waiting": 0, "answered": 0}

    def completion_id() -> str:
        return f"chatcmpl-{uuid.uuid4().hex[:24]}"

    def chunk(cid: str, created: int, delta: dict, finish: str | None) -> str:
        data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def stream_answer(args: dict[str, Any], cid: str, created: int):
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def run():
            try:
                reply = engine.generate(**args, on_text=lambda t: loop.call_soon_threadsafe(pieces.put_nowait, t),
                                        cancel=cancel)  # fmt: skip
                loop.call_soon_threadsafe(pieces.put_nowait, reply)
            except Exception as e:  # noqa: BLE001 - ends the stream with the error
                loop.call_soon_threadsafe(pieces.put_nowait, e)

        future = loop.run_in_executor(executor, run)
        try:
            yield chunk(cid, created, {"role": "assistant", "content": ""}, None)
            while True:
                piece = await pieces.get()
                if isinstance(piece, str):
                    yield chunk(cid, created, {"content": piece}, None)
                elif isinstance(piece, Exception):
                    yield f"data: {json.dumps({'error': f'generation failed: {type(piece).__name__}: {piece}'})}\n\n"
                    break
                else:
                    yield chunk(cid, created, {}, piece.finish_reason)
                    break
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # a client that went away stops the generation
            with contextlib.suppress(BaseException):
                await future
            state["waiting"] -= 1
            state["answered"] += 1

    async def chat_completions(request: Request):
        try:
            args = parse_chat_request(parse_json_object(await read_body(request, settings)), settings)
            stream = args.pop("stream")
            try:
                engine.check_length(len(engine.prompt_ids(args["messages"])), args["max_new_tokens"])
            except ConfigError as e:
                raise RequestError(400, str(e)) from None
        except RequestError as e:
            return error_response(e.status, e.message, e.headers)
        if state["waiting"] >= settings.max_queue:
            return error_response(503, f"the server is busy: {state['waiting']} requests are waiting (--max-queue "
                                       f"{settings.max_queue}); retry later", {"Retry-After": "1"})  # fmt: skip
        state["waiting"] += 1
        cid, created = completion_id(), int(time.time())
        if stream:
            return StreamingResponse(stream_answer(args, cid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        try:
            reply = await asyncio.get_running_loop().run_in_executor(executor, lambda: engine.generate(**args))
        except Exception as e:  # noqa: BLE001 - reported to the client; the server keeps running
            return error_response(500, f"generation failed: {type(e).__name__}: {e}")
        finally:
            state["waiting"] -= 1
        state["answered"] += 1
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "finish_reason": reply.finish_reason}],
            "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                      "total_tokens": reply.prompt_tokens + reply.completion_tokens},
        })  # fmt: skip

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                                         "owned_by": "discoalign"}]})  # fmt: skip

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "kind": "policy", "model": model_id, "waiting": state["waiting"],
                             "answered": state["answered"]})  # fmt: skip

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    return build_starlette(routes, settings)
