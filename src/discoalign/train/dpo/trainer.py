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

from ...data.collator import PairwiseCollator
from ...data.packing import packed_model_inputs
from ...errors import ConfigError
from ...losses.beta_dpo import beta_dpo_batch, update_margin_statistics
from ...losses.dpo import dpo_loss
from ...losses.logps import response_lengths
from ...losses.variance import log_variance_prior
from ...models.model_with_heads import ModelWithHeads, last_token_hidden
from ...models.pair_attention import prepare_pair_packing
from ..base_trainer import DiscoTrainer
from ..distributed import gathered_parameters, prepare_reference, rank, shard_bounds, world_size, zero_stage
from ..frozen import disable_dropout
from .metric import LABEL_COLUMNS, compute_metrics, step_metrics
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


class DPOTrainer(DiscoTrainer):
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
        self.logps_chunk_size = ft.logps_chunk_size
        # inference_mode skips autograd's version counters and views bookkeeping entirely; no_grad is the fallback.
        self.reference_grad_off = torch.inference_mode if ft.reference_inference_mode else torch.no_grad
        if zero_stage(self.args) == 3:
            # ZeRO-3 gathers weights into new tensors as layers run: made under inference_mode they would be
            # inference tensors, which a later training forward (the shared LoRA layers) cannot save for backward.
            self.reference_grad_off = torch.no_grad
        self.pref_beta = ft.pref_beta
        self.loss_type = ft.pref_loss
        self.label_smoothing = ft.label_smoothing
        self.pref_ftx = ft.pref_ftx
        self.use_disco = ft.disco_pref
        self.use_dynamic_beta = ft.use_dynamic_beta
        self.is_lora = ft.finetuning_type == "lora"
        self.reference_forward_calls = 0
        self.beta_pooling = ft.beta_head_pooling
        self.variance_prior = ft.disco_variance_prior
        # beta-DPO's running margin statistics (`losses.beta_dpo`); None until the first training batch.
        self.beta_dpo = ft.pref_beta_mode == "batch"
        self.margin_mean: torch.Tensor | None = None
        self.margin_std: torch.Tensor | None = None
        disable_dropout(self._policy().backbone)

        self.ref_model = ref_model
        if ref_model is not None:
            if self.pack_pairs:
                prepare_pair_packing(ref_model)  # the reference runs the same packed batches
            ref_model.requires_grad_(False)
            disable_dropout(ref_model)
            # DeepSpeed: an inference engine, sharded like the policy under ZeRO-3 (as TRL prepares it).
            self.ref_model = prepare_reference(self.accelerator, ref_model.eval())
        elif not self.is_lora and not ft.precompute_ref_logps:
            raise ValueError("full fine-tuning without precompute_ref_logps needs a ref_model")

        if ft.precompute_ref_logps:
            if self.train_dataset is not None:
                self.train_dataset = self.precompute_reference(self.train_dataset, "train")
                beta_head = self._policy().beta_head
                if self.needs_beta_features and beta_head is not None and beta_head.centered:
                    # The exact mean over the training set: the beta head is centred from its first step.
                    features = torch.tensor(self.train_dataset[REF_PROMPT_HIDDEN], dtype=torch.float32)
                    beta_head.set_statistics(features.mean(0), features.shape[0])
            if self.eval_dataset is not None:
                self.eval_dataset = self.precompute_reference(self.eval_dataset, "eval")
            # Never loaded or run again: everything training reads from the reference is in the dataset now.
            self.ref_model = None

    # ---- pieces --------------------------------------------------------------------------------------

    def _policy(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

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

    @property
    def needs_beta_features(self) -> bool:
        return self.use_dynamic_beta

    def reference_forward(
        self, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Reference log-probs of the (2B, T) batch and, for dynamic beta, its hidden state at the last prompt token.

        Returns:
            ref_chosen_logps (B,), ref_rejected_logps (B,) fp32, and ref_prompt_hidden (B, H) fp32 or None.
        """
        self.reference_forward_calls += 1
        policy = self._policy()
        if self.ref_model is not None:
            ref, adapters_off = self.accelerator.unwrap_model(self.ref_model), contextlib.nullcontext()
        else:
            # LoRA: the base model is the reference. Full fine-tuning only lands here while precomputing, before
            # the first optimizer step, when the policy still equals the reference.
            ref, adapters_off = policy, policy.disable_adapter()
        batch = inputs["labels"].shape[0] // 2
        # The policy's forward and arguments, without the heads, under the policy's autocast (bf16 / fp16): with
        # fp32 weights the two sides then round alike, and the log-ratio of an untrained policy is exactly 0.
        # Called as a function, not as the module (DeepSpeed / FSDP root hooks belong to the trained model).
        with self.reference_grad_off(), adapters_off, self.accelerator.autocast():
            out = ModelWithHeads.forward(
                ref, inputs["input_ids"], inputs["attention_mask"], with_heads=False, **self.forward_inputs(inputs)
            )
            hidden, prompt_hidden = out.last_hidden_state, None
            if self.needs_beta_features:
                prompt_hidden = prompt_features(
                    hidden, inputs["attention_mask"], inputs["prompt_last_index"][:batch], self.beta_pooling
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
        hidden_size = model.config.get_text_config().hidden_size if self.needs_beta_features else None
        logger.info("Precomputed reference log-probs for %d %s pairs.", len(dataset), name)
        return add_reference_columns(dataset, outputs, hidden_size)

    def reference_outputs(self, inputs: dict[str, torch.Tensor]):
        """Reference log-probs and beta features: from the batch when precomputed, else from a reference forward."""
        if REF_CHOSEN in inputs:
            if self.needs_beta_features and REF_PROMPT_HIDDEN not in inputs:
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

    def pair_forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Everything one step computes: policy and reference log-probs, variances, beta, per-pair losses."""
        policy = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        labels = inputs["labels"]
        batch = labels.shape[0] // 2
        ref_chosen, ref_rejected, ref_prompt_hidden = self.reference_outputs(inputs)
        # Through the module call (not `policy.hidden_states`) so DDP/FSDP wrappers see the forward; the LM head
        # (log-probs) and the beta head run inside it too, since DDP/FSDP only handle parameters used there. With
        # `disco_pref` the forward also reads the variance head at the end of each response.
        disco = self.use_disco
        beta_features = ref_prompt_hidden.to(labels.device) if self.use_dynamic_beta else None
        out = model(
            inputs["input_ids"],
            inputs["attention_mask"],
            with_heads=disco,
            with_variance=disco,
            beta_features=beta_features,
            **self.forward_inputs(inputs),
        )
        hidden = out.last_hidden_state
        logps = out.logps
        lengths = response_lengths(labels).clamp(min=1)
        chosen_logps, rejected_logps = logps[:batch], logps[batch:]

        variances = out.variance if self.use_disco else None
        if policy.variance_head is not None and not self.use_disco:
            with _head_for_logging(policy.variance_head) as head:
                variances = head(last_token_hidden(hidden, inputs["attention_mask"], inputs.get("score_index")))
        var_c, var_r = (variances[:batch], variances[batch:]) if variances is not None else (None, None)

        beta: float | torch.Tensor = self.pref_beta
        if self.use_dynamic_beta:
            beta = self.pref_beta * out.beta_scale
        keep = None
        if self.beta_dpo:
            beta, keep = self.beta_dpo_step(chosen_logps, rejected_logps, ref_chosen, ref_rejected)

        if self.loss_type == "ipo":
            # IPO on length-averaged log-probs, as TRL and LlamaFactory compute it.
            lc, lr = lengths[:batch], lengths[batch:]
            pc, pr, rc, rr = chosen_logps / lc, rejected_logps / lr, ref_chosen / lc, ref_rejected / lr
        else:
            pc, pr, rc, rr = chosen_logps, rejected_logps, ref_chosen, ref_rejected
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            pc,
            pr,
            rc,
            rr,
            beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            chosen_var=var_c if self.use_disco else None,
            rejected_var=var_r if self.use_disco else None,
        )
        if self.use_disco and self.variance_prior:
            # Anchors the variance scale (losses/variance.py, docs/disco_variance.md).
            losses = (
                losses + log_variance_prior(var_c, self.variance_prior) + log_variance_prior(var_r, self.variance_prior)
            )
        if self.pref_ftx > 0:
            # SFT term on chosen responses: mean token negative log-likelihood (LlamaFactory's `pref_ftx`).
            losses = losses + self.pref_ftx * (-chosen_logps / lengths[:batch])
        # beta-DPO's filter drops pairs from the mean; everything else averages over the batch.
        loss = losses.mean() if keep is None else losses[keep].mean()
        # Implicit rewards are logged as the loss computed them: on its scale (length-averaged for ipo, as TRL logs
        # them) and with its beta (beta_eff per pair, beta-DPO's batch beta).
        return {
            "loss": loss,
            "loss_chosen_logps": pc,
            "loss_rejected_logps": pr,
            "loss_ref_chosen_logps": rc,
            "loss_ref_rejected_logps": rr,
            "chosen_logps": chosen_logps,
            "rejected_logps": rejected_logps,
            "ref_chosen_logps": ref_chosen,
            "ref_rejected_logps": ref_rejected,
            "beta": beta,
            "chosen_rewards": chosen_rewards,
            "rejected_rewards": rejected_rewards,
            "chosen_var": var_c,
            "rejected_var": var_r,
        }

    def beta_dpo_step(
        self, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """beta-DPO (`losses.beta_dpo`): the batch's beta (0-dim) and, in training, the mask of kept pairs.

        The running margin statistics move only on training batches; eval uses them as they stand (and keeps
        every pair, so eval metrics cover the whole set).
        """
        margins = ((chosen - ref_chosen) - (rejected - ref_rejected)).detach().float()
        training = self.model.training
        if training:
            self.margin_mean, self.margin_std = update_margin_statistics(margins, self.margin_mean, self.margin_std)
        if self.margin_mean is None:  # eval before any training step: plain DPO
            return torch.tensor(self.pref_beta, device=margins.device), None
        ft = self.finetuning_args
        beta, keep = beta_dpo_batch(
            margins,
            self.margin_mean,
            self.margin_std,
            self.pref_beta,
            ft.beta_dpo_alpha,
            ft.beta_dpo_filter if training else 0.0,
        )
        return beta, keep if training else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = self.pair_forward(model, inputs)
        metrics = step_metrics(
            out["loss_chosen_logps"],
            out["loss_rejected_logps"],
            out["loss_ref_chosen_logps"],
            out["loss_ref_rejected_logps"],
            out["beta"],
            log_beta=self._policy().beta_head is not None or self.beta_dpo,
            chosen_var=out["chosen_var"],
            rejected_var=out["rejected_var"],
            chosen_rewards=out["chosen_rewards"],
            rejected_rewards=out["rejected_rewards"],
        )
        self.store_metrics(metrics, "train" if model.training else "eval")
        return (out["loss"], out) if return_outputs else out["loss"]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval: the loss, and per pair (implicit margin, policy log-prob margin, beta, variances) and ground truth."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, out = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach()
        if prediction_loss_only:
            return loss, None, None
        chosen, rejected = out["chosen_logps"].float(), out["rejected_logps"].float()
        margin = (chosen - out["ref_chosen_logps"]) - (rejected - out["ref_rejected_logps"])
        nan = torch.full_like(chosen, float("nan"))
        beta = out["beta"]
        if self._policy().beta_head is not None or self.beta_dpo:
            beta_col = (
                beta.float().expand_as(chosen) if isinstance(beta, torch.Tensor) else torch.full_like(chosen, beta)
            )
        else:
            beta_col = nan
        var_c = out["chosen_var"].float() if out["chosen_var"] is not None else nan
        var_r = out["rejected_var"].float() if out["rejected_var"] is not None else nan
        preds = torch.stack([margin, chosen - rejected, beta_col, var_c, var_r], dim=1)
        labels = torch.stack([inputs[k].float() if k in inputs else nan for k in LABEL_COLUMNS], dim=1)
        return loss, preds, labels
