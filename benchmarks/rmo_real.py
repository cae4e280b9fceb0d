"""Real-model mode of benchmarks/reward_overoptimization.py (`--real`): the epistemic estimators on SmolLM2-135M-Instruct
and real preference text (docs/reward_overoptimization.md, "Real model").

    python benchmarks/reward_overoptimization.py --real --stage features --out saves/rmo_real300   # until done
    python benchmarks/reward_overoptimization.py --real --out saves/rmo_real300                    # analyse

CPU cost decides the design. The reward models share SmolLM2-135M-Instruct as a *frozen* backbone: a text's feature
e = the last layer's hidden state at its last token (prompt + response, ChatML, empty system turn) is computed once
and stored (benchmarks/rmo_real_cache.py, resumable stages); a reward model is a value head r = w . e trained with the
BT loss (Newton, prior precision chosen by the Laplace evidence, MacKay 1992). Prompts are cut to their first
`--prompt-tokens` tokens, responses to `--response-tokens`. On top of each trained head:

* `laplace`: `LaplacePosterior.from_pairs` (the class `epistemic: laplace` fits), u^2 = (e - e_bar)^T Sigma (e - e_bar);
* `token_novelty`: `TokenNovelty` fitted on the training responses, prior variance = var of the trained means.

Measured: (1) in distribution, Spearman(sigma, response length) on held-out responses of the preference data and on
policy samples; (2) OOD AUROC of sigma for alpaca outputs against held-out responses, length-matched, next to length
alone; (3) proxy / gold best-of-n (Gao et al. 2022): gold = head on all pairs, clean; proxy = head on a subset of the
training split with `--noise` of its labels flipped (`--proxy-seeds`: subset and flips); candidates sampled from the
policy (SmolLM2-135M-Instruct itself, temperature 1) for held-out prompts; kappa of mean - kappa sigma chosen on the
`--dev-prompts`, reported on the `--report-prompts`.
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
from rmo_real_cache import FeatureStore, load_candidates, run_features

from discoalign.models.epistemic import EpistemicInputs, LaplacePosterior, TokenNovelty
from discoalign.models.epistemic.laplace import curvature, evidence_precision, fisher_weights

MODEL = "/root/.cache/discoalign/models/smollm2-135m-instruct"
DATA = "/work/shared/data"
KAPPA_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def options(rest: list[str], ns: argparse.Namespace) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="reward_overoptimization.py --real")
    p.add_argument("--stage", choices=("features", "analyse"), default="analyse",
                   help="features: run the model (resumable, --budget-s); analyse: heads and metrics from the files")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=660.0, help="features: stop between chunks after this long")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--data", default=DATA)
    p.add_argument("--num-pairs", type=int, default=300, help="preference pairs used (gold trains on all)")
    p.add_argument("--heldout", type=int, default=100, help="last pairs, held out of every proxy")
    p.add_argument("--proxy-pairs", type=int, default=100, help="training pairs of each proxy")
    p.add_argument("--noise", type=float, default=0.25, help="fraction of proxy labels flipped")
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--response-tokens", type=int, default=40)
    p.add_argument("--ood", type=int, default=200, help="alpaca outputs, length-matched to held-out responses")
    p.add_argument("--dev-prompts", type=int, default=8, help="best-of-n prompts kappa is chosen on")
    p.add_argument("--report-prompts", type=int, default=20, help="best-of-n prompts reported (nothing tuned)")
    p.add_argument("--candidates", type=int, default=64, help="samples per prompt (N goes up to it)")
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--proxy-seeds", default="0,1,2,3,4")
    p.add_argument("--batch", type=int, default=16)
    o = p.parse_args(rest)
    o.out, o.threads = ns.out, ns.threads
    return o


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


def bon_curve(scores: np.ndarray, gold: np.ndarray, ns_list: list[int]) -> np.ndarray:
    from reward_overoptimization import bon_weights

    out = []
    for n in ns_list:
        w = bon_weights(scores.shape[1], n)
        out.append(np.mean([(w * g[np.argsort(s, kind="stable")]).sum() for s, g in zip(scores, gold)]))
    return np.array(out)


def per_prompt(scores: np.ndarray, gold: np.ndarray, n: int) -> list[float]:
    """Gold reward of best-of-n, prompt by prompt."""
    return [float(bon_curve(s[None], g[None], [n])[0]) for s, g in zip(scores, gold)]


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


def proxy_indices(seed: int, o: argparse.Namespace, train_idx: list[int]) -> tuple[list[int], list[bool]]:
    """A proxy's training pairs (`--proxy-pairs` of the training split) and which of their labels are flipped."""
    rng = random.Random(seed)
    idx = rng.sample(train_idx, o.proxy_pairs)
    return idx, [rng.random() < o.noise for _ in idx]


def proxy_data(seed: int, o: argparse.Namespace, feats: torch.Tensor, chosen, rejected, train_idx: list[int]):
    idx, flip = proxy_indices(seed, o, train_idx)
    f = torch.stack([feats[i].flip(0) if fl else feats[i] for i, fl in zip(idx, flip)])
    return f, [chosen[i] for i in idx] + [rejected[i] for i in idx]


