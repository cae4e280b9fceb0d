"""A YAML written for LlamaFactory or TRL runs as it is where the meaning is the same.

`translate_keys` applies the tables of `config.aliases` to a run's flat keys: every key that is renamed, rewritten or
ignored becomes a `KeyNote`, and every key that cannot be honoured (no equivalent, or unknown) goes into ONE error
that lists them all. `mixed_precision` drops `bf16` / `fp16` where no GPU can run them. The run's notes are logged
together, once, as one notice (`notice`), after the last of them (the `cutoff_len` limit, `train.tuner`) is known.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .aliases import CONVERTED, EXACT_ALIASES, IGNORED, NO_EQUIVALENT, STAGE_ALIASES


@dataclass(frozen=True)
class KeyNote:
    """One key of the user's config that is not read literally: `key: value` -> `result` (`why`)."""

    key: str
    value: Any
    result: str  # what the run does instead, e.g. "`warmup_steps: 0.1`" or "ignored"
    why: str

    def line(self) -> str:
        value = {True: "true", False: "false", None: "null"}.get(self.value, self.value) \
            if isinstance(self.value, (bool, type(None))) else self.value  # fmt: skip
        return f"`{self.key}: {value}` -> {self.result}: {self.why}."


def _closest(key: str, known: list[str]) -> str:
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" Did you mean `{match[0]}`?" if match else ""


def translate_keys(
    merged: dict[str, Any], source: str, known: set[str], overrides: set[str] | None = None
) -> tuple[dict[str, Any], list[KeyNote]]:
    """Rename, rewrite and drop foreign keys; raise ONE ConfigError naming every key that cannot be honoured.

    `known`: our keys and the TrainingArguments fields. `overrides`: keys that came from the command line, so an
    error blames them on the command line rather than on `source`.
    """
    overrides = overrides or set()
    out: dict[str, Any] = {}
    notes: list[KeyNote] = []
    problems: list[tuple[str, str]] = []  # (key, what is wrong)
    stage = merged.get("stage")
    aliases = {**EXACT_ALIASES, **(STAGE_ALIASES.get(stage, {}) if isinstance(stage, str) else {})}

    for key, value in merged.items():
        if key in aliases:
            ours, origin = aliases[key]
            if ours in merged:
                problems.append((key, f"`{key}` is {origin}'s name for `{ours}`, which is set too; keep `{ours}`."))
                continue
            out[ours] = value
            notes.append(KeyNote(key, value, f"`{ours}: {value}`", f"{origin}'s name"))
        elif key in CONVERTED:
            converted = CONVERTED[key](value)
            if isinstance(converted, str):
                problems.append((key, converted))
                continue
            keys, why = converted
            clash = [k for k in keys if k in merged]
            if clash:
                problems.append((key, f"`{key}` and `{clash[0]}` mean the same thing; keep `{clash[0]}`."))
                continue
            out.update(keys)
            result = ", ".join(f"`{k}: {v}`" for k, v in keys.items()) or "the default"
            notes.append(KeyNote(key, value, result, why))
        elif key in IGNORED:
            notes.append(KeyNote(key, value, "ignored", IGNORED[key]))
        elif key in NO_EQUIVALENT:
            problems.append((key, f"`{key}` (a LlamaFactory/TRL key) has no equivalent here: {NO_EQUIVALENT[key]}"))
        elif key not in known:
            problems.append((key, f"unknown key `{key}`.{_closest(key, sorted(known))}"))
        else:
            out[key] = value
    if problems:
        from_cli = {key for key, _ in problems if key in overrides}
        place = ("the command line" if len(from_cli) == len(problems) else
                 f"{source} and the command line ({', '.join(f'`{k}`' for k in sorted(from_cli))})" if from_cli
                 else source)  # fmt: skip
        count = f"{len(problems)} key{'s' if len(problems) > 1 else ''}"
        raise ConfigError(f"{count} in {place} cannot be used: " + " ".join(text for _, text in problems)
                          + " (`discoalign keys` lists every key; docs/llamafactory.md the LlamaFactory keys that are "
                          "mapped.)")  # fmt: skip
    return out, notes


def mixed_precision(training: dict[str, Any]) -> list[KeyNote]:
    """`bf16` / `fp16` on a run without a GPU that runs them (or with `use_cpu: true`): dropped, training in fp32.

    Mixed precision is a GPU speed switch here: transformers refuses it on a CPU-only machine unless `use_cpu` is
    set, and then autocasts CPU matmuls to bf16, which on most CPUs is slower than fp32 and changes the numbers. A
    config written for a GPU therefore runs on CPU in fp32, with this note, instead of failing.
    """
    wanted = [k for k in ("bf16", "fp16") if training.get(k)]
    if not wanted:
        return []
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_cuda_available

    on_cpu = bool(training.get("use_cpu"))
    available = {"bf16": is_torch_bf16_gpu_available, "fp16": is_torch_cuda_available}
    notes = []
    for key in wanted:
        if on_cpu or not available[key]():
            training[key] = False
            where = "`use_cpu: true`" if on_cpu else f"no GPU that runs {key} is available"
            notes.append(KeyNote(key, True, "fp32", f"{where}; mixed precision is a GPU speed switch (on CPU it is "
                                 "slower than fp32 on most machines), so this run trains in fp32"))  # fmt: skip
    return notes


def notice(notes: list[KeyNote], source: str) -> str | None:
    """The one notice of a run: every key that was not read literally, and why; None when there is none."""
    if not notes:
        return None
    lines = [f"{len(notes)} key{'s' if len(notes) > 1 else ''} of {source} read differently from their literal "
             "meaning (LlamaFactory / TRL names, settings this machine or model cannot take):"]  # fmt: skip
    lines += [f"  - {note.line()}" for note in notes]
    return "\n".join(lines)
