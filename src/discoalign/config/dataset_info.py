"""`dataset_dir`'s registry file, LlamaFactory's `dataset_info.json`: read and checked by the config checks, so a
missing or malformed registry shows before any model loads; its entries are resolved by `data/registry.py`."""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import DataError

DATASET_INFO = "dataset_info.json"
DEFAULT_DATASET_DIR = "data"  # LlamaFactory's default `dataset_dir`


def registry_dir(dataset_dir: str | None) -> str | None:
    """The folder whose registry a run reads: `dataset_dir` when set to another folder; the default `data` only
    when it holds a `dataset_info.json` (without one, names in `dataset` are paths, as before)."""
    if not dataset_dir:
        return None
    if dataset_dir == DEFAULT_DATASET_DIR and not os.path.isfile(os.path.join(dataset_dir, DATASET_INFO)):
        return None
    return dataset_dir


def load_dataset_info(dataset_dir: str) -> dict[str, dict[str, Any]]:
    """The parsed `<dataset_dir>/dataset_info.json`, with errors that name the file and the entry."""
    path = os.path.join(dataset_dir, DATASET_INFO)
    if not os.path.isfile(path):
        raise DataError(f"`dataset_dir: {dataset_dir}` has no {DATASET_INFO} (LlamaFactory's dataset registry); "
                        "add one, or unset `dataset_dir` and give `dataset` as file paths.")  # fmt: skip
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"Cannot read the dataset registry {path!r}: {e}.") from None
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise DataError(f"{path!r} must map dataset names to entries (objects with `file_name`, `formatting`, ...).")
    return info
