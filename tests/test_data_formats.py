"""Format detection and conversion of each format to canonical rows (exact expected rows)."""

from __future__ import annotations

import json

import pytest

from discoalign.config.schema import DataArguments
from discoalign.data import get_dataset
from discoalign.data.formats import detect_format, to_pairwise_row, to_prompt_row
from discoalign.errors import DataError


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def detect(rows):
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return detect_format(columns, rows, "data.json")


def test_detection_from_columns():
    assert detect([{"prompt": "q", "chosen": "a", "rejected": "b"}]) == "pairwise"
    assert detect([{"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]}]) == "implicit"
    assert detect([{"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}]) == "hh_rlhf"
    assert detect([{"conversations": [], "chosen": {}, "rejected": {}}]) == "sharegpt"
    for cols in ({"prompt": "q"}, {"instruction": "i", "input": "", "output": "o"}, {"messages": []}):
        assert detect([cols]) == "prompt"


def test_undetectable_columns_list_found_and_expected():
    with pytest.raises(DataError) as info:
        detect([{"question": "q", "answer": "a"}])
    msg = str(info.value)
    assert "data.json" in msg and "`question`, `answer`" in msg
    for expected in ("pairwise", "implicit", "hh_rlhf", "sharegpt", "prompt", "dataset_format"):
        assert expected in msg
    # half a pair is not mistaken for prompt-only data
    with pytest.raises(DataError, match=r"columns are `prompt`, `chosen`\. Expected one of"):
        detect([{"prompt": "q", "chosen": "a"}])


def test_named_format_must_find_its_columns(tmp_path, tokenizer):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "q", "chosen": "a", "rejected": "b"}]))
    with pytest.raises(DataError, match=r"`dataset_format: sharegpt` needs the columns `conversations`") as info:
        get_dataset(DataArguments(dataset=str(path), dataset_format="sharegpt"), tokenizer, "dpo", 0)
    assert str(path) in str(info.value) and "`prompt`, `chosen`, `rejected`" in str(info.value)


def test_explicit_pairwise_standard_with_system_and_margin():
    row = {"prompt": "Why?", "chosen": "Because.", "rejected": "No.", "system": "Be brief.", "margin": 2}
    assert to_pairwise_row(row, "pairwise") == {
        "prompt": [system("Be brief."), user("Why?")],
        "chosen": [assistant("Because.")],
        "rejected": [assistant("No.")],
        "margin": 2.0,
    }


def test_explicit_pairwise_conversational_keeps_ground_truth():
    row = {
        "prompt": [system("S"), user("a"), assistant("b"), user("c")],
        "chosen": [assistant("yes")],
        "rejected": [assistant("no")],
        "true_reward_chosen": 0.5,
        "true_reward_rejected": -1,
        "noise": 0.1,
        "topic": "art",
        "unrelated": "dropped",
    }
    assert to_pairwise_row(row, "pairwise") == {
        "prompt": [system("S"), user("a"), assistant("b"), user("c")],
        "chosen": [assistant("yes")],
        "rejected": [assistant("no")],
        "margin": 0.0,
        "true_reward_chosen": 0.5,
        "true_reward_rejected": -1.0,
        "noise": 0.1,
        "topic": "art",
    }


def test_implicit_prompt_is_the_shared_prefix():
    row = {
        "chosen": [user("q1"), assistant("a1"), user("q2"), assistant("good")],
        "rejected": [user("q1"), assistant("a1"), user("q2"), assistant("bad")],
    }
    expected = {
        "prompt": [user("q1"), assistant("a1"), user("q2")],
        "chosen": [assistant("good")],
        "rejected": [assistant("bad")],
        "margin": 0.0,
    }
    assert to_pairwise_row(row, "implicit") == expected
    # TRL's layout of a redundant string prompt next to full conversations resolves the same way
    assert to_pairwise_row({"prompt": "q2", **row}, "pairwise") == expected


def test_hh_rlhf_prompt_is_every_turn_before_the_last_assistant_turn():
    shared = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."
    row = {
        "chosen": shared + "\n\nAssistant: Why did the chicken cross the road?",
        "rejected": shared + "\n\nAssistant: No.",
    }
    assert to_pairwise_row(row, "hh_rlhf") == {
        "prompt": [user("Hi there"), assistant("Hello! How can I help?"), user("Tell me a joke.")],
        "chosen": [assistant("Why did the chicken cross the road?")],
        "rejected": [assistant("No.")],
        "margin": 0.0,
    }


def test_sharegpt_pairwise():
    row = {
        "conversations": [
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "q2"},
        ],
        "chosen": {"from": "gpt", "value": "good"},
        "rejected": {"from": "gpt", "value": "bad"},
        "system": "S",
    }
    assert to_pairwise_row(row, "sharegpt") == {
        "prompt": [system("S"), user("q1"), assistant("a1"), user("q2")],
        "chosen": [assistant("good")],
        "rejected": [assistant("bad")],
        "margin": 0.0,
    }


def test_prompt_only_variants():
    assert to_prompt_row({"prompt": "Hi"}, "prompt") == {"prompt": [user("Hi")]}
    assert to_prompt_row({"instruction": "Translate.", "input": "Bonjour", "output": "x"}, "prompt") == {
        "prompt": [user("Translate.\n\nBonjour")]
    }
    assert to_prompt_row({"instruction": "Say hi.", "input": "", "system": "S"}, "prompt") == {
        "prompt": [system("S"), user("Say hi.")]
    }
    # a final assistant turn (the reference answer) is dropped
    assert to_prompt_row({"messages": [user("q"), assistant("a")]}, "prompt") == {"prompt": [user("q")]}
    conversations = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "q2"}]
    assert to_prompt_row({"conversations": conversations}, "prompt") == {
        "prompt": [user("q"), assistant("a"), user("q2")]
    }
    # pairwise rows give their prompt (stage ppo)
    assert to_prompt_row({"prompt": "q", "chosen": "a", "rejected": "b", "topic": "art"}, "pairwise") == {
        "prompt": [user("q")],
        "topic": "art",
    }


