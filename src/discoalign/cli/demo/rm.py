"""The reward-model part of `discoalign demo`: BT and Disco reward models on builtin:synthetic, one row of held-out
metrics each. `RM_DEMO_CONFIG` is the one reward-model preset: the demo, `examples/rm_*.yaml`, the effect test, the
over-optimisation benchmark and the PPO demo's reward models (`cli/demo/ppo.py`, shorter and without eval)."""

from __future__ import annotations

import os
import time
from typing import Any

from ...train.tuner import run_exp
from ..run_config import command_config

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
    rows = []
    for name, disco in (("BT", False), ("Disco", True)):
        start = time.time()
        out = os.path.join(output_root, f"rm_{name.lower()}")
        metrics = run_exp(command_config("train", rm_config(out, disco, **overrides), f"the demo's {name} config"))[
            "eval"
        ]
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
