"""End to end: the quick preset's wall time and peak RSS, and estimates for bigger runs.

1. Runs ``emocircuits run --preset quick --model M --out TMP`` in a child process (a fresh
   run folder: nothing cached) and reports its wall time, its peak RSS (``ru_maxrss`` of that
   child, from ``os.wait4``) and the per-stage seconds from its ``results.json``.
2. Measures this machine's unit costs in the same run: seconds per prompt-forward (a batch of
   16 SEV prompts) and per greedy decode step of a batch of 16.
3. Estimates, from the pipeline's own per-stage plans (prompt-forwards F, generated prompts G,
   max_new_tokens T): ``t ≈ F·t_fwd + ⌈G/16⌉·T·t_step`` for
   * ``quick`` (checked against the measured wall time: the calibration factor),
   * ``full`` — the whole builtin data (160 + 40 + 40 = 240 scenarios),
   * the paper's SEV sizes (2,880 prompts; stage counts from PAPER_METHOD.md §1–6), with the
     paper's head loop (1 + L·H forwards per prompt, batch 1) and with ours.

``--set SECTION.KEY=VALUE`` is passed to the CLI (e.g. tiny sizes for a smoke test).

Usage: ``python benchmarks/bench_end_to_end.py [--model M] [--preset quick] [--set ...]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def run_cli(model: str, preset: str, overrides: list[str], out_dir: Path,
            timeout: float) -> dict:
    """The CLI in a child process: wall seconds, peak RSS (MB), return code, results.json."""
    cmd = [sys.executable, "-m", "emocircuits.cli", "run", "--preset", preset, "--model", model,
           "--out", str(out_dir), "--no-progress"]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, TQDM_DISABLE="1")
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=C.ROOT, env=env)
        deadline = time.time() + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.2)
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read()[-2000:]
    res: dict = {"cmd": " ".join(cmd[1:]), "rc": p.returncode, "wall_s": wall,
                 "peak_rss_mb": ru.ru_maxrss / 1024}
    rj = out_dir / "results.json"
    if rj.exists():
        doc = json.loads(rj.read_text())
        res["model_load_s"] = doc.get("meta", {}).get("model_load_seconds")
        res["stages"] = {k: {"seconds": v.get("seconds"), "status": v.get("status")}
                         for k, v in doc.get("stages", {}).items()}
    if p.returncode != 0:
        res["log_tail"] = tail
    return res


def unit_costs(model_name: str, device: str, max_new_tokens: int = 8) -> dict:
    """Seconds per prompt-forward (batch 16) and per decode step (batch 16) on this machine."""
    from emocircuits.generation import GenerationConfig, generate
    from emocircuits.prompts import tokenize

    model = C.load(model_name, device)
    prompts = C.sev_prompts(model, 16)
    b = tokenize(model, [p.text for p in prompts])

    def fwd():
        with torch.no_grad():
            model(b.tokens, attention_mask=b.attention_mask, logits_to_keep=1)

    t_f = C.timeit(fwd, repeat=2, warmup=1, device=device)["min_s"]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, batch_size=16)
    t_g = C.timeit(lambda: generate(model, prompts, cfg, progress=False), repeat=1, warmup=0,
                   device=device)["min_s"]
    step = max(1e-6, (t_g - t_f) / max(1, max_new_tokens - 1))  # prefill ≈ one forward
    return {"batch": list(b.tokens.shape), "s_per_prompt_forward": t_f / 16,
            "s_per_decode_step_b16": step, "generate_s": t_g, "n_layers": model.cfg.n_layers,
            "n_heads": model.cfg.n_heads}


def plan_counts(preset: str, model: str, overrides: list[str]) -> dict:
    """Per-stage (forward, generate) counts from the studies' own plans, and max_new_tokens."""
    from emocircuits.studies import STUDIES, load_config

    cfg = load_config(preset, overrides, model=model)
    stages = {}
    for st in STUDIES:
        if st.missing_modules():
            continue
        p = st.plan(cfg)
        stages[st.name] = {"forward": int(p.forward), "generate": int(p.generate)}
    d = cfg.data
    return {"T": cfg.generation.max_new_tokens, "stages": stages,
            "data": {"n_train": d.n_train, "n_validation": d.n_validation, "n_test": d.n_test}}


def estimate(counts: dict, u: dict) -> dict:
    """t ≈ F·t_fwd + ⌈G/16⌉·T·t_step per stage (seconds)."""
    T = counts["T"]
    per = {}
    for k, c in counts["stages"].items():
        per[k] = (c["forward"] * u["s_per_prompt_forward"]
                  + math.ceil(c["generate"] / 16) * T * u["s_per_decode_step_b16"])
    return {"per_stage_s": per, "total_s": sum(per.values())}


