"""PPO's pure functions against values computed by hand (the arithmetic is written out in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from discoalign.losses.ppo import (
    beta_controller_loss,
    clipped_policy_loss,
    clipped_value_loss,
    disco_risk_adjusted_reward,
    gae_advantages,
    kl_per_token,
    last_token_positions,
    masked_mean,
    masked_var,
    masked_whiten,
    token_rewards,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_gae_hand_computed():
    rewards = t([[1.0, 0.0, 2.0], [0.5, 1.0, 7.0]])
    values = t([[0.5, 1.0, -1.0], [2.0, 1.0, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])  # row 1 ends after two tokens: its third reward and value are padding
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: delta_2 = 2 + 0 - (-1) = 3 -> A_2 = 3
    #        delta_1 = 0 + 0.9 * (-1) - 1 = -1.9 -> A_1 = -1.9 + 0.72 * 3 = 0.26
    #        delta_0 = 1 + 0.9 * 1 - 0.5 = 1.4 -> A_0 = 1.4 + 0.72 * 0.26 = 1.5872
    # row 1: V after the last token is 0: delta_1 = 1 + 0 - 1 = 0 -> A_1 = 0
    #        delta_0 = 0.5 + 0.9 * 1 - 2 = -0.6 -> A_0 = -0.6
    torch.testing.assert_close(advantages, t([[1.5872, 0.26, 3.0], [-0.6, 0.0, 0.0]]))
    torch.testing.assert_close(returns, t([[2.0872, 1.26, 2.0], [1.4, 1.0, 0.0]]))


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards, values, mask = t([[0.1, -0.2, 1.0]]), t([[0.3, 0.4, 0.5]]), t([[1, 1, 1]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, t([[0.9, 0.8, 1.0]]))
    torch.testing.assert_close(advantages, t([[0.6, 0.4, 0.5]]))


def test_clipped_policy_loss_hand_computed():
    ratio = t([[1.5, 0.5, 1.0], [1.1, 0.7, 3.0]])
    old = t([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.0]])
    new = old + ratio.log()
    advantages = t([[1.0, 1.0, -2.0], [-1.0, -1.0, 5.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    loss, clipfrac, approxkl = clipped_policy_loss(new, old, advantages, mask, cliprange=0.2)
    # max(-A r, -A clip(r, 0.8, 1.2)) per token:
    # (1, 1.5): max(-1.5, -1.2) = -1.2 clipped | (1, 0.5): max(-0.5, -0.8) = -0.5 | (-2, 1): 2
    # (-1, 1.1): 1.1                           | (-1, 0.7): max(0.7, 0.8) = 0.8 clipped | masked
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.0 + 1.1 + 0.8) / 5, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 5)
    logs = [math.log(r) for r in (1.5, 0.5, 1.0, 1.1, 0.7)]
    assert approxkl.item() == pytest.approx(0.5 * sum(x * x for x in logs) / 5, rel=1e-5)


def test_clipped_policy_loss_gradient_is_zero_where_clipped():
    old = torch.zeros(1, 2)
    new = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, _, _ = clipped_policy_loss(new, old, torch.ones(1, 2), torch.ones(1, 2), cliprange=0.2)
    loss.backward()
    # ratio 1.5 > 1.2 with A > 0: the clipped term wins and has no gradient; ratio 1.1: d(-r/2)/d log r = -0.55
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, -0.55]]))


def test_clipped_value_loss_hand_computed():
    values = t([[1.0, 0.0], [0.5, 3.0]])
    old = t([[0.8, 0.5], [0.5, 2.0]])
    returns = t([[2.0, -1.0], [0.0, 2.5]])
    loss, clipfrac = clipped_value_loss(values, old, returns, torch.ones(2, 2), cliprange_value=0.2)
    # unclipped vs clipped squared error per token:
    # (1.0 -> clip 1.0): 1 vs 1 | (0.0 -> clip 0.3): 1 vs 1.69, clipped wins | (0.5): 0.25 vs 0.25
    # (3.0 -> clip 2.2): 0.25 vs 0.09
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.69 + 0.25 + 0.25) / 4, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.25)


def test_masked_statistics_and_whitening():
    values, mask = t([[1.0, 2.0, 3.0, 100.0]]), t([[1, 1, 1, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    assert masked_var(values, mask).item() == pytest.approx(1.0)  # (1 + 0 + 1) / (3 - 1)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(2 / 3)
    torch.testing.assert_close(masked_whiten(values, mask), t([[-1.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(masked_whiten(values, mask, shift_mean=False), t([[1.0, 2.0, 3.0, 0.0]]))


def test_kl_estimators():
    logprobs, ref, mask = t([[-1.0, -2.0, -3.0]]), t([[-1.5, -1.0, 0.0]]), t([[1, 1, 0]])
    torch.testing.assert_close(kl_per_token(logprobs, ref, mask, "k1"), t([[0.5, -1.0, 0.0]]))
    # k3 = (exp(ref - lp) - 1) - (ref - lp): (e^-0.5 - 1) + 0.5 and (e^1 - 1) - 1
    expected = t([[math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]])
    torch.testing.assert_close(kl_per_token(logprobs, ref, mask, "k3"), expected)
    with pytest.raises(ValueError):
        kl_per_token(logprobs, ref, mask, "k2")


def test_token_rewards_put_the_score_on_the_last_real_token():
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    rewards = token_rewards(t([1.0, 2.0]), kl, torch.tensor([0.5, 0.1]), mask)
    torch.testing.assert_close(rewards, t([[-0.05, -0.1, 0.85], [-0.04, 1.95, 0.0]]))
    torch.testing.assert_close(last_token_positions(mask), torch.tensor([2, 1]))
    fixed = token_rewards(t([1.0, 2.0]), kl, 0.5, mask)
    torch.testing.assert_close(fixed, t([[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0]]))
    with pytest.raises(ValueError, match="at least one token"):
        token_rewards(t([1.0]), kl[:1], 0.5, t([[0, 0, 0]]))


def test_disco_risk_adjusted_reward():
    mean, variance = t([1.0, 2.0]), t([4.0, 0.25])
    torch.testing.assert_close(disco_risk_adjusted_reward(mean, variance, 0.5), t([0.0, 1.75]))
    assert disco_risk_adjusted_reward(mean, variance, 0.0) is mean  # coefficient 0: the mean itself
    assert disco_risk_adjusted_reward(mean, None, 0.0) is mean
    with pytest.raises(ValueError):
        disco_risk_adjusted_reward(mean, None, 0.5)


def test_beta_controller_pushes_scale_towards_the_target():
    scale = torch.tensor([1.2, 0.8], requires_grad=True)
    loss = beta_controller_loss(scale, sequence_kl=t([10.0, 2.0]), target_kl=6.0)
    assert loss.item() == pytest.approx(-(1.2 * 4.0 + 0.8 * -4.0) / 2)
    loss.backward()
    # A descent step (scale -= lr * grad) raises s where KL > target and lowers it where KL < target.
    torch.testing.assert_close(scale.grad, torch.tensor([-2.0, 2.0]))
