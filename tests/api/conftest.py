"""A real `usf-bios serve` on a free loopback port, with its own storage root and database."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    home: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    command: str = "serve"            # `usf-bios serve`, or `worker` (tests/worker)
    health_path: str = "/api/health"
    log_name: str = "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return (self.home / self.log_name).read_text(errors="replace")

    def start(self, timeout: float = 60) -> "Server":
        log = (self.home / self.log_name).open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "usf_bios", self.command, "--port", str(self.port)],
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()[-3000:]
            try:
                if httpx.get(self.url + self.health_path, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"`usf-bios {self.command}` did not come up: " + self.log()[-3000:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server process only (engine processes live in their own sessions)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)

    def client(self, key: str | None = None, timeout: float = 60) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url + "/api", headers=headers, timeout=timeout)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "usf_bios", *args], env=self.env, capture_output=True,
                              text=True, timeout=300)

    def create_key(self, name: str, admin: bool = False) -> str:
        result = self.cli("keys", "create", "--name", name, *(["--admin"] if admin else []))
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite by default; a module may override this fixture (PostgreSQL)."""
    return f"sqlite:///{tmp_path / 'usf' / 'data' / 'usf.db'}"


@pytest.fixture
def server_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    home = tmp_path / "usf"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("USF_", "OUTPUT_PATH", "CHECKPOINT_PATH", "LOG_PATH"))}
    env.update({"USF_HOME": str(home), "DATABASE_URL": database_url, "USF_POLL_INTERVAL_S": "0.2",
                "USF_CANCEL_GRACE_S": "20", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    for var in ("HF_HOME", "TRANSFORMERS_CACHE", "MODELSCOPE_CACHE", "USF_MODEL_PATH", "SUPPORTED_MODEL_SOURCES"):
        env.pop(var, None)
    return env


@pytest.fixture
def make_server(tmp_path: Path, server_env: dict[str, str]):
    """Build (not start) servers sharing one storage root; all are stopped at the end."""
    servers: list[Server] = []

    def make(**extra_env: str) -> Server:
        server = Server(home=tmp_path / "usf", env={**server_env, **extra_env})
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop(signal.SIGKILL)
    kill_engines(tmp_path / "usf")


def kill_engines(home: Path) -> None:
    """Engine processes outlive their server by design; end the ones of this test's storage root."""
    marker = f"USF_HOME={home}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"usf_bios.engine.run" in (proc / "cmdline").read_bytes() and marker in (proc / "environ").read_bytes().split(b"\0"):
                os.killpg(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


@pytest.fixture
def server(make_server) -> Server:
    return make_server().start()


@dataclass
class LocalApp:
    """The app in the test's own process (its module state is readable), served by Starlette's TestClient."""

    home: Path
    client: httpx.Client


@pytest.fixture
def local_app(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch):
    """``create_app`` on its own storage root and database, without the scheduler; the client's base URL is
    http://127.0.0.1:8000/api (a loopback Host, as the server without API keys requires)."""
    from fastapi.testclient import TestClient

    from usf_bios.api.main import create_app
    from usf_bios.settings import Settings

    for var in (*[k for k in os.environ if k.startswith("USF_")], "OUTPUT_PATH", "CHECKPOINT_PATH", "LOG_PATH",
                "HF_HOME", "TRANSFORMERS_CACHE", "MODELSCOPE_CACHE", "SUPPORTED_MODEL_SOURCES", "DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "usf"
    app = create_app(Settings(usf_home=home, database_url=database_url), "127.0.0.1", start_scheduler=False)
    with TestClient(app, base_url="http://127.0.0.1:8000/api") as client:
        yield LocalApp(home, client)