def test_shared_sharegpt_demo_loads(shared_data, tokenizer):
    args = DataArguments(dataset=str(shared_data / "dpo_en_demo.json"), cutoff_len=256)
    bundle = get_dataset(args, tokenizer, "dpo", 0)
    assert len(bundle.train) == 300 and bundle.stats == {}
    raw = json.loads((shared_data / "dpo_en_demo.json").read_text())[0]
    first = bundle.train[0]
    assert first["prompt"][-1] == user(raw["conversations"][-1]["value"])
    assert first["chosen"] == [assistant(raw["chosen"]["value"])]
    assert first["rejected"] == [assistant(raw["rejected"]["value"])]
    assert max(len(p) + max(len(c), len(r)) for p, c, r in zip(
        bundle.train["prompt_input_ids"], bundle.train["chosen_input_ids"], bundle.train["rejected_input_ids"]
    )) <= 256  # fmt: skip


def test_shared_alpaca_demo_loads_as_prompts(shared_data, tokenizer):
    path = str(shared_data / "alpaca_en_demo.json")
    bundle = get_dataset(DataArguments(dataset=path), tokenizer, "ppo", 0)
    assert len(bundle.train) == 999
    raw = json.loads((shared_data / "alpaca_en_demo.json").read_text())
    with_input = next(i for i, r in enumerate(raw) if r["input"])
    r = raw[with_input]
    assert bundle.train[with_input]["prompt"] == [user(f"{r['instruction']}\n\n{r['input']}")]
    assert bundle.train[0]["prompt"] == [user(raw[0]["instruction"])]
    assert set(bundle.train.column_names) == {"prompt", "prompt_input_ids"}


def test_prompt_only_data_is_refused_for_pairwise_stages(shared_data, tokenizer):
    path = str(shared_data / "alpaca_en_demo.json")
    with pytest.raises(DataError, match=r"prompts only .* `stage: dpo`") as info:
        get_dataset(DataArguments(dataset=path), tokenizer, "dpo", 0)
    assert path in str(info.value)
