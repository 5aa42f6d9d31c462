"""The dataset page shows the system prompt the model's chat template adds to rows without one, marked as added,
and the token counts include it (issue 18, item 10)."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.api.flows import register_model, tiny_model_in, upload_dataset
from tests.conftest import write_jsonl
from tests.engine.test_template_system_prompt import DEFAULT, WITH_DEFAULT

ROWS = [{"messages": [{"role": "user", "content": f"What is {i}?"}, {"role": "assistant", "content": f"It is {i}."}]}
        for i in range(6)]
ROWS[1] = {"messages": [{"role": "system", "content": "Be brief."}, *ROWS[1]["messages"]]}


def test_the_added_system_prompt_is_shown_and_counted(server, page, tiny_model_template, tmp_path):
    client = server.client()
    register_model(client, "plain", tiny_model_in(server.home, tiny_model_template, name="test--plain"))
    dataset = upload_dataset(client, write_jsonl(tmp_path / "chat.jsonl", ROWS), name="chat")
    plain = client.get("/datasets/chat", params={"model": "plain"}).json()
    assert plain["template_system_prompt"] is None
    register_model(client, "smol", tiny_model_in(server.home, name="test--smol", chat_template=WITH_DEFAULT))
    smol = client.get("/datasets/chat", params={"model": "smol"}).json()
    assert smol["template_system_prompt"] == DEFAULT
    # the same tokenizer, so the difference is the added turn, in every row but the one with its own system turn
    assert smol["token_stats"]["min"] > plain["token_stats"]["min"]

    page.goto(f"/datasets/{dataset['id']}")          # the newest model (smol) counts by default
    first = page.locator('#preview article[data-line="1"]')
    expect(first.locator(".bubble.system.added")).to_have_text(
        f"system · added by smol's chat template, counted in the tokens{DEFAULT}")
    expect(page.locator('#preview article[data-line="2"] .bubble.added')).to_have_count(0)   # it has its own
    expect(page.locator('#preview article[data-line="2"] .bubble.system')).to_contain_text("Be brief.")
    page.select_option("#stats-model", label="plain")
    expect(page.locator("#preview .bubble.added")).to_have_count(0)
