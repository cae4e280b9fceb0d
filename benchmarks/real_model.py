"""The real-model runs of docs/real_model.md: each `discoalign` command on SmolLM2-135M-Instruct, its wall time and
peak resident memory (RSS of the process, from wait4), and what came out.

One run per call, on a core of its own, e.g.

    OMP_NUM_THREADS=1 python benchmarks/real_model.py rm_disco

Runs: sft, rm_bt, rm_disco, dpo_plain, dpo_disco, dpo_dynamic_beta, dpo_both, ppo, bon, serve, export (bon, serve,
export and ppo use saves/real/rm_disco). Each result is merged into benchmarks/results/real_model.json under its
name, with the exact commands. `--model` defaults to the pulled folder (`discoalign pull smollm2-135m-instruct`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "real_model.json")
DEFAULT_MODEL = os.path.expanduser("~/.cache/discoalign/models/smollm2-135m-instruct")
SAVES = "saves/real"
DPO_CELLS = {
    "dpo_plain": [],
    "dpo_disco": ["add_disco_head=true", "disco_pref=true"],
    "dpo_dynamic_beta": ["add_beta_head=true", "use_dynamic_beta=true"],
    "dpo_both": ["add_disco_head=true", "disco_pref=true", "add_beta_head=true", "use_dynamic_beta=true"],
}
PROMPTS = ["What is the capital of France?", "Give me one tip for sleeping better.", "Write a haiku about rain."]


def discoalign(*args: str) -> list[str]:
    return [sys.executable, "-m", "discoalign", *args]


def timed(cmd: list[str]) -> dict:
    """Run `cmd` to completion; its wall time (s), peak RSS (MiB) and exit code. Output goes to our stderr."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sys.stderr)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return {"command": " ".join(cmd[2:]), "wall_s": round(time.perf_counter()
            - start, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024)}  # fmt: skip


def wilson(correct: float, n: int, z: float = 1.96) -> list[float]:
    """The Wilson score interval of a proportion (95 % by default)."""
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 3), round(centre + half, 3)]


def read_json(path: str) -> dict:
    with open(os.path.join(ROOT, path)) as f:
        return json.load(f)


def history(out: str) -> list[dict]:
    return read_json(os.path.join(out, "trainer_state.json"))["log_history"]


def run_sft(model: str) -> dict:
    out = f"{SAVES}/sft_lora"
    result = timed(
        discoalign("train", "examples/real/sft_lora.yaml", f"model_name_or_path={model}", f"output_dir={out}")
    )
    evals = [h["eval_loss"] for h in history(out) if "eval_loss" in h]
    train = [h["loss"] for h in history(out) if "loss" in h]
    return {**result, "eval_loss_before": evals[0], "eval_loss_after": evals[-1], "train_loss": train}


def run_rm(model: str, kind: str) -> dict:
    out = f"{SAVES}/rm_{kind}"
    result = timed(discoalign("train", f"examples/real/rm_{kind}.yaml", f"model_name_or_path={model}",
                              f"output_dir={out}", "do_eval=true"))  # fmt: skip
    metrics = read_json(os.path.join(out, "eval_results.json"))
    n = sum(1 for _ in open(os.path.join(ROOT, out, "predictions.jsonl")))
    accuracy = metrics["eval_accuracy"]
    return {**result, "held_out_pairs": n, "eval_accuracy": accuracy, "accuracy_ci95_wilson": wilson(accuracy * n, n),
            "eval_loss": metrics["eval_loss"], "train_loss": [h["loss"] for h in history(out) if "loss" in h]}  # fmt: skip


def run_dpo(model: str, cell: str) -> dict:
    out = f"{SAVES}/{cell}"
    result = timed(discoalign("train", "examples/real/dpo.yaml", f"model_name_or_path={model}", f"output_dir={out}",
                              "do_eval=true", *DPO_CELLS[cell]))  # fmt: skip
    return {**result, **dpo_summary(out)}


def dpo_summary(out: str, held_out: int = 60) -> dict:
    """A DPO cell's held-out metrics: TRL's batch-mean reward accuracy and margins, and the exact accuracy over the
    `held_out` pairs (`eval_implicit_accuracy`, d > 0; no pair is tied after training) with its Wilson interval."""
    metrics = read_json(os.path.join(out, "eval_results.json"))
    keep = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen",
            "eval_rewards/rejected", "eval_implicit_accuracy", "eval_beta_mean", "eval_variance_mean")  # fmt: skip
    summary = {k: metrics[k] for k in keep if k in metrics}
    summary["held_out_pairs"] = held_out
    summary["accuracy_ci95_wilson"] = wilson(metrics["eval_implicit_accuracy"] * held_out, held_out)
    summary["train_loss"] = [h["loss"] for h in history(out) if "loss" in h]
    return summary


def greedy(model: str, adapter: str | None = None) -> list[str]:
    """Greedy answers (48 new tokens) to PROMPTS from `model` (and a LoRA adapter on it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, adapter)
    answers = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
        with torch.no_grad():
            out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False)
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return answers


def run_ppo(model: str) -> dict:
    out = f"{SAVES}/ppo"
    result = timed(discoalign("train", "examples/real/ppo.yaml", f"model_name_or_path={model}", f"output_dir={out}",
                              f"reward_model={SAVES}/rm_disco"))  # fmt: skip
    steps = ppo_steps(out)
    return {**result, "steps": steps, "prompts": PROMPTS, "before": greedy(model),
            "after": greedy(model, os.path.join(ROOT, out))}  # fmt: skip


def ppo_steps(out: str) -> list[dict]:
    """Per PPO step: the RM's mean score of the sampled responses, the KL to the reference and the total reward."""
    keep = ("step", "objective/scores", "objective/kl", "objective/rlhf_reward", "reward/mean", "response/length")
    return [{k: h[k] for k in keep if k in h} for h in history(out) if "objective/kl" in h]


