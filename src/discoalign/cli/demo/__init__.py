"""`discoalign demo`: the main jobs on the built-in tiny model and built-in data, compared in tables. One module per
part (`rm`, `dpo`, `ppo`); each run is configured and checked as `discoalign train` does it (`cli.run_config`)."""

from __future__ import annotations

import os
from typing import Any

from ...errors import ConfigError
from ...eval.report import print_table
from .dpo import run_dpo_grid_demo
from .ppo import run_ppo_demo
from .rm import run_rm_demo


def run_demo(output_root: str = "saves/demo", parts: str = "rm,dpo,ppo") -> None:
    """Run the requested demo parts and print their tables."""
    wanted = {p.strip() for p in parts.split(",") if p.strip()}
    unknown = wanted - {"rm", "dpo", "ppo"}
    if unknown:
        raise ConfigError(f"--parts names unknown demo part(s) {sorted(unknown)}; the parts are rm, dpo and ppo.")
    tables: list[tuple[str, list[dict[str, Any]]]] = []
    if "rm" in wanted:
        rows = run_rm_demo(output_root)
        tables.append(("Reward models on held-out builtin:synthetic (BT vs Disco)", rows))
    if "dpo" in wanted:
        tables.append(("DPO grid on builtin:synthetic", run_dpo_grid_demo(os.path.join(output_root, "dpo"))))
    if "ppo" in wanted:
        tables.append(("PPO against BT and Disco reward models", run_ppo_demo(os.path.join(output_root, "ppo"))))
    for title, rows in tables:
        print_table(title, rows)
    print(f"\nRuns, metrics, predictions and plots are under {os.path.abspath(output_root)}/")
