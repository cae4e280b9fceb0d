"""`PairBatch`: what a preference objective of the DPO family reads for one batch of pairs (docs/extending.md).

The trainer builds it from one forward (policy, reference, heads); the objective (`losses.dpo_objective`) turns it
into a `PairLoss`. Everything that forms the loss lives in the objective, so a new loss term reads a field here and
changes no trainer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class PairBatch:
    """One batch of B preference pairs; every tensor (B,).

    chosen_logps, rejected_logps: summed response log-probs under the policy (with gradient).
    ref_chosen_logps, ref_rejected_logps: the same under the reference (no gradient).
    chosen_lengths, rejected_lengths: response tokens (>= 1), for length-normalised losses and the SFT term.
    chosen_var, rejected_var: the variance head's outputs at the end of each response, or None (no variance head).
        Present when the head exists; the loss reads them only when it is the probit (Disco) member of its family.
    prompt_heads: the prompt-reading heads the loss uses, by name, each (B,) fp32 (the beta head's s(x)).
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    chosen_var: torch.Tensor | None = None
    rejected_var: torch.Tensor | None = None
    prompt_heads: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def beta_scale(self) -> torch.Tensor | None:
        """s(x) of the beta head, when the loss uses it."""
        return self.prompt_heads.get("beta_head")

    @property
    def margins(self) -> torch.Tensor:
        """(B,) fp32 implicit margins `d = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))`, detached."""
        chosen = self.chosen_logps - self.ref_chosen_logps
        rejected = self.rejected_logps - self.ref_rejected_logps
        return (chosen - rejected).detach().float()