def run_bon(model: str) -> dict:
    prompts = os.path.join(ROOT, SAVES, "bon_prompts.jsonl")
    with open(prompts, "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in PROMPTS)
    out = f"{SAVES}/bon.jsonl"
    result = timed(discoalign("bon", "--model", f"{SAVES}/rm_disco", "--policy", model, "--prompts", prompts, "--n", "8",
                              "--max-new-tokens", "32", "--cutoff-len", "256", "--out", out))  # fmt: skip
    rows = [json.loads(line) for line in open(os.path.join(ROOT, out))]
    return {
        **result,
        "prompts": len(rows),
        "samples_per_prompt": 8,
        "best": [r["messages"][-1]["content"] for r in rows],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve(model: str, requests: int = 64, clients: int = 4) -> dict:
    """The real RM behind `discoalign serve`, `requests` one-query POSTs from `clients` threads on 127.0.0.1."""
    port = _free_port()
    cmd = discoalign("serve", "--model", f"{SAVES}/rm_disco", "--port", str(port), "--cutoff-len", "256")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sys.stderr, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.perf_counter() - start > 300:
                raise SystemExit("the server did not start") from None
            time.sleep(0.5)
    ready_s = time.perf_counter() - start
    query = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n"
    latencies: list[float] = []
    lock = threading.Lock()

    def client(count: int) -> None:
        for _ in range(count):
            body = json.dumps({"query": [query]}).encode()
            request = urllib.request.Request(url + "/get_reward", body, {"Content-Type": "application/json"})
            t0 = time.perf_counter()
            json.loads(urllib.request.urlopen(request, timeout=120).read())
            with lock:
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(requests // clients,)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    proc.terminate()
    _, _, usage = os.wait4(proc.pid, 0)
    latencies.sort()
    return {"command": " ".join(cmd[2:]), "ready_s": round(ready_s, 1), "requests": len(latencies), "clients": clients,
            "rps": round(len(latencies) / elapsed, 2), "p50_ms": round(1000 * latencies[len(latencies) // 2]),
            "p95_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))]),
            "peak_rss_mib": round(usage.ru_maxrss / 1024)}  # fmt: skip


def run_export(model: str) -> dict:
    """Each layout written by `discoalign export`, reloaded (seq_cls by plain transformers), scored like the source."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from discoalign.config.schema import FinetuningArguments, ModelArguments
    from discoalign.models.loader import load_model_with_heads

    def ours(path):
        m, tok = load_model_with_heads(ModelArguments(model_name_or_path=path), FinetuningArguments(add_disco_head=True),
                                       add_value_head=True, is_trainable=False)  # fmt: skip
        return m, tok

    source, tokenizer = ours(os.path.join(ROOT, SAVES, "rm_disco"))
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": a}],
                                           tokenize=False) for p, a in zip(PROMPTS, ("Paris.", "Sleep.", "Rain."))]  # fmt: skip
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        mean, _ = source.score(batch["input_ids"], batch["attention_mask"])
    results = {}
    for layout in ("ours", "seq_cls", "llamafactory"):
        out = f"{SAVES}/export_{layout}"
        results[layout] = timed(discoalign("export", "--model", f"{SAVES}/rm_disco", "--out", out, "--layout", layout))
        with torch.no_grad():
            if layout == "seq_cls":
                plain = AutoModelForSequenceClassification.from_pretrained(os.path.join(ROOT, out)).eval()
                bias = read_json(os.path.join(out, "config.json")).get("discoalign_value_head_bias", 0.0)
                scores = plain(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0] + bias
            else:
                scores = ours(os.path.join(ROOT, out))[0].score(batch["input_ids"], batch["attention_mask"])[0]
        results[layout]["max_abs_score_diff"] = float((scores - mean).abs().max())
    return {"layouts": results, "source_scores": [round(float(x), 4) for x in mean]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", choices=["sft", "rm_bt", "rm_disco", *DPO_CELLS, "ppo", "bon", "serve", "export"])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="The pulled model folder.")
    ns = parser.parse_args()
    os.makedirs(os.path.join(ROOT, SAVES), exist_ok=True)
    runners = {"sft": run_sft, "rm_bt": lambda m: run_rm(m, "bt"), "rm_disco": lambda m: run_rm(m, "disco"),
               "ppo": run_ppo, "bon": run_bon, "serve": run_serve, "export": run_export,
               **{cell: (lambda m, c=cell: run_dpo(m, c)) for cell in DPO_CELLS}}  # fmt: skip
    result = runners[ns.run](ns.model)
    result["threads"] = os.environ.get("OMP_NUM_THREADS", "default")
    result["when"] = time.strftime("%Y-%m-%d %H:%M")
    merged = json.load(open(RESULTS)) if os.path.isfile(RESULTS) else {}
    merged[ns.run] = result
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(merged, f, indent=1)
    print(json.dumps({ns.run: result}, indent=1))


if __name__ == "__main__":
    main()
