"""Reading raw rows from the places a `dataset` spec can name.

A spec is a file (`.json` array or JSON lines, `.jsonl`, `.parquet`, `.csv`), a `datasets` `save_to_disk`
folder (a Dataset, or a DatasetDict whose "train" split is used), a plain folder of such files, or
`builtin:synthetic`; several specs are joined with commas.

Parquet, CSV and `save_to_disk` folders are read with the `datasets` library. JSON is parsed with Python's
`json` module instead: it reports the exact line of a syntax error, keeps a row whose field has an odd type
as it is (so the row check can name that row instead of the whole file failing), and tolerates blank lines
in JSON lines files, none of which `datasets`' JSON builder does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .synthetic import synthetic_pair_rows
from .synthetic_media import synthetic_audio_rows, synthetic_vl_rows
from .synthetic_noise import PROFILES, profile_rows

SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")
BUILTIN_SYNTHETIC = "builtin:synthetic"
BUILTIN_SYNTHETIC_NOISY = "builtin:synthetic-noisy"  # eight contexts, flip rates 0-0.45 (docs/noisy_labels.md)
BUILTIN_SYNTHETIC_VL = "builtin:synthetic-vl"  # images (for vision-language models)
BUILTIN_SYNTHETIC_AUDIO = "builtin:synthetic-audio"  # tones (for audio-language models)
BUILTINS = (BUILTIN_SYNTHETIC, BUILTIN_SYNTHETIC_NOISY, BUILTIN_SYNTHETIC_VL, BUILTIN_SYNTHETIC_AUDIO)
SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class RawRows:
    """The rows of one file (or builtin), before format conversion."""

    name: str  # what error messages call it: the file path, or the builtin name
    rows: list[Any]  # normally dicts; anything else is reported as a bad row
    columns: list[str]  # every key seen, in order of first appearance


def split_specs(value: str) -> list[str]:
    """`"a.json, b.parquet"` -> `["a.json", "b.parquet"]`."""
    return [part.strip() for part in value.split(",") if part.strip()]


def _columns_of(rows: list[Any]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        if isinstance(row, dict):
            seen.update(dict.fromkeys(row))
    return list(seen)


@dataclass
class UnreadableLine:
    """A JSON lines line that is not valid JSON (or not UTF-8): kept in place of its row, so the pipeline can
    count and skip it with `skip_invalid_rows: true`, or name its line when stopping."""

    line: int  # 1-based, as editors number lines
    detail: str


def _line_and_column(data: bytes, offset: int) -> tuple[int, int]:
    """1-based line and column of a byte offset."""
    line = data.count(b"\n", 0, offset) + 1
    return line, offset - (data.rfind(b"\n", 0, offset) + 1) + 1


def _read_json(path: str) -> list[Any]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"Cannot read data file {path!r}: {e.strerror or e}.") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte order mark, as some Windows editors write (CSV files accept it too)
    if data.lstrip().startswith(b"["):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line, column = _line_and_column(data, e.start)
            raise DataError(
                f"Cannot read data file {path!r}: it is not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}, "
                f"column {column}). Save it as UTF-8."
            ) from None
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"Data file {path!r} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}."
            ) from None
        return rows
    rows: list[Any] = []
    for line_number, raw_line in enumerate(data.split(b"\n"), start=1):
        if not raw_line.strip():
            continue
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            detail = f"line {line_number} is not UTF-8 text (byte 0x{raw_line[e.start]:02x} at column {e.start + 1})"
            rows.append(UnreadableLine(line_number, detail + "; save the file as UTF-8"))
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            detail = f"line {line_number} is not valid JSON ({e.msg}, column {e.colno})"
            rows.append(UnreadableLine(line_number, detail))
    if rows and all(isinstance(r, UnreadableLine) for r in rows):
        first = rows[0]
        raise DataError(f"Data file {path!r} is neither a JSON array nor JSON lines (one object per line): "
                        f"{first.detail}.")  # fmt: skip
    return rows


def _read_with_datasets(path: str) -> list[Any]:
    import datasets

    builder = {".parquet": "parquet", ".csv": "csv"}[os.path.splitext(path)[1].lower()]
    try:
        dataset = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as e:  # pyarrow / pandas raise many kinds; all mean "this file cannot be read"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"Cannot read data file {path!r} as {builder}: {msg}.") from None
    return dataset.to_list()


def _read_save_to_disk(path: str) -> list[Any]:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as e:
        raise DataError(f"Cannot read the `save_to_disk` folder {path!r}: {e}.") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(
                f'The DatasetDict saved in {path!r} has no "train" split (it has '
                f'{", ".join(map(repr, loaded))}); save the split to use as its own Dataset, or name it "train".'
            )
        loaded = loaded["train"]
    return loaded.to_list()


def read_file(path: str) -> RawRows:
    """Read one data file by its extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"Data file {path!r} has an unknown extension {ext or '(none)'!r}; supported: "
            f"{', '.join(SUPPORTED_EXTENSIONS)}, a `save_to_disk` folder, or {BUILTIN_SYNTHETIC}."
        )
    rows = _read_json(path) if ext in (".json", ".jsonl") else _read_with_datasets(path)
    if not isinstance(rows, list):
        raise DataError(f"Data file {path!r} must hold a JSON array of objects or one object per line.")
    if not rows:
        raise DataError(f"Data file {path!r} has no rows.")
    return RawRows(path, rows, _columns_of(rows))


