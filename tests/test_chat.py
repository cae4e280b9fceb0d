"""Issue 24: talk to a trained policy. `discoalign chat` (interactive, chat template, streamed) and `serve`'s
OpenAI-compatible `/v1/chat/completions` for a policy checkpoint, called with a real HTTP client (http.client,
reading the server-sent events line by line as OpenAI's clients do) on 127.0.0.1.

Answers are greedy (temperature 0) so they can be checked token for token against `generate` on the same prompt.
"""

from __future__ import annotations

import http.client
import io
import json

import pytest
import torch

pytest.importorskip("starlette", reason="`discoalign serve` needs the `serve` extra (starlette, uvicorn)")

from helpers import TIMEOUT, Server, call  # noqa: E402

from discoalign.serve import ChatEngine, ServeSettings, build_chat_app  # noqa: E402

KEY = "chat-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe a calm river."}]


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    return ChatEngine(tiny_dirs["qwen3"])


def greedy(engine: ChatEngine, messages, max_new_tokens: int) -> tuple[str, list[int]]:
    """The greedy answer by a plain `generate` on the chat template's prompt (the reference)."""
    prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]  # fmt: skip
    out = engine.causal_lm.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=engine.stops, pad_token_id=engine.tokenizer.pad_token_id)  # fmt: skip
    answer = out[0, len(prompt) :].tolist()
    cut = next((i for i, t in enumerate(answer) if t in engine.stops), len(answer))
    return engine.tokenizer.decode(answer[:cut], skip_special_tokens=True), prompt


def test_engine_streams_the_greedy_answer(engine):
    pieces: list[str] = []
    reply = engine.generate(MESSAGES, max_new_tokens=12, temperature=0, top_p=1.0, on_text=pieces.append)
    text, prompt = greedy(engine, MESSAGES, 12)
    assert reply.text == text == "".join(pieces) and len(pieces) > 1  # streamed in pieces
    assert reply.prompt_tokens == len(prompt) and engine.prompt_ids(MESSAGES) == prompt  # the chat template
    assert reply.finish_reason == ("length" if reply.completion_tokens == 12 else "stop")


@pytest.fixture(scope="module")
def chat_server(engine):
    srv = Server(build_chat_app(engine, ServeSettings(cutoff_len=512, max_new_tokens=64, api_key=KEY),
                                model_id="tiny-policy"), header_timeout=5)  # fmt: skip
    yield srv
    srv.stop()


def test_chat_completions_like_openai(chat_server, engine):
    body = {"model": "tiny-policy", "messages": MESSAGES, "max_tokens": 10, "temperature": 0}
    status, answer = call(chat_server.url + "/v1/chat/completions", body, headers=AUTH)
    assert status == 200, answer
    text, prompt = greedy(engine, MESSAGES, 10)
    assert answer["object"] == "chat.completion" and answer["model"] == "tiny-policy"
    assert answer["id"].startswith("chatcmpl-")
    choice = answer["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": text}
    assert choice["finish_reason"] in ("stop", "length")
    usage = answer["usage"]
    assert usage["prompt_tokens"] == len(prompt) and usage["total_tokens"] == len(prompt) + usage["completion_tokens"]
    status, models = call(chat_server.url + "/v1/models", method="GET", headers=AUTH)
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny-policy"]


def test_streamed_chat_completion_over_sse(chat_server, engine):
    """`stream: true`: server-sent events, read line by line from the socket: a role chunk, content chunks that
    join to the greedy answer, a finish chunk, then `data: [DONE]`."""
    conn = http.client.HTTPConnection("127.0.0.1", chat_server.port, timeout=TIMEOUT)
    try:
        body = json.dumps({"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stream": True})
        conn.request("POST", "/v1/chat/completions", body=body, headers={**AUTH, "Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
        events = []
        for raw in response:  # one line at a time, as it arrives
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
            if line == "data: [DONE]":
                break
    finally:
        conn.close()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1]]
    assert "".join(content) == greedy(engine, MESSAGES, 12)[0] and len(content) > 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"messages": []}, 400, "`messages` must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "`role` is one of"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400,
         "must be the user's"),
        ({"messages": [{"role": "user", "content": "a \ud800"}]}, 400, "lone surrogate"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "--max-new-tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "`temperature`"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "one choice"),
        ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, "beyond the model's 512 positions"),
    ],
)  # fmt: skip
def test_chat_request_errors(chat_server, body, status, message):
    got, answer = call(chat_server.url + "/v1/chat/completions", body, headers=AUTH)
    assert got == status and message in answer["error"], answer


def test_chat_server_needs_the_key(chat_server):
    status, answer = call(chat_server.url + "/v1/chat/completions", {"messages": MESSAGES})
    assert status == 401 and "Bearer" in answer["error"]


def test_chat_command_streams_and_keeps_the_conversation(engine, tiny_dirs, monkeypatch, capsys):
    from discoalign.cli.main import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Describe a calm river.\n/clear\nDescribe a calm river.\n/exit\n"))
    assert main(["chat", "--model", tiny_dirs["qwen3"], "--temperature", "0", "--max-new-tokens", "8",
                 "--system", "Be brief."]) == 0  # fmt: skip
    out = capsys.readouterr().out
    text, _ = greedy(engine, MESSAGES, 8)
    assert out.count(f"assistant> {text}") == 2  # the same answer after /clear: the history was forgotten
    assert "(conversation cleared)" in out


def test_serve_picks_the_api_from_the_checkpoint(tmp_path, tiny_dirs):
    """A reward model gets /get_reward; a policy (no value head, or a PPO critic) gets /v1/chat/completions."""
    from discoalign.config.schema import FinetuningArguments, ModelArguments
    from discoalign.models.checkpoint import save_checkpoint
    from discoalign.models.loader import load_model_with_heads
    from discoalign.serve.server import model_kind

    assert model_kind(tiny_dirs["qwen3"]) == "policy"
    model, tok = load_model_with_heads(ModelArguments(model_name_or_path=tiny_dirs["qwen3"]), FinetuningArguments(),
                                       add_value_head=True, is_trainable=False)  # fmt: skip
    for kind, expected in (("reward", "reward"), ("critic", "policy")):
        model.heads_config["value_head_kind"] = kind
        assert model_kind(save_checkpoint(model, str(tmp_path / kind), tokenizer=tok)) == expected
