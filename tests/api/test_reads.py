"""The cached reads of api/reads.py: a change made through a server is in its next job list, a key never gets
another key's page, a revoked key is refused by the next request (revoked here) or within MAX_AGE_S (revoked by
another server on the same store), and the cache reads once for all who wait."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from tests.api.flows import job_spec, register_model, run_async, submit, tiny_model_in, upload_dataset
from tests.conftest import chat_rows, write_jsonl
from usf_bios.api.reads import MAX_AGE_S, ReadCache, job_list_query
from usf_bios.status import JobStatus


def listed(client: httpx.Client, query: str = "") -> dict:
    response = client.get("/jobs" + query)
    assert response.status_code == 200, response.text
    return response.json()


def key_id(admin: httpx.Client, name: str) -> str:
    return next(k["id"] for k in admin.get("/keys").json() if k["name"] == name)


@pytest.fixture
def keyed_server(make_server, tiny_model_template, tmp_path):
    """A server requiring keys whose jobs stay queued; admin, alice and bob clients; alice's model and dataset."""
    server = make_server(USF_REQUIRE_AUTH="1", USF_MAX_CPU_JOBS="0").start()
    keys = {name: server.create_key(name, admin=name == "admin") for name in ("admin", "alice", "bob")}
    clients = {name: server.client(key) for name, key in keys.items()}
    register_model(clients["alice"], "tiny", tiny_model_in(server.home, tiny_model_template))
    upload_dataset(clients["alice"], write_jsonl(tmp_path / "chat.jsonl", chat_rows(10)), name="chat")
    yield server, keys, clients
    for client in clients.values():
        client.close()


def test_a_change_is_in_the_next_list_and_no_key_sees_another_keys_page(keyed_server):
    server, keys, c = keyed_server
    assert listed(c["alice"])["total"] == listed(c["bob"])["total"] == listed(c["admin"])["total"] == 0   # all cached
    job = submit(c["alice"], job_spec("tiny", "chat"))
    page = listed(c["alice"])
    assert page["total"] == 1 and page["items"] == [c["alice"].get(f"/jobs/{job['id']}").json()]   # the same JSON
    assert listed(c["bob"]) == {"items": [], "total": 0, "limit": 50, "offset": 0}
    assert listed(c["admin"])["total"] == 1
    assert listed(c["alice"], "?status=queued")["total"] == 1 and listed(c["alice"], "?status=cancelled")["total"] == 0
    assert c["alice"].post(f"/jobs/{job['id']}/cancel").status_code == 200
    assert listed(c["alice"])["items"][0]["status"] == "cancelled"
    assert listed(c["alice"], "?status=cancelled")["total"] == 1 and listed(c["alice"], "?status=queued")["total"] == 0
    # what the fast path does not take goes to the route, which answers as it did
    assert listed(c["alice"], "?limit=1&offset=0&unknown=1")["items"][0]["id"] == job["id"]
    for query in ("?limit=0", "?limit=x", f"?offset={2**63}", "?status=bogus"):
        assert c["alice"].get("/jobs" + query).status_code == 422, query
    with httpx.Client(base_url=server.url + "/api") as anonymous:
        assert anonymous.get("/jobs").status_code == 401
        assert anonymous.get("/jobs", headers={"Authorization": "Bearer usf_wrong"}).status_code == 401
        assert anonymous.get("/health").json()["status"] == "ok"


def within(seconds: float, check) -> float | None:
    """How long until ``check()`` held, polling; None when it did not within ``seconds``."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if check():
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def test_a_revoked_key_is_refused_at_once_here_and_soon_by_another_server(keyed_server, make_server):
    server, keys, c = keyed_server
    assert listed(c["bob"])["total"] == listed(c["alice"])["total"] == listed(c["admin"])["total"] == 0   # cached
    assert c["admin"].delete(f"/keys/{key_id(c['admin'], 'bob')}").status_code == 204
    assert c["bob"].get("/jobs").status_code == 401                                # revoked here: the next request
    assert c["bob"].post("/jobs", json=job_spec("tiny", "chat")).status_code == 401

    other = make_server(USF_REQUIRE_AUTH="1", USF_MAX_CPU_JOBS="0").start()         # on the same store
    with other.client(keys["admin"]) as admin, other.client(keys["alice"]) as alice:
        submit(alice, job_spec("tiny", "chat"))
        assert within(MAX_AGE_S + 1, lambda: listed(c["admin"])["total"] == 1) is not None   # its job, here
        assert admin.delete(f"/keys/{key_id(admin, 'alice')}").status_code == 204
    assert within(MAX_AGE_S + 1, lambda: c["alice"].get("/jobs").status_code == 401) is not None
    assert c["alice"].get("/jobs").status_code == 401


def test_job_list_query_takes_only_what_the_route_would_take_the_same_way():
    assert job_list_query(b"") == (None, 50, 0)
    assert job_list_query(b"status=running&limit=5&offset=10") == (JobStatus.RUNNING, 5, 10)
    for query in (b"limit=0", b"limit=501", b"limit=", b"limit=-1", b"limit=%D9%A5", b"offset=9223372036854775808",
                  b"status=bogus", b"limit=1&limit=2", b"other=1", b"a&&b"):
        assert job_list_query(query) is None, query


class _Store:
    generation = 0


def test_the_cache_reads_once_for_all_who_wait_and_never_keeps_a_read_older_than_a_change():
    store, reads, gate = _Store(), [], threading.Event()

    def read() -> str:
        generation = store.generation
        reads.append(generation)
        gate.wait(5)
        return f"read in generation {generation}"

    async def scenario() -> None:
        cache = ReadCache(store)  # type: ignore[arg-type]
        waiting = [asyncio.ensure_future(cache.fetch("k", read)) for _ in range(50)]
        await asyncio.sleep(0.1)
        store.generation = 1        # a commit while the read is under way: its value may be handed to those who
        late = asyncio.ensure_future(cache.fetch("k", read))    # asked before, but is not kept nor given after
        await asyncio.sleep(0.1)
        gate.set()
        assert set(await asyncio.gather(*waiting)) == {"read in generation 0"}
        assert await late == "read in generation 1"
        assert await cache.fetch("k", read) == "read in generation 1" and reads == [0, 1]
        assert await cache.fetch("none", lambda: None) is None and "none" not in cache.entries

    run_async(scenario())
