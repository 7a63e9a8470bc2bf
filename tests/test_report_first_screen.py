"""The report leads with the answer; it embeds only files inside the run folder; a run's tables
print as Markdown/CSV (``emocircuits tables``); a loaded result finds every module that
defines result types. No model is loaded."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import emocircuits
from emocircuits.cli import main
from emocircuits.viz import figures as F
from emocircuits.viz.report import build_report, inside
from emocircuits.viz.tables import format_value, markdown_table, render_tables

PKG = Path(emocircuits.__file__).parent


def _comparison():
    rows = []
    for m, fa, acc in (("none", 0.10, 0.12), ("prompting", 0.2, 0.25), ("steering", 0.05, 0.4),
                       ("circuit", 0.45, 0.5), ("random circuit 0", 0.2, 0.22)):
        rows.append({"method": m, "fluent_accuracy": fa, "fluent_low": fa - 0.05, "fluent_high": fa + 0.07,
                     "accuracy": acc, "readout_accuracy": 0.6, "perplexity_median": 3.1234,
                     "repeated_3gram": 0.01, "n": 90, "n_scenarios": 5})
    return {"table": rows, "verdicts": ["circuit better than random circuit (mean of 1): +25.0 points"],
            "reference_perplexity": 2.9, "max_ratio": 3.0, "max_repeat": 0.3}


def _examples(method):
    if method == "none":  # the unmodified model: one text, judged against every target
        return [{"emotion": e, "valence": "neutral", "text": "<none> the same text", "match": False,
                 "perplexity": 3.1} for e in ("anger", "fear")]
    return [{"emotion": e, "valence": "neutral", "text": f"<{method}> text for {e} & more",
             "match": i % 2 == 0, "perplexity": 4.2} for i, e in enumerate(("anger", "fear"))]


def _run(tmp_path, extra_stage=None):
    (tmp_path / "stages" / "c-1" / "figures").mkdir(parents=True)
    F.fluent_comparison(_comparison()["table"], tmp_path / "stages" / "c-1" / "figures" / "f.png")
    ev = {m: {"method": m, "examples": _examples(m)} for m in ("none", "circuit", "random circuit 0",
                                                               "random circuit 1")}
    stages = {"directions": {"title": "Emotion directions", "status": "done", "seconds": 1.0,
                             "tables": [{"title": "decoding", "columns": ["layer", "acc"],
                                         "rows": [[0, 0.5], [1, None]]}]},
              "circuits": {"title": "Circuits and modulation", "status": "done", "seconds": 3.0,
                           "results": {"comparison": _comparison(), "evaluations": ev},
                           "figures": [{"title": "fluent", "path": "stages/c-1/figures/f.png"}],
                           "tables": [{"title": "the answer: fluent accuracy", "columns": ["method", "x | y"],
                                       "rows": [["circuit", 0.4512], ["none", 13.0]]},
                                      {"title": "verdicts", "columns": ["verdict"], "rows": [["v1"]]}]}}
    if extra_stage:
        stages.update(extra_stage)
    doc = {"meta": {"model": "fake", "preset": "quick", "emotions": ["anger", "fear"],
                    "data_sizes": {"n_train": 2}, "config": {"run": {"emotions": ["anger", "fear"]}}},
           "summary": {"fluent_accuracy_circuit": 0.45}, "stages": stages}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    return tmp_path


def test_report_first_screen_is_the_answer(tmp_path):
    page = build_report(_run(tmp_path)).read_text(encoding="utf-8")
    body = page[page.index("<body>"):]
    # order: title, the answer (method table + verdicts), examples, then the stages, run, config
    order = [body.index(s) for s in ("<h1>", "id='answer'", "class='verdicts'", "id='examples'",
                                     'id="stage-directions"', "id='run'", "id='config'")]
    assert order == sorted(order)
    answer = body[body.index("id='answer'"):body.index("id='examples'")]
    assert "45.0 %" in answer and "[40.0 %, 52.0 %]" in answer and "circuit better than random" in answer
    assert answer.count("<tr>") == 6 and "90" in answer
    ex = body[body.index("id='examples'"):body.index('id="stage-directions"')]
    assert "&lt;circuit&gt; text for anger &amp; more" in ex  # escaped
    assert "random circuit 0" in ex and "random circuit 1" not in ex  # one random control shown
    assert ex.count("&lt;none&gt; the same text") == 1 and "every target" in ex  # shown once
    # one colour per method, the same in the report and the figures
    assert F.method_color("circuit") in answer and F.method_color("random circuit 3") == F.method_color("random circuit")
    assert F.method_color("circuit B=3 λ=2") == F.method_color("circuit") != F.method_color("steering")
    # readable run table (no flattened list keys), configuration collapsed
    assert "emotions[0]" not in page and "anger, fear" in page
    cfg = body[body.index("id='config'"):]
    assert "<details>" in cfg


def test_report_without_a_comparison_has_no_answer_section(tmp_path):
    _run(tmp_path)
    doc = json.loads((tmp_path / "results.json").read_text())
    del doc["stages"]["circuits"]
    (tmp_path / "results.json").write_text(json.dumps(doc))
    page = build_report(tmp_path).read_text(encoding="utf-8")
    assert "id='answer'" not in page and "Emotion directions" in page


@pytest.mark.parametrize("bad", ["/etc/passwd", "../../secret.txt", "stages/../../secret.txt", "", None, 7])
def test_report_embeds_only_files_inside_the_run_folder(tmp_path, bad):
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "secret.txt").write_text("TOP-SECRET-CONTENT")
    view = {"views": {"title": "v", "status": "done",
                      "views": [{"title": "a view", "path": bad}],
                      "figures": [{"title": "a figure", "path": bad}]}}
    _run(run, view)
    page = build_report(run).read_text(encoding="utf-8")
    assert "TOP-SECRET-CONTENT" not in page and "root:" not in page
    assert "not a file in the run folder" in page
    assert inside(run, bad) is None


def test_report_does_not_follow_a_symlink_out_of_the_run_folder(tmp_path):
    (tmp_path / "run").mkdir()
    run = _run(tmp_path / "run")
    (tmp_path / "secret.html").write_text("TOP-SECRET-CONTENT")
    (run / "stages" / "c-1" / "link.html").symlink_to(tmp_path / "secret.html")
    assert inside(run, "stages/c-1/link.html") is None
    assert inside(run, "stages/c-1/figures/f.png") == (run / "stages/c-1/figures/f.png").resolve()


def test_tables_markdown_and_csv(tmp_path, capsys):
    _run(tmp_path)
    md = render_tables(tmp_path, ["circuits"], ["answer"])
    assert md.startswith("**circuits: the answer: fluent accuracy**")
    assert "| method | x \\| y |" in md and "| circuit | 0.451 |" in md and "| none | 13.0 |" in md
    assert "verdicts" not in md
    assert render_tables(tmp_path).count("**") == 6  # all three tables
    doc = json.loads((tmp_path / "results.json").read_text())
    doc["stages"]["circuits"]["headline"] = {"fluent_accuracy_circuit": 0.45, "verdict_1": "circuit better"}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    hl = render_tables(tmp_path, ["circuits"], ["nothing matches"], headline=True)
    assert hl.startswith("**run: headline numbers**") and "| circuits | fluent_accuracy_circuit | 0.450 |" in hl
    rec = render_tables(tmp_path, results=["circuits.comparison.table"], columns=["method", "fluent_accuracy", "n"])
    assert "| method | fluent_accuracy | n |" in rec and "| circuit | 0.450 | 90 |" in rec
    assert main(["tables", str(tmp_path), "--results", "circuits.comparison.nope"]) == 2
    assert "no 'nope' under circuits.comparison (there: table, verdicts" in capsys.readouterr().err
    assert main(["tables", str(tmp_path), "--results", "circuits.comparison.table", "--columns", "zzz"]) == 2
    assert "no field ['zzz']" in capsys.readouterr().err
    csv_text = render_tables(tmp_path, ["directions"], fmt="csv")
    assert csv_text.splitlines()[1:] == ["layer,acc", "0,0.5", "1,"]
    assert main(["tables", str(tmp_path), "--stage", "circuits", "--match", "VERDICT"]) == 0
    assert "| v1 |" in capsys.readouterr().out
    assert main(["tables", str(tmp_path), "--stage", "steering"]) == 2
    assert "no stage 'steering'" in capsys.readouterr().err
    assert main(["tables", str(tmp_path / "nowhere")]) == 2
    assert "no results.json" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("{broken")
    assert main(["tables", str(tmp_path)]) == 2
    assert "line 1" in capsys.readouterr().err


def test_format_value():
    assert [format_value(v) for v in (0.09259, 15.8123, 1006.3, 13.0, 0.0, None, True, 5e-5, "x")] == [
        "0.093", "15.8", "1006", "13.0", "0.0", "–", "yes", "5e-05", "x"]
    assert markdown_table(["a"], [["x\ny"]]).splitlines()[-1] == "| x y |"


def test_fluent_comparison_figure_has_intervals(tmp_path):
    p = F.fluent_comparison(_comparison()["table"], tmp_path / "f.png")
    img = F.plt.imread(str(p))
    assert img.shape[0] > 100 and float(img[..., :3].var()) > 1e-3
    with pytest.raises(ValueError, match="no rows"):
        F.fluent_comparison([], tmp_path / "g.png")


def _modules_defining_results() -> set[str]:
    mods = set()
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                    (isinstance(b, ast.Name) and b.id == "Result") or
                    (isinstance(b, ast.Attribute) and b.attr == "Result") for b in node.bases):
                rel = path.relative_to(PKG.parent).with_suffix("")
                mods.add(".".join(rel.parts))
    return mods - {"emocircuits.results"}


def test_loading_a_result_imports_every_module_that_defines_result_types():
    """A fresh process that loads a result (``results._import_result_modules``) must know every
    result type, e.g. ``stats.Estimate`` nested in a circuits result (a bug found in a real run)."""
    want = sorted(_modules_defining_results())
    assert "emocircuits.stats" in want and len(want) > 10
    code = ("import sys, json; from emocircuits.results import _import_result_modules; "
            "_import_result_modules(); print(json.dumps(sorted(m for m in sys.modules if m.startswith('emocircuits'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert [m for m in want if m not in loaded] == []
    assert re.fullmatch(r"[\w.]+", want[0])
