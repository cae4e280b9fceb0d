"""PairwiseCollator: exact tensors for right and left padding."""

from __future__ import annotations

import pytest
import torch

from discoalign.config.schema import DataArguments
from discoalign.data import PairwiseCollator, get_dataset
from discoalign.errors import DataError
from discoalign.models.tiny import build_tiny_tokenizer

PAD = 0
ROWS = [
    {"prompt_input_ids": [5, 6], "chosen_input_ids": [7, 8, 9], "rejected_input_ids": [10], "margin": 0.5},
    {"prompt_input_ids": [11], "chosen_input_ids": [12], "rejected_input_ids": [13, 14], "margin": None},
]
I = -100


def test_right_padding():
    batch = PairwiseCollator(PAD)(ROWS)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 8, 9],  # prompt0 + chosen0
        [11, 12, 0, 0, 0],  # prompt1 + chosen1
        [5, 6, 10, 0, 0],  # prompt0 + rejected0
        [11, 13, 14, 0, 0],  # prompt1 + rejected1
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[I, I, 7, 8, 9], [I, 12, I, I, I], [I, I, 10, I, I], [I, 13, 14, I, I]]
    assert batch["prompt_last_index"].tolist() == [1, 0, 1, 0]
    assert batch["margin"].tolist() == [0.5, 0.0]
    for key in ("input_ids", "attention_mask", "labels", "prompt_last_index"):
        assert batch[key].dtype == torch.long, key
    assert batch["margin"].dtype == torch.float32
    assert "true_reward_chosen" not in batch


def test_left_padding():
    batch = PairwiseCollator(PAD, padding_side="left")(ROWS)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [0, 0, 0, 11, 12], [0, 0, 5, 6, 10], [0, 0, 11, 13, 14]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert batch["labels"].tolist() == [[I, I, 7, 8, 9], [I, I, I, I, 12], [I, I, I, I, 10], [I, I, I, 13, 14]]
    assert batch["prompt_last_index"].tolist() == [1, 3, 3, 2]


def test_ground_truth_columns_and_pad_equal_to_eos():
    rows = [dict(r, true_reward_chosen=0.25 * i, true_reward_rejected=-1, noise=0.1) for i, r in enumerate(ROWS)]
    batch = PairwiseCollator(pad_token_id=9)(rows)  # pad id equal to a real token: masks must not depend on it
    assert batch["true_reward_chosen"].tolist() == [0.0, 0.25]
    assert batch["true_reward_rejected"].tolist() == [-1.0, -1.0]
    assert batch["noise"].dtype == torch.float32 and torch.allclose(batch["noise"], torch.tensor([0.1, 0.1]))
    assert batch["labels"][0].tolist() == [I, I, 7, 8, 9]
    assert batch["attention_mask"][1].tolist() == [1, 1, 0, 0, 0]


def test_collates_pipeline_rows():
    tok = build_tiny_tokenizer()
    data = get_dataset(DataArguments(dataset="builtin:synthetic", synthetic_num_pairs=4), tok, "dpo", 0).train
    rows = [data[i] for i in range(4)]
    batch = PairwiseCollator(tok.pad_token_id)(rows)
    assert batch["input_ids"].shape[0] == 8 and batch["true_reward_chosen"].shape == (4,)
    for i, row in enumerate(rows):
        length = len(row["prompt_input_ids"]) + len(row["chosen_input_ids"])
        assert batch["input_ids"][i, :length].tolist() == row["prompt_input_ids"] + row["chosen_input_ids"]
        assert batch["labels"][i][batch["labels"][i] != I].tolist() == row["chosen_input_ids"]
        assert batch["input_ids"][i, batch["prompt_last_index"][i]] == row["prompt_input_ids"][-1]


def test_missing_pad_token_is_a_clear_error():
    with pytest.raises(DataError, match="pad token"):
        PairwiseCollator(None)
