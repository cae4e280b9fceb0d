"""What `discoalign train` and `discoalign eval` make of a flat config: the one path from keys to a checked `RunConfig`,
used by the commands and by the demo alike."""

from __future__ import annotations

from typing import Any

from ..config.loader import RunConfig, build_config


def command_config(command: str, raw: dict[str, Any], source: str, overrides: set[str] | None = None) -> RunConfig:
    """The checked config of `discoalign <command>` (train or eval) for the flat keys `raw`, read from `source`.

    `train`: train, and evaluate when eval data is given (`eval_dataset` or `val_size`), unless the keys say
    otherwise. `eval`: evaluate only; without eval data the `dataset` itself is evaluated. Every run must name its
    `stage`. `overrides`: the keys given on the command line.
    """
    raw = dict(raw)
    has_eval = bool(raw.get("eval_dataset")) or bool(raw.get("val_size"))
    if command == "train":
        defaults = {"do_train": True, "do_eval": has_eval}
    else:
        defaults = {}
        raw.update(do_train=False, do_eval=True)
        if not has_eval and raw.get("dataset"):
            raw["eval_dataset"] = raw["dataset"]
    return build_config(raw, source=source, defaults=defaults, require_stage=True, overrides=overrides)
