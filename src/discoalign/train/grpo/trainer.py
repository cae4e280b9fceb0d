"""`GRPOTrainer`: GRPO / RLOO (critic-free, group-relative advantages) on the PPO stage's machinery.

It is a `PPOTrainer` without a critic: the same `Trainer.train()` loop, prompt schedule, rollout (sampling, stop
tokens, the policy's and the reference's log-probs, the reward read where the reward model was trained to read it),
reference handling (LoRA: adapters off; full: frozen copy or `ref_model_name_or_path`), reward adapter on the
policy's base, evaluation, samples and logging. What differs:

1. each prompt of a step is rolled out `num_generations` times (`make_rollout`);
2. the sequence reward is the weighted sum of the reward model's score (risk-adjusted with `disco_risk_coef`) and
   the `reward_funcs`, and the advantage of a completion is group-relative (`losses.grpo.group_advantages`;
   RLOO subtracts `beta * KL` from the reward first), optionally uncertainty-weighted (`uncertainty_shrinkage`);
3. the update is `num_iterations` optimizer steps over the whole generation batch (micro-batches of
   `per_device_train_batch_size`, accumulated over `gradient_accumulation_steps`), minimising TRL's clipped
   surrogate (+ `beta` x k3 KL for GRPO), aggregated by `loss_type` (`losses.grpo`).

A step rolls out `per_device_train_batch_size x gradient_accumulation_steps` completions per process, i.e. that
over `num_generations` prompts; every group stays on one process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...config.validate_grpo import resolve_reward_funcs
from ...losses.grpo import aggregate_loss, clipped_surrogate, group_advantages, scale_rewards_mode, sequence_kl_penalty
from ...losses.ppo import kl_per_token, masked_mean
from ..ppo.collect import reward_model_scores
from ..ppo.rollout import Rollout
from ..ppo.trainer import PPOTrainer
from .rewards import call_reward_funcs, combine_rewards, func_name


class GRPOTrainer(PPOTrainer):
    """GRPO / RLOO on a `ModelWithHeads` policy without heads.

    Args (besides `PPOTrainer`'s):
        reward_model: the frozen reward model, or None (reward functions only).
        reward_funcs: callables with TRL's signature; None: the config's `reward_funcs`, imported.
    """

    uses_critic = False

    def __init__(
        self,
        model: nn.Module,
        run_config,
        reward_model: nn.Module | None = None,
        ref_model: nn.Module | None = None,
        true_reward: Callable[[str], float] | None = None,
        reward_funcs: list[Callable] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, run_config, reward_model, ref_model, true_reward, **kwargs)
        ft = self.finetuning_args
        self.num_generations = self._generations = ft.num_generations
        self.rollout_batch_size = self.mini_batch_size // self.num_generations  # prompts per step and process
        self.update_epochs = ft.num_iterations
        self.reward_funcs = resolve_reward_funcs(ft.reward_funcs) if reward_funcs is None else list(reward_funcs)
        names = (["reward_model"] if self.reward_model is not None else []) + [func_name(f) for f in self.reward_funcs]
        self.reward_names = names
        weights = ft.reward_weights if ft.reward_weights is not None else [1.0] * len(names)
        self.reward_weights = torch.tensor([float(w) for w in weights])
        self.epsilon_high = ft.epsilon if ft.epsilon_high is None else ft.epsilon_high
        self._num_items = 1.0
        self._reward_stats: dict[str, float] = {}

    def needs_reference(self) -> bool:
        """TRL's rule: `beta: 0` loads and runs no reference."""
        return self.finetuning_args.pref_beta != 0.0

    # ---- rollout -------------------------------------------------------------------------------------

    @torch.no_grad()
    def make_rollout(self, rows: list[dict[str, Any]]) -> Rollout:
        """`num_generations` completions of each prompt, consecutive (row g * G + j is completion j of prompt g);
        one per prompt during evaluation."""
        return super().make_rollout([row for row in rows for _ in range(self._generations)])

    def evaluate_rollouts(self, dataset, metric_key_prefix: str = "eval") -> dict[str, float]:
        """PPO's evaluation: every eval prompt answered once (as PPO's, so the two compare on equal terms)."""
        self._generations = 1
        try:
            return super().evaluate_rollouts(dataset, metric_key_prefix)
        finally:
            self._generations = self.num_generations

    def sequence_rewards(self, rollout: Rollout, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) rewards per source (the reward model's risk-adjusted, clipped score first, then each reward
        function) and (B,) their weighted sum minus the missing-EOS penalty."""
        ft = self.finetuning_args
        parts = []
        if rollout.reward_mean is not None:
            parts.append(reward_model_scores(rollout.reward_mean, rollout.reward_variance, ft).float().cpu()[:, None])
        if self.reward_funcs:
            _, completions = self.decode_rollout(rollout)
            ids = [r[m.bool()].tolist() for r, m in zip(rollout.response_ids.cpu(), rollout.response_mask.cpu())]
            parts.append(call_reward_funcs(self.reward_funcs, rows, completions, ids, self.state))
        per_source = torch.cat(parts, dim=1)
        total = combine_rewards(per_source, self.reward_weights, self._generations).to(rollout.scores.device)
        if ft.missing_eos_penalty is not None:
            total = total - ft.missing_eos_penalty * (~rollout.ended).float()
        return per_source, total

    def finish_rollout(self, rollout: Rollout, rows: list[dict[str, Any]] | None = None) -> None:
        """Rewards, the (k1) KL logged as `objective/kl`, and the group-relative advantages, (B,)."""
        ft = self.finetuning_args
        mask = rollout.response_mask
        per_source, rollout.scores = self.sequence_rewards(rollout, rows)
        rollout.kl = torch.zeros_like(rollout.logprobs)
        if rollout.ref_logprobs is not None:
            rollout.kl = kl_per_token(rollout.logprobs, rollout.ref_logprobs, mask, "k1")
        rollout.kl_coef = torch.full_like(rollout.scores, ft.pref_beta)
        self._reward_stats = {f"rewards/{name}/mean": float(per_source[:, j].nanmean())
                              for j, name in enumerate(self.reward_names)}  # fmt: skip
        if self._generations == 1:  # evaluation: no groups, no update
            rollout.advantages = torch.zeros_like(rollout.scores)
            return
        rewards = rollout.scores
        if ft.advantage_estimator == "rloo" and rollout.ref_logprobs is not None:
            rewards = rewards - ft.pref_beta * sequence_kl_penalty(rollout.logprobs, rollout.ref_logprobs, mask)
        variance = None
        if ft.uncertainty_shrinkage > 0 and rollout.reward_variance is not None:
            variance = self.reward_weights[0].item() ** 2 * rollout.reward_variance.float()
        batch_std = None
        if scale_rewards_mode(ft.scale_rewards) == "batch" and self.accelerator.num_processes > 1:
            batch_std = self.accelerator.gather(rewards.float()).std()
        adv = group_advantages(
            rewards.float(), self.num_generations, ft.advantage_estimator, ft.scale_rewards, variance,
            ft.uncertainty_shrinkage, batch_std,
        )  # fmt: skip
        rollout.advantages = adv.advantages
        # dapo: the generation batch's tokens over all processes, per process; times the accumulation steps, which
        # the update loop divides every micro-batch loss by (TRL does not divide dapo's).
        tokens = mask.sum()
        if self.accelerator.num_processes > 1:
            tokens = self.accelerator.gather(tokens.reshape(1)).sum()
        self._num_items = float(tokens) / self.accelerator.num_processes / self.args.gradient_accumulation_steps
        grouped = rewards.float().view(-1, self.num_generations)
        self._reward_stats.update({
            "reward": float(rewards.mean()),
            "reward_std": float(adv.group_std.mean()),
            "frac_reward_zero_std": float((grouped.std(dim=1) < 1e-6).float().mean()),
            "advantage/weight_mean": float(adv.weights.mean()),
            "advantage/abs_mean": float(adv.advantages.abs().mean()),
        })  # fmt: skip

    def rollout_report(self, rollout: Rollout) -> tuple[dict[str, float], list[dict[str, Any]]]:
        metrics, samples = super().rollout_report(rollout)
        if rollout.ref_logprobs is None:  # no reference: no KL to report
            for key in ("objective/kl", "objective/non_score_reward", "objective/rlhf_reward"):
                metrics.pop(key, None)
        for key in ("beta/mean", "beta/min", "beta/max"):
            metrics.pop(key, None)
        return {**metrics, **self._reward_stats}, samples

    # ---- update --------------------------------------------------------------------------------------

    def update_loss(self, model: nn.Module, batch: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """TRL's clipped surrogate (+ beta x k3 KL for GRPO) aggregated by `loss_type`, and its statistics."""
        ft = self.finetuning_args
        mask = batch.response_mask
        out = model(
            batch.input_ids, batch.attention_mask, response_ids=batch.response_ids,
            prompt_length=batch.query_ids.shape[1], temperature=ft.temperature, with_values=False, with_entropy=True,
        )  # fmt: skip
        beta = ft.pref_beta if (ft.advantage_estimator == "grpo" and batch.ref_logprobs is not None) else 0.0
        terms = clipped_surrogate(
            out.logprobs, batch.logprobs, batch.advantages, mask, ft.epsilon, self.epsilon_high, beta,
            batch.ref_logprobs,
        )  # fmt: skip
        loss = aggregate_loss(terms.per_token_loss, mask, ft.grpo_loss_type, ft.max_new_tokens, self._num_items)
        low, high = masked_mean(terms.low_clipped.float(), mask), masked_mean(terms.high_clipped.float(), mask)
        stats = {
            "loss/policy": loss.detach(),
            "policy/entropy": masked_mean(out.entropy, mask),
            "policy/ratio": masked_mean(torch.exp(out.logprobs.detach() - batch.logprobs), mask),
            "clip_ratio/low_mean": low,
            "clip_ratio/high_mean": high,
            "clip_ratio/region_mean": low + high,
            "loss/total": loss.detach(),
        }
        if terms.kl is not None:
            stats["kl"] = masked_mean(terms.kl.detach(), mask)
        return loss, stats
