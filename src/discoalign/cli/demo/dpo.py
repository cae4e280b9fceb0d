"""The DPO part of `discoalign demo`: the 2x2 grid {disco_pref off/on} x {use_dynamic_beta off/on}, trained
briefly on `builtin:synthetic` with `builtin:tiny-qwen3`, one table row per cell."""

from __future__ import annotations

import math
import os
import time
from typing import Any

from ...train.tuner import run_exp
from ..run_config import command_config

# The demo's short run per cell on 2 CPU cores (the measured comparison is benchmarks/dpo_noise.py).
DPO_DEMO_CONFIG: dict[str, Any] = {
    "stage": "dpo",
    "model_name_or_path": "builtin:tiny-qwen3",
    "dataset": "builtin:synthetic",
    "eval_dataset": "builtin:synthetic",
    "synthetic_num_pairs": 2560,
    "cutoff_len": 64,
    "pref_beta": 0.1,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "max_steps": 160,
    "learning_rate": 1.0e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 4,
    "logging_steps": 16,
    "save_strategy": "no",
    "seed": 42,
    "do_train": True,
    "do_eval": True,
    "disable_tqdm": True,
}

# (cell name, disco_pref, use_dynamic_beta)
GRID: tuple[tuple[str, bool, bool], ...] = (
    ("DPO", False, False),
    ("DiscoDPO", True, False),
    ("dynamic-beta DPO", False, True),
    ("DiscoDPO + dynamic beta", True, True),
)


def grid_config(output_dir: str, disco: bool, dynamic_beta: bool, **overrides: Any) -> dict[str, Any]:
    """The flat config of one grid cell: the heads exist only where the cell uses them."""
    # `make demo` run twice writes into the same folders: the second run replaces the first.
    raw = dict(DPO_DEMO_CONFIG, output_dir=output_dir, overwrite_output_dir=True)
    if disco:
        raw.update(add_disco_head=True, disco_pref=True)
    if dynamic_beta:
        raw.update(add_beta_head=True, use_dynamic_beta=True)
    raw.update(overrides)
    return raw


def _last_train_loss(output_dir: str) -> float:
    import json

    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return losses[-1] if losses else math.nan


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def run_dpo_grid_demo(output_root: str, **overrides: Any) -> list[dict[str, Any]]:
    """Train the four grid cells and return one row each.

    Row keys: cell, final loss (last logged training loss), reward acc. (eval `rewards/accuracies`),
    true-pref acc. (eval pairs where the policy's implicit reward margin agrees with the true reward), mean beta,
    mean variance ("-" where the cell has no such head), time (s).
    """

    rows = []
    for name, disco, dynamic in GRID:
        start = time.time()
        out = os.path.join(output_root, name.lower().replace(" + ", "_").replace(" ", "_").replace("-", "_"))
        cfg = command_config("train", grid_config(out, disco, dynamic, **overrides), f"the demo's {name} config")
        metrics = run_exp(cfg)["eval"]
        rows.append(
            {
                "cell": name,
                "final loss": _fmt(_last_train_loss(out)),
                "reward acc.": _fmt(metrics.get("eval_rewards/accuracies")),
                "true-pref acc.": _fmt(metrics.get("eval_true_pref_accuracy")),
                "mean beta": _fmt(metrics.get("eval_beta_mean", cfg.finetuning.pref_beta)),
                "mean variance": _fmt(metrics.get("eval_variance_mean")),
                "time (s)": f"{time.time() - start:.0f}",
            }
        )
    return rows
