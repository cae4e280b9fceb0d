"""DPO-side speed switches leave the numbers alone: loss and gradients equal the plain path's to 1e-5.

* `pack_pairs` (prompt once, chosen and rejected in one row) with a live reference, with LoRA (reference =
  adapters off), and with precomputed reference log-probs; on the grid cell that reads every head (DiscoDPO
  variance at the end of each response, dynamic beta at the reference's last prompt token).
* `logps_chunk_size` (memory-efficient chunked log-probs) against 0, the plain full log-softmax.
* `reference_inference_mode` against `torch.no_grad`.
"""

from __future__ import annotations

import pytest
import torch
from helpers import GRID_CELL, dpo_trainer

TOL = 1e-5
RUN = {"synthetic_num_pairs": 8, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "pref_beta": 0.5}


def make_trainer(tmp_path, **overrides):
    return dpo_trainer(tmp_path, RUN, **overrides)


def perturb(model: torch.nn.Module, seed: int = 5) -> None:
    """Move the heads (and LoRA B matrices) off their zero init, so every head changes the loss."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith(("variance_head.", "beta_head.")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def loss_and_grads(trainer, rows=None) -> tuple[float, dict[str, torch.Tensor]]:
    rows = rows if rows is not None else [trainer.train_dataset[i] for i in range(4)]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def assert_equal_runs(a, b) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(loss_a - loss_b) < TOL, (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        diff = (grads_a[name] - grads_b[name]).abs().max().item()
        assert diff < TOL, (name, diff)


def test_packed_pairs_live_reference_every_head(tmp_path, ref_dir):
    keys = {**GRID_CELL, "ref_model_name_or_path": ref_dir}
    plain = make_trainer(tmp_path / "plain", **keys)
    packed = make_trainer(tmp_path / "packed", pack_pairs=True, **keys)
    perturb(plain.model)
    packed.model.load_state_dict(plain.model.state_dict())
    rows = [plain.train_dataset[i] for i in range(4)]
    batch = packed.data_collator(rows)
    assert "segment_ids" in batch and batch["input_ids"].shape[0] == 4  # one row per pair
    first = loss_and_grads(plain, rows)
    assert_equal_runs(first, loss_and_grads(packed, rows))
    assert first[1]["beta_head.summary.weight"].abs().sum() > 0  # the beta head is in the comparison
    assert first[1]["variance_head.summary.weight"].abs().sum() > 0


def test_packed_pairs_lora_reference(tmp_path):
    keys = {"finetuning_type": "lora", "lora_rank": 4, "add_disco_head": True, "disco_pref": True}
    plain = make_trainer(tmp_path / "plain", **keys)
    packed = make_trainer(tmp_path / "packed", pack_pairs=True, **keys)
    perturb(plain.model)
    packed.model.load_state_dict(plain.model.state_dict())
    assert_equal_runs(loss_and_grads(plain), loss_and_grads(packed))


def test_packed_pairs_precomputed_reference(tmp_path, ref_dir):
    keys = {**GRID_CELL, "ref_model_name_or_path": ref_dir, "precompute_ref_logps": True}
    plain = make_trainer(tmp_path / "plain", **keys)
    packed = make_trainer(tmp_path / "packed", pack_pairs=True, **keys)
    for column in ("ref_chosen_logps", "ref_rejected_logps", "ref_prompt_hidden"):
        a = torch.tensor(plain.train_dataset[column])
        b = torch.tensor(packed.train_dataset[column])
        assert torch.allclose(a, b, atol=TOL), column
    perturb(plain.model)
    packed.model.load_state_dict(plain.model.state_dict())
    assert_equal_runs(loss_and_grads(plain), loss_and_grads(packed))


@pytest.mark.parametrize("chunk_size", [3, 512])
def test_chunked_logps_equal_full_log_softmax(tmp_path, ref_dir, chunk_size):
    keys = {**GRID_CELL, "ref_model_name_or_path": ref_dir}
    full = make_trainer(tmp_path / "full", logps_chunk_size=0, **keys)
    chunked = make_trainer(tmp_path / "chunked", logps_chunk_size=chunk_size, **keys)
    perturb(full.model)
    chunked.model.load_state_dict(full.model.state_dict())
    assert_equal_runs(loss_and_grads(full), loss_and_grads(chunked))


def test_chunked_logps_never_build_batch_by_length_by_vocab_logits(tmp_path, ref_dir):
    trainer = make_trainer(tmp_path, ref_model_name_or_path=ref_dir, logps_chunk_size=16)
    widest: list[int] = []
    record = lambda module, args, out: widest.append(out.reshape(-1, out.shape[-1]).shape[0])  # noqa: E731
    hook = trainer.model.lm_head.register_forward_hook(record)
    loss_and_grads(trainer)
    hook.remove()
    assert widest and max(widest) <= 16  # never (2B x T) rows of logits at once, forward or recompute


def test_negative_chunk_size_is_a_config_error(tmp_path):
    from discoalign.errors import ConfigError

    with pytest.raises(ConfigError, match="`logps_chunk_size` is -1"):
        make_trainer(tmp_path, logps_chunk_size=-1)


def test_reference_under_inference_mode_equals_no_grad(tmp_path, ref_dir):
    keys = {**GRID_CELL, "ref_model_name_or_path": ref_dir}
    no_grad = make_trainer(tmp_path / "no_grad", reference_inference_mode=False, **keys)
    inference = make_trainer(tmp_path / "inference", **keys)
    perturb(no_grad.model)
    inference.model.load_state_dict(no_grad.model.state_dict())
    modes: list[bool] = []
    hook = inference.ref_model.decoder.register_forward_hook(lambda *a: modes.append(torch.is_inference_mode_enabled()))
    assert_equal_runs(loss_and_grads(no_grad), loss_and_grads(inference))
    hook.remove()
    assert modes == [True]
