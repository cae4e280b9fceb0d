"""Every speed switch leaves the numbers alone: its loss and gradients equal the plain path's to 1e-5.

Switches covered here: `pack_pairs` (one row per pair, the prompt once; through the 4-D mask with eager attention,
through the segment-aware sdpa with sdpa), `group_by_length` (length-grouped batches), and the
last-hidden-state-only backbone call. The DPO-side switches (chunked log-probs, reference under
`torch.inference_mode`) and DPO with packed pairs are in test_perf_dpo_switches.py.
"""

from __future__ import annotations

import pytest
import torch

from discoalign.config import build_config
from discoalign.config.attention import PAIR_SDPA
from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.data.collator import PairwiseCollator
from discoalign.data.packing import pack_pair_rows
from discoalign.errors import ConfigError
from discoalign.models.loader import load_model_with_heads
from discoalign.models.pair_attention import pair_attention_mask
from discoalign.train.rm.trainer import RewardTrainer

TOL = 1e-5


def pair_rows(eos: int, n: int = 5, seed: int = 0) -> list[dict]:
    """Pairs of unequal prompt / chosen / rejected lengths (one prompt of a single token), with margins."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        lengths = torch.randint(1, 9, (3,), generator=g).tolist()
        prompt_len = 1 if i == 0 else lengths[0] + 2
        ids = lambda k: torch.randint(10, 400, (k,), generator=g).tolist()  # noqa: E731
        rows.append(
            {
                "prompt_input_ids": ids(prompt_len),
                "chosen_input_ids": ids(lengths[1]) + [eos],
                "rejected_input_ids": ids(lengths[2]) + [eos],
                "margin": 0.1 * i,
            }
        )
    return rows


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=TOL, rtol=0), (name, (a[name] - b[name]).abs().max().item())


def rm_loss_and_grads(trainer: RewardTrainer, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    return loss.item(), grads(trainer.model)


def rm_trainer(tmp_path, model_dir: str, attn: str | None = "sdpa", **keys) -> RewardTrainer:
    raw = {"stage": "rm", "model_name_or_path": model_dir, "output_dir": str(tmp_path / "out"), "use_cpu": True}
    raw.update(keys)
    if attn is not None:
        raw["attn_implementation"] = attn
    cfg = build_config(raw)
    model, tokenizer = load_model_with_heads(cfg.model, cfg.finetuning, add_value_head=True)
    model.train()
    for module in model.modules():  # GPT-2 has dropout: identical numbers need identical (no) random draws
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return RewardTrainer(model, cfg, data_collator=PairwiseCollator(tokenizer.pad_token_id), processing_class=tokenizer)


# ---- pack_pairs: the layout itself ---------------------------------------------------------------------


def test_packed_layout_by_hand():
    batch = pack_pair_rows([([5, 6, 7], [8, 9], [10]), ([11], [12], [13, 14, 15])], pad_token_id=0)
    # row 0: prompt[:-1]=5 6 | 7 8 9 | 7 10 ; row 1: (empty shared) | 11 12 | 11 13 14 15
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 7, 10], [11, 12, 11, 13, 14, 15, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 0, 1, 2, 3, 0]]
    assert batch["segment_ids"].tolist() == [[0, 0, 1, 1, 1, 2, 2], [1, 1, 2, 2, 2, 2, -1]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 6 + [0]]
    x = -100
    assert batch["labels"].tolist() == [
        [x, x, x, 8, 9, x, x],  # chosen of pair 0
        [x, 12, x, x, x, x, x],  # chosen of pair 1
        [x, x, x, x, x, x, 10],  # rejected of pair 0
        [x, x, x, 13, 14, 15, x],  # rejected of pair 1
    ]
    assert batch["prompt_last_index"].tolist() == [2, 0, 5, 2]
    assert batch["score_index"].tolist() == [4, 7 + 1, 6, 7 + 5]  # flat index into (B * L)


def test_pair_mask_by_hand():
    segments = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    visible = pair_attention_mask(segments, "sdpa", torch.float32)[0, 0].int().tolist()
    assert visible == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # rejected sees the prompt, not chosen
        [1, 1, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],  # padding sees itself only: no empty softmax row
    ]
    additive = pair_attention_mask(segments, "eager", torch.float32)[0, 0]
    assert additive[4, 2].item() == torch.finfo(torch.float32).min and additive[4, 1].item() == 0.0


def test_segment_aware_sdpa_equals_sdpa_with_the_full_mask_values_and_grads():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from discoalign.models.pair_attention import pair_sdpa_attention

    batch = pack_pair_rows([([5, 6, 7, 8], [9, 10], [11, 12, 13]), ([14], [15, 16, 17], [18])], pad_token_id=0)
    segments = [tuple(r) for r in batch["pair_segments"].tolist()]
    assert segments == [(3, 3, 4), (0, 4, 2)]
    length = batch["input_ids"].shape[1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, length, 8, generator=g).requires_grad_(True) for h in (4, 2, 2))  # GQA 4 / 2
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    mask = pair_attention_mask(batch["segment_ids"], "sdpa", torch.float32)
    real = batch["attention_mask"].bool()
    outputs, grads = [], []
    for fn, kwargs in ((sdpa_attention_forward, {}), (pair_sdpa_attention, {"pair_segments": segments})):
        out, _ = fn(module, q, k, v, mask, scaling=0.3, **kwargs)
        (out[real] * torch.arange(out[real].numel()).reshape(out[real].shape).sin()).sum().backward()
        outputs.append(out[real].detach())
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    assert torch.allclose(outputs[0], outputs[1], atol=TOL)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=TOL)


# ---- pack_pairs: reward modelling equals the plain layout ------------------------------------------------


@pytest.mark.parametrize(
    "arch,attn,disco",
    [("qwen3", "sdpa", False), ("qwen3", "eager", True), ("llama", "sdpa", True), ("gpt2", "sdpa", False)],
)
def test_rm_packed_pairs_equal_plain_loss_and_grads(tmp_path, tiny_dirs, arch, attn, disco):
    keys = {"add_disco_head": disco, "disco_pref": disco, "center_rewards_coefficient": 0.01}
    plain = rm_trainer(tmp_path, tiny_dirs[arch], attn, **keys)
    packed = rm_trainer(tmp_path, tiny_dirs[arch], attn, pack_pairs=True, **keys)
    packed.model.load_state_dict(plain.model.state_dict())  # identical value head (its init draws RNG)
    assert packed.data_collator.pack_pairs and not plain.data_collator.pack_pairs
    # sdpa models run packed pairs through the segment-aware sdpa; eager through the 4-D mask
    assert packed.model.config._attn_implementation == (PAIR_SDPA if attn == "sdpa" else attn)

    rows = pair_rows(plain.processing_class.eos_token_id)
    loss_plain, grads_plain = rm_loss_and_grads(plain, plain.data_collator(rows))
    packed_batch = packed.data_collator(rows)
    loss_packed, grads_packed = rm_loss_and_grads(packed, packed_batch)

    assert abs(loss_plain - loss_packed) < TOL, (loss_plain, loss_packed)
    assert_same_grads(grads_plain, grads_packed)
    # fewer tokens went through the model: each prompt (but its last token) once instead of twice
    plain_tokens = plain.data_collator(rows)["attention_mask"].sum().item()
    assert packed_batch["attention_mask"].sum().item() == plain_tokens - sum(
        len(r["prompt_input_ids"]) - 1 for r in rows
    )


def test_rm_packed_pairs_with_gradient_checkpointing_equal_plain(tmp_path, tiny_dirs):
    plain = rm_trainer(tmp_path, tiny_dirs["qwen3"])
    packed = rm_trainer(tmp_path, tiny_dirs["qwen3"], pack_pairs=True)
    packed.model.gradient_checkpointing_enable()  # the segment lengths must survive the recomputation
    packed.model.load_state_dict(plain.model.state_dict())
    rows = pair_rows(plain.processing_class.eos_token_id, seed=1)
    loss_plain, grads_plain = rm_loss_and_grads(plain, plain.data_collator(rows))
    loss_packed, grads_packed = rm_loss_and_grads(packed, packed.data_collator(rows))
    assert packed.model.is_gradient_checkpointing
    assert abs(loss_plain - loss_packed) < TOL
    assert_same_grads(grads_plain, grads_packed)


def test_rm_packed_eval_predictions_equal_plain(tmp_path, tiny_dirs):
    plain = rm_trainer(tmp_path, tiny_dirs["qwen3"], add_disco_head=True, disco_pref=True)
    packed = rm_trainer(tmp_path, tiny_dirs["qwen3"], pack_pairs=True, add_disco_head=True, disco_pref=True)
    packed.model.load_state_dict(plain.model.state_dict())
    rows = pair_rows(plain.processing_class.eos_token_id, seed=3)
    loss_a, preds_a, _ = plain.prediction_step(plain.model, plain.data_collator(rows), False)
    loss_b, preds_b, _ = packed.prediction_step(packed.model, packed.data_collator(rows), False)
    assert abs(loss_a.item() - loss_b.item()) < TOL
    assert torch.allclose(preds_a, preds_b, atol=TOL)


def test_pack_pairs_refuses_flash_attention_with_a_clear_message(tmp_path, tiny_dirs):
    trainer = rm_trainer(tmp_path, tiny_dirs["qwen3"])
    trainer.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError) as err:
        trainer._enable_pair_packing(trainer.model)
    message = str(err.value)
    assert "`pack_pairs: true`" in message and "flash_attention_2" in message and "attn_implementation" in message


def test_pack_pairs_refuses_media_models_with_a_clear_message(tmp_path, tiny_dirs):
    from discoalign.models.modality import ActorModality

    trainer = rm_trainer(tmp_path, tiny_dirs["qwen3"])
    trainer.model.modality = ActorModality.VISION_LANGUAGE
    with pytest.raises(ConfigError, match="`pack_pairs: true` supports text-only models"):
        trainer._enable_pair_packing(trainer.model)


# ---- group_by_length -----------------------------------------------------------------------------------


def _epoch_loss_and_grads(trainer: RewardTrainer) -> tuple[dict[int, float], dict[str, torch.Tensor], int]:
    """Per-pair losses over one epoch (by row index), the gradient of the epoch's mean loss, and padded tokens."""
    trainer.model.zero_grad(set_to_none=True)
    sampler = trainer._get_train_sampler()
    order = list(iter(sampler))
    dataset = trainer.train_dataset
    batch_size = trainer.args.per_device_train_batch_size
    per_pair: dict[int, float] = {}
    padding = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = trainer.data_collator([dataset[i] for i in idx])
        padding += (batch["attention_mask"] == 0).sum().item()
        pairs, _ = trainer.pair_scores(trainer.model, batch, with_variance=False)
        mu_c, mu_r = pairs.chosen_mean, pairs.rejected_mean
        losses = torch.nn.functional.softplus(-(mu_c - mu_r))  # -log sigmoid, per pair
        (losses.sum() / len(order)).backward()
        per_pair.update({i: l.item() for i, l in zip(idx, losses)})
    return per_pair, grads(trainer.model), padding


