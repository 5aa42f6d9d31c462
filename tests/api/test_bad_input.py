"""Input the file system or the database cannot take is a clear 4xx, never a 500 (issue 14, item 6)."""

from __future__ import annotations

LONG = "x" * 300   # a file name may be at most 255 bytes


def test_names_longer_than_the_file_system_takes_are_4xx(local_app):
    client = local_app.client
    for path in (f"/models/{LONG}", f"/datasets/{LONG}", f"/datasets/{LONG}/preview", f"/jobs/{LONG}",
                 f"/jobs/{LONG}/logs", f"/jobs/{LONG}/checkpoints", f"/jobs/{LONG}/download", f"/jobs/{LONG}/metrics"):
        answer = client.get(path)
        assert answer.status_code == 404 and LONG in answer.json()["detail"], path
    assert client.delete(f"/models/{LONG}").status_code == 404
    for path in (LONG, f"org/{LONG}", f"/tmp/{LONG}/model", "é" * 128):   # 'é' is 2 bytes: 256 bytes
        answer = client.post("/models", json={"name": "m", "source": "local", "path": path})
        assert answer.status_code == 422, (path, answer.text)
        assert answer.json()["errors"][0]["field"] == "path"
        assert "at most 255" in answer.json()["errors"][0]["message"]
    at_limit = client.post("/models", json={"name": "m", "source": "local", "path": "x" * 255})
    assert at_limit.status_code == 422 and "is not a usable model folder" in at_limit.json()["detail"]
    for body in ({"name": "j", "base_model": LONG, "dataset": LONG}, {"name": LONG, "base_model": "a", "dataset": "b"}):
        for route in ("/jobs", "/jobs/estimate"):
            assert client.post(route, json=body).status_code == 422, (route, body)


def test_offset_beyond_any_database_integer_is_422(local_app):
    client = local_app.client
    for offset in ("9223372036854775808", str(2**31)):
        answer = client.get(f"/jobs?offset={offset}")
        assert answer.status_code == 422, answer.text
        assert answer.json()["errors"][0]["field"] == "query.offset"
    assert client.get(f"/jobs?offset={2**31 - 1}").json()["items"] == []
