"""GRPO / RLOO pure functions (`losses.grpo`) against hand computations and TRL 1.16's own code: advantages (TRL's
lines reimplemented, with TRL's `nanstd`), the clipped surrogate with k3 KL and every loss aggregation (TRL's
`GRPOTrainer._compute_loss` run on a stub), the RLOO baseline and the uncertainty weights by hand."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from discoalign.losses.grpo import aggregate_loss, clipped_surrogate, group_advantages, sequence_kl_penalty
from discoalign.losses.ppo import kl_per_token

REWARDS = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0], dtype=torch.float64)


def test_grpo_advantages_by_hand():
    adv = group_advantages(REWARDS, 3, "grpo", "group").advantages
    s1, s2 = math.sqrt(7.0), math.sqrt(3.0)  # unbiased stds of (1, 2, 6) and (0, 0, 3)
    expected = [
        -2 / (s1 + 1e-4),
        -1 / (s1 + 1e-4),
        3 / (s1 + 1e-4),
        -1 / (s2 + 1e-4),
        -1 / (s2 + 1e-4),
        2 / (s2 + 1e-4),
    ]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(group_advantages(REWARDS, 3, "grpo", False).advantages,
                               torch.tensor([-2.0, -1, 3, -1, -1, 2], dtype=torch.float64))  # fmt: skip


def test_rloo_baseline_by_hand():
    # baseline of each completion: the mean of the other two of its group
    adv = group_advantages(REWARDS, 3, "rloo", "none").advantages
    expected = [1 - 4.0, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0.0]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))
    # = G / (G - 1) times GRPO's centred reward
    torch.testing.assert_close(adv, 1.5 * group_advantages(REWARDS, 3, "grpo", "none").advantages)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_match_trl(scale):
    """TRL 1.16 grpo_trainer.py lines 2765-2787 (sum_then_normalize), reimplemented with TRL's nanstd."""
    from trl.trainer.utils import nanstd

    torch.manual_seed(0)
    rewards, g = torch.randn(12), 4
    mean_grouped = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    expected = rewards - mean_grouped
    if scale != "none":
        expected = expected / (std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, g, "grpo", scale).advantages, expected)


def test_rloo_matches_trl():
    """TRL 1.16 rloo_trainer.py lines 1682-1690: (sum - r) / (count - 1) baselines."""
    torch.manual_seed(1)
    rewards, g = torch.randn(8), 4
    grouped = rewards.view(-1, g)
    baselines = ((grouped.nansum(dim=1, keepdim=True) - grouped) / (g - 1)).view(-1)
    torch.testing.assert_close(group_advantages(rewards, g, "rloo", "none").advantages, rewards - baselines)


