"""Datasets over REST against a real server: streamed upload, validation, stats, preview, delete, isolation."""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
from pathlib import Path

import httpx
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from tests.conftest import chat_rows
from usf_bios.control.tables import Job, ModelEntry

BOUNDARY = "usfTestBoundary7MA4YWxkTrZu0gW"


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def upload(client: httpx.Client, filename: str, content: bytes, **fields: str) -> httpx.Response:
    return client.post("/datasets", files={"file": (filename, content)}, data=fields)


def multipart(filename: str, content: bytes, **fields: str) -> bytes:
    """A multipart/form-data body built by hand, so the filename goes out exactly as written."""
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                 f'Content-Type: application/octet-stream\r\n\r\n'.encode() + content + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def post_raw(server, body, headers: dict | None = None) -> httpx.Response:
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", **(headers or {})}
    with server.client() as client:
        return client.post("/datasets", content=body, headers=headers)


def stored_files(server) -> list[Path]:
    data = server.home / "data"
    return sorted(p for folder in ("uploads", "datasets") for p in (data / folder).rglob("*") if p.is_file())


def db_session(server) -> Session:
    return Session(create_engine(server.env["DATABASE_URL"]))


def register_model(server, folder: Path, name: str = "tiny", owner: str | None = None) -> str:
    with db_session(server) as session:
        row = ModelEntry(name=name, source="local", path=str(folder), valid=True, problems=[], owner_key_id=owner)
        session.add(row)
        session.commit()
        return row.id


def test_upload_each_file_type(server) -> None:
    alpaca = [{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(3)]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["prompt", "completion"])
    writer.writerows([[f"Q{i}", f"A{i}"] for i in range(4)])
    cases = [("chat.jsonl", jsonl(chat_rows(6)), {}, "messages", 6),
             ("alpaca.json", json.dumps(alpaca).encode(), {}, "alpaca", 3),
             ("pc.csv", buf.getvalue().encode(), {}, "prompt_completion", 4),
             ("plain.jsonl", jsonl([{"text": "hello"}, {"text": "world"}]), {"format": "text", "name": "Plain one"},
              "text", 2)]
    with server.client() as client:
        for filename, content, fields, fmt, rows in cases:
            response = upload(client, filename, content, **fields)
            assert response.status_code == 201, response.text
            body = response.json()
            assert set(body) == {"id", "name", "filename", "format", "rows", "size_bytes", "sha256", "created_at"}
            assert (body["filename"], body["format"], body["rows"]) == (filename, fmt, rows)
            assert body["name"] == fields.get("name", Path(filename).stem)
            assert body["size_bytes"] == len(content)
            assert body["sha256"] == hashlib.sha256(content).hexdigest()
            stored = server.home / "data" / "datasets" / body["id"] / filename
            assert stored.read_bytes() == content
    assert not list((server.home / "data" / "uploads").iterdir())


def test_list_get_preview_delete(server) -> None:
    with server.client() as client:
        first = upload(client, "one.jsonl", jsonl(chat_rows(7))).json()
        second = upload(client, "two.jsonl", jsonl(chat_rows(2))).json()
        assert [d["id"] for d in client.get("/datasets").json()] == [second["id"], first["id"]]

        by_id, by_name = client.get(f"/datasets/{first['id']}").json(), client.get("/datasets/one").json()
        assert by_id == by_name
        assert by_id["rows"] == 7 and by_id["token_stats"] is None and by_id["length_histogram"] is None

        preview = client.get("/datasets/one/preview", params={"limit": 2}).json()
        assert [p["line"] for p in preview] == [1, 2]
        assert preview[0]["messages"] == chat_rows(1)[0]["messages"]
        assert len(client.get("/datasets/one/preview").json()) == 5
        assert len(client.get("/datasets/one/preview", params={"limit": 100}).json()) == 7
        for bad in (0, 101):
            assert client.get("/datasets/one/preview", params={"limit": bad}).status_code == 422

        assert client.delete("/datasets/one").status_code == 204
        assert not (server.home / "data" / "datasets" / first["id"]).exists()
        assert client.get(f"/datasets/{first['id']}").status_code == 404
        assert client.delete("/datasets/one").status_code == 404
        assert [d["id"] for d in client.get("/datasets").json()] == [second["id"]]


