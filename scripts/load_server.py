"""The server under load, as docs/benchmarks.md reports it: a real `usf-bios serve` on loopback with its own storage
root, 50 queued jobs, then 200 clients x 20 requests on GET /api/jobs and on GET /api/health, 200 SSE watchers of
one running job with /api/health probed meanwhile, recovery after the load, and SIGTERM. API keys are required
(USF_REQUIRE_AUTH=1) and every request carries an admin key.

    python scripts/load_server.py [--postgres | --database-url postgresql://…] [--clients 200] [--requests 20]
                                  [--watch-seconds 60] [--access-log app,uvicorn]

Run from the repository root (it builds a tiny model with the tests' helpers). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from tests.api.conftest import Server, kill_engines  # noqa: E402
from tests.api.flows import job_spec, register_model, submit, tiny_model_in, upload_dataset  # noqa: E402
from tests.conftest import chat_rows, write_jsonl  # noqa: E402
from usf_bios.bench.load import hammer, run_loop, watch_events  # noqa: E402


def start(home: Path, database_url: str | None, **extra: str) -> tuple[Server, httpx.Client, str]:
    """A server requiring API keys (USF_REQUIRE_AUTH), an admin key and a client with it, a model and a dataset."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("USF_")}
    env.update({"USF_HOME": str(home), "HF_HUB_OFFLINE": "1", "USF_REQUIRE_AUTH": "1", **extra})
    home.mkdir(parents=True, exist_ok=True)
    if database_url:
        env["DATABASE_URL"] = database_url
    server = Server(home=home, env=env).start()
    key = server.create_key("load", admin=True)
    client = server.client(key)
    register_model(client, "tiny", tiny_model_in(home))
    upload_dataset(client, write_jsonl(home / "chat.jsonl", chat_rows(24)), "chat")
    return server, client, key


def stop(server: Server) -> float:
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=30)
    return round(time.monotonic() - started, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--postgres", action="store_true",
                        help="start a throwaway PostgreSQL (tests/api/postgres.py) and use fresh databases on it")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--watch-seconds", type=float, default=60, help="0: no SSE part")
    parser.add_argument("--access-log", default="app",
                        help="USF_ACCESS_LOG of the hammered server; a comma list (app,uvicorn) hammers one server of "
                             "each, one after the other, in this run")
    args = parser.parse_args()
    args.access_logs = args.access_log.split(",")
    args.database_urls = [args.database_url] * len(args.access_logs)
    postgres = None
    if args.postgres:
        from tests.api.postgres import start_postgres

        postgres = start_postgres()
        args.database_url = postgres.new_database()
        args.database_urls = [postgres.new_database() for _ in args.access_logs]   # each server starts empty
        args.second_database_url = postgres.new_database()   # the SSE part's server starts empty too
    try:
        run(args)
    finally:
        if postgres is not None:
            postgres.stop()


def run(args: argparse.Namespace) -> None:
    report: dict = {"database": "postgresql" if args.database_url else "sqlite",
                    "load_average_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as folder:
        for mode, database_url in zip(args.access_logs, args.database_urls):
            if len(args.access_logs) > 1:   # one part of the report a mode
                part = report.setdefault("access_log", {}).setdefault(mode, {})
            else:
                part, report["access_log"] = report, mode
            server, client, key = start(Path(folder) / f"a-{mode}", database_url, USF_MAX_CPU_JOBS="0",
                                        USF_ACCESS_LOG=mode)
            for i in range(50):
                submit(client, job_spec("tiny", "chat", name=f"job-{i}"))
            for path in ("/api/jobs", "/api/health"):
                # one request first: the clock starts on a server that has answered this route once (its queries
                # compiled, its first page read), as any server that has been up a while has
                assert httpx.get(server.url + path, headers={"Authorization": f"Bearer {key}"}).status_code == 200
                result = run_loop(hammer("127.0.0.1", server.port, path, args.clients, args.requests, key, timeout=120))
                part[path] = result.summary()
            started = time.monotonic()
            part["health_after_load"] = {"status": httpx.get(server.url + "/api/health", timeout=5).status_code,
                                         "seconds": round(time.monotonic() - started, 3)}
            part["sigterm_seconds"] = stop(server)
        if not args.watch_seconds:
            report["load_average_after"] = os.getloadavg()[0]
            print(json.dumps(report, indent=1))
            return

        server, client, key = start(Path(folder) / "b", getattr(args, "second_database_url", args.database_url))
        job = submit(client, job_spec("tiny", "chat", max_steps=100000, eval_steps=50, save_steps=1000))

        async def watch() -> tuple:
            watchers = [watch_events("127.0.0.1", server.port, f"/api/jobs/{job['id']}/events", args.watch_seconds,
                                     key)
                        for _ in range(args.clients)]
            probe = hammer("127.0.0.1", server.port, "/api/health", 5, int(args.watch_seconds * 4), key, timeout=10,
                           interval=0.25)   # 20 requests a second for the whole watch
            return await asyncio.gather(asyncio.gather(*watchers), probe)

        watches, health = run_loop(watch())
        counts = sorted(len(w.ids) for w in watches)
        report["sse"] = {"watchers": len(watches), "errors": sum(1 for w in watches if w.error),
                         "events_min": counts[0], "events_max": counts[-1],
                         "keepalives": sum(w.keepalives for w in watches),
                         "first_byte_max_s": round(max(w.first_byte_s or 0 for w in watches), 2),
                         "health_meanwhile": health.summary()}
        report["sigterm_seconds_with_streams"] = stop(server)
        kill_engines(Path(folder) / "b")   # engine processes outlive their server by design
    report["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
