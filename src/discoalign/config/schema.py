"""The flat keys a run's YAML may hold, grouped the way LlamaFactory groups them.

`ModelArguments`, `DataArguments` and `FinetuningArguments` are what the code reads (`ft.pref_beta`); each inherits
its keys from small dataclasses, one per concern, whose `GROUP_TITLE` names their group on the keys page
(`discoalign keys`, docs/config_keys.md). A group may gather keys of more than one of the three (Multimodal, Speed).
Any `transformers.TrainingArguments` key is accepted as well; those are not listed here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from .finetuning_groups import (
    DPOArguments,
    GRPOArguments,
    KTOArguments,
    LoraArguments,
    OutputArguments,
    PPOArguments,
    RewardModelArguments,
    SpeedArguments,
    StageArguments,
    TowerArguments,
)
from .heads import HeadArguments

# The names `template` takes: the templates of `data/chat_templates.py` (a test keeps the two equal).
CHAT_TEMPLATE_NAMES = ("default", "llama3", "llama2", "mistral", "gemma", "chatml", "qwen", "qwen3_nothink")


@dataclass
class BaseModelArguments:
    """Which model to load, and how."""

    GROUP_TITLE: ClassVar[str] = "Model"

    model_name_or_path: str = field(
        default="builtin:tiny-qwen3",
        metadata={"help": "Local directory, hub name, or builtin:tiny-<arch> (llama, qwen2, qwen3, gpt2)."},
    )
    adapter_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "LoRA adapter folder(s) on `model_name_or_path`, comma-separated (LlamaFactory): all but the last "
            "are merged into the base; the last is trained further with `finetuning_type: lora` (unless "
            "`create_new_adapter`), merged for `full`."
        },
    )
    template: Literal[CHAT_TEMPLATE_NAMES] | None = field(
        default=None,
        metadata={
            "help": "Chat template by name: default, llama3, llama2, mistral, gemma, chatml, qwen, qwen3_nothink "
            "(LlamaFactory's formats); unset: the tokenizer's own."
        },
    )
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "DPO reference model (full fine-tuning); default: a frozen copy of the policy."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to transformers; off unless set."})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager | sdpa | flash_attention_2; falls back to sdpa/eager when missing."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Hub cache directory."})
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "A GGUF file inside `model_name_or_path` (or an absolute path): its weights are de-quantised to "
            "float32 (a Q4_1 file's values, not the bf16 release; docs/real_model.md); its tokenizer is used."
        },
    )


@dataclass
class ProcessorArguments:
    """Multimodal processing (LlamaFactory names)."""

    GROUP_TITLE: ClassVar[str] = "Multimodal"

    image_max_pixels: int = field(
        default=768 * 768, metadata={"help": "Images with more pixels are scaled down (aspect kept) before processing."}
    )
    image_min_pixels: int = field(
        default=32 * 32, metadata={"help": "Images with fewer pixels are scaled up (aspect kept) before processing."}
    )


@dataclass
class QuantizationArguments:
    """Quantisation (QLoRA) and placement of inference-only models (docs/quantization.md; LlamaFactory names)."""

    GROUP_TITLE: ClassVar[str] = "Quantisation and placement"

    quantization_bit: int | None = field(
        default=None, metadata={"help": "4 or 8: load the base model quantised by bitsandbytes (QLoRA); needs lora."}
    )
    quantization_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type: nf4 | fp4."})
    double_quantization: bool = field(
        default=True, metadata={"help": "4-bit: also quantise the quantisation constants (saves ~0.4 bit/param)."}
    )
    device_map: str | dict | None = field(
        default=None,
        metadata={
            "help": "Inference-only models (reward model, reference): `auto`, `balanced`, `sequential` or "
            "one device (`cuda:1`); splits a large model over GPUs. CPU/disk offload is refused."
        },
    )


@dataclass
class DatasetArguments:
    """Which rows to read (files, builtin:synthetic or LlamaFactory's dataset registry), and how many."""

    GROUP_TITLE: ClassVar[str] = "Data"

    dataset: str | None = field(
        default=None, metadata={"help": "File (.json/.jsonl/.parquet/.csv), save_to_disk folder, or builtin:synthetic."}
    )
    eval_dataset: str | None = field(default=None, metadata={"help": "Same kinds as `dataset`."})
    dataset_dir: str = field(
        default="data",
        metadata={
            "help": "Folder with LlamaFactory's `dataset_info.json`; `dataset` / `eval_dataset` may then name "
            "its entries (comma-separated). The default `data` is used when it holds a `dataset_info.json`."
        },
    )
    dataset_format: Literal["auto", "pairwise", "implicit", "hh_rlhf", "sharegpt", "prompt"] = field(
        default="auto", metadata={"help": "Detected from the columns when `auto`."}
    )
    cutoff_len: int = field(default=1024, metadata={"help": "Maximum prompt+response tokens."})
    val_size: float = field(default=0.0, metadata={"help": "Fraction (<1) or number (>=1) of rows held out for eval."})
    max_samples: int | None = field(default=None, metadata={"help": "Keep only the first N rows of each dataset."})
    skip_invalid_rows: bool = field(
        default=False, metadata={"help": "Drop bad rows and count them per reason instead of stopping."}
    )
    synthetic_num_pairs: int = field(default=2000, metadata={"help": "Rows generated by builtin:synthetic."})
    synthetic_seed: int = field(
        default=0, metadata={"help": "Seed of builtin:synthetic; eval_dataset builtin:synthetic uses seed+1."}
    )


@dataclass
class DataSpeedArguments:
    """Speed switches of the data (docs/performance.md); each leaves every loss and gradient unchanged."""

    GROUP_TITLE: ClassVar[str] = "Speed"

    pack_pairs: bool = field(
        default=False,
        metadata={
            "help": "One row per pair: the prompt once, then chosen and rejected with their own position ids "
            "and a mask that keeps them apart. Needs attn_implementation eager or sdpa."
        },
    )
    group_by_length: bool = field(
        default=False, metadata={"help": "Batch pairs of similar length together (less padding); order changes."}
    )


@dataclass
class MediaArguments:
    """Where the images and audio of multimodal rows are found."""

    GROUP_TITLE: ClassVar[str] = "Multimodal"

    media_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder that relative `images` / `audios` paths start from; default: the data file's folder."
        },
    )