def test_uncertainty_weights_by_hand():
    # group (1, 2, 6): s^2 = 7; variances (0, 7, 14) -> w = 7 / (7 + c sigma^2) = (1, 1/2, 1/3) with c = 1
    variance = torch.tensor([0.0, 7.0, 14.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    out = group_advantages(REWARDS, 3, "grpo", "none", variance, shrinkage=1.0)
    torch.testing.assert_close(out.weights[:3], torch.tensor([1.0, 0.5, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(out.advantages[:3], torch.tensor([-2.0, -0.5, 1.0], dtype=torch.float64))
    # c = 2 halves the trust again; scaling by the group std comes after the weighting
    out = group_advantages(REWARDS, 3, "grpo", "group", variance, shrinkage=2.0)
    w = torch.tensor([1.0, 7 / 21, 7 / 35], dtype=torch.float64)
    torch.testing.assert_close(out.advantages[:3], w * torch.tensor([-2.0, -1, 3]) / (math.sqrt(7) + 1e-4))
    # off (c = 0): plain GRPO, whatever the variance
    torch.testing.assert_close(group_advantages(REWARDS, 3, "grpo", "group", variance, 0.0).advantages,
                               group_advantages(REWARDS, 3, "grpo", "group").advantages)  # fmt: skip


def test_k3_kl_by_hand():
    logp, ref = torch.log(torch.tensor([[0.5, 0.2]])), torch.log(torch.tensor([[0.25, 0.2]]))
    mask = torch.ones(1, 2)
    # r = pi_ref / pi = 0.5: (r - 1) - log r = -0.5 + log 2; equal probabilities: 0
    torch.testing.assert_close(kl_per_token(logp, ref, mask, "k3"), torch.tensor([[math.log(2) - 0.5, 0.0]]))
    terms = clipped_surrogate(logp, logp, torch.zeros(1), mask, 0.2, 0.2, beta=0.1, ref_logprobs=ref)
    torch.testing.assert_close(terms.per_token_loss, 0.1 * torch.tensor([[math.log(2) - 0.5, 0.0]]))
    # RLOO's KL in the reward: the summed k1 (log pi - log pi_ref)
    torch.testing.assert_close(sequence_kl_penalty(logp, ref, mask), torch.tensor([math.log(2)]))


def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    mask = torch.ones(1, 3)
    pos = clipped_surrogate(new, old, torch.tensor([2.0]), mask, 0.2, 0.3).per_token_loss
    torch.testing.assert_close(pos, torch.tensor([[-2 * 1.3, -2 * 0.5, -2 * 1.1]]))  # min(r A, clip(r) A)
    neg = clipped_surrogate(new, old, torch.tensor([-1.0]), mask, 0.2, 0.3)
    torch.testing.assert_close(neg.per_token_loss, torch.tensor([[1.5, 0.8, 1.1]]))
    assert neg.low_clipped.tolist() == [[False, True, False]]


def _trl_loss(loss_type, logps, old, ref, advantages, mask, beta, eps_low, eps_high, max_len):
    """TRL 1.16's `GRPOTrainer._compute_loss` itself, on a stub trainer (one process, no accumulation)."""
    from trl import GRPOTrainer

    accelerator = SimpleNamespace(
        num_processes=1, gather=lambda x: x.reshape(-1), reduce=lambda x, reduction="sum": x,
        gather_for_metrics=lambda x: x,
    )  # fmt: skip
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, accelerator=accelerator, max_completion_length=max_len,
        aux_loss_enabled=False, _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
    )  # fmt: skip
    inputs = {
        "prompt_ids": torch.zeros(logps.shape[0], 2, dtype=torch.long), "prompt_mask": torch.ones(logps.shape[0], 2),
        "completion_ids": torch.zeros_like(logps, dtype=torch.long), "completion_mask": mask,
        "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }  # fmt: skip
    return GRPOTrainer._compute_loss(stub, None, inputs), stub._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_trl_compute_loss(loss_type, beta):
    torch.manual_seed(2)
    b, length = 6, 5
    logps = -torch.rand(b, length) * 2
    old = logps + 0.3 * torch.randn(b, length)  # ratios far enough from 1 to clip
    ref = logps + 0.5 * torch.randn(b, length)
    mask = torch.ones(b, length)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    advantages = torch.randn(b)
    expected, metrics = _trl_loss(loss_type, logps, old, ref, advantages, mask, beta, 0.2, 0.28, length)
    terms = clipped_surrogate(logps, old, advantages, mask, 0.2, 0.28, beta, ref if beta else None)
    ours = aggregate_loss(terms.per_token_loss, mask, loss_type, length, mask.sum())
    torch.testing.assert_close(ours, expected)
    low = float((terms.low_clipped.float() * mask).sum() / mask.sum())
    high = float((terms.high_clipped.float() * mask).sum() / mask.sum())
    assert low == pytest.approx(metrics["clip_ratio/low_mean"][0]) and high == pytest.approx(
        metrics["clip_ratio/high_mean"][0]
    )
    assert low + high > 0  # the batch exercises the clip
    if beta:
        kl = float((terms.kl * mask).sum() / mask.sum())
        assert kl == pytest.approx(metrics["kl"][0], rel=1e-5)


def test_dr_grpo_and_grpo_differ_from_bnpo_by_hand():
    per_token = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(aggregate_loss(per_token, mask, "grpo")) == pytest.approx((2.0 + 2.0) / 2)
    assert float(aggregate_loss(per_token, mask, "bnpo")) == pytest.approx(6.0 / 3)
    assert float(aggregate_loss(per_token, mask, "dr_grpo", max_completion_length=4)) == pytest.approx(6.0 / 8)
    assert float(aggregate_loss(per_token, mask, "dapo", num_items=12.0)) == pytest.approx(0.5)
