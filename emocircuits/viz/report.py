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
"""

MAX_METRIC_ROWS = 400


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:  # NaN
            return "nan"
        return f"{v:.4g}"
    if v is None:
        return "–"
    return html.escape(str(v))


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
    """A plain HTML table (values formatted to 4 significant digits)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    cap = f"<h3>{html.escape(title)}</h3>" if title else ""
    return f'{cap}<table class="data"><tr>{head}</tr>{body}</table>'


def _img(path: Path, title: str) -> str:
    if not path.is_file():
        return f"<p class='status'>missing figure {html.escape(str(path.name))}</p>"
    b64 = base64.b64encode(path.read_bytes()).decode("ascii")
    t = html.escape(title)
    return (f'<figure><img alt="{t}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{t}</figcaption></figure>")


def _anchor(name: str) -> str:
    return "stage-" + "".join(c if c.isalnum() else "-" for c in name)


def render_report(results: Mapping[str, Any], run_dir: str | os.PathLike) -> str:
    """The report's HTML for a parsed ``results.json`` (paths resolved against ``run_dir``)."""
    run_dir = Path(run_dir)
    meta = dict(results.get("meta", {}))
    stages: Mapping[str, Any] = results.get("stages", {})
    parts: list[str] = []
    title = f"emocircuits report — {meta.get('model', '?')}"
    parts.append(f"<h1>{html.escape(title)}</h1>")
    toc = " ".join(f'<a href="#{_anchor(n)}">{html.escape(s.get("title", n))}</a>'
                   for n, s in stages.items())
    parts.append(f'<p class="toc">{toc}</p>')
    parts.append("<h2 id='run'>Run</h2>")
    parts.append(table_html(["key", "value"],
                            [[k, v] for k, v in flatten({k: v for k, v in meta.items()
                                                         if k != "config"})]))
    summary = results.get("summary") or {}
    if summary:
        parts.append("<h2 id='summary'>Summary</h2>")
        parts.append(table_html(["number", "value"], [[k, v] for k, v in summary.items()]))
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
        figs = st.get("figures", [])
        if figs:
            parts.append("<div class='figures'>" + "".join(
                _img(run_dir / f["path"], f.get("title", "")) for f in figs) + "</div>")
        for v in st.get("views", []):
            p = run_dir / v["path"]
            if p.is_file():
                parts.append(f"<h3>{html.escape(v.get('title', ''))}</h3>")
                parts.append(p.read_text(encoding="utf-8"))
                needs_bundle |= bool(v.get("needs_bundle"))
        numbers = flatten(st.get("results", {}))
        if numbers:
            shown = numbers[:MAX_METRIC_ROWS]
            more = "" if len(numbers) <= MAX_METRIC_ROWS else f" (first {MAX_METRIC_ROWS})"
            parts.append(f"<details><summary>all numbers of this stage{more}</summary>"
                         + table_html(["metric", "value"], [list(r) for r in shown]) + "</details>")
    parts.append("<h2 id='config'>Configuration</h2>")
    cfg = json.dumps(meta.get("config", {}), indent=1, sort_keys=True, default=str)
    parts.append(f"<pre class='json'>{html.escape(cfg)}</pre>")
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
