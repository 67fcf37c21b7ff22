"""The HTML report in a real headless browser: every image loads.

CI installs Debian's chromium and sets STABQ_REQUIRE_BROWSER=1, so there the
test cannot be skipped; elsewhere it runs when chromium is on PATH.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from stabq.compare import compare
from stabq.report import write_comparison

PROBE = (
    '<script>window.addEventListener("load", () => document.body.setAttribute("data-images",'
    ' [...document.images].map(i => i.complete && i.naturalWidth > 0 ? "ok" : "broken")'
    '.join(",")));</script></body>'
)


def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("STABQ_REQUIRE_BROWSER") == "1":
            pytest.fail("STABQ_REQUIRE_BROWSER=1 but no chromium on PATH")
        pytest.skip("no chromium on PATH (CI installs it)")
    return found


def image_states(page: str, tmp_path) -> list[str]:
    """Load ``page`` headless and return, per <img>, "ok" or "broken"."""
    path = tmp_path / "probe.html"
    path.write_text(page.replace("</body>", PROBE))
    proc = subprocess.run(
        [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
         "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    found = re.search(r'data-images="([^"]*)"', proc.stdout)
    assert found, proc.stderr[-2000:]
    return found.group(1).split(",")


def test_every_image_of_the_report_loads_in_chromium(tmp_path):
    result = compare("synthetic:16", ["none", "fsq", "rvq"], seeds=1, epochs=1, progress=False)
    page = (write_comparison(result, tmp_path / "report") / "report.html").read_text()
    assert image_states(page, tmp_path) == ["ok", "ok", "ok", "ok"]


def test_the_probe_sees_a_broken_image(tmp_path):
    page = '<html><body><img src="data:image/png;base64,AAAA"><img src="missing.png"></body></html>'
    assert image_states(page, tmp_path) == ["broken", "broken"]
