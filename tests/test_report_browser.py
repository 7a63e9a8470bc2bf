"""Open a run's report.html in headless Chromium, offline: it renders (screenshot not blank), the
section titles are in the DOM and the inlined circuitsvis view was drawn by its JS.

Needs the Debian packages ``chromium`` (and ``chromium-driver``); skipped when absent.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from emocircuits.viz import figures as F
from emocircuits.viz.circuitsvis_views import attention_view, bundle_path
from emocircuits.viz.report import build_report

CHROME = next((shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome")
               if shutil.which(c)), None)
pytestmark = pytest.mark.skipif(CHROME is None, reason="chromium is not installed")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars", "--virtual-time-budget=8000"]


def _chrome(args, profile, timeout=120):
    return subprocess.run([CHROME, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run_dir(tmp_path, tiny_llama):
    """A run folder with a figure, a table and an interactive circuitsvis view."""
    stage = tmp_path / "stages" / "steering-abc"
    F.sweep_curves([0, 2, 4, 8], {"judge accuracy": [0.1, 0.4, 0.7, 0.8]},
                   stage / "figures" / "sweep.png", perplexity={"ppl": [5, 6, 8, 20]})
    view = attention_view(tiny_llama, "The train was late again today.", [(1, 0), (2, 3)])
    (stage / "views").mkdir(parents=True)
    (stage / "views" / "attention.html").write_text(view.html)
    doc = {"meta": {"model": "tiny-llama", "config": {"run": {"model": "tiny-llama"}}},
           "stages": {
               "steering": {"title": "Steering (stage 03)", "status": "done", "seconds": 2.0,
                            "results": {"test_accuracy": {"overall": 0.5}},
                            "figures": [{"title": "steering sweep",
                                         "path": "stages/steering-abc/figures/sweep.png"}],
                            "tables": [{"title": "steering table", "columns": ["method", "acc"],
                                        "rows": [["steering", 0.5]]}],
                            "views": [{"title": "attention of two heads",
                                       "path": "stages/steering-abc/views/attention.html",
                                       "needs_bundle": view.needs_bundle}]},
               "probes": {"title": "Probes, zero-shot baseline, persistence",
                          "status": "unavailable: module emocircuits.probes not found"}}}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    build_report(tmp_path)
    return tmp_path


def test_report_renders_offline_in_chromium(run_dir, tmp_path):
    page = run_dir / "report.html"
    html = page.read_text(encoding="utf-8")
    assert "https://" not in "".join(
        line for line in html.splitlines() if "<script src" in line or "<link" in line)
    shot = tmp_path / "shot.png"
    r = _chrome(["--window-size=1200,1800", f"--screenshot={shot}", page.as_uri()],
                tmp_path / "profile1")
    assert shot.exists(), r.stderr[-2000:]
    img = F.plt.imread(str(shot))[..., :3]
    assert float(np.var(img)) > 1e-3  # not a blank page
    dom = _chrome(["--dump-dom", page.as_uri()], tmp_path / "profile2").stdout
    for title in ("emocircuits report", "Run", "Stages", "Steering (stage 03)", "steering table",
                  "Probes, zero-shot baseline, persistence", "Configuration"):
        assert title in dom, title
    assert dom.count("data:image/png;base64,") == 1
    if bundle_path() is not None:
        # circuitsvis' React code ran (offline) and drew the heads: the head name is rendered
        # as a heading (only the JS creates it) and a canvas exists in the view's container
        import re

        view = dom[dom.find('class="cv-view"'):]
        assert re.search(r"<h2[^>]*>L1H0</h2>", view), view[:2000]
        assert "<canvas" in view

def test_first_screen_holds_the_answer_and_an_example(tmp_path):
    """Rendered in Chromium: the method comparison, its verdicts and a generated example come
    before every stage section, and the top 1200×900 screenshot is not blank."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fs", __file__.replace("test_report_browser.py",
                                                                         "test_report_first_screen.py"))
    fs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fs)
    (tmp_path / "run").mkdir()
    run = fs._run(tmp_path / "run")
    page = build_report(run)
    dom = _chrome(["--dump-dom", page.as_uri()], tmp_path / "profile").stdout
    first_stage = dom.index('id="stage-')
    for needle in ("id=\"answer\"", "fluent accuracy", "45.0 %", "circuit better than random",
                   "id=\"examples\"", "text for anger"):
        assert -1 < dom.find(needle) < first_stage, needle
    shot = tmp_path / "top.png"
    _chrome(["--window-size=1200,900", f"--screenshot={shot}", page.as_uri()], tmp_path / "profile2")
    img = F.plt.imread(str(shot))[..., :3]
    assert float(np.var(img)) > 1e-3
