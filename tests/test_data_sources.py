"""Reading raw rows: every file kind, folders, comma lists, max_samples, and unreadable inputs."""

from __future__ import annotations

import json

import datasets
import pytest

from discoalign.config.schema import DataArguments
from discoalign.data import get_dataset
from discoalign.data.sources import read_spec, split_specs
from discoalign.errors import DataError

ROWS = [
    {"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}.", "margin": float(i)}
    for i in range(4)
]


def write_json(path, rows):
    path.write_text(json.dumps(rows), encoding="utf-8")
    return str(path)


def write_jsonl(path, rows, blank_lines=False):
    sep = "\n\n" if blank_lines else "\n"
    path.write_text(sep.join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def rows_of(spec):
    return [row for raw in read_spec(spec, 10, 0) for row in raw.rows]


def test_json_array_and_json_lines_read_the_same_rows(tmp_path):
    assert rows_of(write_json(tmp_path / "a.json", ROWS)) == ROWS
    assert rows_of(write_jsonl(tmp_path / "b.jsonl", ROWS, blank_lines=True)) == ROWS
    # a .json file may hold JSON lines too
    assert rows_of(write_jsonl(tmp_path / "c.json", ROWS)) == ROWS


def test_parquet_csv_and_save_to_disk(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.to_csv(str(tmp_path / "a.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved_dataset"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    for spec in ("a.parquet", "a.csv", "saved_dataset", "saved_dict"):
        assert rows_of(str(tmp_path / spec)) == ROWS, spec


def test_save_to_disk_dict_without_train_split(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"no \"train\" split .*'validation'"):
        read_spec(str(tmp_path / "d"), 10, 0)


def test_plain_folder_reads_every_data_file_in_name_order(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_json(folder / "b.json", ROWS[2:])
    write_jsonl(folder / "a.jsonl", ROWS[:2])
    (folder / "notes.txt").write_text("ignored")
    raws = read_spec(str(folder), 10, 0)
    assert [r.name for r in raws] == [str(folder / "a.jsonl"), str(folder / "b.json")]
    assert [row for raw in raws for row in raw.rows] == ROWS


def test_comma_list_and_max_samples_per_dataset(tmp_path, tokenizer):
    a = write_json(tmp_path / "a.json", ROWS)
    b = write_jsonl(tmp_path / "b.jsonl", ROWS[::-1])
    assert split_specs(f" {a} , {b},") == [a, b]
    bundle = get_dataset(DataArguments(dataset=f"{a}, {b}", max_samples=3), tokenizer, "rm", seed=0)
    # first 3 rows of each dataset, in order
    assert bundle.train["margin"] == [0.0, 1.0, 2.0, 3.0, 2.0, 1.0]


def test_max_samples_counts_a_folder_as_one_dataset(tmp_path, tokenizer):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_json(folder / "a.json", ROWS[:2])
    write_json(folder / "b.json", ROWS[2:])
    bundle = get_dataset(DataArguments(dataset=str(folder), max_samples=3), tokenizer, "rm", seed=0)
    assert bundle.train["margin"] == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.json", None, r"does not exist"),
        ("data.txt", "hello", r"unknown extension '\.txt'"),
        ("broken.json", '[{"prompt": "a", ', r"is not valid JSON: .* line 1"),
        ("broken.jsonl", '{"prompt": "a"}\n{"prompt": \n', r"line 2 is not valid JSON"),
        ("empty.json", "", r"has no rows"),
        ("object.json", '{"a": [1, 2]}', r"no rows|Cannot tell the format"),
        ("broken.parquet", "not parquet", r"Cannot read data file .* as parquet"),
    ],
)
def test_unreadable_files_name_the_path(tmp_path, tokenizer, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        get_dataset(DataArguments(dataset=str(path)), tokenizer, "dpo", seed=0)
    assert str(path) in str(info.value)


def test_undecodable_file(tmp_path, tokenizer):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"prompt": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"Cannot read data file") as info:
        get_dataset(DataArguments(dataset=str(path)), tokenizer, "dpo", seed=0)
    assert str(path) in str(info.value)


def test_unknown_builtin_and_empty_folder(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"Unknown builtin dataset 'builtin:nope'"):
        get_dataset(DataArguments(dataset="builtin:nope"), tokenizer, "dpo", seed=0)
    with pytest.raises(DataError, match=r"holds no .* file") as info:
        get_dataset(DataArguments(dataset=str(tmp_path)), tokenizer, "dpo", seed=0)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(DataError, match=r"`dataset`"):
        get_dataset(DataArguments(dataset=None), tokenizer, "dpo", seed=0)
