#!/usr/bin/env bash
# Profile the loop for LoRA and QLoRA (gradient checkpointing on) on the SmolLM2-shaped random model.
# On the device, after the wheels are installed into /tmp/site:  bash scripts/gpu/profile.sh
# NOT YET SEEN WORKING on the GPU: the first try (3+1+3 steps, Chrome trace on) ran past 150 s per job and
# printed nothing. Now 2+1+2 steps, progress printed per step, trace only with TRACE=1, 240 s per job.
set -u
ROOT=$(pwd); OUTDIR=${OUT:-/tmp/gpu-out}; RES=/tmp/gpu-profile
export USF_HOME=${USF_HOME:-/tmp/usfhome-gpu}
export PYTHONPATH=${PYTHONPATH:-}:$ROOT PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RUNS=${RUNS:-"lora-gc qlora-gc"}
rm -rf "$RES"; mkdir -p "$RES" "$OUTDIR" "$USF_HOME/data/uploads"
MODEL="$USF_HOME/models/HuggingFaceTB--SmolLM2-135M-Instruct"
[ -f "$MODEL/model.safetensors" ] || python3 scripts/gpu/make_random_model.py .gpu/smollm2-config "$MODEL"
python3 scripts/gpu/make_chat_dataset.py "$USF_HOME/data/uploads/synthetic-chat.jsonl" 600
for run in $RUNS; do
  case $run in lora-*) quant=none ;; *) quant=4bit ;; esac
  case $run in *-nogc) gc=false ;; *) gc=true ;; esac
  cat > "$RES/$run.yaml" <<YAML
name: $run
base_model: HuggingFaceTB--SmolLM2-135M-Instruct
dataset: $USF_HOME/data/uploads/synthetic-chat.jsonl
hyperparameters: {batch_size: 4, gradient_accumulation_steps: 4, max_seq_length: 2048, quantization: $quant,
                  packing: true, gradient_checkpointing: $gc, precision: bf16}
gpu_config: {num_gpus: 1}
YAML
  echo "== profiling $run"
  timeout -k 10 ${RUN_TIMEOUT:-240} python3 scripts/gpu/profile_step.py "$RES/$run.yaml" "$RES" 2>&1 | grep --line-buffered -v 'Loading weights'
  echo "exit ${PIPESTATUS[0]}"
done
find "$RES" -name "*.trace.json.gz" -size -15M -exec cp {} "$OUTDIR"/ \;; ls -la "$RES"
cat "$RES"/*.profile.txt > "$OUTDIR/profile.txt" 2>/dev/null
