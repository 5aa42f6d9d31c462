#!/usr/bin/env bash
# GPU measurements of the engine on a SmolLM2-135M-shaped model with random weights.
# On the device machine, from the repo root, after the wheels are installed into /tmp/site:
#   bash scripts/gpu/run_all.sh
# Knobs (environment): STEPS=30 SEQ=2048 GPUS=1 PRECISION=bf16 RUNS="lora-gc qlora-gc lora-nogc qlora-nogc"
#   RUN_TIMEOUT=130 (seconds per job) ROWS=600 (synthetic dataset rows)
set -u
ROOT=$(pwd)
OUTDIR=${OUT:-/tmp/gpu-out}
RES=/tmp/gpu-results
export USF_HOME=${USF_HOME:-/tmp/usfhome-gpu}
export PYTHONPATH=${PYTHONPATH:-}:$ROOT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STEPS=${STEPS:-30}; SEQ=${SEQ:-2048}; GPUS=${GPUS:-1}; PRECISION=${PRECISION:-bf16}
RUNS=${RUNS:-"lora-gc qlora-gc lora-nogc qlora-nogc"}; RUN_TIMEOUT=${RUN_TIMEOUT:-130}; ROWS=${ROWS:-600}
rm -rf "$RES" "$USF_HOME"; mkdir -p "$RES" "$OUTDIR" "$USF_HOME/data/uploads"
T0=$(date +%s)

echo "== environment"
(nvidia-smi || echo "nvidia-smi failed") 2>&1 | tee "$RES/nvidia-smi.txt"
python3 - <<'PY' 2>&1 | tee "$RES/versions.txt"
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "pydantic", "pydantic_core",
             "pydantic_settings", "typer", "safetensors", "tokenizers"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as err:  # report, go on
        print(name, "IMPORT FAILED:", type(err).__name__, err)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY

echo "== model and data"
MODEL="$USF_HOME/models/HuggingFaceTB--SmolLM2-135M-Instruct"
python3 scripts/gpu/make_random_model.py .gpu/smollm2-config "$MODEL" 2>&1 | tee "$RES/model.txt"
python3 scripts/gpu/make_chat_dataset.py "$USF_HOME/data/uploads/synthetic-chat.jsonl" "$ROWS"
cp .gpu/demo-velmora.jsonl "$USF_HOME/data/uploads/"
echo "setup took $(( $(date +%s) - T0 )) s"

for run in $RUNS; do
  case $run in
    lora-*) quant=none ;; qlora-*) quant=4bit ;; *) echo "unknown run $run"; continue ;;
  esac
  case $run in *-nogc) gc=false ;; *) gc=true ;; esac
  cat > "$RES/$run.yaml" <<YAML
name: $run
base_model: HuggingFaceTB--SmolLM2-135M-Instruct
dataset: $USF_HOME/data/uploads/synthetic-chat.jsonl
dataset_format: auto
hyperparameters:
  max_steps: $STEPS
  batch_size: 4
  gradient_accumulation_steps: 4
  max_seq_length: $SEQ
  quantization: $quant
  packing: true
  gradient_checkpointing: $gc
  precision: $PRECISION
  eval_steps: 10
  save_steps: 10
gpu_config: {num_gpus: $GPUS}
YAML
  echo "== $run (quantization $quant, gradient_checkpointing $gc)"
  start=$(date +%s)
  timeout -k 10 "$RUN_TIMEOUT" python3 scripts/gpu/usf.py train "$RES/$run.yaml" --quiet > "$RES/$run.stdout" 2>&1
  rc=$?
  echo "$rc" > "$RES/$run.rc"
  echo "exit $rc after $(( $(date +%s) - start )) s"; tail -n 5 "$RES/$run.stdout"
done

echo "== collecting"
cp -r "$USF_HOME/data/logs" "$RES/logs" 2>/dev/null
(cd "$USF_HOME/data" && find output checkpoints -printf '%p %s\n' 2>/dev/null | sort) > "$RES/output-listing.txt"
for f in "$USF_HOME"/data/output/*/training_args.json; do [ -f "$f" ] && { echo "== $f"; cat "$f"; echo; }; done > "$RES/training_args.txt"
python3 scripts/gpu/summarize.py "$USF_HOME" "$RES" $RUNS
tar -czf "$OUTDIR/results.tar.gz" -C "$(dirname "$RES")" "$(basename "$RES")"
cp "$RES/summary.txt" "$OUTDIR/summary.txt"
echo "total $(( $(date +%s) - T0 )) s"
