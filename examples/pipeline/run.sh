#!/usr/bin/env bash
# SFT -> RM -> PPO and SFT -> DPO, each step's output the next step's input (docs/pipeline.md).
# Run from the repository root; steps 5-6 read ../shared/data through examples/pipeline/data/dataset_info.json.
# tests/test_pipeline.py runs these same lines, shortened with key=value overrides.
set -euo pipefail
DISCOALIGN=${DISCOALIGN:-discoalign}

# built-in data: the synthetic task, whose true reward is known
$DISCOALIGN train examples/pipeline/1_sft.yaml
$DISCOALIGN train examples/pipeline/2_rm.yaml
$DISCOALIGN train examples/pipeline/3_ppo.yaml
$DISCOALIGN train examples/pipeline/4_dpo.yaml
$DISCOALIGN export --model saves/pipeline/rm --out saves/pipeline/rm_seq_cls --layout seq_cls

# shared data (LlamaFactory's alpaca_en_demo and dpo_en_demo), by registry name
$DISCOALIGN train examples/pipeline/5_sft_alpaca.yaml
$DISCOALIGN export --model saves/pipeline/sft_alpaca --out saves/pipeline/sft_alpaca_merged
$DISCOALIGN train examples/pipeline/6_dpo_en_demo.yaml

# serve the reward model to an RL framework (blocks; Ctrl-C to stop):
#   $DISCOALIGN serve --model saves/pipeline/rm --port 8000
