"""`discoalign score`: score every response of a preference file with a trained reward model."""

from __future__ import annotations

import json
import os

import torch

from ..config.schema import DataArguments, FinetuningArguments, ModelArguments
from ..errors import CheckpointError


def _has_variance_head(model_dir: str) -> bool:
    """Whether `model_dir` holds a variance head (ours, or a DiscoRM-fork `var_head`)."""
    path = os.path.join(model_dir, "heads_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return bool(json.load(f).get("variance_head"))
    return any(os.path.isfile(os.path.join(model_dir, n)) for n in ("var_head.safetensors", "var_head.bin"))


@torch.no_grad()
def score_file(model_dir: str, data_path: str, out_path: str, cutoff_len: int = 1024, batch_size: int = 16) -> int:
    """Write one JSON line per response: `index`, `response` (chosen/rejected), `text`, `mean`, and `variance`
    for a Disco model. Returns the number of lines written."""
    from ..data import get_dataset
    from ..models.loader import load_model_with_heads

    if not os.path.isdir(model_dir):
        raise CheckpointError(f"--model {model_dir!r} is not a directory holding a reward model.")
    disco = _has_variance_head(model_dir)
    model, tokenizer = load_model_with_heads(
        ModelArguments(model_name_or_path=model_dir),
        FinetuningArguments(stage="rm", add_disco_head=disco),
        add_value_head=True,
        is_trainable=False,
    )
    model.eval()
    data = get_dataset(DataArguments(dataset=data_path, cutoff_len=cutoff_len), tokenizer, stage="rm", seed=0).train

    items = [
        (i, which, row["prompt_input_ids"] + row[f"{which}_input_ids"], row[f"{which}_input_ids"])
        for i, row in enumerate(data)
        for which in ("chosen", "rejected")
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            length = max(len(ids) for _, _, ids, _ in chunk)
            input_ids = torch.full((len(chunk), length), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), length), dtype=torch.long)
            for r, (_, _, ids, _) in enumerate(chunk):
                input_ids[r, : len(ids)] = torch.tensor(ids)
                attention_mask[r, : len(ids)] = 1
            mean, var = model.score(input_ids, attention_mask, with_variance=disco)
            for r, (index, which, _, response_ids) in enumerate(chunk):
                line = {
                    "index": index,
                    "response": which,
                    "text": tokenizer.decode(response_ids, skip_special_tokens=True),
                    "mean": float(mean[r]),
                }
                if var is not None:
                    line["variance"] = float(var[r])
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return len(items)
