"""Read a run's YAML, apply `key=value` overrides, check every key, and build the argument objects.

Everything here runs before any model or dataset is loaded, so a typo costs a second, not a download.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from ..errors import ConfigError
from .compat import KeyNote, mixed_precision, translate_keys
from .plan import RunPlan, build_plan
from .schema import ARGUMENT_CLASSES, DataArguments, FinetuningArguments, ModelArguments
from .training_args import build_training_arguments
from .validate import validate_combinations

logger = logging.getLogger(__name__)

CONFIG_FILE_NAME = "discoalign_config.yaml"


@dataclass
class RunConfig:
    """Everything one run needs, resolved: our three groups plus the Trainer's arguments."""

    model: ModelArguments
    data: DataArguments
    finetuning: FinetuningArguments
    training: Any  # transformers.TrainingArguments
    resolved: dict[str, Any]  # the flat dict written next to the checkpoint
    source: str = "<dict>"
    # Keys not read literally (LlamaFactory / TRL names, settings this machine or model cannot take): logged once
    # as one notice when the run starts (`config.compat.notice`, `train.tuner.run_exp`).
    key_notes: list[KeyNote] = dataclasses.field(default_factory=list)

    @property
    def plan(self) -> RunPlan:
        """The run's decisions (`config.plan`), derived from the validated keys."""
        return build_plan(self.finetuning)

    def save(self, output_dir: str | None = None) -> str:
        """Write the resolved flat config to `output_dir/discoalign_config.yaml` and return its path."""
        output_dir = output_dir or self.training.output_dir
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, CONFIG_FILE_NAME)
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.resolved, f, sort_keys=False)
        return path


def _our_fields() -> dict[str, tuple[type, dataclasses.Field]]:
    return {f.name: (cls, f) for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls)}


def _training_fields() -> dict[str, dataclasses.Field]:
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Turn `["pref_beta=0.2", "dataset=a.json"]` into a dict, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(
                f"Command-line override {item!r} is not of the form key=value (for example `pref_beta=0.2`)."
            )
        key, value = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        try:
            out[key] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            out[key] = value
    return out


def read_yaml(path: str) -> dict[str, Any]:
    """Load a flat YAML mapping, with errors that name the file."""
    if not os.path.isfile(path):
        raise ConfigError(f"Config file {path!r} does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file {path!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path!r} must hold a mapping of keys to values, not a {type(data).__name__}.")
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(
            f"Config file {path!r} must be flat (one `key: value` per line, like LlamaFactory); "
            f"key(s) {', '.join(map(repr, nested))} hold nested mappings."
        )
    return data


def _coerce(key: str, value: Any, annotation: Any, source: str) -> Any:
    """Check one of our keys against its annotation; ints are accepted where floats are expected."""
    hint = annotation
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        hint = non_none[0] if len(non_none) == 1 else hint
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"Config key `{key}` in {source} is {value!r}; it must be one of {', '.join(map(repr, args))}."
            )
        return value

    def bad(expected: str) -> ConfigError:
        return ConfigError(
            f"Config key `{key}` in {source} is {value!r} ({type(value).__name__}); expected {expected}."
        )

    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `3e-4` (no dot) as a string; users write learning rates that way.
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    return value


def _coerce_training(key: str, value: Any, source: str) -> Any:
    """Check a TrainingArguments field against its declared type and undo YAML 1.1's guesses: `3e-4` (a string)
    becomes the float the field declares, and `no` (read as false) becomes the string "no" for strategy fields
    such as `save_strategy`. TrainingArguments itself accepts `max_steps: 2.5` and fails later, mid-run."""
    from transformers import TrainingArguments

    hint = typing.get_type_hints(TrainingArguments).get(key)
    if value is False and hint not in (bool, bool | None) and key.endswith("_strategy"):
        return "no"
    if value is None:
        return value
    if hint in (float, float | None, int, int | None, bool, bool | None):
        base = {float | None: float, int | None: int, bool | None: bool}.get(hint, hint)
        return _coerce(key, value, base, source)
    return value


def build_config(
    raw: dict[str, Any],
    source: str = "<dict>",
    defaults: dict[str, Any] | None = None,
    require_stage: bool = False,
    overrides: set[str] | None = None,
) -> RunConfig:
    """Check a flat dict of keys and build the argument objects. Raises ConfigError on any mistake.

    `require_stage`: a run's YAML must name its `stage` (the CLI sets this; the default `rm` is for code).
    `overrides`: the keys of `raw` given on the command line (an error about one names the command line).
    """
    ours = _our_fields()
    theirs = _training_fields()
    merged: dict[str, Any] = dict(defaults or {})
    merged.update(raw)
    merged, key_notes = translate_keys(merged, source, set(ours) | set(theirs), overrides)
    if require_stage and merged.get("stage") is None:
        raise ConfigError(
            f"{source} has no `stage` key; say what to train: `stage: rm` (reward model), `stage: dpo` or `stage: ppo`."
        )

    groups: dict[type, dict[str, Any]] = {cls: {} for cls in ARGUMENT_CLASSES}
    training_kwargs: dict[str, Any] = {}
    for key, value in merged.items():
        where = "the command line" if key in (overrides or ()) else source
        if key in ours:
            cls, f = ours[key]
            hints = typing.get_type_hints(cls)
            groups[cls][key] = _coerce(key, value, hints[key], where)
        else:
            training_kwargs[key] = _coerce_training(key, value, where)

    model_args = ModelArguments(**groups[ModelArguments])
    data_args = DataArguments(**groups[DataArguments])
    ft_args = FinetuningArguments(**groups[FinetuningArguments])

    training_kwargs.setdefault("report_to", "none")
    training_kwargs.setdefault("output_dir", os.path.join("saves", ft_args.stage))
    # Trainer would otherwise drop every column its model's forward does not name.
    training_kwargs.setdefault("remove_unused_columns", False)
    key_notes += mixed_precision(training_kwargs)
    notes = validate_combinations(model_args, data_args, ft_args, training_kwargs, source)
    training_args = build_training_arguments(training_kwargs, source)

    resolved: dict[str, Any] = {}
    for obj in (model_args, data_args, ft_args):
        resolved.update(dataclasses.asdict(obj))
    resolved.update({k: v for k, v in training_kwargs.items()})
    for note in notes:
        logger.warning(note)
    return RunConfig(model_args, data_args, ft_args, training_args, resolved, source, key_notes)


def load_config(
    path: str | None,
    overrides: list[str] | dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
) -> RunConfig:
    """Read `path` (flat YAML), apply overrides (`key=value` strings or a dict), validate, build."""
    raw = read_yaml(path) if path else {}
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    raw.update(extra)
    return build_config(raw, source=repr(path) if path else "the command line", defaults=defaults, overrides=set(extra))
