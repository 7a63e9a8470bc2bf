"""Head importance: the paper's loop vs the project's batched exact ablation vs attribution.

All variants compute the paper's score (PAPER_METHOD.md §5.2): zero head h's z at layer l at
every position, read s_l = ⟨ln2_l[last], v̂_attn,e^l⟩, importance = s_l(base) − s_l(ablated),
averaged over each emotion's prompts.

* paper loop (baseline): ``head_ablation_importance(..., batched=False)`` — batch 1, one full
  forward per (prompt, layer, head). Timed on ``--loop-prompts`` prompts × ``--loop-layers``
  layers; extrapolated per forward to N · (1 + L·H) forwards (the paper's count; 1.9 M for
  2,847 prompts on Llama-3.2-3B);
* exact (project): ``head_ablation_importance(..., batched=True)`` — all heads of a layer in one
  forward (batch × (H+1) copies), stopped after layer l. Timed on ``--layers`` (default: every
  ``L//5``-th layer) and extrapolated to all layers by its cost model: layer l costs ∝ (l+1);
* attribution (project): ``head_attribution(..., readout="same_layer")`` — one forward + one
  backward per batch (first-order estimate), all layers;
* closed form (proposed, exact): the readout s_l sees layer l's attention only through the
  last position's o_proj output, which is linear in z, so zeroing head h (all positions)
  changes it by exactly −z_h[last]·W_O[h]. From ONE forward (resid_pre, o_proj output and z
  at the last token, via ``collect``) every (layer, head) ablation is computed exactly:

      s_l(h) = ⟨ln2(resid_pre_l + post(o_l − z_{l,h} W_O[l,h])), v̂_l⟩   (post = ln1_post on
      Gemma 3, identity on Llama)

  It is checked against the batched exact values (``closed_form_vs_exact_max_diff``).

Agreement of attribution with exact (closed form, all layers): Spearman over every
(emotion, layer, head), Spearman on each emotion's exact top-k heads (mean over emotions), and
top-k overlap. Timings are per prompt and for the ``--n`` prompts.

Usage: ``python benchmarks/bench_heads.py [--model M] [--n 6] [--batch-size 16]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.flatten().double().numpy(), b.flatten().double().numpy()).statistic)


def agreement(exact: torch.Tensor, approx: torch.Tensor, k: int) -> dict[str, float]:
    """``exact``/``approx`` [emotion, layer, head]: overall ρ, ρ on each emotion's exact top-k
    heads (mean over emotions), top-k overlap (mean over emotions)."""
    rho_top, overlap = [], []
    for e in range(exact.shape[0]):
        x, y = exact[e].flatten(), approx[e].flatten()
        kk = min(k, x.numel())
        top = torch.topk(x, kk).indices
        rho_top.append(spearman(x[top], y[top]) if kk > 2 else float("nan"))
        overlap.append(len(set(top.tolist()) & set(torch.topk(y, kk).indices.tolist())) / kk)
    return {"spearman_all": spearman(exact, approx), "top_k": k,
            "spearman_top_mean": sum(rho_top) / len(rho_top),
            "top_overlap_mean": sum(overlap) / len(overlap)}


@torch.no_grad()
def closed_form_head_importance(model, prompts, directions_mid: torch.Tensor, emotions,
                                batch_size: int = 16) -> torch.Tensor:
    """Mean importance ``[emotion, layer, head]`` by the library's one-forward closed form."""
    from emocircuits.components import head_ablation_importance_closed_form

    emos = sorted({p.emotion for p in prompts}, key=list(emotions).index)
    idx = [list(emotions).index(e) for e in emos]
    res = head_ablation_importance_closed_form(model, prompts, None, directions_mid[idx], emos,
                                               batch_size=batch_size, progress=False)
    out = torch.zeros(len(emotions), *res.mean.shape[1:])
    out[idx] = res.mean
    return out


