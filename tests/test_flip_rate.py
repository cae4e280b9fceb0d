"""Issue 21: the flip-rate head and the forward-corrected likelihood (losses/flip.py, docs/noisy_labels.md).

Loss and gradients against a float64 hand computation; e = 0 is DPO / Bradley–Terry exactly; with the true flip
rates (an oracle) the estimator is consistent on a toy where plain BT is attenuated; the head's own term recovers
per-context rates from detached margins; the head survives a checkpoint round trip; the trainers run it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import dpo_trainer, train_recorded

from discoalign.config import build_config
from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.errors import ConfigError
from discoalign.losses.dpo_objective import DPOObjective, DPOSettings
from discoalign.losses.flip import flip_corrected_losses, flip_prior, forward_corrected_nll
from discoalign.losses.pair import PairBatch
from discoalign.losses.reward_objective import RewardObjective, RewardPairs, RewardSettings
from discoalign.models.checkpoint import save_checkpoint
from discoalign.models.heads import FlipRateHead
from discoalign.models.loader import load_model_with_heads

Z = [-80.0, -5.0, -0.3, 0.0, 0.2, 3.0, 40.0]
E = [0.0, 1e-4, 0.05, 0.2, 0.45, 0.499]


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_loss_and_gradients_against_float64_by_hand():
    z = torch.tensor([zz for zz in Z for _ in E], dtype=torch.float32, requires_grad=True)
    e = torch.tensor([ee for _ in Z for ee in E], dtype=torch.float32, requires_grad=True)
    loss = forward_corrected_nll(z, e)
    loss.sum().backward()
    for i, (zz, ee) in enumerate((zz, ee) for zz in Z for ee in E):
        # float64 by hand: P = (1 - e) s(z) + e s(-z); dP/dz = (1 - 2e) s(z) s(-z); dP/de = s(-z) - s(z)
        p = (1 - ee) * _sig(zz) + ee * _sig(-zz)
        expected = -math.log(p) if p > 1e-300 else -(math.log(1 - ee) + (zz - math.log1p(math.exp(zz))))
        assert loss[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-6), (zz, ee)
        dz = -(1 - 2 * ee) * _sig(zz) * _sig(-zz) / p
        assert z.grad[i].item() == pytest.approx(dz, rel=1e-4, abs=1e-7), (zz, ee)
        if ee > 0:
            de = -(_sig(-zz) - _sig(zz)) / p
            assert e.grad[i].item() == pytest.approx(de, rel=1e-4, abs=1e-6), (zz, ee)
    assert torch.isfinite(loss).all() and torch.isfinite(z.grad).all() and torch.isfinite(e.grad).all()
    # bounded influence: a confident disagreement (z = -80) has no pull at e > 0, unlike DPO's gradient of -1
    assert abs(z.grad[0 * len(E) + 2].item()) < 1e-20


def test_zero_flip_rate_is_dpo_and_bradley_terry_exactly():
    z = torch.linspace(-30, 30, 41)
    assert torch.equal(forward_corrected_nll(z, 0.0), -F.logsigmoid(z))
    torch.manual_seed(0)
    logps = [torch.randn(6, dtype=torch.float32, requires_grad=True) for _ in range(2)]
    ref = [torch.randn(6) for _ in range(2)]
    heads = {"flip_head": torch.zeros(6), "flip_head/scale": torch.ones(6)}
    batch = PairBatch(logps[0], logps[1], ref[0], ref[1], torch.ones(6), torch.ones(6), prompt_heads=heads)
    dpo = DPOObjective(DPOSettings(pref_beta=0.1))(batch, training=True)
    flip = DPOObjective(DPOSettings(pref_beta=0.1, flip_rate=True))(batch, training=True)
    assert torch.equal(dpo.losses, flip.losses)
    g_dpo = torch.autograd.grad(dpo.loss, logps)
    g_flip = torch.autograd.grad(flip.loss, logps)
    assert all(torch.equal(a, b) for a, b in zip(g_dpo, g_flip))
    mu = [torch.randn(6, requires_grad=True) for _ in range(2)]
    bt = RewardObjective(RewardSettings())(RewardPairs(mu[0], mu[1]))
    rm = RewardObjective(RewardSettings(flip_rate=True))(
        RewardPairs(mu[0], mu[1], flip_rate=torch.zeros(6), flip_scale=torch.ones(6))
    )
    assert torch.equal(bt.losses, rm.losses)


def test_two_terms_policy_at_fixed_e_head_at_detached_scaled_margin_and_the_prior():
    z = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    e = torch.tensor([0.1, 0.3, 0.02], dtype=torch.float64, requires_grad=True)
    gamma = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    mean, strength = 0.1, 0.4
    loss = flip_corrected_losses(z, e, gamma, mean, strength)
    # the value is the forward-corrected NLL (the prior and the head's term add gradient, not value)
    assert torch.allclose(loss.double(), forward_corrected_nll(z, e).double(), atol=1e-6)
    loss.sum().backward()
    for i in range(3):
        zz, ee, g = z[i].item(), e[i].item(), gamma.item()
        p = (1 - ee) * _sig(zz) + ee * _sig(-zz)
        assert z.grad[i].item() == pytest.approx(-(1 - 2 * ee) * _sig(zz) * _sig(-zz) / p, rel=1e-5)
        pg = (1 - ee) * _sig(g * zz) + ee * _sig(-g * zz)
        q, q0 = 2 * ee, 2 * mean
        prior_grad = strength * 2 * (-q0 / q + (1 - q0) / (1 - q))  # d/de of KL(Bern(q0) || Bern(2e))
        assert e.grad[i].item() == pytest.approx(-(_sig(-g * zz) - _sig(g * zz)) / pg + prior_grad, rel=1e-5)
    expected_gamma = sum(
        -(1 - 2 * ee) * _sig(gamma.item() * zz) * _sig(-gamma.item() * zz) * zz / ((1 - ee) * _sig(gamma.item() * zz)
        + ee * _sig(-gamma.item() * zz)) for zz, ee in zip(z.tolist(), e.tolist())
    )  # fmt: skip
    assert gamma.grad.item() == pytest.approx(expected_gamma, rel=1e-5)


def test_beta_prior_by_hand():
    e = torch.tensor([0.05, 0.1, 0.3])
    got = flip_prior(e, 0.1, 2.0)
    for i, ee in enumerate(e.tolist()):
        q, q0 = 2 * ee, 0.2
        assert got[i].item() == pytest.approx(
            2 * (q0 * math.log(q0 / q) + (1 - q0) * math.log((1 - q0) / (1 - q))), rel=1e-5
        )
    assert got[1].item() == pytest.approx(0.0, abs=1e-7)  # zero at the mode
    assert torch.equal(flip_prior(e, 0.1, 0.0), torch.zeros(3))
    assert torch.isfinite(flip_prior(e, 0.0, 1.0)).all()  # a prior mode of 0 (xlogy)


def _toy(n: int, rates: list[float], seed: int = 0):
    """Contexts c (one-hot), feature x ~ N(0, 1), true logit 2x, labels flipped with rates[c]."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.randint(len(rates), (n,), generator=gen)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    y_true = torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(2.0 * x)
    flip = torch.rand(n, generator=gen, dtype=torch.float64) < torch.tensor(rates, dtype=torch.float64)[c]
    sign = torch.where(y_true ^ flip, 1.0, -1.0).double()  # +1: "chosen" is the first response
    return c, x, sign


