"""Summarize runs from the engine's event streams: python3 scripts/gpu/summarize.py USF_HOME RESULTS_DIR RUN..."""
import json
import statistics
import sys
from pathlib import Path

SKIP = 3  # first steps left out of step-time and tokens/s medians


def read_events(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def traceback_of(log: Path) -> str:
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.exists() else []
    start = next((i for i, l in enumerate(lines) if "Traceback (most recent call last)" in l), None)
    if start is None:
        return "\n".join(lines[-15:])
    end = next((i for i in range(start, len(lines)) if " done: " in lines[i]), len(lines))
    return "\n".join(lines[start:end + 1])


def main(home: str, results: str, *runs: str) -> None:
    logs, res = Path(home) / "data" / "logs", Path(results)
    rows, failures = [], []
    for run in runs:
        rc_file = res / f"{run}.rc"
        rc = rc_file.read_text().strip() if rc_file.exists() else "?"
        found = sorted(logs.glob(f"{run}-*.events.jsonl"))
        if not found:
            rows.append((run, rc, "no job") + ("",) * 9)
            failures.append((run, "no events file; see the run's stdout/stderr in run_all.log"))
            continue
        events_path = found[-1]
        events = read_events(events_path)
        metrics = [e for e in events if e["type"] == "metric"]
        evals = [e for e in events if e["type"] == "eval"]
        done = [e for e in events if e["type"] == "done"]
        training_ts = next((e["ts"] for e in events if e["type"] == "stage" and e["stage"] == "training"), None)
        status = done[-1]["status"] if done else "none"
        ts = {m["step"]: m["ts"] for m in metrics}
        intervals = [ts[s] - ts[s - 1] for s in sorted(ts) if s > SKIP and s - 1 in ts]
        eval_or_save = {e["step"] for e in events if e["type"] in ("eval", "checkpoint")}
        clean = [ts[s] - ts[s - 1] for s in sorted(ts) if s > SKIP and s - 1 in ts and s - 1 not in eval_or_save]
        tps = [m["tokens_per_second"] for m in metrics if m["step"] > SKIP]
        mem = [m["gpu_memory_gb"] for m in metrics if m.get("gpu_memory_gb") is not None]
        job_s = events[-1]["ts"] - events[0]["ts"] if events else None
        rows.append((
            run, rc, status, str(len(metrics)),
            f"{statistics.median(intervals):.3f}" if intervals else "-",
            f"{statistics.median(clean):.3f}" if clean else "-",
            f"{statistics.median(tps):.0f}" if tps else "-",
            f"{max(mem):.2f}" if mem else "-",
            f"{metrics[-1]['loss']:.4f}" if metrics else "-",
            f"{evals[-1]['validation_loss']:.4f}" if evals else "-",
            f"{metrics[-1]['ts'] - training_ts:.1f}" if metrics and training_ts else "-",
            f"{job_s:.0f}" if job_s is not None else "-",
        ))
        if status != "completed" or rc != "0":
            failures.append((run, traceback_of(events_path.with_name(events_path.name.replace(".events.jsonl", ".log")))))
    head = ("run", "rc", "done", "steps", "step_s(med)", "step_s(no ev/ckpt)", "tok/s(med)", "peak_GiB", "final_loss",
            "val_loss", "train_s", "job_s")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    text = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [head] + rows)
    text += f"\n(medians over steps > {SKIP}; step_s from consecutive metric ts; peak = max gpu_memory_gb, " \
            "torch.cuda.max_memory_allocated in GiB)\n"
    for run, tb in failures:
        text += f"\n=== {run} failed ===\n{tb}\n"
    print(text)
    (res / "summary.txt").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:])
