"""The official ``openai`` client against a real server on loopback, on a tiny real model: files, fine-tuning jobs
(the same jobs as /api), events, checkpoints, paging, cancel, chat and completions from the trained adapters (two
adapters on one base loaded once), streaming, and what another key cannot see."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.api.flows import register_model, tiny_model_in
from tests.conftest import chat_rows, write_jsonl

FAST = {"hyperparameters": {"max_steps": 4, "save_steps": 2, "max_seq_length": 64, "lora_r": 4, "lora_alpha": 8,
                            "val_split": 0.0, "gradient_checkpointing": False, "warmup_ratio": 0.0}}


def client_for(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=300)


def wait_done(client: openai.OpenAI, job_id: str, timeout: float = 900):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise TimeoutError(job)


def ask(client: openai.OpenAI, model: str, **kw) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 3 plus 0?"}],
                                           temperature=0, max_tokens=12, **kw)
    return reply.choices[0].message.content


@pytest.fixture
def keyed(make_server, tiny_model_template):
    server = make_server(USF_REQUIRE_AUTH="1").start()
    tiny_model_in(server.home, tiny_model_template)
    return server, server.create_key("alice"), server.create_key("bob"), server.create_key("root", admin=True)


def test_fine_tune_with_the_openai_client_then_chat_with_the_adapters(keyed, tmp_path):
    server, alice_key, bob_key, admin_key = keyed
    alice, bob = client_for(server, alice_key), client_for(server, bob_key)
    register_model(server.client(alice_key), "tiny", server.home / "models" / "test--tiny")

    # a bad file is refused, naming its line; nothing is registered
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat_rows(1)[0]) + "\n" + json.dumps(chat_rows(2)[1]) + "\n{not json\n")
    with pytest.raises(openai.BadRequestError) as refused:
        alice.files.create(file=bad.open("rb"), purpose="fine-tune")
    assert "bad.jsonl:3" in str(refused.value) and refused.value.body["param"] == "file"
    assert alice.files.list().data == []

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    file = alice.files.create(file=data.open("rb"), purpose="fine-tune")
    assert (file.filename, file.purpose, file.status) == ("chat.jsonl", "fine-tune", "processed")
    assert alice.files.retrieve(file.id).bytes == data.stat().st_size
    assert server.client(alice_key).get(f"/datasets/{file.id}").json()["rows"] == 24   # one store

    jobs = [alice.fine_tuning.jobs.create(model="tiny", training_file=file.id, suffix=f"tiny-{seed}", seed=seed,
                                          hyperparameters={"n_epochs": 1, "batch_size": 2,
                                                           "learning_rate_multiplier": multiplier},
                                          extra_body={"usf": FAST})
            for seed, multiplier in ((1, 15.0), (2, 40.0))]
    assert jobs[0].status == "queued" and jobs[0].fine_tuned_model is None and jobs[0].model == "tiny"
    assert jobs[0].hyperparameters.learning_rate_multiplier == 15.0 and jobs[0].hyperparameters.batch_size == 2
    same = server.client(alice_key).get(f"/jobs/{jobs[0].id}").json()     # the job of /api/jobs
    assert same["spec"]["hyperparameters"]["learning_rate"] == pytest.approx(15 * 2e-4)
    assert same["spec"]["hyperparameters"]["max_steps"] == 4

    done = [wait_done(alice, job.id) for job in jobs]
    assert [j.status for j in done] == ["succeeded", "succeeded"], [j.error for j in done]
    assert done[0].fine_tuned_model == f"ft:tiny:tiny-1:{jobs[0].id}" and done[0].trained_tokens > 0
    page = alice.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in page.data] == [jobs[1].id] and page.has_more
    assert [j.id for j in alice.fine_tuning.jobs.list(limit=1, after=jobs[1].id).data] == [jobs[0].id]

    events = alice.fine_tuning.jobs.list_events(jobs[0].id, limit=100).data
    assert events[0].message == "The job has successfully completed"          # newest first
    assert [e.data["step"] for e in events if e.type == "metrics"] == [4, 3, 2, 1]
    assert events[-1].message.startswith("Created fine-tuning job")
    checkpoints = alice.fine_tuning.jobs.checkpoints.list(jobs[0].id).data
    assert [c.step_number for c in checkpoints] == [2] and checkpoints[0].metrics.train_loss > 0

    models = [m.id for m in alice.models.list().data]
    assert models == ["tiny", done[0].fine_tuned_model, done[1].fine_tuned_model]
    answers = [ask(alice, name) for name in ("tiny", done[0].fine_tuned_model, done[1].fine_tuned_model)]
    assert len(set(answers)) == 3, answers       # two adapters and their base answer differently
    assert ask(alice, checkpoints[0].fine_tuned_model_checkpoint)   # a checkpoint is servable too
    # streaming yields the same text, then usage, then [DONE]
    chunks = list(alice.chat.completions.create(model=done[1].fine_tuned_model, stream=True, temperature=0,
                                                max_tokens=12, stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": "What is 3 plus 0?"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answers[2]
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].usage.prompt_tokens > 0
    completion = alice.completions.create(model=done[0].fine_tuned_model, prompt="The answer is", max_tokens=5,
                                          temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length") and completion.usage.completion_tokens <= 5
    for name in ("tiny", done[0].fine_tuned_model, done[1].fine_tuned_model):   # switching again: no reload
        ask(alice, name)
    state = httpx.get(server.url + "/api/inference", headers={"Authorization": f"Bearer {admin_key}"}).json()
    assert [(b["loads"], b["adapter_loads"]) for b in state["bases"]] == [(1, 3)]   # 2 adapters + the checkpoint

    # another key sees none of it
    with pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.retrieve(jobs[0].id)
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(file.id)
    with pytest.raises(openai.NotFoundError) as missing:
        ask(bob, done[0].fine_tuned_model)
    assert missing.value.body["code"] == "model_not_found"
    assert bob.models.list().data == [] and bob.fine_tuning.jobs.list().data == [] and bob.files.list().data == []
    with pytest.raises(openai.BadRequestError, match="training_file"):
        bob.fine_tuning.jobs.create(model="tiny", training_file=file.id)
    with pytest.raises(openai.AuthenticationError):
        client_for(server, "usf_not-a-key").models.list()

    # cancel: a long job stops as cancelled; a file in use cannot be deleted
    long = alice.fine_tuning.jobs.create(model="tiny", training_file=file.id,
                                         extra_body={"usf": {"hyperparameters": {**FAST["hyperparameters"],
                                                                                 "max_steps": 100000}}})
    assert alice.fine_tuning.jobs.cancel(long.id).status == "cancelled"
    assert wait_done(alice, long.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        alice.files.delete(file.id)


def test_loopback_without_keys_takes_any_client_key(server, tiny_model_template, tmp_path):
    tiny_model_in(server.home, tiny_model_template)
    register_model(server.client(), "tiny", server.home / "models" / "test--tiny")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="anything", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                           seed=1)
    assert reply.usage.completion_tokens <= 3 and reply.choices[0].message.role == "assistant"
    with pytest.raises(openai.BadRequestError) as refused:    # OpenAI's error shape names the field
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert refused.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="ft:tiny:x:nope-1", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=write_jsonl(tmp_path / "d.jsonl", chat_rows(2)).open("rb"), purpose="assistants")
    with pytest.raises(openai.AuthenticationError):   # a USF BIOS key is checked even on loopback
        openai.OpenAI(base_url=server.url + "/v1", api_key="usf_revoked", max_retries=0).models.list()


def test_a_full_queue_is_429_and_a_model_that_cannot_load_is_503(make_server, tiny_model_template):
    import threading

    server = make_server(USF_INFERENCE_QUEUE="1", USF_INFERENCE_BATCH="1").start()
    tiny_model_in(server.home, tiny_model_template)
    register_model(server.client(), "tiny", server.home / "models" / "test--tiny")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)
    # greedy on the tiny model: 900 tokens without an end of sequence
    long = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 900, "temperature": 0}
    running = client.chat.completions.create(stream=True, **long)
    next(iter(running))                                        # the first request is decoding
    waiting = threading.Thread(target=lambda: client.chat.completions.create(**{**long, "max_tokens": 2}))
    waiting.start()
    deadline = time.monotonic() + 30
    while server.client().get("/inference").json()["waiting"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as full:
        client.chat.completions.create(**long)
    assert full.value.body["code"] == "queue_full" and full.value.response.headers["retry-after"] == "1"
    running.close()                                            # the client goes away: its decoding stops
    waiting.join(60)

    broken = tiny_model_in(server.home, tiny_model_template, name="test--broken")
    register_model(server.client(), "broken", broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(openai.InternalServerError) as unavailable:
        client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}])
    assert unavailable.value.status_code == 503 and "could not be loaded" in unavailable.value.message
