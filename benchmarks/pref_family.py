"""DPO, SimPO, ORPO and KTO on `builtin:synthetic` (docs/dpo.md, docs/kto.md): how well each trained policy orders
held-out pairs by their *true* reward.

    python benchmarks/pref_family.py --json benchmarks/results/pref_family.json \
        --markdown benchmarks/results/pref_family.md               # tune on the dev split, then 3 report seeds

Every method starts from `builtin:tiny-qwen3`, trains one epoch on the same pairs (KTO on the same pairs unpaired:
each pair's chosen response desirable, its rejected one undesirable, as TRL unpairs them), at the same learning
rate grid, with the same tuning budget: three learning rates, chosen on a development split (train data seed
7000, eval 7001) by the method's own score, then reported on seeds 1, 2, 3 (data seeds 1000 s and 1000 s + 1),
which no choice saw. Each keeps its usual `pref_beta` (DPO, ORPO, KTO 0.1; SimPO 2.0 with gamma 0.5): with Adam and
a loss far from saturation, beta scales the gradient but not the update, so a beta grid changes little here (a
first try of beta in {0.05, 0.1, 0.3} for KTO gave identical dev scores), and the learning rate is what moves.

Scores on the held-out pairs (fraction whose sign agrees with the true reward; ties count as wrong):
* `own`: the implicit reward each loss defines: DPO and KTO `log pi - log pi_0` summed over the response (pi_0 the
  starting model, their reference); SimPO and ORPO the length-averaged `log pi` (they have no reference);
* `vs start`: `log pi - log pi_0` summed, for every method (how the policy moved, on one ruler);
* `avg logp`: the policy's length-averaged `log pi` margin, for every method.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import numpy as np
import torch

from discoalign.config.loader import build_config
from discoalign.eval.report import print_table
from discoalign.train.dpo.workflow import build_dpo_trainer
from discoalign.train.tuner import WORKFLOWS

START = "builtin:tiny-qwen3"
TRAIN: dict[str, Any] = {
    "model_name_or_path": START,
    "dataset": "builtin:synthetic",
    "cutoff_len": 64,
    "per_device_train_batch_size": 16,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 10,
    "num_train_epochs": 1,
    "logging_steps": 50,
    "save_strategy": "no",
    "do_train": True,
    "do_eval": False,
    "disable_tqdm": True,
    "plot_loss": False,
    "report_to": "none",
    "overwrite_output_dir": True,
}
# method -> (name, keys)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpo": ("DPO", {"stage": "dpo", "pref_beta": 0.1}),
    "simpo": ("SimPO", {"stage": "dpo", "pref_loss": "simpo", "pref_beta": 2.0, "simpo_gamma": 0.5}),
    "orpo": ("ORPO", {"stage": "dpo", "pref_loss": "orpo", "pref_beta": 0.1}),
    "kto": ("KTO", {"stage": "kto", "pref_beta": 0.1}),
}
LEARNING_RATES = (2.0e-4, 5.0e-4, 1.0e-3)  # every method's tuning budget
DEV_SEED = 7000


def train(method: str, lr: float, seed: int, data_seed: int, ns: argparse.Namespace) -> tuple[str, float]:
    """Train one method; returns (output_dir, wall seconds)."""
    out = os.path.join(ns.out, f"{method}_lr{lr:g}_s{seed}_d{data_seed}")
    keys = {**TRAIN, **METHODS[method][1], "learning_rate": lr, "seed": seed, "synthetic_seed": data_seed,
            "synthetic_num_pairs": ns.pairs, "output_dir": out}  # fmt: skip
    cfg = build_config(keys, source=f"benchmarks/pref_family.py {method} learning_rate={lr:g}")
    start = time.time()
    WORKFLOWS[cfg.finetuning.stage]().run(cfg)
    return out, time.time() - start


def _predict(keys: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    trainer, _ = build_dpo_trainer(build_config(keys, source="benchmarks/pref_family.py (scoring)"))
    out = trainer.predict(trainer.eval_dataset)
    labels = np.asarray(out.label_ids, dtype=np.float64)
    return np.asarray(out.predictions, dtype=np.float64)[:, 0], labels[:, 0] - labels[:, 1]


def score(model_dir: str, data_seed: int, ns: argparse.Namespace) -> dict[str, float]:
    """`vs start` and `avg logp` accuracies of a trained policy on the held-out pairs of `data_seed + 1`."""
    keys = {"stage": "dpo", "model_name_or_path": model_dir, "dataset": "builtin:synthetic",
            "eval_dataset": "builtin:synthetic", "synthetic_seed": data_seed, "synthetic_num_pairs": ns.pairs,
            "cutoff_len": 64, "per_device_eval_batch_size": 128, "do_train": False, "do_eval": True,
            "report_to": "none", "output_dir": os.path.join(model_dir, "score")}  # fmt: skip
    d, truth = _predict({**keys, "ref_model_name_or_path": START})  # summed log-ratio against the start
    avg, _ = _predict({**keys, "pref_loss": "simpo"})  # reference-free: the length-averaged log-prob margin
    return {"vs_start": float((np.sign(d) == np.sign(truth)).mean()),
            "avg_logp": float((np.sign(avg) == np.sign(truth)).mean())}  # fmt: skip


def own(method: str, scores: dict[str, float]) -> float:
    return scores["avg_logp"] if method in ("simpo", "orpo") else scores["vs_start"]


def summarise(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--pairs", type=int, default=1000, help="training pairs (held-out eval: as many)")
    parser.add_argument("--out", default="saves/pref_family")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    results: dict[str, Any] = {}
    for method in ns.methods:
        dev = {}
        for lr in LEARNING_RATES:
            model_dir, _ = train(method, lr, 0, DEV_SEED, ns)
            dev[lr] = score(model_dir, DEV_SEED, ns)
            print(json.dumps({"method": method, "split": "dev", "learning_rate": lr, **dev[lr]}), flush=True)
        best = max(dev, key=lambda lr: own(method, dev[lr]))  # the first of equals: the smallest rate
        runs = []
        for seed in ns.seeds:
            model_dir, wall = train(method, best, seed, 1000 * seed, ns)
            runs.append({"seed": seed, "wall": wall, **score(model_dir, 1000 * seed, ns)})
            print(json.dumps({"method": method, "split": "report", "learning_rate": best, **runs[-1]}), flush=True)
        results[method] = {"dev": {str(lr): s for lr, s in dev.items()}, "learning_rate": best, "runs": runs}

    table = []
    for method, r in results.items():
        runs = r["runs"]
        table.append({
            "method": METHODS[method][0], "learning rate (dev)": f"{r['learning_rate']:g}",
            "own score": summarise([own(method, x) for x in runs]),
            "vs start": summarise([x["vs_start"] for x in runs]), "avg logp": summarise([x["avg_logp"] for x in runs]),
            "per seed (own)": ", ".join(f"{own(method, x):.3f}" for x in runs),
            "time (s)": summarise([x["wall"] for x in runs], 0),
        })  # fmt: skip
    title = f"builtin:synthetic, {ns.pairs} pairs, 1 epoch, report seeds {ns.seeds} (mean ± sd; ties count as wrong)"
    print_table(title, table)
    if ns.json:
        os.makedirs(os.path.dirname(ns.json) or ".", exist_ok=True)
        with open(ns.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(ns), "results": results}, f, indent=1)
    if ns.markdown:
        header = list(table[0])
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(row[k]) for k in header) + " |" for row in table]
        with open(ns.markdown, "w", encoding="utf-8") as f:
            f.write(title + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
