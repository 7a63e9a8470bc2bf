"""The emocircuits command line.

    emocircuits run --preset quick --model smollm2-135m-instruct --out runs/quick
    emocircuits run --preset quick --out runs/quick --dry-run       # the plan, sizes, cached?
    emocircuits run --preset experiments/06_circuits.toml           # an experiment preset
    emocircuits directions --preset quick --out runs/quick          # one stage (+ what it needs)
    emocircuits report runs/quick                                   # rebuild report.html
    emocircuits figures runs/quick runs/circuits --out runs/figures  # compare run folders
    emocircuits tables runs/circuits --stage circuits --match answer  # a run's tables as Markdown
    emocircuits stages                                              # list the stages

Settings: --preset (quick, full or a TOML path), --set section.key=value (TOML values,
repeatable), --model (any name load_model accepts, or tiny-llama / tiny-gemma). Every setting
is checked before anything is loaded. Finished stages are cached in the run folder and
skipped on reruns; a killed run resumes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", default="quick", help="quick | full | path/to/preset.toml")
    ap.add_argument("--model", default=None, help="model name (default: the preset's)")
    ap.add_argument("--out", default=None, help="run folder (default: runs/<preset>)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="SECTION.KEY=VALUE", help="override a preset value (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--timing", action="store_true",
                    help="print the plan (as --dry-run) with the finished stages' measured seconds beside their estimates")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--stop-on-error", action="store_true",
                    help="stop at the first failing stage (default: record it and go on)")
    ap.add_argument("--no-report", action="store_true", help="do not write report.html")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .studies import STUDIES

    ap = argparse.ArgumentParser(prog="emocircuits", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--version", action="version", version=f"emocircuits {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("run", help="run every stage of the preset (cached stages are skipped)"))
    for st in STUDIES:
        _common(sub.add_parser(st.name, help=f"{st.title} (and what it needs)"))
    rep = sub.add_parser("report", help="rebuild report.html of a run folder")
    rep.add_argument("run_dir")
    fig = sub.add_parser("figures", help="figures comparing finished run folders")
    fig.add_argument("run_dirs", nargs="+")
    fig.add_argument("--out", default="runs/figures")
    tab = sub.add_parser("tables", help="print the tables of a finished run folder (Markdown or CSV)")
    tab.add_argument("run_dir")
    tab.add_argument("--stage", action="append", default=[], help="only this stage (repeatable)")
    tab.add_argument("--match", action="append", default=[],
                     help="only tables whose title contains this text (repeatable)")
    tab.add_argument("--format", choices=("md", "csv"), default="md")
    tab.add_argument("--digits", type=int, default=3, help="significant digits (default 3)")
    tab.add_argument("--headline", action="store_true", help="also print the stages' headline numbers")
    tab.add_argument("--results", action="append", default=[], metavar="STAGE.KEY[.KEY]",
                     help="print a list of records from a stage's results instead (e.g. circuits.grid)")
    tab.add_argument("--columns", default=None, help="comma-separated fields for --results")
    sub.add_parser("stages", help="list the stages and whether their modules are available")
    return ap


def _one_line_warnings() -> None:
    """In the CLI process: each warning once, as one line (category: message), no source line."""
    import warnings

    warnings.simplefilter("once")
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: (  # type: ignore[assignment]
        f"warning ({category.__name__}): {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    from .run import ConfigError, RunError
    from .studies import STUDIES, dry_run, load_config, run_pipeline

    args = build_parser().parse_args(argv)
    _one_line_warnings()
    if args.command == "stages":
        for st in STUDIES:
            miss = st.missing_modules()
            state = "available" if not miss else f"unavailable ({', '.join(miss)} missing)"
            req = f" after {', '.join(st.requires)}" if st.requires else ""
            print(f"{st.name:<16} {st.title}{req} — {state}")
        return 0
    if args.command == "figures":
        from .viz.runs import figures_from_runs

        try:
            for p in figures_from_runs(args.run_dirs, args.out):
                print("wrote", p)
        except RunError as e:
            print(f"emocircuits figures: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "tables":
        from .viz.tables import render_tables

        try:
            print(render_tables(args.run_dir, args.stage, args.match, args.format, args.digits,
                                headline=args.headline, results=args.results,
                                columns=args.columns.split(",") if args.columns else None), end="")
        except RunError as e:
            print(f"emocircuits tables: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "report":
        import json

        from .viz.report import build_report

        try:
            print(build_report(args.run_dir))
        except json.JSONDecodeError as e:
            print(f"emocircuits report: {args.run_dir}/results.json is not valid JSON "
                  f"(line {e.lineno}, column {e.colno}: {e.msg})", file=sys.stderr)
            return 2
        except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
            print(f"emocircuits report: {args.run_dir}: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        cfg = load_config(args.preset, args.overrides, model=args.model)
    except (FileNotFoundError, ConfigError) as e:
        print(f"emocircuits: {e}", file=sys.stderr)
        return 2
    out = args.out or f"runs/{cfg.run.preset or 'run'}"
    only = None if args.command == "run" else [args.command]
    try:
        if args.dry_run or args.timing:
            print(dry_run(cfg, out, only=only, timing=args.timing))
            return 0
        t = time.perf_counter()
        res = run_pipeline(cfg, out, only=only, keep_going=False if args.stop_on_error else None,
                           report=not args.no_report, progress=not args.no_progress)
    except (RunError, ConfigError) as e:
        print(f"emocircuits: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t
    print(f"ran {res.ran or '-'}; cached {res.cached or '-'}; skipped {res.skipped or '-'}; "
          f"failed {res.failed or '-'}")
    summary = res.results.get("summary") or {}
    if summary:
        print("headline numbers:")
        for k, v in summary.items():
            print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    print(f"results: {res.run_dir / 'results.json'}")
    if res.report:
        print(f"report:  {res.report}")
    print(f"wall time: {wall:.1f} s")
    return 1 if res.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
