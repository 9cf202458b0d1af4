"""A real browser opens the demo: Debian's chromium, headless, driven by playwright. It draws
images from a caption, classifies a digit, and saves a screenshot of both tabs.

Where no browser can start the test is skipped with the reason; with REQUIRE_BROWSER=1 (set by
.ci/run) that is a failure instead, so CI cannot pass without having run it. DEMO_SCREENSHOT=path
chooses where the screenshot goes (default: the test's temporary folder; the path is printed).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

# Debian's chromium, not a downloaded one (`playwright install` needs the network)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 900}
CAPTION = "a small red circle in the top left"


def chromium_path() -> str | None:
    """$CHROMIUM, else chromium on the PATH, else Debian's /usr/bin/chromium."""
    for candidate in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                      "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    """A headless chromium; skipped (or failed, under REQUIRE_BROWSER=1) when none can start."""
    required = os.environ.get("REQUIRE_BROWSER") == "1"

    def unavailable(reason: str) -> None:
        if required:
            pytest.fail(f"REQUIRE_BROWSER=1 but {reason}", pytrace=False)
        pytest.skip(f"no browser: {reason} (the browser test needs Debian's chromium and playwright)")

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed: pip install -e '.[dev]'")
    exe = chromium_path()
    if exe is None:
        unavailable("chromium was not found: apt-get install chromium (or set CHROMIUM=/path/to/chrome)")
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, timeout=15_000)
    except Exception as e:  # a broken install, missing libraries, no sandbox support ...
        pw.stop()
        unavailable(f"chromium at {exe} did not start: {str(e).splitlines()[0]}")
    yield b
    b.close()
    pw.stop()


def drive_demo(page: Any, url: str, image: Path, screenshot: Path, n: int = 4) -> dict[str, Any]:
    """Open the demo, draw n images for CAPTION, classify `image` as a digit; save one PNG with
    both tabs stacked. Returns what the page showed and how long each step took."""
    t0 = time.monotonic()
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#t2i_button", timeout=60_000)
    loaded = time.monotonic() - t0

    page.get_by_label("caption").first.fill(CAPTION)
    page.locator("#t2i_gallery").scroll_into_view_if_needed()
    page.click("#t2i_button")
    # every image present and decoded, and the status saying the last one is done
    page.wait_for_function(
        """n => { const imgs = [...document.querySelectorAll('#t2i_gallery img')];
                  return imgs.length >= n && imgs.every(i => i.complete && i.naturalWidth > 0)
                         && document.querySelector('#t2i_status').innerText.includes(n + ' of ' + n); }""",
        arg=n, timeout=60_000)
    drawn = time.monotonic() - t0
    widths = page.eval_on_selector_all("#t2i_gallery img", "imgs => imgs.map(i => i.naturalWidth)")
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(screenshot.with_suffix(".t2i.png")))

    page.get_by_role("tab", name="classify").click()
    page.locator("#cls_image input[type=file]").set_input_files(str(image))
    page.wait_for_selector("#cls_image img", timeout=30_000)  # the upload is in before we press the button
    page.click("#cls_button")
    page.wait_for_function("document.querySelector('#cls_top').innerText.includes('posterior')", timeout=60_000)
    classified = time.monotonic() - t0
    top = page.inner_text("#cls_top")
    page.evaluate("window.scrollTo(0, 0)")  # the upload scrolled the page
    page.wait_for_timeout(500)  # let the bar chart finish drawing
    page.screenshot(path=str(screenshot.with_suffix(".cls.png")))

    # one picture of both tabs, for the README
    parts = [Image.open(screenshot.with_suffix(s)).convert("RGB") for s in (".t2i.png", ".cls.png")]
    sheet = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), "white")
    sheet.paste(parts[0], (0, 0))
    sheet.paste(parts[1], (0, parts[0].height))
    sheet.save(screenshot)
    for s in (".t2i.png", ".cls.png"):
        screenshot.with_suffix(s).unlink()
    errors = page.locator(".toast-body.error").count()
    return {"widths": widths, "top": top, "errors": errors, "seconds": {"load": loaded, "draw": drawn, "classify": classified}}


def test_a_browser_draws_images_and_classifies_a_digit(browser, demo_url, tmp_path, capsys):
    from train.data.digits import digits_documents

    doc = digits_documents("eval")[0]
    digit = tmp_path / "digit.png"
    doc.segments[1].save(digit)
    shot = Path(os.environ.get("DEMO_SCREENSHOT") or tmp_path / "demo_screenshot.png").resolve()
    shot.parent.mkdir(parents=True, exist_ok=True)

    page = browser.new_page(viewport=VIEWPORT)
    try:
        seen = drive_demo(page, demo_url, digit, shot)
    finally:
        page.close()
    assert seen["widths"] == [256] * 4  # four images, each 32 px shown at 8×
    labels = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert seen["top"].split("—")[0].strip("* \n") in labels and "posterior" in seen["top"]
    assert seen["errors"] == 0
    assert Image.open(shot).size == (VIEWPORT["width"], 2 * VIEWPORT["height"])
    with capsys.disabled():
        s = seen["seconds"]
        print(f"\n[browser] page {s['load']:.1f} s, 4 images by {s['draw']:.1f} s, classified by "
              f"{s['classify']:.1f} s; screenshot: {shot}")
