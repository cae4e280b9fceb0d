"""Stage `ppo`: actor-critic RLHF against a scalar or Disco reward model, full or LoRA, with contextual KL control."""

from .workflow import run_ppo

__all__ = ["run_ppo"]
