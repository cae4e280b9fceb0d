"""GRPO, RLOO and Disco-aware GRPO against PPO on `builtin:synthetic`, whose true reward is known.

    python benchmarks/grpo_synthetic.py                                  # tune on dev seed 100, report seeds 0,1,2
    python benchmarks/grpo_synthetic.py --steps 6 --seeds 0 --dev-seeds 100 --out saves/grpo_quick   # smoke

Setup (shared by every run, trained once into `--out`): the PPO demo's reward model (`discoalign demo`'s Disco
reward model on 1,500 synthetic pairs) with the epistemic term (`epistemic: token_novelty`), so its variance is
aleatoric + epistemic, and the demo's SFT-warmed tiny policy (`cli/demo/ppo.py`). Every method then trains from
that policy for `--steps` steps of 32 sampled responses each (PPO: 32 prompts x 1; the GRPO family: 8 prompts x
`num_generations` 4), the same learning rate and KL coefficient (`pref_beta` 0.05), and is evaluated every
`--eval-steps` steps on 256 held-out prompt rows (`synthetic_seed + 1`): the *true* reward of its responses (the task's
hidden word values, which neither policy nor reward model sees), the proxy (the reward model's mean) and the KL to
the reference (k1, summed per response, the same estimator for every method).

Tuning: on the development seeds only, the plain-GRPO baseline and the Disco-aware variant each get the same budget
(`GRPO_GRID`, `DISCO_GRID`: the same 2 learning rates), chosen by the mean true reward over the last two evaluations;
PPO and RLOO run at the demo's settings. The report seeds were not used for any choice.

Each run is a fresh process (peak RSS = `ru_maxrss`, CPU). Writes `runs.jsonl`, `summary.json`, `report.md` and
`true_reward_vs_kl.png` to `--out`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

BASE: dict[str, Any] = {
    "dataset": "builtin:synthetic",
    "eval_dataset": "builtin:synthetic",
    "synthetic_num_pairs": 1000,
    "max_samples": 256,  # of the eval prompts too: 256 responses per evaluation (48 distinct prompts)
    "cutoff_len": 64,
    "max_new_tokens": 12,
    "pref_beta": 0.05,
    "learning_rate": 2.0e-3,
    "per_device_eval_batch_size": 64,
    "logging_steps": 1,
    "save_strategy": "no",
    "do_train": True,
    "do_eval": True,
    "eval_on_start": True,
    "eval_strategy": "steps",
    "disable_tqdm": True,
    "plot_loss": False,
    "num_score_samples": 0,
    "overwrite_output_dir": True,
}
PPO: dict[str, Any] = {"stage": "ppo", "per_device_train_batch_size": 16, "ppo_buffer_size": 2, "ppo_epochs": 2}
GRPO: dict[str, Any] = {
    "stage": "grpo", "per_device_train_batch_size": 32, "num_generations": 4, "num_iterations": 2,
    "grpo_loss_type": "dapo",
}  # fmt: skip
METHODS: dict[str, dict[str, Any]] = {
    "ppo": PPO,
    "grpo": GRPO,
    "rloo": {**GRPO, "advantage_estimator": "rloo"},
    "grpo_disco": GRPO,
}
# The same tuning budget for the baseline and the Disco-aware variant (dev seeds only): the learning rate. The
# shrinkage is not tuned: c = 1 is the posterior mean when the reward model's variance is taken at its word.
GRPO_GRID = [{"learning_rate": 2.0e-3}, {"learning_rate": 4.0e-3}]
DISCO_GRID = [
    {"uncertainty_shrinkage": 1.0, "learning_rate": 2.0e-3},
    {"uncertainty_shrinkage": 1.0, "learning_rate": 4.0e-3},
]


def setup(out: str) -> tuple[str, str]:
    """The demo's Disco reward model (+ epistemic term) and warmed-up policy, trained once."""
    from discoalign.cli.demo.ppo import ensure_reward_model, ensure_warm_policy

    rm = ensure_reward_model(os.path.join(out, "rm_disco_epistemic"), disco=True, epistemic="token_novelty")
    return rm, ensure_warm_policy(os.path.join(out, "policy_warmup"))


def one_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Child process: train one configuration, return its curves, time and peak RSS."""
    import torch

    from discoalign.config.loader import build_config
    from discoalign.train.tuner import run_exp

    torch.set_num_threads(1)
    start = time.time()
    run_exp(build_config(spec["config"]))
    with open(os.path.join(spec["config"]["output_dir"], "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    evals = list({e["step"]: e for e in history if "eval_objective/true_reward" in e}.values())  # final eval once
    curve = [{"step": e["step"], "true": e["eval_objective/true_reward"], "kl": e.get("eval_objective/kl", 0.0),
              "proxy": e.get("eval_reward/mean", float("nan"))} for e in evals]  # fmt: skip
    return {"curve": curve, "seconds": time.time() - start,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def launch(config: dict[str, Any]) -> dict[str, Any]:
    """Run `one_run` in a fresh process (clean peak memory)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps({"config": config})], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def config_for(method: str, extra: dict[str, Any], seed: int, ns, rm: str, policy: str) -> dict[str, Any]:
    tag = hashlib.sha1(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:8]
    out = os.path.join(ns.out, "runs", f"{method}_{seed}_{tag}")
    return {**BASE, **METHODS[method], "model_name_or_path": policy, "reward_model": rm, "max_steps": ns.steps,
            "eval_steps": ns.eval_steps, "seed": seed, "output_dir": out, **extra}  # fmt: skip


def final_true(curve: list[dict[str, float]]) -> float:
    return float(np.mean([p["true"] for p in curve[-2:]]))


