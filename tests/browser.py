"""Helpers for browser tests: a real Streamlit server on a free port and Debian's Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_browser() -> str:
    """Chromium's path; skip without it, except where STEPX_REQUIRE_BROWSER=1 (CI) makes that a failure."""
    path = chromium_path()
    if path is None:
        if os.environ.get("STEPX_REQUIRE_BROWSER") == "1":
            pytest.fail("Chromium is required here (STEPX_REQUIRE_BROWSER=1) but not installed")
        pytest.skip("no Chromium on this machine (apt-get install -y chromium)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def dashboard(store: Path) -> Iterator[str]:
    """Run the dashboard on a store; yields its URL."""
    port = free_port()
    env = {**os.environ, "STEPX_STORE": str(store), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(ROOT / "dashboard" / "app.py"),
            "--server.headless",
            "true",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--browser.gatherUsageStats",
            "false",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"dashboard did not start: {proc.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def browser_page(executable: str) -> Iterator[object]:
    """A Playwright page in headless Debian Chromium (never a downloaded browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)  # fresh profile each launch
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            page = context.new_page()
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def screenshot(page: object, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@contextmanager
def worker(store: Path, limit_s: float = 300.0) -> Iterator[subprocess.Popen]:
    """`stepx worker` on a store beside the dashboard, stopped on exit (and killed after `limit_s` at most)."""
    env = {**os.environ, "STEPX_STORE": str(store), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stepx.cli", "worker", "--store", str(store), "--poll", "0.3"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = time.time()
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(max(1.0, min(15.0, limit_s - (time.time() - started))))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def annotated_screenshot(page: object, path: Path, marks: list[object], width: int = 960) -> Path:
    """A screenshot of the page with numbered boxes around `marks` (Playwright locators), saved small.

    Numbers follow the order of `marks`, matching the numbered list under each screenshot in the Guide.
    """
    import io

    from PIL import Image, ImageDraw

    from dashboard.render import font

    page.wait_for_timeout(1500)  # let the last rerun finish drawing (captions update after images)
    shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    draw = ImageDraw.Draw(shot)
    big = font(26)
    for n, mark in enumerate(marks, 1):
        mark.first.wait_for()
        box = mark.first.bounding_box()
        assert box is not None, f"mark {n} is not on the page"
        x, y = box["x"] + page.evaluate("window.scrollX"), box["y"] + page.evaluate("window.scrollY")
        draw.rectangle([x - 4, y - 4, x + box["width"] + 4, y + box["height"] + 4], outline=(255, 64, 129), width=4)
        cx, cy = max(18, x - 4), max(18, y - 4)
        draw.ellipse([cx - 18, cy - 18, cx + 18, cy + 18], fill=(255, 64, 129))
        draw.text((cx, cy), str(n), fill="white", font=big, anchor="mm")
    scale = width / shot.width
    small = shot.resize((width, round(shot.height * scale)), Image.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    small.quantize(256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    return path
