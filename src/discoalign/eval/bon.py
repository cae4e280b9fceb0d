"""`discoalign bon`: best-of-n selection by `mean - kappa * sigma` of a reward model.

Two sources of candidates:

* a **candidate file** of prompt + response rows (any layout `discoalign score` reads); rows with the same prompt
  (messages, system included) compete;
* a **policy** and a prompt file: N responses are sampled per prompt (`--n`, `--max-new-tokens`, `--temperature`,
  seeded) and scored where the reward model was trained to read them (the template's turn end appended after
  the stop token, `data.position`), exactly as PPO scores them.

`sigma` is the square root of the reward model's total variance: Disco's aleatoric variance plus the epistemic
term (`epistemic: token_novelty`); `--kappa 0` selects by the mean. The output holds one JSON line per prompt:
`messages` (prompt + the selected response, ready as SFT data: rejection sampling), `prompt`, `response`, its
scores and `objective`, and `candidates` with every candidate's text and scores.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from ..config.plan import HeadPlan
from ..config.schema import DataArguments, FinetuningArguments, ModelArguments
from ..data import get_dataset
from ..data.pipeline import PROMPTS_TO_SAMPLE
from ..data.position import turn_end_suffix
from ..data.prompts import left_pad
from ..errors import ConfigError, DataError
from ..models.checkpoint import has_epistemic
from ..models.generation import stop_token_ids, truncate_at_stop
from ..models.loader import load_model_with_heads
from ..models.reward_model import score_responses_detailed
from .score import (
    check_reward_model_dir,
    encode_rows,
    load_reward_model_for_scoring,
    read_prompt_response_rows,
    score_token_pairs,
)

logger = logging.getLogger(__name__)


@dataclass
class BonSummary:
    prompts: int
    candidates: int
    skipped: dict[str, int]


def objective(score: dict[str, float], kappa: float) -> float:
    """`mean - kappa * sigma` (sigma 0 for a model without variance)."""
    return score["mean"] - kappa * score.get("sigma", 0.0)


def select_best(groups: list[list[dict[str, Any]]], kappa: float) -> list[dict[str, Any]]:
    """For each group of scored candidates (dicts with `mean`, optional `sigma`), the output row of the best one.

    Ties go to the earlier candidate. Each candidate gets its `objective`.
    """
    out = []
    for candidates in groups:
        for c in candidates:
            c["objective"] = objective(c, kappa)
        best = max(range(len(candidates)), key=lambda i: (candidates[i]["objective"], -i))
        chosen = candidates[best]
        scores = {k: chosen[k] for k in ("mean", "aleatoric_variance", "epistemic_variance", "variance", "sigma",
                                         "objective") if k in chosen}  # fmt: skip
        out.append({
            "messages": chosen["prompt_messages"] + [{"role": "assistant", "content": chosen["text"]}],
            "prompt": chosen["prompt_messages"][-1]["content"], "response": chosen["text"], **scores,
            "best_index": best, "num_candidates": len(candidates),
            "candidates": [{k: v for k, v in c.items() if k != "prompt_messages"} for c in candidates],
        })  # fmt: skip
    return out


def _write(rows: list[dict[str, Any]], out_path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _check_kappa(kappa: float, has_variance: bool, epistemic: bool, model_dir: str) -> None:
    if kappa < 0 or not math.isfinite(kappa):
        raise ConfigError(f"--kappa {kappa}: it must be a finite number >= 0.")
    if kappa > 0 and not (has_variance or epistemic):
        raise ConfigError(
            f"--kappa {kappa} subtracts the reward model's sigma, but `--model {model_dir}` has no variance head and "
            "no epistemic term (a scalar reward model). Use --kappa 0, or a Disco reward model / one trained with "
            "`epistemic: token_novelty`."
        )


def rerank_file(
    model_dir: str, candidates_path: str, out_path: str, kappa: float = 1.0, cutoff_len: int = 1024,
    batch_size: int = 16, skip_invalid_rows: bool = False,
) -> BonSummary:  # fmt: skip
    """Best-of-n over a candidate file of prompt + response rows; writes one line per prompt."""

    has_variance = check_reward_model_dir(model_dir)
    _check_kappa(kappa, has_variance, has_epistemic(model_dir), model_dir)
    rows, skipped, total, prompt_response = read_prompt_response_rows(candidates_path, skip_invalid_rows)
    if not prompt_response:
        raise DataError(
            f"{candidates_path!r} does not hold prompt + response rows (`prompt` + `response` / `completion` / "
            "`output`, alpaca `instruction` + `output`, or `messages` ending with the assistant's turn); best-of-n "
            "compares the responses that share a prompt."
        )
    model, tokenizer = load_reward_model_for_scoring(model_dir, has_variance)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    groups: dict[str, list[dict[str, Any]]] = {}
    items, metas = [], []
    for row, encoded in encode_rows(tokenizer, rows, cutoff_len, skipped):
        items.append(encoded)
        metas.append({"index": row["index"], "text": row["response"][0]["content"], "prompt_messages": row["prompt"],
                      **row["extra"]})  # fmt: skip
    if not items:
        raise DataError(f"No candidate of {candidates_path!r} is left to score ({dict(skipped) or 'none skipped'}).")
    for meta, score in zip(metas, score_token_pairs(model, items, pad, batch_size)):
        groups.setdefault(json.dumps(meta["prompt_messages"], sort_keys=True), []).append({**meta, **score})
    if skipped:
        logger.warning("Skipped %d of %d candidate rows: %s.", sum(skipped.values()), total,
                       ", ".join(f"{n} {reason}" for reason, n in skipped.items()))  # fmt: skip
    best = select_best(list(groups.values()), kappa)
    _write(best, out_path)
    return BonSummary(len(best), len(items), dict(skipped))


@torch.no_grad()
def sample_and_select(
    model_dir: str, policy_dir: str, prompts_path: str, out_path: str, n: int = 8, kappa: float = 1.0,
    max_new_tokens: int = 64, temperature: float = 1.0, cutoff_len: int = 1024, batch_size: int = 16,
    seed: int = 0, skip_invalid_rows: bool = False,
) -> BonSummary:  # fmt: skip
    """Sample `n` responses per prompt from `policy_dir`, score them with the reward model, keep the best."""
    from transformers import GenerationConfig

    if n < 1:
        raise ConfigError(f"--n {n}: sample at least one response per prompt.")
    if temperature <= 0 or max_new_tokens < 1:
        raise ConfigError("--temperature must be positive and --max-new-tokens at least 1.")
    has_variance = check_reward_model_dir(model_dir)
    _check_kappa(kappa, has_variance, has_epistemic(model_dir), model_dir)
    policy, tokenizer = load_model_with_heads(
        ModelArguments(model_name_or_path=policy_dir), FinetuningArguments(stage="ppo", reward_model=model_dir),
        heads=HeadPlan.of(), is_trainable=False,
    )  # fmt: skip
    reward_model, reward_tokenizer = load_reward_model_for_scoring(model_dir, has_variance)
    if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"`--model {model_dir}` uses a tokenizer different from the policy's (`--policy "
                          f"{policy_dir}`); both must share one tokenizer.")  # fmt: skip
    bundle = get_dataset(
        DataArguments(dataset=prompts_path, cutoff_len=cutoff_len, skip_invalid_rows=skip_invalid_rows),
        tokenizer, stage="ppo", seed=seed, purpose=PROMPTS_TO_SAMPLE,
    )  # fmt: skip
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"The tokenizer of `--policy {policy_dir}` has no pad token; set one (e.g. the EOS token).")
    pad = int(tokenizer.pad_token_id)
    stops = stop_token_ids(tokenizer, getattr(policy.causal_lm, "generation_config", None))
    suffix = turn_end_suffix(tokenizer, stops)
    config = GenerationConfig(
        do_sample=True, max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0,
        repetition_penalty=1.0, num_beams=1, eos_token_id=stops, pad_token_id=pad, use_cache=True,
    )  # fmt: skip
    device = policy.device
    torch.manual_seed(seed)
    groups = []
    per_batch = max(1, batch_size // n)
    rows = list(bundle.train)
    for start in range(0, len(rows), per_batch):
        chunk = rows[start : start + per_batch]
        prompt_ids = [r["prompt_input_ids"] for r in chunk for _ in range(n)]
        query_ids, query_mask = left_pad(prompt_ids, pad)
        query_ids, query_mask = query_ids.to(device), query_mask.to(device)
        generated = policy.backbone.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=config)
        response_ids, response_mask, ended = truncate_at_stop(generated[:, query_ids.shape[1] :], stops, pad)
        scores = score_responses_detailed(
            reward_model, query_ids, query_mask, response_ids, response_mask, ended, suffix, pad
        )
        for p, row in enumerate(chunk):
            candidates = []
            for j in range(n):
                k = p * n + j
                text = tokenizer.decode(response_ids[k][response_mask[k].bool()], skip_special_tokens=True)
                c: dict[str, Any] = {"text": text, "ended": bool(ended[k]), "prompt_messages": row["prompt"]}
                c.update(scores.item(k))
                candidates.append(c)
            groups.append(candidates)
    best = select_best(groups, kappa)
    _write(best, out_path)
    return BonSummary(len(best), len(best) * n, dict(Counter(bundle.stats)))
