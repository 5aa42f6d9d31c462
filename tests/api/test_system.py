"""The server answers on loopback: health without a key, OpenAPI, JSON errors."""

from __future__ import annotations


def test_health_docs_and_error_shapes(server):
    with server.client() as client:
        assert client.get("/health").json()["status"] == "ok"
        system = client.get("/system").json()
        assert system["gpus"] == [] and system["disk"]["free_gb"] > 0
        bad = client.post("/keys", content=b"{bad", headers={"content-type": "application/json"})
        assert bad.status_code == 422 and bad.json()["detail"].startswith("body: malformed JSON")
        wrong = client.post("/keys", json={"name": 5})
        assert wrong.status_code == 422 and wrong.json()["errors"] == [{"field": "name", "message": "must be a string (got 5)"}]
    import httpx

    assert httpx.get(server.url + "/docs").status_code == 200
    assert "/api/health" in httpx.get(server.url + "/openapi.json").json()["paths"]
