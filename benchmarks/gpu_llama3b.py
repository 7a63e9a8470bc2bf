"""Llama-3.2-3B-shaped random model on a GPU: collect, head importance, FLOP/s, generation.

No weights travel: the model is built from Llama-3.2-3B's configuration with random weights
(directly on the device), tokenised with the SmolLM2 tokenizer (its ids are < 128,256), and
wrapped with ``emocircuits.models.bridge_from_hf``. For each dtype (``--dtypes bf16,fp32``):

* collect (resid_post, last, all layers) vs ``run_with_cache`` + slice: time, peak CUDA memory;
* head importance: batched exact on a few layers (extrapolated to all), closed-form exact,
  attribution; the paper's loop timed per forward at batch 1 and extrapolated to N·(1 + L·H);
* forward FLOP/s vs a square matmul peak in the same dtype;
* generation ms/token (batch ``--gen-batch``, ``--max-new-tokens``).

Timings of random weights equal those of the real weights (same shapes and kernels); the
head scores themselves are meaningless here. ``--tiny`` uses a 2-layer config (a CPU test).

Usage: ``python benchmarks/gpu_llama3b.py [--device cuda] [--dtypes bf16,fp32] [--out F]``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

LLAMA_3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=4096,
                rms_norm_eps=1e-5)
TINY = dict(LLAMA_3B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=49152)


def tokenizer(path: str | None):
    from transformers import AutoTokenizer

    if path:
        return AutoTokenizer.from_pretrained(path)
    from emocircuits import models

    folder = models.cache_dir() / "models" / f"{models.DEFAULT_MODEL}-fp32"
    if not (folder / "config.json").exists():
        models.convert_gguf(models._alias_gguf(models.DEFAULT_MODEL), folder)
    return AutoTokenizer.from_pretrained(folder)


def build(cfg_kw: dict, tok, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from emocircuits.models import bridge_from_hf

    cfg = LlamaConfig(**cfg_kw, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id or tok.eos_token_id)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    hf.config._attn_implementation = "eager"
    return bridge_from_hf(hf, tok, device=device, dtype=dtype, architecture="LlamaForCausalLM",
                          name="llama-3.2-3b-random")


def run_dtype(model, args, dtype_name: str) -> dict:
    from bench_collect import baseline_run_with_cache, project_collect
    from bench_flops import matmul_peak, measure
    from bench_heads import closed_form_head_importance

    from emocircuits.components import head_ablation_importance, head_attribution
    from emocircuits.emotions import EKMAN6
    from emocircuits.generation import GenerationConfig, generate
    from emocircuits.prompts import tokenize

    dev = args.device
    L, H = model.cfg.n_layers, model.cfg.n_heads
    out: dict = {"dtype": dtype_name}
    prompts = C.sev_prompts(model, args.n)

    # collect vs run_with_cache
    res = {}
    for name, fn in (("run_with_cache", lambda ps: baseline_run_with_cache(model, ps, args.batch_size)[0]),
                     ("collect", lambda ps: project_collect(model, ps, args.batch_size))):
        fn(prompts[:args.batch_size])
        gc.collect()
        with C.PeakMemory(dev) as pm:
            t = time.perf_counter()
            fn(prompts)
            C.sync(dev)
            sec = time.perf_counter() - t
        res[name] = {"seconds": sec, "peak_extra_mb": pm.extra_mb, "memory_method": pm.method}
    out["collect"] = {**res, "speedup": C.ratio(res["run_with_cache"]["seconds"], res["collect"]["seconds"]),
                      "memory_ratio": C.ratio(res["run_with_cache"]["peak_extra_mb"],
                                              max(res["collect"]["peak_extra_mb"], 1e-3))}

    # heads (random directions: timing only)
    emos = list(EKMAN6)
    hp = prompts[:args.head_prompts]
    hemos = sorted({p.emotion for p in hp}, key=emos.index)
    dirs = torch.randn(len(hemos), L, model.cfg.d_model)
    b1 = tokenize(model, [hp[0].text])
    zhook = f"blocks.{L // 2}.attn.hook_z"

    def zero0(x, hook):  # noqa: ARG001
        x = x.clone()
        x[:, :, 0] = 0
        return x

    def fwd_b1():
        with torch.no_grad(), model.hooks(fwd_hooks=[(zhook, zero0)]):
            model(b1.tokens, attention_mask=b1.attention_mask, logits_to_keep=1)

    per_fwd = C.timeit(fwd_b1, repeat=5, warmup=2, device=dev)["min_s"]
    t_loop = per_fwd * len(hp) * (1 + L * H)
    lay = sorted({0, L // 2, L - 1})
    t = time.perf_counter()
    head_ablation_importance(model, hp, None, dirs, hemos, layers=lay, batch_size=args.head_batch,
                             progress=False)
    C.sync(dev)
    t_exact = (time.perf_counter() - t) * sum(range(1, L + 1)) / sum(x + 1 for x in lay)
    t = time.perf_counter()
    closed_form_head_importance(model, hp, dirs, hemos, args.batch_size)
    C.sync(dev)
    t_cf = time.perf_counter() - t
    t = time.perf_counter()
    head_attribution(model, hp, None, hemos, readout="same_layer", directions_mid=dirs,
                     batch_size=args.head_batch, progress=False)
    C.sync(dev)
    t_attr = time.perf_counter() - t
    out["heads"] = {"n_prompts": len(hp), "paper_loop_s_extrapolated": t_loop,
                    "paper_loop_s_per_forward_b1": per_fwd, "exact_batched_s": t_exact,
                    "closed_form_s": t_cf, "attribution_s": t_attr,
                    "speedup_exact": C.ratio(t_loop, t_exact),
                    "speedup_closed_form": C.ratio(t_loop, t_cf),
                    "speedup_attribution": C.ratio(t_loop, t_attr)}

    # FLOP/s
    dt = next(model.original_model.parameters()).dtype
    peak = matmul_peak(args.matmul_size, dtype=dt, device=dev)
    fb = tokenize(model, [p.text for p in prompts[:args.batch_size]])
    m = measure(model, fb.tokens, fb.attention_mask, repeat=3, device=dev, peak=peak["flops_per_s"])
    out["flops"] = {"matmul_peak": peak, "forward": m, "efficiency": m["bridge"]["efficiency"]}

    # generation
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                           batch_size=args.gen_batch)
    gp = prompts[:args.gen_batch]
    generate(model, gp, GenerationConfig(max_new_tokens=2, batch_size=args.gen_batch), progress=False)
    t = time.perf_counter()
    r = generate(model, gp, cfg, progress=False)
    C.sync(dev)
    sec = time.perf_counter() - t
    out["generation"] = {"batch": len(gp), "new_tokens": r.n_tokens, "seconds": sec,
                         "ms_per_step": 1e3 * sec / args.max_new_tokens,
                         "ms_per_token": 1e3 * sec / max(1, r.n_tokens)}
    return out


def main(argv=None) -> dict:
    ap = C.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.set_defaults(device="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="2-layer config (CPU test)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: SmolLM2's)")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--head-prompts", type=int, default=12)
    ap.add_argument("--head-batch", type=int, default=4)
    ap.add_argument("--matmul-size", type=int, default=8192)
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    C.setup(args)
    from emocircuits.models import resolve_dtype

    tok = tokenizer(args.tokenizer)
    res: dict = {"benchmark": "gpu_llama3b", "config": TINY if args.tiny else LLAMA_3B,
                 "device": args.device, "env": C.env_info(args.device), "runs": []}
    for name in args.dtypes.split(","):
        dt = resolve_dtype(name.strip())
        model = build(TINY if args.tiny else LLAMA_3B, tok, args.device, dt)
        res["runs"].append(run_dtype(model, args, name.strip()))
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if args.out:
            C.write_json(args.out, C.rounded(res))
    return C.emit(C.rounded(res), args.out)


if __name__ == "__main__":
    main()