def test_oracle_flip_rate_is_consistent_where_bt_is_attenuated():
    rates = [0.0, 0.2, 0.4]
    c, x, sign = _toy(60000, rates)
    e = torch.tensor(rates, dtype=torch.float64)[c]
    fits = {}
    for name, rate in (("oracle", e), ("bt", torch.zeros_like(e))):
        theta = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([theta], max_iter=100, line_search_fn="strong_wolfe")

        def closure(rate=rate, theta=theta, opt=opt):
            opt.zero_grad()
            loss = forward_corrected_nll(sign * theta * x, rate).mean()
            loss.backward()
            return loss

        opt.step(closure)
        fits[name] = theta.item()
    assert fits["oracle"] == pytest.approx(2.0, abs=0.1)  # consistent
    assert fits["bt"] < 1.3  # plain BT under 20% mean flips: attenuated towards 0


def test_head_term_recovers_per_context_rates_from_detached_margins():
    """The identification of docs/noisy_labels.md: with the margins of a (good, mis-scaled) policy detached, the head's
    term fits e(x) as the lapse rate of a logistic curve with its own scale gamma."""
    rates = [0.0, 0.1, 0.25, 0.4]
    c, x, sign = _toy(40000, rates, seed=1)
    z = (0.3 * x * sign).float()  # the policy's margin: right direction, under-confident by a factor of 6.7
    head = FlipRateHead(len(rates), prior_mean=0.1)
    features = F.one_hot(c, len(rates)).float()
    head.set_statistics(features.mean(0), len(c))
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        out = head(features)
        flip_corrected_losses(z, out["flip_head"], out["flip_head/scale"], 0.1, 0.0).mean().backward()
        opt.step()
    learned = [head(features[c == k][:1])["flip_head"].item() for k in range(len(rates))]
    assert learned == pytest.approx(rates, abs=0.04)
    assert head.log_scale.exp().item() == pytest.approx(2.0 / 0.3, rel=0.25)