def main(rest: list[str], ns: argparse.Namespace) -> dict[str, Any] | None:
    o = options(rest, ns)
    os.makedirs(o.out, exist_ok=True)
    if o.stage == "features":
        return run_features(o)
    return analyse(o)


def load_run(o: argparse.Namespace) -> dict[str, Any]:
    """Everything the features stage stored, as arrays: pairs, held-out and OOD responses, candidates."""
    from transformers import AutoTokenizer

    t = json.load(open(os.path.join(o.out, "texts.json")))
    store = FeatureStore(os.path.join(o.out, "features.safetensors"))
    P = t["prompts"]
    n = len(P)
    feats = torch.stack([store.get([p + c for p, c in zip(P, t["chosen"])]),
                         store.get([p + r for p, r in zip(P, t["rejected"])])], 1)  # fmt: skip
    held = list(range(n - o.heldout, n))
    bon = load_candidates(o.out, o.dev_prompts + o.report_prompts)
    return {"vocab": len(AutoTokenizer.from_pretrained(o.model)), "feats": feats, "chosen": t["chosen"],
            "rejected": t["rejected"], "train_idx": list(range(n - o.heldout)),
            "held_resp": [t["chosen"][i] for i in held] + [t["rejected"][i] for i in held],
            "held_feat": torch.cat([feats[held, 0], feats[held, 1]]),
            "held_full": np.array([t["full_len"][i][0] for i in held] + [t["full_len"][i][1] for i in held]),
            "ood_resp": [r for _, r in t["ood"]], "ood_feat": store.get([p + r for p, r in t["ood"]]),
            "cands": [b["responses"] for b in bon], "cand_feat": [b["features"] for b in bon],
            "feature_rel_error": max(b["feature_rel_error"] for b in bon),
            "sample_s": [b["seconds"] for b in bon], "bon_pairs": [b["pair"] for b in bon]}  # fmt: skip


def one_seed(seed: int, o: argparse.Namespace, r: dict[str, Any], gold: np.ndarray, ns_list: list[int]):
    """One proxy (its subset and flips from `seed`): length correlations, OOD AUROC, best-of-n curves."""
    dev = o.dev_prompts
    pf, presp = proxy_data(seed, o, r["feats"], r["chosen"], r["rejected"], r["train_idx"])
    proxy = Proxy(pf, presp, r["vocab"])
    held = proxy.score(r["held_feat"], r["held_resp"])
    od = proxy.score(r["ood_feat"], r["ood_resp"])
    lens = np.array([len(x) for x in r["held_resp"]])
    cs = [proxy.score(f, rs) for f, rs in zip(r["cand_feat"], r["cands"])]
    cand_len = np.concatenate([[len(x) for x in rs] for rs in r["cands"]])
    res: dict[str, Any] = {"seed": seed, "head_lambda": proxy.head_lambda,
                           "laplace_lambda": proxy.laplace.prior_precision,
                           "novelty_prior_variance": proxy.novelty.prior_variance,
                           "proxy_gold_spearman_candidates": spearman(
                               np.concatenate([c["mean"] for c in cs]), gold.reshape(-1)),
                           "heldout_pair_accuracy": float(np.mean(held["mean"][: o.heldout] > held["mean"][o.heldout:])),
                           "spearman_length": {}, "auroc": {}, "bon": {}}  # fmt: skip
    for est in ("laplace", "token_novelty", "novelty_per_token"):
        res["spearman_length"][est] = {
            "heldout_read_tokens": spearman(held[est], lens),
            "heldout_full_tokens": spearman(held[est], r["held_full"]),
            "policy_candidates": spearman(np.concatenate([c[est] for c in cs]), cand_len),
        }
        res["auroc"][est] = auroc(od[est], held[est][: o.ood])
    res["auroc"]["length"] = auroc(np.array([len(x) for x in r["ood_resp"]], float), lens[: o.ood].astype(float))
    res["auroc"]["proxy mean (lower = OOD)"] = auroc(-od["mean"], -held["mean"][: o.ood])
    mean = np.stack([c["mean"] for c in cs])
    res["bon"]["mean"] = {"dev": bon_curve(mean[:dev], gold[:dev], ns_list).tolist(),
                          "report": bon_curve(mean[dev:], gold[dev:], ns_list).tolist(),
                          "report_prompts_max_n": per_prompt(mean[dev:], gold[dev:], ns_list[-1])}  # fmt: skip
    for est in ("laplace", "token_novelty"):
        sig = np.stack([c[est] for c in cs])
        for k in KAPPA_GRID:
            s = mean - k * sig
            res["bon"][f"{est} {k:g}"] = {"dev": bon_curve(s[:dev], gold[:dev], ns_list).tolist(),
                                          "report": bon_curve(s[dev:], gold[dev:], ns_list).tolist(),
                                          "report_prompts_max_n": per_prompt(s[dev:], gold[dev:], ns_list[-1])}  # fmt: skip
    return res


