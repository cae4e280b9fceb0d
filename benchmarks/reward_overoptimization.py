"""Reward over-optimisation under best-of-n (Gao et al. 2022), with a K = 4 BT ensemble as the anchor (Coste et al.
2024), on `builtin:synthetic` extended with candidates that hold content never seen in training.

    python benchmarks/reward_overoptimization.py      # 3 seeds, ~3 min: the numbers in docs/reward_overoptimization.md
    python benchmarks/reward_overoptimization.py --seeds 0 --pairs 1000 --out saves/rmo_quick

Per seed: reward models are trained on `builtin:synthetic` pairs (responses = 4-6 of 40 known words):
BT, Disco, both with the epistemic term (`epistemic: token_novelty`: training the BT or Disco model is the same
run, bit for bit; the term is fitted after training), and three more BT models with other seeds, which with the BT
model make the K = 4 ensemble (same base, different init and data order). Then, for each prompt of a held-out set,
a pool of `--pool` candidates is drawn; ~30% of them carry one *trap word* whose gold value is -1 (the worst):

* kind `unseen-pieces`: words with subword pieces that never occur in a training response (`zorbex`);
* kind `seen-pieces`: new words made of seen pieces (`brightcalm` = ` bright` `c` `alm`).

The gold reward is the mean value of a candidate's words (synthetic's hidden word values; -1 for a trap word).
Best-of-n for N = 1..pool is computed exactly from the pool with the unbiased order-statistics estimator, for each
selector; KL(best-of-n || base) = log N - (N - 1) / N. Calibration (NLL, ECE; BT with a temperature fitted on one
half of held-out pairs, tested on the other) and selective prediction (accuracy on the most confident half; area
under the risk-coverage curve) are measured on held-out synthetic pairs and on pairs of pool candidates (gold
labels), where unseen content occurs.

Writes `summary.json`, `report.md` and `overoptimization.png` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from typing import Any

import numpy as np
import torch
from rmo_rare import RARE_WORDS, novelty_checker, rare_pair_rows, rare_pool, rare_windows, write_rows

from discoalign.cli.demo.rm import RM_DEMO_CONFIG
from discoalign.config.loader import build_config
from discoalign.data.encode import tokenize_pair
from discoalign.data.synthetic import NOUNS, TOPICS, VOCABULARY, WORD_VALUES, synthetic_pair_rows
from discoalign.eval.calibration import expected_calibration_error
from discoalign.eval.score import encode_prompt_response, load_reward_model_for_scoring, score_token_pairs
from discoalign.train.tuner import run_exp

TRAP_VALUE = -1.0
TRAP_FRACTION = 0.3
KINDS = ("unseen-pieces", "seen-pieces", "rare-items")
ENSEMBLE_K = 4
KAPPA_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # risk aversion, chosen per selector on the dev seeds
REPORT_N = 256  # the N kappa is chosen at and the acceptance bar is read at


# ---- candidates ------------------------------------------------------------------------------------------


def training_pieces(tokenizer, rows: list[dict[str, Any]]) -> set[int]:
    pieces: set[int] = set()
    for row in rows:
        _, chosen, rejected = tokenize_pair(tokenizer, row)
        pieces |= set(chosen) | set(rejected)
    return pieces


def trap_words(tokenizer, seen: set[int], kind: str, count: int = 12, seed: int = 1234) -> list[str]:
    """`count` trap words of one kind (the same for every benchmark seed)."""
    rng = random.Random(seed)
    words: list[str] = []

    def forms(word: str) -> list[list[int]]:  # first word of a response, and after a space
        return [tokenizer(word)["input_ids"], tokenizer(" " + word)["input_ids"]]

    tries = 0
    while len(words) < count and tries < 200000:
        tries += 1
        if kind == "unseen-pieces":
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(5, 7)))
            ok = all(any(t not in seen for t in ids) for ids in forms(word))
        else:
            a, b = rng.sample(VOCABULARY, 2)
            word = a + b[rng.randint(0, 1) :]
            ok = all(all(t in seen for t in ids) for ids in forms(word))
        if ok and word not in VOCABULARY and word not in words:
            words.append(word)
    return words


def gold_reward(words: list[str], traps: set[str]) -> float:
    return float(np.mean([TRAP_VALUE if w in traps else WORD_VALUES[w] for w in words]))


def candidate_pool(rng: random.Random, traps: list[str], size: int) -> list[tuple[str, float, bool]]:
    """(text, gold, holds a trap) for `size` candidates."""
    out = []
    trap_set = set(traps)
    for _ in range(size):
        words = rng.sample(VOCABULARY, rng.choice((4, 5, 6)))
        has_trap = rng.random() < TRAP_FRACTION
        if has_trap:
            words[rng.randrange(len(words))] = rng.choice(traps)
        out.append((" ".join(words), gold_reward(words, trap_set), has_trap))
    return out


# ---- best-of-n -------------------------------------------------------------------------------------------


def bon_weights(pool: int, n: int) -> np.ndarray:
    """w_i = C(i-1, n-1) / C(pool, n), i = 1..pool in ascending score order: P(rank-i candidate is the best of a
    uniformly random n-subset)."""
    i = np.arange(1, pool + 1)
    log_w = np.full(pool, -np.inf)
    ok = i >= n
    lg = math.lgamma
    log_c = np.array([lg(k) - lg(n) - lg(k - n + 1) if k >= n else -np.inf for k in i])  # log C(i-1, n-1)
    log_w[ok] = log_c[ok] - (lg(pool + 1) - lg(n + 1) - lg(pool - n + 1))
    return np.exp(log_w)


def bon_curve(scores: np.ndarray, gold: np.ndarray, ns: list[int]) -> np.ndarray:
    """(P, M) selector scores and gold rewards -> mean over prompts of E[gold of best-of-n], one per n."""
    out = []
    for n in ns:
        w = bon_weights(scores.shape[1], n)
        vals = []
        for s, g in zip(scores, gold):
            order = np.argsort(s, kind="stable")
            vals.append(float((w * g[order]).sum()))
        out.append(float(np.mean(vals)))
    return np.array(out)


# ---- pair metrics ----------------------------------------------------------------------------------------


def pair_probability(d: np.ndarray, var: np.ndarray | None, disco: bool, temperature: float = 1.0) -> np.ndarray:
    """P(first > second): probit with total variance for Disco; logistic for BT, widened by an epistemic
    variance with MacKay's approximation sigmoid(d / sqrt(1 + pi v / 8))."""
    if disco:
        return torch.special.ndtr(torch.as_tensor(d / np.sqrt(var), dtype=torch.float64)).numpy()
    v = 0.0 if var is None else var
    return 1.0 / (1.0 + np.exp(-d / temperature / np.sqrt(1.0 + math.pi * v / 8.0)))