def test_head_starts_at_the_prior_mode_without_drawing_random_numbers():
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    head = FlipRateHead(8, prior_mean=0.15)
    assert torch.equal(torch.rand(1), before)
    out = head.eval()(torch.randn(5, 8))
    assert torch.allclose(out["flip_head"], torch.full((5,), 0.15))
    assert torch.equal(out["flip_head/scale"], torch.ones(5))


def test_flip_head_checkpoint_round_trip(tmp_path):
    ft = {"stage": "dpo", "add_flip_head": True, "flip_prior_mean": 0.2}
    model, tok = load_model_with_heads(ModelArguments(model_name_or_path="builtin:tiny-qwen3"),
                                       FinetuningArguments(**ft), add_value_head=False)  # fmt: skip
    with torch.no_grad():
        model.flip_head.summary.weight.normal_()
        model.flip_head.log_scale.fill_(0.7)
        model.flip_head.feature_mean.normal_()
        model.flip_head.feature_count.fill_(12)
    out = save_checkpoint(model, str(tmp_path / "flip"), tok)
    again, _ = load_model_with_heads(ModelArguments(model_name_or_path=out), FinetuningArguments(**ft),
                                     add_value_head=False, is_trainable=False)  # fmt: skip
    for key, value in model.flip_head.state_dict().items():
        assert torch.equal(again.flip_head.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"use_flip_rate": True}, "`add_flip_head` is false"),
        ({"add_flip_head": True, "use_flip_rate": True, "label_smoothing": 0.1}, "replaces `label_smoothing`"),
        ({"add_flip_head": True, "use_flip_rate": True, "add_disco_head": True, "disco_pref": True}, "use one of"),
        ({"add_flip_head": True, "flip_prior_mean": 0.5}, "`flip_prior_mean` is 0.5"),
        ({"stage": "ppo", "reward_model": "x", "add_flip_head": True}, "PPO has no preference labels"),
    ],
)
def test_config_mistakes_are_named(keys, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"stage": "dpo", "model_name_or_path": "builtin:tiny-qwen3", "dataset": "builtin:synthetic",
                      **keys})  # fmt: skip


RUN = {"dataset": "builtin:synthetic-noisy", "synthetic_num_pairs": 32, "per_device_train_batch_size": 8,
       "per_device_eval_batch_size": 16, "learning_rate": 1e-3, "report_to": "none", "max_steps": 3}  # fmt: skip


def test_dpo_trainer_trains_the_head_and_reports_the_rate(tmp_path):
    trainer = dpo_trainer(tmp_path, RUN, add_flip_head=True, use_flip_rate=True, flip_head_lr_ratio=50)
    head = trainer.model.flip_head
    before = head.summary.bias.detach().clone()
    trainer.train()
    assert not torch.equal(head.summary.bias, before) and head.feature_count.item() == 24
    out = trainer.predict(trainer.eval_dataset if trainer.eval_dataset is not None else trainer.train_dataset)
    rate = out.predictions[:, 5]
    assert ((rate > 0) & (rate < 0.5)).all()
    assert 0 < out.metrics["test_flip_rate_mean"] < 0.5


