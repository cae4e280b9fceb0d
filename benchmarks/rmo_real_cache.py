"""Features and policy samples of the real-model mode (benchmarks/rmo_real.py), computed in resumable stages.

    python benchmarks/reward_overoptimization.py --real --stage features --budget-s 660 --out saves/rmo_real300

Each call does as much as fits in `--budget-s` seconds and stops between chunks: pair features (chosen / rejected,
all `--num-pairs` pairs), the length-matched alpaca outputs, then the policy samples of the best-of-n prompts (dev
prompts first, one file per prompt). Everything lands in the output folder (safetensors + json) and a later call
resumes; `--stage analyse` reads it without running the model. A text's feature e = the frozen backbone's last
hidden state (after the final norm) at the last token of prompt + response (ChatML, empty system turn).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import torch
from safetensors.torch import load_file, save_file

SYSTEM = [{"role": "system", "content": ""}]


def key(ids: list[int]) -> str:
    return hashlib.sha1(json.dumps(list(ids)).encode()).hexdigest()


class FeatureStore:
    """sha1(token ids) -> (d,) fp32 feature, kept in one safetensors file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.data: dict[str, torch.Tensor] = load_file(path) if os.path.exists(path) else {}

    def __contains__(self, ids: list[int]) -> bool:
        return key(ids) in self.data

    def get(self, seqs: list[list[int]]) -> torch.Tensor:
        return torch.stack([self.data[key(s)] for s in seqs])

    def put(self, ids: list[int], feature: torch.Tensor) -> None:
        self.data[key(ids)] = feature.detach().float().contiguous().clone()

    def save(self) -> None:
        save_file(self.data, self.path + ".tmp")
        os.replace(self.path + ".tmp", self.path)