def read_spec(spec: str, synthetic_num_pairs: int, synthetic_seed: int) -> list[RawRows]:
    """The raw rows a single spec names: one entry per file (a folder gives several)."""
    if spec.startswith(BUILTIN_SYNTHETIC_NOISY + ":"):  # `builtin:synthetic-noisy:<profile>`
        profile = spec[len(BUILTIN_SYNTHETIC_NOISY) + 1 :]
        if profile not in PROFILES:
            raise DataError(
                f"Unknown noise profile {profile!r} in {spec!r}; the profiles of {BUILTIN_SYNTHETIC_NOISY} are "
                f"{', '.join(PROFILES)} (docs/data.md)."
            )
        rows = profile_rows(synthetic_num_pairs, synthetic_seed, profile)
        return [RawRows(f"{spec} (seed {synthetic_seed})", rows, _columns_of(rows))]
    if spec.startswith("builtin:"):
        if spec not in BUILTINS:
            raise DataError(f"Unknown builtin dataset {spec!r}; the builtins are {', '.join(map(repr, BUILTINS))}.")
        make_rows = {
            BUILTIN_SYNTHETIC: synthetic_pair_rows,
            BUILTIN_SYNTHETIC_NOISY: profile_rows,  # the default profile, `imbalanced`
            BUILTIN_SYNTHETIC_VL: synthetic_vl_rows,
        }.get(spec, synthetic_audio_rows)
        rows = make_rows(synthetic_num_pairs, synthetic_seed)
        return [RawRows(f"{spec} (seed {synthetic_seed})", rows, _columns_of(rows))]
    if os.path.isdir(spec):
        if any(os.path.isfile(os.path.join(spec, m)) for m in SAVE_TO_DISK_MARKERS):
            rows = _read_save_to_disk(spec)
            if not rows:
                raise DataError(f"The `save_to_disk` folder {spec!r} has no rows.")
            return [RawRows(spec, rows, _columns_of(rows))]
        files = sorted(
            os.path.join(spec, name)
            for name in os.listdir(spec)
            if os.path.splitext(name)[1].lower() in SUPPORTED_EXTENSIONS and os.path.isfile(os.path.join(spec, name))
        )
        if not files:
            raise DataError(
                f"Data folder {spec!r} holds no {', '.join(SUPPORTED_EXTENSIONS)} file and is not a "
                "`save_to_disk` folder."
            )
        return [read_file(path) for path in files]
    if not os.path.exists(spec):
        raise DataError(
            f"Data file {spec!r} does not exist (relative paths start from {os.getcwd()!r}). A `dataset` is a "
            f"local file ({', '.join(SUPPORTED_EXTENSIONS)}), a folder, {BUILTIN_SYNTHETIC}, or the name of an "
            "entry of `dataset_dir`'s dataset_info.json (LlamaFactory's registry; `dataset_dir` defaults to `data`); "
            "hub datasets must be saved locally first."
        )
    return [read_file(spec)]
