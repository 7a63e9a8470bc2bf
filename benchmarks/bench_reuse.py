#!/usr/bin/env python3
"""What reusing a prefix saves: each fast path against the straightforward path it replaces,
timed in the same run (interleaved, min over repeats), with the largest difference of results.

* ``sweep``: top-k / random-k neuron ablation steps (last token). Straightforward: one full
  forward per step and batch. Fast: the prompt minus its last token once into a KV cache, each
  step reruns the last token only (``components._step_sums(prefix=True)``).
* ``influence``: sublayer influence. Straightforward: one full forward per (prompt batch,
  intervention chunk). Fast: KV-cached prefix, each intervention resumed at its own layer
  (``sublayer_influence(use_cache=True)``).
* ``influence_copies``: the cached influence at the full preset's shape (6 emotions × 4 doses
  per site, ``INFLUENCE_BATCH`` prompts × ``INFLUENCE_MAX_ROWS`` rows): each chunk's
  interventions as copies of the last token stacked on the position axis of one prompt cache
  (``stack_copies=True``, the default) against rows on a cache repeated per intervention
  (``stack_copies=False``, the path before 2026-12-05).
* ``patch_layers``: a whole-layer sweep of mlp_out from a source. Straightforward: ``patch``
  once per layer (source and target rerun for every layer, every block run). Fast:
  ``patch_layers`` (source and target once, each patched forward resumed at its layer).
* ``decode``: tokens per second of greedy generation at several batch sizes and dtypes (same
  prompts, min = max new tokens): what ``generation.batch_size`` and ``generation.dtype`` buy
  on this machine, and the share of rows whose tokens equal the first setting's.

``forwards_equivalent`` counts prompt-forwards of work (a last-token row = 1/T of one,
a resumed forward from layer L = (n − L)/n of one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def bench_sweep(model, args) -> dict:
    from emocircuits import components as K

    texts = [p.text for p in C.sev_prompts(model, args.n)]
    g = torch.Generator().manual_seed(0)
    v = torch.randn(model.cfg.d_model, generator=g)
    metric = K._emotion_score_metric(model, "anger", None, v / v.norm())
    L, W = model.cfg.n_layers, model.cfg.d_mlp
    steps = []
    for k in (1, 2, 4, 8, 16, 32)[: args.steps]:
        idx = torch.randperm(L * W, generator=g)[:k]
        steps.append([(int(i) // W, int(i) % W) for i in idx])
    hooks = [K._intervention_hooks(model, c, "neuron", "ablate", None, 1.0, "last") for c in steps]
    out = {}

    def fast():
        out["fast"] = K._step_sums(model, texts, metric, hooks, args.batch_size, prefix=True, progress=False)

    def slow():
        out["slow"] = K._step_sums(model, texts, metric, hooks, args.batch_size, prefix=False, progress=False)

    t = C.interleaved({"fast": fast, "straightforward": slow}, repeat=args.repeat, warmup=0, device=args.device)
    T = C.token_stats(model, texts)["mean_tokens"]
    n_steps = 1 + len(steps)
    return {"n_prompts": len(texts), "steps": n_steps, "times": t,
            "ratio": C.ratio(t["fast"]["min_s"], t["straightforward"]["min_s"]),
            "forwards_equivalent": {"straightforward": len(texts) * n_steps,
                                    "fast": len(texts) * (1 + n_steps / T)},
            "max_abs_diff": float(max((out["fast"][0] - out["slow"][0]).abs().max(),
                                      (out["fast"][1] - out["slow"][1]).abs().max()))}


def bench_influence(model, args) -> dict:
    from emocircuits import circuits as CI
    from emocircuits.data import load_sev
    from emocircuits.prompts import neutral_prompts

    recs = load_sev("builtin:train")[: args.influence_scenarios]
    prompts = neutral_prompts(model, recs)
    L, d = model.cfg.n_layers, model.cfg.d_model
    g = torch.Generator().manual_seed(1)
    v_mid, v_post = torch.randn(2, L, d, generator=g), torch.randn(2, L, d, generator=g)
    v_mid, v_post = v_mid / v_mid.norm(dim=-1, keepdim=True), v_post / v_post.norm(dim=-1, keepdim=True)
    sigma = torch.ones(2, L)
    kw = dict(alphas=(0.1, 0.5), emotions=["a", "b"], batch_size=args.batch_size, progress=False)
    out = {}

    def fast():
        out["fast"] = CI.sublayer_influence(model, prompts, v_mid, v_post, sigma, use_cache=True, **kw).influence

    def slow():
        out["slow"] = CI.sublayer_influence(model, prompts, v_mid, v_post, sigma, use_cache=False, **kw).influence

    t = C.interleaved({"fast": fast, "straightforward": slow}, repeat=args.repeat, warmup=0, device=args.device)
    n_iv = 2 * 2 * 2 * L
    T = C.token_stats(model, prompts)["mean_tokens"]
    depth = sum((L - k) / L for k in range(L)) / L
    return {"n_prompts": len(prompts), "interventions": n_iv, "times": t,
            "ratio": C.ratio(t["fast"]["min_s"], t["straightforward"]["min_s"]),
            "forwards_equivalent": {"straightforward": len(prompts) * (1 + n_iv),
                                    "fast": len(prompts) * (1 + n_iv * depth / T)},
            "max_abs_diff": float((out["fast"] - out["slow"]).abs().max()),
            "influence_scale": float(out["slow"].abs().max())}


def bench_influence_copies(model, args) -> dict:
    from emocircuits import circuits as CI
    from emocircuits.data import load_sev
    from emocircuits.prompts import neutral_prompts
    from emocircuits.run.plan import INFLUENCE_BATCH, INFLUENCE_MAX_ROWS

    recs = load_sev("builtin:train")[: args.copies_scenarios]
    prompts = neutral_prompts(model, recs)
    L, d, E = model.cfg.n_layers, model.cfg.d_model, 6
    g = torch.Generator().manual_seed(2)
    v_mid, v_post = torch.randn(E, L, d, generator=g), torch.randn(E, L, d, generator=g)
    v_mid, v_post = v_mid / v_mid.norm(dim=-1, keepdim=True), v_post / v_post.norm(dim=-1, keepdim=True)
    sigma = torch.rand(2, L, generator=g) + 0.5
    kw = dict(alphas=(0.1, 0.3, 0.5, 0.7), batch_size=INFLUENCE_BATCH, max_rows=INFLUENCE_MAX_ROWS,
              progress=False)
    out = {}

    def run(stack):
        def fn():
            out[stack] = CI.sublayer_influence(model, prompts, v_mid, v_post, sigma, stack_copies=stack,
                                               **kw).influence
        return fn

    t = C.interleaved({"stacked": run(True), "repeated": run(False)}, repeat=args.repeat, warmup=0,
                      device=args.device)
    return {"n_prompts": len(prompts), "interventions": E * 4 * 2 * L, "times": t,
            "ratio": C.ratio(t["stacked"]["min_s"], t["repeated"]["min_s"]),
            "max_abs_diff": float((out[True] - out[False]).abs().max()),
            "influence_scale": float(out[False].abs().max())}


def bench_patch_layers(model, args) -> dict:
    from bench_peers import same_length_pairs

    from emocircuits import patching as P

    clean, corrupt = same_length_pairs(model, args.n_patch)
    tok = model.tokenizer
    metric = P.logit_diff_metric(tok.encode(" happy", add_special_tokens=False)[0],
                                 tok.encode(" angry", add_special_tokens=False)[0])
    L = model.cfg.n_layers
    out = {}

    def fast():
        out["fast"] = P.patch_layers(model, corrupt, "mlp_out", metric, source=clean,
                                     batch_size=args.n_patch, progress=False).effect[:, 0]

    def slow():
        base = P.metric_values(model, corrupt, metric).double().mean()
        out["slow"] = torch.tensor([float(P.patch(model, corrupt, P.Loc("mlp_out", layer), metric, source=clean,
                                                  batch_size=args.n_patch).double().mean() - base)
                                    for layer in range(L)])

    t = C.interleaved({"fast": fast, "straightforward": slow}, repeat=args.repeat, warmup=0, device=args.device)
    return {"n_pairs": len(clean), "layers": L, "times": t,
            "ratio": C.ratio(t["fast"]["min_s"], t["straightforward"]["min_s"]),
            "forwards_equivalent": {"straightforward": len(clean) * (1 + 2 * L),
                                    "fast": len(clean) * (2 + sum((L - k) / L for k in range(L)))},
            "max_abs_diff": float((out["fast"].double() - out["slow"].double()).abs().max())}


def bench_decode(model, args) -> dict:
    from emocircuits.generation import GenerationConfig, generate

    sizes = [int(x) for x in args.decode_batches.split(",")]
    dtypes = [d or None for d in args.decode_dtypes.split(",")]
    prompts = [p.text for p in C.sev_prompts(model, max(sizes))]
    res, toks = {}, {}
    for dt in dtypes:
        for bsz in sizes:
            cfg = GenerationConfig(max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens,
                                   batch_size=bsz, dtype=dt)
            out = {}

            def run(cfg=cfg, out=out):
                out["g"] = generate(model, prompts, cfg, progress=False)

            t = C.timeit(run, repeat=1, warmup=0, device=args.device)
            n_tok = len(prompts) * args.decode_tokens
            key = f"{dt or 'float32'}@{bsz}"
            res[key] = {"seconds": t["min_s"], "tokens_per_s": n_tok / t["min_s"],
                        "seconds_per_text": t["min_s"] / len(prompts)}
            toks[key] = out["g"].tokens
    keys = list(res)
    first = res[keys[0]]["tokens_per_s"]
    same = {k: sum(a == b for a, b in zip(toks[k], toks[keys[0]], strict=True)) / len(prompts) for k in keys}
    return {"n_prompts": len(prompts), "new_tokens": args.decode_tokens, "by_setting": res,
            "throughput_vs_first": {k: v["tokens_per_s"] / first for k, v in res.items()},
            "rows_identical_to_first": same}


def main(argv=None) -> dict:
    ap = C.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--n", type=int, default=32, help="prompts of the sweep")
    ap.add_argument("--steps", type=int, default=6, help="sweep steps (k = 1, 2, 4, ...)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--influence-scenarios", type=int, default=1)
    ap.add_argument("--copies-scenarios", type=int, default=3, help="train scenarios (× 3 prompts) of influence_copies")
    ap.add_argument("--n-patch", type=int, default=8)
    ap.add_argument("--decode-batches", default="16,32,64")
    ap.add_argument("--decode-tokens", type=int, default=24)
    ap.add_argument("--decode-dtypes", default="float32,bfloat16",
                    help="generation dtypes (GenerationConfig.dtype; bfloat16 needs CPU/GPU support)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--only", default="sweep,influence,influence_copies,patch_layers,decode")
    args = ap.parse_args(argv)
    C.setup(args)
    model = C.load(args.model, args.device)
    only = set(args.only.split(","))
    res: dict = {"benchmark": "reuse", "model": args.model}
    for name, fn in (("sweep", bench_sweep), ("influence", bench_influence),
                     ("influence_copies", bench_influence_copies),
                     ("patch_layers", bench_patch_layers), ("decode", bench_decode)):
        if name in only:
            res[name] = fn(model, args)
    res["timing"] = "min over repeats, fast and straightforward interleaved"
    res["env"] = C.env_info(args.device)
    return C.emit(C.rounded(res), args.out)


if __name__ == "__main__":
    main()
