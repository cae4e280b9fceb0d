"""Stage `ppo` end to end: load policy (+ value head), reference, reward model and prompts; train; evaluate;
save the checkpoint, metrics, samples and plots."""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import torch
from transformers import TrainerCallback

from ...config.loader import RunConfig
from ...data import get_dataset
from ...data.sources import BUILTIN_SYNTHETIC, split_specs
from ...models.loader import load_model_with_heads
from ...models.reward_model import load_reward_model
from .metric import synthetic_true_reward
from .trainer import PPOTrainer

logger = logging.getLogger(__name__)

PLOTS = (
    ("reward.png", "reward", ["objective/scores", "objective/true_reward", "eval_objective/scores",
                              "eval_objective/true_reward"]),
    ("kl.png", "KL to the reference (per response)", ["objective/kl", "eval_objective/kl"]),
    ("loss.png", "PPO losses", ["loss/policy", "val/vf_loss"]),
    ("beta.png", "KL coefficient per prompt", ["beta/mean", "beta/min", "beta/max"]),
)  # fmt: skip


def load_reference(cfg: RunConfig) -> Any | None:
    """`ref_model_name_or_path` as a frozen backbone for full fine-tuning; None otherwise (LoRA: adapters
    disabled; full: the trainer makes a frozen copy of the policy)."""
    if not cfg.model.ref_model_name_or_path:
        return None
    if cfg.finetuning.finetuning_type == "lora":
        logger.warning(
            "`ref_model_name_or_path` is ignored with `finetuning_type: lora`: the reference is the base "
            "model with the adapters disabled."
        )
        return None
    ref_args = copy.copy(cfg.model)
    ref_args.model_name_or_path = cfg.model.ref_model_name_or_path
    ref_ft = dataclasses.replace(cfg.finetuning, finetuning_type="full", add_disco_head=False, add_beta_head=False)
    with torch.random.fork_rng(devices=[]):
        reference, _ = load_model_with_heads(ref_args, ref_ft, add_value_head=False, is_trainable=False)
    return reference


def uses_synthetic_prompts(cfg: RunConfig) -> bool:
    """True when every prompt comes from builtin:synthetic, whose true reward is known."""
    specs = split_specs(cfg.data.dataset or "")
    return bool(specs) and all(spec == BUILTIN_SYNTHETIC for spec in specs)


def build_ppo_trainer(cfg: RunConfig, callbacks: list[TrainerCallback] | None = None):
    """Load everything and build the `PPOTrainer`. Returns (trainer, data bundle)."""
    args = cfg.training
    # Policy first: its value head's init is the one draw from the run's random stream; the reward model and
    # the reference are built under forked RNGs.
    model, tokenizer = load_model_with_heads(cfg.model, cfg.finetuning, add_value_head=True, is_trainable=True)
    model.train()
    # A LoRA reward adapter (`reward_model_type: lora`) goes onto the LoRA policy's own base.
    reward_model = load_reward_model(cfg.model, cfg.finetuning, tokenizer, policy=model)
    reference = load_reference(cfg)
    bundle = get_dataset(cfg.data, tokenizer, stage="ppo", seed=args.seed)
    trainer = PPOTrainer(
        model,
        cfg,
        reward_model=reward_model,
        ref_model=reference,
        true_reward=synthetic_true_reward() if uses_synthetic_prompts(cfg) else None,
        train_dataset=bundle.train if args.do_train else None,
        eval_dataset=bundle.eval,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    return trainer, bundle


def run_ppo(cfg: RunConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train and/or evaluate a policy with PPO as `cfg` says; returns data stats and train / eval metrics.

    Writes the checkpoint (policy or adapter + value/beta heads), `train_results.json`, `eval_results.json`,
    `samples.jsonl`, the resolved config and plots (reward, KL, losses, beta) under `output_dir/plots/`.
    """
    args = cfg.training
    trainer, bundle = build_ppo_trainer(cfg, callbacks)
    results: dict[str, Any] = {"data_stats": dict(bundle.stats)}
    if args.do_train:
        results["train"] = trainer.train_and_save()
        if args.eval_on_start:
            first_eval = next((e for e in trainer.state.log_history if any(k.startswith("eval_") for k in e)), None)
            if first_eval is not None:
                results["eval_start"] = {k: v for k, v in first_eval.items() if k.startswith("eval_")}
        trainer.plot_history(PLOTS)
    if args.do_eval and trainer.eval_dataset is not None:
        results["eval"] = trainer.evaluate_and_save()
    if trainer.is_world_process_zero():
        cfg.save(args.output_dir)
    return results
