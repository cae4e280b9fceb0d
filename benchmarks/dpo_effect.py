"""Effect of the DPO grid on `builtin:synthetic`: each cell's true-preference accuracy on held-out pairs versus
the starting policy, and how beta and variance spread over noisy versus clean topics.

    python benchmarks/dpo_effect.py                   # 300 steps per cell on 4800 pairs (the numbers in docs/dpo.md)
    python benchmarks/dpo_effect.py --steps 64 --pairs 1024 --out saves/dpo_effect_short

Every cell trains the same number of steps from the same starting policy (builtin:tiny-qwen3), same seed and
same data; eval pairs are generated with `synthetic_seed + 1`. The topics' label-noise levels are 0.0 (science,
"clean") to 0.5 ("noisy" = every topic with noise > 0).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from discoalign.config.loader import build_config
from discoalign.eval.report import print_table
from discoalign.train.dpo.demo import GRID, grid_config
from discoalign.train.dpo.workflow import run_dpo


def fmt(metrics: dict, key: str, digits: int = 3) -> str:
    value = metrics.get(key)
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per grid cell")
    parser.add_argument(
        "--pairs", type=int, default=4800, help="pairs generated for training and, with the next seed, for eval"
    )
    parser.add_argument("--out", default="saves/dpo_effect", help="output root")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    common = {"max_steps": ns.steps, "synthetic_num_pairs": ns.pairs, "logging_steps": max(1, ns.steps // 10),
              "plot_loss": True}  # fmt: skip

    start_cfg = build_config(grid_config(os.path.join(ns.out, "start"), False, False, do_train=False, **common))
    start = run_dpo(start_cfg)["eval"]
    rows = [
        {
            "cell": "starting policy",
            "true-pref acc. (implicit d)": "0.500",
            "true-pref acc. (log pi)": fmt(start, "eval_true_pref_logp_accuracy"),
            "reward acc.": "- (d = 0)",
            "beta clean / noisy": "-",
            "beta~noise": "-",
            "var clean / noisy": "-",
            "var~noise": "-",
            "time (s)": "-",
        }
    ]
    for name, disco, dynamic in GRID:
        t0 = time.time()
        out = os.path.join(ns.out, name.lower().replace(" + ", "_").replace(" ", "_").replace("-", "_"))
        m = run_dpo(build_config(grid_config(out, disco, dynamic, **common)))["eval"]
        rows.append(
            {
                "cell": name,
                "true-pref acc. (implicit d)": fmt(m, "eval_true_pref_accuracy"),
                "true-pref acc. (log pi)": fmt(m, "eval_true_pref_logp_accuracy"),
                "reward acc.": fmt(m, "eval_implicit_accuracy"),
                "beta clean / noisy": (
                    f"{fmt(m, 'eval_beta_clean', 4)} / {fmt(m, 'eval_beta_noisy', 4)}" if dynamic else "0.1"
                ),
                "beta~noise": fmt(m, "eval_beta_noise_spearman") if dynamic else "-",
                "var clean / noisy": (
                    f"{fmt(m, 'eval_variance_clean')} / {fmt(m, 'eval_variance_noisy')}" if disco else "-"
                ),
                "var~noise": fmt(m, "eval_variance_noise_spearman") if disco else "-",
                "time (s)": f"{time.time() - t0:.0f}",
            }
        )
    print_table(f"DPO grid on builtin:synthetic, {ns.steps} steps per cell, held-out pairs", rows)


if __name__ == "__main__":
    main()
