"""LlamaFactory's dataset registry: `dataset_dir` + `dataset_info.json`, datasets named by their entry.

With `dataset_dir` set (default `data`, as in LlamaFactory, used when it holds a `dataset_info.json`), each comma-separated name of `dataset` / `eval_dataset` that is an entry of
`<dataset_dir>/dataset_info.json` is read from the entry's `file_name` (relative to `dataset_dir`), and its rows are
renamed from the entry's `columns` / `tags` into the layout `formats.detect_format` knows. So a LlamaFactory data
folder works unchanged::

    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
    "dpo_en_demo": {"file_name": "dpo_en_demo.json", "ranking": true, "formatting": "sharegpt",
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}

Keys read: `file_name`, `formatting` (alpaca | sharegpt | openai), `ranking`, `columns` (prompt, query, response,
history, messages, system, chosen, rejected, images, audios, kto_tag), `tags` (role_tag, content_tag, user_tag,
assistant_tag, system_tag), `num_samples` (the first N rows). Names that are not entries are read as paths, as
without a registry. Hub entries (`hf_hub_url`, `ms_hub_url`, `script_url`) need a network and are refused.
"""

from __future__ import annotations

import difflib
import os
from typing import TYPE_CHECKING, Any

from ..config.dataset_info import DATASET_INFO, load_dataset_info, registry_dir
from ..errors import DataError
from .sources import RawRows, _columns_of, read_spec

if TYPE_CHECKING:
    from ..config.schema import DataArguments

FORMATTINGS = ("alpaca", "sharegpt", "openai")
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": None}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "system_tag": "system"}  # fmt: skip
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "system_tag": "system"}  # fmt: skip
MEDIA_COLUMNS = ("images", "audios", "videos")


def _entry_problem(path: str, name: str, detail: str) -> DataError:
    return DataError(f"{path}: entry `{name}`: {detail}")


def _resolve(name: str, entry: dict[str, Any], dataset_dir: str) -> tuple[str, str, bool, dict, dict]:
    """(file path, formatting, ranking, columns, tags) of one registry entry, checked."""
    where = os.path.join(dataset_dir, DATASET_INFO)
    if "file_name" not in entry:
        hub_keys = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
        hub = next((k for k in hub_keys if k in entry), None)
        why = f"`{hub}` needs a network, which discoalign does not use; download the data and give `file_name`" if hub \
            else "it has no `file_name`"  # fmt: skip
        raise _entry_problem(where, name, why + ".")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise _entry_problem(where, name, f"`formatting: {formatting}` is not one of {', '.join(FORMATTINGS)}.")
    columns, tags = entry.get("columns") or {}, entry.get("tags") or {}
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        raise _entry_problem(where, name, "`columns` and `tags` must be objects mapping names to column names.")
    path = os.path.join(dataset_dir, entry["file_name"])
    if not os.path.exists(path):
        raise _entry_problem(where, name, f"`file_name` {entry['file_name']!r} does not exist in {dataset_dir!r}.")
    return path, formatting, bool(entry.get("ranking", False)), columns, tags


def _message(value: Any, tags: dict[str, str]) -> Any:
    """One registry-tagged message as `{"role", "content"}`; anything else is passed on for the row checks."""
    if not isinstance(value, dict):
        return value
    role = value.get(tags["role_tag"])
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    return {"role": roles.get(role, role), "content": value.get(tags["content_tag"])}


def _alpaca_row(row: dict[str, Any], cols: dict[str, str | None], ranking: bool) -> dict[str, Any]:
    prompt = row.get(cols["prompt"])
    query = row.get(cols["query"]) if cols["query"] else None
    user = f"{prompt}\n\n{query}" if prompt is not None and query else prompt
    out: dict[str, Any] = {}
    history = row.get(cols["history"]) if cols["history"] else None
    turns: list[dict[str, Any]] = []
    for pair in history or []:  # [[user, assistant], ...]
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    if user is not None:
        turns.append({"role": "user", "content": user})
    if ranking:
        out.update(prompt=turns, chosen=row.get(cols.get("chosen") or "chosen"),
                   rejected=row.get(cols.get("rejected") or "rejected"))  # fmt: skip
    else:
        response = row.get(cols["response"]) if cols["response"] else None
        out["messages"] = turns + ([{"role": "assistant", "content": response}] if response is not None else [])
    if cols["system"] and row.get(cols["system"]):
        out["system"] = row[cols["system"]]
    return out


