"""Ray is optional: without it installed the server starts and runs local jobs as before; USF_EXECUTOR=ray without
it stops `usf-bios serve` at once with one line that says what to install. (Ray is hidden from a fresh
interpreter by a None in sys.modules, as an environment without the package would answer the import.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.api.conftest import free_port

WITHOUT_RAY = "import sys; sys.modules['ray'] = None; "


def python(code: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("USF_", "RAY_"))}
    environment.update({"USF_HOME": str(home), "HF_HUB_OFFLINE": "1", **env})
    return subprocess.run([sys.executable, "-c", WITHOUT_RAY + code], env=environment, capture_output=True, text=True,
                          timeout=120)


def test_usf_executor_ray_without_ray_stops_the_server_with_one_line(tmp_path):
    serve = f"from usf_bios.cli import app; sys.argv = ['usf-bios', 'serve', '--port', '{free_port()}']; app()"
    result = python(serve, tmp_path / "usf", USF_EXECUTOR="ray")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert re.fullmatch(r"error: USF_EXECUTOR=ray needs Ray \(No module named 'ray\.job_submission'.*\); install it "
                        r"with `pip install 'usf-bios\[ray\]'`", line), line


def test_without_ray_the_server_and_its_scheduler_work(tmp_path):
    code = ("from usf_bios.settings import Settings; from usf_bios.storage import StorageLayout; "
            "from usf_bios.api.main import create_app; from usf_bios.control.scheduler import configured_executors; "
            "s = Settings(); create_app(s); l = StorageLayout.from_settings(s); "
            "print(sorted(configured_executors(l, s))); "
            "print(sorted(configured_executors(l, Settings(RAY_ADDRESS='127.0.0.1:6379'))))")
    result = python(code, tmp_path / "usf")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["['local']", "['local']"]
    assert "RAY_ADDRESS is set but Ray is not installed" in result.stderr
