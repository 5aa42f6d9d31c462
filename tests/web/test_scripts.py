"""The page scripts against answers the API is made to give (Playwright routes): the job page's ETA and its
reading of datetimes, the status groups the server hands to the scripts, and the new-job page's handling of
a 422 error list, a plain error and a superseded estimate. No job runs; only the page shells are real."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

from playwright.sync_api import expect

from usf_bios.control.lifecycle import JobStatus
from usf_bios.web.render import JOB_STATUSES

JOB_ID = "eta-job-0001"
FAR_FROM_UTC = "Asia/Kolkata"   # UTC+5:30 all year: a datetime read as local time is off by hours


def job_row(started_at: str, current_step: int, total_steps: int = 130) -> dict:
    return {"id": JOB_ID, "name": "eta", "status": "running", "stage": "training",
            "progress": current_step / total_steps, "current_step": current_step, "total_steps": total_steps,
            "current_epoch": 0.5, "metrics": {}, "error": None, "created_at": started_at, "started_at": started_at, "finished_at": None, "attempts": 1, "max_attempts": 3,
            "model_id": None, "dataset_id": None, "num_gpus": 0, "spec": {"name": "eta"}, "artifact": None}


def sse(events: list[dict], status: dict) -> str:
    """The events as /events sends them: engine events with their line number as id, then a status row."""
    blocks = [f"id: {i}\nevent: {e['type']}\ndata: {json.dumps(e)}\n\n" for i, e in enumerate(events)]
    return "retry: 1000\n\n" + "".join(blocks) + f"event: status\ndata: {json.dumps(status)}\n\n"


def metrics(steps: range, seconds: float) -> list[dict]:
    return [{"type": "metric", "ts": 0, "step": s, "loss": 1.0, "learning_rate": 1e-4, "tokens": 100,
             "step_seconds": seconds, "tokens_per_second": 100 / seconds} for s in steps]


class FakeJob:
    """Answers the job page's /api/jobs/JOB_ID/… requests. The first /events request of a page gets
    ``self.events``; a reconnect (it sends Last-Event-ID) is held unanswered, so nothing more arrives."""

    def __init__(self, job: dict, events: str = ""):
        self.job, self.events, self.held = job, events, []

    def __call__(self, route) -> None:
        request = route.request
        path = request.url.split("?", 1)[0].split(f"/api/jobs/{JOB_ID}", 1)[1]
        if path == "/events":
            if self.events and "last-event-id" not in request.headers:
                route.fulfill(status=200, content_type="text/event-stream", body=self.events)
            else:
                self.held.append(route)
        elif path == "":
            route.fulfill(json=self.job)
        elif path in ("/metrics", "/checkpoints"):
            route.fulfill(json=[])
        elif path == "/logs":
            route.fulfill(content_type="text/plain", body="step 1/130 loss 1.0\n")
        elif path == "/placement":     # the job page's "where it runs" line
            route.fulfill(json={"executor": "local", "where": "local process 4242", "remote_status": None,
                                "remote_stage": None, "remote_job_id": None})
        else:
            route.fulfill(status=404, json={"detail": "not faked"})


def test_eta_from_recent_step_seconds_restarted_by_a_resume(server, open_page):
    page = open_page(server.url, timezone_id=FAR_FROM_UTC)
    long_ago = (datetime.now(timezone.utc) - timedelta(hours=3)).isoformat()
    status = {"status": "running", "stage": "training", "progress": 30 / 130, "current_step": 30, "total_steps": 130,
              "error": None, "attempts": 1}
    # ten slow first steps, then twenty at 2 s: only the last 20 count, 100 steps left → 200 s
    fake = FakeJob(job_row(long_ago, 30), sse(metrics(range(1, 11), 30.0) + metrics(range(11, 31), 2.0), status))
    page.route(re.compile(rf"/api/jobs/{JOB_ID}(/|\?|$)"), fake)
    page.goto(f"/jobs/{JOB_ID}")
    expect(page.locator("#job-eta")).to_have_text("about 3 min 20 s left")
    expect(page.locator("#job")).to_have_attribute("data-last-event-id", "29")
    expect(page.locator("#cancel-job")).to_be_visible()           # running: cancellable, not resumable
    expect(page.locator("#resume-job")).to_be_hidden()

    # a resume redoes steps 25-30 at 1 s each: the window starts again from them → 100 s
    fake.events = sse(metrics(range(1, 11), 30.0) + metrics(range(11, 31), 2.0) + metrics(range(25, 31), 1.0), status)
    page.reload()
    expect(page.locator("#job-eta")).to_have_text("about 1 min 40 s left")
    expect(page.locator("#loss-chart")).to_have_attribute("data-points", "30")


def test_eta_without_step_times_counts_from_a_utc_start(server, open_page):
    """No step_seconds yet: the time since started_at over the steps done; a datetime without an offset is UTC."""
    page = open_page(server.url, timezone_id=FAR_FROM_UTC)
    naive_utc = (datetime.now(timezone.utc) - timedelta(seconds=100)).replace(tzinfo=None).isoformat()
    fake = FakeJob(job_row(naive_utc, 10, total_steps=110))    # 10 s a step, 100 left → about 1000 s
    page.route(re.compile(rf"/api/jobs/{JOB_ID}(/|\?|$)"), fake)
    page.goto(f"/jobs/{JOB_ID}")
    expect(page.locator("#job-eta")).to_have_text(re.compile(r"^about 1[67] min \d+ s left$"))

    parsed = page.evaluate("""async () => {
      const { parseDate } = await import("/static/js/app.js");
      return ["2026-03-01T14:05:00", "2026-03-01T14:05:00.123456", "2026-03-01 14:05:00", "2026-03-01T14:05:00Z",
              "2026-03-01T16:05:00+02:00", "2026-03-01T09:05:00-0500", "not a date"]
        .map((s) => parseDate(s)?.toISOString() ?? null);
    }""")
    assert parsed == ["2026-03-01T14:05:00.000Z", "2026-03-01T14:05:00.123Z", "2026-03-01T14:05:00.000Z",
                      "2026-03-01T14:05:00.000Z", "2026-03-01T14:05:00.000Z", "2026-03-01T14:05:00.000Z", None]


def test_status_groups_come_from_the_server(page):
    page.goto("/jobs")
    assert json.loads(page.locator("body").get_attribute("data-job-statuses")) == JOB_STATUSES
    assert JOB_STATUSES["final"] == [s.value for s in JobStatus if s.is_terminal]
    options = page.locator("#status-filter option").evaluate_all("nodes => nodes.map((n) => n.value)")
    assert options == ["", *(s.value for s in JobStatus)]


# ---- the new-job page -------------------------------------------------------------------------------
ESTIMATE = {"estimated_seconds": 90, "peak_vram_gb": None, "cost": 0, "price_per_gpu_hour": 0, "steps": 42,
            "trained_tokens": 5000, "lora_parameters": 1000, "assumptions": "", "global_batch": 8, "strategy": "single"}


def fake_choices(page) -> None:
    models = [{"id": "m1", "name": "tiny", "valid": True}]
    page.route(lambda url: url.endswith("/api/models"), lambda r: r.fulfill(json=models))
    page.route(lambda url: url.endswith("/api/datasets"), lambda r: r.fulfill(json=[{"id": "d1", "name": "chat"}]))


def test_new_job_places_each_422_error_beside_its_field(page, console):
    console.allow(r"status of 422")      # the answers faked below
    answers = [(422, {"detail": "hyperparameters.lora_r: too large for this model; base_model: not usable; general",
                      "errors": [{"field": "hyperparameters.lora_r", "message": "too large for this model"},
                                 {"field": "base_model", "message": "not usable"},
                                 {"field": "", "message": "general trouble"}]}),
               (422, {"detail": "hyperparameters.lora_r: a plain detail is not taken apart"})]
    fake_choices(page)

    def answer(route) -> None:
        status, body = answers.pop(0) if answers else (200, ESTIMATE)
        route.fulfill(status=status, json=body)

    page.route(lambda url: url.endswith("/api/jobs/estimate"), answer)
    page.goto("/jobs/new")
    expect(page.locator("#f-hyperparameters-lora-r-error")).to_have_text("too large for this model")
    expect(page.locator("#f-hyperparameters-lora-r")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#f-base-model-error")).to_have_text("not usable")
    expect(page.locator("#estimate-state")).to_have_text("No estimate: general trouble")

    page.fill("#f-hyperparameters-lora-r", "8")       # the next answer: a plain detail, shown whole
    plain = "No estimate: hyperparameters.lora_r: a plain detail is not taken apart"
    expect(page.locator("#estimate-state")).to_have_text(plain)
    expect(page.locator("#f-hyperparameters-lora-r-error")).to_be_empty()
    page.fill("#f-hyperparameters-lora-r", "16")
    expect(page.locator("#est-steps")).to_have_text("42")
    expect(page.locator("#f-base-model-error")).to_be_empty()

    # the submit's 422 goes beside its field too, and the field takes the focus
    page.route(lambda url: url.endswith("/api/jobs"), lambda r: r.fulfill(
        status=422, json={"detail": "name: taken", "errors": [{"field": "name", "message": "taken"}]}))
    page.click("#start-job")
    expect(page.locator("#f-name-error")).to_have_text("taken")
    expect(page.locator("#f-name")).to_be_focused()
    expect(page.locator("#form-error")).to_be_hidden()


def test_a_superseded_estimate_leaves_the_newer_one_busy(page):
    held = []
    fake_choices(page)
    page.route(lambda url: url.endswith("/api/jobs/estimate"), lambda route: held.append(route))
    with page.expect_request(lambda r: r.url.endswith("/api/jobs/estimate")):
        page.goto("/jobs/new")                      # the first estimate, held unanswered
    with page.expect_request(lambda r: r.url.endswith("/api/jobs/estimate")):
        page.fill("#f-hyperparameters-max-steps", "7")   # the second one aborts the first
    page.wait_for_timeout(500)                      # time for the aborted request to wind up
    expect(page.locator("#estimate")).to_have_class(re.compile(r"\bbusy\b"))
    expect(page.locator("#estimate-state")).to_have_text("Estimating…")
    assert len(held) == 2
    held[1].fulfill(json=ESTIMATE)
    expect(page.locator("#est-steps")).to_have_text("42")
    expect(page.locator("#estimate")).not_to_have_class(re.compile(r"\bbusy\b"))