def analyse(o: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    r = load_run(o)
    gold_w, gold_lambda = fit_head(r["feats"][:, 0] - r["feats"][:, 1])
    gold = np.stack([(f.double() @ gold_w).numpy() for f in r["cand_feat"]])
    ns_list = [m for m in (1, 2, 4, 8, 16, 32, 64) if m <= o.candidates]
    seeds = [one_seed(int(s), o, r, gold, ns_list) for s in o.proxy_seeds.split(",")]
    summary = summarise(seeds, ns_list, o, gold_lambda, time.time() - t0)
    held = r["held_feat"].double()
    split_w, _ = fit_head(r["feats"][r["train_idx"], 0] - r["feats"][r["train_idx"], 1])  # clean, training split
    summary["clean_train_split_head_heldout_accuracy"] = float(
        (held[: o.heldout] @ split_w > held[o.heldout :] @ split_w).double().mean()
    )
    summary["heldout_at_response_cap"] = float(np.mean([len(x) == o.response_tokens for x in r["held_resp"]]))
    summary["best_in_pool_report"] = float(gold[o.dev_prompts :].max(1).mean())
    summary["gold_random_report"] = float(gold[o.dev_prompts :].mean())
    summary["generation_feature_rel_error"] = r["feature_rel_error"]
    summary["sampling_s_per_prompt"] = [float(np.mean(r["sample_s"])), float(np.sum(r["sample_s"]))]
    summary["bon_pairs"] = {"dev": r["bon_pairs"][: o.dev_prompts], "report": r["bon_pairs"][o.dev_prompts :]}
    summary["novelty_buckets_fresh_pair_flagged"] = bucket_check()
    train_resp = [x for i in r["train_idx"] for x in (r["chosen"][i], r["rejected"][i])]
    summary["novelty_by_training_pairs"] = data_size_check(train_resp, r["held_resp"], r["vocab"])
    lens = [len(x) for rs in r["cands"] for x in rs]
    summary["candidate_lengths"] = [float(np.mean(lens)), float(np.mean([n == o.new_tokens for n in lens]))]
    with open(os.path.join(o.out, "summary.json"), "w") as f:
        json.dump({"summary": summary, "per_seed": seeds, "args": vars(o)}, f, indent=1)
    text = report(summary)
    with open(os.path.join(o.out, "report.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return summary


def summarise(seeds, ns_list, o, gold_lambda, wall) -> dict[str, Any]:
    def ms(values) -> list[float]:
        v = np.array(values, float)
        return [float(v.mean()), float(v.std()), *map(float, v)]

    s: dict[str, Any] = {"n": ns_list, "gold_lambda": gold_lambda, "analyse_s": wall,
                         "seeds": [r["seed"] for r in seeds]}  # fmt: skip
    for k in ("proxy_gold_spearman_candidates", "heldout_pair_accuracy"):
        s[k] = ms([r[k] for r in seeds])
    s["lambda"] = {k: ms([r[k] for r in seeds]) for k in ("head_lambda", "laplace_lambda")}
    s["spearman_length"] = {est: {k: ms([r["spearman_length"][est][k] for r in seeds]) for k in v}
                            for est, v in seeds[0]["spearman_length"].items()}  # fmt: skip
    s["auroc"] = {k: ms([r["auroc"][k] for r in seeds]) for k in seeds[0]["auroc"]}
    # kappa per estimator: best mean gold at the largest N on the dev prompts (over seeds)
    s["kappa"], s["bon"] = {}, {"mean": [ms(c) for c in zip(*[r["bon"]["mean"]["report"] for r in seeds])]}
    s["kappa_dev_gold_max_n"] = {"mean": float(np.mean([r["bon"]["mean"]["dev"][-1] for r in seeds]))}
    base = np.mean([r["bon"]["mean"]["report_prompts_max_n"] for r in seeds], 0)
    s["prompts_better_worse_tied_max_n"] = {}
    for est in ("laplace", "token_novelty"):
        dev = {k: float(np.mean([r["bon"][f"{est} {k:g}"]["dev"][-1] for r in seeds])) for k in KAPPA_GRID}
        s["kappa_dev_gold_max_n"][est] = dev
        k = max(dev, key=dev.get)
        s["kappa"][est] = k
        s["bon"][f"{est} (kappa {k:g})"] = [ms(c) for c in zip(*[r["bon"][f"{est} {k:g}"]["report"] for r in seeds])]
        sel = np.mean([r["bon"][f"{est} {k:g}"]["report_prompts_max_n"] for r in seeds], 0)
        diff = sel - base
        s["prompts_better_worse_tied_max_n"][est] = [int((diff > 1e-9).sum()), int((diff < -1e-9).sum()),
                                                     int((abs(diff) <= 1e-9).sum())]  # fmt: skip
    s["bon_note"] = "gold of best-of-n on the report prompts: mean, sd over proxy seeds, each seed"
    return s


def report(s: dict[str, Any]) -> str:
    def f(v) -> str:
        return f"{v[0]:.3f} ± {v[1]:.3f} ({', '.join(f'{x:.3f}' for x in v[2:])})"

    lines = [f"proxy seeds {s['seeds']}; gold lambda {s['gold_lambda']:.3g}; kappa {s['kappa']}; "
             f"held-out pair accuracy {f(s['heldout_pair_accuracy'])}", "",
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
