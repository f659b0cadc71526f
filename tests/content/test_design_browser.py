"""A compiled design, rendered with sample data, in a real browser at a phone's width
and a desktop's: the layout facts are read from the DOM, and screenshots are kept.

Debian's ``chromium`` driven by Playwright (its own browser download cannot work
here). Nothing leaves the machine: every request the page makes is answered by the
test (images) or aborted, and the browser resolves no name. Screenshots go to
``$POSTWARDEN_TEST_ARTIFACTS/design/`` when that variable is set (CI collects that
directory), otherwise to the test's tmp dir.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from playwright.sync_api import Page, Route, sync_playwright

from postwarden.content.design import compile_design
from tests.content.design_samples import IMG, SAMPLE_CONTEXT, every_block
from tests.peers import require_binary

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # No name resolves: a request the test does not answer cannot leave the machine.
    "--host-resolver-rules=MAP * ~NOTFOUND",
]


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A solid-colour PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes(rgb) * width
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


def artefact_dir(tmp_path: Path) -> Path:
    base = os.environ.get("POSTWARDEN_TEST_ARTIFACTS")
    out = Path(base) / "design" if base else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    return out


FACTS = """() => {
  const box = (el) => { const r = el.getBoundingClientRect();
    return {x: r.x, y: r.y, w: r.width, h: r.height}; };
  const cols = [...document.querySelectorAll('div.mj-column-per-50')];
  const button = [...document.querySelectorAll('a')].find(a => a.textContent.trim() === 'Buy now');
  const hero = document.querySelector('h1');
  let heroBg = '';
  for (let el = hero; el && !heroBg; el = el.parentElement) {
    const bg = getComputedStyle(el).backgroundImage;
    if (bg && bg !== 'none') heroBg = bg;
  }
  return {
    scrollWidth: document.documentElement.scrollWidth,
    columns: cols.map(box),
    button: button && {box: box(button), href: button.getAttribute('href'),
                       visible: button.checkVisibility()},
    images: [...document.images].map(i => ({
      src: i.getAttribute('src'), alt: i.getAttribute('alt'),
      loaded: i.complete && i.naturalWidth > 0, box: box(i)})),
    hero: {text: hero.textContent, box: box(hero), background: heroBg},
    text: document.body.innerText,
    unsubscribe: [...document.querySelectorAll('a')].find(a => a.textContent === 'Unsubscribe')
                   ?.getAttribute('href'),
  };
}"""


def test_design_renders_responsively_in_chromium(tmp_path: Path) -> None:
    chromium = require_binary("chromium")
    compiled = compile_design(every_block())
    page_html = ImmutableSandboxedEnvironment(autoescape=True).from_string(compiled.html)
    page_html = page_html.render(SAMPLE_CONTEXT)
    out = artefact_dir(tmp_path)
    images = {"hero.png": png(600, 300, (40, 60, 90)), "product.png": png(400, 300, (200, 80, 40))}
    answered: list[str] = []
    refused: list[str] = []

    def serve(route: Route) -> None:
        url = route.request.url
        if url.startswith(IMG + "/") or url.startswith("https://www.mailjet.com/images/"):
            answered.append(url)
            body = images.get(url.rsplit("/", 1)[-1], png(40, 40, (120, 120, 120)))
            route.fulfill(status=200, content_type="image/png", body=body)
        else:
            refused.append(url)
            route.abort()

    facts: dict[int, Any] = {}
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 800, "height": 900},
        )
        try:
            context.route("**/*", serve)
            for width in (375, 800):
                page: Page = context.new_page()
                page.set_viewport_size({"width": width, "height": 900})
                page.set_content(page_html, wait_until="load")
                facts[width] = page.evaluate(FACTS)
                page.screenshot(path=str(out / f"every-block-{width}.png"), full_page=True)
                page.close()
        finally:
            context.close()

    assert refused == []
    assert {u.rsplit("/", 1)[-1] for u in answered} >= {"hero.png", "product.png", "facebook.png"}
    wide, narrow = facts[800], facts[375]

    # Two 50 % columns: side by side at 800 px (within the 600 px body), stacked at 375 px.
    left, right = wide["columns"][:2]
    assert abs(left["y"] - right["y"]) < 1
    assert right["x"] >= left["x"] + left["w"] - 1
    assert 290 <= left["w"] <= 310 and 290 <= right["w"] <= 310
    left, right = narrow["columns"][:2]
    assert right["y"] >= left["y"] + left["h"] - 1
    assert abs(left["x"] - right["x"]) < 1
    assert left["w"] >= 370 and right["w"] >= 370
    # Nothing sticks out sideways on the phone.
    assert narrow["scrollWidth"] <= 375

    for f, width in ((wide, 800), (narrow, 375)):
        button = f["button"]
        assert button["visible"] and button["href"] == "https://shop.test/p/42"
        assert button["box"]["w"] > 40 and button["box"]["h"] > 20
        assert 0 <= button["box"]["x"] and button["box"]["x"] + button["box"]["w"] <= width
        # The hero: its heading over the background image, across the content width.
        assert f["hero"]["text"] == "Hello, Ada"
        assert f["hero"]["background"] == f'url("{IMG}/hero.png")'
        assert f["hero"]["box"]["w"] > min(width, 600) * 0.5
        product = next(i for i in f["images"] if i["src"] == f"{IMG}/product.png")
        assert product["alt"] == "Product photo" and product["loaded"]
        assert product["box"]["w"] > 100
        # Every image has alt text but the one the design left without (a warning).
        missing = [i["src"] for i in f["images"] if i["alt"] is None]
        assert missing == [f"{IMG}/decor.png"]
        assert {"Facebook", "X"} <= {i["alt"] for i in f["images"]}
        # The Jinja was filled: condition, loop, variable default, footer.
        text = f["text"]
        assert "Pro member" in text and "Go pro" not in text
        assert text.index("Teapot") < text.index("Kettle") < text.index("Cups")
        assert "your town" in text and "1 Quay Street, Harbour Town" in text
        assert f["unsubscribe"] == SAMPLE_CONTEXT["unsubscribe_url"]
    for width in (375, 800):
        shot = out / f"every-block-{width}.png"
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
