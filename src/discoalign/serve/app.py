"""The ASGI app (Starlette, served by uvicorn): OpenRLHF's `POST /get_reward`, `GET /health`, request batching.

`POST /get_reward` takes OpenRLHF's remote reward-model body and answers with its keys plus ours::

    {"query": ["<full text: prompt + response>", ...], "prompts": ["<prompt>", ...]}     # prompts optional
 -> {"rewards": [...], "scores": [...], "mean": [...], "variance": [...],              # variance: Disco only
     "extra_logs": {"mean": [...], "variance": [...]}}

`rewards` and `scores` are the same list (OpenRLHF reads either): the mean, or `mean - disco_risk_coef *
sqrt(variance)` when the server runs with `--disco-risk-coef`. Items of all requests wait in one queue; a worker
takes them in arrival order into batches of at most `max_batch_tokens` (items x longest item) and scores each batch
in one forward on a single thread. When more than `max_queue` items wait, new requests get 503 (retry later).
Errors are JSON `{"error": "..."}`: 400 for a malformed body (not a JSON object, `query` not a non-empty list of
strings, a lone surrogate, a prompt that does not start its query), 401 without the API key when the server has
one, 408 for a body that does not arrive within `body_timeout`, 413 for a body over `max_request_bytes`, more than
`max_request_items` queries or a query over `cutoff_len` tokens, 404 / 405 for a wrong path or method. Every limit
is a field of `serve.settings.ServeSettings`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from .http import RequestError, build_starlette, check_text, error_response, parse_json_object, read_body
from .settings import ServeSettings

logger = logging.getLogger(__name__)


class Scorer(Protocol):
    """What the app needs of a reward model (`scorer.RewardScorer`)."""

    disco: bool
    model_dir: str

    def tokenize(self, texts: list[str], prompts: list[str] | None = None) -> list[list[int]]: ...

    def score_ids(self, sequences: list[list[int]]) -> list[dict[str, float]]: ...


class QueueFull(Exception):
    pass


class Batcher:
    """Collects items of concurrent requests and scores them in token-budgeted batches on one worker thread."""

    def __init__(self, scorer: Scorer, settings: ServeSettings) -> None:
        self.scorer = scorer
        self.settings = settings
        self.pending: collections.deque[tuple[list[int], asyncio.Future]] = collections.deque()
        self.in_queue = 0  # items accepted and not yet answered (waiting or being scored)
        self.batches = 0  # forwards run so far (for /health and tests)
        self._wakeup: asyncio.Event | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="discoalign-score")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, sequences: list[list[int]]) -> list[dict[str, float]]:
        """Queue the items of one request and wait for their scores; QueueFull when they do not fit."""
        if self.in_queue + len(sequences) > self.settings.max_queue:
            raise QueueFull
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in sequences]
        self.pending.extend(zip(sequences, futures))
        self.in_queue += len(sequences)
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*futures))
        finally:
            self.in_queue -= len(sequences)

    def _next_batch(self) -> list[tuple[list[int], asyncio.Future]]:
        """Items in arrival order while (items x longest item) stays within the token budget (at least one)."""
        batch: list[tuple[list[int], asyncio.Future]] = []
        longest = 0
        while self.pending:
            ids, future = self.pending[0]
            if future.done():  # its request was cancelled (client gone)
                self.pending.popleft()
                continue
            width = max(longest, len(ids))
            if batch and width * (len(batch) + 1) > self.settings.max_batch_tokens:
                break
            batch.append(self.pending.popleft())
            longest = width
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self.pending:
                batch = self._next_batch()
                if not batch:
                    continue
                try:
                    sequences = [ids for ids, _ in batch]
                    results = await loop.run_in_executor(self._executor, self.scorer.score_ids, sequences)
                except Exception as e:  # a model error answers the batch's requests with 500, the server goes on
                    logger.exception("Scoring a batch of %d items failed", len(batch))
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                    continue
                self.batches += 1
                for (_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)


def _string_list(body: dict[str, Any], key: str, required: bool) -> list[str] | None:
    value = body.get(key)
    if value is None:
        if required:
            raise RequestError(400, f"the body has no `{key}`: expected {{\"query\": [\"<prompt + response text>\", "
                                    "...], \"prompts\": [...]}")  # fmt: skip
        return None
    if not isinstance(value, list):
        raise RequestError(400, f"`{key}` must be a list of strings (one per item, as OpenRLHF sends it), not "
                                f"{type(value).__name__}")  # fmt: skip
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise RequestError(400, f"`{key}[{index}]` must be a string, not {type(item).__name__}")
        check_text(item, f"{key}[{index}]")
    return value


def parse_body(raw: bytes, settings: ServeSettings | None = None) -> tuple[list[str], list[str] | None]:
    """(queries, prompts) of a request body; RequestError(400 / 413) when malformed or too many."""
    settings = settings or ServeSettings()
    body = parse_json_object(raw)
    queries = _string_list(body, "query", required=True)
    prompts = _string_list(body, "prompts", required=False)
    if not queries:
        raise RequestError(400, "`query` is empty; send at least one text to score")
    limit, flag = ((settings.max_request_items, "--max-request-items") if settings.max_request_items <= settings.max_queue
                   else (settings.max_queue, "--max-queue"))  # fmt: skip
    if len(queries) > limit:
        raise RequestError(413, f"the request has {len(queries)} queries, more than the server takes at once "
                                f"({limit}, {flag}); split it")  # fmt: skip
    if prompts is not None and len(prompts) != len(queries):
        raise RequestError(400, f"`prompts` has {len(prompts)} items but `query` has {len(queries)}; give one prompt "
                                "per query, or leave `prompts` out")  # fmt: skip
    for index, query in enumerate(queries):
        if not query:
            raise RequestError(400, f"`query[{index}]` is empty")
        if prompts is not None and not query.startswith(prompts[index]):
            raise RequestError(400, f"`prompts[{index}]` is not the start of `query[{index}]`: each query is the "
                                    "prompt followed by the response")  # fmt: skip
    return queries, prompts


def build_app(scorer: Scorer, settings: ServeSettings | None = None):
    """The Starlette app serving `scorer` with `settings`."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    settings = settings or ServeSettings()
    settings.check()
    batcher = Batcher(scorer, settings)

    async def get_reward(request: Request) -> JSONResponse:
        try:
            queries, prompts = parse_body(await read_body(request, settings), settings)
            sequences = scorer.tokenize(queries, prompts) if prompts else scorer.tokenize(queries)
            for index, ids in enumerate(sequences):
                if len(ids) > settings.cutoff_len:
                    raise RequestError(413, f"`query[{index}]` has {len(ids)} tokens, more than the server's "
                                            f"--cutoff-len {settings.cutoff_len}")  # fmt: skip
        except RequestError as e:
            return error_response(e.status, e.message, e.headers)
        try:
            results = await batcher.submit(sequences)
        except QueueFull:
            return error_response(503, f"the server is busy: {batcher.in_queue} items are waiting (--max-queue "
                                       f"{settings.max_queue}); retry later", {"Retry-After": "1"})  # fmt: skip
        except Exception as e:  # noqa: BLE001 - reported to the client; the server keeps running
            return error_response(500, f"scoring failed: {type(e).__name__}: {e}")
        rewards = [r["reward"] for r in results]
        payload: dict[str, Any] = {"rewards": rewards, "scores": rewards, "mean": [r["mean"] for r in results]}
        # Per item, the total variance and its parts, when the model has them (an epistemic part needs `prompts`).
        for key in ("variance", "aleatoric_variance", "epistemic_variance"):
            if (scorer.disco and key != "epistemic_variance") or any(key in r for r in results):
                payload[key] = [r.get(key) for r in results]
        # OpenRLHF logs the per-item lists of `extra_logs` as training metrics (its serve_rm example returns the key).
        payload["extra_logs"] = {k: payload[k] for k in ("mean", "variance") if k in payload}
        return JSONResponse(payload)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "kind": "reward", "model": scorer.model_dir, "disco": scorer.disco,
                             "queued": batcher.in_queue, "batches": batcher.batches})  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    routes = [Route("/get_reward", get_reward, methods=["POST"]), Route("/health", health, methods=["GET"])]
    app = build_starlette(routes, settings, lifespan)
    app.state.batcher = batcher
    return app
