"""The page in real headless Chromium (Debian's package, driven by Playwright).

Screenshots of the main states land in .data/screenshots/.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from playwright.async_api import Browser, Page, WebSocket, async_playwright, expect

from gpu_worker.pipeline import DiffusersPipeline
from stepcast.settings import DATA_DIR, Settings
from tests.conftest import TINY_XL, Stack, StepcastProcess
from tests.test_recovery import job_row

SHOTS = DATA_DIR / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
LONG = {"steps": "150", "width": "256", "height": "256"}  # about 7 s on the tiny model here
SLOW_MS = 80_000  # a loaded 2-core machine can take several times longer than that


expect.set_options(timeout=15_000)  # every check: generous for a busy 2-core CI machine


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make deps installs it)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1100, "height": 900})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    await context.close()
    assert errors == [], errors  # no uncaught script errors


async def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def submit(page: Page, prompt: str, **fields: str) -> None:
    await page.get_by_label("Prompt", exact=True).fill(prompt)
    for label, value in {"Steps": fields.get("steps"), "Width": fields.get("width"),
                         "Height": fields.get("height"), "Seed": fields.get("seed")}.items():  # fmt: skip
        if value is not None:
            await page.get_by_label(label, exact=False).first.fill(value)
    await page.get_by_role("button", name="Generate").click()


def job_frames(page: Page) -> list[dict[str, Any]]:
    """Every job event the page receives over its WebSockets, across reconnects."""
    frames: list[dict[str, Any]] = []

    def on_socket(socket: WebSocket) -> None:
        socket.on("framereceived", lambda payload: frames.append(json.loads(payload)))

    page.on("websocket", on_socket)
    return frames


def assert_no_gap_no_duplicate(frames: list[dict[str, Any]]) -> None:
    seqs = [f["seq"] for f in frames if "seq" in f and f["type"] != "snapshot"]
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), seqs


# The default, safe mode: the page works on its own signed session cookie.
@pytest.mark.parametrize("settings", [{"auth": "single_user"}, {"auth": "keys"}], indirect=True)
async def test_submit_and_watch_it_paint(stack: Stack, page: Page) -> None:
    frames = job_frames(page)
    await page.goto(str(stack.client.base_url))
    await expect(page.locator("#connection")).to_have_text("Live")
    await shot(page, "1-empty")
    await submit(page, "a red fox in the snow", steps="40", seed="7")
    card = page.locator(".job").first
    await expect(card.locator(".state")).to_have_text(re.compile(r"^Done"), timeout=SLOW_MS)
    bar = card.get_by_role("progressbar")
    await expect(bar).to_have_attribute("aria-valuenow", "40")
    await expect(bar).to_have_attribute("aria-valuetext", "step 40 of 40 (100%)")
    image = card.locator("figure img")
    await expect(image).to_have_js_property("complete", True)
    assert await image.evaluate("img => img.naturalWidth") == 64
    link = card.get_by_role("link", name="Download (seed 7)")
    assert re.fullmatch(r"/v1/images/[0-9a-f-]{36}/1/0\.png", await link.get_attribute("href") or "")
    await expect(card.locator(".params")).to_contain_text("Seed7")
    await shot(page, "3-completed")
    progress = [f["step"] for f in frames if f.get("type") == "progress"]
    assert progress == list(range(1, 41))
    assert any("preview" in f for f in frames if f.get("type") == "progress")
    owner = await stack.db.pool.fetchval("SELECT owner FROM jobs")
    assert owner == "anonymous" if stack.settings.auth == "single_user" else owner.startswith("anon_")


async def test_progress_and_preview_while_painting_then_cancel(stack: Stack, page: Page) -> None:
    await page.goto(str(stack.client.base_url))
    await submit(page, "a slow lighthouse", **LONG)
    card = page.locator(".job").first
    await expect(card.locator(".state")).to_have_text("Painting…")
    await expect(card.locator("img.preview")).to_be_visible()
    await expect(card.locator(".timing")).to_contain_text("elapsed")
    await shot(page, "2-painting")
    await card.get_by_role("button", name="Cancel").click()
    await expect(card.locator(".state")).to_have_text("Canceled")
    assert int(await card.get_by_role("progressbar").get_attribute("aria-valuenow") or 0) < 150
    job = (await stack.client.get("/v1/jobs")).json()["items"][0]
    assert job["status"] == "canceled"


async def test_several_jobs_at_once_and_cancel_while_queued(stack: Stack, page: Page) -> None:
    await page.goto(str(stack.client.base_url))
    await submit(page, "first", **LONG)
    await submit(page, "second", steps="10")
    cards = page.locator(".job")
    await expect(cards).to_have_count(2)
    second, first = cards.nth(0), cards.nth(1)
    await expect(second.locator(".state")).to_have_text(re.compile("number 1 in the queue"))
    await shot(page, "4-queued")
    await second.get_by_role("button", name="Cancel").click()
    await expect(second.locator(".state")).to_have_text("Canceled")
    await expect(first.locator(".state")).to_have_text("Painting…")  # undisturbed
    await first.get_by_role("button", name="Cancel").click()
    await expect(first.locator(".state")).to_have_text("Canceled")


async def test_form_checks_the_limits_in_words(stack: Stack, page: Page) -> None:
    await page.goto(str(stack.client.base_url))
    await expect(page.locator("#connection")).to_have_text("Live")
    await submit(page, "p", steps="500", width="70")
    error = page.get_by_role("alert").first
    await expect(error).to_have_text("Steps must be between 1 and 150. Width must be a multiple of 8.")
    await expect(page.get_by_label("Steps")).to_have_attribute("aria-invalid", "true")
    await expect(page.locator(".job")).to_have_count(0)
    await submit(page, "   ", steps="20", width="64")
    await expect(error).to_have_text("Write a prompt first.")
    await shot(page, "5-validation")


@pytest.mark.parametrize("settings", [{"catalog_cache_s": 0}], indirect=True)
async def test_the_model_selector_shows_each_models_workers_and_limits_and_sends_the_choice(
    stack: Stack, page: Page, run_worker: Callable[..., Awaitable[None]]
) -> None:
    xl = stack.settings.model_copy(update={**TINY_XL, "default_size_px": None})
    await run_worker(xl)
    await page.goto(str(stack.client.base_url))
    await expect(page.locator("#connection")).to_have_text("Live")
    model = page.get_by_label("Model")
    await expect(model.locator("option")).to_have_text(["tiny (sd1) — 1 worker", "tiny-xl (sdxl) — 1 worker"])
    await expect(model).to_have_value("tiny")
    await expect(page.get_by_label("Width")).to_have_value("64")
    await model.select_option("tiny-xl")  # its own defaults: SDXL's tiny shape is native at 128 px
    await expect(page.get_by_label("Width")).to_have_value("128")
    await expect(page.locator("#model-status")).to_contain_text("nobody waiting")
    await submit(page, "a fox in another model", steps="3", width="64", height="64")
    card = page.locator(".job").first
    await expect(card.locator(".state")).to_have_text(re.compile("^Done"), timeout=SLOW_MS)
    await expect(card.locator(".params")).to_contain_text("tiny-xl")
    await shot(page, "10-models")


async def test_a_failed_job_says_why(
    stack: Stack, page: Page, pipeline: DiffusersPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(pipeline.pipe.unet, "forward", broken)
    await page.goto(str(stack.client.base_url))
    await submit(page, "doomed", steps="5")
    card = page.locator(".job").first
    await expect(card.locator(".error")).to_have_text(
        "This job failed: RuntimeError: CUDA out of memory (injected) (pipeline_error)."
    )
    await shot(page, "6-failed")


async def test_reload_mid_job_reattaches(stack: Stack, page: Page) -> None:
    frames = job_frames(page)
    await page.goto(str(stack.client.base_url))
    await submit(page, "a patient owl", **LONG)
    card = page.locator(".job").first
    await expect(card.locator(".state")).to_have_text("Painting…")
    await page.reload()
    card = page.locator(".job").first
    await expect(card.locator(".prompt")).to_have_text("a patient owl")
    await expect(card.locator(".state")).to_have_text("Painting…")
    await expect(card.locator(".state")).to_have_text(re.compile("^Done"), timeout=SLOW_MS)
    await expect(card.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "150")
    steps = [f["step"] for f in frames if f.get("type") == "progress"]
    assert steps[-1] == 150


async def test_server_restart_mid_job_resumes_without_losing_a_step(
    make_settings: Callable[..., Settings],
    spawn: Callable[[str, Settings], Awaitable[StepcastProcess]],
    run_worker: Callable[..., Awaitable[None]],
    page: Page,
) -> None:
    settings = make_settings()
    server = await spawn("server.app", settings)
    await run_worker(settings)
    frames = job_frames(page)
    await page.goto(server.base_url)
    await submit(page, "a storm over the sea", **LONG)
    card = page.locator(".job").first
    bar = card.get_by_role("progressbar")
    await expect(bar).to_have_attribute("aria-valuenow", re.compile(r"^[1-9]\d+$"), timeout=SLOW_MS)  # >= 10
    server.kill()
    await expect(page.locator("#connection")).to_contain_text("Connection lost")
    await shot(page, "7-server-down")
    server.start()
    await expect(page.locator("#connection")).to_have_text("Live", timeout=SLOW_MS)
    await expect(card.locator(".state")).to_have_text(re.compile("^Done"), timeout=SLOW_MS)
    await expect(bar).to_have_attribute("aria-valuenow", "150")
    job_frames_seen = [f for f in frames if f.get("job_id")]
    assert_no_gap_no_duplicate(job_frames_seen)
    await shot(page, "8-resumed")
    row = await job_row(settings, job_frames_seen[0]["job_id"])
    assert (row["status"], row["attempt"], row["progress_step"]) == ("completed", 1, 150)


async def test_phone_width_and_labels(stack: Stack, browser: Browser) -> None:
    context = await browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True)
    page = await context.new_page()
    await stack.wait((await stack.submit(steps=4))["id"])
    await page.goto(str(stack.client.base_url))
    await expect(page.locator(".job")).to_have_count(1)
    labels = ("Model", "Prompt", "Negative prompt", "Steps", "Width", "Height", "Guidance", "Seed", "Images")
    for label in labels:
        await expect(page.get_by_label(label, exact=False).first).to_be_visible()
    assert await page.evaluate("document.documentElement.scrollWidth") <= 375
    await page.get_by_label("Prompt", exact=True).focus()
    await page.keyboard.type("typed on a phone")
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.id") == "negative_prompt"
    await shot(page, "9-phone")
    await context.close()