def test_broken_file_is_rejected_with_its_line_and_nothing_is_kept(server) -> None:
    rows = jsonl(chat_rows(2)) + b'{"messages": [\n' + jsonl(chat_rows(1))
    with server.client() as client:
        response = upload(client, "chat.jsonl", rows)
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["detail"].startswith("chat.jsonl:3: malformed JSON")
        assert (body["line"], body["unit"], body["file"]) == (3, "line", "chat.jsonl")
        assert "uploads" not in body["detail"] and ".part" not in body["detail"]

        bad_row = json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]).encode()
        response = upload(client, "set.json", bad_row)
        assert response.status_code == 422
        assert response.json()["detail"].startswith("set.json: row 2: missing field 'output'")

        response = upload(client, "chat.jsonl", jsonl(chat_rows(2)), format="alpaca")
        assert response.status_code == 422 and ":1: missing field 'instruction'" in response.json()["detail"]
        assert client.get("/datasets").json() == []
    assert stored_files(server) == []


def test_bad_requests(server) -> None:
    with server.client() as client:
        for filename in ("data.txt", "data.parquet", "noext", ".jsonl"):
            response = upload(client, filename, b'{"text": "x"}\n')
            assert response.status_code == 415, (filename, response.text)
            assert ".jsonl, .json, .csv" in response.json()["detail"]
        response = upload(client, "ok.jsonl", b'{"text": "x"}\n', format="parquet")
        assert response.status_code == 422 and "format" in response.json()["detail"]
        response = upload(client, "ok.jsonl", b'{"text": "x"}\n', name="a/b")
        assert response.status_code == 422 and "name" in response.json()["detail"]
        response = client.post("/datasets", data={"name": "x"}, files={"other": ("x.jsonl", b"{}")})
        assert response.status_code == 400
        assert client.post("/datasets", json={"file": "x"}).status_code == 415
        assert upload(client, "empty.jsonl", b"").status_code == 422
    truncated = multipart("cut.jsonl", b'{"text": "x"}\n')[:-20]
    assert post_raw(server, truncated).status_code == 400
    fields_only = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n\r\nx\r\n--{BOUNDARY}--\r\n'
    response = post_raw(server, fields_only.encode())
    assert response.status_code == 422 and "'file'" in response.json()["detail"]
    assert stored_files(server) == []