def paper_counts(n_layers: int, n_heads: int, n: int = 2880, T: int = 100) -> dict:
    """Prompt-forward equivalents per stage at the paper's sizes (PAPER_METHOD.md §1–6).

    Head ablation: paper loop n·(1 + L·H) full forwards; ours n·(H+1)·(L+1)/2 full-forward
    equivalents (layer l's H+1 copies stop after layer l); attribution ≈ 3n (forward+backward).
    Closed-form exact head ablation (the project's exact method): n forwards.
    Sublayer influence: 57 interventions × n per (emotion, α) over 4 α (≈ 650 k full forwards
    in the paper); ours runs the prompt once and every intervention as a one-token forward
    from a copy of the KV cache: n_e + ⌈interventions / T⌉ prompt-forward equivalents.
    """
    n_e = n // 6
    return {
        "T": T,
        "stages": {
            "01_elicitation": {"forward": 0, "generate": n},
            "02_directions": {"forward": n, "generate": 0},
            "03_steering": {"forward": 0, "generate": n},
            "04_neurons": {"forward": n, "generate": 0},
            "04_heads_paper_loop": {"forward": n * (1 + n_layers * n_heads), "generate": 0},
            "04_heads_batched_exact": {"forward": n * (n_heads + 1) * (n_layers + 1) // 2, "generate": 0},
            "04_heads_attribution": {"forward": 3 * n, "generate": 0},
            "04_heads_closed_form_exact": {"forward": n, "generate": 0},
            "05_difference_vectors": {"forward": n, "generate": 0},
            "06_sublayer_influence": {"forward": (2 * n_layers + 1) * n_e * 6 * 4, "generate": 0},
            "06_sublayer_influence_kv_cached": {
                "forward": n_e + math.ceil((2 * n_layers + 1) * n_e * 6 * 4 / T), "generate": 0},
            "07_modulation": {"forward": 0, "generate": n},
        },
    }


def main(argv=None) -> dict:
    ap = C.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--timeout", type=float, default=1500)
    ap.add_argument("--skip-run", action="store_true", help="only unit costs and estimates")
    args = ap.parse_args(argv)
    C.setup(args)
    res: dict = {"benchmark": "end_to_end", "model": args.model, "preset": args.preset,
                 "overrides": args.overrides}
    u = unit_costs(args.model, args.device)
    res["unit_costs"] = u
    q = plan_counts(args.preset, args.model, args.overrides)
    res["plan"] = q
    res["estimate_preset"] = estimate(q, u)
    if not args.skip_run:
        with tempfile.TemporaryDirectory(prefix="ec-e2e-") as tmp:
            res["run"] = run_cli(args.model, args.preset, args.overrides, Path(tmp) / "run",
                                 args.timeout)
        run = res["run"]
        res["calibration"] = C.ratio(run["wall_s"], res["estimate_preset"]["total_s"])
    cal = res.get("calibration") or 1.0
    full = plan_counts("full", args.model, [])
    ef = estimate(full, u)
    res["estimate_full_builtin_240_scenarios"] = {
        "plan": full, **ef, "calibrated_total_s": ef["total_s"] * cal,
        "calibrated_total_h": ef["total_s"] * cal / 3600}
    pc = paper_counts(u["n_layers"], u["n_heads"])
    ep = estimate(pc, u)
    per = ep["per_stage_s"]
    heads = ("04_heads_paper_loop", "04_heads_batched_exact", "04_heads_attribution",
             "04_heads_closed_form_exact")
    infl = ("06_sublayer_influence", "06_sublayer_influence_kv_cached")
    common = sum(v for k, v in per.items() if k not in heads + infl)
    paper = common + per["04_heads_paper_loop"] + per["06_sublayer_influence"]
    ours = common + per["06_sublayer_influence_kv_cached"]
    res["estimate_paper_sev_2880"] = {
        "counts": pc, "per_stage_s": per,
        "paper_method_total_h": paper / 3600,
        "ours_exact_heads_total_h": (ours + per["04_heads_closed_form_exact"]) / 3600,
        "ours_batched_exact_heads_total_h": (ours + per["04_heads_batched_exact"]) / 3600,
        "ours_attribution_heads_total_h": (ours + per["04_heads_attribution"]) / 3600,
        "note": "uncalibrated unit-cost estimate; batch-16 forwards for every stage (the paper's "
                "loop ran at batch 1, which is slower per forward)"}
    res["env"] = C.env_info(args.device)
    return C.emit(C.rounded(res), args.out)


if __name__ == "__main__":
    main()
