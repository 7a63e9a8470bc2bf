"""Dry runs: the plan of every stage, cached or not, with a rough CPU time estimate."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .engine import Plan, RunConfigLike, Study, effective_hash, stage_dir, stage_hashes

# Per-model cost on the 2-core CPU, calibrated on an idle run of experiments/06_circuits.toml
# on SmolLM2-135M (2026-12-01: every stage took 0.51–0.57 × the former constants 0.4 / 0.15;
# 1,273 s measured for 2,270 s estimated).
SECONDS_PER_PROMPT_FORWARD = 0.22
SECONDS_PER_DECODE_STEP_BATCH16 = 0.083
# One last-token rerun on a cached prompt prefix (component sweeps), as a fraction of a
# full prompt forward. SEV prompts have ~65 tokens, but a one-token step of 16 rows is bound by
# reading the weights and the hooks: measured 0.17 (benchmarks/bench_reuse.py, 2026-12-02).
LAST_TOKEN_STEP_FORWARDS = 0.17
# Sublayer influence: last-token rows (one per intervention, full depth) that cost one prompt
# forward (batched rows on a repeated KV cache); bench_reuse.py measured ~10 at 12 rows per
# forward, more rows per forward are cheaper per row (a rough value: 15).
INFLUENCE_ROWS_PER_FORWARD = 15
MODEL_COST = {"smollm2-135m-instruct": 1.0, "gemma-3-270m": 2.5, "tiny-llama": 0.02,
              "tiny-gemma": 0.02}


def estimate_seconds(plan: Plan, model: str, max_new_tokens: int) -> float:
    """forward·0.4 s + ⌈generate/16⌉·max_new_tokens·0.15 s (+ prefill), × the model's factor."""
    f = MODEL_COST.get(str(model), 1.0)
    fwd = float(plan.forward) + float(plan.generate)
    dec = math.ceil(float(plan.generate) / 16) * max_new_tokens * SECONDS_PER_DECODE_STEP_BATCH16
    return f * (fwd * SECONDS_PER_PROMPT_FORWARD + dec) + float(plan.extra_seconds)


def dry_run(cfg: RunConfigLike, run_dir: str | os.PathLike, studies: Sequence[Study], *,
            estimate: Callable[[Plan], float], header: Sequence[str] = (),
            load_seconds: float = 10.0, only: Sequence[str] | None = None) -> str:
    """The plan as text: stages in order, forwards/generations, cached or not, estimated time."""
    from .engine import closure

    run_dir = Path(run_dir)
    hashes = stage_hashes(studies, cfg)
    wanted = closure(studies, only)
    lines = [*header, f"{'stage':<16} {'state':<28} {'fwd':>7} {'gen':>6} {'est.':>8}  what"]
    total, model_needed = 0.0, False
    done: dict[str, bool] = {}
    for st in studies:
        h = effective_hash(st, hashes, done)
        plan = st.plan(cfg)
        if stage_dir(run_dir, st.name, h).joinpath("output.json").is_file():
            done[st.name] = True
            state, est = "cached", 0.0
        elif st.name not in wanted:
            state, est = "not asked", 0.0
        elif st.missing_modules():
            state, est = "unavailable (" + ",".join(m.split(".")[-1] for m in st.missing_modules()) + ")", 0.0
        else:
            state, est = f"to run [{h[:8]}]", estimate(plan)
            model_needed = True
        total += est
        lines.append(f"{st.name:<16} {state:<28} {plan.forward:>7.0f} {plan.generate:>6.0f} "
                     f"{est:>7.0f}s  {plan.what}")
    if model_needed:
        total += load_seconds
    lines.append(f"estimated total: {total / 60:.1f} min ({total:.0f} s, incl. model load; "
                 "a rough CPU estimate)")
    return "\n".join(lines)
