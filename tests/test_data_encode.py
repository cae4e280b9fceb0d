"""Templating, EOS and truncation, with exact expected ids."""

from __future__ import annotations

import pytest

from discoalign.config.schema import DataArguments
from discoalign.data import get_dataset
from discoalign.data.encode import encode_pair, encode_prompt, render_fallback, tokenize_pair, truncate_pair
from discoalign.models.tiny import build_tiny_tokenizer

ROW = {
    "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Describe a garden."}],
    "chosen": [{"role": "assistant", "content": "bright calm gentle"}],
    "rejected": [{"role": "assistant", "content": "cold"}],
    "margin": 0.0,
}


@pytest.fixture(scope="module")
def plain_tokenizer():
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    return tok


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_template_prompt_and_response_ids(tokenizer):
    prompt, chosen, rejected = tokenize_pair(tokenizer, ROW)
    assert prompt == ids(
        tokenizer,
        "<|im_start|>system\nBe kind.<|im_end|>\n"
        "<|im_start|>user\nDescribe a garden.<|im_end|>\n"
        "<|im_start|>assistant\n",
    )
    # the response is what the template adds for it, turn end included: `content<|im_end|>\n` (EOS = <|im_end|>)
    assert chosen == ids(tokenizer, "bright calm gentle<|im_end|>\n")
    assert rejected == ids(tokenizer, "cold<|im_end|>\n")
    assert chosen[-2] == tokenizer.eos_token_id and chosen.count(tokenizer.eos_token_id) == 1


def test_fallback_template_text_and_eos(plain_tokenizer):
    assert render_fallback(ROW["prompt"], add_generation_prompt=True) == (
        "System: Be kind.\n\nUser: Describe a garden.\n\nAssistant:"
    )
    assert render_fallback(ROW["prompt"] + ROW["chosen"]) == (
        "System: Be kind.\n\nUser: Describe a garden.\n\nAssistant: bright calm gentle"
    )
    prompt, chosen, rejected = tokenize_pair(plain_tokenizer, ROW)
    assert prompt == ids(plain_tokenizer, "System: Be kind.\n\nUser: Describe a garden.\n\nAssistant:")
    eos = plain_tokenizer.eos_token_id
    assert chosen == ids(plain_tokenizer, " bright calm gentle") + [eos]
    assert rejected == ids(plain_tokenizer, " cold") + [eos]


def test_eos_appended_when_the_template_adds_none(tokenizer):
    tok = build_tiny_tokenizer()
    # a template that closes turns with a newline only, never with EOS
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    prompt, chosen, _ = tokenize_pair(tok, ROW)
    # the generation prompt's trailing space merges with the first response word ("Ġbright"), so, as in TRL,
    # the response starts where prompt and prompt+response tokens first differ: the space moves to the response
    assert prompt == ids(tok, "system: Be kind.\nuser: Describe a garden.\nassistant:")
    assert chosen == ids(tok, " bright calm gentle\n") + [tok.eos_token_id]


def test_truncation_rule_on_exact_ids():
    prompt, chosen, rejected = [1, 2, 3, 4, 5, 6], [10, 11, 12], [20, 21]
    # fits: untouched
    assert truncate_pair(prompt, chosen, rejected, 9) == (prompt, chosen, rejected)
    # prompt cut from the left first, responses kept whole
    assert truncate_pair(prompt, chosen, rejected, 7) == ([3, 4, 5, 6], chosen, rejected)
    assert truncate_pair(prompt, chosen, rejected, 4) == ([6], chosen, rejected)
    # the prompt keeps one token; then the responses are cut from the right
    assert truncate_pair(prompt, chosen, rejected, 3) == ([6], [10, 11], [20, 21])
    assert truncate_pair(prompt, chosen, rejected, 2) == ([6], [10], [20])
    # no room left for any response token: the caller drops the row
    assert truncate_pair(prompt, chosen, rejected, 1) == ([6], [], [])


def test_encode_pair_truncates_real_rows(tokenizer):
    prompt, chosen, rejected = tokenize_pair(tokenizer, ROW)
    longest = max(len(chosen), len(rejected))
    cutoff = longest + 3
    enc = encode_pair(tokenizer, ROW, cutoff)
    assert enc["prompt_input_ids"] == prompt[-3:]
    assert enc["chosen_input_ids"] == chosen and enc["rejected_input_ids"] == rejected
    enc = encode_pair(tokenizer, ROW, 4)
    assert enc["prompt_input_ids"] == prompt[-1:]
    assert enc["chosen_input_ids"] == chosen[:3] and enc["rejected_input_ids"] == rejected[:3]
    assert encode_pair(tokenizer, ROW, 1) is None
    # the canonical fields travel with the ids
    assert enc["prompt"] == ROW["prompt"] and enc["margin"] == 0.0


def test_pipeline_respects_cutoff_len(tokenizer):
    args = DataArguments(dataset="builtin:synthetic", synthetic_num_pairs=30, cutoff_len=12)
    train = get_dataset(args, tokenizer, "dpo", 0).train
    for p, c, r in zip(train["prompt_input_ids"], train["chosen_input_ids"], train["rejected_input_ids"]):
        assert len(p) >= 1 and len(p) + max(len(c), len(r)) <= 12 and c and r


def test_prompt_only_rows(tokenizer):
    row = {"prompt": ROW["prompt"]}
    full = tokenizer.apply_chat_template(ROW["prompt"], add_generation_prompt=True)["input_ids"]
    assert encode_prompt(tokenizer, row, 1024)["prompt_input_ids"] == full
    # cut from the left, leaving room for one generated token
    assert encode_prompt(tokenizer, row, 6)["prompt_input_ids"] == full[-5:]
    bundle = get_dataset(DataArguments(dataset="builtin:synthetic", synthetic_num_pairs=6), tokenizer, "ppo", 0)
    assert set(bundle.train.column_names) == {"prompt", "prompt_input_ids", "noise", "topic"}
