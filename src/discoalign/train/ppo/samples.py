"""Sample generations: a few rollouts per logged step, appended to `output_dir/samples.jsonl` and shown in a table."""

from __future__ import annotations

import json
import os
from typing import Any

from ...eval.report import print_table

SAMPLES_FILE = "samples.jsonl"


def append_samples(path: str, step: int, rows: list[dict[str, Any]]) -> None:
    """Append one JSON line per sample, tagged with the PPO step."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"step": step, **row}) + "\n")


def show_samples(title: str, rows: list[dict[str, Any]]) -> None:
    """Print samples as a `rich` table (prompt and response shortened to one line)."""

    def short(text: str, width: int) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 1] + "…"

    table = []
    for row in rows:
        entry = {"prompt": short(row["prompt"], 50), "response": short(row["response"], 60)}
        entry["score"] = f"{row['score']:.3f}"
        if row.get("variance") is not None:
            entry["variance"] = f"{row['variance']:.3f}"
        entry["kl"] = f"{row['kl']:.3f}"
        if row.get("true_reward") is not None:
            entry["true reward"] = f"{row['true_reward']:.3f}"
        table.append(entry)
    print_table(title, table)
