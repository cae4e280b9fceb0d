"""The PPO part of `discoalign demo`: reward models trained on builtin:synthetic, a tiny policy warmed up by
`stage: sft`, and PPO against a BT reward model and against a Disco reward model with `disco_risk_coef` 0 and > 0.

Each row reports the policy's mean *true* reward on held-out synthetic prompts before and after PPO (the task's
hidden reward, which neither the policy nor the reward model sees), the KL to the reference, and the reward
model's mean (and variance) of the final policy's responses.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ...train.tuner import run_exp
from ..run_config import command_config
from .rm import rm_config

# The demo's reward models, shortened (about 95 steps on 2 CPU cores) and without evaluation.
PPO_DEMO_RM_CHANGES: dict[str, Any] = {
    "synthetic_num_pairs": 1500,
    "num_train_epochs": 2,
    "warmup_steps": 10,
    "logging_steps": 50,
    "eval_dataset": None,
    "eval_strategy": "no",
    "do_eval": False,
    "disable_tqdm": True,
}

# The policy's warm-up (also `examples/sft.yaml`): a randomly initialised tiny model emits byte noise, which no reward
# model scores meaningfully and which PPO cannot improve within a CPU budget. 60 SFT steps on the *responses* of
# builtin:synthetic pairs, chosen and rejected alike (`sft_responses: both`), teach it the task's format (a handful of
# adjectives, then EOS) without any preference between good and bad words: its mean true reward is near that of a
# random response, so any rise after PPO comes from the reward model.
DEMO_SFT_CONFIG: dict[str, Any] = {
    "stage": "sft",
    "model_name_or_path": "builtin:tiny-qwen3",
    "dataset": "builtin:synthetic",
    "synthetic_num_pairs": 1000,
    "synthetic_seed": 7,
    "sft_responses": "both",
    "cutoff_len": 64,
    "per_device_train_batch_size": 64,  # 32 pairs, both responses
    "max_steps": 60,
    "learning_rate": 3.0e-3,
    "lr_scheduler_type": "constant",
    "logging_steps": 20,
    "save_strategy": "no",
    "plot_loss": False,
    "seed": 7,
    "do_train": True,
    "disable_tqdm": True,
}

# Shared by the demo, `examples/ppo.yaml` and the effect test: 20 PPO steps of 32 prompts.
PPO_DEMO_CONFIG: dict[str, Any] = {
    "stage": "ppo",
    "dataset": "builtin:synthetic",
    "eval_dataset": "builtin:synthetic",  # held out: synthetic_seed + 1
    "synthetic_num_pairs": 1000,
    "max_samples": 128,  # of the eval prompts too, so the eval rollouts stay short (there are 48 distinct prompts)
    "cutoff_len": 64,
    "max_new_tokens": 12,
    "pref_beta": 0.05,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "ppo_buffer_size": 2,
    "ppo_epochs": 2,
    "max_steps": 20,
    "learning_rate": 2.0e-3,
    "logging_steps": 5,
    "save_strategy": "no",
    "seed": 0,
    "do_train": True,
    "do_eval": True,
    "eval_on_start": True,
    "disable_tqdm": True,
    "num_score_samples": 4,
}

RISK_COEF = 1.0


def ensure_reward_model(output_dir: str, disco: bool, **overrides: Any) -> str:
    """Train the demo's BT (or Disco) reward model into `output_dir`, unless a checkpoint is already there."""
    if os.path.isfile(os.path.join(output_dir, "heads.safetensors")):
        return output_dir

    raw = rm_config(output_dir, disco, **{**PPO_DEMO_RM_CHANGES, **overrides})
    run_exp(command_config("train", raw, "the PPO demo's reward-model config"))
    return output_dir


def ensure_warm_policy(output_dir: str) -> str:
    """The warmed-up tiny policy: `stage: sft` with `DEMO_SFT_CONFIG`, trained into `output_dir` unless there."""
    if os.path.isfile(os.path.join(output_dir, "config.json")):
        return output_dir

    raw = dict(DEMO_SFT_CONFIG, output_dir=output_dir, overwrite_output_dir=True)
    run_exp(command_config("train", raw, "the PPO demo's SFT warm-up config"))
    return output_dir


def ppo_demo_config(output_dir: str, policy: str, reward_model: str, **overrides: Any) -> dict[str, Any]:
    """The flat config of one demo PPO run."""
    return dict(PPO_DEMO_CONFIG, output_dir=output_dir, model_name_or_path=policy, reward_model=reward_model,
                overwrite_output_dir=True, **overrides)  # fmt: skip


def _fmt(metrics: dict[str, float], key: str) -> str:
    return f"{metrics[key]:.3f}" if key in metrics else "-"


def run_ppo_demo(output_root: str, rm_root: str | None = None) -> list[dict[str, Any]]:
    """Run PPO against a BT reward model and a Disco one (`disco_risk_coef` 0 and 1); one row per run.

    Reward models are looked up (or trained) as `rm_root/rm_bt` and `rm_root/rm_disco`, so the reward-model
    part of the demo can be reused; `rm_root` defaults to `output_root`.
    """

    rm_root = rm_root or output_root
    start = time.time()
    reward_models = {
        "BT": ensure_reward_model(os.path.join(rm_root, "rm_bt"), disco=False),
        "Disco": ensure_reward_model(os.path.join(rm_root, "rm_disco"), disco=True),
    }
    policy = ensure_warm_policy(os.path.join(output_root, "policy_warmup"))
    setup_time = time.time() - start
    rows = []
    for name, risk in (("BT", 0.0), ("Disco", 0.0), ("Disco", RISK_COEF)):
        start = time.time()
        out = os.path.join(output_root, f"ppo_{name.lower()}_risk{risk:g}")
        raw = ppo_demo_config(out, policy, reward_models[name], disco_risk_coef=risk)
        results = run_exp(command_config("train", raw, f"the PPO demo's {name} config"))
        before, after = results.get("eval_start", {}), results["eval"]
        rows.append({
            "reward model": name,
            "disco_risk_coef": f"{risk:g}",
            "true reward before": _fmt(before, "eval_objective/true_reward"),
            "true reward after": _fmt(after, "eval_objective/true_reward"),
            "KL": _fmt(after, "eval_objective/kl"),
            "RM mean": _fmt(after, "eval_reward/mean"),
            "RM variance": _fmt(after, "eval_reward/variance"),
            "time (s)": f"{time.time() - start + setup_time / 3:.0f}",
        })  # fmt: skip
    return rows
