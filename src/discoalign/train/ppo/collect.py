"""Collecting a PPO rollout: sample responses, score every token (policy, reference, reward model), and turn the
scores into per-token rewards, advantages and returns. A mixin of `PPOTrainer`, kept apart from its loop."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from ...data.prompts import left_pad
from ...losses.ppo import disco_risk_adjusted_reward, gae_advantages, kl_per_token, masked_whiten, token_rewards
from ...models.generation import sample_responses, truncate_at_stop
from ...models.reward_model import score_responses
from .metric import rollout_metrics
from .rollout import Rollout, pad_columns


def reward_model_scores(mean: torch.Tensor, variance: torch.Tensor | None, ft) -> torch.Tensor:
    """The reward model's sequence score: `mean - disco_risk_coef * sqrt(variance)`, clipped to `reward_clip`."""
    scores = disco_risk_adjusted_reward(mean, variance, ft.disco_risk_coef)
    if ft.reward_clip is not None:
        scores = scores.clamp(-ft.reward_clip, ft.reward_clip)
    return scores


class RolloutCollector:
    """Rollout methods of `PPOTrainer`. They read the trainer's `finetuning_args`, `args`, `accelerator`,
    `_policy()`, `_reference()`, `uses_critic`, `uses_reference`, `reward_model` (None: no reward model), `generation_config`, `stop_ids`, `turn_suffix`, `pad_token_id`,
    `processing_class` and `true_reward`, all set in `PPOTrainer.__init__`."""

    @torch.no_grad()
    def _score_tokens(
        self, query_ids, query_mask, response_ids, response_mask, ended=None
    ) -> dict[str, torch.Tensor | None]:
        """Policy log-probs and values, reference log-probs (+ prompt hidden state) and reward of one chunk."""
        inputs = {
            "input_ids": torch.cat([query_ids, response_ids], dim=1),
            "attention_mask": torch.cat([query_mask, response_mask.long()], dim=1),
            "response_ids": response_ids,
            "prompt_length": query_ids.shape[1],
            "temperature": self.finetuning_args.temperature,
        }
        policy_out = self._policy()(**inputs, with_values=self.uses_critic)
        ref_logprobs = ref_prompt_hidden = None
        if self.uses_reference:  # GRPO with `beta: 0` has none
            reference, adapters_off = self._reference()
            with adapters_off:
                ref_out = reference(**inputs, with_values=False)
            ref_logprobs = ref_out.logprobs
            # Left padding puts every prompt's last token at P - 1: the beta head's input.
            ref_prompt_hidden = ref_out.prompt_hidden.float() if self.plan.beta_source == "head" else None

        mean = variance = None
        if self.reward_model is not None:  # GRPO may score with reward functions only
            mean, variance = score_responses(
                self.accelerator.unwrap_model(self.reward_model),
                query_ids,
                query_mask,
                response_ids,
                response_mask,
                ended,
                self.turn_suffix,
                self.pad_token_id,
            )
        return {
            "logprobs": policy_out.logprobs, "ref_logprobs": ref_logprobs, "values": policy_out.values,
            "reward_mean": mean, "reward_variance": variance, "ref_prompt_hidden": ref_prompt_hidden,
        }  # fmt: skip

    @torch.no_grad()
    def make_rollout(self, rows: list[dict[str, Any]]) -> Rollout:
        """Sample, score and compute advantages for a batch of tokenised prompt rows (eval mode, no gradient)."""
        ft = self.finetuning_args
        policy = self._policy()
        was_training = policy.training
        policy.eval()
        device = self.args.device
        chunk = max(1, self.args.per_device_eval_batch_size)
        try:
            query_ids, query_mask = left_pad([r["prompt_input_ids"] for r in rows], self.pad_token_id)
            query_ids, query_mask = query_ids.to(device), query_mask.to(device)
            pieces: dict[str, list] = defaultdict(list)
            with self.accelerator.autocast():
                for start in range(0, len(rows), chunk):
                    q_ids, q_mask = query_ids[start : start + chunk], query_mask[start : start + chunk]
                    generated = sample_responses(policy, q_ids, q_mask, self.generation_config)
                    response_ids, response_mask, ended = truncate_at_stop(generated, self.stop_ids, self.pad_token_id)
                    pieces["response_ids"].append(response_ids)
                    pieces["response_mask"].append(response_mask)
                    pieces["ended"].append(ended)
                    for key, value in self._score_tokens(q_ids, q_mask, response_ids, response_mask, ended).items():
                        pieces[key].append(value)
        finally:
            policy.train(was_training)

        def joined(key: str, pad: float = 0.0) -> torch.Tensor | None:
            values = pieces[key]
            if values[0] is None:
                return None
            if values[0].dim() == 2 and key != "ref_prompt_hidden":
                values = pad_columns(values, pad)
            return torch.cat(values, dim=0)

        mask = joined("response_mask")
        mean, variance = joined("reward_mean"), joined("reward_variance")
        ended = joined("ended")
        scores = reward_model_scores(mean, variance, ft) if mean is not None else torch.zeros(len(rows), device=device)
        if ft.missing_eos_penalty is not None:
            scores = scores - ft.missing_eos_penalty * (~ended).float()
        ref_prompt_hidden = joined("ref_prompt_hidden")
        kl_coef = torch.full_like(scores, ft.pref_beta)
        if self.plan.beta_source == "head":
            kl_coef = ft.pref_beta * policy.beta_head(ref_prompt_hidden)
        rollout = Rollout(
            query_ids=query_ids,
            query_mask=query_mask,
            response_ids=joined("response_ids", self.pad_token_id),
            response_mask=mask,
            logprobs=joined("logprobs") * mask,
            ref_logprobs=None if (ref := joined("ref_logprobs")) is None else ref * mask,
            values=None if (values := joined("values")) is None else values * mask,
            reward_mean=mean,
            reward_variance=variance,
            scores=scores,
            ended=ended,
            kl_coef=kl_coef,
            ref_prompt_hidden=ref_prompt_hidden,
        )
        self.finish_rollout(rollout, rows)
        return rollout

    def finish_rollout(self, rollout: Rollout, rows: list[dict[str, Any]] | None = None) -> None:
        """Fill `kl`, `rewards`, `advantages` (whitened) and `returns` of a rollout in place."""
        ft = self.finetuning_args
        mask = rollout.response_mask
        rollout.kl = kl_per_token(rollout.logprobs, rollout.ref_logprobs, mask, ft.kl_estimator)
        rewards = token_rewards(rollout.scores, rollout.kl, rollout.kl_coef, mask)
        if ft.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        rollout.rewards = rewards
        advantages, rollout.returns = gae_advantages(rewards, rollout.values, mask, ft.gamma, ft.lam)
        rollout.advantages = masked_whiten(advantages, mask)

    def decode_rollout(self, rollout: Rollout) -> tuple[list[str], list[str]]:
        """(prompt texts, response texts) without special tokens."""
        tokenizer = self.processing_class
        prompts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
                   for ids, m in zip(rollout.query_ids.cpu(), rollout.query_mask.cpu())]  # fmt: skip
        responses = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
                     for ids, m in zip(rollout.response_ids.cpu(), rollout.response_mask.cpu())]  # fmt: skip
        return prompts, responses

    def rollout_report(self, rollout: Rollout) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Rollout metrics and the sample rows (the first `num_score_samples` rollouts)."""
        prompts, responses = self.decode_rollout(rollout)
        true_rewards = [self.true_reward(text) for text in responses] if self.true_reward is not None else None
        metrics = rollout_metrics(rollout, true_rewards)
        samples = []
        sequence_kl = rollout.kl.sum(dim=1)
        for i in range(min(self.finetuning_args.num_score_samples, len(rollout))):
            samples.append({
                "prompt": prompts[i], "response": responses[i], "score": float(rollout.scores[i]),
                "reward_mean": None if rollout.reward_mean is None else float(rollout.reward_mean[i]),
                "variance": None if rollout.reward_variance is None else float(rollout.reward_variance[i]),
                "kl": float(sequence_kl[i]), "ended": bool(rollout.ended[i]),
                "true_reward": None if true_rewards is None else true_rewards[i],
            })  # fmt: skip
        return metrics, samples
