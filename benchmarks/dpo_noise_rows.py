"""The rows of benchmarks/dpo_noise.py: each method's fixed keys, its tuning grid (the same budget for every tuned
method), and the reference rows that need the true flip rates (oracles), which the benchmark adds by wrapping the
trainer's objective instead of adding them to the library.
"""

from __future__ import annotations

import dataclasses
from typing import Any

DYNAMIC = {"add_beta_head": True, "use_dynamic_beta": True}
FLIP = {"add_flip_head": True, "use_flip_rate": True}
DISCO = {"add_disco_head": True, "disco_pref": True}
GRID_SIZE = 2  # the tuning budget on the development split: every tuned row gets this many settings
# The report split's jobs in priority order (profiles, rows): the decisive rows on the imbalanced profile, the
# no-harm profiles, the reference rows and combinations, then the two profiles that test what the heads read
# (margin-dependent and unannounced noise); `--plan` then runs every (row, profile) pair the plan does not name.
REPORT_PLAN: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("imbalanced",), ("dpo", "dynamic_exp", "cdpo", "flip", "dynamic", "robust", "beta_dpo")),
    (("mostly_clean", "uniform"), ("dpo", "dynamic_exp")),
    (("imbalanced",), ("oracle_flip", "flip_dynamic", "dr_dpo", "oracle_weighted")),
    (("mostly_clean", "uniform"), ("flip", "dynamic", "flip_dynamic")),
    (("hidden", "margin"), ("dpo", "dynamic_exp", "flip", "oracle_flip")),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Row:
    """label: the table's name; keys: fixed config keys; grid: the settings tried on the development split (one
    setting: nothing to tune); kind: `baseline`, `ours` or `reference` (oracles and Dr. DPO: reported, never tuned);
    wrap: the objective wrapper of a reference row."""

    label: str
    keys: dict[str, Any]
    grid: tuple[dict[str, Any], ...] = ({},)
    kind: str = "baseline"
    wrap: str | None = None
    combines: tuple[str, ...] = ()  # a combination of rows: their keys, each at the setting chosen for it on dev


ROWS: dict[str, Row] = {
    "dpo": Row("DPO", {}),
    "cdpo": Row("cDPO", {}, ({"label_smoothing": 0.1}, {"label_smoothing": 0.2})),
    "robust": Row("robust DPO", {"pref_loss": "robust"}, ({"label_smoothing": 0.05}, {"label_smoothing": 0.1})),
    "beta_dpo": Row("beta-DPO", {"pref_beta_mode": "batch"}, ({"beta_dpo_alpha": 0.6}, {"beta_dpo_alpha": 0.2})),
    # the tanh head at its defaults (`beta_head_epsilon` etc.), tuned on dev seeds 0-2 of `imbalanced` before issue 21
    "dynamic": Row("dynamic beta (tanh)", {**DYNAMIC, "beta_head_kind": "tanh"}, kind="ours"),
    "dynamic_exp": Row(
        "dynamic beta (exp)",
        {**DYNAMIC, "beta_head_kind": "exp"},
        ({"beta_head_prior": 0.03}, {"beta_head_prior": 0.1}),
        "ours",
    ),  # fmt: skip
    "flip": Row("flip-rate head", FLIP, ({"flip_prior_mean": 0.1}, {"flip_prior_mean": 0.25}), "ours"),
    # with the beta head that won on dev (exp over tanh), each part at its dev-chosen setting
    "flip_dynamic": Row(
        "flip-rate head + dynamic beta (exp)",
        {**FLIP, **DYNAMIC, "beta_head_kind": "exp"},
        kind="ours",
        combines=("flip", "dynamic_exp"),
    ),
    "disco": Row("DiscoDPO", DISCO, ({}, {"disco_variance_prior": 0.1}), "ours"),
    # Dr. DPO (Wu et al. 2025), `pref_loss: dr_dpo`: beta' 1.0 is the paper's default, 0.25 weights pairs more
    # unequally (DPO's per-pair losses here lie within about 0.4-1.0, so beta' 1 changes weights by at most ~2x)
    "dr_dpo": Row("Dr. DPO", {"pref_loss": "dr_dpo"}, ({"dr_dpo_beta": 1.0}, {"dr_dpo_beta": 0.25})),
    "oracle_weighted": Row("oracle-weighted DPO", {}, kind="reference", wrap="oracle_weighted"),
    "oracle_flip": Row("oracle flip rate", FLIP, kind="reference", wrap="oracle_flip"),
}


class WrappedObjective:
    """A reference row's objective: the trainer's, with the batch's true flip rates `rho` (set by `wrap_trainer` from
    the `noise` column before each step).

    * `oracle_flip`: the forward-corrected likelihood with e(x) = rho (the flip head's output replaced);
    * `oracle_weighted`: DPO's per-pair loss times (1 - 2 rho), the weights that make the expected gradient of a
      flipped pair's loss that of a clean one at d = 0.
    """

    def __init__(self, inner, mode: str) -> None:
        self.inner, self.mode, self.rho = inner, mode, None
        self.settings = inner.settings

    def __call__(self, batch, training: bool):
        rho = self.rho.to(batch.chosen_logps.device)
        if self.mode == "oracle_flip":
            batch = dataclasses.replace(batch, prompt_heads={**batch.prompt_heads, "flip_head": rho})
        out = self.inner(batch, training)
        if self.mode == "oracle_weighted":
            out.losses = out.losses * (1.0 - 2.0 * rho)
            out.loss = out.losses.mean()
        return out


def wrap_trainer(trainer, mode: str | None) -> None:
    """Install a reference row's objective on `trainer` (nothing for other rows)."""
    if mode is None:
        return
    wrapped = WrappedObjective(trainer.objective, mode)
    forward = trainer.pair_forward

    def pair_forward(model, inputs):
        wrapped.rho = inputs["noise"].float()
        return forward(model, inputs)

    trainer.objective = wrapped
    trainer.pair_forward = pair_forward
