"""The prompting table (PAPER_METHOD.md §2.7): elicit, judge, tabulate, and the readout beside it.

    flock /tmp/ec_heavy.lock .venv/bin/python experiments/01_prompting_table.py \\
        --model smollm2-135m-instruct --split builtin:test --n-scenarios 8 --max-new-tokens 40

Writes ``<out>/generations.jsonl`` (paper record layout, resumable: rerun the same command,
or a larger --n-scenarios with the same settings, to continue), ``<out>/labeled.jsonl``
(+ judge verdicts) and ``<out>/results.json`` (tables, readout, timing). Chat models use
their chat template; base models (e.g. gemma-3-270m) the plain rendering ending in
"Reply:" for generation and "Reply: I felt" for the readout.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict
from pathlib import Path

import emocircuits as ec
from emocircuits.elicitation import (
    elicit,
    elicitation_seconds_per_100,
    judge_generations,
    load_generations,
    prompting_table,
    readout_accuracy,
    write_json_atomic,
    write_jsonl_atomic,
)
from emocircuits.generation import GenerationConfig
from emocircuits.judges import default_judge
from emocircuits.models import is_chat_model, model_id, tiny_model


def confusion(judged: list[dict]) -> dict[str, dict[str, int]]:
    """{target emotion: {judge label: count}}: what the judge read for each instruction."""
    out: dict[str, Counter] = defaultdict(Counter)
    for r in judged:
        out[r["emotion"]][str(r["judge"]["label"])] += 1
    return {e: dict(c.most_common()) for e, c in out.items()}


def judge_only(args: argparse.Namespace) -> None:
    """Re-judge an existing generations file (no model, no readout)."""
    out = Path(args.out or f"runs/prompting/{Path(args.model).name}")
    rows = load_generations(out / "generations.jsonl", strict=False)
    if args.n_scenarios:
        keep = {r.skeleton_id for r in ec.data.load_sev(args.split)[: args.n_scenarios]}
        rows = [r for r in rows if r["skeleton_id"] in keep]
    judge = default_judge(prefer=args.judge)
    judged = judge_generations(rows, judge)
    write_jsonl_atomic(judged, out / "labeled.jsonl")
    table = prompting_table(judged)
    print(table.format(f"prompting ({judge.name})"))
    write_json_atomic({
        "model": rows[0]["meta"]["model_id"], "split": args.split,
        "n_scenarios": len({r["skeleton_id"] for r in rows}), "n_generations": len(rows),
        "max_new_tokens": rows[0]["meta"]["max_new_tokens"], "chat": rows[0]["meta"]["chat"],
        "judge": judge.name, "prompting": table.to_dict(), "judge_confusion": confusion(judged),
        "timing": {"elicit_s_per_100_generations": elicitation_seconds_per_100(rows),
                   "mean_new_tokens": sum(r["meta"]["n_new_tokens"] for r in rows) / len(rows)},
    }, out / "results_judge_only.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--split", default="builtin:test", help="load_sev source")
    ap.add_argument("--n-scenarios", type=int, default=None, help="first N scenarios (default all)")
    ap.add_argument("--max-new-tokens", type=int, default=100, help="paper: 100")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--judge", default="auto", help="default_judge(prefer=...)")
    ap.add_argument("--no-readout", action="store_true")
    ap.add_argument("--judge-only", action="store_true",
                    help="no model: judge and tabulate the generations already in --out")
    ap.add_argument("--out", default=None, help="default runs/prompting/<model>/")
    args = ap.parse_args()

    if args.judge_only:
        return judge_only(args)
    t = time.perf_counter()
    model = (tiny_model(args.model.split("-", 1)[1]) if args.model in ("tiny-llama", "tiny-gemma")
             else ec.load_model(args.model))  # tiny-*: random test models, for a smoke run
    load_s = time.perf_counter() - t
    name = model_id(model)
    out = Path(args.out or f"runs/prompting/{Path(args.model).name}")
    recs = ec.data.load_sev(args.split)
    recs = recs[: args.n_scenarios] if args.n_scenarios else recs
    chat = is_chat_model(model)
    print(f"loaded {name} in {load_s:.1f}s; chat template: {chat}; {len(recs)} scenarios "
          f"-> {len(recs) * 18} generations, max_new_tokens={args.max_new_tokens}")

    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    t = time.perf_counter()
    rows = elicit(model, recs, ec.EKMAN6, out / "generations.jsonl", cfg,
                  batch_size=args.batch_size)
    wall = time.perf_counter() - t

    judge = default_judge(prefer=args.judge)
    judged = judge_generations(rows, judge)
    write_jsonl_atomic(judged, out / "labeled.jsonl")
    table = prompting_table(judged)
    print(table.format(f"prompting ({judge.name})"))

    result = {
        "model": name, "split": args.split, "n_scenarios": len(recs), "n_generations": len(rows),
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "chat": chat,
        "judge": judge.name, "prompting": table.to_dict(),
        "judge_confusion": confusion(judged),
        "timing": {"load_s": load_s, "this_invocation_s": wall,
                   "elicit_s_per_100_generations": elicitation_seconds_per_100(rows),
                   "mean_new_tokens": sum(r["meta"]["n_new_tokens"] for r in rows) / len(rows)},
    }
    if not args.no_readout:
        t = time.perf_counter()
        ra = readout_accuracy(model, recs, ec.EKMAN6, batch_size=args.batch_size, progress=True)
        result["readout"] = ra.to_dict()
        result["timing"]["readout_s"] = time.perf_counter() - t
        print(ra.table.format(f"readout '{ra.assistant_prefix}'"))
        print(ra.table_no_keyword.format("readout, keyword token out"))
        print("target share on instructed vs neutral prompts: " + ", ".join(
            f"{e} {ra.target_share[e]:.3f}/{ra.neutral_target_share[e]:.3f}" for e in ra.emotions))
        for v, d in ra.neutral_labels.items():
            print(f"neutral prompts, {v:<9} argmax: " + ", ".join(f"{e} {x:.2f}" for e, x in d.items()))
    write_json_atomic(result, out / "results.json")
    print(f"elicitation: {result['timing']['elicit_s_per_100_generations']:.1f} s per 100 "
          f"generations; wrote {out}/results.json")


if __name__ == "__main__":
    main()
