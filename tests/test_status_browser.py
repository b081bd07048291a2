"""The status page in a real headless Chromium (Debian's ``chromium``, driven by Playwright):
worker processes, the table shows them, the round counter and the accuracy chart advance
without a reload, and a killed worker (its socket closed by the kernel) and a frozen one (no
FIN: only the heartbeat can tell) turn "lost" within the heartbeat (idle) timeout.

``FEDBERRY_STATUS_SCREENSHOT=docs/img/status.png`` also saves the screenshot there (how the
one in docs/ was made)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client", reason="the status server needs fedberry[status]")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip)")

import status_worker  # noqa: E402  (tests/, after the skips)
from helpers import fedberry_env, processes, python  # noqa: E402

from fedberry.serve import serve  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
IDLE_TIMEOUT = 3.0  # the chief's heartbeat timeout in this test (--idle-timeout)

pytestmark = [
    pytest.mark.heavy,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason="needs Debian's chromium (apt-get install chromium; "
                              "scripts/setup.sh)"),
]


def _state(page, worker_id: str) -> str | None:
    return page.evaluate("id => { const r = [...document.querySelectorAll('#workers tbody tr')]"
                         ".find(r => r.dataset.worker === id);"
                         " return r ? r.querySelector('td.state').textContent : null; }",
                         worker_id)


def _numbers(page) -> tuple[int, int]:
    """(rounds done as the header says, points on the accuracy chart)."""
    return page.evaluate("""() => {
        const m = document.getElementById('round').textContent.match(/\\((\\d+) done\\)/);
        return [m ? +m[1] : -1,
                +document.getElementById('chart-accuracy').dataset.points]; }""")


def _lost_within(page, worker_id: str, seconds: float) -> float:
    """Wait for the row of ``worker_id`` to say lost; how long it took."""
    t0 = time.monotonic()
    page.wait_for_function("id => [...document.querySelectorAll('#workers tbody tr')]"
                           ".some(r => r.dataset.worker === id && "
                           "r.querySelector('td.state').textContent === 'lost')",
                           arg=worker_id, timeout=seconds * 1000)
    return time.monotonic() - t0


def test_the_page_follows_a_run_live(tmp_path: Path) -> None:
    handle = serve("127.0.0.1:0", workers=3, rounds=500, status="127.0.0.1:0",
                   initial=status_worker.initial(), evaluate=status_worker.evaluate,
                   idle_timeout=IDLE_TIMEOUT, out_dir=str(tmp_path / "out"))
    script = str(Path(status_worker.__file__))
    with handle, processes() as procs, sync_api.sync_playwright() as pw:
        for i, wid in enumerate(("pi-kitchen", "pi-garage", "pi-attic")):
            procs.append(subprocess.Popen(python(script, handle.url, wid, str(i), "0.25"),
                                          env=fedberry_env()))
        browser = pw.chromium.launch(executable_path=CHROMIUM,
                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(handle.status.url)
            # Both workers in the table, connected.
            page.wait_for_function("() => [...document.querySelectorAll('#workers td.state')]"
                                   ".filter(td => td.textContent === 'connected').length === 3",
                                   timeout=30_000)
            # Rounds go by: the header's counter and the chart's points grow, with no reload
            # (a marker set on the window would be gone after one).
            page.evaluate("() => { window.__same_page = true; }")
            page.wait_for_function("() => +document.getElementById('chart-accuracy')"
                                   ".dataset.points >= 2", timeout=30_000)
            rounds0, points0 = _numbers(page)
            page.wait_for_function(f"""() => {{
                const m = document.getElementById('round').textContent.match(/\\((\\d+) done/);
                return m && +m[1] >= {rounds0 + 3} && +document.getElementById(
                    'chart-accuracy').dataset.points >= {points0 + 3}; }}""", timeout=30_000)
            rounds1, points1 = _numbers(page)
            assert rounds1 > rounds0 and points1 > points0
            assert page.evaluate("() => window.__same_page === true")
            assert "of 500" in page.text_content("#round")
            # Kill one worker, freeze another: both rows turn "lost" within the heartbeat
            # timeout (and a second for the page's poll); the third goes on.
            procs[1].send_signal(signal.SIGKILL)
            assert _lost_within(page, "pi-garage", IDLE_TIMEOUT + 2) < IDLE_TIMEOUT + 2
            procs[2].send_signal(signal.SIGSTOP)
            frozen = _lost_within(page, "pi-attic", IDLE_TIMEOUT + 3)
            assert 1.0 < frozen < IDLE_TIMEOUT + 3  # found by the heartbeat, not by a FIN
            assert _state(page, "pi-kitchen") == "connected"
            events = page.text_content("#events")
            assert "lost pi-garage" in events and "lost pi-attic" in events
            # The run goes on with the one left.
            r_lost = _numbers(page)[0]
            page.wait_for_function(f"""() => {{
                const m = document.getElementById('round').textContent.match(/\\((\\d+) done/);
                return m && +m[1] >= {r_lost + 2}; }}""", timeout=30_000)
            shot = tmp_path / "status.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("FEDBERRY_STATUS_SCREENSHOT"):
                shutil.copy(shot, os.environ["FEDBERRY_STATUS_SCREENSHOT"])
        finally:
            browser.close()
