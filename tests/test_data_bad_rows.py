"""Bad rows: by default a DataError naming file, row, field and reason; with skip_invalid_rows, dropped and counted."""

from __future__ import annotations

import json
import logging

import pytest

from discoalign.config.schema import DataArguments
from discoalign.data import checks, get_dataset
from discoalign.errors import DataError

GOOD = {"prompt": "What is the sky?", "chosen": "Blue.", "rejected": "Green."}
GOOD_HH = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
GOOD_IMPLICIT = {
    "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}],
}
GOOD_SHAREGPT = {
    "conversations": [{"from": "human", "value": "Hi"}],
    "chosen": {"from": "gpt", "value": "Hello."},
    "rejected": {"from": "gpt", "value": "Go away."},
}

# (case id, good row of the format, bad row, field named, reason counted)
CASES = [
    ("missing field", GOOD, {"prompt": "q", "chosen": "a"}, "rejected", checks.MISSING),
    ("null field", GOOD, {**GOOD, "chosen": None}, "chosen", checks.MISSING),
    ("null message content", GOOD, {**GOOD, "prompt": [{"role": "user", "content": None}]}, "prompt[0].content", checks.MISSING),
    ("wrong type", GOOD, {**GOOD, "chosen": 42}, "chosen", checks.WRONG_TYPE),
    ("wrong message type", GOOD, {**GOOD, "prompt": [{"role": "user", "content": 7}]}, "prompt[0].content", checks.WRONG_TYPE),
    ("row not an object", GOOD, ["not", "a", "row"], "(row)", checks.WRONG_TYPE),
    ("wrong passthrough type", GOOD, {**GOOD, "noise": "high"}, "noise", checks.WRONG_TYPE),
    ("empty response", GOOD, {**GOOD, "chosen": "  \n"}, "chosen", checks.EMPTY_RESPONSE),
    ("empty prompt", GOOD, {**GOOD, "prompt": ""}, "prompt", checks.EMPTY_PROMPT),
    ("identical", GOOD, {**GOOD, "rejected": GOOD["chosen"]}, "rejected", checks.IDENTICAL),
    ("identical implicit", GOOD_IMPLICIT, {**GOOD_IMPLICIT, "rejected": GOOD_IMPLICIT["chosen"]}, "rejected", checks.IDENTICAL),
    ("implicit without shared turn", GOOD_IMPLICIT, {**GOOD_IMPLICIT, "rejected": [{"role": "user", "content": "Other"}, {"role": "assistant", "content": "x"}]}, "chosen", checks.MALFORMED),
    ("non-numeric margin", GOOD, {**GOOD, "margin": "large"}, "margin", checks.BAD_MARGIN),
    ("infinite margin", GOOD, {**GOOD, "margin": float("inf")}, "margin", checks.BAD_MARGIN),
    ("list margin", GOOD, {**GOOD, "margin": [1]}, "margin", checks.BAD_MARGIN),
    ("prompt ends with assistant", GOOD, {**GOOD, "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "prompt", checks.MALFORMED),
    ("hh without assistant turn", GOOD_HH, {**GOOD_HH, "chosen": "\n\nHuman: Hi"}, "chosen", checks.MALFORMED),
    ("hh prompts differ", GOOD_HH, {**GOOD_HH, "rejected": "\n\nHuman: Bye\n\nAssistant: Go away."}, "rejected", checks.MALFORMED),
    ("sharegpt unknown role", GOOD_SHAREGPT, {**GOOD_SHAREGPT, "conversations": [{"from": "tool", "value": "x"}]}, "conversations[0].from", checks.MALFORMED),
    ("sharegpt response from human", GOOD_SHAREGPT, {**GOOD_SHAREGPT, "chosen": {"from": "human", "value": "x"}}, "chosen", checks.MALFORMED),
    ("sharegpt empty response", GOOD_SHAREGPT, {**GOOD_SHAREGPT, "rejected": {"from": "gpt", "value": ""}}, "rejected", checks.EMPTY_RESPONSE),
]  # fmt: skip


def write_rows(tmp_path, good, bad):
    """Three rows, the bad one at row 1 (0-based)."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps([good, bad, good]), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("case, good, bad, field, reason", CASES, ids=[c[0] for c in CASES])
def test_bad_row_stops_the_run_with_file_row_field_and_reason(tmp_path, tokenizer, case, good, bad, field, reason):
    path = write_rows(tmp_path, good, bad)
    with pytest.raises(DataError) as info:
        get_dataset(DataArguments(dataset=path), tokenizer, "dpo", seed=0)
    msg = str(info.value)
    assert path in msg
    assert "row 1 (0-based)" in msg
    assert f"field `{field}`" in msg
    assert reason in msg
    assert "skip_invalid_rows" in msg
    assert "\n" not in msg.strip()  # one paragraph


@pytest.mark.parametrize("case, good, bad, field, reason", CASES, ids=[c[0] for c in CASES])
def test_bad_row_is_dropped_counted_and_logged_when_skipping(
    tmp_path, tokenizer, caplog, case, good, bad, field, reason
):
    path = write_rows(tmp_path, good, bad)
    with caplog.at_level(logging.WARNING, logger="discoalign.data"):
        bundle = get_dataset(DataArguments(dataset=path, skip_invalid_rows=True), tokenizer, "dpo", seed=0)
    assert len(bundle.train) == 2
    assert bundle.stats == {reason: 1}
    lines = [r.getMessage() for r in caplog.records if "Dropped" in r.getMessage()]
    assert lines == [f"Dropped 1 of 3 rows of {path} as invalid (skip_invalid_rows: true): {reason}: 1"]


def test_counts_add_up_per_reason(tmp_path, tokenizer):
    rows = [GOOD, {**GOOD, "chosen": 1}, {**GOOD, "rejected": None}, {**GOOD, "chosen": 2}, {**GOOD, "margin": "x"}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    bundle = get_dataset(DataArguments(dataset=str(path), skip_invalid_rows=True), tokenizer, "rm", seed=0)
    assert len(bundle.train) == 1
    assert bundle.stats == {checks.WRONG_TYPE: 2, checks.MISSING: 1, checks.BAD_MARGIN: 1}


def test_every_row_bad_is_an_error_even_when_skipping(tmp_path, tokenizer):
    path = write_rows(tmp_path, {**GOOD, "chosen": None}, {**GOOD, "chosen": None})
    with pytest.raises(DataError, match=r"No usable rows are left in `dataset: .*missing or null field: 3"):
        get_dataset(DataArguments(dataset=path, skip_invalid_rows=True), tokenizer, "dpo", seed=0)


def test_rows_emptied_by_truncation_are_always_dropped_counted_and_logged(tmp_path, tokenizer, caplog):
    path = write_rows(tmp_path, GOOD, GOOD)
    # cutoff_len 1 leaves room for the one kept prompt token only (the config loader forbids it; the data layer
    # must still never yield an empty response)
    with caplog.at_level(logging.WARNING, logger="discoalign.data"), pytest.raises(DataError) as info:
        get_dataset(DataArguments(dataset=path, cutoff_len=1, skip_invalid_rows=True), tokenizer, "dpo", seed=0)
    assert f"{checks.TRUNCATED}: 3" in str(info.value) and "cutoff_len" in str(info.value)
    assert f"Dropped 3 rows of {path}: {checks.TRUNCATED} (cutoff_len: 1)." in caplog.text


def test_unknown_format_is_an_error_even_when_skipping(tmp_path, tokenizer):
    path = write_rows(tmp_path, {"question": "q", "answer": "a"}, {"question": "q", "answer": "a"})
    for skip in (False, True):
        with pytest.raises(DataError, match=r"Cannot tell the format") as info:
            get_dataset(DataArguments(dataset=path, skip_invalid_rows=skip), tokenizer, "dpo", seed=0)
        assert path in str(info.value) and "`question`, `answer`" in str(info.value)


def test_unreadable_file_is_an_error_even_when_skipping(tmp_path, tokenizer):
    path = tmp_path / "broken.json"
    path.write_text("[{")
    with pytest.raises(DataError, match=r"is not valid JSON") as info:
        get_dataset(DataArguments(dataset=str(path), skip_invalid_rows=True), tokenizer, "dpo", seed=0)
    assert str(path) in str(info.value)
