"""Token parity with TRL 1.16: our prompt/chosen/rejected ids equal what `DPOTrainer` tokenises for the same rows.

TRL runs its own `DPOTrainer._prepare_dataset` (prompt extraction, EOS handling, chat template, common-prefix
split) on the raw rows; our side is the full `get_dataset` pipeline reading the same rows from a file.
"""

from __future__ import annotations

import json
import types

import datasets
import pytest

from discoalign.config.schema import DataArguments
from discoalign.data import get_dataset
from discoalign.data.encode import render_fallback
from discoalign.data.synthetic import synthetic_pair_rows
from discoalign.models.tiny import build_tiny_tokenizer

trl = pytest.importorskip("trl")
from trl import DPOConfig  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


CONVERSATIONAL = [
    {k: r[k] for k in ("prompt", "chosen", "rejected")} for r in synthetic_pair_rows(4, seed=3)
] + [
    {
        "prompt": [{"role": "system", "content": "You are terse."}, user("Hi!"), assistant("Hello."), user("Why is the sky blue?")],
        "chosen": [assistant("Sunlight is scattered by the air, and blue light scatters the most.")],
        "rejected": [assistant("No idea 🤷 — maybe paint?")],
    },
    {"prompt": [user("Ünïcödé prompt: 2 + 2 = ?")], "chosen": [assistant("4")], "rejected": [assistant("22")]},
]  # fmt: skip

# A generation prompt that the full conversation renders differently (an empty thought block, like Qwen3):
# the response must start where the two tokenisations diverge.
THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}{% endif %}"
)


def trl_ids(rows, tokenizer):
    """(prompt_ids, chosen_ids, rejected_ids) per row, from TRL's own DPO dataset preparation."""
    args = DPOConfig(output_dir="unused", report_to="none", max_length=None, bf16=False, use_cpu=True)
    stand_in = types.SimpleNamespace(_tokenizer=tokenizer)  # the only attribute _prepare_dataset reads
    prepared = DPOTrainer._prepare_dataset(stand_in, datasets.Dataset.from_list(rows), tokenizer, args, "train")
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in prepared]


def our_ids(rows, tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    bundle = get_dataset(DataArguments(dataset=str(path), cutoff_len=100_000), tokenizer, "dpo", seed=0)
    cols = bundle.train
    return list(zip(cols["prompt_input_ids"], cols["chosen_input_ids"], cols["rejected_input_ids"]))


def test_conversational_rows_match_trl(tokenizer, tmp_path):
    expected = trl_ids(CONVERSATIONAL, tokenizer)
    assert our_ids(CONVERSATIONAL, tokenizer, tmp_path) == expected
    # ChatML: the response carries the template's turn end `<|im_end|>\n`, and TRL adds no second EOS
    assert expected[0][1][-2:] == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("Ċ")]


def test_implicit_prompt_rows_match_trl(tokenizer, tmp_path):
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in CONVERSATIONAL]
    assert our_ids(implicit, tokenizer, tmp_path) == trl_ids(implicit, tokenizer)


def test_template_whose_generation_prompt_differs_matches_trl(tmp_path):
    tok = build_tiny_tokenizer()
    tok.chat_template = THINKING_TEMPLATE
    expected = trl_ids(CONVERSATIONAL, tok)
    assert our_ids(CONVERSATIONAL, tok, tmp_path) == expected
    full_prompt = tok.apply_chat_template(CONVERSATIONAL[0]["prompt"], add_generation_prompt=True)["input_ids"]
    assert len(expected[0][0]) < len(full_prompt)  # the case really exercises the common-prefix split


def test_fallback_template_matches_trl_standard_text(tmp_path):
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    # TRL's standard (text) path on the same text our fallback template renders
    standard = [
        {
            "prompt": render_fallback(r["prompt"], add_generation_prompt=True),
            "chosen": " " + r["chosen"][0]["content"],
            "rejected": " " + r["rejected"][0]["content"],
        }
        for r in CONVERSATIONAL
    ]
    expected = trl_ids(standard, tok)
    assert our_ids(CONVERSATIONAL, tok, tmp_path) == expected
    assert all(c[-1] == tok.eos_token_id and r[-1] == tok.eos_token_id for _, c, r in expected)
