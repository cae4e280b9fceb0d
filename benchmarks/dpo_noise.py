"""Noisy-label benchmark of the DPO family on `builtin:synthetic-noisy:<profile>` (docs/noisy_labels.md).

The true reward of every response is known, so each trained policy is scored by how often its implicit reward
margin d orders held-out pairs the way the *true* reward does. Two splits (issue 21):

* `--split dev`: seeds 0-2 on the development profiles (imbalanced, margin). Every tuned row tries the settings of
  its grid (the same budget, `dpo_noise_rows.GRID_SIZE`, for baselines and the project's methods); the setting
  with the best mean true-preference accuracy over the dev runs is chosen.
* `--split report`: seeds 3-7 on all five profiles, each row at the setting chosen on dev (`--dev-json`); nothing
  is decided on it.

    python benchmarks/dpo_noise.py --split dev --json benchmarks/results/dpo_noise_dev.json
    python benchmarks/dpo_noise.py --split report --dev-json benchmarks/results/dpo_noise_dev.json \\
        --json benchmarks/results/dpo_noise_report.json
    python benchmarks/dpo_noise.py --summarise benchmarks/results/dpo_noise_report.json --markdown out.md

`--rows`, `--profiles`, `--seeds` restrict a run (several processes can split the work; `--summarise` merges their
JSON files). Every row starts from the same `builtin:tiny-qwen3`, sees the same pairs in the same order for a seed
and profile, and trains the same steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from dpo_noise_rows import REPORT_PLAN, ROWS, wrap_trainer

from discoalign.config.loader import build_config
from discoalign.data.synthetic_noise import PROFILES, profile_rows
from discoalign.eval.calibration import spearman
from discoalign.train.dpo.metric import PREDICTION_COLUMNS
from discoalign.train.dpo.workflow import build_dpo_trainer

SPLITS = {"dev": ((0, 1, 2), ("imbalanced", "margin")), "report": ((3, 4, 5, 6, 7), tuple(PROFILES))}
BASE: dict[str, Any] = {
    "stage": "dpo",
    "model_name_or_path": "builtin:tiny-qwen3",
    "cutoff_len": 64,
    "pref_beta": 0.1,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 128,
    "learning_rate": 1.0e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 8,
    "logging_steps": 10,
    "save_strategy": "no",
    "do_train": True,
    "do_eval": False,
    "disable_tqdm": True,
    "plot_loss": False,
    "report_to": "none",
}


def per_context(values: np.ndarray, contexts: np.ndarray, order: list[str]) -> list[float]:
    return [float(values[contexts == c].mean()) for c in order]


def run_one(key: str, setting: dict[str, Any], profile: str, seed: int, ns) -> dict[str, Any]:
    """Train row `key` at `setting` on `profile` for `seed`; evaluate on the next seed's pairs."""
    row = ROWS[key]
    dataset = f"builtin:synthetic-noisy:{profile}"
    raw = {
        **BASE, **row.keys, **setting, "dataset": dataset, "eval_dataset": dataset, "seed": seed,
        "synthetic_seed": 1000 * seed, "synthetic_num_pairs": ns.pairs, "num_train_epochs": ns.epochs,
        "output_dir": os.path.join(ns.out, f"{key}_{profile}_seed{seed}"),
        **dict(kv.split("=", 1) for kv in ns.set),
    }  # fmt: skip
    cfg = build_config(raw, source=f"benchmarks/dpo_noise.py row {row.label!r}")
    start = time.time()
    trainer, _ = build_dpo_trainer(cfg)
    wrap_trainer(trainer, row.wrap)
    trainer.train()
    wall = time.time() - start
    out = trainer.predict(trainer.eval_dataset)
    pred = np.asarray(out.predictions, dtype=np.float64)
    labels = np.asarray(out.label_ids, dtype=np.float64)
    cols = {c: pred[:, i] for i, c in enumerate(PREDICTION_COLUMNS)}
    eval_rows = profile_rows(ns.pairs, 1000 * seed + 1, profile)  # the eval set, in order: its contexts
    assert len(eval_rows) == len(pred) and np.allclose([r["noise"] for r in eval_rows], labels[:, 2], atol=1e-6)
    contexts = np.array([r["topic"] for r in eval_rows])
    noise = labels[:, 2]
    order = sorted(set(contexts.tolist()), key=lambda c: (noise[contexts == c].mean(), c))
    d, truth = cols["implicit_margin"], labels[:, 0] - labels[:, 1]
    correct = (np.sign(d) == np.sign(truth)).astype(np.float64)
    m: dict[str, Any] = {"row": key, "setting": setting, "profile": profile, "seed": seed, "wall": wall}
    m["acc"] = float(correct.mean())
    m["contexts"], m["true_flip_per_context"] = order, per_context(noise, contexts, order)
    m["acc_per_context"] = per_context(correct, contexts, order)
    m["true_mean_flip"] = float(noise.mean())
    for name, column in (("beta", cols["beta"]), ("flip", cols["flip_rate"])):
        if np.isnan(column).all() or row.wrap == "oracle_flip":
            continue
        means = per_context(column, contexts, order)
        m[f"{name}_per_context"], m[f"{name}_mean"] = means, float(column.mean())
        if len(set(m["true_flip_per_context"])) > 1 and np.ptp(means) > 0:
            m[f"{name}_spearman"] = spearman(np.array(means), np.array(m["true_flip_per_context"]))
    return m


