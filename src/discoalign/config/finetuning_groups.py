"""The groups `FinetuningArguments` is made of, one dataclass per concern (LlamaFactory's `RLHFArguments`,
`LoraArguments`, ... pattern). Each names its group on the keys page (`GROUP_TITLE`); `config.keys` reads them, so a
key is written once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ..losses.grpo import ADVANTAGE_ESTIMATORS, GRPO_LOSS_TYPES
from ..losses.reference_free import PREF_LOSS_TYPES


@dataclass
class StageArguments:
    """What to train and whether the whole model or adapters train."""

    GROUP_TITLE: ClassVar[str] = "Stage and fine-tuning"

    stage: Literal["sft", "rm", "dpo", "ppo", "kto", "grpo"] = field(
        default="rm", metadata={"help": "sft | rm | dpo | ppo | kto | grpo."}
    )
    finetuning_type: Literal["full", "lora"] = field(default="full", metadata={"help": "full | lora."})


@dataclass
class LoraArguments:
    """The LoRA adapters of `finetuning_type: lora`."""

    GROUP_TITLE: ClassVar[str] = "Stage and fine-tuning"

    lora_rank: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha; default 2 * lora_rank."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target: str = field(
        default="all", metadata={"help": "`all` (every linear layer but the LM head) or comma-separated names."}
    )
    create_new_adapter: bool = field(
        default=False,
        metadata={"help": "With `adapter_name_or_path`: merge every adapter and train a new one (LlamaFactory)."},
    )


@dataclass
class TowerArguments:
    """Multimodal models: which parts train besides the language model (LlamaFactory names)."""

    GROUP_TITLE: ClassVar[str] = "Multimodal"

    freeze_vision_tower: bool = field(default=True, metadata={"help": "Keep the vision tower frozen (no LoRA)."})
    freeze_audio_tower: bool = field(default=True, metadata={"help": "Keep the audio tower frozen (no LoRA)."})
    freeze_multi_modal_projector: bool = field(
        default=True, metadata={"help": "Keep the projector from tower to language model frozen (no LoRA)."}
    )


# `none` and the names of the epistemic estimator registry (`models/epistemic/registry.py`; a test keeps them equal).
EPISTEMIC_KINDS = ("none", "token_novelty", "laplace")


@dataclass
class RewardModelArguments:
    """Stage rm: the reward model's loss and its epistemic uncertainty (docs/reward_modeling.md)."""

    GROUP_TITLE: ClassVar[str] = "Reward modelling"

    center_rewards_coefficient: float | None = field(
        default=None, metadata={"help": "Adds c * mean((mu_c + mu_r)^2) to the reward loss."}
    )
    # docs/reward_modeling.md "Epistemic uncertainty"
    epistemic: Literal[EPISTEMIC_KINDS] = field(
        default="none",
        metadata={
            "help": "rm: add an epistemic variance term to the reward model: `token_novelty` = prior variance x "
            "(response tokens + adjacent token pairs never seen in training); `laplace` = last-layer Laplace "
            "posterior of the value head on pair differences, read on centred features; `none`: no term."
        },
    )


@dataclass
class DPOArguments:
    """Preference optimisation (stage dpo; `pref_beta` is also the KL coefficient of PPO)."""

    GROUP_TITLE: ClassVar[str] = "DPO"

    pref_beta: float = field(default=0.1, metadata={"help": "DPO beta (KL coefficient in PPO)."})
    pref_loss: Literal[PREF_LOSS_TYPES] = field(
        default="sigmoid",
        metadata={"help": " | ".join(PREF_LOSS_TYPES) + " (docs/dpo.md; simpo and orpo are reference-free)."},
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "Label-flip rate in [0, 0.5): conservative DPO with `sigmoid` (and SimPO with `simpo`), the "
            "known flip rate of robust DPO with `robust`."
        },
    )
    pref_beta_mode: Literal["static", "batch"] = field(
        default="static",
        metadata={
            "help": "static: beta = pref_beta. batch: beta-DPO (Wu et al. 2024), one beta per batch from the "
            "implicit margins' running statistics, with beta-guided data filtering."
        },
    )
    beta_dpo_alpha: float = field(
        default=0.6, metadata={"help": "beta-DPO: beta = pref_beta * (1 + alpha * (mean margin - running mean))."}
    )
    beta_dpo_filter: float = field(
        default=0.2, metadata={"help": "beta-DPO: fraction of each batch dropped by the margin-guided filter."}
    )
    pref_ftx: float = field(default=0.0, metadata={"help": "Weight of an SFT loss on chosen responses."})
    simpo_gamma: float = field(
        default=0.5, metadata={"help": "SimPO (`pref_loss: simpo`): target reward margin gamma (LlamaFactory, TRL)."}
    )
    dr_dpo_beta: float = field(
        default=1.0,
        metadata={
            "help": "Dr. DPO (`pref_loss: dr_dpo`, Wu et al. 2025): beta' of the batch loss "
            "-beta' log mean_i exp(-loss_i / beta'); large: DPO's mean, small: pairs with a large loss count less."
        },
    )
    precompute_ref_logps: bool = field(
        default=False, metadata={"help": "Compute reference log-probs (and beta features) once before training."}
    )


