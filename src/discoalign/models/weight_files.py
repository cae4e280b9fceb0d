"""Finding and reading weight files safely, in a local directory or a (cached) hub repo.

Only safetensors and `torch.load(..., weights_only=True)` are used: a checkpoint can never run code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch

from ..errors import CheckpointError

SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX = "pytorch_model.bin.index.json"


def locate_file(name_or_path: str, filename: str, cache_dir: str | None = None) -> str | None:
    """Path of `filename` inside a local dir, or inside a hub repo's cache (downloaded when online); else None."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        return path if os.path.isfile(path) else None
    try:
        from transformers.utils import cached_file

        return cached_file(
            name_or_path,
            filename,
            cache_dir=cache_dir,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            _raise_exceptions_for_gated_repo=False,
        )
    except Exception:  # not a valid repo id, offline and not cached, ...: the file is simply not there
        return None


def read_json(path: str) -> dict:
    """A JSON object from `path`; CheckpointError naming the file when it is unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"Checkpoint file {path!r} is not valid JSON ({e}); the checkpoint is corrupt.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"Checkpoint file {path!r} must hold a JSON object, not {type(data).__name__}.")
    return data


def load_tensor_file(path: str, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file, or of a `.bin` via `torch.load(weights_only=True)`; only keys `keep` accepts.

    Raises CheckpointError naming the file when it cannot be read.
    """
    keep = keep or (lambda key: True)
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as f:
                return {key: f.get_tensor(key) for key in f.keys() if keep(key)}
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and OS errors all mean the same thing to the user
        raise CheckpointError(
            f"Checkpoint file {path!r} could not be read ({type(e).__name__}: {e}). It is corrupt, truncated, or "
            "not a weights file (only safetensors and weights-only torch files are loaded)."
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"Checkpoint file {path!r} does not hold a dict of tensors.")
    return {key: value for key, value in state.items() if keep(key) and isinstance(value, torch.Tensor)}


def read_model_tensors(
    name_or_path: str, keep: Callable[[str], bool], cache_dir: str | None = None
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Tensors whose key `keep` accepts from a model's weight files (single or sharded, safetensors or .bin).

    Returns (tensors, the file or index they came from); ({}, None) when there are no weight files.
    Shards are only opened when their index says they hold a wanted key.
    """
    for single, index in ((SAFE_WEIGHTS, SAFE_WEIGHTS_INDEX), (TORCH_WEIGHTS, TORCH_WEIGHTS_INDEX)):
        path = locate_file(name_or_path, single, cache_dir)
        if path is not None:
            return load_tensor_file(path, keep), path
        index_path = locate_file(name_or_path, index, cache_dir)
        if index_path is not None:
            weight_map = read_json(index_path).get("weight_map", {})
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted({f for key, f in weight_map.items() if keep(key)}):
                shard_path = locate_file(name_or_path, shard, cache_dir)
                if shard_path is None:
                    raise CheckpointError(f"Shard {shard!r} listed in {index_path!r} is missing.")
                tensors.update(load_tensor_file(shard_path, keep))
            return tensors, index_path
    return {}, None
