"""Headless Chromium for tests that check pages as a reader sees them: the report and the feature dashboards.

Debian's `chromium` and `chromium-driver` are driven through selenium (playwright's own browser download is
not reachable offline). They are installed with apt when absent and SAESCALE_SYSTEM_TESTS=1 (as .ci/run sets); otherwise, or
without root or apt, the tests skip and say why. `inspect` reads one page in the browser: console errors, images that did not decode, inline SVGs,
links, ids and the visible text; `screenshot` keeps a full-page PNG as a CI artifact.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PACKAGES = ["chromium", "chromium-driver", "fonts-liberation"]  # fonts: screenshots show text, not boxes
SYSTEM_TESTS = "SAESCALE_SYSTEM_TESTS"  # opt-in to apt installs: a user's plain `pytest` changes nothing system-wide


def install_chromium() -> str | None:
    """Installs Chromium and its driver with apt when absent; None when they are there, else why not."""
    if Path(CHROMIUM).exists() and Path(DRIVER).exists():
        return None
    if os.environ.get(SYSTEM_TESTS) != "1":
        return (f"{CHROMIUM} or {DRIVER} is missing; set {SYSTEM_TESTS}=1 to let the tests install "
                f"{' '.join(PACKAGES)} with apt (.ci/run does)")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{CHROMIUM} or {DRIVER} is missing and apt-get cannot install them here (needs root and apt)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    res = subprocess.run(install, capture_output=True, text=True, env=env)
    if res.returncode != 0:  # stale package lists: refresh once, then try again
        subprocess.run(["apt-get", "update"], capture_output=True, env=env)
        res = subprocess.run(install, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return None


# Runs before any script of every page: dialogs are recorded, not opened, so several alerts neither block
# the page nor race with the test's own commands.
_DIALOG_TRAP = """
window.__dialogs = [];
for (const kind of ['alert', 'confirm', 'prompt']) {
  window[kind] = (message) => { window.__dialogs.push(kind + ': ' + message); };
}"""


def start_chromium():
    """A headless Chromium session that keeps the browser console log and records dialogs (see `inspect`)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--hide-scrollbars"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _DIALOG_TRAP})
    return driver


@pytest.fixture(scope="module")
def chromium():
    """`start_chromium`, installed first if need be; skips (printing why) where it cannot be installed."""
    reason = install_chromium()
    if reason:
        print(reason)
        pytest.skip(reason)
    driver = start_chromium()
    yield driver
    driver.quit()


@dataclass
class Page:
    """What one page showed in the browser."""

    path: Path
    errors: list[str]  # console messages at level SEVERE (script errors, failed loads)
    dialogs: list[str]  # alert/confirm/prompt calls, as 'kind: message'
    images: list[dict]  # {"src": first 60 chars, "ok": decoded with naturalWidth > 0}
    svgs: int  # inline <svg> elements
    ids: set[str]
    hrefs: list[str]
    text: str  # document.body.innerText
    title: str
    probes: dict = field(default_factory=dict)  # values of the `probes` JS expressions


_COLLECT = """
return {
  images: [...document.images].map(i => ({src: i.getAttribute('src').slice(0, 60),
                                            ok: i.complete && i.naturalWidth > 0})),
  svgs: document.querySelectorAll('svg').length,
  ids: [...document.querySelectorAll('[id]')].map(e => e.id),
  hrefs: [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href')),
  text: document.body.innerText,
  title: document.title,
  dialogs: window.__dialogs,
  probes: Object.fromEntries(Object.entries(arguments[0]).map(([k, expr]) => [k, eval(expr)])),
};"""


def inspect(driver, path: Path, probes: dict[str, str] | None = None) -> Page:
    """Loads `path` (file://) and reads it back; `probes` are JS expressions evaluated in the page."""
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(path.resolve().as_uri())
    got = driver.execute_script(_COLLECT, probes or {})
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return Page(path=path, errors=errors, dialogs=got["dialogs"], images=got["images"], svgs=got["svgs"],
                ids=set(got["ids"]), hrefs=got["hrefs"], text=got["text"], title=got["title"],
                probes=got["probes"])


def broken_anchors(page: Page) -> list[str]:
    """In-page links (#id) whose target id does not exist."""
    return [h for h in page.hrefs if h.startswith("#") and h != "#" and unquote(h[1:]) not in page.ids]


def local_targets(page: Page) -> dict[str, Path]:
    """Relative links to other files, {href: resolved path without the fragment}; web links are left out."""
    out = {}
    for href in page.hrefs:
        parts = urlsplit(href)
        if href.startswith("#") or parts.scheme or parts.netloc:
            continue
        out[href] = (page.path.parent / unquote(parts.path)).resolve()
    return out


def artifacts_dir() -> Path:
    """$SAESCALE_ARTIFACTS if set, else <repo>/artifacts: where CI picks up screenshots."""
    folder = Path(os.environ.get("SAESCALE_ARTIFACTS") or ROOT / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def screenshot(driver, name: str) -> Path:
    """A PNG of the whole loaded page, not just the window, in `artifacts_dir()`."""
    import base64

    width, height = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    out = artifacts_dir() / name
    out.write_bytes(base64.b64decode(shot["data"]))
    return out
