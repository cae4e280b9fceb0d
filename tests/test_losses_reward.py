"""BT and Disco reward losses against values computed by hand."""

from __future__ import annotations

import math

import torch

from discoalign.losses.reward import bt_reward_loss, center_rewards_penalty, disco_reward_loss


def phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_bt_loss_by_hand():
    mu_c = torch.tensor([1.0, -0.5, 2.0])
    mu_r = torch.tensor([0.0, 0.5, 2.0])
    expected = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.0)), math.log(2.0)]
    assert torch.allclose(bt_reward_loss(mu_c, mu_r), torch.tensor(expected), atol=1e-6)
    margin = torch.tensor([0.5, 0.0, -1.0])
    expected_m = [math.log1p(math.exp(-0.5)), math.log1p(math.exp(1.0)), math.log1p(math.exp(-1.0))]
    assert torch.allclose(bt_reward_loss(mu_c, mu_r, margin), torch.tensor(expected_m), atol=1e-6)


def test_disco_loss_by_hand():
    mu_c = torch.tensor([1.0, 0.0, 0.3])
    mu_r = torch.tensor([0.0, 1.0, 0.1])
    var_c = torch.tensor([0.5, 2.0, 0.04])
    var_r = torch.tensor([0.5, 2.0, 0.05])
    margin = torch.tensor([0.0, 0.0, 0.05])
    z = [1.0 / math.sqrt(1.0), -1.0 / math.sqrt(4.0), 0.15 / math.sqrt(0.09)]
    expected = torch.tensor([-math.log(phi(v)) for v in z])
    got = disco_reward_loss(mu_c, mu_r, var_c, var_r, margin)
    assert torch.allclose(got, expected, atol=1e-6)


def test_disco_with_half_variances_is_probit_of_the_difference():
    g = torch.Generator().manual_seed(0)
    mu_c, mu_r = torch.randn(64, generator=g), torch.randn(64, generator=g)
    half = torch.full((64,), 0.5)
    expected = -torch.special.log_ndtr(mu_c - mu_r)
    assert torch.allclose(disco_reward_loss(mu_c, mu_r, half, half), expected, atol=1e-6)


def test_disco_loss_finite_in_the_far_tail():
    # -log Phi(-40) = 800 + log(40) + 0.5 log(2 pi) - log(1 - 1/z^2 + 3/z^4 - 15/z^6)
    z = 40.0
    tail = 1 - 1 / z**2 + 3 / z**4 - 15 / z**6
    expected = z * z / 2 + math.log(z) + 0.5 * math.log(2 * math.pi) - math.log(tail)
    one = torch.ones(1)
    mu_c = torch.tensor([-40.0], dtype=torch.float64).float()
    loss = disco_reward_loss(mu_c, torch.zeros(1), 0.5 * one, 0.5 * one)
    assert torch.isfinite(loss).all()
    assert abs(loss.item() - expected) / expected < 1e-6


def test_disco_loss_and_gradient_finite_near_variance_floor():
    mu_c = torch.tensor([1.0, -1.0], requires_grad=True)
    var = torch.full((2,), 1e-6, requires_grad=True)
    loss = disco_reward_loss(mu_c, torch.zeros(2), var, var)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(mu_c.grad).all() and torch.isfinite(var.grad).all()
    # z = -1 / sqrt(2e-6) = -707.1: loss ~ z^2 / 2 = 250000
    assert abs(loss[1].item() - 250000.0) / 250000.0 < 1e-3


def test_center_rewards_penalty_by_hand():
    mu_c, mu_r = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    assert torch.allclose(center_rewards_penalty(mu_c, mu_r), torch.tensor((1.5**2 + 1.0**2) / 2))


def test_losses_are_fp32_for_bf16_inputs():
    mu = torch.tensor([0.3, 0.1], dtype=torch.bfloat16)
    var = torch.tensor([0.2, 0.4], dtype=torch.bfloat16)
    assert bt_reward_loss(mu, mu.flip(0)).dtype == torch.float32
    assert disco_reward_loss(mu, mu.flip(0), var, var).dtype == torch.float32
