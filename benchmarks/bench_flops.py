"""Compute efficiency: achieved FLOP/s of a batched forward vs this machine's matmul peak.

FLOPs are counted analytically from the model's weights and the batch shape (multiply-add =
2 FLOPs). For a left-padded batch of B rows × T columns (padding is computed too), with
P_lin = the number of weights in the blocks' matrices (q, k, v, o, gate, up, down):

    F_linear = 2 · P_lin · B · T
    F_attn   = L · B · 4 · n_heads · d_head · T²     (QKᵀ and AV, the full T×T the eager
                                                     kernel computes; "useful" = causal half)
    F_unembed = 2 · d_model · d_vocab · B · k         (k = positions unembedded: 1 here)

The peak is the best FLOP/s of a large square float32 matmul (``--matmul-size``) measured
in the same run with the same threads. Efficiency = achieved / peak (goal ≥ 50 %). The HF
model's own forward is timed as well (``hf``): the bridge's overhead over plain HF.

Usage: ``python benchmarks/bench_flops.py [--model M] [--n 16] [--repeat 3] [--matmul-size 2048]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def linear_params(hf_model) -> int:
    """Weights of the 2-D matrices inside the transformer blocks (no embedding, no norms)."""
    inner = getattr(hf_model, "model", hf_model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(hf_model).__name__}")
    return sum(p.numel() for p in layers.parameters() if p.dim() == 2)


def forward_flops(model, batch: int, seq: int, kept_positions: int = 1) -> dict[str, float]:
    """Analytic FLOPs of one forward over a [batch, seq] token block (module docstring)."""
    cfg = model.cfg
    hf = model.original_model
    p_lin = linear_params(hf)
    f_lin = 2.0 * p_lin * batch * seq
    f_attn = cfg.n_layers * batch * 4.0 * cfg.n_heads * cfg.d_head * seq * seq
    f_unemb = 2.0 * cfg.d_model * cfg.d_vocab * batch * kept_positions
    return {"linear": f_lin, "attention": f_attn, "attention_causal_useful": f_attn / 2,
            "unembed": f_unemb, "total": f_lin + f_attn + f_unemb, "linear_params": p_lin}


def matmul_peak(size: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
                repeat: int = 5) -> dict[str, float]:
    """Best FLOP/s of ``A @ B`` for square ``size`` matrices (2·size³ FLOPs per product)."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    t = C.timeit(lambda: a @ b, repeat=repeat, warmup=2, device=device)
    flops = 2.0 * size**3
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "best_s": t["min_s"],
            "flops_per_s": flops / t["min_s"], "median_flops_per_s": flops / t["median_s"]}


def measure(model, tokens: torch.Tensor, mask: torch.Tensor, *, repeat: int, device: str,
            peak: float) -> dict:
    """Bridge and HF forward over one batch: time, FLOP/s, efficiency vs ``peak``."""
    hf = model.original_model
    b, t = tokens.shape

    def bridge():
        with torch.no_grad():
            model(tokens, attention_mask=mask, logits_to_keep=1)

    def plain():
        with torch.no_grad():
            hf(input_ids=tokens, attention_mask=mask, logits_to_keep=1, use_cache=False)

    times = C.interleaved({"bridge": bridge, "hf": plain}, repeat=repeat, warmup=1, device=device)
    fl = forward_flops(model, b, t, 1)
    out = {"batch": [b, t], "flops": fl, "times": times}
    for k, v in times.items():
        fps = fl["total"] / v["min_s"]
        out[k] = {"flops_per_s": fps, "efficiency": fps / peak,
                  "ms_per_token": 1e3 * v["min_s"] / (b * t)}
    out["bridge_overhead_vs_hf"] = times["bridge"]["min_s"] / times["hf"]["min_s"] - 1
    return out


def main(argv=None) -> dict:
    ap = C.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--n", type=int, default=16, help="prompts in the batch")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--matmul-size", type=int, default=2048)
    args = ap.parse_args(argv)
    C.setup(args)
    from emocircuits.prompts import tokenize

    model = C.load(args.model, args.device)
    prompts = C.sev_prompts(model, args.n)
    batch = tokenize(model, [p.text for p in prompts])
    peak_a = matmul_peak(args.matmul_size, device=args.device)
    m = measure(model, batch.tokens, batch.attention_mask, repeat=args.repeat,
                device=args.device, peak=peak_a["flops_per_s"])
    peak_b = matmul_peak(args.matmul_size, device=args.device)  # again: load may have moved
    peak = max(peak_a["flops_per_s"], peak_b["flops_per_s"])
    for k in ("bridge", "hf"):
        m[k]["efficiency"] = m[k]["flops_per_s"] / peak
    res = {
        "benchmark": "flops", "model": args.model,
        "matmul_peak": {"before": peak_a, "after": peak_b, "peak_flops_per_s": peak},
        "forward": m,
        "baseline": {"what": "square fp32 matmul peak", "flops_per_s": peak},
        "project": {"what": "bridge forward (logits_to_keep=1)", "flops_per_s": m["bridge"]["flops_per_s"]},
        "efficiency": m["bridge"]["efficiency"],
        "goal": {"efficiency": 0.5},
        "goal_met": m["bridge"]["efficiency"] >= 0.5,
        "env": C.env_info(args.device),
    }
    return C.emit(C.rounded(res), args.out)


if __name__ == "__main__":
    main()
