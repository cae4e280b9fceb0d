"""Restore a checkpoint's weights into the live model, for `resume_from_checkpoint` and best-model loading."""

from __future__ import annotations

import os

import torch

from ..errors import CheckpointError


def load_checkpoint_weights(model: torch.nn.Module, checkpoint_dir: str) -> None:
    """Load backbone (full weights or LoRA adapter) and heads from `checkpoint_dir` into `model` in place.

    `model` is a `ModelWithHeads` whose architecture matches the checkpoint (same heads, same adapter).
    """
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers.trainer_utils import load_sharded_checkpoint

    from ..models.checkpoint import load_heads

    if not os.path.isdir(checkpoint_dir):
        raise CheckpointError(f"Cannot resume: checkpoint directory {checkpoint_dir!r} does not exist.")
    backbone = model.backbone
    if isinstance(backbone, PeftModel):
        adapter_file = os.path.join(checkpoint_dir, "adapter_model.safetensors")
        if not os.path.isfile(adapter_file):
            raise CheckpointError(
                f"Cannot resume from {checkpoint_dir!r}: the run uses LoRA but adapter_model.safetensors is missing."
            )
        result = set_peft_model_state_dict(backbone, load_file(adapter_file))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise CheckpointError(f"Adapter in {checkpoint_dir!r} does not match the model: unexpected {unexpected[:5]}.")
    else:
        try:
            # strict=False because tied output embeddings are not stored twice; shapes are still checked.
            load_sharded_checkpoint(backbone, checkpoint_dir, strict=False, prefer_safe=True)
        except ValueError:
            from transformers.utils import SAFE_WEIGHTS_NAME

            path = os.path.join(checkpoint_dir, SAFE_WEIGHTS_NAME)
            if not os.path.isfile(path):
                raise CheckpointError(f"Cannot resume: no model weights (model.safetensors) in {checkpoint_dir!r}.")
            missing, unexpected = backbone.load_state_dict(load_file(path), strict=False)
            if unexpected:
                raise CheckpointError(f"Weights in {checkpoint_dir!r} do not match the model: unexpected {unexpected[:5]}.")
    load_heads(model, checkpoint_dir)