def test_oversized_upload_is_cut_off(make_server) -> None:
    server = make_server(USF_MAX_UPLOAD_MB="1").start()
    line = json.dumps({"text": "x" * 1000}).encode() + b"\n"
    big = line * (2 * 2**20 // len(line))                   # ~2 MiB
    with server.client() as client:
        response = upload(client, "big.jsonl", big)          # Content-Length known: refused before reading
        assert response.status_code == 413, response.text
        assert "1 MiB" in response.json()["detail"]

    body = multipart("big.jsonl", big)

    def chunks():                                             # no Content-Length: cut off while streaming
        for i in range(0, len(body), 64 * 1024):
            yield body[i:i + 64 * 1024]

    response = post_raw(server, chunks())
    assert response.status_code == 413, response.text
    assert stored_files(server) == []

    small = line * (900 * 1024 // len(line))                 # under the cap: still accepted
    with server.client() as client:
        response = upload(client, "small.jsonl", small)
        assert response.status_code == 201, response.text
        assert [d["name"] for d in client.get("/datasets").json()] == ["small"]


def test_duplicate_name_is_a_conflict(server) -> None:
    with server.client() as client:
        assert upload(client, "chat.jsonl", jsonl(chat_rows(2))).status_code == 201
        response = upload(client, "chat.jsonl", jsonl(chat_rows(3)))
        assert response.status_code == 409 and "'chat'" in response.json()["detail"]
        assert upload(client, "other.jsonl", jsonl(chat_rows(3)), name="chat").status_code == 409
        assert upload(client, "chat.jsonl", jsonl(chat_rows(3)), name="chat-2").status_code == 201
        assert sorted(d["name"] for d in client.get("/datasets").json()) == ["chat", "chat-2"]
    assert len(stored_files(server)) == 2


def test_token_stats_with_a_registered_model(server, tiny_model_template: Path, tmp_path: Path) -> None:
    from usf_bios.datasets.formats import load_dataset
    from usf_bios.datasets.stats import token_stats
    from usf_bios.engine.model import load_tokenizer
    from usf_bios.models.sources import ResolvedModel

    content = jsonl(chat_rows(12))
    with server.client() as client:
        dataset = upload(client, "chat.jsonl", content).json()
        model_id = register_model(server, tiny_model_template, "tiny")
        detail = client.get(f"/datasets/{dataset['id']}", params={"model": "tiny"}).json()

        path = server.home / "data" / "datasets" / dataset["id"] / "chat.jsonl"
        tokenizer = load_tokenizer(ResolvedModel("tiny", tiny_model_template, "local"), trust_remote_code=False)
        expected = token_stats(load_dataset(path).examples, tokenizer, 2048)
        stats = detail["token_stats"]
        assert stats == {"min": expected.min, "mean": expected.mean, "p95": expected.p95, "max": expected.max,
                         "truncated": 0, "max_seq_length": 2048}
        assert detail["token_stats_model"] == {"id": model_id, "name": "tiny"}
        histogram = detail["length_histogram"]
        assert 1 <= len(histogram) <= 20 and sum(b["count"] for b in histogram) == 12
        assert histogram[0]["start"] == stats["min"] and histogram[-1]["start"] <= stats["max"] < histogram[-1]["end"]
        assert all(a["end"] == b["start"] for a, b in zip(histogram, histogram[1:]))

        assert client.get("/datasets/chat").json()["token_stats"] == stats       # newest valid model by default
        short = client.get("/datasets/chat", params={"model": model_id, "max_seq_length": stats["min"]}).json()
        assert short["token_stats"]["max_seq_length"] == stats["min"]
        assert 0 < short["token_stats"]["truncated"] < 12
        assert client.get("/datasets/chat", params={"model": "nope"}).status_code == 404
        assert client.get("/datasets/chat", params={"max_seq_length": 0}).status_code == 422

        empty = tmp_path / "no-tokenizer"
        empty.mkdir()
        register_model(server, empty, "broken")                        # now the newest valid model
        fallback = client.get("/datasets/chat").json()
        assert fallback["token_stats"] is None and fallback["length_histogram"] is None
        assert fallback["token_stats_model"]["name"] == "broken" and "'broken'" in fallback["token_stats_error"]
        assert client.get("/datasets/chat", params={"model": "broken"}).status_code == 422


def test_delete_refuses_while_a_job_uses_the_dataset(server) -> None:
    with server.client() as client:
        dataset = upload(client, "chat.jsonl", jsonl(chat_rows(2))).json()
        with db_session(server) as session:
            session.add(Job(id="job-uses-chat", name="j", status="queued", spec={}, request={},
                            dataset_id=dataset["id"], metrics={}))
            session.commit()
        response = client.delete("/datasets/chat")
        assert response.status_code == 409 and "job-uses-chat" in response.json()["detail"]
        assert client.get("/datasets/chat").status_code == 200
    assert len(stored_files(server)) == 1


def test_keys_see_only_their_own_datasets(make_server) -> None:
    server = make_server(USF_REQUIRE_AUTH="1").start()
    key_a, key_b = server.create_key("a"), server.create_key("b")
    admin = server.create_key("root", admin=True)
    with server.client(key_a) as a, server.client(key_b) as b, server.client() as anonymous, server.client(admin) as root:
        dataset = upload(a, "chat.jsonl", jsonl(chat_rows(3))).json()
        assert [d["id"] for d in a.get("/datasets").json()] == [dataset["id"]]
        assert b.get("/datasets").json() == []
        for ref in (dataset["id"], "chat"):
            missing = b.get(f"/datasets/{ref}")
            assert missing.status_code == 404 and missing.json()["detail"] == f"no dataset {ref!r}"
            assert b.get(f"/datasets/{ref}/preview").status_code == 404
            assert b.delete(f"/datasets/{ref}").status_code == 404
        assert b.get("/datasets/no-such").json()["detail"] == "no dataset 'no-such'"
        assert upload(b, "chat.jsonl", jsonl(chat_rows(2))).status_code == 201   # names are per owner
        for call in (anonymous.get("/datasets"), anonymous.get(f"/datasets/{dataset['id']}"),
                     upload(anonymous, "x.jsonl", jsonl(chat_rows(1))), anonymous.delete(f"/datasets/{dataset['id']}")):
            assert call.status_code == 401
        assert len(root.get("/datasets").json()) == 2
        assert root.get(f"/datasets/{dataset['id']}").status_code == 200
        assert a.get(f"/datasets/{dataset['id']}").status_code == 200


TRAVERSAL_REFS = ["../x", "%2e%2e%2fx", "%252e%252e%252fx", "..%5cx", "%2Fetc%2Fpasswd", "....//x", "..", "%2e%2e"]


def test_path_traversal_refs_are_not_found(server, tmp_path: Path) -> None:
    outside = [tmp_path / "x", server.home / "x", server.home / "data" / "x", server.home / "data" / "datasets" / "x"]
    for path in outside:
        path.mkdir(parents=True, exist_ok=True)
        (path / "keep.txt").write_text("keep")
    with server.client() as client:
        dataset = upload(client, "chat.jsonl", jsonl(chat_rows(2))).json()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for ref in TRAVERSAL_REFS:
            for method, suffix in (("GET", ""), ("GET", "/preview"), ("DELETE", "")):
                conn.request(method, f"/api/datasets/{ref}{suffix}")   # sent verbatim, no client normalization
                response = conn.getresponse()
                response.read()
                assert response.status == 404, (method, ref, suffix, response.status)
    finally:
        conn.close()
    assert all((path / "keep.txt").read_text() == "keep" for path in outside)
    assert (server.home / "data" / "datasets" / dataset["id"] / "chat.jsonl").is_file()


TRAVERSAL_FILENAMES = ["../../evil.jsonl", "..\\\\..\\\\evil.jsonl", "/abs/evil.jsonl", "..%2F..%2Fevil.jsonl",
                       "C:\\\\tmp\\\\evil.jsonl", "..evil.jsonl"]   # backslashes doubled: quoted in the header


def test_traversal_filenames_stay_in_the_dataset_folder(server, tmp_path: Path) -> None:
    stored = []
    for i, filename in enumerate(TRAVERSAL_FILENAMES):
        response = post_raw(server, multipart(filename, jsonl(chat_rows(2)), name=f"evil-{i}"))
        assert response.status_code == 201, (filename, response.text)
        body = response.json()
        folder = server.home / "data" / "datasets" / body["id"]
        assert "/" not in body["filename"] and "\\" not in body["filename"], body["filename"]
        assert body["filename"].endswith("evil.jsonl") and not body["filename"].startswith(".")
        assert [p.name for p in folder.iterdir()] == [body["filename"]]
        stored.append(folder / body["filename"])
    assert sorted(tmp_path.rglob("*evil*")) == sorted(stored)
    assert not Path("/abs").exists()
