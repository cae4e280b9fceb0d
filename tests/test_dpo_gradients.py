"""Gradients go where they should: the beta head learns only when used, the reference never changes, and
under `precompute_ref_logps` the reference runs zero times during training."""

from __future__ import annotations

import pytest
import torch
from helpers import dpo_trainer, record_losses, snapshot

RUN = {
    "synthetic_num_pairs": 12,
    "max_steps": 3,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 4,
    "learning_rate": 1e-2,
}


def make_trainer(tmp_path, **overrides):
    return dpo_trainer(tmp_path, RUN, **overrides)


def first_batch(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(2)])


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
@pytest.mark.parametrize("use_dynamic_beta", [True, False])
def test_beta_head_gets_gradient_only_when_used(tmp_path, finetuning_type, use_dynamic_beta):
    trainer = make_trainer(
        tmp_path, add_beta_head=True, use_dynamic_beta=use_dynamic_beta, finetuning_type=finetuning_type, max_steps=1
    )
    # At step 0 the policy equals the reference, d = 0, and dL/dbeta = 0 for any loss: take one step first.
    trainer.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer.compute_loss(trainer.model, first_batch(trainer)).backward()
    grad = trainer.model.beta_head.summary.weight.grad
    if use_dynamic_beta:
        assert grad is not None and grad.abs().sum() > 0
    else:
        assert grad is None or grad.abs().sum() == 0
    # the beta head reads the reference without gradient: no reference (or frozen base) weight got one
    if trainer.ref_model is not None:
        assert all(p.grad is None for p in trainer.ref_model.parameters())
    else:
        assert all(p.grad is None for n, p in trainer.model.backbone.named_parameters() if "lora_" not in n)


def test_variance_head_gets_gradient_only_with_disco_pref(tmp_path):
    for disco_pref in (True, False):
        trainer = make_trainer(tmp_path, add_disco_head=True, disco_pref=disco_pref, max_steps=1)
        trainer.train()  # off step 0, where d = 0 makes every gradient through z vanish
        trainer.model.zero_grad(set_to_none=True)
        trainer.compute_loss(trainer.model, first_batch(trainer)).backward()
        grad = trainer.model.variance_head.summary.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) if disco_pref else grad is None


def test_full_reference_weights_never_change(tmp_path):
    trainer = make_trainer(tmp_path, add_beta_head=True, use_dynamic_beta=True, add_disco_head=True, disco_pref=True)
    ref = trainer.ref_model
    before, policy_before = snapshot(ref), snapshot(trainer.model.backbone)
    assert not any(p.requires_grad for p in ref.parameters())
    trainer.train()
    after, policy_after = snapshot(ref), snapshot(trainer.model.backbone)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(policy_before[k], policy_after[k]) for k in policy_before)


def test_lora_base_weights_never_change(tmp_path):
    trainer = make_trainer(tmp_path, finetuning_type="lora", lora_rank=4, add_beta_head=True, use_dynamic_beta=True)
    before = snapshot(trainer.model.backbone)
    trainer.train()
    after = snapshot(trainer.model.backbone)
    base = [k for k in before if "lora_" not in k]
    lora = [k for k in before if "lora_B" in k]
    assert base and lora
    assert all(torch.equal(before[k], after[k]) for k in base)
    assert all(not torch.equal(before[k], after[k]) for k in lora)


class ForwardCounter:
    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1


def test_precomputed_full_reference_runs_zero_times_during_training(tmp_path, ref_dir, monkeypatch):
    import discoalign.train.dpo.workflow as workflow

    loaded = []
    load_reference = workflow.load_reference

    def keep_and_hook(cfg, policy):
        ref = load_reference(cfg, policy)
        counter = ForwardCounter()
        ref.decoder.register_forward_hook(counter)
        loaded.append((ref, counter))
        return ref

    monkeypatch.setattr(workflow, "load_reference", keep_and_hook)
    common = dict(ref_model_name_or_path=ref_dir, add_beta_head=True, use_dynamic_beta=True, logging_steps=1)
    trainer = make_trainer(tmp_path / "pre", precompute_ref_logps=True, **common)
    ((_, counter),) = loaded
    precompute_calls = counter.calls
    assert precompute_calls == 3 == trainer.reference_forward_calls  # 12 pairs / eval batch 4
    assert trainer.ref_model is None
    assert {"ref_chosen_logps", "ref_rejected_logps", "ref_prompt_hidden"} <= set(trainer.train_dataset.column_names)
    pre_losses = record_losses(trainer)
    trainer.train()
    assert counter.calls == precompute_calls and trainer.reference_forward_calls == precompute_calls

    # the same run with the reference computed on the fly gives the same losses, once its beta head is centred on
    # the same (exact) feature mean that precomputing set
    features = torch.tensor(trainer.train_dataset["ref_prompt_hidden"])
    assert torch.allclose(trainer.model.beta_head.feature_mean, features.mean(0))
    assert trainer.model.beta_head.feature_count.item() == 12
    live = make_trainer(tmp_path / "live", **common)
    live.model.beta_head.set_statistics(features.mean(0), features.shape[0])
    live_losses = record_losses(live)
    live.train()
    assert live.reference_forward_calls == 3
    assert torch.allclose(torch.stack(pre_losses), torch.stack(live_losses), atol=1e-5, rtol=0)


def test_precomputed_lora_reference_runs_zero_times_during_training(tmp_path):
    trainer = make_trainer(
        tmp_path, finetuning_type="lora", lora_rank=4, precompute_ref_logps=True, add_beta_head=True,
        use_dynamic_beta=True,
    )  # fmt: skip
    entered = ForwardCounter()
    disable_adapter = trainer.model.disable_adapter

    def counting_disable_adapter():
        entered()
        return disable_adapter()

    trainer.model.disable_adapter = counting_disable_adapter
    calls_after_precompute = trainer.reference_forward_calls
    assert calls_after_precompute == 3
    trainer.train()
    assert entered.calls == 0 and trainer.reference_forward_calls == calls_after_precompute
