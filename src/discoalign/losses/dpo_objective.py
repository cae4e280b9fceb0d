"""`DPOObjective`: the DPO family's loss for one `PairBatch`, every term of it in one place (docs/design.md §3).

    beta   = pref_beta                      (beta_source static)
           | pref_beta * s(x)               (head: the beta head, Rafailov et al. 2023 with a per-context beta)
           | beta-DPO's batch beta          (batch: Wu et al. 2024, `losses.beta_dpo`, with its margin filter)
    logps  = summed, or length-averaged     (length_normalise: IPO, as TRL and LlamaFactory compute it)
    loss_i = dpo_loss(logps, beta)          (`losses.dpo`: sigmoid / robust / ipo / hinge / dr_dpo, or DiscoDPO's probit)
           + lambda/2 [(log var_w)^2 + (log var_l)^2]   (DiscoDPO: the variance prior, `losses.variance`)
           + pref_ftx * (-log pi(y_w) / |y_w|)           (the SFT term on chosen responses, LlamaFactory's `pref_ftx`)
    loss   = mean_i loss_i                  (over the pairs beta-DPO's filter keeps)
             | -beta' log mean_i exp(-loss_i / beta')   (`pref_loss: dr_dpo`, Dr. DPO, beta' = `dr_dpo_beta`)
           + lambda/2 (log s(x))^2       (`beta_head_kind: exp`: the beta head's Gaussian prior)
    with `flip_rate` (the flip-rate head's e(x), `losses.flip`), the sigmoid term is the forward-corrected
    -log((1 - e) sigmoid(beta d) + e sigmoid(-beta d)), and the head's calibration and Beta prior are added.

SimPO / ORPO (`losses.reference_free`) take `reference_free`: length-averaged logps, no reference, a static beta.

Shapes: every per-pair tensor (B,); beta a float, a (B,) tensor (head) or a 0-dim tensor (batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .beta_dpo import beta_dpo_batch, update_margin_statistics
from .dpo import dpo_loss, dr_dpo_batch_loss
from .dpo_metrics import step_metrics
from .flip import MarginScale, flip_corrected_losses
from .pair import PairBatch
from .reference_free import REFERENCE_FREE_LOSS_TYPES, orpo_loss, simpo_loss
from .variance import log_variance_prior


@dataclass(frozen=True)
class DPOSettings:
    """What the objective needs to know of the run (built from the run plan by the trainer)."""

    pref_beta: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    beta_source: Literal["static", "head", "batch"] = "static"
    uses_variance: bool = False
    variance_prior: float = 0.0
    length_normalise: bool = False
    pref_ftx: float = 0.0
    beta_dpo_alpha: float = 0.0
    beta_dpo_filter: float = 0.0
    logs_beta: bool = False
    simpo_gamma: float = 0.0  # SimPO's target margin (the trainer passes `simpo_gamma`)
    flip_rate: bool = False
    flip_prior_mean: float = 0.0
    flip_prior_strength: float = 0.0
    beta_log_prior: float = 0.0
    dr_dpo_beta: float = 0.0  # Dr. DPO's beta' (the trainer passes `dr_dpo_beta`; read with `pref_loss: dr_dpo` only)


@dataclass
class PairLoss:
    """The objective's result for one batch.

    loss: 0-dim, the mean of `losses` over the kept pairs (all of them but under beta-DPO's filter in training).
    losses: (B,) fp32 per-pair losses.
    scaled: the batch's log-probs on the loss's scale (length-averaged for IPO); implicit rewards are computed there.
    beta: the beta the loss used.
    chosen_rewards, rejected_rewards: (B,) fp32 implicit rewards `beta (log pi - log pi_ref)` on that scale, detached.
    keep: (B,) bool of the pairs in the mean, or None (all).
    metrics: what to log this step (TRL's names; `losses.dpo_metrics`).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    scaled: PairBatch
    beta: float | torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    keep: torch.Tensor | None
    metrics: dict[str, torch.Tensor]


class DPOObjective:
    """The loss of the module docstring. Holds beta-DPO's running margin statistics (the one piece of state)."""

    def __init__(self, settings: DPOSettings) -> None:
        self.settings = settings
        # beta-DPO's running margin statistics (`losses.beta_dpo`); None until the first training batch.
        self.margin_mean: torch.Tensor | None = None
        self.margin_std: torch.Tensor | None = None
        self.flip_margin_scale = MarginScale()  # the flip-rate head's running RMS of beta d (`losses.flip`)

    def beta(self, batch: PairBatch, training: bool) -> tuple[float | torch.Tensor, torch.Tensor | None]:
        """The batch's beta and, for beta-DPO in training, the mask of the pairs its filter keeps."""
        s = self.settings
        if s.beta_source == "head":
            return s.pref_beta * batch.beta_scale, None
        if s.beta_source == "batch":
            return self.beta_dpo_step(batch.margins, training)
        return s.pref_beta, None

    def beta_dpo_step(self, margins: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """beta-DPO: the batch's beta (0-dim) and, in training, the mask of kept pairs.

        The running margin statistics move only on training batches; eval uses them as they stand (and keeps every
        pair, so eval metrics cover the whole set).
        """
        s = self.settings
        if training:
            self.margin_mean, self.margin_std = update_margin_statistics(margins, self.margin_mean, self.margin_std)
        if self.margin_mean is None:  # eval before any training step: plain DPO
            return torch.tensor(s.pref_beta, device=margins.device), None
        beta, keep = beta_dpo_batch(
            margins, self.margin_mean, self.margin_std, s.pref_beta, s.beta_dpo_alpha,
            s.beta_dpo_filter if training else 0.0,
        )  # fmt: skip
        return beta, keep if training else None

    def scaled(self, batch: PairBatch) -> PairBatch:
        """The log-probs the loss reads: length-averaged for IPO (as TRL and LlamaFactory compute it), else summed."""
        if not self.settings.length_normalise:
            return batch
        lc, lr = batch.chosen_lengths, batch.rejected_lengths
        return PairBatch(
            batch.chosen_logps / lc, batch.rejected_logps / lr, batch.ref_chosen_logps / lc,
            batch.ref_rejected_logps / lr, lc, lr, batch.chosen_var, batch.rejected_var, batch.prompt_heads,
        )  # fmt: skip

    def reference_free(self, batch: PairBatch) -> PairLoss:
        """SimPO / ORPO (`losses.reference_free`): length-averaged policy log-probs, the reference's are 0, a static
        beta (config.validate refuses the beta head, beta-DPO and DiscoDPO with them)."""
        s = self.settings
        scaled = self.scaled(batch)
        chosen, rejected = scaled.chosen_logps, scaled.rejected_logps
        extra: dict[str, torch.Tensor] = {}
        if s.loss_type == "simpo":
            losses = simpo_loss(chosen, rejected, s.pref_beta, s.simpo_gamma, s.label_smoothing)
        else:
            losses, extra = orpo_loss(chosen, rejected, s.pref_beta)
        if s.pref_ftx > 0:
            losses = losses + s.pref_ftx * (-chosen.float())  # LlamaFactory's `pref_ftx`, as in `__call__`
        metrics = step_metrics(
            chosen, rejected, scaled.ref_chosen_logps, scaled.ref_rejected_logps, s.pref_beta, log_beta=False,
            chosen_var=batch.chosen_var, rejected_var=batch.rejected_var,
        )  # fmt: skip
        metrics.update(extra)
        chosen_rewards = s.pref_beta * chosen.detach().float()
        rejected_rewards = s.pref_beta * rejected.detach().float()
        return PairLoss(losses.mean(), losses, scaled, s.pref_beta, chosen_rewards, rejected_rewards, None, metrics)

    def __call__(self, batch: PairBatch, training: bool) -> PairLoss:
        s = self.settings
        if s.loss_type in REFERENCE_FREE_LOSS_TYPES:
            return self.reference_free(batch)
        beta, keep = self.beta(batch, training)
        scaled = self.scaled(batch)
        use_var = s.uses_variance
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            scaled.chosen_logps,
            scaled.rejected_logps,
            scaled.ref_chosen_logps,
            scaled.ref_rejected_logps,
            beta,
            loss_type=s.loss_type,
            label_smoothing=s.label_smoothing,
            chosen_var=batch.chosen_var if use_var else None,
            rejected_var=batch.rejected_var if use_var else None,
        )
        if s.flip_rate:
            losses = self.flip_term(scaled, beta, batch.prompt_heads, training)
        if s.beta_log_prior and s.beta_source == "head":
            # `beta_head_kind: exp`: a Gaussian prior on u = log s(x) (docs/dynamic_beta.md §6), interior optimum.
            losses = losses + 0.5 * s.beta_log_prior * torch.log(batch.beta_scale.float()) ** 2
        if use_var and s.variance_prior:
            # Anchors the variance scale (losses/variance.py, docs/disco_variance.md).
            losses = (
                losses
                + log_variance_prior(batch.chosen_var, s.variance_prior)
                + log_variance_prior(batch.rejected_var, s.variance_prior)
            )
        if s.pref_ftx > 0:
            # SFT term on chosen responses: mean token negative log-likelihood (LlamaFactory's `pref_ftx`).
            losses = losses + s.pref_ftx * (-batch.chosen_logps / batch.chosen_lengths)
        kept = losses if keep is None else losses[keep]
        loss = dr_dpo_batch_loss(kept, s.dr_dpo_beta) if s.loss_type == "dr_dpo" else kept.mean()
        # Implicit rewards are logged as the loss computed them: on its scale (length-averaged for ipo, as TRL logs
        # them) and with its beta (beta_eff per pair, beta-DPO's batch beta).
        metrics = step_metrics(
            scaled.chosen_logps, scaled.rejected_logps, scaled.ref_chosen_logps, scaled.ref_rejected_logps, beta,
            log_beta=s.logs_beta, chosen_var=batch.chosen_var, rejected_var=batch.rejected_var,
            chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
        )  # fmt: skip
        if s.flip_rate:
            metrics["flip_rate/mean"] = batch.prompt_heads["flip_head"].detach().float().mean()
            metrics["flip_rate/scale"] = batch.prompt_heads["flip_head/scale"].detach().float().mean()
        return PairLoss(loss, losses, scaled, beta, chosen_rewards, rejected_rewards, keep, metrics)

    def flip_term(self, scaled: PairBatch, beta: float | torch.Tensor, heads, training: bool) -> torch.Tensor:
        """The forward-corrected likelihood of `losses.flip` at z = beta d (the sigmoid loss without smoothing)."""
        s = self.settings
        d = (scaled.chosen_logps.float() - scaled.ref_chosen_logps.float()) - (
            scaled.rejected_logps.float() - scaled.ref_rejected_logps.float()
        )
        z = (beta.float() if isinstance(beta, torch.Tensor) else beta) * d
        slope = heads["flip_head/scale"] / self.flip_margin_scale(z, training)
        return flip_corrected_losses(z, heads["flip_head"], slope, s.flip_prior_mean, s.flip_prior_strength)
