"""`discoalign serve`: a real uvicorn server on 127.0.0.1 (port chosen by the OS), called over HTTP with urllib.

Scores equal `discoalign score` (`eval.score.score_file`); 200 concurrent requests all come back right; the queue
bound answers 503; malformed bodies 400; oversize 413. Every call has a timeout and the server is stopped in the
fixture's finaliser, so a failure cannot hang the suite.
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("starlette", reason="`discoalign serve` needs the `serve` extra (starlette, uvicorn)")
pytest.importorskip("uvicorn", reason="`discoalign serve` needs the `serve` extra (starlette, uvicorn)")

from helpers import TIMEOUT, Server, call  # noqa: E402

from discoalign.config.schema import DataArguments, FinetuningArguments, ModelArguments  # noqa: E402
from discoalign.serve import RewardScorer, ServeSettings, build_app  # noqa: E402


@pytest.fixture(scope="module")
def disco_rm(tmp_path_factory):
    """A Disco reward model on builtin:tiny-qwen3 with random (non-zero) heads, saved as a checkpoint."""
    from discoalign.models.checkpoint import save_checkpoint
    from discoalign.models.loader import load_model_with_heads

    out = str(tmp_path_factory.mktemp("serve") / "rm")
    model, tokenizer = load_model_with_heads(ModelArguments(model_name_or_path="builtin:tiny-qwen3"),
                                             FinetuningArguments(add_disco_head=True, head_init_std=0.5),
                                             add_value_head=True)  # fmt: skip
    with torch.no_grad():
        model.variance_head.summary.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    save_checkpoint(model, out, tokenizer=tokenizer)
    return out


@pytest.fixture(scope="module")
def offline(disco_rm, tmp_path_factory):
    """Query texts of a small pairwise file and their `discoalign score` results, in the same order."""
    from discoalign.data import get_dataset
    from discoalign.eval.score import score_file
    from discoalign.models.loader import load_tokenizer

    root = tmp_path_factory.mktemp("serve_data")
    rows = [{"prompt": f"Question {i}: which colour is {'nice' if i % 2 else 'calm'}?",
             "chosen": "Blue, bright and clear." * (1 + i % 3), "rejected": f"Grey {i}."} for i in range(12)]  # fmt: skip
    data = root / "pairs.json"
    data.write_text(json.dumps(rows))
    score_file(disco_rm, str(data), str(root / "scores.jsonl"))
    scores = [json.loads(line) for line in open(root / "scores.jsonl")]
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=disco_rm))
    encoded = get_dataset(DataArguments(dataset=str(data)), tokenizer, stage="rm").train
    texts, ids = [], []
    for line in scores:
        row = encoded[line["index"]]
        sequence = row["prompt_input_ids"] + row[f"{line['response']}_input_ids"]
        texts.append(tokenizer.decode(sequence, skip_special_tokens=False))
        ids.append(sequence)
    return texts, ids, scores


@pytest.fixture(scope="module")
def server(disco_rm):
    scorer = RewardScorer(disco_rm)
    srv = Server(build_app(scorer, ServeSettings(cutoff_len=256, max_batch_tokens=2048, max_queue=1024,
                                                 max_request_bytes=64 * 1024)))  # fmt: skip
    srv.scorer = scorer
    yield srv
    srv.stop()


def test_health(server, disco_rm):
    status, body = call(server.url + "/health", method="GET")
    assert status == 200 and body["status"] == "ok" and body["disco"] is True and body["model"] == disco_rm


def test_scores_equal_discoalign_score(server, offline):
    texts, ids, scores = offline
    assert server.scorer.tokenize(texts) == ids  # the server sees exactly the tokens `score` scored
    head = "<|im_start|>assistant\n"  # each text is a ChatML prompt, then the response
    prompts = [text[: text.index(head) + len(head)] for text in texts]
    status, body = call(server.url + "/get_reward", {"query": texts, "prompts": prompts})
    assert status == 200
    assert set(body) == {"rewards", "scores", "mean", "variance", "aleatoric_variance", "extra_logs"}
    assert body["aleatoric_variance"] == body["variance"]  # a Disco model without an epistemic term
    assert body["extra_logs"] == {"mean": body["mean"], "variance": body["variance"]}
    assert body["rewards"] == body["scores"] == body["mean"]
    for got_mean, got_var, line in zip(body["mean"], body["variance"], scores):
        assert got_mean == pytest.approx(line["mean"], abs=1e-5)
        assert got_var == pytest.approx(line["variance"], abs=1e-5)
    assert len(set(round(m, 4) for m in body["mean"])) > 5  # the scores differ across texts


def test_200_concurrent_requests(server, offline):
    texts, _, scores = offline
    batches_before = call(server.url + "/health", method="GET")[1]["batches"]

    def one(i: int):
        picks = [(i + k) % len(texts) for k in range(1 + i % 3)]
        status, body = call(server.url + "/get_reward", {"query": [texts[j] for j in picks]})
        return picks, status, body

    with ThreadPoolExecutor(max_workers=40) as pool:
        results = list(pool.map(one, range(200)))
    assert [status for _, status, _ in results] == [200] * 200  # none lost, none refused
    for picks, _, body in results:
        assert len(body["mean"]) == len(picks)
        for j, mean, variance in zip(picks, body["mean"], body["variance"]):
            assert mean == pytest.approx(scores[j]["mean"], abs=1e-5)
            assert variance == pytest.approx(scores[j]["variance"], abs=1e-5)
    batches = call(server.url + "/health", method="GET")[1]["batches"] - batches_before
    assert batches < 200  # concurrent requests were batched together


@pytest.mark.parametrize(
    "raw, status, message",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'{"prompts": ["a"]}', 400, "has no `query`"),
        (b'{"query": 5}', 400, "`query` must be a list of strings"),
        (b'{"query": ["ok", 3]}', 400, "`query[1]` must be a string"),
        (b'{"query": ["a", "b"], "prompts": ["x"]}', 400, "`prompts` has 1 items"),
        (b'{"query": [""]}', 400, "`query[0]` is empty"),
        # Issue 24: each was accepted (a bare string, an empty list, prompts that do not start their query) or
        # answered 500 (a lone surrogate, JSON nested 30k deep).
        (b'{"query": "just a string"}', 400, "`query` must be a list of strings"),
        (b'{"query": []}', 400, "`query` is empty"),
        (b'{"query": ["Q: hi A: yo"], "prompts": ["Q: bye"]}', 400, "`prompts[0]` is not the start of `query[0]`"),
        (b'{"query": ["a \\ud800 b"]}', 400, "`query[0]` holds a lone surrogate (U+D800"),
        (b'{"query": ["ok"], "prompts": ["\\udc00"]}', 400, "`prompts[0]` holds a lone surrogate"),
        (b"[" * 30000 + b"]" * 30000, 400, "nests JSON arrays or objects too deeply"),
        (json.dumps({"query": ["a"] * 1025}).encode(), 413, "--max-request-items"),
        (json.dumps({"query": ["word " * 400]}).encode(), 413, "--cutoff-len 256"),
        (json.dumps({"query": ["x" * 70000]}).encode(), 413, "--max-request-bytes"),
    ],
)
def test_malformed_requests(server, raw, status, message):
    got, body = call(server.url + "/get_reward", raw=raw)
    assert got == status and message in body["error"], body


def test_wrong_path_and_method_are_json(server):
    assert call(server.url + "/nope", {"query": ["a"]})[0] == 404
    status, body = call(server.url + "/get_reward", method="GET")
    assert status == 405 and "error" in body
    status, body = call(server.url + "/get_reward", {"query": []})
    assert status == 400 and "`query` is empty" in body["error"]


class SlowScorer:
    """A stand-in model whose forward waits until released, so the queue fills deterministically."""

    disco = False
    model_dir = "slow"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = []

    def tokenize(self, texts):
        return [[1] * len(t) for t in texts]

    def score_ids(self, sequences):
        self.calls.append([len(s) for s in sequences])
        self.release.wait(timeout=TIMEOUT)
        return [{"mean": float(len(s)), "reward": float(len(s))} for s in sequences]


def test_full_queue_answers_503_and_batches_respect_the_token_budget():
    scorer = SlowScorer()
    srv = Server(build_app(scorer, ServeSettings(cutoff_len=10, max_batch_tokens=20, max_queue=5)))
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            first = pool.submit(call, srv.url + "/get_reward", {"query": ["aaaa", "bbbbbbbbbb", "cc", "d"]})
            deadline = time.monotonic() + TIMEOUT
            while not scorer.calls and time.monotonic() < deadline:
                time.sleep(0.01)
            status, body = call(srv.url + "/get_reward", {"query": ["x", "y"]})  # 4 + 2 > 5 waiting
            assert status == 503 and "busy" in body["error"]
            assert call(srv.url + "/get_reward", {"query": list("abcdef")})[0] == 413  # can never fit
            scorer.release.set()
            status, body = first.result(timeout=TIMEOUT)
        assert status == 200 and body["rewards"] == [4.0, 10.0, 2.0, 1.0] and "variance" not in body
        # width x items <= 20: [4, 10] is 2 x 10, then [2, 1]
        assert scorer.calls == [[4, 10], [2, 1]]
        assert call(srv.url + "/get_reward", {"query": ["x", "y"]})[0] == 200  # room again
    finally:
        scorer.release.set()
        srv.stop()


def test_serve_cli_errors(tmp_path, tiny_dirs, disco_rm):
    from discoalign.cli.main import main

    if not torch.cuda.is_available():
        assert main(["serve", "--model", disco_rm, "--device", "cuda"]) == 2

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert main(["serve", "--model", tiny_dirs["qwen3"], "--kind", "reward"]) == 2  # a causal LM, no value head
    assert main(["serve", "--model", tiny_dirs["qwen3"], "--max-batch-tokens", "10", "--cutoff-len", "100"]) == 2


@pytest.mark.slow
def test_discoalign_serve_command(disco_rm, offline):
    """The real command in a subprocess: `--port 0` binds a free port of 127.0.0.1 and prints it."""
    import os
    import re
    import subprocess
    import sys

    texts, _, scores = offline
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    process = subprocess.Popen([sys.executable, "-m", "discoalign", "serve", "--model", disco_rm, "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        url = None
        while url is None and time.monotonic() < deadline and process.poll() is None:
            found = [re.search(r"(http://127\.0\.0\.1:\d+)/get_reward", line) for line in list(lines)]
            url = next((m.group(1) for m in found if m), None)
            time.sleep(0.1)
        assert url, "".join(lines)[-2000:]
        while time.monotonic() < deadline:  # the line is printed just before uvicorn starts listening
            try:
                status, health = call(url + "/health", method="GET")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        assert status == 200 and health["disco"] is True
        status, body = call(url + "/get_reward", {"query": texts[:3]})
        assert status == 200
        assert body["mean"] == pytest.approx([s["mean"] for s in scores[:3]], abs=1e-5)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def test_text_ending_on_the_stop_token_is_scored_where_training_read_it(server, offline):
    """A policy's generation stops at EOS (`<|im_end|>`); training read the reward after the template's turn end
    (`\\n`). The server appends it, so the text without its last token scores as the full training text."""
    texts, ids, scores = offline
    tokenizer = server.scorer.tokenizer
    assert server.scorer.turn_suffix and ids[0][-len(server.scorer.turn_suffix) - 1] == tokenizer.eos_token_id
    cut = [tokenizer.decode(seq[: -len(server.scorer.turn_suffix)], skip_special_tokens=False) for seq in ids[:4]]
    assert server.scorer.tokenize(cut) == ids[:4]
    status, body = call(server.url + "/get_reward", {"query": cut})
    assert status == 200
    for got, line in zip(body["mean"], scores[:4]):
        assert got == pytest.approx(line["mean"], abs=1e-5)


def test_epistemic_part_is_served_from_the_response_tokens(tmp_path):
    """A reward model with `epistemic: token_novelty`: with `prompts` in the body, each item gets its epistemic
    variance (the response's unseen tokens), equal to `discoalign score` on the same prompt + response rows; the
    reward subtracts the total sigma."""
    import yaml

    from discoalign.cli.main import main
    from discoalign.eval.score import encode_prompt_response

    config = tmp_path / "rm.yaml"
    config.write_text(yaml.safe_dump({
        "stage": "rm", "model_name_or_path": "builtin:tiny-qwen2", "dataset": "builtin:synthetic",
        "synthetic_num_pairs": 32, "cutoff_len": 48, "per_device_train_batch_size": 8, "max_steps": 2,
        "save_strategy": "no", "plot_loss": False, "epistemic": "token_novelty", "output_dir": str(tmp_path / "rm"),
    }))  # fmt: skip
    assert main(["train", str(config)]) == 0
    rows = [{"prompt": "Topic: food. Describe a cake.", "response": r} for r in ("calm", "zqxj vwpk calm")]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert (
        main(["score", "--model", str(tmp_path / "rm"), "--data", str(data), "--out", str(tmp_path / "s.jsonl")]) == 0
    )
    offline = [json.loads(x) for x in open(tmp_path / "s.jsonl")]

    scorer = RewardScorer(str(tmp_path / "rm"), disco_risk_coef=1.0)
    assert scorer.epistemic is not None and not scorer.disco
    prompts, queries = [], []
    for row in rows:
        prompt_ids, response_ids = encode_prompt_response(
            scorer.tokenizer, [{"role": "user", "content": row["prompt"]}],
            [{"role": "assistant", "content": row["response"]}], 48,
        )  # fmt: skip
        prompts.append(scorer.tokenizer.decode(prompt_ids, skip_special_tokens=False))
        queries.append(scorer.tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=False))
    srv = Server(build_app(scorer, ServeSettings(cutoff_len=256, max_batch_tokens=2048, max_queue=64,
                                                 max_request_bytes=64 * 1024)))  # fmt: skip
    try:
        status, body = call(srv.url + "/get_reward", {"query": queries, "prompts": prompts})
        _, without_prompts = call(srv.url + "/get_reward", {"query": queries})
    finally:
        srv.stop()
    assert status == 200 and "aleatoric_variance" not in body
    assert body["epistemic_variance"][0] < body["epistemic_variance"][1]  # unseen pieces in the second
    for got_mean, got_epi, reward, line in zip(body["mean"], body["epistemic_variance"], body["rewards"], offline):
        assert got_mean == pytest.approx(line["mean"], abs=1e-5)
        assert got_epi == pytest.approx(line["epistemic_variance"], abs=1e-6)
        assert reward == pytest.approx(got_mean - math.sqrt(got_epi), abs=1e-5)
    assert "epistemic_variance" not in without_prompts  # without prompts the response span is unknown
