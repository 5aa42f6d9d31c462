"""No request produces a 5xx: schemathesis generates requests from the OpenAPI document and sends them to the app
in this process (its ASGI transport), on a storage root with a registered tiny model, a dataset and a queued job.
Each operation gets a fixed number of examples with generated path parameters and as many with the real ones
(and for the job routes a body naming the real model and dataset), derandomized and without shrinking, so the
run is the same every time and bounded (~30 s on 2 busy cores). The SSE stream (/events, endless while a job is queued)
is left out; the WebSocket is not in the document."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.python import asgi  # noqa: E402

from tests.api.flows import job_spec  # noqa: E402
from tests.conftest import chat_rows, write_jsonl  # noqa: E402

EXAMPLES = 10          # per operation and pass
BASE_URL = "http://127.0.0.1:8000"   # a loopback Host, as a server without API keys requires


@pytest.fixture
def app_with_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_template: Path):
    from fastapi.testclient import TestClient

    from usf_bios.api.main import create_app
    from usf_bios.settings import Settings

    for var in [k for k in os.environ if k.startswith("USF_")] + ["DATABASE_URL", "HF_HOME", "TRANSFORMERS_CACHE"]:
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "usf"
    app = create_app(Settings(usf_home=home), "127.0.0.1", start_scheduler=False)
    shutil.copytree(tiny_model_template, home / "models" / "tiny")
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    with TestClient(app, base_url=BASE_URL + "/api") as client:
        model = client.get("/models/tiny").json()   # registered by the scan at start
        data = client.post("/datasets", files={"file": ("chat.jsonl", dataset.read_bytes())}, data={"name": "chat"}).json()
        job = client.post("/jobs", json=job_spec("tiny", "chat"))
        assert job.status_code == 201, job.text
        refs = {"model": model["id"], "dataset": data["id"], "job": job.json()["id"]}
    yield app, refs
    asgi.shutdown_lifespans()


def _real_path_parameters(path: str, names: list[str], refs: dict[str, str]) -> dict[str, str]:
    kind = next((k for k in ("model", "dataset", "job") if path.startswith(f"/api/{k}s/")), "job")
    return {name: refs[kind] for name in names}


def test_no_request_gets_a_server_error(app_with_data):
    app, refs = app_with_data
    # /models/pull starts a download process per request (tests/models/test_pull.py drives it against a fake Hub)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Host": "127.0.0.1"}).exclude(
        path_regex=r"/events$|/models/pull$")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        names = [p.name for p in operation.path_parameters]
        strategies = [operation.as_strategy(), operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)]
        if names:
            strategies.append(operation.as_strategy(path_parameters=_real_path_parameters(operation.path, names, refs)))
        if operation.path in ("/api/jobs", "/api/jobs/estimate") and operation.method.upper() == "POST":
            strategies.append(operation.as_strategy().map(_name_real_references))

        for index, strategy in enumerate(strategies):
            try:
                _run(strategy, failures)
            except Unsatisfiable:   # nothing to get wrong: no parameter, no body (the negative pass)
                assert index == 1, operation.path
            except Exception as exc:  # noqa: BLE001 - collected so one run names every failing operation
                failures.append(f"{operation.method.upper()} {operation.path}: {type(exc).__name__}: {str(exc)[:800]}")
    assert operations > 20
    assert failures == []


def _run(strategy, failures: list[str]) -> None:
    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case) -> None:
        response = case.call(base_url=BASE_URL)
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.formatted_path} query={case.query} body={str(case.body)[:200]} → "
                            f"{response.status_code}: {response.text[:300]}")
            return
        case.validate_response(response, checks=[not_a_server_error])

    run()


def _name_real_references(case):
    if isinstance(case.body, dict):
        case.body = {**case.body, "base_model": "tiny", "dataset": "chat"}
    return case
