"""The heads a model may carry: their config keys and their spec, in one place (docs/design.md §2, docs/extending.md).

`HEAD_SPECS` is the head registry of the config layer: which key creates a head, which key makes the loss use it,
its optimizer group, the stages it belongs to and what it reads. The model side (`models/heads.py`, `HEAD_MODULES`)
maps each name to its module; a test keeps the two lists equal. Validation, the run plan, the loader, the checkpoint
files and the optimizer groups all iterate this table instead of naming heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal


@dataclass
class HeadArguments:
    """The variance and beta heads: whether they exist, whether the loss uses them, how they train."""

    GROUP_TITLE: ClassVar[str] = "Heads"

    add_disco_head: bool = field(default=False, metadata={"help": "Create the variance head."})
    add_beta_head: bool = field(default=False, metadata={"help": "Create the beta head on the reference model."})
    disco_pref: bool = field(default=False, metadata={"help": "Use the variance head in the loss (probit)."})
    use_dynamic_beta: bool = field(default=False, metadata={"help": "beta_eff(x) = pref_beta * s(x)."})
    head_dropout: float = field(default=0.0, metadata={"help": "Dropout before the value and variance heads."})
    head_init_std: float | None = field(
        default=None, metadata={"help": "Value head init: PyTorch default when unset, else normal(0, std)."}
    )
    beta_head_epsilon: float = field(
        default=0.8,
        metadata={
            "help": "s(x) = 1 + eps * tanh(.), eps in (0, 1) (0.8: measured on benchmarks/dpo_noise.py, where "
            "0.5 saturated at both ends)."
        },
    )
    beta_head_lr_ratio: float = field(
        default=10.0,
        metadata={
            "help": "Beta head lr = learning_rate * ratio (10: chosen on benchmarks/dpo_noise.py, where 1 "
            "left the head too slow to help)."
        },
    )
    variance_head_lr_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Variance head lr = learning_rate * ratio. Default: 10 for stage dpo (DiscoDPO's variance "
            "barely moves at 1, docs/noisy_labels.md), 1 otherwise."
        },
    )
    beta_head_pooling: Literal["last", "mean"] = field(
        default="mean",
        metadata={
            "help": "Beta head features: the reference's hidden state at the last prompt token (`last`) or "
            "its mean over the prompt's tokens (`mean`)."
        },
    )
    add_flip_head: bool = field(
        default=False, metadata={"help": "Create the flip-rate head e(x) on the prompt features (dpo, rm)."}
    )
    use_flip_rate: bool = field(
        default=False,
        metadata={
            "help": "Forward-corrected likelihood (1 - e(x)) sigmoid(z) + e(x) sigmoid(-z) (docs/noisy_labels.md)."
        },
    )
    flip_head_lr_ratio: float = field(default=10.0, metadata={"help": "Flip-rate head lr = learning_rate * ratio."})
    flip_prior_mean: float = field(
        default=0.1, metadata={"help": "Mode of the Beta prior on the flip rate e(x), in [0, 0.5)."}
    )
    flip_prior_strength: float = field(
        default=0.1,
        metadata={
            "help": "Strength of the Beta prior on 2 e(x): pseudo-pairs per pair (0 turns it off; docs/noisy_labels.md)."
        },
    )
    beta_head_kind: Literal["auto", "tanh", "exp"] = field(
        default="auto",
        metadata={
            "help": "The beta head: `tanh`, s = 1 + eps * tanh(u - c) (bounded), or `exp` (`stage: dpo`), s = exp(u) "
            "with E[log s] = 0 and a Gaussian penalty on u (interior optimum; docs/dynamic_beta.md). `auto`: `exp` "
            "for dpo (chosen on the development split of benchmarks/dpo_noise.py), `tanh` for ppo; a checkpoint's "
            "beta head is continued with the kind it was trained with."
        },
    )
    beta_head_prior: float = field(
        default=0.03,
        metadata={
            "help": "`beta_head_kind: exp`: strength lambda of the penalty lambda/2 * (log s(x))^2 per pair (0.03: "
            "chosen over 0.1 on the development split of benchmarks/dpo_noise.py)."
        },
    )
    disco_variance_prior: float = field(
        default=0.03,
        metadata={
            "help": "Disco (rm and DiscoDPO): strength lambda of a Normal(0, 1/lambda) prior on each "
            "log-variance, adding lambda/2 * (log sigma^2)^2 per response; anchors the variance scale "
            "(0 turns it off)."
        },
    )


@dataclass(frozen=True)
class HeadSpec:
    """One head of the registry.

    name: the `ModelWithHeads` attribute and the prefix of its tensors in `heads.safetensors`.
    add_key: the key that creates it; None for the value head, which the stage creates (`VALUE_HEAD_STAGES`).
    use_key: the key with which the loss uses it (None: always used where it exists).
    lr_ratio_key: the key of its optimizer group's learning-rate ratio (None: it trains with the backbone).
    stages: the stages whose trained model may have it.
    reads: `response`, the last real token of prompt + response (per response), or `prompt`, the reference model's
        features of the prompt (per pair; computed without gradient).
    refused: stage -> why the head cannot be used there (the error's explanation).
    """

    name: str
    add_key: str | None
    use_key: str | None
    lr_ratio_key: str | None
    stages: tuple[str, ...]
    reads: Literal["response", "prompt"]
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys that create or use the head."""
        return tuple(k for k in (self.add_key, self.use_key) if k)


NO_HEADS_IN_SFT = "supervised fine-tuning trains the language model only and has no heads. Remove them, or use " \
                  "`stage: rm` / `dpo`."  # fmt: skip

HEAD_SPECS: tuple[HeadSpec, ...] = (
    HeadSpec("value_head", None, None, None, ("rm", "ppo"), "response"),
    HeadSpec(
        "variance_head", "add_disco_head", "disco_pref", "variance_head_lr_ratio", ("rm", "dpo"), "response",
        refused={
            "sft": NO_HEADS_IN_SFT,
            "ppo": "the policy has no variance head in PPO. The Disco variance comes from the reward model; "
            "`disco_risk_coef` decides how much it counts (reward = mean - disco_risk_coef * sqrt(variance)).",
        },
    ),
    HeadSpec(
        "beta_head", "add_beta_head", "use_dynamic_beta", "beta_head_lr_ratio", ("dpo", "ppo"), "prompt",
        refused={
            "sft": NO_HEADS_IN_SFT,
            "rm": "reward modelling has no beta. The beta head belongs to `stage: dpo` (and `ppo`).",
        },
    ),
    HeadSpec(
        "flip_head", "add_flip_head", "use_flip_rate", "flip_head_lr_ratio", ("dpo", "rm"), "prompt",
        refused={
            "sft": NO_HEADS_IN_SFT,
            "ppo": "PPO has no preference labels to correct. The flip-rate head belongs to `stage: dpo` and `rm`.",
        },
    ),
)  # fmt: skip
"""The head registry, in creation order (only the value head draws random numbers, after any LoRA init)."""

HEAD_NAMES: tuple[str, ...] = tuple(spec.name for spec in HEAD_SPECS)


def head_spec(name: str) -> HeadSpec:
    """The spec of head `name` (KeyError for an unknown one)."""
    for spec in HEAD_SPECS:
        if spec.name == name:
            return spec
    raise KeyError(name)


def resolved_beta_kind(kind: str, stage: str | None) -> str:
    """The beta head `beta_head_kind: auto` builds: the centred `exp` head for `stage: dpo`, the bounded `tanh` head
    for PPO's KL controller and for a checkpoint that recorded no kind (saved before `exp` existed, so `tanh`)."""
    if kind != "auto":
        return kind
    return "exp" if stage == "dpo" else "tanh"


BETA_EPSILON_RANGE = (0.0, 1.0)  # open interval: s(x) = 1 + eps * tanh(.) stays positive


def beta_epsilon_error(epsilon: float) -> str | None:
    """Why `beta_head_epsilon` is out of range, or None: the one statement of the rule."""
    low, high = BETA_EPSILON_RANGE
    if low < epsilon < high:
        return None
    return f"`beta_head_epsilon` is {epsilon}; it must lie strictly between {low:g} and {high:g} so s(x) > 0."


FLIP_PRIOR_MEAN_RANGE = (0.0, 0.5)  # half-open [0, 0.5): e(x) = sigmoid(.) / 2 stays below 1/2


def flip_prior_error(mean: float, strength: float) -> str | None:
    """Why the flip-rate prior's settings are out of range, or None: the one statement of the rule."""
    low, high = FLIP_PRIOR_MEAN_RANGE
    if not low <= mean < high:
        return f"`flip_prior_mean` is {mean}; it must lie in [{low:g}, {high:g}) (a flip rate of 1/2 is pure noise)."
    if strength < 0:
        return f"`flip_prior_strength` is {strength}; it must be 0 (off) or positive."
    return None