def test_group_by_length_same_per_pair_losses_and_epoch_gradient_less_padding(tmp_path, tiny_dirs):
    from datasets import Dataset

    tokenizer_eos = 2
    # 64 pairs in batches of 4: the sampler sorts mega-batches of 16 (fewer pairs would leave nothing to group)
    rows = pair_rows(tokenizer_eos, n=64, seed=5)
    for i, row in enumerate(rows):  # widely different lengths, shuffled
        row["chosen_input_ids"] = row["chosen_input_ids"] * (1 + (i * 7) % 5)
    dataset = Dataset.from_list(rows)
    keys = {"per_device_train_batch_size": 4, "seed": 3}
    plain = rm_trainer(tmp_path, tiny_dirs["qwen3"], **keys)
    grouped = rm_trainer(tmp_path, tiny_dirs["qwen3"], group_by_length=True, **keys)
    grouped.model.load_state_dict(plain.model.state_dict())
    plain.train_dataset = grouped.train_dataset = dataset

    from transformers.trainer_pt_utils import LengthGroupedSampler

    assert isinstance(grouped._get_train_sampler(), LengthGroupedSampler)
    assert not isinstance(plain._get_train_sampler(), LengthGroupedSampler)
    torch.manual_seed(0)
    losses_a, grads_a, pad_a = _epoch_loss_and_grads(plain)
    torch.manual_seed(0)
    losses_b, grads_b, pad_b = _epoch_loss_and_grads(grouped)
    assert losses_a.keys() == losses_b.keys() == set(range(64))
    for i in losses_a:
        assert abs(losses_a[i] - losses_b[i]) < TOL
    assert_same_grads(grads_a, grads_b)
    assert pad_b < 0.7 * pad_a, (pad_a, pad_b)


