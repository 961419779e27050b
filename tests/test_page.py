"""The web page and the API docs in a real headless Chromium (Debian's, driven by
Playwright): the flow a person goes through, with authentication off and on. A screenshot
of each page after the flow is written to .run/screenshots/ (not committed). Skipped,
saying why, where no browser is installed (.ci/run installs Debian's chromium)."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Page, async_playwright, expect

from devtools.processes import ROOT
from shared.settings import Settings
from tests.helpers import eventually, serving

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = ROOT / ".run" / "screenshots"
LIST = "/api/v1/wallets?limit=100"  # the wallet list the page loads
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"no browser: {CHROMIUM} is not installed (.ci/run installs Debian's chromium)",
)


@pytest.fixture(params=[False, True], ids=["auth-off", "auth-on"])
async def site(
    request: pytest.FixtureRequest, settings: Settings
) -> AsyncIterator[tuple[str, bool]]:
    secret = "page-" + "k" * 40 if request.param else ""
    async with serving(settings, auth_enabled=request.param, jwt_secret=secret) as (base, _):
        yield base, request.param


async def operate(page: Page, kind: str, amount: str) -> None:
    await page.get_by_label("Operation", exact=True).select_option(kind)
    await page.get_by_label("Amount", exact=True).fill(amount)
    await page.get_by_role("button", name="Send").click()


async def test_a_person_creates_a_wallet_operates_and_watches_the_hot_wallet(
    site: tuple[str, bool],
) -> None:
    base, auth = site
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = await browser.new_page(viewport={"width": 420, "height": 900})  # a phone
        problems: list[Any] = []
        # Script errors; a refused request's status is the browser's own note, not one.
        page.on(
            "console",
            lambda m: (
                problems.append(m.text)
                if m.type == "error" and not m.text.startswith("Failed to load resource")
                else None
            ),
        )
        page.on("pageerror", lambda e: problems.append(str(e)))
        await page.goto(base + "/")
        if auth:
            await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
            await page.get_by_label("Username", exact=True).fill("pat")
            await page.get_by_label("Password", exact=True).fill("a long enough password")
            await page.get_by_role("button", name="Create account").click()
            await expect(page.locator("#who")).to_have_text("Signed in as pat")

        await page.get_by_role("button", name="New wallet").click()
        await expect(page.locator("#message")).to_contain_text("New wallet")
        balance = page.locator("#balance")
        await expect(balance).to_have_text("0.00")
        await operate(page, "DEPOSIT", "10.25")
        await expect(balance).to_have_text("10.25")
        await operate(page, "WITHDRAW", "3.10")
        await expect(balance).to_have_text("7.15")
        await operate(page, "WITHDRAW", "100")
        await expect(page.locator("#message")).to_contain_text("Insufficient funds")
        await expect(balance).to_have_text("7.15")
        rows = page.locator("#history tbody tr")
        await expect(rows).to_have_count(3)
        await expect(rows.nth(0)).to_contain_text("rejected: insufficient funds")
        await expect(rows.nth(1)).to_contain_text("7.15")

        # A second wallet, and a transfer to it from the first: both histories show it.
        first = await page.get_by_label("Pick a wallet").input_value()
        await page.get_by_role("button", name="New wallet").click()
        await expect(balance).to_have_text("0.00")
        second = await page.get_by_label("Pick a wallet").input_value()
        await page.get_by_label("Pick a wallet").select_option(first)
        await expect(balance).to_have_text("7.15")
        await page.get_by_label("To wallet", exact=True).fill(second)
        await page.get_by_label("Amount to send", exact=True).fill("2.15")
        await page.get_by_role("button", name="Transfer", exact=True).click()
        await expect(page.locator("#message")).to_contain_text("Sent 2.15")
        await expect(balance).to_have_text("5.00")
        await expect(rows.nth(0)).to_contain_text(f"Transfer to {second[:8]}")

        # The wallet list the page reloads after a transfer comes late, after the person has
        # picked another wallet: the page stays on the one picked.
        events: list[tuple[str, str]] = []
        page.on("request", lambda r: events.append(("request", r.url)))
        page.on("response", lambda r: events.append(("response", r.url)))

        async def late(route: Any) -> None:
            await asyncio.sleep(1)
            await route.continue_()

        def shown_after_the_list() -> list[str]:
            """The histories the page asked for once the late list was in."""
            listed = [i for i, e in enumerate(events) if e == ("response", base + LIST)]
            later = events[listed[-1] :] if listed else []
            return [url for kind, url in later if kind == "request" and "/operations?" in url]

        async def reloaded() -> bool:
            return bool(shown_after_the_list())

        await page.route(base + LIST, late)
        await page.get_by_label("To wallet", exact=True).fill(second)
        await page.get_by_label("Amount to send", exact=True).fill("9")
        await page.get_by_role("button", name="Transfer", exact=True).click()
        await expect(page.locator("#message")).to_contain_text("Insufficient funds")
        await page.get_by_label("Pick a wallet").select_option(second)
        await expect(balance).to_have_text("2.15")
        await eventually(reloaded, what="the page to act on the late list")
        await page.unroute(base + LIST, late)
        assert second in shown_after_the_list()[0]  # not the wallet picked before
        await expect(balance).to_have_text("2.15")
        await expect(page.get_by_label("Pick a wallet")).to_have_value(second)
        await expect(rows.nth(0)).to_contain_text(f"Transfer from {first[:8]}")

        # Holds: one placed and captured, one placed and voided.
        available, holds = page.locator("#available"), page.locator("#holds tbody tr")
        for amount, action, while_held, after in (
            ("1.00", "Capture", "1.15", "1.15"),
            ("0.50", "Void", "0.65", "1.15"),
        ):
            await page.get_by_label("Amount to hold", exact=True).fill(amount)
            await page.get_by_role("button", name="Hold", exact=True).click()
            await expect(page.locator("#message")).to_contain_text(f"Held {amount}")
            await expect(holds).to_have_count(1)
            await expect(available).to_have_text(while_held)
            await holds.nth(0).get_by_role("button", name=action).click()
            await expect(holds).to_have_count(0)
            await expect(available).to_have_text(after)
        await expect(balance).to_have_text("1.15")
        await expect(rows.nth(0)).to_contain_text("voided")
        await expect(rows.nth(2)).to_contain_text("captured")

        await page.get_by_label("Deposits", exact=True).fill("300")
        await page.get_by_role("button", name="Fire").click()
        await expect(page.locator("#hot-result")).to_have_class("exact", timeout=60_000)
        await expect(page.locator("#hot-result")).to_contain_text("exact")
        # The live panel moved: it saw the burst answered, second by second.
        await expect(page.locator("#live-peak")).not_to_have_text("0", timeout=10_000)

        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shot = SCREENSHOTS / f"wallet-page-{'auth' if auth else 'open'}.png"
        await page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")
        await browser.close()
    assert problems == []


async def access_token(base: str) -> str:
    user = {"username": f"d{uuid.uuid4().hex[:8]}", "password": "a long enough password"}
    async with aiohttp.ClientSession(base) as http:
        async with http.post("/api/auth/users", json=user) as r:
            assert r.status == 201
        async with http.post("/api/auth/token", json=user) as r:
            return str((await r.json())["access_token"])


async def test_the_api_docs_load_from_this_server_alone_and_send_a_request(
    site: tuple[str, bool],
) -> None:
    base, auth = site
    token = await access_token(base) if auth else ""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 1000})
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        await page.goto(base + "/docs")
        await expect(page.locator(".info .title")).to_contain_text("Wallet service")
        await expect(page.locator(".opblock-tag-section")).to_have_count(7)  # one per tag

        if auth:  # the token goes in through Authorize, as a person would paste it
            await page.locator(".scheme-container button.authorize").click()
            dialog = page.locator(".modal-ux")
            await dialog.locator("input").fill(token)
            await dialog.locator(".auth-btn-wrapper button.authorize").click()
            await dialog.locator("button.btn-done").click()

        operation = page.locator("#operations-wallets-createWallet")
        await operation.locator(".opblock-summary").click()
        await operation.get_by_role("button", name="Try it out").click()
        await operation.get_by_role("button", name="Execute").click()
        answer = operation.locator(".live-responses-table .response")
        await expect(answer.locator(".response-col_status")).to_have_text("201")
        wallet = json.loads(await answer.locator(".highlight-code pre").inner_text())

        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shot = SCREENSHOTS / f"api-docs-{'auth' if auth else 'open'}.png"
        await page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")
        await browser.close()

    # The wallet the docs created exists; with authentication on, it took the token.
    headers = {"Authorization": f"Bearer {token}"} if auth else {}
    async with (
        aiohttp.ClientSession(base, headers=headers) as http,
        http.get(f"/api/v1/wallets/{wallet['id']}") as r,
    ):
        assert r.status == 200
        assert (await r.json())["balance"] == "0.00"
    assert base + "/api/v1/wallets" in requested
    assert [url for url in requested if not url.startswith(base + "/")] == []
    assert problems == []
