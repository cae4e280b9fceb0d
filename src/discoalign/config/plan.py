"""The run plan: every decision the config implies, made once after validation (docs/extending.md).

Trainers, loaders, scorers and the exporter read `RunPlan` / `HeadPlan` instead of re-reading flags: which heads
exist and which the loss uses, where beta comes from, whether the loss reads variances or length-averaged log-probs,
the heads' learning-rate ratios and the beta head's kind. Defaults come from the schema's fields, nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConfigError
from ..losses.reference_free import REFERENCE_FREE_LOSS_TYPES
from .heads import HEAD_SPECS, HeadArguments, beta_epsilon_error, resolved_beta_kind

VALUE_HEAD_STAGES = ("rm", "ppo")  # stages whose trained model has a value head (reward model, PPO's critic)
# DiscoDPO's variance barely moves at the backbone's rate (docs/noisy_labels.md); elsewhere it trains with it.
VARIANCE_HEAD_LR_RATIO_BY_STAGE = {"dpo": 10.0}


def schema_default(cls: type, name: str) -> Any:
    """The default of field `name` of the schema dataclass `cls`: the one place a default is written."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


@dataclass(frozen=True)
class HeadPlan:
    """Which heads a model has and how they are built.

    names: head names in registry order (`config.heads.HEAD_SPECS`).
    beta_centered: True for DPO's beta head (it redistributes `pref_beta`), False for PPO's KL controller, whose level
        a target KL fixes (docs/dynamic_beta.md).
    """

    names: tuple[str, ...] = ()
    dropout: float = field(default_factory=lambda: schema_default(HeadArguments, "head_dropout"))
    init_std: float | None = field(default_factory=lambda: schema_default(HeadArguments, "head_init_std"))
    beta_epsilon: float = field(default_factory=lambda: schema_default(HeadArguments, "beta_head_epsilon"))
    beta_centered: bool = True
    beta_pooling: str = field(default_factory=lambda: schema_default(HeadArguments, "beta_head_pooling"))
    flip_prior_mean: float = field(default_factory=lambda: schema_default(HeadArguments, "flip_prior_mean"))
    beta_kind: str = field(
        default_factory=lambda: resolved_beta_kind(schema_default(HeadArguments, "beta_head_kind"), None)
    )

    def __post_init__(self) -> None:
        order = [spec.name for spec in HEAD_SPECS]
        unknown = [n for n in self.names if n not in order]
        if unknown:
            raise KeyError(f"unknown head(s) {unknown}; the registry has {order}")
        object.__setattr__(self, "names", tuple(n for n in order if n in self.names))
        if "beta_head" in self.names and beta_epsilon_error(self.beta_epsilon):
            raise ConfigError(beta_epsilon_error(self.beta_epsilon))

    def has(self, name: str) -> bool:
        return name in self.names

    @classmethod
    def of(cls, *names: str) -> HeadPlan:
        """Heads `names` with the schema's default settings (inference-only models: scorers, reward models)."""
        return cls(names=tuple(names))

    @classmethod
    def from_keys(cls, ft, value: bool) -> HeadPlan:
        """The heads `ft`'s `add_*` keys create (and the value head when `value`), with `ft`'s settings."""
        names = tuple(spec.name for spec in HEAD_SPECS if (getattr(ft, spec.add_key) if spec.add_key else value))
        return cls(
            names=names,
            dropout=ft.head_dropout,
            init_std=ft.head_init_std,
            beta_epsilon=ft.beta_head_epsilon,
            beta_centered=ft.stage != "ppo",
            beta_pooling=ft.beta_head_pooling,
            flip_prior_mean=ft.flip_prior_mean,
            beta_kind=resolved_beta_kind(ft.beta_head_kind, ft.stage),
        )

    def settings(self) -> dict[str, Any]:
        """What `heads_config.json` records of the settings (read back by `from_heads_config`)."""
        return {"head_dropout": self.dropout, "head_init_std": self.init_std, "beta_head_epsilon": self.beta_epsilon,
                "beta_head_pooling": self.beta_pooling, "flip_prior_mean": self.flip_prior_mean, "beta_head_kind": self.beta_kind}  # fmt: skip

    @classmethod
    def from_heads_config(cls, config: dict[str, Any], names: tuple[str, ...]) -> HeadPlan:
        """Heads `names` with the settings a checkpoint's `heads_config.json` recorded (the schema's where it has
        none): loading a checkpoint as it was trained."""
        plan = cls.of(*names)
        saved = {
            "beta_epsilon": config.get("beta_head_epsilon"),
            "beta_centered": config.get("beta_head_centered"),
            "beta_pooling": config.get("beta_head_pooling"),
            "flip_prior_mean": config.get("flip_prior_mean"),
            "beta_kind": config.get("beta_head_kind"),
        }
        return dataclasses.replace(plan, **{k: v for k, v in saved.items() if v is not None})


