#!/usr/bin/env bash
# Device calls for issue 19, rounds 3 and 4 (carry [".speed3"]: this repo's usf_bios/tests/scripts/pyproject plus
# .dev/unsloth/site and .whl as scripts/gpu/bench_round2.sh's header builds them; the command cds into it).
# Usage: bash scripts/gpu/bench_round3.sh PART...   Each part writes its report under $OUT/<part>/ and appends to $OUT/log.
# Parts: gpu-tests; q-auto q-all q-all-merge q-offload12 q-auto80 (ours only, QLoRA); profile-q-auto;
# round 4: q-offload<GB> (offload + merged passes as on a card of GB), b-lean[<GB>] / w-lean (bf16 Llama / Qwen: the
# configured 4096-token passes, input embeddings in host memory), w-unsloth (Qwen: ours default vs Unsloth, both plans);
# q-peers / b-peers (ours default vs Unsloth, both plans, and hf-best), q-unsloth (QLoRA: ours default vs Unsloth, both plans) q-hfbest, b-unsloth (bf16) b-hfbest, b-80, q-80 (--gpu-memory 80).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.dev/unsloth/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
Q=llama3.1-8b-qlora-nf4-4096 B=llama3.1-8b-lora-bf16-4096 W=qwen2.5-7b-lora-bf16-4096
LEAN='{"merge_micro_batches":"off","host_embeddings":"on"}'

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee -a $OUT/log
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" | tee -a $OUT/log
bench() { local part=$1; shift; python3 -m usf_bios bench --timeout 200 --out $OUT/$part "$@" 2>&1 | grep -v Warning | tee -a $OUT/log; }
for part in "$@"; do
  echo "=== $part $(date -u +%T)" | tee -a $OUT/log
  case $part in
    gpu-tests) python3 -m pytest -q -p no:cacheprovider tests/engine/test_speed_gpu.py 2>&1 | tail -15 | tee -a $OUT/log ;;
    q-auto) bench $part --config $Q --side ours ;;
    q-all) bench $part --config $Q --side ours --performance '{"checkpointing":"all"}' ;;
    q-all-merge) bench $part --config $Q --side ours --performance '{"checkpointing":"all","merge_micro_batches":"on"}' ;;
    q-offload12) bench $part --config $Q --side ours --gpu-memory 12 \
                   --performance '{"checkpointing":"offload","merge_micro_batches":"on"}' ;;
    q-auto80) bench $part --config $Q --side ours --gpu-memory 80 ;;
    q-offload*) bench $part --config $Q --side ours --gpu-memory ${part#q-offload} \
                  --performance '{"checkpointing":"offload","merge_micro_batches":"on"}' ;;
    b-lean) bench $part --config $B --side ours --performance "$LEAN" ;;
    b-lean*) bench $part --config $B --side ours --gpu-memory ${part#b-lean} --performance "$LEAN" ;;
    w-lean) bench $part --config $W --side ours --performance "$LEAN" ;;
    w-unsloth) bench $part --config $W --baseline unsloth ;;
    inference) python3 scripts/bench_inference.py --model .dev/smol --random /tmp/inference-8b --shape llama-8b \
                 --device cuda --tokens 64 --streams 8 --rounds 3 > $OUT/inference.json 2> $OUT/inference.err
               tail -5 $OUT/inference.err | tee -a $OUT/log; tail -c 1500 $OUT/inference.json | tee -a $OUT/log ;;
    profile-q-auto) python3 -m usf_bios.bench.profile $Q --out $OUT/profile-q-auto.json 2>&1 | grep -v Warning \
                      | tail -45 | tee -a $OUT/log ;;
    q-peers) bench $part --config $Q --baseline unsloth --baseline hf-best ;;
    b-peers) bench $part --config $B --baseline unsloth --baseline hf-best ;;
    q-unsloth) bench $part --config $Q --baseline unsloth ;;
    q-hfbest) bench $part --config $Q --baseline hf-best ${PERF:+--performance "$PERF"} ;;
    b-unsloth) bench $part --config $B --baseline unsloth ;;
    b-hfbest) bench $part --config $B --baseline hf-best ;;
    b-80) bench $part --config $B --side ours --gpu-memory 80 ;;
    q-80) bench $part --config $Q --side ours --gpu-memory 80 ;;
  esac
done
echo "=== done $(date -u +%T)" | tee -a $OUT/log
