"""A real PostgreSQL server for the test session, started by the tests themselves.

`postgres_server` finds the server binaries (initdb, pg_ctl, postgres) under /usr/lib/postgresql/<newest>/bin
or on PATH, initialises a throwaway cluster in a folder under /tmp (`initdb -A trust -U postgres`), starts it on
a free loopback port with its unix socket in that folder, and at the end of the session stops it
(`pg_ctl stop -m immediate`) and removes the folder. PostgreSQL refuses to run as root: when the tests run as
root, initdb and pg_ctl run as the `postgres` system user (`runuser -u postgres --`) and the folder belongs to it.
Should the test process be killed before its teardown runs, a small detached watchdog does the same clean-up.

A module uses it by importing the fixture (`from tests.api.postgres import postgres_server  # noqa: F401`).
Every module that imports it shares the one server of the session.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL_HINT = ("install PostgreSQL's server package: `apt-get install -y postgresql` (Debian/Ubuntu, as root); "
                "the tests start and stop the server themselves")
BINARIES = ("initdb", "pg_ctl", "postgres")
PG_LIB = Path("/usr/lib/postgresql")   # Debian/Ubuntu: one bin folder per major version


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin holding the server binaries, else the PATH's."""
    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)

    candidates = sorted(PG_LIB.glob("*/bin"), key=version, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for candidate in candidates:
        if all((candidate / name).is_file() and os.access(candidate / name, os.X_OK) for name in BINARIES):
            return candidate
    pytest.fail(f"PostgreSQL server binaries ({', '.join(BINARIES)}) were not found under "
                f"{PG_LIB}/*/bin nor on PATH; {INSTALL_HINT}", pytrace=False)


@dataclass
class PostgresServer:
    bin_dir: Path
    folder: Path
    port: int = 0
    run_as: str | None = None       # the system user running the server when the tests run as root

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def socket_dir(self) -> Path:
        return self.folder / "socket"

    @property
    def log_file(self) -> Path:
        return self.folder / "server.log"

    def url_for(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def new_database(self) -> str:
        """Create a fresh, uniquely named database; its URL."""
        import psycopg
        from psycopg import sql

        name = f"usf_test_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url_for("postgres"), autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self.run_as:
            command = ["runuser", "-u", self.run_as, "--", *command]
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        env.pop("PGDATA", None)
        # stdout/stderr go to a file, not a pipe: the postmaster that pg_ctl leaves behind would hold a pipe open.
        with (self.folder / "commands.log").open("ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            return subprocess.run(command, cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, timeout=timeout)

    def _logs(self) -> str:
        text = ""
        for path in (self.folder / "commands.log", self.log_file):
            if path.exists():
                text += f"--- {path.name}\n" + path.read_text(errors="replace")[-3000:]
        return text

    def start(self) -> "PostgresServer":
        self.socket_dir.mkdir()
        if self.run_as:
            user = pwd.getpwnam(self.run_as)
            for path in (self.folder, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        result = self._run("initdb", "-D", str(self.data_dir), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                           "--locale=C", "--no-sync")
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}):\n{self._logs()}")
        for _attempt in range(3):  # the free port may be taken between choosing and binding it
            self.port = free_port()
            result = self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data_dir), "-l", str(self.log_file),
                               "-o", f"-h 127.0.0.1 -p {self.port} -k {self.socket_dir} -F")
            if result.returncode == 0:
                return self
        raise RuntimeError(f"PostgreSQL did not start:\n{self._logs()}")

    def watch(self) -> None:
        """A detached process that stops the server and removes the folder should this process die without
        cleaning up (SIGTERM/SIGKILL from a CI timeout); it exits by itself once the folder is gone."""
        subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid()), str(self.folder),
                          str(self.bin_dir / "pg_ctl"), self.run_as or ""], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True, cwd="/")

    def stop(self) -> None:
        if self.port and (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-w", "-D", str(self.data_dir), "-m", "immediate", timeout=60)
        self.port = 0
        shutil.rmtree(self.folder, ignore_errors=True)


WATCHDOG = """
import os, shutil, subprocess, sys, time
pid, folder, pg_ctl, run_as = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
def alive():
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
while os.path.isdir(folder) and alive():
    time.sleep(1)
if os.path.isdir(folder):
    command = [pg_ctl, "stop", "-w", "-D", os.path.join(folder, "data"), "-m", "immediate"]
    subprocess.run((["runuser", "-u", run_as, "--"] if run_as else []) + command, cwd=folder,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    shutil.rmtree(folder, ignore_errors=True)
"""


def start_postgres() -> PostgresServer:
    bin_dir = find_bin_dir()
    run_as = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("the tests run as root and PostgreSQL refuses to; no `postgres` system user to run it as: "
                        + INSTALL_HINT + " (the package creates the user)", pytrace=False)
        if not shutil.which("runuser"):
            pytest.fail("the tests run as root and `runuser` (util-linux) is missing to run PostgreSQL as `postgres`",
                        pytrace=False)
        run_as = "postgres"
    folder = Path(tempfile.mkdtemp(prefix="usf-postgres-", dir="/tmp"))
    folder.chmod(0o755)
    server = PostgresServer(bin_dir=bin_dir, folder=folder, run_as=run_as)
    server.watch()
    try:
        return server.start()
    except BaseException:
        server.stop()
        raise


_shared: PostgresServer | None = None
_users = 0


def _stop_shared() -> None:
    global _shared
    if _shared is not None:
        _shared.stop()
        _shared = None


atexit.register(_stop_shared)  # should the session end without running fixture teardown


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    """The session's PostgreSQL server; shared by every module that imports this fixture (one FixtureDef each)."""
    global _shared, _users
    if _shared is None:
        _shared = start_postgres()
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0:
            _stop_shared()
