"""`RewardTrainer`: pairwise reward modelling with a BT (sigmoid) or Disco (probit) loss."""

from __future__ import annotations

from typing import Any

import torch

from ...data.formats import GROUND_TRUTH_COLUMNS
from ...data.packing import packed_model_inputs
from ...losses.reward import bt_reward_loss, center_rewards_penalty, disco_reward_loss
from ...losses.variance import log_variance_prior
from ...models.epistemic import TokenNovelty
from ..base_trainer import DiscoTrainer

# Columns of the (B, 4) prediction and (B, 3) label arrays handed to `compute_metrics`; NaN where a value does
# not exist.
PREDICTION_COLUMNS = ("mean_chosen", "mean_rejected", "var_chosen", "var_rejected")
LABEL_COLUMNS = GROUND_TRUTH_COLUMNS


class RewardTrainer(DiscoTrainer):
    """Chosen and rejected go through the model in one (2B, T) forward; rows [0, B) are chosen."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Our loss is a per-pair mean, so let the Trainer scale it for gradient accumulation itself.
        self.model_accepts_loss_kwargs = False

    def train(self, *args: Any, **kwargs: Any):
        """`transformers.Trainer.train`, then (with `epistemic: token_novelty`) fit the epistemic term on the
        training responses, so that the final save holds it."""
        result = super().train(*args, **kwargs)
        if self.finetuning_args.epistemic != "none":
            self.fit_epistemic()
        return result

    def fit_epistemic(self, max_pairs: int = 512) -> None:
        """Count the tokens and adjacent pairs of every training response (`models.epistemic.TokenNovelty`) and set
        its prior variance to the variance of the trained mean reward over (up to `max_pairs`) training pairs."""

        model = self._unwrapped()
        data = self.train_dataset
        term = TokenNovelty(model.config.get_text_config().vocab_size)
        term.fit(row for col in ("chosen_input_ids", "rejected_input_ids") for row in data[col])
        subset = data.select(range(min(max_pairs, len(data))))
        predictions = self.predict(subset, metric_key_prefix="epistemic_fit").predictions
        means = torch.as_tensor(predictions[:, :2], dtype=torch.float64).flatten()
        term.prior_variance = float(means.var()) if means.numel() > 1 else 1.0
        model.epistemic = term
        model.heads_config["epistemic"] = term.config()

    @property
    def use_disco(self) -> bool:
        return self.finetuning_args.disco_pref

    def pair_scores(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], with_variance: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Return (mu_c, mu_r, var_c, var_r), each (B,) fp32; variances None unless asked for."""
        # Call the module, not `.score`: under DDP `model` is the wrapper, whose forward is the only entry.
        # A packed batch (`pack_pairs`) adds position/segment ids and where each sequence ends.
        packed = packed_model_inputs(inputs)
        media = self.media_inputs(inputs)  # images / audio of a multimodal model; {} for text
        out = model(inputs["input_ids"], inputs["attention_mask"], with_variance=with_variance, **packed, **media)
        mean, var = out.mean, out.variance
        half = mean.shape[0] // 2
        if var is None:
            return mean[:half], mean[half:], None, None
        return mean[:half], mean[half:], var[:half], var[half:]

    def pair_loss(
        self,
        mu_c: torch.Tensor,
        mu_r: torch.Tensor,
        var_c: torch.Tensor | None,
        var_r: torch.Tensor | None,
        margin: torch.Tensor | None,
    ) -> torch.Tensor:
        """The batch loss of docs/design.md §3 (mean over pairs, plus centering when configured)."""
        if self.use_disco:
            losses = disco_reward_loss(mu_c, mu_r, var_c, var_r, margin)
            prior = self.finetuning_args.disco_variance_prior
            if prior:
                # Anchors the variance scale (losses/variance.py); the same prior as DiscoDPO's.
                losses = losses + log_variance_prior(var_c, prior) + log_variance_prior(var_r, prior)
            loss = losses.mean()
        else:
            loss = bt_reward_loss(mu_c, mu_r, margin).mean()
        if self.finetuning_args.center_rewards_coefficient:
            loss = loss + self.finetuning_args.center_rewards_coefficient * center_rewards_penalty(mu_c, mu_r)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mu_c, mu_r, var_c, var_r = self.pair_scores(model, inputs, with_variance=self.use_disco)
        loss = self.pair_loss(mu_c, mu_r, var_c, var_r, inputs.get("margin"))
        if model.training:
            metrics = {
                # ties dropped, as in eval (`metric.pair_accuracy`); NaN if every pair is a tie
                "accuracy": (mu_c > mu_r)[mu_c != mu_r].float().mean(),
                "margin": (mu_c - mu_r).mean(),
                "mean_reward": torch.cat([mu_c, mu_r]).mean(),
            }
            if var_c is not None:
                metrics["variance_chosen"] = var_c.mean()
                metrics["variance_rejected"] = var_r.mean()
            self.store_metrics(metrics, "train")
        if return_outputs:
            return loss, {"mean_chosen": mu_c, "mean_rejected": mu_r, "var_chosen": var_c, "var_rejected": var_r}
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            # Eval reports variances whenever the head exists; the loss still follows `disco_pref`.
            has_var = getattr(self.accelerator.unwrap_model(model), "variance_head", None) is not None
            mu_c, mu_r, var_c, var_r = self.pair_scores(model, inputs, with_variance=has_var)
            loss = self.pair_loss(mu_c, mu_r, var_c, var_r, inputs.get("margin")).detach()
        if prediction_loss_only:
            return loss, None, None
        nan = torch.full_like(mu_c, float("nan"))
        preds = torch.stack([mu_c, mu_r, var_c if var_c is not None else nan, var_r if var_r is not None else nan], 1)
        labels = torch.stack([inputs[k].float() if k in inputs else nan for k in LABEL_COLUMNS], 1)
        return loss, preds, labels
