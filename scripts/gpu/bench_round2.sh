#!/usr/bin/env bash
# Device call for issue 19 (carry [".dev/unsloth/site", ".whl"]): ours vs Unsloth on the same packed rows, and the
# QLoRA profile. Everything goes under $OUT. Usage: bash scripts/gpu/bench_round2.sh PART...  (parts: qlora bf16
# qlora-merge qlora-full bf16-80 profile gpu-tests). Here, first: bash /work/shared/tools/prepare_unsloth.sh .dev/unsloth
# (in a git worktree, where .git is a file, its exclude step fails: ignore .dev/ in .gitignore instead), and
# python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#   --platform manylinux2014_x86_64 -d .whl pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 \
#   annotated-types==0.8.0 typing-inspection==0.4.5 python-dotenv==1.2.4 typing-extensions==4.16.0 \
#   liger-kernel==0.8.5 peft==0.21.0
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.dev/unsloth/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee -a $OUT/log
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" | tee -a $OUT/log
for part in "$@"; do
  echo "=== $part $(date -u +%T)" | tee -a $OUT/log
  case $part in
    qlora) python3 -m usf_bios bench --config llama3.1-8b-qlora-nf4-4096 --baseline unsloth --timeout 170 \
             --out $OUT/qlora ${PERF:+--performance "$PERF"} 2>&1 | grep -v Warning | tee -a $OUT/log ;;
    bf16) python3 -m usf_bios bench --config llama3.1-8b-lora-bf16-4096 --baseline unsloth --timeout 170 \
             --out $OUT/bf16 2>&1 | grep -v Warning | tee -a $OUT/log ;;
    qlora-merge) python3 -m usf_bios bench --config llama3.1-8b-qlora-nf4-4096 --side ours --timeout 170 \
             --performance '{"merge_micro_batches":"on"}' --out $OUT/qlora-merge 2>&1 | grep -v Warning | tee -a $OUT/log ;;
    qlora-full) python3 -m usf_bios bench --config llama3.1-8b-qlora-nf4-4096 --baseline unsloth --workload full-rows \
             --timeout 170 --out $OUT/qlora-full 2>&1 | grep -v Warning | tee -a $OUT/log ;;
    bf16-80) python3 -m usf_bios bench --config llama3.1-8b-lora-bf16-4096 --side ours --gpu-memory 85.5 \
             --timeout 170 --out $OUT/bf16-80 2>&1 | grep -v Warning | tee -a $OUT/log ;;
    profile) python3 -m usf_bios.bench.profile llama3.1-8b-qlora-nf4-4096 ${PERF:+--performance "$PERF"} \
             --out $OUT/profile-qlora.json 2>&1 | grep -v Warning | tail -60 | tee -a $OUT/log ;;
    gpu-tests) python3 -m pytest -q -p no:cacheprovider tests/engine/test_speed_gpu.py 2>&1 | tail -30 | tee -a $OUT/log ;;
  esac
done
echo "=== done $(date -u +%T)" | tee -a $OUT/log
