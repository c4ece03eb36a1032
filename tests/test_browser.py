"""Render the reports in a real headless Chromium: images load, no console errors, sections."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_reports import make_derivatives

from spineqprep.reports import build_group_report, build_subject_report
from spineqprep.stats.summary import summarise_maps

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("needs Debian's chromium and chromium-driver packages "
                "(apt-get install -y chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402  (only once chromium is known to be there)
from selenium.webdriver.chrome.service import Service  # noqa: E402

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("browser")
    make_derivatives(root)
    out, bids = root / "out", root / "bids"
    pages = [build_subject_report(out, sub, bids_dir=bids, errors=["something failed"],
                                  boilerplate="Maps were fitted voxel-wise.")
             for sub in ("01", "02")]
    pages.append(build_group_report(out, summarise_maps(out, bids), bids_dir=bids))
    return root, pages


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot(driver: webdriver.Chrome, path: Path) -> None:
    """Full-page screenshot: resize the window to the page's height first."""
    driver.set_window_size(1280, 800)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(int(height) + 100, 12000))
    driver.save_screenshot(str(path))


def test_reports_render(browser: webdriver.Chrome, reports: tuple[Path, list[Path]]) -> None:
    root, pages = reports
    expected = {"sub-01.html": ["summary", "ses-1", "ses-2", "methods", "errors"],
                "sub-02.html": ["summary", "maps", "methods", "errors"],
                "group.html": ["overview", "sites", "maps", "missing", "voxelwise", "methods",
                               "errors"]}
    for page in pages:
        browser.get(page.as_uri())  # returns once the page and its images have loaded
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.src, i.complete, i.naturalWidth])")
        assert images, f"{page.name} has no images"
        broken = [src for src, done, width in images if not done or width == 0]
        assert not broken, f"{page.name}: images did not load: {broken}"
        ids = browser.execute_script(
            "return Array.from(document.querySelectorAll('section')).map(s => s.id)")
        assert ids == expected[page.name]
        headings = browser.execute_script(
            "return Array.from(document.querySelectorAll('h2')).map(h => h.innerText)")
        assert len(headings) == len(ids) and all(headings)
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, f"{page.name}: console errors {errors}"
        _screenshot(browser, root / f"{page.stem}.png")
        assert (root / f"{page.stem}.png").stat().st_size > 10_000
