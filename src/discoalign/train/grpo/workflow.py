"""Stage `grpo`: the PPO stage's workflow (policy, reward model, reference, prompts) with `GRPOTrainer`; the policy
has no value head, the reward model is optional (reward functions), and `beta: 0` loads no reference."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ...config.loader import RunConfig
from ..ppo.workflow import PPOWorkflow
from .trainer import GRPOTrainer

PLOTS = (
    ("reward.png", "reward", ["objective/scores", "objective/true_reward", "eval_objective/scores",
                              "eval_objective/true_reward"]),
    ("kl.png", "KL to the reference (per response)", ["objective/kl", "eval_objective/kl"]),
    ("loss.png", "GRPO loss", ["loss/policy"]),
    ("advantages.png", "group statistics", ["reward_std", "advantage/abs_mean", "advantage/weight_mean"]),
)  # fmt: skip


class GRPOWorkflow(PPOWorkflow):
    """Stage `grpo` (docs/grpo.md)."""

    plots = PLOTS
    trainer_class = GRPOTrainer

    def load_reward(self, cfg: RunConfig, tokenizer, model):
        return super().load_reward(cfg, tokenizer, model) if cfg.finetuning.reward_model else None

    def uses_reference(self, cfg: RunConfig) -> bool:
        return cfg.finetuning.pref_beta != 0.0


def run_grpo(cfg: RunConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train and/or evaluate a policy with GRPO / RLOO as `cfg` says."""
    return GRPOWorkflow().run(cfg, callbacks)


def build_grpo_trainer(cfg: RunConfig, callbacks: list[TrainerCallback] | None = None):
    """Seed and build the `GRPOTrainer` (tests drive it themselves). Returns (trainer, data bundle)."""
    return GRPOWorkflow().build_trainer(cfg, callbacks)
