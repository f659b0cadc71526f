"""The preference center in a real browser with JavaScript off: Debian's ``chromium``
driven by Playwright (sync API, in a thread while the appliance serves on the test's
event loop). A person unticks a topic, picks a frequency and saves, sees what was
saved, opts out, and resubscribes; the database shows each step.

Nothing leaves the machine: the page is the appliance's on loopback, and the browser
resolves no name. A screenshot of each step goes to
``$POSTWARDEN_TEST_ARTIFACTS/preferences/`` when that variable is set, otherwise to
the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, sync_playwright

from tests.content.test_design_browser import CHROMIUM_ARGS
from tests.control.conftest import ControlFactory
from tests.control.test_preferences import consents, contact_api, setup, standing
from tests.peers import require_binary

pytestmark = pytest.mark.sqlite_only  # the subject is the page in a browser

# The design test's arguments, with the appliance's loopback address left to resolve
# (Chromium's rule maps IP literals too): every other name still resolves to nothing.
RESOLVER = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
ARGS = [RESOLVER if a.startswith("--host-resolver-rules=") else a for a in CHROMIUM_ARGS]


def artefact_dir(tmp_path: Path) -> Path:
    base = os.environ.get("POSTWARDEN_TEST_ARTIFACTS")
    out = Path(base) / "preferences" if base else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    return out


def submit(page: Page, button: str) -> int:
    """Click a submit button and wait for the page the POST answers; its status."""
    with page.expect_navigation() as nav:
        page.get_by_role("button", name=button).click()
    response = nav.value
    assert response is not None
    return response.status


def drive(chromium: str, url: str, profile: Path, shots: Path) -> dict[str, Any]:
    """What a person sees at each step, read from the DOM."""
    seen: dict[str, Any] = {}
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=chromium,
            headless=True,
            args=ARGS,
            java_script_enabled=False,
            viewport={"width": 420, "height": 900},
        )
        try:
            page = context.new_page()
            response = page.goto(url)
            assert response is not None
            seen["get"] = response.status
            seen["lang"] = page.locator("html").get_attribute("lang")
            seen["title"] = page.title()
            seen["topics"] = page.locator("input[name=topic]").count()
            seen["offers_label"] = page.get_by_label("Offers", exact=False).count()
            seen["news_before"] = page.get_by_label("News").is_checked()
            seen["every_before"] = page.get_by_label("Every campaign").is_checked()
            page.screenshot(path=str(shots / "1-open.png"), full_page=True)

            page.get_by_label("News").uncheck()
            page.get_by_label("At most once a week").check()
            seen["save"] = submit(page, "Save preferences")
            seen["saved_notice"] = page.get_by_role("status").inner_text()
            seen["news_after"] = page.get_by_label("News").is_checked()
            seen["weekly_after"] = page.get_by_label("At most once a week").is_checked()
            page.screenshot(path=str(shots / "2-saved.png"), full_page=True)

            seen["optout"] = submit(page, "Unsubscribe from all")
            seen["optout_notice"] = page.get_by_role("status").inner_text()
            seen["resubscribe_offered"] = page.get_by_role("button", name="Resubscribe").count()
            page.screenshot(path=str(shots / "3-opted-out.png"), full_page=True)

            seen["resubscribe"] = submit(page, "Resubscribe")
            seen["resubscribe_notice"] = page.get_by_role("status").inner_text()
            seen["optout_offered"] = page.get_by_role("button", name="Unsubscribe from all").count()
            # A reload of the stored state (a GET), still what was saved.
            page.goto(url)
            seen["news_reloaded"] = page.get_by_label("News").is_checked()
            seen["weekly_reloaded"] = page.get_by_label("At most once a week").is_checked()
            page.screenshot(path=str(shots / "4-resubscribed.png"), full_page=True)
        finally:
            context.close()
    return seen


async def test_the_preference_center_in_chromium_without_javascript(
    control: ControlFactory, tmp_path: Path
) -> None:
    chromium = require_binary("chromium")
    s = await setup(await control())
    url = s.api.base + s.path
    plane = s.api.app.control
    seen = await asyncio.to_thread(
        drive, chromium, url, tmp_path / "profile", artefact_dir(tmp_path)
    )
    assert seen["get"] == 200 and seen["lang"] == "en" and seen["title"] == "Email preferences"
    assert seen["topics"] == 2 and seen["offers_label"] == 1
    assert seen["news_before"] is True and seen["every_before"] is True
    assert seen["save"] == 200 and seen["saved_notice"] == "Your preferences are saved."
    assert seen["news_after"] is False and seen["weekly_after"] is True
    assert seen["optout"] == 200 and seen["optout_notice"].startswith("You are unsubscribed")
    assert seen["resubscribe_offered"] == 1
    assert seen["resubscribe"] == 200 and seen["resubscribe_notice"] == "You are subscribed again."
    assert seen["optout_offered"] == 1
    assert seen["news_reloaded"] is False and seen["weekly_reloaded"] is True
    # What the database holds after the three posts.
    assert await standing(s) == {s.news: (False, True), s.offers: (False, False)}
    contact = await contact_api(s)
    assert (contact["frequency"], contact["status"]) == ("weekly", "active")
    assert plane.suppressions.check(s.tid, "ann@inbox.test") is None
    assert [c["source"] for c in await consents(s)] == ["preference-center"]
