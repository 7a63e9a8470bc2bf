"""Dry runs: the plan of every stage, cached or not, with a rough CPU time estimate."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .engine import Plan, RunConfigLike, Study, effective_hash, stage_dir, stage_hashes

# Per-model cost on the 2-core CPU (SmolLM2-135M = 1; others scale by MODEL_COST).
# A prompt forward (an SEV chat prompt, ~65 tokens) in float32 at batch size b (the stages run
# their forwards at generation.batch_size): FORWARD_SECONDS + FORWARD_SECONDS_PER_BATCH / b.
# Calibrated on idle runs: 0.22 s at b = 16 (experiments/06_circuits.toml, 2026-12-01) and
# 0.11 s at b = 64 (the full preset's directions stage: 5,760 forwards in 638 s, 2026-12-02).
FORWARD_SECONDS = 0.073
FORWARD_SECONDS_PER_BATCH = 2.35
SECONDS_PER_PROMPT_FORWARD = FORWARD_SECONDS + FORWARD_SECONDS_PER_BATCH / 16  # at batch 16 (0.22)
# Greedy decoding, per generated row-token: ROW_TOKEN_SECONDS[dtype] + DECODE_STEP_SECONDS / batch
# (the fixed per-step part: logits processors, hooks, the bridge's wrappers). Fitted on
# benchmarks/bench_reuse.py --only decode (2026-12-02, SEV neutral prompts, 100 new tokens): float32
# 1.00 / 0.73 s per text at batch 16 / 64. bfloat16 refitted on the full preset's generating
# stages run on the bypass and grouped decoding (prompting, steering, circuits; SmolLM2,
# 2026-12-04; `emocircuits run --preset full --timing`), where texts also stop at EOS:
# 0.15 s per text at batch 64 (0.41 s before the bypass).
DECODE_STEP_SECONDS = 0.060
ROW_TOKEN_SECONDS = {"float32": 0.00447, "bfloat16": 0.000575, "float16": 0.00447}
# A prompt forward in bfloat16 costs this fraction of float32 (prefill: 3.67 s vs 11.4 s, 64 prompts).
FORWARD_DTYPE_FACTOR = {"float32": 1.0, "bfloat16": 0.32, "float16": 1.0}
# One last-token rerun on a cached prompt prefix (component sweeps), as a fraction of a full
# prompt forward, per row: 25 neuron-ablation steps on 16 SEV prompts took 4.2 s including the
# prefix forward (2026-12-02), i.e. ~50 ms a step of 16 rows, 0.015 of a prompt forward per row.
# (bench_reuse.py's 0.17 timed 7 steps, where the prefix forward dominates.)
LAST_TOKEN_STEP_FORWARDS = 0.015
# Sublayer influence (circuits), per prompt: one prefix forward, then one last-token row per
# (emotion, dose, sublayer) resumed at its layer, INFLUENCE_ROW_SECONDS per row and full depth.
# The influence runs at INFLUENCE_BATCH prompts × up to INFLUENCE_MAX_ROWS rows per forward
# whatever the generation batch: 24 SEV prompts × 1,440 interventions took 3.4 s per prompt at
# (8, 192), 3.8 s at (16, 128), 4.5 s at (24, 576); the full run's 64 prompts per batch 5.2 s
# (2026-12-02). (3.4 − 0.22) / (1,440 rows × 0.52 mean depth) = 4.3 ms. The full preset's
# influence on SmolLM2 (480 prompts) took 1,091 s on 2026-12-04 against 1,641 s by that: 2.85 ms.
INFLUENCE_ROW_SECONDS = 0.00285
INFLUENCE_BATCH = 8
INFLUENCE_MAX_ROWS = 192
# The probes stage's forwards run short utterances (not SEV chat prompts): one costs this
# fraction of a prompt forward (the full preset's probes stage: 187 s measured, 2026-12-02).
UTTERANCE_FORWARD = 0.07
MODEL_COST = {"smollm2-135m-instruct": 1.0, "gemma-3-270m": 2.5, "tiny-llama": 0.02,
              "tiny-gemma": 0.02}
# The same factor for the work done in the generation dtype (decoding, its prefill, the scoring
# forwards); MODEL_COST where a model is not listed. Gemma-3-270M's stories and control stages
# of the full preset, run on the bypass and grouped decoding (2026-12-03/04: 3,464 s and 829 s),
# fit 1.7 with the constants above (Gemma's generation: 13.3 s against SmolLM2's 8.4 s for 64
# texts of 100 tokens in bench_decode.py; its 262k-token unembedding is 38 % of a step).
MODEL_GENERATION_COST = {"gemma-3-270m": 1.7}


def _dtype_key(dtype) -> str:
    from ..models import resolve_dtype

    return str(resolve_dtype(dtype)).removeprefix("torch.") if dtype is not None else "float32"


def estimate_seconds(plan: Plan, model: str, generation) -> float:
    """A rough CPU time for ``plan``: analysis forwards at the batch's cost; each generated text one prefill
    plus max_new_tokens row-tokens at (ROW_TOKEN_SECONDS + DECODE_STEP_SECONDS / batch), its
    scoring forwards in the generation dtype; all × the model's factor (MODEL_GENERATION_COST for
    the generation-dtype work).

    ``generation``: the run's ``[generation]`` section (or an int max_new_tokens: float32,
    batch 16)."""
    if isinstance(generation, (int, float)):
        max_new, batch, dt = int(generation), 16, "float32"
    else:
        max_new, batch, dt = generation.max_new_tokens, generation.batch_size, _dtype_key(generation.dtype)
    f = MODEL_COST.get(str(model), 1.0)
    f_gen = MODEL_GENERATION_COST.get(str(model), f)
    fwd_dt = FORWARD_DTYPE_FACTOR.get(dt, 1.0)
    s_fwd = FORWARD_SECONDS + FORWARD_SECONDS_PER_BATCH / max(1, batch)
    row_tok = ROW_TOKEN_SECONDS.get(dt, ROW_TOKEN_SECONDS["float32"]) + DECODE_STEP_SECONDS / max(1, batch)
    gen = float(plan.generate) * (fwd_dt * s_fwd + max_new * row_tok) + fwd_dt * float(plan.eval_forward) * s_fwd
    other = float(plan.decode_tokens) * (ROW_TOKEN_SECONDS["float32"] + DECODE_STEP_SECONDS / 16)
    fwd = float(plan.forward) * s_fwd
    return f * (fwd + other + float(plan.work_seconds)) + f_gen * gen + float(plan.extra_seconds)


def dry_run(cfg: RunConfigLike, run_dir: str | os.PathLike, studies: Sequence[Study], *,
            estimate: Callable[[Plan], float], header: Sequence[str] = (),
            load_seconds: float = 10.0, only: Sequence[str] | None = None, timing: bool = False) -> str:
    """The plan as text: stages in order, forwards/generations, cached or not, estimated time.

    ``timing``: also estimate the cached stages and print each one's measured compute seconds
    (``output.json``'s ``compute_seconds``: this stage's runs, resumed checkpoints included) and
    measured / estimated: how the cost model is checked against a finished run."""
    import json

    from .engine import RunError, closure

    run_dir = Path(run_dir)
    hashes = stage_hashes(studies, cfg)
    wanted = closure(studies, only)
    extra = f" {'measured':>9} {'ratio':>6}" if timing else ""
    lines = [*header, f"{'stage':<16} {'state':<28} {'fwd':>7} {'gen':>6} {'est.':>8}{extra}  what"]
    total, model_needed = 0.0, False
    t_est = t_meas = 0.0
    done: dict[str, bool] = {}
    for st in studies:
        h = effective_hash(st, hashes, done)
        plan = st.plan(cfg)
        out_json = stage_dir(run_dir, st.name, h).joinpath("output.json")
        measured = None
        if out_json.is_file():
            done[st.name] = True
            state, est = "cached", 0.0
            if timing:
                try:
                    out = json.loads(out_json.read_text())
                    measured = float(out.get("compute_seconds", out.get("seconds")))
                except (OSError, ValueError, TypeError) as e:
                    raise RunError(f"{out_json}: no readable seconds ({e})") from e
                est = estimate(plan) if st.name in wanted else 0.0
        elif st.name not in wanted:
            state, est = "not asked", 0.0
        elif st.missing_modules():
            state, est = "unavailable (" + ",".join(m.split(".")[-1] for m in st.missing_modules()) + ")", 0.0
        else:
            state, est = f"to run [{h[:8]}]", estimate(plan)
            model_needed = True
        col = ""
        if timing:
            if measured is None:
                col = f" {'-':>9} {'-':>6}"
            else:
                t_est, t_meas = t_est + est, t_meas + measured
                ratio = f"{measured / est:.2f}" if est > 0 else "-"
                col = f" {measured:>8.0f}s {ratio:>6}"
        if state != "cached":
            total += est
        lines.append(f"{st.name:<16} {state:<28} {plan.forward + plan.eval_forward:>7.0f} {plan.generate:>6.0f} "
                     f"{est:>7.0f}s{col}  {plan.what}")
    if model_needed:
        total += load_seconds
    lines.append(f"estimated total: {total / 60:.1f} min ({total:.0f} s, incl. model load; "
                 "a rough CPU estimate)")
    if timing:
        ratio = f"{t_meas / t_est:.2f}" if t_est > 0 else "-"
        lines.append(f"finished stages: estimated {t_est:.0f} s, measured {t_meas:.0f} s "
                     f"({t_meas / 60:.1f} min), measured / estimated {ratio}")
    return "\n".join(lines)
