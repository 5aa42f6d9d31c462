#!/usr/bin/env bash
# On the GPU machine, after the wheels are installed (see docs/benchmarks.md): the control plane schedules
# real jobs on the GPU through NVML and CUDA_VISIBLE_DEVICES.
set -u
export USF_HOME=/tmp/usf-server PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 USF_POLL_INTERVAL_S=0.5
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
OUTDIR=${OUT:-/tmp/out}; mkdir -p "$OUTDIR"
MODEL=$USF_HOME/models/HuggingFaceTB--SmolLM2-135M-Instruct
python3 scripts/gpu/make_random_model.py .gpu/smollm2-config "$MODEL" >/dev/null
python3 scripts/gpu/make_chat_dataset.py /tmp/chat.jsonl 300
python3 -m usf_bios serve --port 8123 > "$OUTDIR/server.log" 2>&1 &
python3 -c "import time,httpx
for _ in range(60):
    try:
        httpx.get(\"http://127.0.0.1:8123/api/health\").raise_for_status(); break
    except Exception: time.sleep(1)"
python3 scripts/gpu/server_smoke.py http://127.0.0.1:8123 "$MODEL" /tmp/chat.jsonl 2>&1 | tee "$OUTDIR/server_smoke.txt"
cp $USF_HOME/data/logs/*.log "$OUTDIR/" 2>/dev/null
tail -5 "$OUTDIR/server.log"