@dataclass(frozen=True)
class RunPlan:
    """The decisions of one run (built by `build_plan` from a validated config).

    heads: the trained model's heads and their settings.
    loss_heads: the heads the loss uses (a head that exists but is unused changes no number of the run).
    head_lr_ratios: head name -> learning rate / `learning_rate` of its optimizer group (heads that have one).
    beta_source: `static` (pref_beta), `head` (pref_beta * s(x), the beta head) or `batch` (beta-DPO).
    uses_variance: the loss is the probit (Disco) member of its family.
    length_normalise: the loss reads length-averaged log-probs (IPO, SimPO, ORPO).
    epistemic: the reward model's epistemic estimator (`none` without one).
    reference_free: no reference model is loaded or run (SimPO, ORPO); its log-probs are 0 in the `PairBatch`.
    """

    stage: str
    heads: HeadPlan
    loss_heads: tuple[str, ...]
    head_lr_ratios: dict[str, float]
    beta_source: Literal["static", "head", "batch"]
    uses_variance: bool
    length_normalise: bool
    epistemic: str
    reference_free: bool = False

    @property
    def needs_prompt_features(self) -> bool:
        """A head the loss uses reads the reference's prompt features (so the reference forward must return them)."""
        return any(spec.reads == "prompt" for spec in HEAD_SPECS if spec.name in self.loss_heads)

    @property
    def uses_flip_rate(self) -> bool:
        """The loss is the forward-corrected likelihood with the flip-rate head's e(x) (docs/noisy_labels.md)."""
        return "flip_head" in self.loss_heads

    @property
    def logs_beta(self) -> bool:
        """`beta/*` is logged: the run has a beta head (used or not) or beta-DPO's batch beta."""
        return self.heads.has("beta_head") or self.beta_source == "batch"


def head_lr_ratio(ft, spec) -> float:
    """The learning-rate ratio of head `spec`'s optimizer group: its key, or the stage's default when unset."""
    value = getattr(ft, spec.lr_ratio_key)
    if value is not None:
        return float(value)
    return VARIANCE_HEAD_LR_RATIO_BY_STAGE.get(ft.stage, 1.0)


def build_plan(ft) -> RunPlan:
    """The plan of a validated `FinetuningArguments`."""
    heads = HeadPlan.from_keys(ft, value=ft.stage in VALUE_HEAD_STAGES)
    used = [spec.name for spec in HEAD_SPECS if heads.has(spec.name) and spec.use_key and getattr(ft, spec.use_key)]
    ratios = {spec.name: head_lr_ratio(ft, spec) for spec in HEAD_SPECS if spec.lr_ratio_key and heads.has(spec.name)}
    if ft.pref_beta_mode == "batch":
        beta_source = "batch"
    elif "beta_head" in used:
        beta_source = "head"
    else:
        beta_source = "static"
    return RunPlan(
        stage=ft.stage,
        heads=heads,
        loss_heads=tuple(used),
        head_lr_ratios=ratios,
        beta_source=beta_source,
        uses_variance="variance_head" in used,
        length_normalise=ft.stage == "dpo" and ft.pref_loss in ("ipo", *REFERENCE_FREE_LOSS_TYPES),
        epistemic=ft.epistemic,
        reference_free=ft.stage == "dpo" and ft.pref_loss in REFERENCE_FREE_LOSS_TYPES,
    )
