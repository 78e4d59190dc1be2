"""The trace report renders in a real browser (headless Debian chromium).

Install the browser with ``apt-get install -y chromium``; without it the test skips.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.test_tracing import synthetic_agent_trace

WIDTH, HEIGHT = 1200, 1600


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium is not installed (apt-get install -y chromium)")


def _screenshot(browser: str, page: Path, shot: Path, profile: Path) -> None:
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--screenshot={shot}",
        f"--window-size={WIDTH},{HEIGHT}",
        page.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    if not shot.exists():
        pytest.fail(f"chromium wrote no screenshot (rc={done.returncode}):\n{done.stderr[-3000:]}")


def _saturated(rgb: np.ndarray) -> np.ndarray:
    """Pixels with clear colour (text, borders and greys have near-equal channels)."""
    spread = rgb.max(axis=2).astype(int) - rgb.min(axis=2).astype(int)
    return spread > 40


def _widest_run(flags: np.ndarray) -> tuple[int, int]:
    """[start, end) of the longest run of True values."""
    best, start = (0, 0), None
    for i, flag in enumerate([*flags.tolist(), False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return best


def test_report_renders_with_a_colourful_heat_map(tmp_path: Path) -> None:
    browser = _chromium()
    image_mod = pytest.importorskip("PIL.Image", reason="Pillow (a matplotlib dependency)")
    page = synthetic_agent_trace(12).save_report(tmp_path / "trace.html")
    shot = tmp_path / "shot.png"
    _screenshot(browser, page, shot, tmp_path / "profile")

    with image_mod.open(shot) as img:
        rgb = np.asarray(img.convert("RGB"))
    assert rgb.shape[:2] == (HEIGHT, WIDTH)

    # not blank: plenty of non-white pixels, and dark text below the heat map (tables)
    non_white = (rgb.min(axis=2) < 235).mean()
    assert non_white > 0.05, f"page looks blank ({non_white:.1%} non-white pixels)"
    dark = rgb.max(axis=2) < 80

    # the heat map: the widest run of columns holding saturated colour (the colour bar
    # to its right is a separate, narrow run), with many distinct colours in it
    mask = _saturated(rgb)
    ys, _ = np.nonzero(mask)
    assert len(ys) > 50_000, f"only {len(ys)} coloured pixels on the page"
    top, bottom = int(ys.min()), int(ys.max())
    left, right = _widest_run(np.asarray(mask[top : bottom + 1].any(axis=0)))
    assert right - left > 600 and bottom - top > 300, (top, bottom, left, right)
    assert top < HEIGHT // 2, "heat map is not near the top of the page"
    region = rgb[top : bottom + 1, left:right]
    colours = region[_saturated(region)] // 16  # 4 bits per channel
    distinct = len({tuple(c) for c in colours.tolist()})
    assert distinct >= 40, f"heat map has only {distinct} distinct colours"
    assert dark[bottom + 10 :].mean() > 0.002, "no text rendered below the heat map"

    # the PNG written next to the page is the same figure: it is colourful too
    with image_mod.open(page.with_suffix(".png")) as img:
        figure = np.asarray(img.convert("RGB"))
    assert len({tuple(c) for c in (figure[_saturated(figure)] // 16).tolist()}) >= 40
