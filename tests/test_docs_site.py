"""The built documentation site in a real headless Chromium: the API page shows
``build_quantizer`` with its signature, and the site's own search finds it.

The site is the one ``STABQ_SITE_DIR`` names (``.ci/run`` builds it with ``make docs``
first), else it is built here with mkdocs. Without mkdocs (the ``docs`` extra) or chromium
the tests are skipped, unless ``STABQ_REQUIRE_BROWSER=1`` (as in CI) makes them fail.
"""

from __future__ import annotations

import functools
import http.server
import inspect
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cdp import Chromium
from stabq import build_quantizer
from test_report_browser import browser

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("STABQ_REQUIRE_BROWSER") == "1"

# the site's search box, typed into as a reader would; resolves with the hits' links
SEARCH = """
new Promise((resolve) => {
  const started = Date.now();
  const poll = () => {
    const input = document.querySelector(".md-search__input");
    const meta = document.querySelector(".md-search-result__meta");
    if (input && meta && !/Initializing/.test(meta.textContent) && input.value !== QUERY) {
      input.focus();
      input.value = QUERY;
      input.dispatchEvent(new Event("input", {bubbles: true}));
      input.dispatchEvent(new KeyboardEvent("keyup", {key: "r", bubbles: true}));
    }
    const hits = [...document.querySelectorAll(".md-search-result__item a")]
      .map(a => new URL(a.href).pathname + new URL(a.href).hash);
    const settled = input && input.value === QUERY && !/Initializing/.test(meta.textContent)
      && Date.now() - started > 1500;
    if (hits.length || (settled && Date.now() - started > 8000) || Date.now() - started > 30000)
      resolve({hits: hits, meta: meta ? meta.textContent.trim() : null});
    else setTimeout(poll, 100);
  };
  if (document.readyState === "complete") poll(); else addEventListener("load", poll);
})
"""

# the text of an API entry's heading (its signature) and whether it is on screen
HEADING = """
(() => {
  const h = document.getElementById(ANCHOR);
  if (!h) return null;
  const box = h.getBoundingClientRect();
  const text = h.innerText.replace(/\\u00b6/g, "").trim();
  return {text: text, visible: box.width > 0 && box.height > 0};
})()
"""


def _built_site(tmp_path_factory) -> Path:
    given = os.environ.get("STABQ_SITE_DIR")
    if given:
        site = Path(given)
        assert (site / "reference" / "api" / "index.html").is_file(), f"{site}: no built site"
        return site
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        if REQUIRED:
            pytest.fail("STABQ_REQUIRE_BROWSER=1 but mkdocs is not installed (make docs)")
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    site = tmp_path_factory.mktemp("site")
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--site-dir", str(site)],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    return site


@pytest.fixture(scope="module")
def site_browser(tmp_path_factory):
    """(base URL of the site served over HTTP, a Chromium) for the module's tests."""
    binary = browser()
    site = _built_site(tmp_path_factory)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(site))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    chromium = Chromium(binary, str(tmp_path_factory.mktemp("profile")))
    try:
        yield f"http://127.0.0.1:{server.server_port}/", chromium
    finally:
        chromium.close()
        server.shutdown()


def heading(site_browser, page: str, anchor: str) -> dict | None:
    base, chromium = site_browser
    return chromium.evaluate(base + page, HEADING.replace("ANCHOR", repr(anchor)))


def search(site_browser, query: str) -> dict:
    base, chromium = site_browser
    return chromium.evaluate(base, SEARCH.replace("QUERY", repr(query)))


def test_the_api_page_shows_build_quantizer_with_its_signature(site_browser):
    shown = heading(site_browser, "reference/api/", "stabq.build_quantizer")
    assert shown is not None and shown["visible"], shown
    name, _, rest = shown["text"].partition("(")
    assert name == "build_quantizer"
    parameters = [p.split(":")[0].strip().lstrip("*") for p in rest.split(")")[0].split(",")]
    assert parameters == list(inspect.signature(build_quantizer).parameters)
    assert re.search(r"->\s*Quantizer$", shown["text"]), shown["text"]


def test_the_site_search_finds_build_quantizer_on_the_api_page(site_browser):
    found = search(site_browser, "build_quantizer")
    assert "/reference/api/#stabq.build_quantizer" in found["hits"], found


def test_the_probes_see_what_is_not_there(site_browser):
    assert heading(site_browser, "reference/api/", "stabq.no_such_name") is None
    found = search(site_browser, "qzxjvwk")
    assert found["hits"] == [] and "No matching" in found["meta"], found
