"""The tables of a finished run folder as Markdown or CSV (no model is loaded).

Every table a stage writes (``ctx.table``) is kept in the run's ``results.json``; this module
prints them, so that a table in the docs is literally the output of one command::

    emocircuits tables runs/circuits --stage circuits --match "the answer" --match verdicts

Numbers are rounded for reading (``digits`` significant digits; integers and percentages as
they are), ``None`` prints as ``–``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..run.engine import RunError


def read_results(run_dir: str | os.PathLike) -> dict:
    """The parsed ``results.json`` of ``run_dir``; a missing or broken file raises ``RunError``
    naming it."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise RunError(f"{path}: no results.json (is {run_dir} a finished run folder?)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("stages", {}), dict):
        raise RunError(f"{path}: not an emocircuits results.json (no 'stages' mapping)")
    return doc


def format_value(v: Any, digits: int = 3) -> str:
    """A cell for reading: floats below 1 to ``digits`` decimals, larger ones to ``digits``
    significant digits, booleans as yes/no, ``None`` as ``–``."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if v == int(v) and a < 1e6:
            return f"{v:.1f}"
        if 1e-3 <= a < 1:
            return f"{v:.{digits}f}"
        if a < 1e-3 or a >= 1e6:
            return f"{v:.{digits}g}"
        return f"{v:.{digits}g}" if a < 10 ** digits else f"{v:.0f}"
    return str(v)


def stage_tables(results: Mapping[str, Any], stages: Sequence[str] | None = None,
                 match: Sequence[str] = ()) -> list[tuple[str, dict]]:
    """``(stage, table)`` pairs of a parsed results.json, in run order; ``stages`` keeps only
    those stages, ``match`` only tables whose title contains one of the strings (any case).
    An unknown stage name raises ``RunError`` naming the stages that have tables."""
    all_stages: Mapping[str, Any] = results.get("stages", {})
    if stages:
        unknown = [s for s in stages if s not in all_stages]
        if unknown:
            have = [n for n, s in all_stages.items() if s.get("tables")]
            raise RunError(f"no stage {', '.join(map(repr, unknown))} in this run "
                           f"(stages with tables: {', '.join(have) or 'none'})")
    out = []
    for name, st in all_stages.items():
        if stages and name not in stages:
            continue
        for t in st.get("tables", []):
            title = str(t.get("title", ""))
            if match and not any(m.lower() in title.lower() for m in match):
                continue
            out.append((name, t))
    return out


def markdown_table(columns: Sequence[Any], rows: Iterable[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""
    def cell(v: Any) -> str:
        return format_value(v, digits).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def headline_table(results: Mapping[str, Any], stages: Sequence[str] | None = None) -> dict:
    """The stages' headline numbers as one table ``{"title", "columns", "rows"}`` (stage,
    number, value), in run order."""
    rows = []
    for name, st in results.get("stages", {}).items():
        if stages and name not in stages:
            continue
        for k, v in (st.get("headline") or {}).items():
            rows.append([name, k, v])
    return {"title": "headline numbers", "columns": ["stage", "number", "value"], "rows": rows}


def results_table(results: Mapping[str, Any], path: str, columns: Sequence[str] | None = None) -> dict:
    """A list of records (or a mapping of records) inside a stage's results, as a table:
    ``path`` = ``"<stage>.<key>[.<key>…]"`` (e.g. ``circuits.grid``); ``columns`` picks and
    orders the fields (default: every field of the first record). Errors name what is there."""
    stage, _, rest = path.partition(".")
    st = results.get("stages", {}).get(stage)
    if st is None:
        raise RunError(f"--results {path}: no stage {stage!r} (stages: {', '.join(results.get('stages', {}))})")
    node: Any = st.get("results", {})
    walked = stage
    for key in [k for k in rest.split(".") if k]:
        if not isinstance(node, Mapping) or key not in node:
            have = ", ".join(map(str, node)) if isinstance(node, Mapping) else type(node).__name__
            raise RunError(f"--results {path}: no {key!r} under {walked} (there: {have})")
        node, walked = node[key], f"{walked}.{key}"
    if isinstance(node, Mapping) and all(isinstance(v, Mapping) for v in node.values()):
        node = [{"key": k, **v} for k, v in node.items()]
    if not isinstance(node, list) or not node or not all(isinstance(r, Mapping) for r in node):
        raise RunError(f"--results {path}: not a list of records ({type(node).__name__})")
    cols = list(columns) if columns else [k for k, v in node[0].items() if not isinstance(v, (Mapping, list))]
    missing = [c for c in cols if all(c not in r for r in node)]
    if missing:
        raise RunError(f"--results {path}: no field {missing} (fields: {', '.join(node[0])})")
    return {"title": path, "columns": cols, "rows": [[r.get(c) for c in cols] for r in node]}


def render_tables(run_dir: str | os.PathLike, stages: Sequence[str] | None = None,
                  match: Sequence[str] = (), fmt: str = "md", digits: int = 3,
                  headline: bool = False, results: Sequence[str] = (),
                  columns: Sequence[str] | None = None) -> str:
    """The tables of ``run_dir`` as one Markdown (``fmt="md"``) or CSV (``"csv"``) text, each
    headed by its stage and title; ``headline`` adds the stages' headline numbers first;
    ``results`` (paths like ``circuits.grid``) prints those records instead (``columns``)."""
    if fmt not in ("md", "csv"):
        raise ValueError(f"render_tables: fmt must be 'md' or 'csv', got {fmt!r}")
    doc = read_results(run_dir)
    found = stage_tables(doc, stages, match)
    if headline:
        found.insert(0, ("run", headline_table(doc, stages)))
    if results:  # only the asked records, not every table
        found = [(p.split(".")[0], results_table(doc, p, columns)) for p in results]
    if not found:
        raise RunError(f"{Path(run_dir) / 'results.json'}: no table matches "
                       f"(stages={list(stages or []) or 'all'}, match={list(match) or 'any'})")
    parts = []
    for name, t in found:
        if fmt == "md":
            parts.append(f"**{name}: {t.get('title', '')}**\n\n"
                         + markdown_table(t["columns"], t["rows"], digits))
        else:
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow([f"# {name}: {t.get('title', '')}"])
            w.writerow(t["columns"])
            w.writerows([["" if v is None else v for v in r] for r in t["rows"]])
            parts.append(buf.getvalue().rstrip("\n"))
    return "\n\n".join(parts) + "\n"