@dataclass
class KTOArguments:
    """Stage kto (docs/kto.md; LlamaFactory's names, TRL's `desirable_weight` / `undesirable_weight`)."""

    GROUP_TITLE: ClassVar[str] = "KTO"

    kto_chosen_weight: float = field(
        default=1.0, metadata={"help": "KTO: weight lambda_D of the desirable rows' loss (TRL: desirable_weight)."}
    )
    kto_rejected_weight: float = field(
        default=1.0, metadata={"help": "KTO: weight lambda_U of the undesirable rows' loss (TRL: undesirable_weight)."}
    )


@dataclass
class SpeedArguments:
    """Speed switches of the DPO family (docs/performance.md); each leaves every loss and gradient unchanged."""

    GROUP_TITLE: ClassVar[str] = "Speed"

    logps_chunk_size: int = field(
        default=512,
        metadata={
            "help": "Response tokens projected through the LM head at once for log-probs (recomputed in "
            "backward). 0: the plain path, one fp32 log-softmax over batch x length x vocab."
        },
    )
    reference_inference_mode: bool = field(
        default=True, metadata={"help": "Run the reference forward under torch.inference_mode (else torch.no_grad)."}
    )


@dataclass
class PPOArguments:
    """Stage ppo (names from TRL / LlamaFactory); `config.validate` refuses them with any other stage."""

    GROUP_TITLE: ClassVar[str] = "PPO"

    reward_model: str | None = field(
        default=None, metadata={"help": "PPO: directory of the reward model (ours, LlamaFactory/TRL value head, ...)."}
    )
    reward_model_type: Literal["full", "lora"] = field(
        default="full",
        metadata={"help": "PPO: `lora` = a LoRA reward adapter with heads, on its own base or model_name_or_path."},
    )
    max_new_tokens: int = field(default=64, metadata={"help": "PPO: most tokens sampled per response."})
    temperature: float = field(default=1.0, metadata={"help": "PPO: sampling temperature (log-probs use it too)."})
    top_p: float = field(default=1.0, metadata={"help": "PPO: nucleus sampling; 1.0 disables it."})
    top_k: int = field(default=0, metadata={"help": "PPO: top-k sampling; 0 disables it."})
    ppo_epochs: int = field(default=4, metadata={"help": "PPO: optimisation epochs over each rollout batch."})
    ppo_buffer_size: int = field(
        default=1,
        metadata={
            "help": "PPO: mini-batches per rollout batch; a rollout holds per_device_train_batch_size x "
            "gradient_accumulation_steps x ppo_buffer_size prompts per device."
        },
    )
    gamma: float = field(default=1.0, metadata={"help": "PPO: discount factor of GAE."})
    lam: float = field(default=0.95, metadata={"help": "PPO: lambda of GAE."})
    cliprange: float = field(default=0.2, metadata={"help": "PPO: clip range of the policy ratio."})
    cliprange_value: float = field(default=0.2, metadata={"help": "PPO: clip range of the value function."})
    vf_coef: float = field(default=0.1, metadata={"help": "PPO: weight of the value loss."})
    whiten_rewards: bool = field(default=False, metadata={"help": "PPO: whiten the per-token rewards (TRL)."})
    reward_clip: float | None = field(default=None, metadata={"help": "PPO: clip scores to [-c, c]; unset: no clip."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "PPO: subtracted from the score of a response cut off without EOS."}
    )
    kl_estimator: Literal["k1", "k3"] = field(
        default="k1", metadata={"help": "PPO: per-token KL estimate in the penalty: k1 (log ratio) or k3."}
    )
    disco_risk_coef: float = field(
        default=0.0,
        metadata={"help": "PPO: reward = mean - disco_risk_coef * sqrt(variance), variance = aleatoric + epistemic."},
    )
    target_kl: float = field(
        default=6.0, metadata={"help": "PPO + use_dynamic_beta: per-response KL the beta head steers each prompt to."}
    )