def main(argv=None) -> dict:
    ap = C.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--n", type=int, default=6,
                    help="prompts scored (the first n of 18 = one complete group set)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--layers", default=None,
                    help="comma-separated layers for the batched exact run (default every L//5)")
    ap.add_argument("--loop-prompts", type=int, default=1, help="prompts timed in the paper loop")
    ap.add_argument("--loop-layers", type=int, default=2, help="layers timed in the paper loop")
    ap.add_argument("--top-k", type=int, default=20)
    args = ap.parse_args(argv)
    C.setup(args)
    from emocircuits.activations import collect
    from emocircuits.components import head_ablation_importance, head_attribution
    from emocircuits.directions import group_centered_means
    from emocircuits.emotions import EKMAN6

    emotions = list(EKMAN6)
    model = C.load(args.model, args.device)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    pool = C.sev_prompts(model, max(18, -(-args.n // 18) * 18), emotions=emotions)
    acts = collect(model, pool, "resid_mid", "last", batch_size=args.batch_size, progress=False)
    dirs, _ = group_centered_means(acts["resid_mid"], [p.group for p in pool],
                                   [p.emotion for p in pool], emotions, normalize=True)
    prompts = pool[:args.n]
    emos = sorted({p.emotion for p in prompts}, key=emotions.index)
    dsel = dirs[[emotions.index(e) for e in emos]]
    n = len(prompts)

    # paper loop: per-forward cost at batch 1, extrapolated
    sub = prompts[:args.loop_prompts]
    sub_emos = sorted({p.emotion for p in sub}, key=emotions.index)
    sub_dirs = dirs[[emotions.index(e) for e in sub_emos]]
    loop_layers = sorted({round(i * (L - 1) / max(1, args.loop_layers - 1))
                          for i in range(args.loop_layers)}) if args.loop_layers > 1 else [L // 2]
    from emocircuits.prompts import tokenize
    wb = tokenize(model, [sub[0].text])
    with torch.no_grad():
        model(wb.tokens, attention_mask=wb.attention_mask, logits_to_keep=1)  # warm-up
    t = time.perf_counter()
    loop = head_ablation_importance(model, sub, None, sub_dirs, sub_emos, layers=loop_layers,
                                    batched=False, progress=False)
    t_loop_sub = time.perf_counter() - t
    n_fwd_sub = len(sub) * len(loop_layers) * (1 + H)  # the project's loop: a baseline per layer
    per_fwd = t_loop_sub / n_fwd_sub
    per_prompt_loop = per_fwd * (1 + L * H)

    # batched exact on a layer subset, extrapolated to all layers (layer l costs ∝ l + 1)
    ex_layers = ([int(x) for x in args.layers.split(",")] if args.layers
                 else sorted(set(range(0, L, max(1, L // 5))) | {L - 1}))
    t = time.perf_counter()
    exact = head_ablation_importance(model, prompts, None, dsel, emos, layers=ex_layers,
                                     batch_size=args.batch_size, progress=False)
    t_exact_sub = time.perf_counter() - t
    scale = sum(range(1, L + 1)) / sum(x + 1 for x in ex_layers)
    t_exact = t_exact_sub * scale

    t = time.perf_counter()
    cf = closed_form_head_importance(model, prompts, dsel, emos, args.batch_size)
    t_cf = time.perf_counter() - t
    cf_diff = float((cf[:, ex_layers] - exact.mean).abs().max())
    loop_ref = cf[[emos.index(e) for e in sub_emos]][:, loop_layers] if len(sub) == n else None

    t = time.perf_counter()
    attr = head_attribution(model, prompts, None, emos, readout="same_layer",
                            directions_mid=dsel, batch_size=args.batch_size, progress=False)
    t_attr = time.perf_counter() - t

    t_loop = per_prompt_loop * n
    res = {
        "benchmark": "heads", "model": args.model, "n_prompts": n, "layers": L, "heads": H,
        "batch_size": args.batch_size, "tokens": C.token_stats(model, prompts),
        "baseline": {"what": "paper loop: batch 1, full forward per (prompt, layer, head)",
                     "seconds_extrapolated": t_loop, "seconds_per_prompt": per_prompt_loop,
                     "forwards": n * (1 + L * H), "seconds_per_forward": per_fwd,
                     "timed_subset": {"prompts": len(sub), "layers": loop_layers,
                                      "forwards": n_fwd_sub, "seconds": t_loop_sub}},
        "project": {
            "exact_batched_s": t_exact, "exact_batched_per_prompt_s": t_exact / n,
            "exact_batched_timed": {"layers": ex_layers, "seconds": t_exact_sub,
                                    "extrapolation_factor": scale},
            "attribution_s": t_attr, "attribution_per_prompt_s": t_attr / n,
            "closed_form_exact_s": t_cf, "closed_form_per_prompt_s": t_cf / n},
        "speedup_exact": C.ratio(t_loop, t_exact),
        "speedup_attribution": C.ratio(t_loop, t_attr),
        "speedup_closed_form_exact": C.ratio(t_loop, t_cf),
        "exact_over_attribution": C.ratio(t_exact, t_attr),
        "agreement_attribution_vs_exact": agreement(cf, attr.mean, args.top_k),
        "closed_form_vs_exact_max_diff": cf_diff,
        "exact_abs_max": float(exact.mean.abs().max()),
        "goal": {"speedup_exact": 20.0, "speedup_attribution": 100.0, "spearman_top": 0.8},
        "env": C.env_info(args.device),
    }
    if loop_ref is not None:
        res["loop_vs_closed_form_max_diff"] = float((loop.mean - loop_ref).abs().max())
    ag = res["agreement_attribution_vs_exact"]
    res["goal_met"] = {"speedup_exact": (res["speedup_exact"] or 0) >= 20,
                       "speedup_closed_form_exact": (res["speedup_closed_form_exact"] or 0) >= 20,
                       "speedup_attribution": (res["speedup_attribution"] or 0) >= 100,
                       "spearman_top": ag["spearman_top_mean"] >= 0.8}
    return C.emit(C.rounded(res), args.out)


if __name__ == "__main__":
    main()
