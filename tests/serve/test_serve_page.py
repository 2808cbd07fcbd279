"""The web page in a real headless browser (Debian's chromium driven by Playwright).

Skipped only when no chromium executable exists (install Debian's ``chromium``; CI does, see
.ci/run). Screenshots go to the test's ``tmp_path`` and, when ``VISIONSCALE_ARTIFACTS`` is set,
are copied there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from serve_util import FACE_DATA, running

CHROMIUM = next((p for p in (os.environ.get("VISIONSCALE_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), "/usr/bin/chromium") if p and Path(p).is_file()), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable (apt-get install chromium)")


def _artifact(path: Path) -> None:
    where = os.environ.get("VISIONSCALE_ARTIFACTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(where) / path.name)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright  # the test extra; never downloads a browser

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def test_page_scores_an_upload_and_shows_overlay_score_and_regions(browser, tiny_run, demo_images, tmp_path):
    import httpx

    from visionscale.serve import create_app

    image = next(p for p in demo_images if p.parent.name != "good")
    with running(create_app(tiny_run)) as base:
        expected = httpx.post(base + "/v1/anomaly/score?images=none",
                              files={"file": (image.name, image.read_bytes(), "image/png")}).json()
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(base + "/")
        page.wait_for_selector("body[data-ready='1']")
        page.set_input_files("#anomaly-file", str(image))
        page.click("#anomaly-form button[type=submit]")
        page.wait_for_selector("body[data-anomaly-done='1']", timeout=60_000)
        assert page.text_content("#anomaly-label") == expected["label"]
        assert page.text_content("#anomaly-score") == f"{expected['score']:.4f}"
        assert page.text_content("#anomaly-nregions") == str(len(expected["regions"]))
        # the overlay was fetched and decoded: a real image with pixels, not a broken icon
        assert page.eval_on_selector("#anomaly-overlay", "img => img.complete && img.naturalWidth") == 64
        assert page.locator("#anomaly-boxes rect").count() == len(expected["regions"])
        shot = tmp_path / "serve_page_anomaly.png"
        page.screenshot(path=str(shot), full_page=True)
        page.close()
    assert shot.stat().st_size > 1000
    _artifact(shot)


def test_page_shows_faces_and_the_best_gallery_match(browser, tmp_path):
    import httpx

    from visionscale.serve import create_app

    astro = FACE_DATA / "astronaut.png"
    with running(create_app("face", gallery=tmp_path / "people.db")) as base:
        r = httpx.post(base + "/v1/face/enroll", data={"name": "eileen"},
                       files={"files": (astro.name, astro.read_bytes(), "image/png")}, timeout=60)
        assert r.status_code == 200, r.text
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(base + "/")
        page.wait_for_selector("body[data-ready='1']")
        assert page.is_visible("#face-form")  # faces only: the face tab is the one shown
        page.set_input_files("#face-file", str(FACE_DATA / "astronaut_flipped.png"))
        page.click("#face-form button[type=submit]")
        page.wait_for_selector("body[data-face-done='1']", timeout=60_000)
        assert page.text_content("#face-count") == "1"
        assert page.text_content("#face-table tbody tr td:nth-child(3)") == "eileen"
        assert page.locator("#face-boxes rect").count() == 1
        assert page.eval_on_selector("#face-image", "img => img.naturalWidth") == 512
        shot = tmp_path / "serve_page_faces.png"
        page.screenshot(path=str(shot), full_page=True)
        page.close()
    _artifact(shot)
