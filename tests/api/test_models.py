"""Model registration over HTTP against a real server: local folders, caches, scan, roots, isolation, traversal."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import delete

from usf_bios.control.db import Database
from usf_bios.control.tables import Job

PUBLIC_FIELDS = {"id", "name", "source", "repo_id", "path", "model_type", "parameters", "size_bytes", "valid",
                 "problems", "created_at"}


@pytest.fixture(scope="module")
def true_parameters(tiny_model_template: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_template).parameters())


def files_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def place(template: Path, folder: Path) -> Path:
    shutil.copytree(template, folder)
    return folder


def fake_hf_cache(hub: Path, repo_id: str, template: Path, revision: str = "abc") -> Path:
    """The hub cache's real shape: blobs/ holds the bytes, snapshots/<rev>/ links to them, refs/main names <rev>."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for i, file in enumerate(sorted(template.iterdir())):
        shutil.copyfile(file, repo / "blobs" / f"{revision}{i}")
        os.symlink(Path("..", "..", "blobs", f"{revision}{i}"), snapshot / file.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_register_local_folder_get_list_delete(server, tiny_model_template, true_parameters):
    folder = place(tiny_model_template, server.home / "models" / "org--tiny")
    with server.client() as client:
        created = client.post("/models", json={"name": "tiny", "source": "local", "path": str(folder)})
        assert created.status_code == 201, created.text
        model = created.json()
        assert set(model) == PUBLIC_FIELDS
        assert (model["name"], model["source"], model["repo_id"], model["path"]) == ("tiny", "local", None, str(folder.resolve()))
        assert (model["model_type"], model["valid"], model["problems"]) == ("llama", True, [])
        assert model["parameters"] == true_parameters
        assert model["size_bytes"] == files_size(folder)

        duplicate = client.post("/models", json={"name": "tiny", "source": "local", "path": str(folder)})
        assert duplicate.status_code == 409 and "tiny" in duplicate.json()["detail"]
        relative = client.post("/models", json={"name": "tiny-2", "source": "local", "path": "org--tiny"})
        assert relative.status_code == 201 and relative.json()["path"] == model["path"]  # relative to USF_MODEL_PATH

        assert client.get(f"/models/{model['id']}").json() == model
        assert client.get("/models/tiny").json() == model
        assert [m["name"] for m in client.get("/models").json()] == ["tiny", "tiny-2"]

        db = Database(server.env["DATABASE_URL"])
        with db.session() as session:
            session.add(Job(id="job-1", name="uses-tiny", status="queued", spec={}, request={}, model_id=model["id"]))
            session.commit()
        in_use = client.delete("/models/tiny")
        assert in_use.status_code == 409 and "job-1" in in_use.json()["detail"]
        with db.session() as session:  # a bulk delete: the scheduler may have failed the spec-less job meanwhile
            session.execute(delete(Job).where(Job.id == "job-1"))
            session.commit()
        db.engine.dispose()

        assert client.delete("/models/tiny").status_code == 204
        assert client.get("/models/tiny").status_code == 404
        assert client.delete(f"/models/{model['id']}").status_code == 404
        assert [m["name"] for m in client.get("/models").json()] == ["tiny-2"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in tiny_model_template.iterdir())


def test_unusable_folder_and_bad_bodies_are_422(server):
    empty = server.home / "models" / "empty"
    empty.mkdir()
    with server.client() as client:
        answer = client.post("/models", json={"name": "e", "source": "local", "path": str(empty)})
        assert answer.status_code == 422
        detail = answer.json()["detail"]
        assert "config.json is missing" in detail and "no weights:" in detail and "no tokenizer files:" in detail
        (empty / "config.json").write_text('{"model_type": "llama"}')
        detail = client.post("/models", json={"name": "e", "source": "local", "path": str(empty)}).json()["detail"]
        assert "config.json is missing" not in detail and "no weights:" in detail and "no tokenizer files:" in detail

        missing = client.post("/models", json={"name": "m", "source": "local", "path": str(server.home / "models" / "nope")})
        assert missing.status_code == 422 and "the folder does not exist" in missing.json()["detail"]

        for body, expected in [
            ({"name": "x", "source": "local"}, "path is required for source 'local'"),
            ({"name": "x", "source": "huggingface"}, "repo_id (org/name) is required"),
            ({"name": "x", "source": "huggingface", "repo_id": "a/b", "path": "/tmp"}, "path is only for source 'local'"),
            ({"name": "x", "source": "s3", "path": "p"}, "source: must be one of"),
            ({"name": "x", "source": "local", "path": "p", "extra": 1}, "extra: unknown field"),
            ({"name": "x", "source": "modelscope", "repo_id": "../etc"}, "repo_id:"),
            ({"name": "", "source": "local", "path": "p"}, "name:"),
        ]:
            answer = client.post("/models", json=body)
            assert answer.status_code == 422 and expected in answer.json()["detail"], (body, answer.text)

        absent = client.post("/models", json={"name": "x", "source": "huggingface", "repo_id": "acme/absent"})
        assert absent.status_code == 422 and "acme/absent is not in the Hugging Face cache" in absent.json()["detail"]
        assert client.get("/models").json() == []


def test_outside_the_roots_is_403_until_allowed(make_server, tmp_path, tiny_model_template):
    elsewhere = place(tiny_model_template, tmp_path / "elsewhere" / "tiny")
    server = make_server().start()
    with server.client() as client:
        refused = client.post("/models", json={"name": "t", "source": "local", "path": str(elsewhere)})
        assert refused.status_code == 403
        detail = refused.json()["detail"]
        assert str((server.home / "models").resolve()) in detail and str((server.home / "cache").resolve()) in detail
        assert "USF_ALLOWED_MODEL_ROOTS" in detail
        assert client.get("/models").json() == []
    server.stop()

    allowed = make_server(USF_ALLOWED_MODEL_ROOTS=str(tmp_path / "elsewhere")).start()
    with allowed.client() as client:
        created = client.post("/models", json={"name": "t", "source": "local", "path": str(elsewhere)})
        assert created.status_code == 201 and created.json()["path"] == str(elsewhere.resolve())


def test_huggingface_and_modelscope_caches(server, tiny_model_template, true_parameters):
    snapshot = fake_hf_cache(server.home / "cache" / "hub", "acme/tiny", tiny_model_template)
    fake_hf_cache(server.home / "cache" / "hub", "acme/tiny", tiny_model_template, revision="newer")
    (snapshot.parents[1] / "refs" / "main").write_text("abc")  # refs/main wins over the newest snapshot
    modelscope = place(tiny_model_template, server.home / "cache" / "modelscope" / "models" / "qwen" / "tiny")
    with server.client() as client:
        hf = client.post("/models", json={"name": "hf", "source": "huggingface", "repo_id": "acme/tiny"})
        assert hf.status_code == 201, hf.text
        assert (hf.json()["path"], hf.json()["repo_id"], hf.json()["source"]) == (str(snapshot), "acme/tiny", "huggingface")
        assert hf.json()["size_bytes"] == files_size(tiny_model_template)  # the blobs, not the links
        assert hf.json()["parameters"] == true_parameters
        ms = client.post("/models", json={"name": "ms", "source": "modelscope", "repo_id": "qwen/tiny"})
        assert ms.status_code == 201, ms.text
        assert (ms.json()["path"], ms.json()["source"], ms.json()["model_type"]) == (str(modelscope), "modelscope", "llama")
    assert snapshot.is_dir() and all((snapshot / p.name).is_symlink() for p in tiny_model_template.iterdir())


def test_source_not_enabled_is_422(make_server, tiny_model_template):
    server = make_server(SUPPORTED_MODEL_SOURCES="local").start()
    fake_hf_cache(server.home / "cache" / "hub", "acme/tiny", tiny_model_template)
    with server.client() as client:
        answer = client.post("/models", json={"name": "hf", "source": "huggingface", "repo_id": "acme/tiny"})
        assert answer.status_code == 422
        assert "'huggingface' is not enabled" in answer.json()["detail"] and "SUPPORTED_MODEL_SOURCES=local" in answer.json()["detail"]
        scanned = client.post("/models/scan").json()
        assert scanned == {"registered": [], "skipped": []}  # the HF cache is not a source here


def test_scan_registers_valid_folders_and_reports_the_rest(server, tiny_model_template, true_parameters):
    models = server.home / "models"
    place(tiny_model_template, models / "org--tiny")
    place(tiny_model_template, models / "already")
    (models / "broken").mkdir()
    (models / "broken" / "config.json").write_text('{"model_type": "llama"}')
    snapshot = fake_hf_cache(server.home / "cache" / "hub", "acme/tiny", tiny_model_template)
    ms_new = place(tiny_model_template, server.home / "cache" / "modelscope" / "models" / "qwen" / "tiny")
    ms_flat = place(tiny_model_template, server.home / "cache" / "modelscope" / "damo" / "small___v1")
    ms_pulled = place(tiny_model_template,   # the layout `models pull --source modelscope` writes
                      server.home / "cache" / "modelscope" / "models" / "acme--pulled" / "snapshots" / "master")
    with server.client() as client:
        assert client.post("/models", json={"name": "mine", "source": "local", "path": str(models / "already")}).status_code == 201
        result = client.post("/models/scan")
        assert result.status_code == 200, result.text
        registered = {m["name"]: m for m in result.json()["registered"]}
        assert set(registered) == {"org--tiny", "acme/tiny", "qwen/tiny", "damo/small.v1", "acme/pulled"}
        assert registered["acme/tiny"]["path"] == str(snapshot) and registered["acme/tiny"]["source"] == "huggingface"
        assert registered["qwen/tiny"]["path"] == str(ms_new) and registered["damo/small.v1"]["path"] == str(ms_flat)
        assert registered["acme/pulled"]["path"] == str(ms_pulled) and registered["acme/pulled"]["source"] == "modelscope"
        assert {m["source"] for m in registered.values()} == {"local", "huggingface", "modelscope"}
        assert all(m["parameters"] == true_parameters and m["valid"] for m in registered.values())
        skipped = {Path(s["path"]).name: s["reason"] for s in result.json()["skipped"]}
        assert set(skipped) == {"already", "broken"}
        assert "already registered as 'mine'" in skipped["already"]
        assert "no weights:" in skipped["broken"] and "no tokenizer files:" in skipped["broken"]
        assert "config.json is missing" not in skipped["broken"]

        again = client.post("/models/scan").json()
        assert again["registered"] == [] and len(again["skipped"]) == 7
        assert sorted(m["name"] for m in client.get("/models").json()) == sorted([*registered, "mine"])
    assert (models / "broken").is_dir()


def test_keys_see_only_their_models(make_server, tiny_model_template):
    server = make_server(USF_REQUIRE_AUTH="1").start()
    admin, key_a, key_b = server.create_key("admin", admin=True), server.create_key("a"), server.create_key("b")
    folder = place(tiny_model_template, server.home / "models" / "org--tiny")
    with server.client(key_a) as a, server.client(key_b) as b, server.client(admin) as root, server.client() as anonymous:
        model = a.post("/models", json={"name": "tiny", "source": "local", "path": str(folder)}).json()
        for ref in (model["id"], "tiny"):
            assert b.get(f"/models/{ref}").status_code == 404
            assert b.get(f"/models/{ref}").json()["detail"] == f"no model {ref!r}"
            assert b.delete(f"/models/{ref}").status_code == 404
        assert b.get("/models").json() == []
        assert b.get("/models/nonexistent").json()["detail"] == "no model 'nonexistent'"
        assert anonymous.get("/models").status_code == 401
        assert anonymous.post("/models", json={"name": "x", "source": "local", "path": str(folder)}).status_code == 401
        assert anonymous.post("/models/scan").status_code == 401

        theirs = b.post("/models", json={"name": "tiny", "source": "local", "path": str(folder)})
        assert theirs.status_code == 201  # names are unique per key
        assert [m["id"] for m in a.get("/models").json()] == [model["id"]]
        assert sorted(m["id"] for m in root.get("/models").json()) == sorted([model["id"], theirs.json()["id"]])
        assert root.get(f"/models/{model['id']}").status_code == 200
        assert b.post("/models/scan").json()["registered"] == []  # org--tiny is b's already (same path)
        assert a.get(f"/models/{model['id']}").json() == model


def test_traversal_is_refused(server, tmp_path, tiny_model_template):
    models = server.home / "models"
    outside = place(tiny_model_template, tmp_path / "outside")
    os.symlink(outside, models / "link")
    sneaky = place(tiny_model_template, models / "sneaky")
    (sneaky / "config.json").unlink()
    os.symlink(outside / "config.json", sneaky / "config.json")
    with server.client() as client:
        for path in ["../../etc", f"{models}/../../etc", str(models / "link"), "link", "link/../link", str(sneaky),
                     str(outside), "/etc", "~"]:
            answer = client.post("/models", json={"name": "t", "source": "local", "path": path})
            assert answer.status_code == 403, (path, answer.text)
        for repo_id in ["../etc", "a/..", "./a", "a/b/../../c", "a\\..\\b"]:
            for source in ("huggingface", "modelscope"):
                assert client.post("/models", json={"name": "t", "source": source, "repo_id": repo_id}).status_code == 422
        assert client.post("/models", json={"name": "t", "source": "local", "path": "a\x00b"}).status_code == 422

        scanned = client.post("/models/scan").json()
        assert scanned["registered"] == []
        reasons = {Path(s["path"]).name: s["reason"] for s in scanned["skipped"]}
        assert set(reasons) == {"link", "sneaky"}
        assert "outside the folders models may be registered from" in reasons["link"]
        assert "config.json in" in reasons["sneaky"] and "links outside" in reasons["sneaky"]
        assert client.get("/models").json() == []

        place(tiny_model_template, models / "real")
        assert client.post("/models", json={"name": "x", "source": "local", "path": "real"}).status_code == 201
        for ref in ["../x", "%2e%2e%2fx", "%252e%252e%252fx", "..%5cx", "..%2f..%2fx", "x%00"]:
            answer = client.get(f"/models/{ref}")
            assert answer.status_code == 404, ref
            if ref != "../x":  # httpx removes the dot segment itself; the rest reach the route as a name
                assert answer.json()["detail"].startswith("no model "), (ref, answer.text)
            assert client.delete(f"/models/{ref}").status_code == 404, ref
        assert [m["name"] for m in client.get("/models").json()] == ["x"]
    assert (outside / "config.json").is_file()
