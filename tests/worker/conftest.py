"""A real `usf-bios worker` and a real `usf-bios serve` on loopback, each with its own USF_HOME (no shared disk)."""

from __future__ import annotations

import http.server
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import Server, kill_engines
from tests.api.flows import register_model, tiny_model_in, upload_dataset
from tests.conftest import chat_rows, write_jsonl

WORKER_KEY = "worker-test-key-0123456789"
CALLBACK_SECRET = "callback-test-secret"


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("USF_", "OUTPUT_PATH", "CHECKPOINT_PATH", "LOG_PATH", "GPU_CLUSTER_", "DATABASE_URL"))}
    for var in ("HF_HOME", "TRANSFORMERS_CACHE", "MODELSCOPE_CACHE", "SUPPORTED_MODEL_SOURCES"):
        env.pop(var, None)
    env.update({"USF_HOME": str(home), "USF_POLL_INTERVAL_S": "0.2", "USF_CANCEL_GRACE_S": "20",
                "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    return env


@dataclass
class Worker(Server):
    """A real `usf-bios worker`: Server's process handling, its own command, health route and log."""

    command: str = "worker"
    health_path: str = "/health"
    log_name: str = "worker.log"

    def client(self, key: str | None = WORKER_KEY, timeout: float = 30) -> httpx.Client:  # type: ignore[override]
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


@pytest.fixture
def tiny_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny import build_tiny_model

    folder = tmp_path_factory.mktemp("tiny-template") / "model"
    build_tiny_model(folder)
    return folder


@pytest.fixture
def make_worker(tmp_path: Path, tiny_template: Path):
    workers: list[Worker] = []

    def make(**extra: str) -> Worker:
        home = tmp_path / "worker"
        home.mkdir(exist_ok=True)
        if not (home / "models" / "test--tiny").exists():
            tiny_model_in(home, tiny_template)
        env = clean_env(home)
        env.update({"GPU_CLUSTER_API_KEY": WORKER_KEY, "USF_CALLBACK_SECRET": CALLBACK_SECRET,
                    "USF_WORKER_ALLOWED_HOSTS": "127.0.0.1", "USF_CALLBACK_INTERVAL_S": "0.5", **extra})
        worker = Worker(home=home, env=env)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.stop(signal.SIGKILL)
    kill_engines(tmp_path / "worker")


@pytest.fixture
def make_control(tmp_path: Path, tiny_template: Path):
    """A control plane whose remote executor points at ``worker``; it has the model too (registered), so a job is
    admitted, but trains only on the worker."""
    servers: list[Server] = []

    def make(worker: Worker, **extra: str) -> Server:
        home = tmp_path / "control"
        home.mkdir(exist_ok=True)
        env = clean_env(home)
        server = Server(home=home, env=env)
        env.update({"DATABASE_URL": f"sqlite:///{home / 'data' / 'usf.db'}", "GPU_CLUSTER_API_URL": worker.url,
                    "GPU_CLUSTER_API_KEY": WORKER_KEY, "USF_CALLBACK_SECRET": CALLBACK_SECRET,
                    "USF_EXECUTOR": "remote", "USF_PUBLIC_URL": server.url, "USF_REMOTE_POLL_S": "1",
                    "USF_REMOTE_TIMEOUT_S": "30", **extra})
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop(signal.SIGKILL)
    kill_engines(tmp_path / "control")


def prepare(control: Server, tmp_path: Path, tiny_template: Path, rows: int = 24) -> tuple[str, str]:
    """The tiny model registered and a chat dataset uploaded on the control plane: (model name, dataset id)."""
    with control.client() as client:
        folder = tiny_model_in(control.home, tiny_template)
        register_model(client, "test--tiny", folder)
        dataset = upload_dataset(client, write_jsonl(tmp_path / "chat.jsonl", chat_rows(rows)))
    return "test--tiny", dataset["id"]


class Files(http.server.BaseHTTPRequestHandler):
    """A local HTTP server playing the control plane's signed dataset URL (and a worker's artifact route)."""

    files: dict[str, bytes] = {}
    redirects: dict[str, str] = {}

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        if path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[path])
            self.end_headers()
            return
        body = self.files.get(path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def files():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Files.files, Files.redirects = {}, {}
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
