"""ModelWithHeads: the hidden-state path, scoring at the last real token, fp32 heads, reference context."""

from __future__ import annotations

import pytest
import torch

from discoalign.config.builtin_models import TINY_ARCHS
from discoalign.config.schema import FinetuningArguments, ModelArguments
from discoalign.models.heads import VARIANCE_FLOOR, ValueHead, VarianceHead
from discoalign.models.loader import load_model_with_heads
from discoalign.models.model_with_heads import ModelWithHeads, positions_from_mask
from discoalign.models.tiny import build_tiny_model

TEXTS = ["bright calm garden", "Topic: music. Describe a river. quick gentle brave clever kind", "x"]


def _model(arch: str, tokenizer, lora: bool = False, disco: bool = True) -> ModelWithHeads:
    torch.manual_seed(0)
    model, _ = load_model_with_heads(
        ModelArguments(model_name_or_path=f"builtin:tiny-{arch}"),
        FinetuningArguments(
            finetuning_type="lora" if lora else "full", add_disco_head=disco, head_init_std=0.3, lora_rank=4
        ),
        add_value_head=True,
    )
    with torch.no_grad():  # non-trivial heads so that a wrong token position shows in the numbers
        if model.variance_head is not None:
            model.variance_head.summary.weight.normal_(0, 0.3)
    return model


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        sl = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, sl] = torch.tensor(row)
        mask[i, sl] = 1
    return ids, mask


def _alone(model, rows):
    means, variances = [], []
    for row in rows:
        m, v = model.score(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))
        means.append(m[0])
        variances.append(v[0])
    return torch.stack(means), torch.stack(variances)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@torch.no_grad()
def test_scores_read_last_real_token_for_any_padding(tokenizer, arch):
    model = _model(arch, tokenizer)
    rows = [tokenizer(t)["input_ids"] for t in TEXTS]
    mean_alone, var_alone = _alone(model, rows)
    for side in ("right", "left"):
        ids, mask = _pad(rows, tokenizer.pad_token_id, side)
        mean, var = model.score(ids, mask)
        torch.testing.assert_close(mean, mean_alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(var, var_alone, atol=1e-5, rtol=0)
    # pad == EOS, and every response ends in EOS: only the mask can tell the real last token from padding.
    rows_eos = [r + [tokenizer.eos_token_id] for r in rows]
    mean_alone, _ = _alone(model, rows_eos)
    for side in ("right", "left"):
        ids, mask = _pad(rows_eos, tokenizer.eos_token_id, side)
        torch.testing.assert_close(model.score(ids, mask)[0], mean_alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("lora", [False, True])
@torch.no_grad()
def test_hidden_states_equal_last_layer_without_lm_logits(tokenizer, arch, lora):
    model = _model(arch, tokenizer, lora=lora)
    ids = torch.tensor([tokenizer(TEXTS[1])["input_ids"]])
    mask = torch.ones_like(ids)
    head_calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    hidden = model.hidden_states(ids, mask)
    handle.remove()
    assert head_calls == []  # no vocab-sized logits computed
    reference = model.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    assert hidden.shape == (1, ids.shape[1], 64)
    torch.testing.assert_close(hidden, reference, atol=1e-6, rtol=0)
    # ...and the heads apply to it as documented: mu = w . h_last + b.
    mean, _ = model.score(ids, mask)
    w, b = model.value_head.summary.weight, model.value_head.summary.bias
    torch.testing.assert_close(mean, reference[:, -1] @ w[0] + b, atol=1e-5, rtol=0)


def test_variance_starts_at_one_and_can_be_skipped(tokenizer):
    model, _ = load_model_with_heads(
        ModelArguments(model_name_or_path="builtin:tiny-qwen3"),
        FinetuningArguments(add_disco_head=True),
        add_value_head=True,
    )
    ids, mask = _pad([tokenizer(t)["input_ids"] for t in TEXTS], tokenizer.pad_token_id, "right")
    with torch.no_grad():
        mean, var = model.score(ids, mask)
        assert torch.allclose(var, torch.full((3,), 1.0 + VARIANCE_FLOOR), atol=1e-7)
        assert model.score(ids, mask, with_variance=False)[1] is None
        out = model(ids, mask, with_heads=False)
        assert out.mean is None and out.variance is None and out.last_hidden_state.shape[:2] == ids.shape
    scalar, _ = load_model_with_heads(
        ModelArguments(model_name_or_path="builtin:tiny-qwen3"), FinetuningArguments(), add_value_head=True
    )
    assert scalar.score(ids, mask)[1] is None


def test_variance_only_model_for_disco_dpo(tokenizer):
    model, _ = load_model_with_heads(
        ModelArguments(model_name_or_path="builtin:tiny-llama"),
        FinetuningArguments(stage="dpo", add_disco_head=True),
        add_value_head=False,
    )
    ids, mask = _pad([tokenizer(t)["input_ids"] for t in TEXTS], tokenizer.pad_token_id, "left")
    out = model(ids, mask)
    assert out.mean is None and out.variance.shape == (3,)
    with pytest.raises(RuntimeError, match="no value head"):
        model.score(ids, mask)


def test_heads_compute_in_fp32_on_a_bf16_backbone(tokenizer):
    model, _ = load_model_with_heads(
        ModelArguments(model_name_or_path="builtin:tiny-llama"),
        FinetuningArguments(add_disco_head=True),
        add_value_head=True,
        torch_dtype="bfloat16",
    )
    assert next(model.backbone.parameters()).dtype == torch.bfloat16
    assert model.value_head.summary.weight.dtype == torch.float32
    ids, mask = _pad([tokenizer(t)["input_ids"] for t in TEXTS], tokenizer.pad_token_id, "right")
    with torch.no_grad():
        mean, var = model.score(ids, mask)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32


def test_positions_follow_the_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_plumbing_for_trainer_and_reference(tokenizer):
    backbone = build_tiny_model("gpt2", tokenizer)
    model = ModelWithHeads(backbone, {"value_head": ValueHead(64), "variance_head": VarianceHead(64)})
    assert model.config is backbone.config
    assert model.lm_head is backbone.get_output_embeddings()
    assert model.supported_parameters == ()
    with model.disable_adapter():  # a full model is its own reference: the context is a no-op
        pass
    assert [n for n, _ in model.named_parameters() if n.split(".")[0] in model.heads] == [
        "value_head.summary.weight",
        "value_head.summary.bias",
        "variance_head.summary.weight",
        "variance_head.summary.bias",
    ]
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and model.config.use_cache is False
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
