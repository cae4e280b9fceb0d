"""get_dataset end to end: columns, val_size splits, eval datasets, stage handling."""

from __future__ import annotations

import json
import logging

import pytest

from discoalign.config.schema import DataArguments
from discoalign.data import DatasetBundle, get_dataset
from discoalign.errors import DataError


def synthetic(**kw):
    return DataArguments(dataset="builtin:synthetic", synthetic_num_pairs=40, **kw)


def test_bundle_columns(tokenizer):
    bundle = get_dataset(synthetic(), tokenizer, "dpo", seed=0)
    assert isinstance(bundle, DatasetBundle) and bundle.eval is None and bundle.stats == {}
    assert set(bundle.train.column_names) == {
        "prompt", "chosen", "rejected", "margin", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids",
        "true_reward_chosen", "true_reward_rejected", "noise", "topic",
    }  # fmt: skip
    assert bundle.train["margin"] == [0.0] * 40


@pytest.mark.parametrize("val_size, n_eval", [(0.25, 10), (7, 7), (7.0, 7)])
def test_val_size_split_is_seeded(tokenizer, val_size, n_eval):
    a = get_dataset(synthetic(val_size=val_size), tokenizer, "rm", seed=1)
    b = get_dataset(synthetic(val_size=val_size), tokenizer, "rm", seed=1)
    c = get_dataset(synthetic(val_size=val_size), tokenizer, "rm", seed=2)
    assert len(a.eval) == n_eval and len(a.train) == 40 - n_eval
    assert a.eval["chosen"] == b.eval["chosen"] and a.train["chosen"] == b.train["chosen"]
    assert a.eval["chosen"] != c.eval["chosen"]
    # a partition of the rows
    all_rows = get_dataset(synthetic(), tokenizer, "rm", seed=1).train["chosen_input_ids"]
    assert sorted(list(a.train["chosen_input_ids"]) + list(a.eval["chosen_input_ids"])) == sorted(all_rows)


def test_val_size_too_large_names_the_key(tokenizer):
    with pytest.raises(DataError, match=r"`val_size: 40.0` cannot split the 40 training rows"):
        get_dataset(synthetic(val_size=40.0), tokenizer, "rm", seed=0)


def test_eval_dataset_wins_over_val_size(tokenizer, tmp_path, caplog):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1.5}]))
    with caplog.at_level(logging.WARNING, logger="discoalign.data"):
        bundle = get_dataset(synthetic(val_size=0.5, eval_dataset=str(path)), tokenizer, "dpo", seed=0)
    assert len(bundle.train) == 40 and bundle.eval["margin"] == [1.5]
    assert "`val_size: 0.5` is ignored because `eval_dataset` is set" in caplog.text


def test_sources_with_different_optional_columns_stack(tokenizer, tmp_path):
    path = tmp_path / "plain.json"
    path.write_text(json.dumps([{"prompt": "q", "chosen": "a", "rejected": "b"}]))
    bundle = get_dataset(DataArguments(dataset=f"builtin:synthetic,{path}", synthetic_num_pairs=3), tokenizer, "dpo", 0)
    assert len(bundle.train) == 4
    assert bundle.train["true_reward_chosen"][3] is None and bundle.train["topic"][3] is None


def test_stage_ppo_on_pairwise_data_gives_prompts(tokenizer):
    bundle = get_dataset(synthetic(val_size=0.1), tokenizer, "ppo", seed=0)
    assert set(bundle.train.column_names) == {"prompt", "prompt_input_ids", "topic", "noise"}
    assert len(bundle.train) == 36 and len(bundle.eval) == 4
    row = bundle.train[0]
    expected = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)["input_ids"]
    assert row["prompt_input_ids"] == expected


def test_unknown_stage(tokenizer):
    with pytest.raises(ValueError, match="stage"):
        get_dataset(synthetic(), tokenizer, "nope", seed=0)
