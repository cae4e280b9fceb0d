#!/usr/bin/env bash
# GPU verification of issue 13, prepared on a CPU-only machine and NOT yet run (docs/distributed.md says so).
# One go, about 30 minutes on one H100-class GPU; every result lands in benchmarks/results/gpu_check_<device>/:
#
#   bash benchmarks/gpu_check.sh            # from the repository root, with the project's venv active
#
# 1. bf16 `rm` (Disco), `dpo` (dynamic beta) and `ppo` at the qwen-0.5b preset (random weights, our tokenizer),
#    with attn_implementation sdpa, then flash_attention_2 (our loader falls back to sdpa when flash-attn is not
#    installed: the log says which ran).
# 2. The same `rm` and `dpo` under DeepSpeed ZeRO-2 and ZeRO-3 on this one GPU (torchrun, 1 process: ZeRO on one
#    device exercises the engine, sharded saves and resumes; the 2-process numbers are the CPU tests').
# 3. benchmarks/bench_vs_trl.py at real shapes (issue 23): SmolLM2-135M-Instruct's shape (random weights unless the
#    model was pulled), rm / dpo / dpo_precomputed x LoRA / full x cutoff 256 / 512, bf16 autocast; MFU against
#    the bf16 matmul throughput the script measures on this GPU at start (its peak, not the datasheet's); peak GPU
#    memory ours vs TRL. Then the qwen-0.5b preset at cutoff 1024, and the log-prob memory bench at a 49k and a
#    152k vocabulary. Results: benchmarks/results/gpu_check_<device>/bench_*.json (commit them with the docs).
# QLoRA 4-bit is not part of it: discoalign refuses `quantization_bit` (config/aliases.py), so there is nothing to
# verify until quantised training exists.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))") || { echo "no CUDA device"; exit 1; }
OUT=benchmarks/results/gpu_check_${DEVICE}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
SUMMARY="$OUT/summary.txt"
{ date -u; echo "device: $DEVICE"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
  "$PY" -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" 2>/dev/null; \
  "$PY" -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null || echo "flash-attn: not installed (flash_attention_2 falls back to sdpa)"; } > "$SUMMARY"

# The qwen-0.5b-preset model (random weights, seed 0) the benchmark uses, saved once.
"$PY" - "$WORK" <<'EOF' || exit 1
import sys
sys.path.insert(0, "benchmarks")
from bench_vs_trl import build_models
print(build_models(sys.argv[1], "qwen-0.5b"))
EOF
MODEL="$WORK/policy"

run() {  # run NAME [discoalign train args...]: log, exit code, wall time and peak memory into the summary
  local name=$1 start rc
  shift
  start=$(date +%s)
  timeout "${TIMEOUT:-900}" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - start )) $(grep -o "'loss': '[^']*'" "$OUT/$name.log" | tail -1)" >> "$SUMMARY"
}

COMMON=("model_name_or_path=$MODEL" dataset=builtin:synthetic synthetic_num_pairs=256 cutoff_len=1024 bf16=true
  per_device_train_batch_size=4 max_steps=20 logging_steps=5 save_strategy=no plot_loss=false overwrite_output_dir=true)
RM="examples/rm_disco.yaml"
DPO="examples/dpo_disco_dynamic_beta.yaml"
for attn in sdpa flash_attention_2; do
  run "rm_$attn" "$PY" -m discoalign train "$RM" "${COMMON[@]}" "attn_implementation=$attn" "output_dir=$WORK/rm_$attn"
  run "dpo_$attn" "$PY" -m discoalign train "$DPO" "${COMMON[@]}" "attn_implementation=$attn" "output_dir=$WORK/dpo_$attn"
done
# PPO needs a reward model: the sdpa rm run just trained one.
run "ppo_sdpa" "$PY" -m discoalign train examples/ppo.yaml "model_name_or_path=$MODEL" "reward_model=$WORK/rm_sdpa" \
  bf16=true max_steps=10 logging_steps=5 save_strategy=no plot_loss=false overwrite_output_dir=true "output_dir=$WORK/ppo"

for zero in 2 3; do
  for stage in rm dpo; do
    if [ "$stage" = rm ]; then yaml=$RM; else yaml=$DPO; fi
    run "${stage}_zero${zero}" torchrun --standalone --nproc_per_node 1 -m discoalign train "$yaml" "${COMMON[@]}" \
      "deepspeed=examples/deepspeed/ds_z${zero}_config.json" save_strategy=steps save_steps=10 \
      "output_dir=$WORK/${stage}_z${zero}"
    run "${stage}_zero${zero}_resume" torchrun --standalone --nproc_per_node 1 -m discoalign train "$yaml" "${COMMON[@]}" \
      "deepspeed=examples/deepspeed/ds_z${zero}_config.json" "resume_from_checkpoint=$WORK/${stage}_z${zero}/checkpoint-10" \
      "output_dir=$WORK/${stage}_z${zero}_resume"
  done
done

# Real shapes (issue 23): bf16 on the GPU, MFU against the measured bf16 matmul peak, peak GPU memory ours vs TRL.
TIMEOUT=1800 run "bench_smollm2_135m" "$PY" benchmarks/bench_vs_trl.py --preset smollm2-135m --reps 5 --steps 2 \
  --warmup 2 --json "$OUT/bench_compare_cuda_smollm2_135m.json"
run "bench_qwen_0_5b" "$PY" benchmarks/bench_vs_trl.py --preset qwen-0.5b --cutoffs 1024 --batch 4 \
  --json "$OUT/bench_compare_cuda_qwen_0_5b.json"
run "bench_quick" "$PY" benchmarks/bench_vs_trl.py --quick --json "$OUT/bench_quick_cuda.json"
for vocab in 49152 151936; do
  run "logps_memory_$vocab" "$PY" benchmarks/logps_memory.py --vocab "$vocab" --json "$OUT/logps_memory_$vocab.json"
done
cat "$SUMMARY"
echo "Results in $OUT (commit them; docs/distributed.md names what was verified, with the date and device)."
