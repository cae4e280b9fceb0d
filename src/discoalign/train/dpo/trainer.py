"""`DPOTrainer`: DPO, DiscoDPO and dynamic-beta DPO (docs/design.md §2-§3), one `transformers.Trainer` subclass.

One step is one concatenated (2B, T) forward of the policy (rows [0, B) chosen, [B, 2B) rejected; or B packed
rows with `pack_pairs`) and, unless precomputed, one such forward of the reference under `torch.inference_mode`
(`torch.no_grad` with `reference_inference_mode: false`). Whether a head exists and whether the loss uses it are
separate: an unused head is run only for logging, without gradient and without dropout, so it changes no number
of the run.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ...config.heads import head_spec
from ...data.collator import PairwiseCollator
from ...data.packing import packed_model_inputs
from ...errors import ConfigError
from ...losses.dpo_objective import DPOObjective, DPOSettings, PairLoss
from ...losses.logps import response_lengths
from ...losses.pair import PairBatch
from ...models.model_with_heads import ModelWithHeads, last_token_hidden
from ...models.pair_attention import prepare_pair_packing
from ..base_trainer import DiscoTrainer
from ..distributed import gathered_parameters, prepare_reference, rank, shard_bounds, world_size
from ..frozen import ReferenceForward, disable_dropout
from .metric import LABEL_COLUMNS, compute_metrics
from .reference import (
    REF_CHOSEN,
    REF_PROMPT_HIDDEN,
    REF_REJECTED,
    REFERENCE_COLUMNS,
    ReferenceColumnsCollator,
    add_reference_columns,
    prompt_features,
)

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _head_for_logging(head: nn.Module):
    """Run a head the loss does not use: no gradient, no dropout (so no RNG draw), mode restored after."""
    was_training = head.training
    head.eval()
    try:
        with torch.no_grad():
            yield head
    finally:
        head.train(was_training)


class DPOTrainer(ReferenceForward, DiscoTrainer):
    """The DPO family on a `ModelWithHeads`.

    Args:
        model: the policy (`ModelWithHeads`); its `variance_head` / `beta_head`, when present, train with it.
        run_config: the resolved `RunConfig`.
        ref_model: a frozen reference `ModelWithHeads` for full fine-tuning, or None. None means: the policy with
            adapters disabled (LoRA), or, with `precompute_ref_logps`, the policy itself before its first step.
        **kwargs: passed to `transformers.Trainer` (train_dataset, eval_dataset, data_collator, ...); the data
            collator defaults to a `PairwiseCollator` with the tokenizer's (`processing_class`) pad id.
    """

    def __init__(self, model: nn.Module, run_config, ref_model: nn.Module | None = None, **kwargs: Any) -> None:
        collator = kwargs.get("data_collator")
        if collator is None and kwargs.get("processing_class") is not None:
            collator = PairwiseCollator(kwargs["processing_class"].pad_token_id)
        if collator is not None:
            kwargs["data_collator"] = ReferenceColumnsCollator(collator)
        kwargs.setdefault("compute_metrics", compute_metrics)
        super().__init__(model, run_config, **kwargs)
        # Our loss is a mean over pairs; let the Trainer scale it for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        ft = self.finetuning_args  # every combination was checked by `config.validate` before any model loaded
        self.init_reference_forward(ft)
        # The heads the loss uses that read the reference's prompt features (the beta head with dynamic beta).
        self.prompt_heads = tuple(h for h in self.plan.loss_heads if head_spec(h).reads == "prompt")
        self.objective = DPOObjective(
            DPOSettings(
                pref_beta=ft.pref_beta,
                loss_type=ft.pref_loss,
                label_smoothing=ft.label_smoothing,
                beta_source=self.plan.beta_source,
                uses_variance=self.plan.uses_variance,
                variance_prior=ft.disco_variance_prior,
                length_normalise=self.plan.length_normalise,
                pref_ftx=ft.pref_ftx,
                beta_dpo_alpha=ft.beta_dpo_alpha,
                beta_dpo_filter=ft.beta_dpo_filter,
                logs_beta=self.plan.logs_beta,
                simpo_gamma=ft.simpo_gamma,
                dr_dpo_beta=ft.dr_dpo_beta,
                flip_rate=self.plan.uses_flip_rate,
                flip_prior_mean=ft.flip_prior_mean,
                flip_prior_strength=ft.flip_prior_strength,
                # the kind the model was built with: `auto` continues a checkpoint's head as it was trained
                beta_log_prior=ft.beta_head_prior if getattr(self._policy().beta_head, "kind", None) == "exp" else 0.0,
            )
        )
        disable_dropout(self._policy().backbone)

        self.ref_model = ref_model
        if ref_model is not None:
            if self.pack_pairs:
                prepare_pair_packing(ref_model)  # the reference runs the same packed batches
            ref_model.requires_grad_(False)
            disable_dropout(ref_model)
            # DeepSpeed: an inference engine, sharded like the policy under ZeRO-3 (as TRL prepares it).
            self.ref_model = prepare_reference(self.accelerator, ref_model.eval())
        elif not self.is_lora and not ft.precompute_ref_logps and not self.plan.reference_free:
            raise ValueError("full fine-tuning without precompute_ref_logps needs a ref_model")

        if ft.precompute_ref_logps:
            if self.train_dataset is not None:
                self.train_dataset = self.precompute_reference(self.train_dataset, "train")
                centred = [h for h in self.prompt_heads if getattr(getattr(self._policy(), h), "centered", False)]
                if centred:
                    # The exact mean over the training set: a centred head is centred from its first step.
                    features = torch.tensor(self.train_dataset[REF_PROMPT_HIDDEN], dtype=torch.float32)
                    for name in centred:
                        getattr(self._policy(), name).set_statistics(features.mean(0), features.shape[0])
            if self.eval_dataset is not None:
                self.eval_dataset = self.precompute_reference(self.eval_dataset, "eval")
            # Never loaded or run again: everything training reads from the reference is in the dataset now.
            self.ref_model = None

    # ---- pieces --------------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        # Keep our columns even when a user sets `remove_unused_columns: true`.
        if self._signature_columns is None:
            token_columns = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "margin", "images", "audios"]
            self._signature_columns = [*token_columns, *LABEL_COLUMNS, *REFERENCE_COLUMNS]

    def forward_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The `ModelWithHeads.forward` arguments that the policy and the reference pass alike, so that one code path
        computes both log-probs: the labels (the forward returns their (2B,) summed log-probs, chosen first), the
        chunk size, a multimodal model's media inputs, and with `pack_pairs` the position/segment ids and
        `score_index` (the model builds its mask from them)."""
        return {
            "labels": inputs["labels"],
            "logps_chunk_size": self.logps_chunk_size,
            **self.media_inputs(inputs),
            **packed_model_inputs(inputs),
        }

    def reference_forward(
        self, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Reference log-probs of the (2B, T) batch and, when a head the loss uses reads them, its prompt features.

        Returns:
            ref_chosen_logps (B,), ref_rejected_logps (B,) fp32, and ref_prompt_hidden (B, H) fp32 or None.
        """
        ref, adapters_off = self.reference_module()
        batch = inputs["labels"].shape[0] // 2
        # The policy's forward and arguments, without the heads, under the policy's autocast (bf16 / fp16): with
        # fp32 weights the two sides then round alike, and the log-ratio of an untrained policy is exactly 0.
        # Called as a function, not as the module (DeepSpeed / FSDP root hooks belong to the trained model).
        with self.reference_grad_off(), adapters_off, self.accelerator.autocast():
            out = ModelWithHeads.forward(
                ref, inputs["input_ids"], inputs["attention_mask"], with_heads=False, **self.forward_inputs(inputs)
            )
            hidden, prompt_hidden = out.last_hidden_state, None
            if self.plan.needs_prompt_features:
                prompt_hidden = prompt_features(  # one pooling for every prompt head (`beta_head_pooling`)
                    hidden, inputs["attention_mask"], inputs["prompt_last_index"][:batch], self.plan.heads.beta_pooling
                )
        if prompt_hidden is not None:
            prompt_hidden = prompt_hidden.clone()  # an inference tensor cannot be saved for the beta head's backward
        logps = out.logps.clone()
        return logps[:batch], logps[batch:], prompt_hidden

    def precompute_reference(self, dataset, name: str):
        """Add the reference columns (log-probs, and beta features for dynamic beta) to `dataset`, in one pass.

        On N processes each rank runs a contiguous 1/N of the rows and every rank gets all of them back (in
        dataset order). Under ZeRO-3 the weights are gathered whole for this pass, which runs before the training
        engine (and its per-layer gathering) exists.
        """
        start, end = shard_bounds(len(dataset), world_size(), rank())
        loader = DataLoader(
            dataset.select(range(start, end)),
            batch_size=self.args.per_device_eval_batch_size,
            collate_fn=self.data_collator,
            shuffle=False,
            num_workers=self.args.dataloader_num_workers,
        )
        outputs = []
        model = self._policy()
        was_training = model.training
        model.eval()
        try:
            with gathered_parameters(model):
                for batch in loader:
                    chosen, rejected, hidden = self.reference_forward(self._prepare_inputs(batch))
                    outputs.append((chosen.cpu(), rejected.cpu(), hidden.cpu() if hidden is not None else None))
        finally:
            model.train(was_training)
        hidden_size = model.config.get_text_config().hidden_size if self.plan.needs_prompt_features else None
        logger.info("Precomputed reference log-probs for %d %s pairs.", len(dataset), name)
        return add_reference_columns(dataset, outputs, hidden_size)

    def reference_outputs(self, inputs: dict[str, torch.Tensor]):
        """Reference log-probs and beta features: from the batch when precomputed, else from a reference forward;
        zeros, with no forward, for a reference-free loss (SimPO, ORPO)."""
        if self.plan.reference_free:
            zeros = torch.zeros(inputs["labels"].shape[0] // 2, device=inputs["labels"].device)
            return zeros, zeros, None
        if REF_CHOSEN in inputs:
            if self.plan.needs_prompt_features and REF_PROMPT_HIDDEN not in inputs:
                raise ValueError("precomputed reference columns lack the beta features")
            return inputs[REF_CHOSEN], inputs[REF_REJECTED], inputs.get(REF_PROMPT_HIDDEN)
        if self.ref_model is None and not self.is_lora:
            raise ConfigError(
                "This dataset has no precomputed reference log-probs and, with `precompute_ref_logps: true` and "
                "full fine-tuning, the reference model is no longer kept. Pass the data as `eval_dataset` so it is "
                "precomputed before training, or set `precompute_ref_logps: false`."
            )
        return self.reference_forward(inputs)

    # ---- the loss ------------------------------------------------------------------------------------

    def pair_forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[PairBatch, PairLoss]:
        """One step's forward (policy, reference, heads) as a `PairBatch`, and the objective's `PairLoss` of it."""
        policy = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        labels = inputs["labels"]
        batch = labels.shape[0] // 2
        ref_chosen, ref_rejected, ref_prompt_hidden = self.reference_outputs(inputs)
        # Through the module call (not `policy.hidden_states`) so DDP/FSDP wrappers see the forward; the LM head
        # (log-probs) and the prompt heads run inside it too, since DDP/FSDP only handle parameters used there. When
        # the loss uses the variance head, the forward also reads it at the end of each response.
        uses_variance = self.plan.uses_variance
        prompt_heads = self.prompt_heads
        out = model(
            inputs["input_ids"],
            inputs["attention_mask"],
            with_heads=uses_variance,
            with_variance=uses_variance,
            prompt_features=ref_prompt_hidden.to(labels.device) if prompt_heads else None,
            prompt_heads=prompt_heads,
            **self.forward_inputs(inputs),
        )
        variances = out.variance
        if policy.variance_head is not None and not uses_variance:
            # A head the loss does not use is read for logging only: no gradient, no dropout (no RNG draw).
            with _head_for_logging(policy.variance_head) as head:
                variances = head(last_token_hidden(out.last_hidden_state, inputs["attention_mask"],
                                                  inputs.get("score_index")))  # fmt: skip
        lengths = response_lengths(labels).clamp(min=1)
        pairs = PairBatch(
            out.logps[:batch], out.logps[batch:], ref_chosen, ref_rejected, lengths[:batch], lengths[batch:],
            variances[:batch] if variances is not None else None, variances[batch:] if variances is not None else None,
            out.prompt_heads,
        )  # fmt: skip
        return pairs, self.objective(pairs, training=self.model.training)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pairs, result = self.pair_forward(model, inputs)
        self.store_metrics(result.metrics, "train" if model.training else "eval")
        return (result.loss, (pairs, result)) if return_outputs else result.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval: the loss, and per pair (implicit margin, policy log-prob margin, beta, variances, flip rate) and ground
        truth."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, (pairs, result) = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach()
        if prediction_loss_only:
            return loss, None, None
        # A reference-free loss's implicit reward is the length-averaged log-prob (its scale); DPO's the summed one.
        pairs = result.scaled if self.plan.reference_free else pairs
        chosen, rejected = pairs.chosen_logps.float(), pairs.rejected_logps.float()
        margin = (chosen - pairs.ref_chosen_logps) - (rejected - pairs.ref_rejected_logps)
        nan = torch.full_like(chosen, float("nan"))
        beta = result.beta
        if self.plan.logs_beta:
            beta_col = (
                beta.float().expand_as(chosen) if isinstance(beta, torch.Tensor) else torch.full_like(chosen, beta)
            )
        else:
            beta_col = nan
        var_c = pairs.chosen_var.float() if pairs.chosen_var is not None else nan
        var_r = pairs.rejected_var.float() if pairs.rejected_var is not None else nan
        flip = pairs.prompt_heads.get("flip_head")
        flip = flip.detach().float() if flip is not None else nan
        preds = torch.stack([margin, chosen - rejected, beta_col, var_c, var_r, flip], dim=1)
        labels = torch.stack([inputs[k].float() if k in inputs else nan for k in LABEL_COLUMNS], dim=1)
        return loss, preds, labels