def test_reward_trainer_uses_the_head(tmp_path):
    from discoalign.train.rm.workflow import RMWorkflow

    cfg = build_config({"stage": "rm", "model_name_or_path": "builtin:tiny-qwen3", "cutoff_len": 64,
                        "output_dir": str(tmp_path), "save_strategy": "no", "use_cpu": True, "do_train": True, "disable_tqdm": True,
                        **RUN, "add_flip_head": True, "use_flip_rate": True})  # fmt: skip
    trainer = RMWorkflow().build_trainer(cfg, None)[0]
    before = trainer.model.flip_head.summary.bias.detach().clone()
    trainer.train()
    assert not torch.equal(trainer.model.flip_head.summary.bias, before)


# ---- the interior beta head (`beta_head_kind: exp`) ----------------------------------------------------------


def test_exp_beta_head_centring_gives_zero_mean_log_scale_for_any_weight():
    from discoalign.models.heads import BetaHead

    torch.manual_seed(0)
    features = torch.randn(40, 8) * 2 + 3
    head = BetaHead(8, 0.8, kind="exp")
    head.train()(features)  # folds the data into the running mean (the offset c stays 0 for this kind)
    with torch.no_grad():
        head.summary.weight.normal_()
    s = head.eval()(features)
    assert head.logit_offset.item() == 0.0
    assert abs(torch.log(s).mean().item()) < 1e-5  # E[log s] = E[u] = 0 over the data
    u = (features - features.mean(0)) @ head.summary.weight.squeeze(0)
    assert torch.allclose(s, torch.exp(u), rtol=1e-5)  # s = exp(u), unbounded above and below


def test_exp_beta_head_penalty_by_hand():
    torch.manual_seed(1)
    pc, pr, rc, rr = (torch.randn(5) for _ in range(4))
    u = torch.tensor([-0.5, 0.0, 0.3, 1.0, -1.2], requires_grad=True)
    batch = PairBatch(pc, pr, rc, rr, torch.ones(5), torch.ones(5), prompt_heads={"beta_head": torch.exp(u)})
    lam, beta = 2.0, 0.1
    out = DPOObjective(DPOSettings(pref_beta=beta, beta_source="head", beta_log_prior=lam))(batch, training=True)
    out.loss.backward()
    d = (pc - rc) - (pr - rr)
    for i in range(5):
        ui, di = u[i].item(), d[i].item()
        z = beta * math.exp(ui) * di
        assert out.losses[i].item() == pytest.approx(-math.log(_sig(z)) + lam / 2 * ui**2, rel=1e-5)
        # d/du: the likelihood's pull -z s(-z) plus the Gaussian prior's lam u: zero at an interior u
        assert u.grad[i].item() == pytest.approx((-z * _sig(-z) + lam * ui) / 5, rel=1e-4, abs=1e-7)
    # without the prior (the tanh head's setting) the same call has no penalty
    plain = DPOObjective(DPOSettings(pref_beta=beta, beta_source="head"))(batch, training=True)
    assert torch.allclose(plain.losses, -F.logsigmoid(beta * torch.exp(u.detach()) * d))


def test_margin_scale_is_a_bias_corrected_running_rms_updated_in_training_only():
    from discoalign.losses.flip import MarginScale

    scale = MarginScale()
    assert scale(torch.tensor([3.0, 4.0]), training=False) == 1.0  # nothing seen yet
    assert scale(torch.tensor([3.0, 4.0]), training=True) == pytest.approx(math.sqrt(12.5))  # first batch: its RMS
    r = MarginScale.RATE
    expected = ((1 - r) * r * 12.5 + r * 1.5) / ((1 - r) * r + r)
    assert scale(torch.tensor([1.0, -1.0, 2.0, 0.0]) * 1.0, training=True) == pytest.approx(math.sqrt(expected))
    assert scale(torch.tensor([100.0]), training=False) == pytest.approx(math.sqrt(expected))  # eval reads only


def test_unused_flip_head_changes_no_number(tmp_path):
    plain_losses, plain_weights, _ = train_recorded(dpo_trainer(tmp_path / "plain", RUN))
    losses, weights, trainer = train_recorded(dpo_trainer(tmp_path / "head", RUN, add_flip_head=True))
    assert torch.equal(plain_losses, losses)
    assert all(torch.equal(plain_weights[k], weights[k]) for k in plain_weights)
    assert torch.equal(trainer.model.flip_head.summary.weight, torch.zeros_like(trainer.model.flip_head.summary.weight))