# Stages that sample from the policy and score the samples (the PPO stage's rollout code); `grpo` reads the PPO keys
# of sampling and reward (`GRPO_SHARED_PPO_KEYS`) and its own group.
ONLINE_STAGES = ("ppo", "grpo")
GRPO_SHARED_PPO_KEYS = (
    "reward_model", "reward_model_type", "max_new_tokens", "temperature", "top_p", "top_k", "reward_clip",
    "missing_eos_penalty", "disco_risk_coef",
)  # fmt: skip


@dataclass
class GRPOArguments:
    """Stage grpo (TRL's names; docs/grpo.md); `config.validate` refuses them with any other stage. The KL
    coefficient is `pref_beta` (TRL's `beta`), the reward and sampling keys are PPO's."""

    GROUP_TITLE: ClassVar[str] = "GRPO"

    num_generations: int = field(
        default=8, metadata={"help": "GRPO: completions sampled per prompt (the group); divides the rollout batch."}
    )
    advantage_estimator: Literal[ADVANTAGE_ESTIMATORS] = field(
        default="grpo",
        metadata={
            "help": "GRPO: `grpo` = reward minus the group mean (Shao et al. 2024); `rloo` = minus the mean of the "
            "other completions, with the KL in the reward (Ahmadian et al. 2024, TRL's RLOOTrainer)."
        },
    )
    scale_rewards: str | bool = field(
        default="group",
        metadata={
            "help": "GRPO: divide advantages by the group's std (`group`/true), the batch's (`batch`) or not "
            "(`none`/false)."
        },  # fmt: skip
    )
    grpo_loss_type: Literal[GRPO_LOSS_TYPES] = field(
        default="dapo",
        metadata={
            "help": "GRPO (TRL's `loss_type`): token losses averaged per completion (`grpo`), per micro-batch "
            "(`bnpo`), over completions x max_new_tokens (`dr_grpo`), or over the generation batch (`dapo`)."
        },
    )
    epsilon: float = field(default=0.2, metadata={"help": "GRPO: clip range of the ratio (lower side)."})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "GRPO: upper clip range; unset: `epsilon` (DAPO recommends 0.28)."}
    )
    num_iterations: int = field(
        default=1, metadata={"help": "GRPO: optimisation steps per generation batch (TRL's mu)."}
    )
    reward_funcs: str | list | None = field(
        default=None,
        metadata={
            "help": "GRPO: Python reward functions `module:function` (a list, or comma-separated), TRL's signature "
            "f(prompts, completions, **columns) -> list[float]; summed with the reward model's score."
        },
    )
    reward_weights: list | None = field(
        default=None,
        metadata={
            "help": "GRPO: one weight per reward: the reward model's first (when set), then each of "
            "`reward_funcs`; default all 1."
        },  # fmt: skip
    )
    uncertainty_shrinkage: float = field(
        default=0.0,
        metadata={
            "help": "GRPO with a Disco / epistemic reward model: advantages weighted by s_g^2 / (s_g^2 + c * "
            "sigma_i^2) (shrinkage of an uncertain reward toward its group); 0: off (docs/grpo.md)."
        },
    )


@dataclass
class OutputArguments:
    """What a run writes besides its checkpoints."""

    GROUP_TITLE: ClassVar[str] = "Outputs"

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an `output_dir` that already holds a run: its checkpoints, results, predictions "
            "and plots are deleted first (other files are kept). Off: such a run is refused."
        },
    )
    plot_loss: bool = field(default=True, metadata={"help": "Write PNG plots to output_dir/plots/."})
    num_score_samples: int = field(default=5, metadata={"help": "Rows shown in the table printed after eval."})
