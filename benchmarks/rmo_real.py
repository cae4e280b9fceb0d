"""Real-model mode of benchmarks/reward_overoptimization.py (`--real`): the epistemic estimators on SmolLM2-135M-Instruct
and real preference text (docs/reward_overoptimization.md, "Real model").

    python benchmarks/reward_overoptimization.py --real --out saves/rmo_real

CPU cost decides the design. The reward models share SmolLM2-135M-Instruct as a *frozen* backbone: a text's feature
e = the last layer's hidden state at its last token (prompt + response, ChatML, empty system turn) is computed once
and cached; a reward model is a value head r = w . e trained with the BT loss (Newton, prior precision chosen by the
Laplace evidence, MacKay 1992). Prompts are cut to their first `--prompt-tokens` tokens, responses to
`--response-tokens`. On top of each trained head:

* `laplace`: `LaplacePosterior.from_pairs` (the class `epistemic: laplace` fits), u^2 = (e - e_bar)^T Sigma (e - e_bar);
* `token_novelty`: `TokenNovelty` fitted on the training responses, prior variance = var of the trained means.

Measured: (1) in distribution, Spearman(sigma, response length) on held-out responses of the preference data and on
policy samples; (2) OOD AUROC of sigma for alpaca outputs against held-out responses, length-matched, next to length
alone; (3) proxy / gold best-of-n (Gao et al. 2022): gold = head on all pairs, clean; proxy = head on a subset of the
training split with `--noise` of its labels flipped (3 seeds: subset and flips); candidates sampled from the policy
(SmolLM2-135M-Instruct itself, temperature 1) for held-out prompts; kappa of mean - kappa sigma chosen on the dev
prompts, reported on the others.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from typing import Any

import numpy as np
import torch

from discoalign.models.epistemic import EpistemicInputs, LaplacePosterior, TokenNovelty
from discoalign.models.epistemic.laplace import curvature, evidence_precision, fisher_weights

MODEL = "/root/.cache/discoalign/models/smollm2-135m-instruct"
DATA = "/work/shared/data"
KAPPA_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
SYSTEM = [{"role": "system", "content": ""}]


def options(rest: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="reward_overoptimization.py --real")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--data", default=DATA)
    p.add_argument("--num-pairs", type=int, default=200, help="preference pairs used (gold trains on all)")
    p.add_argument("--heldout", type=int, default=70, help="pairs held out of every proxy")
    p.add_argument("--proxy-pairs", type=int, default=90, help="training pairs of each proxy")
    p.add_argument("--noise", type=float, default=0.25, help="fraction of proxy labels flipped")
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--response-tokens", type=int, default=48)
    p.add_argument("--ood", type=int, default=70, help="alpaca outputs, length-matched to held-out responses")
    p.add_argument("--bon-prompts", type=int, default=6, help="prompts with sampled candidates (first half: dev)")
    p.add_argument("--candidates", type=int, default=64, help="samples per prompt (N goes up to it)")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--proxy-seeds", default="0,1,2")
    p.add_argument("--batch", type=int, default=16)
    return p.parse_args(rest)


# ---- features --------------------------------------------------------------------------------------------


class Backbone:
    """The frozen model, its tokenizer and a cache of features by token ids (saved in the output folder)."""

    def __init__(self, path: str, cache: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.cache_path = cache
        self.cache: dict[tuple[int, ...], torch.Tensor] = torch.load(cache) if os.path.exists(cache) else {}
        self.tokens_run = 0

    def prompt_ids(self, text: str, limit: int) -> list[int]:
        content = self.tok.decode(self.tok(text, add_special_tokens=False)["input_ids"][:limit])
        return self.tok.apply_chat_template(SYSTEM + [{"role": "user", "content": content}],
                                            add_generation_prompt=True, tokenize=True, return_dict=False)  # fmt: skip

    def response_ids(self, text: str, limit: int) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"][:limit] or [self.tok.eos_token_id]

    @torch.no_grad()
    def features(self, seqs: list[list[int]], batch: int) -> torch.Tensor:
        """(N, H) fp32: last-layer hidden state at each sequence's last token (cached)."""
        todo = sorted({tuple(s) for s in seqs if tuple(s) not in self.cache}, key=len)
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), self.tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, s in enumerate(chunk):  # left padding: the last token is at -1
                ids[r, width - len(s) :] = torch.tensor(s)
                mask[r, width - len(s) :] = 1
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            for r, s in enumerate(chunk):
                self.cache[s] = out.hidden_states[-1][r, -1].float().clone()
            self.tokens_run += int(mask.sum())
        if todo:
            torch.save(self.cache, self.cache_path)
        return torch.stack([self.cache[tuple(s)] for s in seqs])

    @torch.no_grad()
    def sample(self, prompt: list[int], n: int, new_tokens: int, seed: int) -> tuple[list[list[int]], torch.Tensor]:
        """`n` responses (token ids, without the end-of-turn token) sampled at temperature 1, and their features,
        read off the generation's own forward passes (the hidden state where the last kept token was fed): the
        same numbers as `features(prompt + response)` up to float rounding, at no extra forward."""
        torch.manual_seed(seed)
        ids = torch.tensor([prompt] * n)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                  top_p=1.0, top_k=0, max_new_tokens=new_tokens, pad_token_id=self.tok.pad_token_id,
                                  output_hidden_states=True, return_dict_in_generate=True)  # fmt: skip
        self.tokens_run += int(out.sequences.numel())
        stops = {self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>")}
        steps = len(out.hidden_states)
        responses, feats = [], []
        for r, row in enumerate(out.sequences[:, len(prompt) :].tolist()):
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            keep = max(1, min(cut, steps - 1))  # the last kept token y_{keep-1} is fed at step `keep`
            responses.append(row[:keep])
            feats.append(out.hidden_states[keep][-1][r, -1].float())
        return responses, torch.stack(feats)


# ---- reward heads ----------------------------------------------------------------------------------------


def fit_head(diff: torch.Tensor, steps: int = 8) -> tuple[torch.Tensor, float]:
    """BT value head on pair differences (chosen - rejected, (N, d)): MAP by Newton under N(0, I / lambda), lambda
    re-chosen by the Laplace evidence between rounds (MacKay's evidence framework)."""
    D = diff.double()
    d = D.shape[1]
    w = torch.zeros(d, dtype=torch.float64)
    lam = 1.0
    for _ in range(steps):
        for _ in range(25):
            p = torch.sigmoid(D @ w)
            grad = D.T @ (1 - p) - lam * w
            H = curvature(D, p * (1 - p)) + lam * torch.eye(d, dtype=torch.float64)
            step = torch.linalg.solve(H, grad)
            w = w + step
            if float(step.abs().max()) < 1e-9:
                break
        p = torch.sigmoid(D @ w)
        lam, _ = evidence_precision(curvature(D, p * (1 - p)), w)
    return w, lam


def rank(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share theirs)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    values = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = rank(np.asarray(a, float)), rank(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties half (Mann-Whitney)."""
    r = rank(np.concatenate([positive, negative]))
    n1, n0 = len(positive), len(negative)
    return float((r[:n1].sum() + n1 - n1 * (n1 + 1) / 2) / (n1 * n0))


class Proxy:
    """A trained head with its two epistemic estimators."""

    def __init__(self, feats: torch.Tensor, responses: list[list[int]], vocab: int) -> None:
        """feats: (N, 2, d) preferred first (by the proxy's labels); responses: every training response's ids."""
        self.w, self.head_lambda = fit_head(feats[:, 0] - feats[:, 1])
        margin = (feats[:, 0] - feats[:, 1]).double() @ self.w
        self.laplace = LaplacePosterior.from_pairs(feats, fisher_weights(margin), self.w)
        means = feats.reshape(-1, feats.shape[-1]).double() @ self.w
        self.novelty = TokenNovelty(vocab).fit(responses)
        self.novelty.prior_variance = float(means.var())

    def score(self, feats: torch.Tensor, responses: list[list[int]]) -> dict[str, np.ndarray]:
        width = max(len(r) for r in responses)
        ids = torch.zeros(len(responses), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(responses):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        inputs = EpistemicInputs(ids, mask, feats)
        return {"mean": (feats.double() @ self.w).numpy(),
                "laplace": self.laplace.variance(inputs).double().sqrt().numpy(),
                "token_novelty": self.novelty.variance(inputs).double().sqrt().numpy(),
                "novelty_per_token": (self.novelty.novelty(ids, mask) / mask.sum(1)).double().numpy()}  # fmt: skip


# ---- the run ---------------------------------------------------------------------------------------------


def load_pairs(bb: Backbone, o: argparse.Namespace):
    rows = json.load(open(os.path.join(o.data, "dpo_en_demo.json")))[: o.num_pairs]
    prompts = [bb.prompt_ids(r["conversations"][-1]["value"], o.prompt_tokens) for r in rows]
    chosen = [bb.response_ids(r["chosen"]["value"], o.response_tokens) for r in rows]
    rejected = [bb.response_ids(r["rejected"]["value"], o.response_tokens) for r in rows]
    full = [(len(bb.tok(r["chosen"]["value"])["input_ids"]), len(bb.tok(r["rejected"]["value"])["input_ids"]))
            for r in rows]  # fmt: skip
    feats = bb.features([p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)], o.batch)
    feats = torch.stack([feats[: len(rows)], feats[len(rows) :]], 1)
    return prompts, chosen, rejected, np.array(full), feats


def ood_set(bb: Backbone, o: argparse.Namespace, lengths: list[int]):
    """Alpaca outputs, one per held-out response of the same (or nearest) token length, without replacement."""
    rows = json.load(open(os.path.join(o.data, "alpaca_en_demo.json")))
    cands = []
    for r in rows:
        prompt = r["instruction"] + (("\n\n" + r["input"]) if r.get("input") else "")
        cands.append((bb.prompt_ids(prompt, o.prompt_tokens), bb.response_ids(r["output"], o.response_tokens)))
    used: set[int] = set()
    picked = []
    for length in lengths:
        best = min((i for i in range(len(cands)) if i not in used), key=lambda i: abs(len(cands[i][1]) - length))
        used.add(best)
        picked.append(cands[best])
    return picked


def bon_curve(scores: np.ndarray, gold: np.ndarray, ns_list: list[int]) -> np.ndarray:
    from reward_overoptimization import bon_weights

    out = []
    for n in ns_list:
        w = bon_weights(scores.shape[1], n)
        out.append(np.mean([(w * g[np.argsort(s, kind="stable")]).sum() for s, g in zip(scores, gold)]))
    return np.array(out)


def bucket_check(sizes=(10_000, 100_000, 1_000_000, 4_000_000), fresh: int = 20_000) -> dict[str, float]:
    """Fraction of never-seen token pairs `TokenNovelty` still flags as unseen after `n` distinct training pairs went
    into its 2^18 hashed buckets (exp(-n / 2^18) for a uniform hash)."""
    g = torch.Generator().manual_seed(0)
    vocab = 49_152
    out = {}
    for n in sizes:
        term = TokenNovelty(vocab)
        pairs = torch.randint(0, vocab, (n + fresh, 2), generator=g)
        term.bigram += torch.bincount(term._pair_bucket(pairs[:n, 0], pairs[:n, 1]), minlength=term.buckets)
        new = pairs[n:]
        flagged = term.bigram[term._pair_bucket(new[:, 0], new[:, 1])] == 0
        out[str(n)] = float(flagged.float().mean())
    return out


def data_size_check(train_resp: list[list[int]], held: list[list[int]], vocab: int) -> dict[str, float]:
    """Mean novelty (unseen tokens + pairs) and fraction of held-out responses with any, by training-set size."""
    out = {}
    for n in (25, 50, 100, len(train_resp) // 2):
        term = TokenNovelty(vocab).fit(train_resp[: 2 * n])
        width = max(len(r) for r in held)
        ids = torch.zeros(len(held), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(held):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        nov = term.novelty(ids, mask)
        out[str(n)] = [float(nov.mean()), float((nov > 0).float().mean())]
    return out


def proxy_data(seed: int, o: argparse.Namespace, feats: torch.Tensor, chosen, rejected, train_idx: list[int]):
    rng = random.Random(seed)
    idx = rng.sample(train_idx, o.proxy_pairs)
    flip = [rng.random() < o.noise for _ in idx]
    f = torch.stack([feats[i].flip(0) if fl else feats[i] for i, fl in zip(idx, flip)])
    return f, [chosen[i] for i in idx] + [rejected[i] for i in idx]


def main(rest: list[str], ns: argparse.Namespace) -> dict[str, Any]:
    o = options(rest)
    torch.set_num_threads(ns.threads)
    os.makedirs(ns.out, exist_ok=True)
    t0 = time.time()
    bb = Backbone(o.model, os.path.join(ns.out, "features_cache.pt"))
    prompts, chosen, rejected, full_len, feats = load_pairs(bb, o)
    n = len(prompts)
    heldout = list(range(n - o.heldout, n))
    train_idx = list(range(n - o.heldout))
    gold_w, gold_lambda = fit_head(feats[:, 0] - feats[:, 1])
    t_pairs = time.time() - t0

    # in-distribution held-out responses, and alpaca outputs length-matched to (the first `--ood` of) them
    held_resp = [chosen[i] for i in heldout] + [rejected[i] for i in heldout]
    held_feat = torch.cat([feats[heldout, 0], feats[heldout, 1]])
    held_full = np.concatenate([full_len[heldout, 0], full_len[heldout, 1]])
    ood = ood_set(bb, o, [len(r) for r in held_resp[: o.ood]])
    ood_feat = bb.features([p + r for p, r in ood], o.batch)
    ood_resp = [r for _, r in ood]

    # policy candidates for held-out prompts
    bon_prompts = [prompts[i] for i in heldout[: o.bon_prompts]]
    sampled = [bb.sample(p, o.candidates, o.new_tokens, seed=1000 + k) for k, p in enumerate(bon_prompts)]
    cands, cand_feat = [c for c, _ in sampled], [f for _, f in sampled]
    check = bb.features([bon_prompts[0] + cands[0][0]], o.batch)[0]
    feature_check = float((check - cand_feat[0][0]).abs().max() / check.abs().max())
    gold = np.stack([(f.double() @ gold_w).numpy() for f in cand_feat])
    ns_list = [m for m in (1, 2, 4, 8, 16, 32, 64) if m <= o.candidates]
    dev = o.bon_prompts // 2

    seeds = []
    for seed in (int(s) for s in o.proxy_seeds.split(",")):
        pf, presp = proxy_data(seed, o, feats, chosen, rejected, train_idx)
        proxy = Proxy(pf, presp, len(bb.tok))
        held = proxy.score(held_feat, held_resp)
        od = proxy.score(ood_feat, ood_resp)
        lens = np.array([len(r) for r in held_resp])
        cs = [proxy.score(f, rs) for f, rs in zip(cand_feat, cands)]
        cand_len = np.concatenate([[len(r) for r in rs] for rs in cands])
        res: dict[str, Any] = {"seed": seed, "head_lambda": proxy.head_lambda,
                               "laplace_lambda": proxy.laplace.prior_precision,
                               "novelty_prior_variance": proxy.novelty.prior_variance,
                               "proxy_gold_spearman_candidates": spearman(
                                   np.concatenate([c["mean"] for c in cs]), gold.reshape(-1)),
                               "spearman_length": {}, "auroc": {}, "bon": {}}  # fmt: skip
        for est in ("laplace", "token_novelty", "novelty_per_token"):
            res["spearman_length"][est] = {
                "heldout_read_tokens": spearman(held[est], lens),
                "heldout_full_tokens": spearman(held[est], held_full),
                "policy_candidates": spearman(np.concatenate([c[est] for c in cs]), cand_len),
            }
            res["auroc"][est] = auroc(od[est], held[est][: o.ood])
        res["auroc"]["length"] = auroc(np.array([len(r) for r in ood_resp], float), lens[: o.ood].astype(float))
        res["auroc"]["proxy mean (lower = OOD)"] = auroc(-od["mean"], -held["mean"][: o.ood])
        mean = np.stack([c["mean"] for c in cs])
        res["bon"]["mean"] = {"dev": bon_curve(mean[:dev], gold[:dev], ns_list).tolist(),
                              "report": bon_curve(mean[dev:], gold[dev:], ns_list).tolist()}  # fmt: skip
        for est in ("laplace", "token_novelty"):
            sig = np.stack([c[est] for c in cs])
            for k in KAPPA_GRID:
                s = mean - k * sig
                res["bon"][f"{est} {k:g}"] = {"dev": bon_curve(s[:dev], gold[:dev], ns_list).tolist(),
                                              "report": bon_curve(s[dev:], gold[dev:], ns_list).tolist()}  # fmt: skip
        seeds.append(res)
    summary = summarise(seeds, ns_list, o, gold_lambda, bb.tokens_run, time.time() - t0, t_pairs)
    summary["generation_feature_rel_error"] = feature_check
    summary["novelty_buckets_fresh_pair_flagged"] = bucket_check()
    train_resp = [r for i in train_idx for r in (chosen[i], rejected[i])]
    summary["novelty_by_training_pairs"] = data_size_check(train_resp, held_resp, len(bb.tok))
    summary["candidate_lengths"] = [
        float(np.mean([len(r) for rs in cands for r in rs])),
        float(np.mean([len(r) == o.new_tokens - 1 for rs in cands for r in rs])),
    ]
    with open(os.path.join(ns.out, "summary.json"), "w") as f:
        json.dump({"summary": summary, "per_seed": seeds, "args": vars(o)}, f, indent=1)
    text = report(summary)
    with open(os.path.join(ns.out, "report.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return summary


def summarise(seeds, ns_list, o, gold_lambda, tokens, wall, t_pairs) -> dict[str, Any]:
    def ms(values) -> list[float]:
        v = np.array(values, float)
        return [float(v.mean()), float(v.std()), *map(float, v)]

    s: dict[str, Any] = {"n": ns_list, "gold_lambda": gold_lambda, "tokens_forwarded": tokens, "wall_s": wall,
                         "pairs_features_s": t_pairs, "seeds": [r["seed"] for r in seeds]}  # fmt: skip
    s["proxy_gold_spearman_candidates"] = ms([r["proxy_gold_spearman_candidates"] for r in seeds])
    s["lambda"] = {k: ms([r[k] for r in seeds]) for k in ("head_lambda", "laplace_lambda")}
    s["spearman_length"] = {est: {k: ms([r["spearman_length"][est][k] for r in seeds]) for k in v}
                            for est, v in seeds[0]["spearman_length"].items()}  # fmt: skip
    s["auroc"] = {k: ms([r["auroc"][k] for r in seeds]) for k in seeds[0]["auroc"]}
    # kappa per estimator: best mean gold at the largest N on the dev prompts (over seeds)
    s["kappa"], s["bon"] = {}, {"mean": [ms(c) for c in zip(*[r["bon"]["mean"]["report"] for r in seeds])]}
    for est in ("laplace", "token_novelty"):
        dev = {k: np.mean([r["bon"][f"{est} {k:g}"]["dev"][-1] for r in seeds]) for k in KAPPA_GRID}
        k = max(dev, key=dev.get)
        s["kappa"][est] = k
        s["bon"][f"{est} (kappa {k:g})"] = [ms(c) for c in zip(*[r["bon"][f"{est} {k:g}"]["report"] for r in seeds])]
    s["bon_best_in_pool_note"] = "gold of best-of-n on the report prompts, mean, sd, per seed"
    return s


def report(s: dict[str, Any]) -> str:
    def f(v) -> str:
        return f"{v[0]:.3f} ± {v[1]:.3f} ({', '.join(f'{x:.3f}' for x in v[2:])})"

    lines = [f"proxy seeds {s['seeds']}; tokens forwarded {s['tokens_forwarded']}; wall {s['wall_s']:.0f} s; "
             f"gold lambda {s['gold_lambda']:.3g}", "",
             "Spearman(sigma, length): " + "; ".join(f"{est} {k} {f(v)}" for est, d in s["spearman_length"].items()
                                                     for k, v in d.items()),
             "", "OOD AUROC (alpaca vs held-out, length-matched): " + "; ".join(f"{k} {f(v)}"
                                                                                for k, v in s["auroc"].items()),
             "", f"proxy-gold Spearman on candidates: {f(s['proxy_gold_spearman_candidates'])}",
             "", "| selector | " + " | ".join(f"N={n}" for n in s["n"]) + " |",
             "|---|" + "---|" * len(s["n"])]  # fmt: skip
    for name, cells in s["bon"].items():
        if isinstance(cells, list):
            lines.append(f"| {name} | " + " | ".join(f"{c[0]:.3f} ± {c[1]:.3f}" for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit("run it as: python benchmarks/reward_overoptimization.py --real")
