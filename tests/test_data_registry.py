"""LlamaFactory's dataset registry: `dataset_dir` + `dataset_info.json`, names separated by commas."""

from __future__ import annotations

import json

import pytest

from discoalign.config.schema import DataArguments
from discoalign.data import get_dataset
from discoalign.errors import DataError

# The entries LlamaFactory ships in data/dataset_info.json for these two files.
LLAMAFACTORY_INFO = {
    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
    "dpo_en_demo": {
        "file_name": "dpo_en_demo.json",
        "ranking": True,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
    },
}


@pytest.fixture()
def registry(tmp_path, shared_data):
    """A LlamaFactory data folder: the shared files, linked, and LlamaFactory's registry entries for them."""
    for name in ("alpaca_en_demo.json", "dpo_en_demo.json"):
        (tmp_path / name).symlink_to(shared_data / name)
    (tmp_path / "dataset_info.json").write_text(json.dumps(LLAMAFACTORY_INFO))
    return tmp_path


def test_llamafactory_entries_load_by_name(registry, shared_data, tokenizer):
    by_name = DataArguments(dataset="dpo_en_demo", dataset_dir=str(registry), max_samples=20, cutoff_len=256)
    by_path = DataArguments(dataset=str(shared_data / "dpo_en_demo.json"), max_samples=20, cutoff_len=256)
    a = get_dataset(by_name, tokenizer, "rm").train
    b = get_dataset(by_path, tokenizer, "rm").train
    assert len(a) == len(b) == 20
    for key in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
        assert a[key] == b[key]

    sft = get_dataset(DataArguments(dataset="alpaca_en_demo", dataset_dir=str(registry), max_samples=10),
                      tokenizer, "sft").train  # fmt: skip
    direct = get_dataset(DataArguments(dataset=str(shared_data / "alpaca_en_demo.json"), max_samples=10),
                         tokenizer, "sft").train  # fmt: skip
    assert sft["prompt_input_ids"] == direct["prompt_input_ids"]
    assert sft["response_input_ids"] == direct["response_input_ids"]
    # prompts of both entries for PPO, comma-separated
    both = get_dataset(DataArguments(dataset="alpaca_en_demo, dpo_en_demo", dataset_dir=str(registry),
                                     max_samples=5), tokenizer, "ppo").train  # fmt: skip
    assert len(both) == 10


def test_custom_columns_and_tags(tmp_path, tokenizer):
    rows = [{"q": "What is 2+2?", "a": "4", "sys": "Be brief."},
            {"q": "Name a fruit.", "a": "Apple", "sys": ""}]  # fmt: skip
    chats = [{"dialog": [{"speaker": "person", "text": "Hi"}, {"speaker": "bot", "text": "Hello!"}]}]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "chat.json").write_text(json.dumps(chats))
    info = {
        "qa": {"file_name": "qa.jsonl", "columns": {"prompt": "q", "response": "a", "system": "sys"}},
        "chat": {"file_name": "chat.json", "formatting": "sharegpt", "columns": {"messages": "dialog"},
                 "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "person", "assistant_tag": "bot"}},
    }  # fmt: skip
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    data = get_dataset(DataArguments(dataset="qa,chat", dataset_dir=str(tmp_path)), tokenizer, "sft").train
    assert len(data) == 3
    responses = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in data["response_input_ids"]]
    assert responses == ["4", "Apple", "Hello!"]
    assert data[0]["prompt"][0] == {"role": "system", "content": "Be brief."}


def test_registry_errors_name_the_entry(tmp_path, tokenizer):
    info = {"hub": {"hf_hub_url": "org/data"}, "gone": {"file_name": "missing.json"},
            "odd": {"file_name": "x.json", "formatting": "weird"}}  # fmt: skip
    (tmp_path / "x.json").write_text("[]")
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))

    def load(name):
        return get_dataset(DataArguments(dataset=name, dataset_dir=str(tmp_path)), tokenizer, "sft")

    with pytest.raises(DataError, match="entry `hub`: `hf_hub_url` needs a network"):
        load("hub")
    with pytest.raises(DataError, match="entry `gone`: `file_name` 'missing.json' does not exist"):
        load("gone")
    with pytest.raises(DataError, match="`formatting: weird`"):
        load("odd")
    with pytest.raises(DataError, match="Did you mean `gone`"):
        load("gon")
    with pytest.raises(DataError, match="has no dataset_info.json"):
        get_dataset(DataArguments(dataset="a", dataset_dir=str(tmp_path / "nowhere")), tokenizer, "sft")


def test_bad_row_in_a_registry_file_names_file_and_row(tmp_path, tokenizer):
    rows = [{"instruction": "ok", "output": "fine"}, {"instruction": "no output here"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    with pytest.raises(DataError, match=r"d.json: row 1 \(0-based\)"):
        get_dataset(DataArguments(dataset="d", dataset_dir=str(tmp_path)), tokenizer, "sft")


def test_config_dataset_dir_through_the_cli_config(tmp_path, registry):
    from discoalign.config import build_config

    cfg = build_config({"stage": "sft", "dataset": "alpaca_en_demo", "dataset_dir": str(registry)})
    assert cfg.data.dataset_dir == str(registry)


def test_alpaca_ranking_entry(tmp_path, tokenizer):
    rows = [{"instruction": "Pick a colour.", "input": "warm ones", "chosen": "Red.", "rejected": "Blue."}]
    (tmp_path / "r.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"r": {"file_name": "r.json", "ranking": True}}))
    row = get_dataset(DataArguments(dataset="r", dataset_dir=str(tmp_path)), tokenizer, "dpo").train[0]
    assert row["prompt"] == [{"role": "user", "content": "Pick a colour.\n\nwarm ones"}]
    assert row["chosen"] == [{"role": "assistant", "content": "Red."}]
    assert row["rejected"] == [{"role": "assistant", "content": "Blue."}]
