"""Stage `ppo`: policy (+ value head), reference, reward model and prompts (the skeleton that trains, evaluates and
saves: `train.workflow`)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback

from ...config.loader import RunConfig
from ...config.plan import HeadPlan
from ...data import get_dataset
from ...data.sources import BUILTIN_SYNTHETIC, split_specs
from ...models.loader import load_model_with_heads
from ...models.reward_model import load_reward_model
from ..workflow import StageWorkflow
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
    ref_args = cfg.model.for_model(cfg.model.ref_model_name_or_path)
    with torch.random.fork_rng(devices=[]):
        reference, _ = load_model_with_heads(ref_args, cfg.finetuning, heads=HeadPlan.of(), is_trainable=False)
    return reference


def uses_synthetic_prompts(cfg: RunConfig) -> bool:
    """True when every prompt comes from builtin:synthetic, whose true reward is known."""
    specs = split_specs(cfg.data.dataset or "")
    return bool(specs) and all(spec == BUILTIN_SYNTHETIC for spec in specs)


class PPOWorkflow(StageWorkflow):
    """Stage `ppo`: policy (+ value head), reference, reward model and prompts; the results also hold the evaluation
    before training (`eval_on_start`) as `eval_start`. Writes `samples.jsonl` besides the skeleton's outputs."""

    plots = PLOTS
    trainer_class = PPOTrainer

    def build(self, cfg: RunConfig, callbacks: list[TrainerCallback] | None):
        args = cfg.training
        # Policy first: its value head's init is the one draw from the run's random stream; the reward model and
        # the reference are built under forked RNGs.
        model, tokenizer = load_model_with_heads(cfg.model, cfg.finetuning, heads=cfg.plan.heads, is_trainable=True)
        model.train()
        # A LoRA reward adapter (`reward_model_type: lora`) goes onto the LoRA policy's own base.
        reward_model = self.load_reward(cfg, tokenizer, model)
        reference = load_reference(cfg) if self.uses_reference(cfg) else None
        bundle = get_dataset(cfg.data, tokenizer, stage="ppo", seed=args.seed)
        trainer = self.trainer_class(
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

    def load_reward(self, cfg: RunConfig, tokenizer, model):
        """The frozen reward model (PPO needs one; GRPO's may be absent)."""
        return load_reward_model(cfg.model, cfg.finetuning, tokenizer, policy=model)

    def uses_reference(self, cfg: RunConfig) -> bool:
        """Whether a reference is loaded (PPO: always; GRPO: unless `beta: 0`)."""
        return True

    def after_training(self, trainer: PPOTrainer, results: dict[str, Any]) -> None:
        if trainer.args.eval_on_start:
            first_eval = next((e for e in trainer.state.log_history if any(k.startswith("eval_") for k in e)), None)
            if first_eval is not None:
                results["eval_start"] = {k: v for k, v in first_eval.items() if k.startswith("eval_")}


def build_ppo_trainer(cfg: RunConfig, callbacks: list[TrainerCallback] | None = None):
    """Seed and build the `PPOTrainer` (tests drive it themselves). Returns (trainer, data bundle)."""
    return PPOWorkflow().build_trainer(cfg, callbacks)


def run_ppo(cfg: RunConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train and/or evaluate a policy with PPO as `cfg` says; returns data stats and train / eval metrics."""
    return PPOWorkflow().run(cfg, callbacks)
