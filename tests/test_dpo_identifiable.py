"""Issue 9: the beta head only redistributes `pref_beta`, DiscoDPO's variance cannot collapse, and the robust-DPO
and beta-DPO baselines compute what their papers say (numbers by hand)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import dpo_trainer

from discoalign.losses.beta_dpo import beta_dpo_batch, update_margin_statistics
from discoalign.losses.dpo import dpo_loss
from discoalign.losses.reward import disco_reward_loss
from discoalign.losses.variance import log_variance_prior
from discoalign.models.heads import BetaHead
from discoalign.train.dpo.reference import prompt_features

RUN = {
    "dataset": "builtin:synthetic-noisy",
    "synthetic_num_pairs": 48,
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 16,
    "learning_rate": 1e-3,
    "report_to": "none",
}


def make_trainer(tmp_path, **overrides):
    return dpo_trainer(tmp_path, RUN, **overrides)


# ---- the beta head ------------------------------------------------------------------------------------------


def test_centred_head_has_no_bias_and_zero_mean_logit_for_any_weight():
    torch.manual_seed(0)
    features = torch.randn(50, 8) * 3 + 5  # far from centred
    head = BetaHead(8, 0.5)
    assert head.centered and head.summary.bias is None
    for chunk in torch.split(features, 1) + torch.split(features, 7):
        head.train()(chunk)
    # cumulative mean over everything seen (the data twice) is the data mean
    assert torch.allclose(head.feature_mean, features.mean(0), atol=1e-5)
    assert head.feature_count.item() == 100
    with torch.no_grad():
        head.summary.weight.normal_()
    head.eval()
    u = head.logit(features)
    assert abs(u.mean().item()) < 1e-4 * u.abs().mean().item()  # exactly centred for this w, as for any w
    # eval reads the statistics but never updates them
    head(features[:3] + 100)
    assert head.feature_count.item() == 100


def test_uncentred_head_for_ppo_keeps_its_bias():
    head = BetaHead(8, 0.5, centered=False)
    assert head.summary.bias is not None
    x = torch.randn(4, 8)
    head.train()(x)
    assert head.feature_count.item() == 0  # no statistics: the PPO controller has a KL target instead


def _data_mean_scale(trainer) -> tuple[float, float]:
    """Mean and spread of s(x) = beta / pref_beta over the training pairs, read with the trained head."""
    out = trainer.predict(trainer.train_dataset)
    s = torch.tensor(out.predictions[:, 2]) / trainer.finetuning_args.pref_beta
    return s.mean().item(), s.std().item()


@pytest.mark.slow
def test_mean_beta_stays_within_5_percent_at_batch_size_1(tmp_path):
    """The issue's bound: batch size 1, a fast beta head, two epochs. The uncentred head (bias, no centring) of
    the same run drifts to a bound of (1 - eps, 1 + eps); the centred one only redistributes."""
    from transformers import TrainerCallback

    # the bounded head this test is about (DPO's default is `exp`, whose E[log s] = 0 holds by construction);
    # default lr ratio (10), eps (0.8)
    common = dict(add_beta_head=True, use_dynamic_beta=True, beta_head_kind="tanh", num_train_epochs=2)
    centred = make_trainer(tmp_path / "centred", **common)
    # the reference features of every training pair, to read the data mean of s(x) *through* training
    loader = [centred.data_collator([centred.train_dataset[i] for i in range(j, min(j + 16, 48))]) for j in (0, 16, 32)]
    with torch.no_grad():
        features = torch.cat([centred.reference_forward(centred._prepare_inputs(b))[2] for b in loader])
    means = []

    class DataMeanOfS(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % 8 == 0:
                head = centred.model.beta_head
                head.eval()
                with torch.no_grad():
                    means.append(head(features).mean().item())
                head.train()

    centred.add_callback(DataMeanOfS())
    centred.train()
    print("data mean of s every 8 steps:", [round(m, 4) for m in means])
    assert len(means) == 12 and max(abs(m - 1.0) for m in means) < 0.05, means
    mean, spread = _data_mean_scale(centred)
    assert abs(mean - 1.0) < 0.05
    assert spread > 0.02  # it did learn something: beta differs across contexts

    uncentred = make_trainer(tmp_path / "uncentred", **common)
    head = uncentred.model.beta_head
    uncentred.model.beta_head = BetaHead(head.summary.in_features, head.epsilon, centered=False)
    uncentred.optimizer = None
    uncentred.train()
    drifted, _ = _data_mean_scale(uncentred)
    assert abs(drifted - 1.0) > 0.1  # the identifiability problem the centring removes: it saturates


def test_beta_head_statistics_are_saved_and_loaded(tmp_path):
    from discoalign.models.checkpoint import load_heads, save_checkpoint

    trainer = make_trainer(tmp_path / "a", add_beta_head=True, use_dynamic_beta=True, max_steps=3)
    trainer.train()
    head = trainer.model.beta_head
    assert head.feature_count.item() == 3  # one feature per step at batch size 1
    save_checkpoint(trainer.model, str(tmp_path / "ckpt"))
    fresh = make_trainer(tmp_path / "b", add_beta_head=True, use_dynamic_beta=True, max_steps=3).model
    assert fresh.beta_head.feature_count.item() == 0
    assert load_heads(fresh, str(tmp_path / "ckpt"))["beta_head"] == "loaded"
    assert torch.equal(fresh.beta_head.feature_mean, head.feature_mean)
    assert fresh.beta_head.feature_count.item() == 3


def test_old_uncentred_beta_checkpoint_loads_without_its_bias(tmp_path, caplog):
    import json
    import logging

    from safetensors.torch import save_file

    from discoalign.models.checkpoint import load_heads

    model = make_trainer(tmp_path / "a", add_beta_head=True, use_dynamic_beta=True, max_steps=1).model
    hidden = model.beta_head.summary.in_features
    ckpt = tmp_path / "old"
    ckpt.mkdir()
    weight = torch.full((1, hidden), 0.25)
    save_file({"beta_head.summary.weight": weight, "beta_head.summary.bias": torch.tensor([0.7])},
              str(ckpt / "heads.safetensors"))  # fmt: skip
    (ckpt / "heads_config.json").write_text(json.dumps({"beta_head": True, "beta_head_epsilon": 0.5}))
    with caplog.at_level(logging.WARNING, logger="discoalign"):
        assert load_heads(model, str(ckpt))["beta_head"] == "loaded"
    assert torch.equal(model.beta_head.summary.weight, weight)
    assert "nonzero bias" in caplog.text


def test_prompt_mean_pooling_by_hand_and_equal_across_layouts():
    torch.manual_seed(0)
    hidden = torch.randn(4, 6, 3)  # (2B, T, H) with B = 2: rows 0, 1 chosen
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1] * 6, [1] * 6])  # row 1 left-padded
    last = torch.tensor([1, 3])
    got = prompt_features(hidden, mask, last, "mean")
    assert torch.allclose(got[0], hidden[0, :2].mean(0))
    assert torch.allclose(got[1], hidden[1, 2:4].mean(0))  # padding excluded
    assert torch.equal(prompt_features(hidden, mask, last, "last"), torch.stack([hidden[0, 1], hidden[1, 3]]))


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_reference_features_equal_with_and_without_pair_packing(tmp_path, pooling):
    common = dict(add_beta_head=True, use_dynamic_beta=True, beta_head_pooling=pooling, per_device_train_batch_size=3,
                  attn_implementation="eager")  # fmt: skip
    plain = make_trainer(tmp_path / "plain", **common)
    packed = make_trainer(tmp_path / "packed", pack_pairs=True, **common)
    rows = [plain.train_dataset[i] for i in range(3)]
    feats = []
    for trainer in (plain, packed):
        batch = trainer._prepare_inputs(trainer.data_collator(rows))
        feats.append(trainer.reference_forward(batch)[2])
    assert torch.allclose(feats[0], feats[1], atol=1e-5)


# ---- DiscoDPO's variance ------------------------------------------------------------------------------------


def _reference_grad(z: float) -> float:
    """d/dz of -log Phi(z) in float64 by the stable asymptotic-free route (torch float64 autograd)."""
    t = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    (-torch.special.log_ndtr(t)).backward()
    return t.grad.item()


@pytest.mark.parametrize("z", [-1e4, -1e3, -30.0, 2.0])
def test_disco_gradients_exact_at_very_negative_z(z):
    expected = _reference_grad(z)
    # DiscoDPO: z = beta d / sqrt(var_w + var_l) with beta 0.1, variances 0.5 each -> z = 0.1 d
    d = torch.tensor([z / 0.1], requires_grad=True)
    zero = torch.zeros(1)
    loss, _, _ = dpo_loss(
        d, zero, zero, zero, 0.1, chosen_var=torch.full((1,), 0.5), rejected_var=torch.full((1,), 0.5)
    )
    loss.sum().backward()
    assert d.grad.item() * 10 == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(-torch.special.log_ndtr(torch.tensor(z, dtype=torch.float64)).item(), rel=1e-6)
    # Disco reward loss: z = (mu_c - mu_r) / sqrt(0.5 + 0.5)
    mu = torch.tensor([z], requires_grad=True)
    disco_reward_loss(mu, torch.zeros(1), torch.full((1,), 0.5), torch.full((1,), 0.5)).sum().backward()
    assert mu.grad.item() == pytest.approx(expected, rel=1e-5)
    if z <= -1e3:  # what fp32 log_ndtr got wrong (the issue: -955.6 at z = -1000)
        t = torch.tensor(z, dtype=torch.float32, requires_grad=True)
        (-torch.special.log_ndtr(t)).backward()
        assert abs(t.grad.item() - expected) > 1e-3 * abs(expected)


def test_log_variance_prior_by_hand():
    var = torch.tensor([1.0, math.e, 0.5])
    assert torch.allclose(log_variance_prior(var, 0.2), torch.tensor([0.0, 0.1, 0.1 * math.log(0.5) ** 2]))
    assert torch.equal(log_variance_prior(var, 0.0), torch.zeros(3))


@pytest.mark.parametrize("prior", [0.0, 0.03, 0.1])
def test_variances_stay_above_1e_3_on_separable_data(prior):
    """A long run on separable pairs (the issue's toy): margins fixed and all correct, variances learned with Adam.
    Without the prior the variances head for the floor (the collapse of the issue); with it they stay well above
    1e-3, at the bound derived in docs/disco_variance.md."""
    torch.manual_seed(0)
    n = 64
    d = torch.randn(n).abs() * 5 + 1  # every pair ordered correctly; z = 0.1 d / sqrt(2) at the start
    raw = torch.nn.Parameter(torch.full((2, n), math.log(math.e - 1)))  # softplus -> variance 1
    opt = torch.optim.Adam([raw], lr=0.05)
    zero = torch.zeros(n)
    for _ in range(2000):
        var = F.softplus(raw) + 1e-6
        loss, _, _ = dpo_loss(d, zero, zero, zero, 0.1, chosen_var=var[0], rejected_var=var[1])
        loss = loss + log_variance_prior(var[0], prior) + log_variance_prior(var[1], prior)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    var = F.softplus(raw) + 1e-6
    if prior:
        assert var.min().item() > 1e-3
        assert var.min().item() > math.exp(-0.15 / prior) * 0.9  # the bound derived in docs/disco_variance.md
    else:
        assert var.min().item() < 1e-3  # the collapse the prior prevents


# ---- baselines ------------------------------------------------------------------------------------------------


def test_robust_dpo_by_hand():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    beta, eps = 0.5, 0.2
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, loss_type="robust", label_smoothing=eps)
    for i in range(2):
        d = (pc[i] - rc[i] - pr[i] + rr[i]).item()
        logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
        expected = (-(1 - eps) * logsig(beta * d) + eps * logsig(-beta * d)) / (1 - 2 * eps)
        assert losses[i].item() == pytest.approx(expected, abs=1e-6)


def test_robust_dpo_is_unbiased_under_known_flips():
    """E over label flips of the robust loss equals the clean loss (Chowdhury et al. 2024, Lemma 3.1)."""
    d = torch.linspace(-3, 3, 13)
    zero = torch.zeros_like(d)
    eps = 0.3
    clean, _, _ = dpo_loss(d, zero, zero, zero, 1.0)
    kept, _, _ = dpo_loss(d, zero, zero, zero, 1.0, loss_type="robust", label_smoothing=eps)
    flipped, _, _ = dpo_loss(-d, zero, zero, zero, 1.0, loss_type="robust", label_smoothing=eps)
    assert torch.allclose((1 - eps) * kept + eps * flipped, clean, atol=1e-6)


def test_beta_dpo_statistics_filter_and_beta_by_hand():
    d1 = torch.tensor([1.0, 2.0, 3.0, 10.0])
    mean, std = update_margin_statistics(d1, None, None)
    assert mean.item() == pytest.approx(4.0) and std.item() == pytest.approx(float(d1.std(unbiased=False)))
    d2 = torch.tensor([0.0, 2.0])
    mean2, std2 = update_margin_statistics(d2, mean, std)
    assert mean2.item() == pytest.approx(0.9 * 4.0 + 0.1 * 1.0)
    assert std2.item() == pytest.approx(0.9 * std.item() + 0.1 * 1.0)
    # no filtering: beta = pref_beta * (1 + alpha * (mean(d) - M0))
    beta, keep = beta_dpo_batch(d1, mean2, std2, 0.1, 0.6, 0.0)
    assert keep.all() and beta.item() == pytest.approx(0.1 * (1 + 0.6 * (4.0 - mean2.item())))
    # filter 25% of 4 pairs: the outlier (10, weight ~ e^-8) is the one dropped, with near certainty
    g = torch.Generator().manual_seed(0)
    beta, keep = beta_dpo_batch(d1, torch.tensor(2.0), torch.tensor(1.0), 0.1, 0.6, 0.25, generator=g)
    assert keep.tolist() == [True, True, True, False]
    assert beta.item() == pytest.approx(0.1 * (1 + 0.6 * (2.0 - 2.0)))
    # the paper's floor: a batch far below M0
    beta, _ = beta_dpo_batch(torch.tensor([-100.0]), torch.tensor(0.0), torch.tensor(1.0), 0.1, 0.6, 0.0)
    assert beta.item() == pytest.approx(1e-3)


def test_beta_dpo_trainer_loss_is_the_kept_pairs_mean(tmp_path):
    trainer = make_trainer(tmp_path, pref_beta_mode="batch", per_device_train_batch_size=4, max_steps=2,
                           beta_dpo_filter=0.5, learning_rate=1e-2)  # fmt: skip
    trainer.train()  # the running statistics exist after training batches
    assert trainer.objective.margin_mean is not None
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    trainer.model.train()
    mean_before, std_before = trainer.objective.margin_mean.clone(), trainer.objective.margin_std.clone()
    torch.manual_seed(5)
    pairs, result = trainer.pair_forward(trainer.model, batch)
    c, r = pairs.chosen_logps.detach(), pairs.rejected_logps.detach()
    d = (c - pairs.ref_chosen_logps) - (r - pairs.ref_rejected_logps)
    m0, sd = update_margin_statistics(d, mean_before, std_before)
    torch.manual_seed(5)
    beta, keep = beta_dpo_batch(d, m0, sd, 0.1, 0.6, 0.5)
    assert keep.sum().item() == 2
    losses = -F.logsigmoid(beta * d)
    assert result.loss.item() == pytest.approx(losses[keep].mean().item(), abs=1e-6)
    assert float(result.beta) == pytest.approx(beta.item(), abs=1e-7)


def test_ipo_rewards_are_logged_on_the_loss_scale(tmp_path):
    """IPO's loss uses length-averaged log-probs; `rewards/*` are logged on that scale, as TRL logs them."""
    from discoalign.losses.logps import response_lengths

    trainer = make_trainer(tmp_path, pref_loss="ipo", per_device_train_batch_size=2, max_steps=1)
    trainer.train()
    trainer.model.train()
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
    trainer._stored_metrics["train"].clear()
    with torch.no_grad():
        pairs, _ = trainer.pair_forward(trainer.model, batch)
        trainer.compute_loss(trainer.model, batch)
    lengths = response_lengths(batch["labels"]).clamp(min=1)
    per_token = (pairs.chosen_logps - pairs.ref_chosen_logps) / lengths[:2]
    logged = trainer._stored_metrics["train"]["rewards/chosen"][-1]
    assert logged == pytest.approx(0.1 * per_token.mean().item(), rel=1e-5)
    summed = 0.1 * (pairs.chosen_logps - pairs.ref_chosen_logps).mean().item()
    assert abs(logged - summed) > 1e-6  # the two scales differ, so the test can tell them apart
