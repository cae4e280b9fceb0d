"""A short supervised warm-up for the PPO demo and effect test.

A randomly initialised tiny model emits byte noise, which no reward model scores meaningfully and which PPO
cannot improve within a CPU budget. A few hundred supervised steps on the *responses* of builtin:synthetic
pairs, chosen and rejected alike, teach it the task's format (a handful of adjectives, then EOS) without any
preference between good and bad words: the warmed-up policy's mean true reward is near that of a random
response, and any rise after PPO comes from the reward model.
"""

from __future__ import annotations

import os

import torch

from ...config.schema import DataArguments, FinetuningArguments, ModelArguments
from ...data import get_dataset
from ...data.collator import PairwiseCollator
from ...losses.logps import response_lengths, sequence_logps
from ...models.loader import load_model_with_heads


def supervised_warmup(
    model_name_or_path: str,
    output_dir: str,
    steps: int = 150,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    num_pairs: int = 1000,
    seed: int = 7,
) -> str:
    """Fine-tune `model_name_or_path` on builtin:synthetic responses and save it (model + tokenizer) to `output_dir`.

    Minimises the mean per-token negative log-likelihood of both responses of randomly drawn pairs (prompt
    tokens masked), with AdamW. Deterministic for `seed`; the global RNG is left untouched.

    Returns:
        output_dir, loadable as `model_name_or_path` of a PPO run.
    """
    model, tokenizer = load_model_with_heads(
        ModelArguments(model_name_or_path=model_name_or_path), FinetuningArguments(), add_value_head=False
    )
    data_args = DataArguments(dataset="builtin:synthetic", synthetic_num_pairs=num_pairs, synthetic_seed=seed,
                              cutoff_len=64)  # fmt: skip
    rows = get_dataset(data_args, tokenizer, stage="rm", seed=seed).train
    collate = PairwiseCollator(tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        index = torch.randint(len(rows), (batch_size,), generator=generator).tolist()
        batch = collate([rows[i] for i in index])
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
        logps = sequence_logps(hidden, model.lm_head, batch["labels"])
        loss = -logps.sum() / response_lengths(batch["labels"]).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    os.makedirs(output_dir, exist_ok=True)
    model.causal_lm.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir
