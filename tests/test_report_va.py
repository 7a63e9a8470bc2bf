"""The valence–arousal control figure is never empty: every measured point lies inside the axes'
view, non-finite values are left out, nothing to plot means no figure and a one-line note in the
report (which draws it from the control stage's results). Synthetic results; no model."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from emocircuits.control import ControllabilityResult, default_grid
from emocircuits.results import compact_json, jsonable
from emocircuits.studies.control import ControlResult
from emocircuits.viz import figures as F
from emocircuits.viz.report import build_report

LEVELS = (-1.0, 0.0, 1.0)


def _visible_points(fig) -> list[int]:
    """Per axes: how many finite data points of its lines (the y = x reference excluded) lie
    inside the axes' view limits, i.e. are actually drawn."""
    counts = []
    for ax in fig.axes:
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        n = 0
        for line in ax.get_lines():
            if line.get_gid() == "ideal":
                continue
            x, y = (np.asarray(a, dtype=float) for a in line.get_data())
            ok = np.isfinite(x) & np.isfinite(y)
            n += int(((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1) & ok).sum())
        counts.append(n)
    return counts


def _controllability(valence=-0.4, n_prompts=3, seed=0, readout=True) -> ControllabilityResult:
    """A grid whose measured valence is mostly negative (as on the real models)."""
    grid = default_grid(LEVELS)
    rng = np.random.default_rng(seed)
    text = np.stack([np.column_stack([valence + 0.1 * v + 0.05 * rng.normal(size=n_prompts),
                                      0.2 * a + 0.05 * rng.normal(size=n_prompts)]) for v, a in grid])
    ro = text + 0.05 if readout else None
    return ControllabilityResult(grid, text, ro, [["a reply"] * n_prompts] * len(grid), {"strength": 2.0})


def test_va_figure_draws_every_negative_valence(tmp_path):
    r = _controllability()
    fig = F.va_control(r.targets, r.text_va, readout=r.readout_va)
    assert len(fig.axes) == 2
    # 9 grid points per source (text judge, readout) on each axis: all inside the view
    assert _visible_points(fig) == [18, 18]
    p = F.va_control(r.targets, r.text_va, tmp_path / "va.png")
    assert not F.png_is_blank(p)


def test_sweep_curves_never_hides_values_outside_its_range():
    """The old VA figure (sweep_curves, fixed 0–1 y range): negative valences fell off the axes."""
    fig = F.sweep_curves(list(LEVELS), {"valence (arousal=+0.0)": [-0.5, -0.4, -0.3]},
                         xlabel="target valence")
    assert _visible_points(fig) == [3]


def test_va_figure_leaves_out_non_finite_values_and_refuses_nothing():
    r = _controllability(readout=False)
    va = r.text_va.copy()
    va[:, :, 1] = np.nan           # no arousal measured: no arousal panel (not an empty one)
    va[0] = np.nan                 # one grid point without any finite value
    va[1, 0, 0] = np.nan           # one prompt without: the mean of the others
    fig = F.va_control(r.targets, va)
    assert [ax.get_xlabel() for ax in fig.axes] == ["target valence"]
    assert _visible_points(fig) == [8]
    with pytest.raises(ValueError, match="nothing to plot"):
        F.va_control(r.targets, np.full_like(va, np.nan))
    with pytest.raises(ValueError, match="targets must be"):
        F.va_control([], np.zeros((0, 2)))
    with pytest.raises(ValueError, match=r"\[9 targets, 2\]"):
        F.va_control(r.targets, np.zeros((4, 2)))


def _run(tmp_path, results, stored_png=True):
    stage = tmp_path / "stages" / "control-1" / "figures"
    stage.mkdir(parents=True)
    figures = []
    if stored_png:  # a stored va.png (an old run's came out empty): the report draws its own
        F.sweep_curves(list(LEVELS), {"v": [-0.5, -0.4, -0.3]}, stage / "va.png")
        F.method_comparison({"steering": 0.4}, stage / "methods.png")
        figures = [{"title": "method comparison", "path": "stages/control-1/figures/methods.png"},
                   {"title": "old va", "path": "stages/control-1/figures/va.png"}]
    doc = {"meta": {"model": "fake"},
           "stages": {"control": {"title": "Valence–arousal control", "status": "done",
                                  "results": results, "figures": figures}}}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    page = build_report(tmp_path).read_text(encoding="utf-8")
    return page[page.index('id="stage-control"'):], stage


def _inlined(section: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", section)]


def test_report_draws_the_va_figure_from_the_control_results(tmp_path):
    results = compact_json(jsonable(ControlResult({"lstsq@2": _controllability()}).to_dict()))
    section, stage = _run(tmp_path, results)
    pngs = _inlined(section)
    assert len(pngs) == 2 and (stage / "va.png").read_bytes() not in pngs
    assert pngs[0] == (stage / "methods.png").read_bytes()  # the other figures as stored, in order
    assert "valence–arousal: target vs measured (lstsq@2)" in section and "old va" not in section
    (tmp_path / "va.png").write_bytes(pngs[1])
    assert not F.png_is_blank(tmp_path / "va.png")
    assert "figure omitted" not in section


@pytest.mark.parametrize("results", [
    {},                                                            # no control results
    {"controllability": {}},
    {"controllability": {"lstsq@2": {"targets": [[0.0, 0.0], [1.0, 0.0]],
                                     "text_va_mean": [[None, None], [None, None]]}}},  # NaN in JSON
])
def test_report_omits_the_va_figure_with_a_note_when_nothing_to_plot(tmp_path, results):
    section, _ = _run(tmp_path, results, stored_png=False)
    assert _inlined(section) == []
    notes = [line for line in section.splitlines() if "valence–arousal figure omitted" in line]
    assert len(notes) == 1 and notes[0].count("<p class='status'>") == 1
