"""How fast a feature page draws in headless Debian Chromium, from the browser's own performance timing:
first contentful paint, and the moment the top contexts (which need the feature JSON) are in the DOM."""

import time

import loopback
import pytest
from explainkit import build_db

PAINT = "performance.getEntriesByType('paint').find(e => e.name === 'first-contentful-paint')?.startTime ?? null"
# polled every 5 ms (poll below), so the figure is within a few ms of the first frame with the contexts drawn
CONTEXTS = "document.querySelector('#top .ctx') && performance.now()"


def poll(pg, expression: str, timeout_s: float = 10.0):
    """The expression's first truthy value, read every 5 ms with page.evaluate.

    Not wait_for_function: its polling evaluates a string with eval(), which the viewer's CSP (no
    unsafe-eval) refuses whenever the first check is not already true.
    """
    deadline = time.time() + timeout_s
    while True:
        value = pg.evaluate(expression)
        if value or time.time() > deadline:
            return value
        time.sleep(0.005)


@pytest.mark.browser
def test_feature_page_paints_and_shows_contexts_quickly(tmp_path):
    from playwright.sync_api import sync_playwright

    from saeforge.viewer.server import create_app

    app = create_app([build_db(tmp_path / "f.db")], live=False)
    timings = []
    with loopback.serve(app) as url:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"])
            pg = browser.new_page()
            for idx in (1, 2, 1):  # a cold feature, another, then the first again (served from the cache)
                pg.goto(f"{url}/feature/toy/py/{idx}")
                drawn = poll(pg, CONTEXTS)
                # the paint entry is queued after the frame it describes: wait for it rather than read it once
                timings.append((poll(pg, PAINT), drawn))
            browser.close()
    print("feature page (first contentful paint ms, contexts drawn ms):", timings)
    for fcp, drawn in timings:
        # generous bounds for a loaded 2-core CI box; docs/benchmarks.md records measured values
        assert fcp is not None and 0 < fcp < 2000 and fcp <= drawn + 50
        assert drawn < 2000
