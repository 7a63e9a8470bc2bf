"""One offline HTML page for a run: every figure (PNG inlined as base64), table and view.

``build_report(run_dir)`` reads ``run_dir/results.json`` (written by the pipeline) and writes
``run_dir/report.html``. The page loads nothing from the network: images are ``data:`` URIs,
CSS is inline, and interactive circuitsvis views share one inlined copy of the circuitsvis JS
bundle (see ``circuitsvis_views``).

``results.json`` layout (what the report reads)::

    {"meta": {...},
     "stages": {"<stage>": {"title", "status", "seconds", "cached", "config_hash",
                            "results": {...numbers...},
                            "figures": [{"title", "path"}],          # relative to run_dir
                            "tables": [{"title", "columns", "rows"}],
                            "views": [{"title", "path", "needs_bundle"}]}}}
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..results import atomic_write_text
from .circuitsvis_views import bundle_script

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1200px; color: #222; background: #fff; line-height: 1.4; }
h1 { border-bottom: 3px solid #6a3d9a; padding-bottom: 6px; }
h2 { margin-top: 36px; border-bottom: 1px solid #ccc; padding-bottom: 4px; color: #6a3d9a; }
h3 { margin-bottom: 4px; }
table.data { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
table.data th, table.data td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
table.data th { background: #f3eff8; }
table.data td:first-child, table.data th:first-child { text-align: left; }
figure { display: inline-block; margin: 8px 12px 16px 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #555; }
.status { font-size: 13px; color: #555; }
.toc a { margin-right: 12px; }
pre.json { background: #f7f7f7; padding: 8px; font-size: 11px; max-height: 480px; overflow: auto; }
table.heat { border-collapse: collapse; font-size: 10px; margin: 4px 0 12px; }
table.heat td { width: 12px; height: 12px; border: 1px solid #eee; padding: 0; }
table.heat th { text-align: right; font-weight: normal; padding-right: 4px; white-space: pre; }
.static-tokens span { white-space: pre; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 6px; border-radius: 2px; }
table.answer { font-size: 15px; }
table.examples th, table.examples td.text { text-align: left; max-width: 640px; font-family: Georgia, serif; }
ul.verdicts li { margin: 2px 0; }
"""

MAX_METRIC_ROWS = 400


def _cell(v: Any) -> str:
    """A table cell's text (not escaped): yes/no, 4 significant digits, ``–`` for None."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:  # NaN
            return "nan"
        return f"{v:.4g}"
    if v is None:
        return "–"
    return str(v)


def _fmt(v: Any) -> str:
    """``_cell`` escaped for HTML (for the hand-written rows)."""
    return html.escape(_cell(v))


def flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Scalars of a nested dict/list as ("a.b.0.c", value) rows (lists of > 32 scalars skipped)."""
    rows: list[tuple[str, Any]] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            rows += flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        if len(obj) <= 32:
            for i, v in enumerate(obj):
                rows += flatten(v, f"{prefix}[{i}]")
        else:
            rows.append((prefix, f"[{len(obj)} values]"))
    else:
        rows.append((prefix, obj))
    return rows


def table_html(columns: list[str], rows: list[list[Any]], title: str = "") -> str:
    """A plain HTML table in the report's ``data`` class: ``DataFrame.to_html`` (escaped, no
    index) of the cells formatted by ``_cell`` (4 significant digits, yes/no, ``–`` for None).
    A row longer or shorter than ``columns`` is padded with empty cells."""
    import pandas as pd

    cols = [str(c) for c in columns]
    width = max([len(cols), *(len(r) for r in rows)])
    cols += [""] * (width - len(cols))
    cells = [[_cell(v) for v in r] + [""] * (width - len(r)) for r in rows]
    cap = f"<h3>{html.escape(title)}</h3>" if title else ""
    return cap + pd.DataFrame(cells, columns=cols).to_html(index=False, classes="data", escape=True,
                                                           border=0)


def inside(run_dir: Path, rel: Any) -> Path | None:
    """``run_dir / rel`` if it resolves to a file inside ``run_dir`` (symlinks followed), else
    ``None``: a results.json naming ``/etc/passwd`` or ``../../x`` embeds nothing."""
    if not isinstance(rel, str) or not rel:
        return None
    root = run_dir.resolve()
    p = (run_dir / rel).resolve()
    return p if p.is_relative_to(root) and p.is_file() else None


