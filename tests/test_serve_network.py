"""Issue 24: a reward server fit for a network. With an API key every request needs `Authorization: Bearer <key>`
(401 otherwise, the key compared in constant time); a client slow with its headers is disconnected and one slow
with its body gets 408; a bounded loopback load test runs with the key on.

Loopback only (127.0.0.1, a port chosen by the OS); every loop is bounded in count and every call in time.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("starlette", reason="`discoalign serve` needs the `serve` extra (starlette, uvicorn)")
pytest.importorskip("uvicorn", reason="`discoalign serve` needs the `serve` extra (starlette, uvicorn)")

from helpers import TIMEOUT, Server, call  # noqa: E402

from discoalign.config.schema import FinetuningArguments, ModelArguments  # noqa: E402
from discoalign.serve import RewardScorer, ServeSettings, build_app  # noqa: E402

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEADER_TIMEOUT = BODY_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """A Disco tiny reward model served with an API key and half-second header / body timeouts."""
    from discoalign.models.checkpoint import save_checkpoint
    from discoalign.models.loader import load_model_with_heads

    out = str(tmp_path_factory.mktemp("serve-key") / "rm")
    model, tok = load_model_with_heads(ModelArguments(model_name_or_path="builtin:tiny-qwen3"),
                                       FinetuningArguments(add_disco_head=True, head_init_std=0.5),
                                       add_value_head=True)  # fmt: skip
    save_checkpoint(model, out, tokenizer=tok)
    scorer = RewardScorer(out)
    settings = ServeSettings(cutoff_len=256, max_batch_tokens=4096, max_queue=1024, max_request_bytes=64 * 1024,
                             header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT, api_key=KEY)  # fmt: skip
    srv = Server(build_app(scorer, settings), header_timeout=HEADER_TIMEOUT)
    srv.scorer = scorer
    yield srv
    srv.stop()


TEXTS = [f"<|im_start|>user\nQuestion {i}?<|im_end|>\n<|im_start|>assistant\nAnswer {'yes ' * (i % 4)}{i}."
         for i in range(12)]  # fmt: skip


def test_api_key_is_required_on_every_route(keyed_server):
    url = keyed_server.url
    for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789ab"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}):  # fmt: skip
        status, body = call(url + "/get_reward", {"query": TEXTS[:1]}, headers=headers)
        assert status == 401 and "Authorization: Bearer <key>" in body["error"] and KEY not in body["error"]
        assert call(url + "/health", method="GET", headers=headers)[0] == 401
        assert call(url + "/nope", method="GET", headers=headers)[0] == 401  # not even the route map leaks
    status, body = call(url + "/get_reward", {"query": TEXTS[:2]}, headers=AUTH)
    assert status == 200 and len(body["rewards"]) == 2
    assert call(url + "/health", method="GET", headers=AUTH)[0] == 200


def test_load_with_the_key_on(keyed_server):
    """200 concurrent requests with the key (1-3 queries each) all come back with the scores of a direct forward;
    40 without it all get 401; batching kept the forwards well under one per request."""
    url, scorer = keyed_server.url, keyed_server.scorer
    expected = [r["mean"] for r in scorer.score_ids(scorer.tokenize(TEXTS))]
    batches_before = call(url + "/health", method="GET", headers=AUTH)[1]["batches"]

    def one(i: int):
        picks = [(i + k) % len(TEXTS) for k in range(1 + i % 3)]
        headers = AUTH if i < 200 else ({} if i % 2 else {"Authorization": "Bearer not-the-key-at-all-xx"})
        status, body = call(url + "/get_reward", {"query": [TEXTS[j] for j in picks]}, headers=headers)
        return i, picks, status, body

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, range(240), timeout=4 * TIMEOUT))
    assert time.monotonic() - started < 4 * TIMEOUT
    for i, picks, status, body in results:
        if i >= 200:
            assert status == 401
            continue
        assert status == 200, body
        assert body["mean"] == pytest.approx([expected[j] for j in picks], abs=1e-5)
    batches = call(url + "/health", method="GET", headers=AUTH)[1]["batches"] - batches_before
    assert batches < 200


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_a_client_slow_with_its_headers_is_disconnected(keyed_server):
    """Half a request head, then silence: the server closes the connection after the header timeout (before, it
    waited forever); a connection that sends nothing at all is closed too."""
    for head in (b"POST /get_reward HTTP/1.1\r\nHost: 127.0.0.1\r\n", b""):
        sock = _connect(keyed_server.port)
        try:
            started = time.monotonic()
            sock.sendall(head)
            assert _read_all(sock) == b""  # closed without an answer
            waited = time.monotonic() - started
        finally:
            sock.close()
        assert HEADER_TIMEOUT * 0.8 <= waited < HEADER_TIMEOUT + 5


def test_a_client_slow_with_its_body_gets_408(keyed_server):
    sock = _connect(keyed_server.port)
    try:
        sock.sendall(b"POST /get_reward HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n".encode() + b'{"query": [')  # fmt: skip
        started = time.monotonic()
        answer = _read_all(sock)
        waited = time.monotonic() - started
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer
    assert BODY_TIMEOUT * 0.8 <= waited < BODY_TIMEOUT + 5


def test_a_key_must_be_long_enough_and_comes_from_the_environment(monkeypatch):
    import argparse

    from discoalign.cli.main import build_parser
    from discoalign.errors import ConfigError
    from discoalign.serve.settings import API_KEY_ENV, settings_from_flags

    parser = build_parser()
    ns = parser.parse_args(["serve", "--model", "m"])
    assert settings_from_flags(ns).api_key is None
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert settings_from_flags(ns).api_key == KEY
    assert settings_from_flags(argparse.Namespace(**{**vars(ns), "api_key": KEY + "x"})).api_key == KEY + "x"
    with pytest.raises(ConfigError, match="use at least 16"):
        settings_from_flags(argparse.Namespace(**{**vars(ns), "api_key": "short"}))
