"""Stage `grpo`: GRPO and RLOO on the PPO stage's rollout, generation, reference and reward-model code."""
