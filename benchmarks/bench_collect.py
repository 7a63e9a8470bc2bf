"""Activation collection: ``emocircuits.collect`` vs ``run_with_cache`` + slicing.

Both variants get the same chat-templated SEV prompts (emotion-instructed paper template),
the same batch size and left padding, and produce the same tensor: resid_post at the last
prompt token for every layer, float32 on the CPU, ``[n, layer, d_model]``.

* baseline: per batch, ``_, cache = model.run_with_cache(tokens, attention_mask=...)``
  (every hook point at every position, plus full logits), then
  ``stack(cache[resid_post_l][:, -1] for l)``; the cache is dropped after each batch;
* filtered baseline: the same with ``run_with_cache(..., names_filter=<the 30 resid_post
  hooks>)``, the cache a TransformerLens user would write for this job (issue 18's memory
  goal: ``collect``'s extra peak memory ≤ this one's);
* project: ``collect(model, prompts, "resid_post", "last", batch_size=...)`` — the library
  default: prompts batched in order of token length (less padding), results in input order,
  no KV cache;
* ``collect_unsorted`` (with ``--unsorted``): the same call with ``sort_by_length=False``
  (input-order batches), to show what the sorting buys.

The physical bound: every variant must run the forward over each prompt's real tokens. Its
FLOPs (analytic, ``bench_flops.forward_flops`` per prompt at its own length) divided by the
square-matmul peak measured in the same run give a floor on the time of *any* fp32
implementation here, hence the largest speedup over the baseline that is possible at all
(``bound.max_possible_speedup``).

Each variant runs in its own fresh process (``--variant`` child mode) so that its peak
memory is measured cleanly: ``VmHWM − VmRSS`` around the variant (see ``common.PeakMemory``).
The results of the variants are compared element-wise (``max_abs_diff``).

Usage: ``python benchmarks/bench_collect.py [--model M] [--n 256] [--batch-size 16] [--unsorted]``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

VARIANTS = ("run_with_cache", "run_with_cache_filtered", "collect", "collect_unsorted")


def baseline_run_with_cache(model, prompts, batch_size: int, *,
                            filtered: bool = False) -> tuple[torch.Tensor, float]:
    """Full cache per batch (``filtered``: only the resid_post hooks), then slice; returns
    (acts [n, layer, d], cache MB of one batch)."""
    from emocircuits import sites as S
    from emocircuits.prompts import tokenize

    names = [S.hook_name(model, "resid_post", layer) for layer in range(model.cfg.n_layers)]
    out, cache_mb = [], 0.0
    texts = [p.text for p in prompts]
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            b = tokenize(model, texts[s:s + batch_size])
            kw = {"names_filter": names} if filtered else {}
            _, cache = model.run_with_cache(b.tokens, attention_mask=b.attention_mask, **kw)
            if s == 0:
                cache_mb = sum(v.numel() * v.element_size() for v in cache.values()
                               if isinstance(v, torch.Tensor)) / 2**20
            out.append(torch.stack([cache[n][:, -1] for n in names], 1).float().cpu())
            del cache
    return torch.cat(out), cache_mb


def project_collect(model, prompts, batch_size: int, sort: bool = True) -> torch.Tensor:
    from emocircuits.activations import collect

    return collect(model, prompts, "resid_post", "last", batch_size=batch_size,
                   sort_by_length=sort, progress=False)["resid_post"]


def flop_floor(model, prompts) -> dict:
    """Analytic FLOPs of the forward over every prompt's real tokens (no padding), one
    kept position each, and the same for the padded batches of the baseline."""
    from bench_flops import forward_flops

    from emocircuits.prompts import encode

    lens = [len(encode(model, p.text)) for p in prompts]
    real = sum(forward_flops(model, 1, n)["total"] for n in lens)
    return {"flops_real_tokens": real, "what": "fp32 floor = FLOPs of the real tokens / matmul peak"}


def run_variant(model, prompts, variant: str, batch_size: int, device: str = "cpu") -> dict:
    """Warm up on one batch, then time one full pass of ``variant`` and its extra peak memory."""
    warm = prompts[:min(len(prompts), batch_size)]
    fn = {
        "run_with_cache": lambda ps: baseline_run_with_cache(model, ps, batch_size),
        "run_with_cache_filtered": lambda ps: baseline_run_with_cache(model, ps, batch_size, filtered=True),
        "collect": lambda ps: (project_collect(model, ps, batch_size), None),
        "collect_unsorted": lambda ps: (project_collect(model, ps, batch_size, sort=False), None),
    }[variant]
    fn(warm)
    gc.collect()
    with C.PeakMemory(device) as pm:
        t = time.perf_counter()
        acts, cache_mb = fn(prompts)
        C.sync(device)
        seconds = time.perf_counter() - t
    res = {"variant": variant, "seconds": seconds, "peak_extra_mb": pm.extra_mb,
           "memory_method": pm.method, "result_mb": acts.numel() * 4 / 2**20,
           "shape": list(acts.shape)}
    if cache_mb is not None:
        res["full_cache_mb_per_batch"] = cache_mb
    return {"res": res, "acts": acts}


def main(argv=None) -> dict:
    ap = C.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--n", type=int, default=256, help="number of prompts")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--unsorted", action="store_true", help="also time collect without length sorting")
    ap.add_argument("--in-process", action="store_true",
                    help="run the variants in this process (fast; memory numbers less clean)")
    ap.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dump", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    C.setup(args)
    variants = ["run_with_cache", "run_with_cache_filtered", "collect"] + (
        ["collect_unsorted"] if args.unsorted else [])

    if args.variant is not None:  # child mode: one variant, fresh process
        model = C.load(args.model, args.device)
        prompts = C.sev_prompts(model, args.n)
        r = run_variant(model, prompts, args.variant, args.batch_size, args.device)
        if args.dump:
            torch.save(r["acts"], args.dump)
        return C.emit(r["res"])

    results: dict[str, dict] = {}
    acts: dict[str, torch.Tensor] = {}
    model = C.load(args.model, args.device)
    prompts = C.sev_prompts(model, args.n)
    tokens = C.token_stats(model, prompts)
    bound = flop_floor(model, prompts)
    if args.in_process:
        for v in variants:
            r = run_variant(model, prompts, v, args.batch_size, args.device)
            results[v], acts[v] = r["res"], r["acts"]
    else:
        del model
        gc.collect()
        with tempfile.TemporaryDirectory() as tmp:
            for v in variants:
                dump = str(Path(tmp) / f"{v}.pt")
                child = ["--model", args.model, "--n", str(args.n), "--batch-size",
                         str(args.batch_size), "--variant", v, "--dump", dump, "--device", args.device]
                if args.threads:
                    child += ["--threads", str(args.threads)]
                results[v] = C.run_child(Path(__file__), child)
                acts[v] = torch.load(dump)
    base, proj = results["run_with_cache"], results["collect"]
    out = {
        "benchmark": "collect",
        "model": args.model, "n_prompts": args.n, "batch_size": args.batch_size,
        "what": "resid_post, last prompt token, all layers, float32 CPU",
        "tokens": tokens,
        "baseline": base, "project": proj,
        "speedup": C.ratio(base["seconds"], proj["seconds"]),
        "memory_ratio": C.ratio(base["peak_extra_mb"], max(proj["peak_extra_mb"], 1e-3)),
        "max_abs_diff": float((acts["run_with_cache"] - acts["collect"]).abs().max()),
        "goal": {"speedup": 3.0, "memory_ratio": 10.0, "memory_ratio_vs_filtered": 1.0},
        "memory_method": "fresh subprocess per variant; VmHWM after reset minus VmRSS before"
                         if not args.in_process else "in-process VmHWM reset (less clean)",
        "env": C.env_info(args.device),
    }
    filt = results["run_with_cache_filtered"]
    out["baseline_filtered"] = filt
    out["speedup_vs_filtered"] = C.ratio(filt["seconds"], proj["seconds"])
    out["memory_ratio_vs_filtered"] = C.ratio(filt["peak_extra_mb"], max(proj["peak_extra_mb"], 1e-3))
    out["max_abs_diff_filtered"] = float((acts["run_with_cache_filtered"] - acts["collect"]).abs().max())
    if "collect_unsorted" in results:
        s = results["collect_unsorted"]
        out["project_unsorted"] = s
        out["speedup_unsorted"] = C.ratio(base["seconds"], s["seconds"])
        out["sorting_gain"] = C.ratio(s["seconds"], proj["seconds"])
        out["max_abs_diff_unsorted"] = float((acts["collect_unsorted"] - acts["collect"]).abs().max())
    from bench_flops import matmul_peak

    peak = matmul_peak(2048)["flops_per_s"]
    bound["matmul_peak_flops_per_s"] = peak
    bound["fp32_floor_s"] = bound["flops_real_tokens"] / peak
    bound["max_possible_speedup"] = C.ratio(base["seconds"], bound["fp32_floor_s"])
    bound["project_fraction_of_peak"] = C.ratio(bound["flops_real_tokens"] / proj["seconds"], peak)
    out["bound"] = bound
    out["goal_met"] = {"speedup": (out["speedup"] or 0) >= 3.0,
                       "memory_ratio": (out["memory_ratio"] or 0) >= 10.0,
                       "memory_vs_filtered": (out["memory_ratio_vs_filtered"] or 0) >= 1.0}
    return C.emit(C.rounded(out), args.out)


if __name__ == "__main__":
    main()
