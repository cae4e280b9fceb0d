"""`KTOTrainer`: KTO (Ethayarajh et al. 2024) on a `ModelWithHeads`, with TRL 1.16's loss and metrics (docs/kto.md).

A batch (`data.kto.KTOCollator`) holds 2B rows: [0, B) each prompt with its own completion, [B, 2B) each prompt with
the previous row's completion. One step: the policy's log-probs of the mismatched rows without gradient (the
reference point z0 = their mean log-ratio, averaged over processes, clamped at 0, detached), the policy's log-probs
of the matched rows with gradient, and one (2B, T) reference forward under `torch.inference_mode` (`torch.no_grad`
with `reference_inference_mode: false`): a frozen reference model, or under LoRA the base with the adapters off.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...losses.kto import kto_loss, kto_metrics, kto_reference_point
from ...models.model_with_heads import ModelWithHeads
from ..base_trainer import DiscoTrainer
from ..distributed import prepare_reference
from ..frozen import ReferenceForward, disable_dropout


class KTOTrainer(ReferenceForward, DiscoTrainer):
    """KTO. `ref_model`: a frozen reference `ModelWithHeads` for full fine-tuning; None under LoRA (the policy with
    its adapters disabled is the reference). `**kwargs` go to `transformers.Trainer` (datasets, `data_collator`, ...).
    """

    def __init__(self, model: nn.Module, run_config, ref_model: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(model, run_config, **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss is a mean over rows; the Trainer scales it for accumulation
        ft = self.finetuning_args
        self.init_reference_forward(ft)
        disable_dropout(self._policy().backbone)  # as TRL does: policy and reference forwards are deterministic
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.requires_grad_(False)
            disable_dropout(ref_model)
            self.ref_model = prepare_reference(self.accelerator, ref_model.eval())
        elif not self.is_lora:
            raise ValueError("KTO with full fine-tuning needs a ref_model")

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:  # keep our columns even with `remove_unused_columns: true`
            self._signature_columns = ["prompt_input_ids", "response_input_ids", "label"]

    def _get_train_sampler(self, train_dataset=None):
        """`group_by_length`: rows of similar prompt + completion length together (the z0 rows are made per batch by
        the collator, so they follow)."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        wanted = self.run_config.data.group_by_length or self.args.train_sampling_strategy == "group_by_length"
        if not (wanted and dataset is not None):
            return super()._get_train_sampler(train_dataset)
        from transformers.trainer_pt_utils import LengthGroupedSampler

        lengths = [len(p) + len(r) for p, r in zip(dataset["prompt_input_ids"], dataset["response_input_ids"])]
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    dataset=dataset, lengths=lengths)  # fmt: skip

    def _logps(self, model, inputs: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        """Summed completion log-probs of `rows` of the batch under `model` (called as a module: DDP sees it)."""
        return model(inputs["input_ids"][rows], inputs["attention_mask"][rows], with_heads=False,
                     labels=inputs["labels"][rows], logps_chunk_size=self.logps_chunk_size).logps  # fmt: skip

    def reference_logps(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B,) fp32 reference log-probs of every row (matched rows first), through the policy's forward without
        heads and under its autocast, so an untrained policy's log-ratios are exactly 0."""
        ref, adapters_off = self.reference_module()
        with self.reference_grad_off(), adapters_off, self.accelerator.autocast():
            out = ModelWithHeads.forward(ref, inputs["input_ids"], inputs["attention_mask"], with_heads=False,
                                         labels=inputs["labels"], logps_chunk_size=self.logps_chunk_size)  # fmt: skip
        return out.logps.clone().float()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ft = self.finetuning_args
        batch = inputs["kto_label"].shape[0]
        matched, mismatched = slice(0, batch), slice(batch, 2 * batch)
        with torch.no_grad():
            kl_logps = self._logps(model, inputs, mismatched)
        ref = self.reference_logps(inputs)
        logps = self._logps(model, inputs, matched)
        # z0: averaged over processes (as TRL does; `gather`, not TRL's `gather_for_metrics`, whose end-of-data
        # truncation counts rows, not these one-per-process values), then clamped at 0; no gradient.
        z0 = self.accelerator.gather(kto_reference_point(kl_logps, ref[mismatched])[None]).mean()
        z0 = z0.clamp(min=0)
        desirable = inputs["kto_label"].bool()
        losses, rewards = kto_loss(logps, ref[matched], desirable, z0, ft.pref_beta, ft.kto_chosen_weight,
                                   ft.kto_rejected_weight)  # fmt: skip
        loss = losses.mean()
        self.store_metrics(kto_metrics(logps, rewards, desirable, z0), "train" if model.training else "eval")
        return (loss, {"losses": losses, "rewards": rewards}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval: the loss (its metrics are stored with the `eval_` prefix, as in training)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