def _sharegpt_row(row: dict[str, Any], cols: dict[str, str | None], tags: dict[str, str], ranking: bool):
    messages = row.get(cols["messages"])
    messages = [_message(m, tags) for m in messages] if isinstance(messages, list) else messages
    out: dict[str, Any] = {}
    if ranking:
        out.update(conversations=messages, chosen=_message(row.get(cols.get("chosen") or "chosen"), tags),
                   rejected=_message(row.get(cols.get("rejected") or "rejected"), tags))  # fmt: skip
    else:
        out["messages"] = messages
    if cols["system"] and row.get(cols["system"]):
        out["system"] = row[cols["system"]]
    return out


def convert_registry_rows(rows: list[Any], formatting: str, ranking: bool, columns: dict, tags: dict) -> list[Any]:
    """Rename raw rows of a registry entry into a layout `formats.detect_format` knows (see the module docstring).

    Missing columns are left missing, so the usual row checks name the row and field."""
    if formatting == "alpaca":
        cols = {**ALPACA_COLUMNS, **columns}
    else:
        cols = {**SHAREGPT_COLUMNS, **columns}
        tags = {**(OPENAI_TAGS if formatting == "openai" else SHAREGPT_TAGS), **tags}
    out = []
    for row in rows:
        if not isinstance(row, dict):
            out.append(row)
            continue
        new = _alpaca_row(row, cols, ranking) if formatting == "alpaca" else _sharegpt_row(row, cols, tags, ranking)
        for media in MEDIA_COLUMNS:
            if columns.get(media) and row.get(columns[media]) is not None:
                new[media] = row[columns[media]]
        if columns.get("kto_tag") and columns["kto_tag"] in row:  # KTO's label (LlamaFactory's `kto_tag`)
            new["label"] = row[columns["kto_tag"]]
        out.append(new)
    return out


def read_registered(name: str, dataset_dir: str) -> list[RawRows]:
    """The rows of registry entry `name` of `<dataset_dir>/dataset_info.json`, renamed (one RawRows per file)."""
    info = load_dataset_info(dataset_dir)
    path, formatting, ranking, columns, tags = _resolve(name, info[name], dataset_dir)
    sources = read_spec(path, 0, 0)
    limit = info[name].get("num_samples")
    for source in sources:
        rows = convert_registry_rows(source.rows, formatting, ranking, columns, tags)
        if isinstance(limit, int) and limit > 0:
            rows = rows[:limit]
        source.rows, source.columns = rows, _columns_of(rows)
    return sources


def read_dataset(spec: str, data_args: DataArguments, synthetic_seed: int) -> list[RawRows]:
    """What one comma-separated part of `dataset` names: a registry entry when `dataset_dir` is set and lists it,
    else a file, folder or builtin (`sources.read_spec`)."""
    dataset_dir = registry_dir(getattr(data_args, "dataset_dir", None))
    if dataset_dir and not spec.startswith("builtin:"):
        info = load_dataset_info(dataset_dir)
        if spec in info:
            return read_registered(spec, dataset_dir)
        if not os.path.exists(spec):
            close = difflib.get_close_matches(spec, list(info), n=1, cutoff=0.5)
            raise DataError(
                f"`{spec}` is neither an entry of {os.path.join(dataset_dir, DATASET_INFO)} (its entries: "
                f"{', '.join(sorted(info)) or 'none'}) nor an existing file."
                + (f" Did you mean `{close[0]}`?" if close else "")
            )
    return read_spec(spec, data_args.synthetic_num_pairs, synthetic_seed)
