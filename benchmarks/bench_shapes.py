"""The models bench_vs_trl.py (and step_cost.py, gpu_check.sh) run: model shapes, how they are built, and their
parameter counts.

* `smollm2-135m` (the default of `make bench`): SmolLM2-135M-Instruct's configuration (Llama layout, 30 layers,
  hidden 576, 9 heads / 3 KV heads, MLP 1536, vocab 49,152, tied embeddings). The real weights when they have been
  pulled (`SMOLLM2_DIR`), else the same configuration with random weights, so the bench needs no download.
* `cpu-small` (`--tiny`): a 5.2M-parameter Qwen3-layout model, 8k vocab: the benchmark of earlier sessions.
* `qwen-0.5b`: Qwen2.5-0.5B's shape in the Qwen3 layout, 152k vocab, for a GPU.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

PRESETS = {
    # hidden, layers, heads, kv heads, head dim, intermediate, vocab
    "cpu-small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, intermediate_size=768, vocab_size=8192),
    # Qwen2.5-0.5B's shape in the Qwen3 layout: 494M parameters besides the input embedding
    "qwen-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                      head_dim=64, intermediate_size=4864, vocab_size=151936),
    # SmolLM2-135M-Instruct (Llama layout, tied embeddings)
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, intermediate_size=1536, vocab_size=49152),
}  # fmt: skip
# The presets with a Llama layout and tied input/output embeddings; the others are Qwen3 with an untied LM head.
TIED_LLAMA = {"smollm2-135m"}
# Where `discoalign pull` puts the converted model (fp32 safetensors + tokenizer).
SMOLLM2_DIR = os.path.expanduser(os.environ.get("SMOLLM2_DIR", "~/.cache/discoalign/models/smollm2-135m-instruct"))
# The name results carry: dpo_smollm2_135m_lora_256.
MODEL_TAGS = {"smollm2-135m": "smollm2_135m", "qwen-0.5b": "qwen_0_5b", "cpu-small": "cpu_small"}


def _config(preset: str, tokenizer):
    from transformers import LlamaConfig, Qwen3Config

    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    if preset in TIED_LLAMA:
        return LlamaConfig(**PRESETS[preset], max_position_embeddings=8192, tie_word_embeddings=True,
                           rope_theta=100000.0, rms_norm_eps=1e-5, **ids)  # fmt: skip
    return Qwen3Config(**PRESETS[preset], max_position_embeddings=4096, tie_word_embeddings=False, **ids)


def _copy_real(out: str) -> None:
    """The pulled SmolLM2 directory as a plain fp32 checkpoint (its config's GGUF provenance note dropped, so
    that TRL's plain `from_pretrained` reads it as our loader does); the weights are linked, not copied."""
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(SMOLLM2_DIR):
        src = os.path.join(SMOLLM2_DIR, name)
        if name in ("config.json", "tokenizer_config.json"):
            with open(src) as f:
                config = json.load(f)
            config.pop("quantization_config", None)
            # Pad with <|endoftext|> (id 0), not the EOS every row ends with: TRL's reward model finds the last
            # token as the last non-pad id, so with pad == EOS it would score the token before the EOS.
            if name == "config.json":
                config["pad_token_id"] = 0
            else:
                config["pad_token"] = "<|endoftext|>"
            with open(os.path.join(out, name), "w") as f:
                json.dump(config, f, indent=2)
        elif name.endswith(".safetensors"):
            os.symlink(src, os.path.join(out, name))
        else:
            shutil.copy(src, os.path.join(out, name))


def real_weights_available(preset: str) -> bool:
    return preset == "smollm2-135m" and os.path.isfile(os.path.join(SMOLLM2_DIR, "model.safetensors"))


def build_models(workdir: str, preset: str, real: bool | None = None) -> tuple[str, str]:
    """Save a policy (seed 0) and a reference (seed 1) for `preset`; return both directories.

    `real` (default: when pulled): the SmolLM2 weights for both (the reference of DPO is the model one starts from).
    Random models get our tiny tokenizer (its ids are a subset of every preset's vocabulary).
    """
    from transformers import AutoModelForCausalLM

    from discoalign.models.tiny import build_tiny_tokenizer

    if real is None:
        real = real_weights_available(preset)
    dirs = [os.path.join(workdir, "policy"), os.path.join(workdir, "reference")]
    if real:
        for out in dirs:
            _copy_real(out)
        return dirs[0], dirs[1]
    tokenizer = build_tiny_tokenizer()
    for seed, out in zip((0, 1), dirs):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(_config(preset, tokenizer))
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model
    return dirs[0], dirs[1]


def param_counts(model_dir: str) -> dict[str, int]:
    """{"body": parameters besides the input embedding and the LM head, "lm_head": V x H} of a saved model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    body = sum(p.numel() for p in model.parameters() if id(p) not in seen)
    return {"body": body, "lm_head": config.vocab_size * config.hidden_size}


def trl_lora_config(pair: str, rank: int = 8):
    """TRL's side of our LoRA defaults (`lora_rank` 8, alpha 2 x rank, no dropout, every linear layer but the LM
    head; a reward model also trains its score layer, as our value head trains)."""
    from peft import LoraConfig

    extra = {"task_type": "SEQ_CLS", "modules_to_save": ["score"]} if pair == "rm" else {"task_type": "CAUSAL_LM"}
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", **extra)
