"""Property test of the data loader: mutated rows give a clean error or a counted skip, never a traceback.

A seeded generator of our own (no new dependency): each case is a small file of rows in one of the supported
formats, some of them mutated (missing, null, wrong-typed, nested, huge, non-ASCII, lone surrogates, rows of
another format, roles that cannot answer, garbage lines). For every case and both values of
`skip_invalid_rows`:

* the loader raises a `DiscoAlignError` (the CLI's exit 2) with the file's path in its message, or
* it returns, and kept rows + counted skips (every reason, truncation included) = the file's rows; without
  `skip_invalid_rows` nothing but truncation may have been dropped.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from discoalign.config.schema import DataArguments
from discoalign.data import get_dataset
from discoalign.errors import DiscoAlignError

CASES = 500  # files, each loaded with both settings of skip_invalid_rows: 1000 loader runs

WORDS = ["hello", "world", "café", "naïve", "日本語", "🙂", "\u202eRTL", "tab\tand\nnewline", "x" * 50, "", " "]


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS[:-2]) for _ in range(rng.randint(1, 4)))


def _valid_row(rng: random.Random, fmt: str) -> dict[str, Any]:
    prompt, chosen, rejected = _text(rng), _text(rng) + " good", _text(rng) + " bad"
    if fmt == "pairwise":
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": rng.choice([None, 0.5, 2])}
    if fmt == "pairwise_messages":
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    if fmt == "implicit":
        user = {"role": "user", "content": prompt}
        return {"chosen": [user, {"role": "assistant", "content": chosen}],
                "rejected": [user, {"role": "assistant", "content": rejected}]}  # fmt: skip
    if fmt == "hh_rlhf":
        return {"chosen": f"\n\nHuman: {prompt}\n\nAssistant: {chosen}",
                "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {rejected}"}  # fmt: skip
    if fmt == "sharegpt":
        return {"conversations": [{"from": "human", "value": prompt}],
                "chosen": {"from": "gpt", "value": chosen}, "rejected": {"from": "gpt", "value": rejected}}  # fmt: skip
    return {"instruction": prompt, "input": rng.choice(["", "more"])}  # prompt-only (stage ppo)


def _bad_value(rng: random.Random) -> Any:
    return rng.choice([
        None, 0, -1, 3.5, float("inf"), True, [], {}, [1, 2], {"a": {"b": [None]}}, "x" * rng.choice([1, 5000]),
        "\ud800 lone surrogate", "\x00nul", [{"role": "user"}], [{"role": 7, "content": "x"}],
        [{"role": "user", "content": ["not", "parts"]}], [{"type": "text"}], {"from": "human", "value": "q"},
        [{"role": "narrator", "content": "x"}], "nan", "\n\nHuman: only a question",
    ])  # fmt: skip


def _mutate(rng: random.Random, row: dict[str, Any], fmts: list[str]) -> Any:
    kind = rng.randrange(8)
    row = json.loads(json.dumps(row))
    keys = list(row)
    if kind == 0 and keys:
        del row[rng.choice(keys)]
    elif kind in (1, 2) and keys:
        row[rng.choice(keys)] = _bad_value(rng)
    elif kind == 3 and keys:  # nested one level deeper
        key = rng.choice(keys)
        row[key] = rng.choice([[row[key]], {"value": row[key]}])
    elif kind == 4:
        return _valid_row(rng, rng.choice(fmts))  # a row of another format
    elif kind == 5:
        return rng.choice([None, 1, "a string row", [1, 2], [row]])  # not an object
    elif kind == 6:
        row[rng.choice(["margin", "true_reward_chosen", "noise", "topic", "system", "images"])] = _bad_value(rng)
    else:  # the assistant's turn moved into the prompt, or a user turn into a response
        if "chosen" in row and isinstance(row["chosen"], list) and row["chosen"]:
            row["chosen"][-1]["role"] = "user"
        elif "prompt" in row:
            row["prompt"] = [{"role": "assistant", "content": "I speak first"}]
    return row


def _write(path, rows: list[Any], rng: random.Random) -> int:
    """Write the rows as a JSON array or JSON lines (sometimes with a BOM or a garbage line); return the row count."""
    if path.suffix == ".json":
        data = json.dumps(rows).encode("utf-8", "surrogatepass")
        count = len(rows)
    else:
        lines = [json.dumps(row).encode("utf-8", "surrogatepass") for row in rows]
        if rng.random() < 0.15:
            lines.insert(rng.randrange(len(lines) + 1), rng.choice([b"{not json", b"caf\xe9 latin-1", b"[1,"]))
        count = len(lines)
        data = b"\n".join(lines)
    if rng.random() < 0.1:
        data = b"\xef\xbb\xbf" + data
    path.write_bytes(data)
    return count


FORMATS = ["pairwise", "pairwise_messages", "implicit", "hh_rlhf", "sharegpt"]


def _case(rng: random.Random, tmp_path, i: int):
    stage = "ppo" if rng.random() < 0.15 else rng.choice(["rm", "dpo"])
    fmts = FORMATS + (["prompt"] if stage == "ppo" else [])
    fmt = rng.choice(fmts)
    rows: list[Any] = []
    for _ in range(rng.randint(1, 5)):
        row = _valid_row(rng, fmt)
        rows.append(_mutate(rng, row, fmts) if rng.random() < 0.4 else row)
    path = tmp_path / f"case{i}{rng.choice(['.json', '.jsonl'])}"
    return stage, path, rows


def test_mutated_rows_give_a_clean_error_or_a_counted_skip(tmp_path, tokenizer):
    rng = random.Random(1234)
    outcomes = {"error": 0, "kept all": 0, "skipped some": 0}
    runs = 0
    for i in range(CASES):
        stage, path, rows = _case(rng, tmp_path, i)
        n_rows = _write(path, rows, rng)
        cutoff_len = rng.choice([8, 64, 512])
        for skip in (False, True):
            runs += 1
            args = DataArguments(dataset=str(path), skip_invalid_rows=skip, cutoff_len=cutoff_len)
            try:
                bundle = get_dataset(args, tokenizer, stage, seed=0)
            except DiscoAlignError as e:
                assert e.exit_code == 2
                assert str(path) in str(e), f"case {i}: the error does not name the file: {e}"
                outcomes["error"] += 1
                continue
            except Exception as e:  # noqa: BLE001 - the property: nothing else may escape
                pytest.fail(f"case {i} ({path.name}, skip={skip}, stage={stage}) raised {type(e).__name__}: {e}\n"
                            f"{path.read_bytes()[:600]!r}")  # fmt: skip
            dropped = sum(bundle.stats.values())
            assert len(bundle.train) + dropped == n_rows, (i, skip, bundle.stats)
            if not skip:
                assert set(bundle.stats) <= {"response empty after truncation"}, (i, bundle.stats)
            outcomes["skipped some" if dropped else "kept all"] += 1
    assert runs >= 500
    # The generator must reach every outcome often, or the property says little.
    assert min(outcomes.values()) >= 50, outcomes
