"""The chat playground in Chromium: two adapters and their base answer one prompt side by side, streamed, each
answer the same as the API's; the conversation goes on; the job page's Chat button opens it on its adapter."""

from __future__ import annotations

import httpx
from playwright.sync_api import expect

from tests.api.flows import final, job_spec, register_model, submit, tiny_model_in, upload_dataset, wait_for
from tests.conftest import chat_rows, write_jsonl


def test_two_adapters_and_the_base_side_by_side(server, page, tiny_model_template, tmp_path):
    client = server.client()
    register_model(client, "tiny", tiny_model_in(server.home, tiny_model_template))
    upload_dataset(client, write_jsonl(tmp_path / "chat.jsonl", chat_rows(12)), name="chat")
    jobs = [submit(client, job_spec("tiny", "chat", name=f"a{i}", max_steps=3, val_split=0.0, learning_rate=lr, seed=i))
            for i, lr in ((1, 2e-2), (2, 5e-2))]
    done = [wait_for(client, job["id"], final) for job in jobs]
    assert [j["status"] for j in done] == ["completed", "completed"]
    names = [f"ft:tiny:{j['name']}:{j['id']}" for j in done]

    def api_answer(model: str, messages: list[dict]) -> str:
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": model, "messages": messages, "temperature": 0, "top_p": 1, "max_tokens": 10})
        return reply.json()["choices"][0]["message"]["content"]

    page.goto(f"/jobs/{done[0]['id']}")
    page.click("#chat-adapter")
    expect(page).to_have_url(f"{server.url}/chat?model={done[0]['id']}")
    expect(page.locator(f'#chat-models input[value="{names[0]}"]')).to_be_checked()
    expect(page.locator('#chat-models input[value="tiny"]')).to_be_checked()        # its base beside it
    page.check(f'#chat-models input[value="{names[1]}"]')
    expect(page.locator(".chat-column")).to_have_count(3)
    page.fill("#chat-max-tokens", "10")
    page.fill("#chat-prompt", "What is 3 plus 0?")
    page.click("#chat-send")
    for model in ("tiny", *names):
        answer = page.locator(f'.chat-column[data-model="{model}"] .chat-assistant[data-state="done"]')
        expect(answer).to_have_count(1)
        expect(answer).to_have_text(api_answer(model, [{"role": "user", "content": "What is 3 plus 0?"}]))
    texts = [page.locator(f'.chat-column[data-model="{m}"] .chat-assistant').inner_text() for m in ("tiny", *names)]
    assert len(set(texts)) == 3, texts
    expect(page.locator("#chat-curl")).to_contain_text('"model":"tiny"')
    expect(page.locator("#chat-python")).to_contain_text("client.chat.completions.create(")

    # the conversation goes on: the second answer is the API's for the whole history
    page.fill("#chat-prompt", "And 4 plus 1?")
    page.click("#chat-send")
    second = page.locator(f'.chat-column[data-model="{names[1]}"] .chat-assistant[data-state="done"]')
    expect(second).to_have_count(2)
    history = [{"role": "user", "content": "What is 3 plus 0?"}, {"role": "assistant", "content": texts[2]},
               {"role": "user", "content": "And 4 plus 1?"}]
    expect(second.nth(1)).to_have_text(api_answer(names[1], history))