def fit_temperature(d: np.ndarray, y: np.ndarray) -> float:
    """Temperature minimising the logistic NLL of labels y (1: first wins) on a grid (log-spaced)."""

    def log_expit(x: np.ndarray) -> np.ndarray:
        return -np.logaddexp(0.0, -x)

    grid = np.exp(np.linspace(math.log(0.05), math.log(20.0), 400))
    nll = [-(y * log_expit(d / t) + (1 - y) * log_expit(-d / t)).mean() for t in grid]
    return float(grid[int(np.argmin(nll))])


def pair_metrics(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """NLL, ECE, accuracy, accuracy on the most confident half and AURC of P(first wins) against labels y."""
    eps = 1e-7
    pc = np.clip(p, eps, 1 - eps)
    nll = float(-(y * np.log(pc) + (1 - y) * np.log(1 - pc)).mean())
    correct = ((p > 0.5) == (y > 0.5)).astype(float)
    confidence = np.abs(p - 0.5)
    order = np.argsort(-confidence, kind="stable")
    risks = 1.0 - np.cumsum(correct[order]) / np.arange(1, len(p) + 1)
    half = order[: len(p) // 2]
    return {
        "nll": nll,
        "ece": float(expected_calibration_error(p_correct(p, y), num_bins=10)),
        "accuracy": float(correct.mean()),
        "accuracy_confident_half": float(correct[half].mean()),
        "aurc": float(risks.mean()),
    }


def p_correct(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The model's probability of the observed label (what `expected_calibration_error` bins)."""
    return np.where(y > 0.5, p, 1 - p)


# ---- one seed --------------------------------------------------------------------------------------------

# Reward models per seed: name -> (Disco, epistemic kind). A model with another epistemic kind is the same run bit
# for bit (the term is fitted after training), so each estimator is read off its own copy.
MODELS = {"bt": (False, "token_novelty"), "bt_laplace": (False, "laplace"),
          "disco": (True, "token_novelty"), "disco_laplace": (True, "laplace")}  # fmt: skip


def train_rm(out: str, seed: int, data_seed: int, ns: argparse.Namespace, disco: bool, epistemic: str) -> float:
    raw = dict(RM_DEMO_CONFIG, output_dir=out, seed=seed, synthetic_seed=data_seed, synthetic_num_pairs=ns.pairs,
               num_train_epochs=ns.epochs, do_eval=False, eval_strategy="no", eval_dataset=None, plot_loss=False,
               logging_steps=1000, disable_tqdm=True, report_to="none", epistemic=epistemic,
               dataset=f"builtin:synthetic,{ns.rare_file}")  # fmt: skip
    if disco:
        raw.update(add_disco_head=True, disco_pref=True)
    if os.path.isdir(out):
        shutil.rmtree(out)
    t0 = time.time()
    run_exp(build_config(raw, source="reward_overoptimization.py"))
    return time.time() - t0


def score_all(path: str, items: list[tuple[list[int], list[int]]], disco: bool) -> dict[str, np.ndarray]:
    model, tok = load_reward_model_for_scoring(path, disco)
    lines = score_token_pairs(model, items, tok.pad_token_id or 0, batch_size=256)
    keys = ("mean", "aleatoric_variance", "epistemic_variance")
    return {k: np.array([l[k] for l in lines]) for k in keys if k in lines[0]}


def train_all(root: str, seed: int, ns: argparse.Namespace) -> tuple[dict[str, str], list[str], dict[str, float]]:
    paths = {name: os.path.join(root, name) for name in MODELS}
    costs = {name: train_rm(paths[name], seed, seed, ns, *spec) for name, spec in MODELS.items()}
    members = [paths["bt"]]
    costs["ensemble"] = costs["bt"]
    for k in range(1, ns.ensemble_k):
        path = os.path.join(root, f"bt_member{k}")
        costs["ensemble"] += train_rm(path, seed + 100 * k, seed, ns, False, "none")
        members.append(path)
    return paths, members, costs


def selectors(scored: dict[str, dict[str, np.ndarray]], member_means: list[np.ndarray]):
    """Plain selectors (name -> scores) and risk-averse ones (name -> (mean, sigma)); the ensemble's members are
    standardised over the texts (Coste et al. 2024)."""
    z = np.stack([(m - m.mean()) / m.std() for m in member_means])
    bt, btl, dc, dcl = (scored[k] for k in MODELS)
    plain = {"BT mean": bt["mean"], "Disco mean": dc["mean"]}
    risk = {
        "BT + token_novelty": (bt["mean"], np.sqrt(bt["epistemic_variance"])),
        "BT + laplace": (btl["mean"], np.sqrt(btl["epistemic_variance"])),
        "Disco aleatoric": (dc["mean"], np.sqrt(dc["aleatoric_variance"])),
        "Disco + token_novelty (total)": (dc["mean"], np.sqrt(dc["aleatoric_variance"] + dc["epistemic_variance"])),
        "Disco + laplace (total)": (dcl["mean"], np.sqrt(dcl["aleatoric_variance"] + dcl["epistemic_variance"])),
    }
    if len(member_means) > 1:
        plain[f"ensemble K={len(member_means)} mean"] = z.mean(0)
        risk[f"ensemble K={len(member_means)}"] = (z.mean(0), z.std(0))
    return plain, risk


def build_texts(seed: int, ns: argparse.Namespace, tokenizer):
    """Every (prompt, response) to score: a pool per kind and prompt, then held-out pairs; and each kind's pools."""
    train_rows = synthetic_pair_rows(ns.pairs, seed)
    rare_rows = rare_pair_rows(seed)
    seen = training_pieces(tokenizer, train_rows + rare_rows)
    checker = novelty_checker(tokenizer, train_rows + rare_rows)
    windows = rare_windows(rare_rows)
    rng = random.Random(10_000 + seed)
    prompts = [[{"role": "user", "content": f"Topic: {rng.choice(TOPICS)}. Describe a {rng.choice(NOUNS)}."}]
               for _ in range(ns.prompts)]  # fmt: skip
    texts: list[tuple[list[dict[str, str]], str]] = []
    pools = {}
    for kind in KINDS:
        traps = list(RARE_WORDS) if kind == "rare-items" else trap_words(tokenizer, seen, kind)
        pools[kind] = {"traps": traps, "gold": [], "trap": [], "start": len(texts)}
        for prompt in prompts:
            if kind == "rare-items":
                pool = rare_pool(rng, prompt, windows, checker, tokenizer, ns.pool, TRAP_FRACTION)
            else:
                pool = candidate_pool(rng, traps, ns.pool)
            pools[kind]["gold"].append([g for _, g, _ in pool])
            pools[kind]["trap"].append([t for _, _, t in pool])
            texts += [(prompt, text) for text, _, _ in pool]
    eval_start = len(texts)
    for row in synthetic_pair_rows(ns.eval_pairs, seed + 1000):
        texts += [(row["prompt"], row["chosen"][0]["content"]), (row["prompt"], row["rejected"][0]["content"])]
    return texts, pools, eval_start


def kind_result(pool, ns, ns_list, scored, plain, risk, seed: int) -> dict[str, Any]:
    """Best-of-n curves (and trap picks at the largest N) of every selector on one kind's pools; sigma on trap and
    other candidates; pair metrics on pairs of candidates (gold labels)."""
    start = pool["start"]
    sl = slice(start, start + ns.prompts * ns.pool)
    gold = np.array(pool["gold"])
    trap = np.array(pool["trap"])

    def curve(values: np.ndarray) -> tuple[list[float], float]:
        s = values[sl].reshape(ns.prompts, ns.pool)
        return bon_curve(s, gold, ns_list).tolist(), float(trap[np.arange(ns.prompts), s.argmax(1)].mean())

    kr: dict[str, Any] = {"traps": pool["traps"], "best_possible": float(gold.max(1).mean()),
                          "curves": {}, "trap_picks": {}, "risk_curves": {}, "risk_trap_picks": {}}  # fmt: skip
    for name, values in plain.items():
        kr["curves"][name], kr["trap_picks"][name] = curve(values)
    for name, (mean, sigma) in risk.items():
        runs = {f"{k:g}": curve(mean - k * sigma) for k in KAPPA_GRID}
        kr["risk_curves"][name] = {k: v[0] for k, v in runs.items()}
        kr["risk_trap_picks"][name] = {k: v[1] for k, v in runs.items()}
    flat = trap.reshape(-1)
    kr["sigma_trap_vs_rest"] = {name: [float(sig[sl][flat].mean()), float(sig[sl][~flat].mean())]
                                for name, (_, sig) in risk.items()}  # fmt: skip
    bt = scored["bt"]["mean"][sl]
    kr["mean_trap_vs_rest"] = {"BT": [float(bt[flat].mean()), float(bt[~flat].mean())]}
    prng = np.random.default_rng(seed)
    a, b = prng.integers(sl.start, sl.stop, size=(2, ns.eval_pairs))
    g = gold.reshape(-1)
    keep = g[a - start] != g[b - start]
    a, b = a[keep], b[keep]
    kr["pairs"] = pair_table(scored, a, b, (g[a - start] > g[b - start]).astype(float))
    return kr


def run_seed(seed: int, ns: argparse.Namespace, tokenizer) -> dict[str, Any]:
    root = os.path.join(ns.out, f"seed{seed}")
    saved = os.path.join(ns.out, f"seed{seed}.json")  # a finished seed is read back (rerun: delete it)
    if os.path.exists(saved):
        return json.load(open(saved))
    result = measure_seed(seed, ns, tokenizer, root)
    with open(saved, "w") as f:
        json.dump(result, f)
    return result


def measure_seed(seed: int, ns: argparse.Namespace, tokenizer, root: str) -> dict[str, Any]:
    ns.rare_file = os.path.join(ns.out, f"rare_pairs_seed{seed}.jsonl")
    write_rows(rare_pair_rows(seed), ns.rare_file)
    paths, members, costs = train_all(root, seed, ns)
    texts, pools, eval_start = build_texts(seed, ns, tokenizer)
    items = [encode_prompt_response(tokenizer, p, [{"role": "assistant", "content": t}], 64) for p, t in texts]
    t0 = time.time()
    scored = {name: score_all(paths[name], items, MODELS[name][0]) for name in MODELS}
    member_means = [scored["bt"]["mean"]] + [score_all(p, items, False)["mean"] for p in members[1:]]
    score_time = time.time() - t0
    plain, risk = selectors(scored, member_means)
    ns_list = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if n <= ns.pool]
    laplace = {k: json.load(open(os.path.join(paths[k], "heads_config.json")))["epistemic"]
               for k in ("bt_laplace", "disco_laplace")}  # fmt: skip
    result: dict[str, Any] = {"seed": seed, "costs_s": costs, "score_time_s": score_time, "n": ns_list, "kinds": {},
                              "laplace": laplace}  # fmt: skip
    for kind in KINDS:
        result["kinds"][kind] = kind_result(pools[kind], ns, ns_list, scored, plain, risk, seed)
    a = np.arange(eval_start, len(texts), 2)
    result["heldout_pairs"] = pair_table(scored, a, a + 1, np.ones(len(a)))  # observed labels: chosen wins
    return result


def pair_table(scored, a, b, y) -> dict[str, dict[str, float]]:
    """Pair metrics for BT, BT + temperature (fitted on the first half, all rows tested on the second), Disco,
    and the models with an epistemic term."""
    half = len(a) // 2
    fit, test = slice(0, half), slice(half, None)
    bt, btl, dc, dcl = (scored[k] for k in MODELS)
    d_bt = bt["mean"][a] - bt["mean"][b]
    d_dc = dc["mean"][a] - dc["mean"][b]
    v_nov = bt["epistemic_variance"][a] + bt["epistemic_variance"][b]
    v_lap = btl["epistemic_variance"][a] + btl["epistemic_variance"][b]
    v_dc = dc["aleatoric_variance"][a] + dc["aleatoric_variance"][b]
    temperature = fit_temperature(d_bt[fit], y[fit])
    rows = {
        "BT": pair_probability(d_bt, None, False),
        "BT + temperature": pair_probability(d_bt, None, False, temperature),
        "Disco": pair_probability(d_dc, v_dc, True),
        "BT + novelty": pair_probability(d_bt, v_nov, False),
        "BT + laplace": pair_probability(d_bt, v_lap, False),
        "Disco + novelty": pair_probability(d_dc, v_dc + dc["epistemic_variance"][a] + dc["epistemic_variance"][b],
                                            True),
        "Disco + laplace": pair_probability(d_dc, v_dc + dcl["epistemic_variance"][a] + dcl["epistemic_variance"][b],
                                            True),
    }  # fmt: skip
    return {name: pair_metrics(p[test], y[test]) for name, p in rows.items()} | {"_temperature": {"T": temperature}}


# ---- report ----------------------------------------------------------------------------------------------


def at_n(ns_list: list[int]) -> int:
    return ns_list.index(REPORT_N) if REPORT_N in ns_list else len(ns_list) - 1


def choose_kappas(dev: list[dict[str, Any]]) -> dict[str, str]:
    """Per risk-averse selector, the kappa of the grid with the best mean gold at N = REPORT_N over the dev seeds
    and all kinds (one kappa for every kind: the kind of shift is not known in advance)."""
    i = at_n(dev[0]["n"])
    names = dev[0]["kinds"][KINDS[0]]["risk_curves"]
    score = {name: {k: np.mean([r["kinds"][kind]["risk_curves"][name][k][i] for r in dev for kind in KINDS])
                    for k in names[name]} for name in names}  # fmt: skip
    return {name: max(vals, key=vals.get) for name, vals in score.items()}


def summarise(results: list[dict[str, Any]], dev: list[dict[str, Any]], out: str) -> dict[str, Any]:
    ns_list = results[0]["n"]
    kappas = choose_kappas(dev)
    summary: dict[str, Any] = {"n": ns_list, "kl": [math.log(n) - (n - 1) / n for n in ns_list],
                               "seeds": [r["seed"] for r in results], "dev_seeds": [r["seed"] for r in dev],
                               "kappa": {k: float(v) for k, v in kappas.items()}, "kinds": {}}  # fmt: skip
    summary["train_cost_s"] = {k: float(np.mean([r["costs_s"][k] for r in results])) for k in results[0]["costs_s"]}
    summary["laplace_prior_precision"] = {
        k: [r["laplace"][k]["prior_precision"] for r in results] for k in results[0]["laplace"]
    }
    i = at_n(ns_list)
    for kind in KINDS:
        rs = [r["kinds"][kind] for r in results]
        curves = {name: np.array([r["curves"][name] for r in rs]) for name in rs[0]["curves"]}
        picks = {name: float(np.mean([r["trap_picks"][name] for r in rs])) for name in rs[0]["curves"]}
        for name, k in kappas.items():
            label = f"{name}: mean - {float(k):g} sigma"
            curves[label] = np.array([r["risk_curves"][name][k] for r in rs])
            picks[label] = float(np.mean([r["risk_trap_picks"][name][k] for r in rs]))
        bt = curves["BT mean"][:, i].mean()
        summary["kinds"][kind] = {
            "traps": rs[0]["traps"],
            "best_possible": float(np.mean([r["best_possible"] for r in rs])),
            "mean": {k: v.mean(0).tolist() for k, v in curves.items()},
            "std": {k: v.std(0).tolist() for k, v in curves.items()},
            "per_seed": {k: v.tolist() for k, v in curves.items()},
            "gain_over_bt_mean_at_report_n": {k: float(v[:, i].mean() - bt) for k, v in curves.items()},
            "trap_pick_rate_at_max_n": picks,
            "sigma_trap_vs_rest": {
                k: np.mean([r["sigma_trap_vs_rest"][k] for r in rs], 0).tolist() for k in rs[0]["sigma_trap_vs_rest"]
            },  # fmt: skip
            "mean_trap_vs_rest": {
                k: np.mean([r["mean_trap_vs_rest"][k] for r in rs], 0).tolist() for k in rs[0]["mean_trap_vs_rest"]
            },  # fmt: skip
            "pairs": average_tables([r["pairs"] for r in rs]),
        }
    summary["heldout_pairs"] = average_tables([r["heldout_pairs"] for r in results])
    plot(summary, os.path.join(out, "overoptimization.png"))
    return summary


def average_tables(tables: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {name: {k: float(np.mean([t[name][k] for t in tables])) for k in tables[0][name]} for name in tables[0]}


def plot(summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KINDS), figsize=(17, 5.6), sharey=True)
    for ax, kind in zip(axes, KINDS):
        data = summary["kinds"][kind]
        for name, mean in data["mean"].items():
            std = np.array(data["std"][name])
            ax.plot(summary["kl"], mean, marker="o", markersize=3, label=name)
            ax.fill_between(summary["kl"], np.array(mean) - std, np.array(mean) + std, alpha=0.1)
        ax.axhline(data["best_possible"], color="gray", linestyle=":", label="best in pool")
        ax.set_title(f"traps: {kind}")
        ax.set_xlabel("KL(best-of-n || base) = log N - (N-1)/N")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gold reward of best-of-n")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(summary: dict[str, Any]) -> str:
    ns_list = summary["n"]
    show = sorted({i for i, n in enumerate(ns_list) if n in (1, 16, 64, 256)} | {len(ns_list) - 1})
    i = at_n(ns_list)
    lines = [f"report seeds {summary['seeds']}; kappa chosen on dev seeds {summary['dev_seeds']}: "
             + ", ".join(f"{k} {v:g}" for k, v in summary["kappa"].items()),
             "training cost (s, mean per seed): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                              summary["train_cost_s"].items()),
             "laplace prior precision (evidence) per seed: " + "; ".join(
                 f"{k} {', '.join(f'{x:.3g}' for x in v)}" for k, v in summary["laplace_prior_precision"].items()),
             ""]  # fmt: skip
    for kind, data in summary["kinds"].items():
        lines += [f"### {kind} (traps: {', '.join(data['traps'][:6])}; best in pool {data['best_possible']:.3f})",
                  "", "| selector | " + " | ".join(f"N={ns_list[j]}" for j in show)
                  + f" | N={ns_list[i]} per seed | gain over BT mean | trap picks at max N |",
                  "|---|" + "---|" * (len(show) + 3)]  # fmt: skip
        for name, mean in data["mean"].items():
            std = data["std"][name]
            cells = " | ".join(f"{mean[j]:.3f} ± {std[j]:.3f}" for j in show)
            seeds = ", ".join(f"{c[i]:.3f}" for c in data["per_seed"][name])
            gain = data["gain_over_bt_mean_at_report_n"][name]
            lines.append(f"| {name} | {cells} | {seeds} | {gain:+.3f} | {data['trap_pick_rate_at_max_n'][name]:.2f} |")
        sig = data["sigma_trap_vs_rest"]
        lines += ["", "sigma on trap / other candidates: " + "; ".join(f"{k} {v[0]:.3f} / {v[1]:.3f}"
                                                                       for k, v in sig.items()),
                  "BT mean on trap / other: " + "; ".join(f"{v[0]:.3f} / {v[1]:.3f}"
                                                         for v in data["mean_trap_vs_rest"].values()), ""]  # fmt: skip
        lines += table(f"candidate pairs ({kind}, gold labels)", data["pairs"])
    lines += table("held-out synthetic pairs (observed labels)", summary["heldout_pairs"])
    return "\n".join(lines)


def table(title: str, rows: dict[str, dict[str, float]]) -> list[str]:
    out = [
        f"{title}:",
        "",
        "| model | NLL | ECE | accuracy | acc. confident half | AURC |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        if name.startswith("_"):
            continue
        out.append(f"| {name} | {m['nll']:.3f} | {m['ece']:.3f} | {m['accuracy']:.3f} | "
                   f"{m['accuracy_confident_half']:.3f} | {m['aurc']:.3f} |")  # fmt: skip
    return out + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated report seeds")
    parser.add_argument("--dev-seeds", default="10,11", help="comma-separated seeds kappa is chosen on")
    parser.add_argument("--pairs", type=int, default=2000, help="training pairs per reward model")
    parser.add_argument("--epochs", type=float, default=2.0, help="epochs per reward model")
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts, one candidate pool each")
    parser.add_argument("--pool", type=int, default=512, help="candidates per prompt and kind (N goes up to it)")
    parser.add_argument("--eval-pairs", type=int, default=1000, help="held-out pairs for calibration")
    parser.add_argument("--out", default="saves/reward_overoptimization", help="output folder")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--ensemble-k", type=int, default=ENSEMBLE_K, help="BT ensemble size (1: no ensemble)")
    parser.add_argument("--real", action="store_true", help="the real-model mode (benchmarks/rmo_real.py)")
    ns, rest = parser.parse_known_args()
    if ns.real:
        from rmo_real import main as real_main

        return real_main(rest, ns)
    torch.set_num_threads(ns.threads)
    os.makedirs(ns.out, exist_ok=True)
    from discoalign.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    t0 = time.time()
    dev = [run_seed(int(s), ns, tokenizer) for s in ns.dev_seeds.split(",")]
    results = [run_seed(int(s), ns, tokenizer) for s in ns.seeds.split(",")]
    summary = summarise(results, dev, ns.out)
    summary["wall_s"] = time.time() - t0
    summary["args"] = {k: v for k, v in vars(ns).items() if k != "rare_file"}
    with open(os.path.join(ns.out, "summary.json"), "w") as f:
        json.dump({"summary": summary, "per_seed": results, "dev_seeds": dev}, f, indent=1)
    text = report(summary)
    with open(os.path.join(ns.out, "report.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"\nwall time {summary['wall_s']:.0f} s; wrote {ns.out}/summary.json, report.md, overoptimization.png")


if __name__ == "__main__":
    main()
