"""`RewardTrainer`: pairwise reward modelling with a BT (sigmoid) or Disco (probit) loss."""

from __future__ import annotations

from typing import Any

import torch

from ...data.formats import GROUND_TRUTH_COLUMNS
from ...data.packing import packed_model_inputs
from ...losses.reward_objective import RewardObjective, RewardPairs, RewardSettings
from ...models.epistemic import ESTIMATORS, FitData
from ...models.epistemic.base import PairPass
from ..base_trainer import DiscoTrainer

# Columns of the (B, 4) prediction and (B, 3) label arrays handed to `compute_metrics`; NaN where a value does
# not exist.
PREDICTION_COLUMNS = ("mean_chosen", "mean_rejected", "var_chosen", "var_rejected")
LABEL_COLUMNS = GROUND_TRUTH_COLUMNS


class RewardTrainer(DiscoTrainer):
    """Chosen and rejected go through the model in one (2B, T) forward; rows [0, B) are chosen. The loss is
    `losses.reward_objective.RewardObjective` (BT or Disco, margin, centering)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Our loss is a per-pair mean, so let the Trainer scale it for gradient accumulation itself.
        self.model_accepts_loss_kwargs = False
        self.prompt_heads = ("flip_head",) if self.plan.uses_flip_rate else ()
        self.return_features = False  # `prediction_step` appends the pooled features (the epistemic fit's pass)
        ft = self.finetuning_args
        self.objective = RewardObjective(
            RewardSettings(
                uses_variance=self.plan.uses_variance,
                variance_prior=ft.disco_variance_prior,
                center_coefficient=ft.center_rewards_coefficient,
                flip_rate=self.plan.uses_flip_rate,
                flip_prior_mean=ft.flip_prior_mean,
                flip_prior_strength=ft.flip_prior_strength,
            )
        )

    def train(self, *args: Any, **kwargs: Any):
        """`transformers.Trainer.train`, then (with `epistemic: <kind>`) fit the epistemic estimator on the training
        data, so that the final save holds it."""
        result = super().train(*args, **kwargs)
        if self.plan.epistemic != "none":
            self.fit_epistemic()
        return result

    def fit_epistemic(self) -> None:
        """Fit the plan's epistemic estimator (`models.epistemic`) on the training pairs and attach it to the model."""
        model = self._unwrapped()
        data = self.train_dataset
        estimator = ESTIMATORS[self.plan.epistemic].fitted(
            FitData(
                vocab_size=model.config.get_text_config().vocab_size,
                hidden_size=model.config.get_text_config().hidden_size,
                responses=lambda: (row for col in ("chosen_input_ids", "rejected_input_ids") for row in data[col]),
                pairs=self.training_pair_pass,
                value_head=model.value_head.summary.weight.detach().flatten().cpu(),
                link="probit" if self.plan.uses_variance else "logistic",
            )
        )
        model.epistemic = estimator
        model.heads_config["epistemic"] = estimator.config()

    def training_pair_pass(self, max_pairs: int | None, with_features: bool) -> PairPass:
        """The trained model over the first `max_pairs` (None: all) training pairs, through `Trainer.predict`:
        means (N, 2) chosen first, and the pooled features (N, 2, H) when asked for."""
        data = self.train_dataset
        subset = data.select(range(len(data) if max_pairs is None else min(max_pairs, len(data))))
        self.return_features = with_features
        try:
            predictions = self.predict(subset, metric_key_prefix="epistemic_fit").predictions
        finally:
            self.return_features = False
        means = torch.as_tensor(predictions[:, :2], dtype=torch.float64)
        variances = torch.as_tensor(predictions[:, 2:4], dtype=torch.float64)
        variances = None if torch.isnan(variances).any() else variances
        features = None
        if with_features:
            hidden = (predictions.shape[1] - len(PREDICTION_COLUMNS)) // 2
            features = torch.as_tensor(predictions[:, len(PREDICTION_COLUMNS) :], dtype=torch.float32)
            features = features.reshape(-1, 2, hidden)
        return PairPass(means, features, variances)

    def pair_scores(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], with_variance: bool, with_features: bool = False
    ) -> tuple[RewardPairs, torch.Tensor | None]:
        """The batch's scored pairs (variances only when asked for) and, when asked for, the pooled features (2B, H)."""
        # Call the module, not `.score`: under DDP `model` is the wrapper, whose forward is the only entry.
        # A packed batch (`pack_pairs`) adds position/segment ids and where each sequence ends.
        packed = packed_model_inputs(inputs)
        media = self.media_inputs(inputs)  # images / audio of a multimodal model; {} for text
        own_prompt = None
        if self.plan.uses_flip_rate:  # the flip-rate head reads this forward's own prompt features, detached
            own_prompt = (
                inputs["prompt_last_index"][: inputs["input_ids"].shape[0] // 2],
                self.plan.heads.beta_pooling,
            )
        out = model(inputs["input_ids"], inputs["attention_mask"], with_variance=with_variance,
                    with_features=with_features, own_prompt=own_prompt, prompt_heads=self.prompt_heads, **packed,
                    **media)  # fmt: skip
        mean, var = out.mean, out.variance
        half = mean.shape[0] // 2
        margin = inputs.get("margin")
        flips = {"flip_rate": out.prompt_heads.get("flip_head"), "flip_scale": out.prompt_heads.get("flip_head/scale")}
        if var is None:
            return RewardPairs(mean[:half], mean[half:], margin=margin, **flips), out.features
        return RewardPairs(mean[:half], mean[half:], var[:half], var[half:], margin, **flips), out.features

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pairs, _ = self.pair_scores(model, inputs, with_variance=self.plan.uses_variance)
        result = self.objective(pairs, training=model.training)
        if model.training:
            self.store_metrics(result.metrics, "train")
        if return_outputs:
            return result.loss, {"mean_chosen": pairs.chosen_mean, "mean_rejected": pairs.rejected_mean,
                                 "var_chosen": pairs.chosen_var, "var_rejected": pairs.rejected_var}  # fmt: skip
        return result.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            # Eval reports variances whenever the head exists; the loss still follows the plan (`disco_pref`).
            has_var = self.plan.heads.has("variance_head")
            pairs, features = self.pair_scores(model, inputs, with_variance=has_var, with_features=self.return_features)
            loss = self.objective(pairs).loss.detach()
        if prediction_loss_only:
            return loss, None, None
        mu_c, mu_r, var_c, var_r = pairs.chosen_mean, pairs.rejected_mean, pairs.chosen_var, pairs.rejected_var
        nan = torch.full_like(mu_c, float("nan"))
        columns = [mu_c, mu_r, var_c if var_c is not None else nan, var_r if var_r is not None else nan]
        preds = torch.stack(columns, 1)
        if features is not None:  # the epistemic fit's pass: chosen and rejected features side by side
            half = mu_c.shape[0]
            preds = torch.cat([preds, features[:half].float(), features[half:].float()], dim=1)
        labels = torch.stack([inputs[k].float() if k in inputs else nan for k in LABEL_COLUMNS], 1)
        return loss, preds, labels