def _img(run_dir: Path, rel: Any, title: str) -> str:
    path = inside(run_dir, rel)
    if path is None:
        return f"<p class='status'>missing figure {html.escape(str(rel))} (not a file in the run folder)</p>"
    return _png_figure(path.read_bytes(), title)


def _png_figure(png: bytes, title: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    t = html.escape(title)
    return (f'<figure><img alt="{t}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{t}</figcaption></figure>")


VA_STAGE, VA_FIGURE = "control", "va.png"  # the stage whose VA figure the report draws itself


def _is_va_figure(fig: Mapping[str, Any]) -> bool:
    return str(fig.get("path", "")).rsplit("/", 1)[-1] == VA_FIGURE


def va_figure(results: Mapping[str, Any]) -> str:
    """The control stage's valence–arousal figure, drawn from its results (the first, headline
    ``controllability`` entry: ``targets``, ``text_va_mean``, ``readout_va_mean``) and inlined;
    a one-line note instead when there is nothing to plot (no entry, no finite value), never
    empty axes. Drawn here rather than embedded, so that a run whose stored ``va.png`` predates
    ``figures.va_control`` (a fixed 0–1 y range hid negative valences) still gets a picture."""
    from .figures import png_bytes, va_control

    ctl = results.get("controllability") if isinstance(results, Mapping) else None
    entries = [(k, v) for k, v in ctl.items() if isinstance(v, Mapping)] if isinstance(ctl, Mapping) else []
    entries = [(k, v) for k, v in entries if v.get("targets") and isinstance(v.get("text_va_mean"), list)]
    if not entries:
        return ("<p class='status'>valence–arousal figure omitted: "
                "no controllability results (targets and measured VA) in this stage</p>")
    key, entry = entries[0]
    readout = entry.get("readout_va_mean")
    title = f"valence–arousal: target vs measured ({key})"
    try:
        fig = va_control(entry["targets"], entry["text_va_mean"],
                         readout=readout if isinstance(readout, list) else None, title=title)
    except (ValueError, TypeError) as e:
        return f"<p class='status'>valence–arousal figure omitted: {html.escape(str(e))}</p>"
    return _png_figure(png_bytes(fig), title)


def _anchor(name: str) -> str:
    return "stage-" + "".join(c if c.isalnum() else "-" for c in name)


ANSWER_STAGES = ("circuits", "steering", "control")  # where the method comparison is looked for


def _pct(v: Any) -> str:
    return "–" if not isinstance(v, (int, float)) or v != v else f"{100 * v:.1f} %"


def _method_badge(method: str) -> str:
    from .figures import method_color

    return (f'<span class="swatch" style="background:{method_color(method)}"></span>'
            f"{html.escape(method)}")


def answer_section(stages: Mapping[str, Any]) -> list[str]:
    """The first screen: the method comparison (fluent accuracy with its 95 % interval over
    scenarios, raw and readout accuracy, perplexity, n) and one verdict line per comparison,
    from the first stage of ``ANSWER_STAGES`` whose results hold a ``comparison``."""
    for name in ANSWER_STAGES:
        comp = ((stages.get(name) or {}).get("results") or {}).get("comparison")
        if isinstance(comp, Mapping) and comp.get("table"):
            break
    else:
        return []
    # Written by hand, not DataFrame.to_html: the method cell holds a colour swatch (raw HTML)
    # and the accuracy is bold, while to_html's escape= is all cells or none (and Styler, which
    # could mix them, needs jinja2, not a dependency); every value is escaped by _pct/_fmt.
    rows = []
    for r in comp["table"]:
        rows.append("<tr>" + "".join([
            f"<td>{_method_badge(str(r.get('method')))}</td>",
            f"<td><b>{_pct(r.get('fluent_accuracy'))}</b></td>",
            f"<td>[{_pct(r.get('fluent_low'))}, {_pct(r.get('fluent_high'))}]</td>",
            f"<td>{_pct(r.get('accuracy'))}</td>", f"<td>{_pct(r.get('readout_accuracy'))}</td>",
            f"<td>{_fmt(r.get('perplexity_median'))}</td>", f"<td>{_fmt(r.get('repeated_3gram'))}</td>",
            f"<td>{_fmt(r.get('n'))}</td>", f"<td>{_fmt(r.get('n_scenarios'))}</td>"]) + "</tr>")
    head = "".join(f"<th>{c}</th>" for c in (
        "method", "fluent accuracy", "95 % interval (scenarios)", "raw judge accuracy", "readout accuracy",
        "perplexity (median)", "repeated 3-grams", "texts", "scenarios"))
    ref = comp.get("reference_perplexity")
    rule = ("A text counts when the judge reads the target emotion in it <b>and</b> it is fluent: "
            f"perplexity ≤ {_fmt(comp.get('max_ratio'))} × the unmodulated texts' median "
            f"({_fmt(ref)}), repeated-3-gram rate &lt; {_fmt(comp.get('max_repeat'))}, not empty. "
            "Intervals resample scenarios; settings were chosen on the validation split.")
    out = ["<h2 id='answer'>The answer</h2>",
           f"<p class='status'>test split, from the {html.escape(name)} stage. {rule}</p>",
           f'<table class="data answer"><tr>{head}</tr>{"".join(rows)}</table>']
    verdicts = comp.get("verdicts") or []
    if verdicts:
        out.append("<ul class='verdicts'>" + "".join(f"<li>{html.escape(str(v))}</li>" for v in verdicts)
                   + "</ul>")
    return out


def examples_section(stages: Mapping[str, Any], per_emotion: int = 1) -> list[str]:
    """Generated test texts per method and emotion, with the judge's verdict and perplexity
    (from the ``examples`` the evaluations keep)."""
    evals: dict[str, list] = {}
    for name in ("circuits", "steering", "control"):
        res = (stages.get(name) or {}).get("results") or {}
        for method, ev in (res.get("evaluations") or {}).items():
            if isinstance(ev, Mapping) and ev.get("examples") and method not in evals:
                evals[method] = ev["examples"]
        if name == "steering" and isinstance(res.get("test"), Mapping) and "steering" not in evals:
            if res["test"].get("examples"):
                evals["steering"] = res["test"]["examples"]
    if not evals:
        return []
    emotions: list[str] = []
    for ex in evals.values():
        for e in ex:
            if isinstance(e, Mapping) and e.get("emotion") not in emotions:
                emotions.append(e.get("emotion"))
    # Written by hand, not DataFrame.to_html, for the same reason as the answer table (the
    # method's colour swatch is raw HTML) and because the text column has its own cell class
    # (td.text: left-aligned, serif), which to_html cannot give one column; values are escaped.
    body = []
    for method, ex in evals.items():
        if method.startswith("random circuit ") and method != "random circuit 0":
            continue
        # one row per distinct text: the unmodified model's text, judged against every target,
        # is shown once with the targets it was judged against
        rows: dict[str, list] = {}
        for emo in emotions:
            picks = [e for e in ex if isinstance(e, Mapping) and e.get("emotion") == emo][:per_emotion]
            for e in picks:
                rows.setdefault(str(e.get("text", "")), []).append((emo, e))
        for text, hits in rows.items():
            targets = ", ".join(str(emo) for emo, _ in hits) if len(hits) < len(emotions) or len(hits) == 1 \
                else "every target"
            ok = " ".join("✓" if e.get("match") else "✗" for _, e in hits) if len(hits) < 4 else \
                f"{sum(bool(e.get('match')) for _, e in hits)} of {len(hits)}"
            body.append(f"<tr><td>{_method_badge(method)}</td><td>{html.escape(targets)}</td>"
                        f"<td class='text'>{html.escape(text)}</td>"
                        f"<td>{ok}</td><td>{_fmt(hits[0][1].get('perplexity'))}</td></tr>")
    head = "<tr><th>method</th><th>target</th><th>generated text</th><th>judged as target</th><th>perplexity</th></tr>"
    return ["<h2 id='examples'>Generated examples</h2>",
            "<p class='status'>the first test text per method and target emotion (judged as the target: ✓)</p>",
            f'<table class="data examples">{head}{"".join(body)}</table>']


def _meta_rows(meta: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for k, v in meta.items():
        if k == "config":
            continue
        if isinstance(v, Mapping):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        elif isinstance(v, (list, tuple)):
            v = ", ".join(map(str, v))
        rows.append([k.replace("_", " "), v])
    return rows


def render_report(results: Mapping[str, Any], run_dir: str | os.PathLike) -> str:
    """The report's HTML for a parsed ``results.json`` (paths resolved against ``run_dir``;
    only files inside it are embedded). First screen: the method comparison and its verdicts;
    then generated examples, the stages, the run and (collapsed) the configuration."""
    run_dir = Path(run_dir)
    meta = dict(results.get("meta", {}))
    stages: Mapping[str, Any] = results.get("stages", {})
    parts: list[str] = []
    title = f"emocircuits report — {meta.get('model', '?')}"
    parts.append(f"<h1>{html.escape(title)}</h1>")
    done = sum(1 for s in stages.values() if s.get("status") == "done")
    parts.append(f"<p class='status'>preset {html.escape(str(meta.get('preset', '–')))} · "
                 f"{done} of {len(stages)} stages done · updated {html.escape(str(meta.get('updated', '–')))}</p>")
    toc = " ".join(f'<a href="#{_anchor(n)}">{html.escape(s.get("title", n))}</a>'
                   for n, s in stages.items())
    answer = answer_section(stages)
    parts += answer
    parts += examples_section(stages)
    parts.append(f'<p class="toc">{"<a href=#answer>The answer</a> " if answer else ""}{toc} '
                 f'<a href="#run">Run</a> <a href="#config">Configuration</a></p>')
    summary = results.get("summary") or {}
    if summary:
        parts.append("<h2 id='summary'>Headline numbers</h2>")
        parts.append(table_html(["number", "value"], [[k.replace("_", " "), v] for k, v in summary.items()]))
    status_rows = [[n, s.get("status", "?"), s.get("cached", False), s.get("seconds")]
                   for n, s in stages.items()]
    parts.append(table_html(["stage", "status", "cached", "seconds"], status_rows, "Stages"))
    needs_bundle = False
    for name, st in stages.items():
        parts.append(f'<h2 id="{_anchor(name)}">{html.escape(st.get("title", name))}</h2>')
        parts.append(f"<p class='status'>status: {html.escape(str(st.get('status', '?')))}"
                     + (f" · {st['seconds']:.1f} s" if isinstance(st.get("seconds"), (int, float))
                        else "") + (" · cached" if st.get("cached") else "") + "</p>")
        for t in st.get("tables", []):
            parts.append(table_html(t["columns"], t["rows"], t.get("title", "")))
        figs = [f for f in st.get("figures", []) if isinstance(f, Mapping)]
        shown = [_img(run_dir, f.get("path"), f.get("title", "")) for f in figs
                 if not (name == VA_STAGE and _is_va_figure(f))]
        if name == VA_STAGE:  # in place of the stored va.png (drawn from the results)
            at = next((i for i, f in enumerate(figs) if _is_va_figure(f)), len(shown))
            shown.insert(at, va_figure(st.get("results") or {}))
        if shown:
            parts.append("<div class='figures'>" + "".join(shown) + "</div>")
        for v in st.get("views", []):
            p = inside(run_dir, v.get("path"))
            if p is not None:
                parts.append(f"<h3>{html.escape(v.get('title', ''))}</h3>")
                parts.append(p.read_text(encoding="utf-8"))
                needs_bundle |= bool(v.get("needs_bundle"))
        numbers = flatten(st.get("results", {}))
        if numbers:
            shown = numbers[:MAX_METRIC_ROWS]
            more = "" if len(numbers) <= MAX_METRIC_ROWS else f" (first {MAX_METRIC_ROWS})"
            parts.append(f"<details><summary>all numbers of this stage{more}</summary>"
                         + table_html(["metric", "value"], [list(r) for r in shown]) + "</details>")
    parts.append("<h2 id='run'>Run</h2>")
    parts.append(table_html(["key", "value"], _meta_rows(meta)))
    parts.append("<h2 id='config'>Configuration</h2>")
    cfg = json.dumps(meta.get("config", {}), indent=1, sort_keys=True, default=str)
    parts.append(f"<details><summary>the resolved settings (JSON)</summary><pre class='json'>"
                 f"{html.escape(cfg)}</pre></details>")
    head = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n")
    bundle = bundle_script() if needs_bundle else ""
    return head + bundle + "\n" + "\n".join(parts) + "\n</body></html>\n"


def build_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write ``report.html`` for ``run_dir`` (from its ``results.json``) atomically."""
    run_dir = Path(run_dir)
    res_path = run_dir / "results.json"
    if not res_path.is_file():
        raise FileNotFoundError(f"build_report: no results.json in {run_dir}")
    results = json.loads(res_path.read_text(encoding="utf-8"))
    out = Path(out) if out is not None else run_dir / "report.html"
    page = render_report(results, run_dir)
    return atomic_write_text(out, page)