class Backbone:
    """The frozen model and its tokenizer."""

    def __init__(self, path: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.stops = {self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>")}

    @torch.no_grad()
    def features(self, seqs: list[list[int]]) -> torch.Tensor:
        """(B, d) last hidden state at each sequence's last token (left padding; RoPE sees only relative positions,
        so the shift padding causes changes nothing but rounding)."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, width - len(s) :] = torch.tensor(s)
            mask[r, width - len(s) :] = 1
        return self.model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1].float()

    @torch.no_grad()
    def sample(self, prompt: list[int], n: int, new_tokens: int, seed: int) -> tuple[list[list[int]], torch.Tensor]:
        """`n` responses sampled at temperature 1 (no top-k / top-p) and their features, read off the sampling
        loop's own forward passes: the prompt is run once and its cache shared by the n rows."""
        gen = torch.Generator().manual_seed(seed)
        out = self.model.model(input_ids=torch.tensor([prompt]), use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        h = out.last_hidden_state[:, -1].expand(n, -1)
        tokens, hidden = [], []
        stopped = torch.zeros(n, dtype=torch.bool)
        for _ in range(new_tokens):
            probs = torch.softmax(self.model.lm_head(h).float(), -1)
            y = torch.multinomial(probs, 1, generator=gen)
            tokens.append(y[:, 0])
            stopped |= torch.tensor([int(t) in self.stops for t in y[:, 0]])
            if bool(stopped.all()):
                break
            h = self.model.model(input_ids=y, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
            hidden.append(h)
        rows = torch.stack(tokens, 1).tolist()
        responses, feats = [], []
        for r, row in enumerate(rows):
            cut = next((k for k, t in enumerate(row) if t in self.stops), len(row))
            keep = min(max(1, cut), len(hidden))  # the last kept token y_{keep-1} was fed at step keep - 1
            responses.append(row[:keep])
            feats.append(hidden[keep - 1][r])
        return responses, torch.stack(feats)


# ---- the texts -------------------------------------------------------------------------------------------


def prompt_ids(tok, text: str, limit: int) -> list[int]:
    content = tok.decode(tok(text, add_special_tokens=False)["input_ids"][:limit])
    return tok.apply_chat_template(SYSTEM + [{"role": "user", "content": content}],
                                   add_generation_prompt=True, tokenize=True, return_dict=False)  # fmt: skip


def response_ids(tok, text: str, limit: int) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"][:limit] or [tok.eos_token_id]


def pair_texts(tok, o) -> dict:
    """Token ids of every pair (prompt, chosen, rejected; cut) and the responses' full (uncut) lengths."""
    rows = json.load(open(os.path.join(o.data, "dpo_en_demo.json")))[: o.num_pairs]
    return {
        "prompts": [prompt_ids(tok, r["conversations"][-1]["value"], o.prompt_tokens) for r in rows],
        "chosen": [response_ids(tok, r["chosen"]["value"], o.response_tokens) for r in rows],
        "rejected": [response_ids(tok, r["rejected"]["value"], o.response_tokens) for r in rows],
        "full_len": [[len(tok(r[k]["value"])["input_ids"]) for k in ("chosen", "rejected")] for r in rows],
    }


def ood_texts(tok, o, lengths: list[int]) -> list[tuple[list[int], list[int]]]:
    """Alpaca outputs, one per held-out response of the same (or nearest) token length, without replacement."""
    rows = json.load(open(os.path.join(o.data, "alpaca_en_demo.json")))
    cands = []
    for r in rows:
        prompt = r["instruction"] + (("\n\n" + r["input"]) if r.get("input") else "")
        cands.append((prompt_ids(tok, prompt, o.prompt_tokens), response_ids(tok, r["output"], o.response_tokens)))
    used: set[int] = set()
    picked = []
    for length in lengths:
        best = min((i for i in range(len(cands)) if i not in used), key=lambda i: abs(len(cands[i][1]) - length))
        used.add(best)
        picked.append(cands[best])
    return picked


def texts(tok, o) -> dict:
    """Every text of the run as token ids, cached in `texts.json` (tokenising is cheap, matching is not)."""
    path = os.path.join(o.out, "texts.json")
    held = list(range(o.num_pairs - o.heldout, o.num_pairs))
    if os.path.exists(path):
        t = json.load(open(path))
    else:
        t = pair_texts(tok, o)
        held_resp = [t["chosen"][i] for i in held] + [t["rejected"][i] for i in held]
        t["ood"] = ood_texts(tok, o, [len(r) for r in held_resp[: o.ood]])
        json.dump(t, open(path, "w"))
    t["bon_prompts"] = held[: o.dev_prompts + o.report_prompts]  # the first held-out pairs' prompts, dev first
    return t


# ---- the stage -------------------------------------------------------------------------------------------


def run_features(o) -> None:
    """Pair and OOD features, then the policy samples, until done or `--budget-s` would be exceeded."""
    torch.set_num_threads(o.threads)
    os.makedirs(os.path.join(o.out, "candidates"), exist_ok=True)
    t0 = time.time()
    bb = Backbone(o.model)
    t = texts(bb.tok, o)
    store = FeatureStore(os.path.join(o.out, "features.safetensors"))
    seqs = [p + c for p, c in zip(t["prompts"], t["chosen"])] + [p + r for p, r in zip(t["prompts"], t["rejected"])]
    seqs += [p + r for p, r in t["ood"]]
    todo = sorted({tuple(s) for s in seqs if list(s) not in store}, key=len)
    slowest = 0.0
    for i in range(0, len(todo), o.batch):
        if time.time() - t0 + 1.5 * slowest > o.budget_s:
            print(f"budget reached: {len(todo) - i} sequences left")
            return
        t1 = time.time()
        chunk = [list(s) for s in todo[i : i + o.batch]]
        for s, f in zip(chunk, bb.features(chunk)):
            store.put(s, f)
        store.save()
        slowest = max(slowest, time.time() - t1)
    print(f"features: {len(store.data)} stored ({time.time() - t0:.0f} s)")
    run_candidates(o, bb, t, t0)


def run_candidates(o, bb: Backbone, t: dict, t0: float) -> None:
    slowest = 0.0
    for k, pair in enumerate(t["bon_prompts"]):
        path = os.path.join(o.out, "candidates", f"prompt_{k:03d}")
        if os.path.exists(path + ".json"):
            continue
        if time.time() - t0 + 1.2 * slowest > o.budget_s:
            print(f"budget reached at prompt {k}")
            return
        t1 = time.time()
        prompt = t["prompts"][pair]
        responses, feats = bb.sample(prompt, o.candidates, o.new_tokens, seed=1000 + k)
        check = bb.features([prompt + responses[0]])[0]
        rel = float((check - feats[0]).abs().max() / check.abs().max())
        save_file({"features": feats.contiguous()}, path + ".safetensors")
        meta = {"pair": pair, "seed": 1000 + k, "responses": responses, "feature_rel_error": rel,
                "seconds": time.time() - t1}  # fmt: skip
        json.dump(meta, open(path + ".json", "w"))
        slowest = max(slowest, time.time() - t1)
        print(f"prompt {k}: {time.time() - t1:.0f} s, rel. error {rel:.1e}")
    print(f"all {len(t['bon_prompts'])} prompts sampled ({time.time() - t0:.0f} s)")


def load_candidates(out: str, count: int) -> list[dict]:
    """The sampled prompts' candidates: pair index, responses, features (missing prompts: an error naming them)."""
    found = []
    for k in range(count):
        path = os.path.join(out, "candidates", f"prompt_{k:03d}")
        if not os.path.exists(path + ".json"):
            raise SystemExit(f"{path}.json is missing: run `--stage features` again until every prompt is sampled")
        meta = json.load(open(path + ".json"))
        meta["features"] = load_file(path + ".safetensors")["features"]
        found.append(meta)
    return found


def import_old_cache(old: str, store_path: str) -> int:
    """Copy a feature cache of the first version (torch.save of {token-id tuple: feature}) into a FeatureStore."""
    store = FeatureStore(store_path)
    cache = torch.load(old, weights_only=True)
    for ids, f in cache.items():
        store.put(list(ids), f)
    store.save()
    return len(cache)
