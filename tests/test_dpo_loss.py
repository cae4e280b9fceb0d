"""`dpo_loss` against values computed by hand (docs/design.md §3), including DiscoDPO and per-pair beta."""

from __future__ import annotations

import math

import pytest
import torch

from discoalign.losses.dpo import dpo_loss

# policy/reference log-probs chosen so that chosen log-ratio = +0.5, rejected log-ratio = -0.5, d = 1.
PC, PR, RC, RR = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])
SOFTPLUS_MINUS_0_1 = math.log1p(math.exp(-0.1))  # -log sigmoid(0.1)


def _neg_log_phi(z: float) -> float:
    return -math.log(0.5 * (1.0 + math.erf(z / math.sqrt(2.0))))


def _loss(**kw) -> float:
    losses, _, _ = dpo_loss(PC, PR, RC, RR, **kw)
    return losses.item()


def test_sigmoid_by_hand():
    assert _loss(beta=0.1) == pytest.approx(SOFTPLUS_MINUS_0_1, abs=1e-6)


def test_sigmoid_label_smoothing_by_hand():
    # -(0.9) log s(0.1) - 0.1 log s(-0.1), and log(1 + e^0.1) = 0.1 + log(1 + e^-0.1).
    expected = 0.9 * SOFTPLUS_MINUS_0_1 + 0.1 * (0.1 + SOFTPLUS_MINUS_0_1)
    assert _loss(beta=0.1, label_smoothing=0.1) == pytest.approx(expected, abs=1e-6)


def test_ipo_by_hand():
    assert _loss(beta=0.1, loss_type="ipo") == pytest.approx((1.0 - 1.0 / 0.2) ** 2, abs=1e-5)
    assert _loss(beta=0.5, loss_type="ipo") == pytest.approx(0.0, abs=1e-6)


def test_hinge_by_hand():
    assert _loss(beta=0.1, loss_type="hinge") == pytest.approx(0.9, abs=1e-6)
    assert _loss(beta=2.0, loss_type="hinge") == 0.0


def test_disco_dpo_by_hand():
    half = torch.tensor([0.5])
    assert _loss(beta=0.1, chosen_var=half, rejected_var=half) == pytest.approx(_neg_log_phi(0.1), abs=1e-6)
    # var_w + var_l = 4: z = beta * d / 2
    got = _loss(beta=0.1, chosen_var=torch.tensor([1.0]), rejected_var=torch.tensor([3.0]))
    assert got == pytest.approx(_neg_log_phi(0.05), abs=1e-6)
    got = _loss(beta=0.1, label_smoothing=0.1, chosen_var=half, rejected_var=half)
    assert got == pytest.approx(0.9 * _neg_log_phi(0.1) + 0.1 * _neg_log_phi(-0.1), abs=1e-6)


def test_rewards_are_beta_times_logratios_and_detached():
    beta = torch.tensor([0.1, 0.2], requires_grad=True)
    pc = torch.tensor([-1.0, -1.0], requires_grad=True)
    _, chosen, rejected = dpo_loss(pc, PR.expand(2), RC.expand(2), RR.expand(2), beta=beta)
    assert torch.allclose(chosen, torch.tensor([0.05, 0.1]), atol=1e-7)
    assert torch.allclose(rejected, torch.tensor([-0.05, -0.1]), atol=1e-7)
    assert not chosen.requires_grad and not rejected.requires_grad


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_per_pair_beta_equals_one_call_per_pair(loss_type):
    pc, pr = torch.tensor([-1.0, -3.0, -0.2]), torch.tensor([-2.0, -1.0, -0.4])
    rc, rr = torch.tensor([-1.5, -2.5, -0.3]), torch.tensor([-1.5, -1.2, -0.1])
    beta = torch.tensor([0.1, 0.3, 0.05])
    batched, _, _ = dpo_loss(pc, pr, rc, rr, beta, loss_type=loss_type)
    for i in range(3):
        single, _, _ = dpo_loss(pc[i : i + 1], pr[i : i + 1], rc[i : i + 1], rr[i : i + 1], float(beta[i]), loss_type)
        assert batched[i].item() == pytest.approx(single.item(), rel=1e-6, abs=1e-6)


def test_tensor_beta_of_pref_beta_equals_float_beta_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(8, generator=g) * 5 for _ in range(4))
    for loss_type in ("sigmoid", "ipo", "hinge"):
        as_float, cf, rf = dpo_loss(pc, pr, rc, rr, 0.1, loss_type)
        as_tensor, ct, rt = dpo_loss(pc, pr, rc, rr, 0.1 * torch.ones(8), loss_type)
        assert torch.equal(as_float, as_tensor) and torch.equal(cf, ct) and torch.equal(rf, rt)


def test_gradient_flows_into_beta():
    beta = torch.full((2,), 0.1, requires_grad=True)
    policy_chosen, policy_rejected = torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -0.5])
    losses, _, _ = dpo_loss(policy_chosen, policy_rejected, torch.zeros(2), torch.zeros(2), beta)
    losses.mean().backward()
    assert beta.grad is not None and (beta.grad != 0).all()


def test_disco_dpo_is_finite_for_extreme_z():
    d_big = torch.tensor([1e4, -1e4, -3e3])
    pc = d_big.clone().requires_grad_(True)
    var = torch.full((3,), 1e-6, requires_grad=True)
    losses, _, _ = dpo_loss(pc, torch.zeros(3), torch.zeros(3), torch.zeros(3), 1.0, chosen_var=var, rejected_var=var)
    assert torch.isfinite(losses).all()
    assert losses[0].item() == pytest.approx(0.0, abs=1e-6)
    assert losses[1].item() > 1e12  # -log Phi(-7e6) ~ z^2 / 2, not inf
    losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(var.grad).all()
    # the naive formula overflows where ours does not
    z = torch.tensor(-1e4 / math.sqrt(2e-6))
    assert torch.isinf(-torch.log(torch.special.ndtr(z)))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, 0.1, loss_type="kto")
    with pytest.raises(ValueError, match="both"):
        dpo_loss(PC, PR, RC, RR, 0.1, chosen_var=torch.ones(1))
    with pytest.raises(ValueError, match="sigmoid"):
        dpo_loss(PC, PR, RC, RR, 0.1, loss_type="ipo", chosen_var=torch.ones(1), rejected_var=torch.ones(1))