def dev_scores(dev_files: list[str]) -> dict[str, tuple[dict[str, dict[tuple, float]], set[tuple]]]:
    """Per row: {setting (JSON): {(profile, seed): accuracy}} and the (profile, seed) runs every setting has."""
    runs = [r for path in dev_files if os.path.exists(path) for r in json.load(open(path, encoding="utf-8"))["runs"]]
    scores: dict[str, dict[str, dict[tuple, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in runs:
        scores[r["row"]][json.dumps(r["setting"], sort_keys=True)][(r["profile"], r["seed"])] = r["acc"]
    return {row: (dict(by), set.intersection(*(set(v) for v in by.values()))) for row, by in scores.items()}


def chosen_settings(dev_files: list[str]) -> dict[str, dict[str, Any]]:
    """Per row, the grid setting with the best mean true-preference accuracy over the dev runs that every setting of
    the row has (the same profiles and seeds, also when a sweep was cut short)."""
    chosen = {}
    for row, (by_setting, common) in dev_scores(dev_files).items():
        if common:
            best = max(by_setting, key=lambda k: statistics.mean(by_setting[k][c] for c in common))
            chosen[row] = json.loads(best)
    return chosen


def dev_table(dev_files: list[str]) -> str:
    """Markdown: per row and setting, the mean dev accuracy over the runs every setting of the row has, per profile
    and over all; the chosen setting in bold."""
    chosen = chosen_settings(dev_files)
    lines = ["| row | setting | runs | imbalanced | margin | mean |", "|---|---|---|---|---|---|"]
    scores = dev_scores(dev_files)
    for row in [r for r in ROWS if r in scores]:
        by_setting, common = scores[row]
        for setting, acc in by_setting.items():
            per = {p: [acc[c] for c in common if c[0] == p] for p in SPLITS["dev"][1]}
            mark = "**" if json.loads(setting) == chosen.get(row) and len(by_setting) > 1 else ""
            cells = " | ".join(f"{statistics.mean(v):.3f}" if v else "-" for v in per.values())
            lines.append(f"| {ROWS[row].label} | {mark}{setting}{mark} | {len(common)} | {cells} | "
                         f"{mark}{statistics.mean(acc[c] for c in common):.3f}{mark} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def mean_sd(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def load_runs(files: list[str], dev_files: list[str]) -> list[dict[str, Any]]:
    """Every run in `files`; with `dev_files`, only the runs at the setting each row would run at on the report split
    (chosen on dev; a combination row, its parts' settings), so a row's superseded settings drop out."""
    runs = [r for path in files for r in json.load(open(path, encoding="utf-8"))["runs"]]
    if not dev_files:
        return runs
    wanted = {key: setting for key, setting, _, _ in jobs("report", list(ROWS), ["-"], [0], chosen_settings(dev_files),
                                                        False)}  # fmt: skip
    return [r for r in runs if r["setting"] == wanted[r["row"]]]


def summarise(runs: list[dict[str, Any]]) -> str:
    """Markdown: per profile, per row and setting, accuracy mean ± sd, every seed, the difference to DPO per seed, and
    the heads' correlations with the true flip rate."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["profile"], r["row"], json.dumps(r["setting"], sort_keys=True))].append(r)
    lines = []
    for profile in [p for p in PROFILES if any(k[0] == p for k in groups)]:
        dpo = {r["seed"]: r["acc"] for k, rs in groups.items() if k[:2] == (profile, "dpo") for r in rs}
        lines += [f"\n### {profile}\n", "| row | setting | true-pref acc. | per seed | minus DPO per seed | "
                  "e~flip (Spearman) | mean e / true | beta~flip |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for (p, key, setting), rs in sorted(groups.items(), key=lambda kv: list(ROWS).index(kv[0][1])):
            if p != profile:
                continue
            rs = sorted(rs, key=lambda r: r["seed"])
            seeds = " / ".join(f"{r['acc']:.3f}" for r in rs)
            diff = " / ".join(f"{r['acc'] - dpo[r['seed']]:+.3f}" if r["seed"] in dpo else "-" for r in rs)
            flip = mean_sd([r.get("flip_spearman") for r in rs], 2)
            e = f"{mean_sd([r.get('flip_mean') for r in rs])} / {mean_sd([r['true_mean_flip'] for r in rs])}"
            beta = mean_sd([r.get("beta_spearman") for r in rs], 2)
            label = f"{ROWS[key].label} (seeds {', '.join(str(r['seed']) for r in rs)})"
            lines.append(f"| {label} | {setting} | {mean_sd([r['acc'] for r in rs])} | {seeds} | {diff} | {flip} | "
                         f"{e if 'flip_mean' in rs[0] else '-'} | {beta} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def acceptance(runs: list[dict[str, Any]]) -> str:
    """Issue 21's targets on `runs` (the report split): per profile, the best of the project's rows against the best
    baseline and DPO, per seed; the flip-rate head's Spearman and mean e."""
    acc: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for r in runs:
        acc[(r["profile"], r["row"])][r["seed"]] = r["acc"]
    lines = ["\n### Targets\n"]
    for profile in [p for p in PROFILES if any(k[0] == p for k in acc)]:
        rows = {k[1]: v for k, v in acc.items() if k[0] == profile}

        def best(kind: str, rows=rows) -> str | None:
            keys = [k for k in rows if ROWS[k].kind == kind]
            return max(keys, key=lambda k: statistics.mean(rows[k].values())) if keys else None

        ours, base = best("ours"), best("baseline")
        for other in [o for o in dict.fromkeys((base, "dpo")) if o in rows and ours and o != ours]:
            seeds = sorted(set(rows[ours]) & set(rows[other]))
            diffs = [rows[ours][s] - rows[other][s] for s in seeds]
            if diffs:
                lines.append(f"* {profile}: best ours {ROWS[ours].label} minus {ROWS[other].label}: "
                             f"{statistics.mean(diffs):+.3f} (per seed {' / '.join(f'{d:+.3f}' for d in diffs)}; "
                             f"ahead on {sum(d > 0 for d in diffs)} of {len(diffs)})")  # fmt: skip
    for r in sorted((r for r in runs if r["row"] == "flip"), key=lambda r: (r["profile"], r["seed"])):
        lines.append(f"* flip head, {r['profile']} seed {r['seed']}: Spearman(e, flip) {r.get('flip_spearman', 'n/a')}, "
                     f"mean e {r.get('flip_mean', float('nan')):.3f} vs true {r['true_mean_flip']:.3f}")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=list(SPLITS), default="dev")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--profiles", nargs="+", default=None, choices=list(PROFILES), help="default: the split's")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the split's")
    parser.add_argument("--dev-json", nargs="*", default=[], help="the dev results to choose settings from")
    parser.add_argument("--pairs", type=int, default=3000, help="training pairs (eval: as many, next seed)")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--out", default="saves/dpo_noise")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write every run to this file (rewritten after each run)")
    parser.add_argument("--summarise", nargs="*", default=None, help="only summarise these JSON files")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--dev-table", action="store_true", help="only print the dev grid of --dev-json, and choices")
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run (exploration)")
    parser.add_argument("--worker", default="0/1", help="k/n: run every n-th job from the k-th (parallel processes)")
    parser.add_argument("--plan", action="store_true", help="report split: the jobs of REPORT_PLAN, in its order")
    ns = parser.parse_args()
    if ns.dev_table:
        print(dev_table(ns.dev_json))
        return
    if ns.summarise is not None:
        runs = load_runs(ns.summarise, ns.dev_json)
        text = summarise(runs) + acceptance(runs)
        print(text)
        if ns.markdown:
            with open(ns.markdown, "w", encoding="utf-8") as f:
                f.write(text)
        return
    torch.set_num_threads(ns.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seeds, profiles = SPLITS[ns.split]
    seeds, profiles = ns.seeds or seeds, ns.profiles or profiles
    chosen = chosen_settings(ns.dev_json) if ns.split == "report" else {}
    worker, workers = (int(x) for x in ns.worker.split("/"))
    todo = jobs(ns.split, ns.rows, profiles, seeds, chosen, ns.plan)[worker::workers]
    runs = []
    for key, setting, profile, seed in todo:
        try:
            runs.append(run_one(key, setting, profile, seed, ns))
        except Exception as e:  # noqa: BLE001 - one failed run must not cost the sweep; it is reported and skipped
            print(json.dumps({"row": key, "setting": setting, "profile": profile, "seed": seed, "error": repr(e)}))
            continue
        print(json.dumps({k: v for k, v in runs[-1].items() if not isinstance(v, list)}), flush=True)
        if ns.json:
            os.makedirs(os.path.dirname(ns.json) or ".", exist_ok=True)
            with open(ns.json + ".tmp", "w", encoding="utf-8") as f:  # replaced whole: a killed sweep leaves valid JSON
                json.dump({"split": ns.split, "args": vars(ns), "chosen": chosen, "runs": runs}, f)
            os.replace(ns.json + ".tmp", ns.json)


def jobs(split, rows, profiles, seeds, chosen, use_plan: bool) -> list[tuple[str, dict, str, int]]:
    """(row, setting, profile, seed) in the order to run: dev, every grid setting of every row; report, the chosen
    setting (a combination row: its parts' settings merged), by `REPORT_PLAN` when `use_plan`."""
    if split == "dev":
        # seed-major, so that a sweep cut short has every row's every setting on the same seeds
        return [(k, st, p, s) for s in seeds for p in profiles for k in rows for st in ROWS[k].grid]

    def setting(key: str) -> dict:
        if ROWS[key].combines:
            return {k: v for part in ROWS[key].combines for k, v in setting(part).items()}
        return chosen.get(key, ROWS[key].grid[0])

    everything = ((tuple(profiles), tuple(rows)),)
    plan = REPORT_PLAN + everything if use_plan else everything  # the plan first, then what it does not name
    pairs = dict.fromkeys((k, p) for ps, ks in plan for p in ps for k in ks if k in rows and p in profiles)
    return [(k, setting(k), p, s) for k, p in pairs for s in seeds]


if __name__ == "__main__":
    main()
