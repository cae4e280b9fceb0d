"""Decoupling invariances of docs/design.md §4, bit for bit (same seed, 3 training steps), and DiscoDPO by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import dpo_config, dpo_trainer, train_recorded

from discoalign.train.dpo.workflow import build_dpo_trainer

RUN = {
    "synthetic_num_pairs": 12,
    "pref_beta": 0.1,
    "max_steps": 3,
    "per_device_train_batch_size": 2,
    "learning_rate": 1e-2,
    "logging_steps": 1,
    "seed": 0,
}


def train_three_steps(tmp_path, **overrides):
    """Train 3 steps; return (per-step losses (3,), final backbone weights, trainer)."""
    return train_recorded(dpo_trainer(tmp_path / "run", RUN, **overrides))


def assert_same_run(a, b):
    losses_a, weights_a, _ = a
    losses_b, weights_b, _ = b
    assert losses_a.shape == (3,)
    assert torch.equal(losses_a, losses_b), (losses_a, losses_b)
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return train_three_steps(tmp_path_factory.mktemp("plain"))


def test_runs_actually_train(plain):
    losses, _, _ = plain
    assert not torch.equal(losses[0], losses[2])  # the invariances below compare moving numbers


def test_a_disco_head_without_disco_pref_equals_plain_dpo(tmp_path, plain):
    # With head_dropout set too: an unused head stays out of the numbers whatever its own settings.
    run = train_three_steps(tmp_path, add_disco_head=True, disco_pref=False, head_dropout=0.1)
    assert_same_run(plain, run)
    assert run[2].model.variance_head is not None
    assert any(k.startswith("variance/") for entry in run[2].state.log_history for k in entry)


def test_b_beta_head_without_dynamic_beta_equals_plain_dpo(tmp_path, plain):
    run = train_three_steps(tmp_path, add_beta_head=True, use_dynamic_beta=False)
    assert_same_run(plain, run)
    head = run[2].model.beta_head
    assert torch.equal(head.summary.weight, torch.zeros_like(head.summary.weight))  # never trained


def test_b_lora_beta_head_without_dynamic_beta_equals_plain_lora(tmp_path):
    lora = {"finetuning_type": "lora", "lora_rank": 4}
    assert_same_run(
        train_three_steps(tmp_path / "a", **lora),
        train_three_steps(tmp_path / "b", add_beta_head=True, use_dynamic_beta=False, **lora),
    )


def test_c_zero_initialised_dynamic_beta_gives_plain_loss_at_step_0(tmp_path, plain):
    losses, _, trainer = train_three_steps(tmp_path, add_beta_head=True, use_dynamic_beta=True)
    assert torch.equal(losses[0], plain[0][0])
    # and it is a different algorithm afterwards: the head learned, so beta moved off pref_beta
    assert trainer.model.beta_head.summary.weight.abs().sum() > 0


def _by_hand_logps(backbone, batch) -> torch.Tensor:
    """Summed response log-probs from the full logits: the naive computation (2B,), float64."""
    with torch.no_grad():
        logits = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = logits[:, :-1].log_softmax(-1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    picked = torch.gather(logp, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def test_d_disco_dpo_with_variances_half_is_minus_log_ndtr_beta_d(tmp_path, ref_dir):
    cfg = dpo_config(
        tmp_path,
        RUN,
        add_disco_head=True,
        disco_pref=True,
        ref_model_name_or_path=ref_dir,
        per_device_train_batch_size=4,
    )
    trainer, _ = build_dpo_trainer(cfg)
    model = trainer.model
    model.variance_head.forward = lambda h: torch.full(h.shape[:-1], 0.5)  # var_w + var_l = 1
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch).item()

    policy = _by_hand_logps(model.backbone, batch)
    ref = _by_hand_logps(trainer.ref_model.backbone, batch)
    d = (policy[:4] - ref[:4]) - (policy[4:] - ref[4:])
    assert d.abs().min() > 1e-2  # the reference really differs from the policy
    by_hand = [-math.log(0.5 * (1.0 + math.erf(0.1 * float(di) / math.sqrt(2.0)))) for di in d]
    # plus the variance-scale prior, lambda/2 (log 0.5)^2 for each of the two responses of a pair
    prior = cfg.finetuning.disco_variance_prior
    assert prior > 0
    assert loss == pytest.approx(sum(by_hand) / 4 + prior * math.log(0.5) ** 2, abs=1e-5)
    # `disco_variance_prior: 0`: exactly -log_ndtr(beta d)
    trainer.objective.settings = dataclasses.replace(trainer.objective.settings, variance_prior=0.0)
    with torch.no_grad():
        assert trainer.compute_loss(model, batch).item() == pytest.approx(sum(by_hand) / 4, abs=1e-5)