@dataclass
class SFTArguments:
    """Stage sft (docs/sft.md)."""

    GROUP_TITLE: ClassVar[str] = "SFT"

    packing: bool = field(
        default=False,
        metadata={
            "help": "SFT: lay each batch's sequences end to end in one row, kept apart by a block-diagonal "
            "mask (no padding; same loss). Needs attn_implementation eager or sdpa."
        },
    )
    sft_responses: Literal["chosen", "both"] = field(
        default="chosen",
        metadata={
            "help": "SFT on pairwise data: train on the chosen response, or on both (a format warm-up that "
            "learns no preference)."
        },
    )


# A dataclass takes its bases' fields in reverse MRO order (the last base's first), so the bases are listed last
# group first: the fields, and the resolved YAML a run saves, then come first group first.
@dataclass
class ModelArguments(QuantizationArguments, ProcessorArguments, BaseModelArguments):
    """The model's keys (`RunConfig.model`)."""

    def for_model(self, name: str, keep_template: bool = True) -> ModelArguments:
        """These arguments for another model (a reference, a reward model): `name` without this run's adapters, and
        without its `template` unless `keep_template` (a reward model's saved tokenizer carries its own)."""
        other = copy.copy(self)
        other.model_name_or_path = name
        other.adapter_name_or_path = None
        other.gguf_file = None  # the GGUF file belongs to `model_name_or_path`
        if not keep_template:
            other.template = None
        return other


@dataclass
class DataArguments(SFTArguments, MediaArguments, DataSpeedArguments, DatasetArguments):
    """The data's keys (`RunConfig.data`)."""


@dataclass
class FinetuningArguments(
    OutputArguments,
    GRPOArguments,
    PPOArguments,
    SpeedArguments,
    KTOArguments,
    DPOArguments,
    RewardModelArguments,
    HeadArguments,
    TowerArguments,
    LoraArguments,
    StageArguments,
):
    """The training's keys (`RunConfig.finetuning`): stage, adapters, heads and each stage's own."""


ARGUMENT_CLASSES = (ModelArguments, DataArguments, FinetuningArguments)
