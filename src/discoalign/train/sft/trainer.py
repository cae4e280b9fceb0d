"""`SFTTrainer`: the causal-LM loss on response tokens, computed from hidden states in chunks."""

from __future__ import annotations

import math
from typing import Any

import torch

from ...losses.logps import response_lengths
from ..base_trainer import DiscoTrainer

PACKED_INPUTS = ("position_ids", "segment_ids")


def sft_loss(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    chunk_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token negative log-likelihood over response tokens, as transformers' causal-LM loss computes it.

    Args:
        model: a `ModelWithHeads` (or its DDP wrapper: the module call is the entry point).
        inputs: `data.sft.SFTCollator` output: input_ids, attention_mask, labels (N, T) long, and with packing
            position_ids, segment_ids (1, L).
        chunk_size: response tokens projected through the LM head at once (0: one full log-softmax).
        num_items_in_batch: the number of scored tokens of the whole (accumulated) batch, as the Trainer counts it;
            the batch's own count when None.

    Returns:
        (loss () fp32, number of scored tokens in this batch ()).
    """
    packed = {k: inputs[k] for k in PACKED_INPUTS if k in inputs}
    out = model(inputs["input_ids"], inputs["attention_mask"], with_heads=False, labels=inputs["labels"],
                logps_chunk_size=chunk_size, **packed)  # fmt: skip
    tokens = response_lengths(inputs["labels"]).sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else tokens.clamp(min=1)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(out.logps.device)
    return -out.logps.sum() / denominator, tokens


class SFTTrainer(DiscoTrainer):
    """Supervised fine-tuning of a `ModelWithHeads` without heads.

    The loss is summed over scored tokens and divided by the Trainer's `num_items_in_batch` (the token count of
    all accumulated micro-batches), so with gradient accumulation it equals the loss of one large batch, as for
    transformers' own causal-LM loss.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The loss takes `num_items_in_batch`, so the Trainer must not divide it by the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True  # count scored tokens as labels[..., 1:], as for a causal LM

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, tokens = sft_loss(model, inputs, self.finetuning_args.logps_chunk_size, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # `num_items_in_batch` counts the tokens of every process and DDP averages gradients over processes, so
            # scale back by their number, as `Trainer.compute_loss` does for transformers' own loss.
            loss = loss * self.accelerator.num_processes
        if model.training:
            self.store_metrics({"num_response_tokens": tokens.float()}, "train")
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, _ = sft_loss(model, inputs, self.finetuning_args.logps_chunk_size)
        return loss.detach(), None, None

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        metrics = super().evaluate(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        if f"{prefix}_loss" in metrics:
            metrics[f"{prefix}_perplexity"] = math.exp(min(metrics[f"{prefix}_loss"], 50.0))
        return metrics
