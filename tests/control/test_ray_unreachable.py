"""The ray executor when its cluster does not answer (RAY_ADDRESS on a closed loopback port; Ray's own client
is used, nothing stands in for it): /system says unreachable and why, a submit fails the start with the address
in the reason, and a followed job is reported gone once the cluster has been silent for USF_REMOTE_TIMEOUT_S."""

from __future__ import annotations

import time

import pytest

from tests.api.conftest import free_port
from tests.conftest import chat_rows, write_jsonl
from tests.engine.test_run import make_spec
from usf_bios.engine.jobdir import create_job
from usf_bios.settings import Settings
from usf_bios.spec import parse_spec
from usf_bios.storage import StorageLayout

pytest.importorskip("ray.job_submission")


def test_a_cluster_that_does_not_answer(usf_home, tiny_model, tmp_path):
    from usf_bios.control.executors.ray import RayExecutor

    address = f"http://127.0.0.1:{free_port()}"
    settings = Settings(usf_home=usf_home, ray_address=address, remote_timeout_s=1)
    layout = StorageLayout.from_settings(settings)
    executor = RayExecutor(layout, settings)
    facts = executor.cluster()
    assert facts["reachable"] is False and facts["address"] == address and facts["detail"].startswith("no answer")
    started = time.monotonic()
    again = executor.cluster()   # not asked again for RETRY_S: answered at once
    assert time.monotonic() - started < 1 and "s ago" in again["detail"], again
    job_id = create_job(parse_spec(make_spec(tiny_model, write_jsonl(tmp_path / "chat.jsonl", chat_rows(4)))), layout)
    with pytest.raises(OSError, match=f"the Ray cluster at {address} did not take the job"):
        executor.start(job_id, [])
    assert executor.poll("usf-gone", 0, job_id).alive, "silent for less than USF_REMOTE_TIMEOUT_S: still running"
    time.sleep(1.1)
    gone = executor.poll("usf-gone", 0, job_id)
    assert not gone.alive and gone.lost_reason.startswith(f"the Ray cluster at {address} did not answer for")