def true_at_kl(curve: list[dict[str, float]], kl: float) -> float:
    """True reward at KL `kl`, linearly interpolated along the run's (KL, true reward) path (KL sorted)."""
    points = sorted((p["kl"], p["true"]) for p in curve)
    kls, trues = zip(*points)
    return float(np.interp(kl, kls, trues))


def tune(method: str, grid: list[dict[str, Any]], ns, rm: str, policy: str, log) -> dict[str, Any]:
    scores = []
    for extra in grid:
        results = [launch(config_for(method, extra, seed, ns, rm, policy)) for seed in ns.dev_seeds]
        score = float(np.mean([final_true(r["curve"]) for r in results]))
        log({"phase": "dev", "method": method, "extra": extra, "dev_true": score})
        scores.append(score)
    return grid[int(np.argmax(scores))]


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    methods = sorted({r["method"] for r in runs}, key=list(METHODS).index)
    # Equal KL: the largest KL every report run reached, so no curve is extrapolated.
    common_kl = min(max(p["kl"] for p in r["curve"]) for r in runs)
    summary: dict[str, Any] = {"common_kl": common_kl, "methods": {}}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]

        def stat(values):
            return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                    "per_seed": [round(v, 4) for v in values]}  # fmt: skip

        pair = [r for r in runs if r["method"] in ("grpo", "grpo_disco")]
        pair_kl = min(max(p["kl"] for p in r["curve"]) for r in pair) if pair else common_kl
        summary["grpo_pair_kl"] = pair_kl
        summary["methods"][m] = {
            "true_at_grpo_pair_kl": stat([true_at_kl(r["curve"], pair_kl) for r in rs]),
            "extra": rs[0]["extra"],
            "true_start": stat([r["curve"][0]["true"] for r in rs]),
            "true_final": stat([final_true(r["curve"]) for r in rs]),
            "kl_final": stat([float(np.mean([p["kl"] for p in r["curve"][-2:]])) for r in rs]),
            "true_at_common_kl": stat([true_at_kl(r["curve"], common_kl) for r in rs]),
            "proxy_gain": stat([r["curve"][-1]["proxy"] - r["curve"][0]["proxy"] for r in rs]),
            "true_gain": stat([r["curve"][-1]["true"] - r["curve"][0]["true"] for r in rs]),
            "seconds": stat([r["seconds"] for r in rs]),
            "peak_rss_mib": stat([r["peak_rss_mib"] for r in rs]),
        }
    return summary


def report(summary: dict[str, Any], ns) -> str:
    lines = [f"Report seeds {ns.seeds} (dev seeds {ns.dev_seeds}), {ns.steps} steps of 32 responses; equal-KL point "
             f"KL = {summary['common_kl']:.3f} nats/response (GRPO vs Disco-aware GRPO: {summary['grpo_pair_kl']:.3f}).",
             "",
             "| method | tuned | true reward start | true reward final | KL final | true reward @ equal KL | "
             "true reward @ GRPO-pair KL | proxy gain | true gain | time (s) | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def f(s, digits=3):
        return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f} ({', '.join(f'{v:.{digits}f}' for v in s['per_seed'])})"

    for m, s in summary["methods"].items():
        lines.append(f"| {m} | {json.dumps(s['extra'])} | {f(s['true_start'])} | {f(s['true_final'])} | "
                     f"{f(s['kl_final'])} | {f(s['true_at_common_kl'])} | {f(s['true_at_grpo_pair_kl'])} | {f(s['proxy_gain'])} | {f(s['true_gain'])} | "
                     f"{s['seconds']['mean']:.0f} | {s['peak_rss_mib']['mean']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = dict(zip(METHODS, ("tab:gray", "tab:blue", "tab:green", "tab:red")))
    for r in runs:
        ax.plot([p["kl"] for p in r["curve"]], [p["true"] for p in r["curve"]], "o-", color=colors[r["method"]],
                alpha=0.6, label=r["method"] if r["seed"] == runs[0]["seed"] else None)  # fmt: skip
    ax.set_xlabel("KL to the reference (nats / response)")
    ax.set_ylabel("true reward (held-out prompts)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="report seeds")
    parser.add_argument("--dev-seeds", default="100", help="development seeds (tuning only)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--eval-steps", type=int, default=4)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-tune", action="store_true", help="first grid entry, no dev runs")
    parser.add_argument("--out", default="saves/grpo_synthetic")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.one:
        print(json.dumps(one_run(json.loads(ns.one))))
        return
    ns.seeds = [int(s) for s in ns.seeds.split(",")]
    ns.dev_seeds = [int(s) for s in ns.dev_seeds.split(",")]
    os.makedirs(ns.out, exist_ok=True)
    rm, policy = setup(ns.out)
    log_path = os.path.join(ns.out, "runs.jsonl")

    def log(row):
        print(json.dumps(row), flush=True)
        with open(log_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    grids = {"grpo": GRPO_GRID, "grpo_disco": DISCO_GRID}
    runs = []
    for method in ns.methods.split(","):
        grid = grids.get(method, [{}])
        extra = grid[0] if (ns.no_tune or len(grid) == 1) else tune(method, grid, ns, rm, policy, log)
        for seed in ns.seeds:
            result = launch(config_for(method, extra, seed, ns, rm, policy))
            row = {"phase": "report", "method": method, "extra": extra, "seed": seed, **result}
            log(row)
            runs.append(row)
    summary = summarise(runs)
    with open(os.path.join(ns.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    text = report(summary, ns)
    with open(os.path.join(ns.out, "report.md"), "w") as fh:
        fh.write(text)
    plot(runs, os.path.join(ns.out, "true_reward_vs_kl.png"))
    print(text)


if __name__ == "__main__":
    main()
