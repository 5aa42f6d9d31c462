"""A real Ray cluster on this host for the ray executor's tests: `ray start --head` (with the dashboard, whose
agent serves the Jobs API) and worker nodes started with `ray start --address`, CPU resources only, each node in
its own ports and the cluster in its own temporary folder.

Every `ray start` runs with --block as a child of the test process, so a node's processes (its raylet, agents,
workers, and the job processes those start) are exactly that child's descendants: a node is killed by killing
them, and the cluster is stopped the same way plus any process that still names the cluster's temporary folder.
(`ray stop --force` would stop every Ray process of the machine, also other tests' clusters.)
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.api.conftest import free_port

BIN = Path(sys.executable).parent


def children() -> dict[int, list[int]]:
    """Every process's children, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        tree.setdefault(parent, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, found, todo = children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Node:
    proc: subprocess.Popen
    log: Path
    resources: str

    def kill(self) -> None:
        """The node dies at once, with everything it runs (as a VM that is gone)."""
        kill([self.proc.pid, *descendants(self.proc.pid)])
        self.proc.wait(timeout=30)


@dataclass
class RayCluster:
    temp: Path
    env: dict[str, str]
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: list[Node] = field(default_factory=list)
    worker_ports: int = field(default_factory=lambda: random.randrange(20000, 28000, 500))

    @property
    def address(self) -> str:
        """RAY_ADDRESS as `ray start --head` prints it: the GCS address."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, args: list[str], cpus: int, resources: str) -> Node:
        low = self.worker_ports + 100 * len(self.nodes)
        log = self.temp / f"node{len(self.nodes)}.log"
        command = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
                   "--num-gpus=0", f"--resources={resources}", f"--temp-dir={self.temp}", "--disable-usage-stats",
                   "--object-store-memory=80000000", f"--node-manager-port={free_port()}",
                   f"--object-manager-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                   f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}", f"--min-worker-port={low}",
                   f"--max-worker-port={low + 99}", *args]
        with log.open("ab") as out:
            proc = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        node = Node(proc, log, resources)
        self.nodes.append(node)
        return node

    def start_head(self, cpus: int, timeout: float = 60) -> None:
        """Start the head and return once its GCS takes connections (a worker node may join from then on; the
        dashboard comes up later: ``wait_ready``)."""
        self._start(["--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}"], cpus, "{}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.gcs_port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError("the Ray head's GCS did not come up:\n" + self.nodes[0].log.read_text()[-3000:])

    def wait_ready(self, nodes: int, timeout: float = 90) -> None:
        """Until the dashboard (and the Jobs API) answers and ``nodes`` nodes are alive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if httpx.get(f"{self.dashboard}/api/version", timeout=2).status_code == 200 and self.alive_nodes() == nodes:
                    return
            except (httpx.HTTPError, ValueError, ConnectionError, RuntimeError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the Ray cluster did not get {nodes} nodes:\n" +
                           "\n".join(node.log.read_text()[-1500:] for node in self.nodes))

    def add_worker(self, cpus: int, resources: str = "{}", timeout: float = 90, wait: bool = True) -> Node:
        before = self.alive_nodes() if wait else 0
        node = self._start([f"--address={self.address}"], cpus, resources)
        if not wait:
            return node
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if self.alive_nodes() > before:
                return node
            time.sleep(0.5)
        raise TimeoutError("the Ray worker node did not join:\n" + node.log.read_text()[-3000:])

    def alive_nodes(self) -> int:
        """The nodes the cluster's GCS holds alive (Ray's state API, through the dashboard)."""
        from ray.util.state import list_nodes

        return sum(1 for n in list_nodes(address=self.dashboard, timeout=10) if n.state == "ALIVE")

    def _check_alive(self) -> None:
        for node in self.nodes:
            assert node.proc.poll() is None or node.proc.returncode == -signal.SIGKILL, node.log.read_text()[-3000:]

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.proc.poll() is None:
                node.kill()
        marker = str(self.temp).encode()
        for entry in Path("/proc").iterdir():   # anything that outlived its node and still names this cluster
            try:
                if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue
        shutil.rmtree(self.temp, ignore_errors=True)


def ray_environment() -> dict[str, str]:
    """The nodes' environment: this interpreter's tools first on PATH (a job's entrypoint runs `python`), no
    settings of the test run, quick failure detection (a killed node is dead within seconds), and no worker
    processes started before they are needed (2 cores)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("USF_", "OUTPUT_PATH", "CHECKPOINT_PATH", "LOG_PATH", "RAY_", "DATABASE_URL"))}
    env.update({"PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                "RAY_health_check_initial_delay_ms": "1000", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                # no idle workers started ahead: every job brings its own runtime_env, so none would be reused
                "RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0",
                "PYTHONUNBUFFERED": "1"})
    return env


def make_cluster() -> RayCluster:
    # a short path: Ray's unix sockets live under it (108 bytes at most)
    return RayCluster(temp=Path(tempfile.mkdtemp(prefix="usfray", dir="/tmp")), env=ray_environment())
