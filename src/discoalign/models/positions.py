"""How many positions a model can read, from its config alone (before any weight loads): `cutoff_len`'s limit.

A sequence longer than the limit fails (GPT-2's learned positions: `IndexError: index out of range in self`) or
runs on positions the model never saw (RoPE models, whose quality falls off past them). `train.tuner` therefore
clamps `cutoff_len` to the limit, with a line in the run's notice: truncation then works as with a smaller
`cutoff_len`, and a LlamaFactory config written for a 2048-position model runs on a 512-position one.
"""

from __future__ import annotations

import os

from ..config.builtin_models import TINY_ARCHS, TINY_MULTIMODAL_ARCHS
from .backbone import BUILTIN_PREFIX, adapter_base
from .tiny import TINY_MAX_POSITIONS
from .weight_files import locate_file, read_json

# Config fields that hold a model's position limit, in the order transformers' configs use them.
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")


def _limit_of(config: dict) -> tuple[int, str] | None:
    for source in (config, config.get("text_config") or {}):
        for key in POSITION_FIELDS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value, key
    return None


def position_limit(name: str, cache_dir: str | None = None) -> tuple[int, str] | None:
    """(positions, config field) of the model `name` (a built-in, a folder, an adapter's base or a cached hub
    model), or None when its config names no limit (T5's relative positions) or cannot be found here."""
    for _ in range(5):  # an adapter's base, and so on
        if name.startswith(BUILTIN_PREFIX):
            arch = name[len(BUILTIN_PREFIX) :]
            known = arch in TINY_ARCHS or arch in TINY_MULTIMODAL_ARCHS
            return (
                (TINY_MAX_POSITIONS, "n_positions" if arch == "gpt2" else "max_position_embeddings") if known else None
            )
        path = locate_file(os.path.expanduser(name), "config.json", cache_dir)
        if path is not None:
            return _limit_of(read_json(path))
        base = adapter_base(os.path.expanduser(name), cache_dir)
        if base is None:
            return None
        name = base
    return None
