"""Peak memory of PPO's models with a LoRA reward model: the reward adapter on the policy's base (one base) against
the adapter on its own copy of the base (two bases, `reward_model_type: full`).

Each path runs in a fresh process: load the LoRA policy (+ value head), load the reward model, score one rollout
batch, then report the process's peak resident set size (ru_maxrss) above its RSS before the first model loaded.
CPU only; the base is a Llama with hidden 512 and 8 layers (~27 M parameters, ~103 MiB in fp32) so the copy stands
out from allocator noise. Measured with RSS (VmRSS / ru_maxrss), not tracemalloc (which does not see torch tensors).

    python benchmarks/ppo_reward_adapter_memory.py   # prints a table; writes results/ppo_reward_adapter_memory.json
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile

HIDDEN, LAYERS, INTERMEDIATE = 512, 8, 1376


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def build(root: str) -> tuple[str, str]:
    """Write the base model and a LoRA reward adapter (+ Disco heads) trained on it; returns (base, adapter)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from discoalign.config.schema import FinetuningArguments, ModelArguments
    from discoalign.models.checkpoint import save_checkpoint
    from discoalign.models.loader import load_model_with_heads
    from discoalign.models.tiny import build_tiny_tokenizer, save_model_and_tokenizer, seeded_from_config

    tok = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=8,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=False)  # fmt: skip
    # Saved in bf16 and loaded in fp32: the loaded weights are converted copies in anonymous memory. (An fp32 file
    # would be memory-mapped, and file-backed pages shared by both copies would hide the second one from RSS.)
    model = seeded_from_config(AutoModelForCausalLM, config, tok, 0).to(torch.bfloat16)
    base = save_model_and_tokenizer(model, tok, os.path.join(root, "base"))
    model, _ = load_model_with_heads(ModelArguments(model_name_or_path=base),
                                     FinetuningArguments(finetuning_type="lora", add_disco_head=True),
                                     add_value_head=True)  # fmt: skip
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return base, save_checkpoint(model, os.path.join(root, "rm"), tok)


def measure(base: str, adapter: str, mode: str) -> dict:
    """In this (fresh) process: policy + reward model (`mode`: shared | separate), one scored batch; peak RSS."""
    import torch

    torch.set_num_threads(1)
    from discoalign.config.schema import FinetuningArguments, ModelArguments
    from discoalign.models.loader import load_model_with_heads
    from discoalign.models.reward_model import load_reward_model, score_responses

    model_args = ModelArguments(model_name_or_path=base)
    ft = FinetuningArguments(stage="ppo", finetuning_type="lora", reward_model=adapter,
                             reward_model_type="lora" if mode == "shared" else "full")  # fmt: skip
    before = _rss_kib()
    policy, tok = load_model_with_heads(model_args, ft, add_value_head=True, is_trainable=True)
    reward = load_reward_model(model_args, ft, tok, policy=policy)
    gen = torch.Generator().manual_seed(0)
    query = torch.randint(3, len(tok), (16, 48), generator=gen)
    response = torch.randint(3, len(tok), (16, 32), generator=gen)
    mean, variance = score_responses(reward, query, torch.ones_like(query), response, torch.ones_like(response))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    import gc

    gc.collect()
    held = _rss_kib()  # what stays resident for the rest of the run
    reward_params = sum(p.numel() for p in reward.parameters())
    return {"mode": mode, "peak_rss_above_start_mib": (peak - before) / 1024,
            "rss_held_above_start_mib": (held - before) / 1024, "reward_model_parameters": reward_params,
            "score_sum": float(mean.sum()), "variance_sum": float(variance.sum())}  # fmt: skip


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--measure":
        print(json.dumps(measure(sys.argv[2], sys.argv[3], os.environ["MODE"])))
        return
    with tempfile.TemporaryDirectory() as root:
        base, adapter = build(root)
        rows = []
        for mode in ("separate", "shared"):
            out = subprocess.run([sys.executable, __file__, "--measure", base, adapter], check=True, text=True,
                                 capture_output=True, env={**os.environ, "MODE": mode})  # fmt: skip
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    separate, shared = rows
    saving = separate["peak_rss_above_start_mib"] - shared["peak_rss_above_start_mib"]
    held_saving = separate["rss_held_above_start_mib"] - shared["rss_held_above_start_mib"]
    result = {"rows": rows, "peak_saving_mib": saving, "held_saving_mib": held_saving,
              "max_abs_score_difference": abs(separate["score_sum"] - shared["score_sum"]) / 16,
              "base_fp32_mib": None}  # fmt: skip
    base_params = separate["reward_model_parameters"] - shared["reward_model_parameters"]
    result["base_fp32_mib"] = base_params * 4 / 2**20
    for row in rows:
        print(
            f"{row['mode']:>9}: peak RSS above start {row['peak_rss_above_start_mib']:8.1f} MiB, held after "
            f"scoring {row['rss_held_above_start_mib']:8.1f} MiB, "
            f"reward model parameters {row['reward_model_parameters']:>11,}"
        )
    print(
        f"saving: peak {saving:.1f} MiB, held {held_saving:.1f} MiB "
        f"(one fp32 copy of the base is {result['base_fp32_mib']:.1f} MiB); "
        f"score sums {separate['score_sum']:.6f} vs {shared['score_sum']:.6f}"
    )
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "ppo_reward_adapter_memory.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
