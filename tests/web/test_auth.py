"""With authentication on, the UI asks for a key, sends it with every request, shows each key only its
own data (pages and server-rendered fragments alike), and manages keys for an admin."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.api.flows import upload_dataset
from tests.conftest import chat_rows, write_jsonl


def enter_key(page, key: str) -> None:
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    page.fill("#key-input", key)
    page.click("#key-submit")
    expect(dialog).to_be_hidden()


def test_keys_page_asks_for_a_key_creates_and_revokes_and_fragments_stay_scoped(make_server, open_page, console,
                                                                                  tmp_path):
    server = make_server(USF_REQUIRE_AUTH="1").start()
    admin_key = server.create_key("root", admin=True)
    with server.client(admin_key) as admin:
        upload_dataset(admin, write_jsonl(tmp_path / "secret.jsonl", chat_rows(4)), name="admin-secret")

    page = open_page(server.url)
    data = []            # (page, request) of every /api and /ui request either browser sends
    unauthorized = []    # (page, url) of every 401 either browser gets
    page.on("request", lambda r: data.append(("admin", r)) if "/api/" in r.url or "/ui/" in r.url else None)
    page.on("response", lambda r: unauthorized.append(("admin", r.url)) if r.status == 401 else None)
    # nothing is asked of the server without a key: the dialog comes first
    page.goto("/")
    expect(page.locator("#key-dialog")).to_be_visible()
    page.wait_for_load_state("networkidle")
    assert data == [], [r.url for _, r in data]
    enter_key(page, admin_key)
    expect(page.locator("#disk-free")).to_be_visible()
    # from then on, every request carries the key
    assert data and all(r.headers.get("authorization") == f"Bearer {admin_key}" for _, r in data), \
        [(r.url, r.headers.get("authorization")) for _, r in data]
    expect(page.locator('nav a[href="/keys"]')).to_be_visible()
    expect(page.locator("#forget-key")).to_be_visible()

    page.click('nav a[href="/keys"]')
    expect(page.locator("#keys-table")).to_contain_text("root")        # the key is kept for this tab
    page.fill("#new-key-name", "ci-bot")
    page.click("#create-key")
    expect(page.locator("#new-key")).to_be_visible()
    user_key = page.locator("#new-key-value").inner_text()
    assert user_key and user_key != admin_key
    row = page.locator('#keys-table tr[data-key-name="ci-bot"]')
    expect(row).to_be_visible()
    expect(row.locator(".tag")).to_have_text("user")
    assert user_key not in page.locator("#keys-table").inner_text()  # only its prefix is listed

    # the new key, in another browser: it sees none of the admin's datasets, not even in server-rendered HTML
    other = open_page(server.url)
    other.on("request", lambda r: data.append(("user", r)) if "/api/" in r.url or "/ui/" in r.url else None)
    other.on("response", lambda r: unauthorized.append(("user", r.url)) if r.status == 401 else None)
    other.goto("/datasets")
    expect(other.locator("#key-dialog")).to_be_visible()
    other.wait_for_load_state("networkidle")
    assert [who for who, _ in data].count("user") == 0
    enter_key(other, user_key)
    expect(other.locator("#datasets-table")).to_contain_text("No datasets yet")
    html = other.request.get(f"{server.url}/ui/datasets", headers={"Authorization": f"Bearer {user_key}"}).text()
    assert "admin-secret" not in html
    assert other.request.get(f"{server.url}/ui/datasets").status == 401
    other.goto("/keys")
    expect(other.locator("#keys-table")).to_contain_text("Managing keys needs an admin key")
    assert "root" not in other.locator("#keys-table").inner_text()

    # revoking it (two clicks) locks that browser out: its next request brings the dialog back
    assert unauthorized == []                         # no 401 so far: every request had a valid key
    console.allow(r"status of 401|Error Code 401")   # the revoked key's, checked below (htmx logs it too)
    row.locator("button[data-revoke]").click()
    expect(row.locator("button[data-revoke]")).to_have_text("Confirm revoke")
    row.locator("button[data-revoke]").click()
    expect(row.locator(".badge")).to_have_text("revoked")
    other.goto("/datasets")
    expect(other.locator("#key-dialog")).to_be_visible()
    expect(other.locator("#key-error")).to_contain_text("refused the key")
    assert unauthorized and {who for who, _ in unauthorized} == {"user"}, unauthorized

    # the admin's own view still has the dataset; forgetting the key asks again
    page.goto("/datasets")
    expect(page.locator("#datasets-table")).to_contain_text("admin-secret")
    page.click("#forget-key")
    expect(page.locator("#key-dialog")).to_be_visible()
