"""The real-model proxy with a LoRA-trained backbone (docs/reward_overoptimization.md, "LoRA backbone").

Does the Laplace sigma's length correlation change when the features come from a backbone trained with the reward
model (LoRA, a few steps) instead of a frozen one? The proxy of seed 0 of `--real` (the same 100 pairs, the same
flipped labels, the same cut texts) is trained with the project's own path, `discoalign train` with
`epistemic: laplace`, and scored with `discoalign score` on the held-out responses and their length-matched alpaca
outputs:

    python benchmarks/rmo_real_lora.py data --out saves/rmo_real300
    discoalign train saves/rmo_real300/lora/rm.yaml
    discoalign score --model saves/rmo_real300/lora/rm --data saves/rmo_real300/lora/score.jsonl \\
        --out saves/rmo_real300/lora/scores.jsonl --cutoff-len 128
    python benchmarks/rmo_real_lora.py analyse --out saves/rmo_real300
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from rmo_real import MODEL, auroc, options, proxy_indices, spearman

CONFIG = """# written by benchmarks/rmo_real_lora.py: proxy seed {seed} of the real-model benchmark, LoRA backbone
stage: rm
model_name_or_path: {model}
finetuning_type: lora
lora_rank: 8
lora_alpha: 16
lora_target: all
epistemic: laplace
dataset: {train}
cutoff_len: 128
output_dir: {out}
per_device_train_batch_size: 4
max_steps: {steps}
learning_rate: {lr}
logging_steps: 2
save_strategy: "no"
seed: 42
"""


def cut_texts(o, tok) -> dict:
    """Each pair's prompt and responses as text, cut to the benchmark's token limits (the same tokens it reads)."""
    rows = json.load(open(os.path.join(o.data, "dpo_en_demo.json")))[: o.num_pairs]

    def cut(text: str, limit: int) -> str:
        return tok.decode(tok(text, add_special_tokens=False)["input_ids"][:limit])

    return {"prompt": [cut(r["conversations"][-1]["value"], o.prompt_tokens) for r in rows],
            "chosen": [cut(r["chosen"]["value"], o.response_tokens) for r in rows],
            "rejected": [cut(r["rejected"]["value"], o.response_tokens) for r in rows]}  # fmt: skip


def write_data(o, a) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(o.model)
    t = cut_texts(o, tok)
    n = o.num_pairs
    idx, flip = proxy_indices(a.seed, o, list(range(n - o.heldout)))
    folder = os.path.join(o.out, "lora")
    os.makedirs(folder, exist_ok=True)
    train = []
    for i, fl in zip(idx, flip):
        w, lo = (t["rejected"][i], t["chosen"][i]) if fl else (t["chosen"][i], t["rejected"][i])
        train.append({"conversations": [{"from": "human", "value": t["prompt"][i]}],
                      "chosen": {"from": "gpt", "value": w}, "rejected": {"from": "gpt", "value": lo}})  # fmt: skip
    json.dump(train, open(os.path.join(folder, "train.json"), "w"))
    held = list(range(n - o.heldout, n))
    rows = [{"id": f"held {k}", "prompt": t["prompt"][i], "response": t[side][i]}
            for k, (side, i) in enumerate([("chosen", i) for i in held] + [("rejected", i) for i in held])]  # fmt: skip
    texts = json.load(open(os.path.join(o.out, "texts.json")))
    for k, (p, r) in enumerate(texts["ood"][: a.ood]):
        content = tok.decode(p)  # the ChatML prompt ids: keep the user turn's text
        user = content.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
        rows.append({"id": f"ood {k}", "prompt": user, "response": tok.decode(r)})
    with open(os.path.join(folder, "score.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    cfg = CONFIG.format(seed=a.seed, model=o.model, train=os.path.abspath(os.path.join(folder, "train.json")),
                        out=os.path.abspath(os.path.join(folder, "rm")), steps=a.steps, lr=a.lr)  # fmt: skip
    open(os.path.join(folder, "rm.yaml"), "w").write(cfg)
    print(f"wrote {folder}: {len(train)} training pairs ({sum(flip)} flipped), {len(rows)} rows to score")


def analyse(o, a) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(o.model)
    folder = os.path.join(o.out, "lora")
    rows = [json.loads(x) for x in open(os.path.join(folder, "score.jsonl"))]
    scores = [json.loads(x) for x in open(os.path.join(folder, "scores.jsonl"))]
    by_id = {s["id"]: s for s in scores}
    held = [r for r in rows if r["id"].startswith("held")]
    ood = [r for r in rows if r["id"].startswith("ood")]
    sigma = {r["id"]: float(np.sqrt(by_id[r["id"]]["epistemic_variance"])) for r in rows}
    length = {r["id"]: len(tok(r["response"], add_special_tokens=False)["input_ids"]) for r in rows}
    h_sig = np.array([sigma[r["id"]] for r in held])
    h_len = np.array([length[r["id"]] for r in held], float)
    means = np.array([by_id[r["id"]]["mean"] for r in held])
    half = len(held) // 2
    cfg = json.load(open(os.path.join(folder, "rm", "heads_config.json"))).get("epistemic", {})
    res = {"seed": a.seed, "steps": a.steps, "lr": a.lr, "epistemic": cfg,
           "spearman_sigma_length_heldout": spearman(h_sig, h_len),
           "heldout_pair_accuracy": float(np.mean(means[:half] > means[half:])),
           "ood_auroc_laplace": auroc(np.array([sigma[r["id"]] for r in ood]), h_sig[: len(ood)]),
           "ood_auroc_length": auroc(np.array([length[r["id"]] for r in ood], float), h_len[: len(ood)]),
           "num_heldout": len(held), "num_ood": len(ood)}  # fmt: skip
    json.dump(res, open(os.path.join(folder, "summary.json"), "w"), indent=1)
    print(json.dumps(res, indent=1))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("data", "analyse"))
    p.add_argument("--out", default="saves/rmo_real300", help="the --real run's output folder")
    p.add_argument("--seed", type=int, default=0, help="which proxy of the --real run")
    p.add_argument("--steps", type=int, default=16, help="LoRA training steps (batch 4)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ood", type=int, default=100, help="alpaca outputs scored (the first, length-matched)")
    p.add_argument("--model", default=MODEL)
    a, rest = p.parse_known_args()
    o = options(rest + ["--model", a.model], argparse.Namespace(out=a.out, threads=1))
    (write_data if a.step == "data" else analyse)(o, a)


if __name__ == "__main__":
    main()
