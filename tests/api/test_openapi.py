"""The OpenAPI document describes every answer: each route's success response has a schema (or a declared media
type for streams and text), and the job, dataset, model and key answers are named models."""

from __future__ import annotations


def test_every_success_response_has_a_schema(local_app):
    document = local_app.client.get("http://127.0.0.1:8000/openapi.json").json()
    missing = []
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            for code, response in operation["responses"].items():
                if not code.startswith("2") or code == "204":
                    continue
                content = response.get("content") or {}
                schemas = [media.get("schema") for media in content.values()]
                typed = any(s and s != {} for s in schemas) or any(m in content for m in
                            ("text/event-stream", "application/x-tar", "text/plain"))
                if not typed:
                    missing.append(f"{method.upper()} {path} {code}")
    assert missing == []
    names = set(document["components"]["schemas"])
    assert {"JobPublic", "JobsPublic", "DatasetPublic", "DatasetDetail", "ModelPublic", "KeyPublic", "KeyCreated",
            "EstimatePublic", "MetricPointPublic", "CheckpointPublic", "PresetPublic", "HostFacts", "Health"} <= names
    job = document["paths"]["/api/jobs/{job_id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert job == {"$ref": "#/components/schemas/JobPublic"}
