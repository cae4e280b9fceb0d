"""The multimodal pairwise collator: media layout, and per-row scores of a mixed batch equal each row alone."""

from __future__ import annotations

import pytest
import torch

from discoalign.config.schema import DataArguments, FinetuningArguments, ModelArguments
from discoalign.data import get_dataset
from discoalign.data.collator import PairwiseCollator
from discoalign.data.media_collator import MultimodalPairwiseCollator, make_pairwise_collator
from discoalign.errors import ConfigError, DataError
from discoalign.models.loader import load_model_with_heads

DATA = {
    "qwen2-vl": "builtin:synthetic-vl",
    "qwen2.5-vl": "builtin:synthetic-vl",
    "qwen2-audio": "builtin:synthetic-audio",
}


def model_and_rows(arch: str, n: int = 6):
    model, tokenizer = load_model_with_heads(
        ModelArguments(model_name_or_path=f"builtin:tiny-{arch}"),
        FinetuningArguments(add_disco_head=True),
        add_value_head=True,
        is_trainable=False,
    )
    data = get_dataset(
        DataArguments(dataset=DATA[arch], synthetic_num_pairs=n), tokenizer, "rm", media=model.media_processor
    )
    return model, tokenizer, [data.train[i] for i in range(n)]


def scores(model, batch):
    media = {k: batch[k] for k in model.supported_parameters if k in batch}
    with torch.no_grad():
        return model.score(batch["input_ids"], batch["attention_mask"], **media)


@pytest.mark.parametrize(
    ("arch", "padding_side"),
    [("qwen2-vl", "right"), ("qwen2-vl", "left"), ("qwen2.5-vl", "right"), ("qwen2-audio", "right")],
)
def test_a_mixed_batch_scores_each_row_as_if_alone(arch, padding_side):
    model, tokenizer, rows = model_and_rows(arch)
    collator = MultimodalPairwiseCollator(tokenizer.pad_token_id, model.media_processor, padding_side=padding_side)
    batch = collator(rows)
    if arch == "qwen2-audio":
        lengths = {len(r["audios"][0]["array"]) for r in rows}
        assert len(lengths) > 1  # different audio lengths in one batch
    else:
        grids = {tuple(g) for g in batch["image_grid_thw"].tolist()}
        assert len(grids) > 1  # different image sizes in one batch
    mean, var = scores(model, batch)
    alone = [scores(model, collator([row])) for row in rows]
    alone_mean = torch.cat([torch.stack([m[0] for m, _ in alone]), torch.stack([m[1] for m, _ in alone])])
    alone_var = torch.cat([torch.stack([v[0] for _, v in alone]), torch.stack([v[1] for _, v in alone])])
    torch.testing.assert_close(mean, alone_mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(var, alone_var, atol=1e-5, rtol=0)
    # and the media matter: without them the scores change
    text_only, _ = scores(model, {k: v for k, v in batch.items() if k not in model.supported_parameters})
    assert (text_only - mean).abs().max() > 1e-3


def test_vision_batch_layout_chosen_media_then_rejected_media():
    model, tokenizer, rows = model_and_rows("qwen2-vl", n=3)
    batch = make_pairwise_collator(tokenizer, model)(rows)
    media = model.media_processor
    grid = batch["image_grid_thw"]
    assert grid.shape == (6, 3) and torch.equal(grid[:3], grid[3:])
    assert batch["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    tokens_per_image = (grid.prod(-1) // 4).tolist()
    image_tokens = (batch["input_ids"] == media.image_token_id).sum(-1).tolist()
    assert image_tokens == tokens_per_image  # one image per sequence, in row order
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == media.image_token_id).int())
    text = PairwiseCollator(tokenizer.pad_token_id)(rows)
    assert all(torch.equal(batch[k], text[k]) for k in text)  # the text part is the text collator's


def test_audio_batch_layout():
    model, tokenizer, rows = model_and_rows("qwen2-audio", n=3)
    batch = make_pairwise_collator(tokenizer, model)(rows)
    assert batch["input_features"].shape == (6, 16, 100)
    frames = batch["feature_attention_mask"].sum(-1)
    assert torch.equal(frames[:3], frames[3:])
    assert frames.tolist()[:3] == [min(100, len(r["audios"][0]["array"]) // 160) for r in rows]
    assert "mm_token_type_ids" not in batch and "pixel_values" not in batch


def test_text_models_keep_the_text_collator_and_packing_is_refused_for_media(tmp_path):
    text_model, text_tok = load_model_with_heads(
        ModelArguments(model_name_or_path="builtin:tiny-qwen3"), FinetuningArguments(), add_value_head=True
    )
    assert type(make_pairwise_collator(text_tok, text_model)) is PairwiseCollator
    model, tokenizer, rows = model_and_rows("qwen2-vl", n=1)
    with pytest.raises(ConfigError, match="pack_pairs"):
        make_pairwise_collator(tokenizer, model, pack_pairs=True)
    broken = dict(rows[0], images=[{"path": str(tmp_path / "vanished.png"), "bytes": None}])
    with pytest.raises(DataError, match=r"row 0.*images\[0\].*vanished\.png"):
        make_pairwise_collator(tokenizer, model)([broken])