def test_group_by_length_also_honours_train_sampling_strategy(tmp_path, tiny_dirs):
    from datasets import Dataset
    from transformers.trainer_pt_utils import LengthGroupedSampler

    trainer = rm_trainer(tmp_path, tiny_dirs["qwen3"], train_sampling_strategy="group_by_length", pack_pairs=True)
    trainer.train_dataset = Dataset.from_list(pair_rows(2, n=6))
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    rows = pair_rows(2, n=6)
    assert sampler.lengths == [
        len(r["prompt_input_ids"]) + len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) + 1 for r in rows
    ]


# ---- the backbone keeps the last hidden state only -----------------------------------------------------


def test_last_hidden_state_equals_output_hidden_states_and_keeps_one_layer(tiny_dirs):
    model, tokenizer = load_model_with_heads(
        ModelArguments(model_name_or_path=tiny_dirs["qwen3"]), FinetuningArguments(stage="rm"), add_value_head=True
    )
    batch = PairwiseCollator(tokenizer.pad_token_id)(pair_rows(tokenizer.eos_token_id))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    seen: list[tuple] = []
    hook = model.causal_lm.get_output_embeddings().register_forward_hook(lambda *a: seen.append(a))
    ours = model.hidden_states(ids, mask)
    hook.remove()
    full = model.causal_lm(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    assert not seen  # no LM-head projection: no (N, T, V) logits
    real = mask.bool()  # padding positions differ only in their (unused) position ids
    assert torch.allclose(ours[real], full.hidden_states[-1][real], atol=TOL)
    assert len(full.hidden_states) == model.config.num_hidden_layers + 1  # what the plain path would have kept
