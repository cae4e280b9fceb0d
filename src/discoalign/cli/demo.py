"""`discoalign demo`: the main jobs on the built-in tiny model and built-in data, compared in tables."""

from __future__ import annotations

import os
import time
from typing import Any

from ..config.loader import build_config
from ..eval.report import print_table

# Shared by the demo, `examples/rm_*.yaml` and the effect test: a few hundred steps on 2 CPU cores.
RM_DEMO_CONFIG: dict[str, Any] = {
    "stage": "rm",
    "model_name_or_path": "builtin:tiny-qwen3",
    "dataset": "builtin:synthetic",
    "eval_dataset": "builtin:synthetic",
    "synthetic_num_pairs": 3000,
    "cutoff_len": 64,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "num_train_epochs": 3,
    "learning_rate": 1.0e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 20,
    "logging_steps": 20,
    "eval_strategy": "steps",
    "eval_steps": 70,
    "save_strategy": "no",
    "seed": 42,
    "do_train": True,
    "do_eval": True,
    "num_score_samples": 4,
}


def rm_config(output_dir: str, disco: bool, **overrides: Any) -> dict[str, Any]:
    """The demo's reward-model config, BT or Disco."""
    # `make demo` run twice writes into the same folders: the second run replaces the first.
    raw = dict(RM_DEMO_CONFIG, output_dir=output_dir, overwrite_output_dir=True)
    if disco:
        raw.update(add_disco_head=True, disco_pref=True)
    raw.update(overrides)
    return raw


def run_rm_demo(output_root: str, **overrides: Any) -> list[dict[str, Any]]:
    """Train BT and Disco reward models on builtin:synthetic and return one row of eval metrics each."""
    from ..train.tuner import run_exp

    rows = []
    for name, disco in (("BT", False), ("Disco", True)):
        start = time.time()
        out = os.path.join(output_root, f"rm_{name.lower()}")
        metrics = run_exp(build_config(rm_config(out, disco, **overrides), source=f"the demo's {name} config"))["eval"]
        rows.append(
            {
                "model": name,
                "accuracy": f"{metrics['eval_accuracy']:.3f}",
                "true acc.": f"{metrics['eval_true_accuracy']:.3f}",
                "NLL": f"{metrics['eval_nll']:.3f}",
                "ECE": f"{metrics['eval_ece']:.3f}",
                "Brier": f"{metrics['eval_brier']:.3f}",
                "spread~noise (Spearman)": (
                    f"{metrics['eval_spread_noise_spearman']:.3f}" if "eval_spread_noise_spearman" in metrics else "-"
                ),
                "time (s)": f"{time.time() - start:.0f}",
                "plots": os.path.join(out, "plots"),
            }
        )
    return rows


def run_demo(output_root: str = "saves/demo", parts: str = "rm,dpo,ppo") -> None:
    """Run the requested demo parts and print their tables."""
    wanted = {p.strip() for p in parts.split(",") if p.strip()}
    unknown = wanted - {"rm", "dpo", "ppo"}
    if unknown:
        from ..errors import ConfigError

        raise ConfigError(f"--parts names unknown demo part(s) {sorted(unknown)}; the parts are rm, dpo and ppo.")
    tables: list[tuple[str, list[dict[str, Any]]]] = []
    if "rm" in wanted:
        rows = run_rm_demo(output_root)
        tables.append(("Reward models on held-out builtin:synthetic (BT vs Disco)", rows))
    if "dpo" in wanted:
        from ..train.dpo.demo import run_dpo_grid_demo

        tables.append(("DPO grid on builtin:synthetic", run_dpo_grid_demo(os.path.join(output_root, "dpo"))))
    if "ppo" in wanted:
        from ..train.ppo.demo import run_ppo_demo

        tables.append(("PPO against BT and Disco reward models", run_ppo_demo(os.path.join(output_root, "ppo"))))
    for title, rows in tables:
        print_table(title, rows)
    print(f"\nRuns, metrics, predictions and plots are under {os.path.abspath(output_root)}/")
