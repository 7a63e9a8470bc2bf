"""Hook overhead: forward and generation with the project's hooks attached but adding zero.

* forward: one batched forward (``logits_to_keep=1``) of ``--n`` SEV prompts;
* generation: ``emocircuits.generate`` of ``--n-gen`` prompts, ``--max-new-tokens`` greedy
  tokens (every row forced to run all steps: ``min_new_tokens = max_new_tokens``).

Variants, timed round-robin (A B A B ...) so that load drifts hit them alike:

* ``none``: no hooks;
* ``steer0``: ``emocircuits.steering.steer`` on every layer's resid_post with ``strength=0``
  (the hook runs, finds α = 0 and returns its input) — what a steering sweep's α = 0 point
  costs;
* ``steer_add0``: the same ``steer`` with a zero direction vector and ``strength=1``: the hook
  runs its whole path (RMS of the last position, clone, write of x + 0) on every layer — the
  project's hook really adding zero.

``overhead = t(hooks) / t(none) − 1``; goal ≤ 10 %. Generated tokens are compared with the
no-hook run (they must be identical).

Usage: ``python benchmarks/bench_hooks.py [--model M] [--n 16] [--n-gen 8] [--max-new-tokens 20]``.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


@contextmanager
def steer_zero_vector(model):
    from emocircuits.steering import steer

    v = torch.zeros(model.cfg.n_layers, model.cfg.d_model)
    with steer(model, v, layers=list(range(model.cfg.n_layers)), strength=1.0, scale="rms"):
        yield


@contextmanager
def steer_zero(model):
    from emocircuits.steering import steer

    v = torch.randn(model.cfg.n_layers, model.cfg.d_model)
    with steer(model, v, layers=list(range(model.cfg.n_layers)), strength=0.0, scale="rms"):
        yield


def variants(model) -> dict:
    return {"none": None, "steer0": lambda: steer_zero(model),
            "steer_add0": lambda: steer_zero_vector(model)}


def main(argv=None) -> dict:
    ap = C.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--n", type=int, default=16, help="prompts in the forward batch")
    ap.add_argument("--n-gen", type=int, default=8, help="prompts generated from")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    C.setup(args)
    from emocircuits.generation import GenerationConfig, generate
    from emocircuits.prompts import tokenize

    model = C.load(args.model, args.device)
    prompts = C.sev_prompts(model, max(args.n, args.n_gen))
    batch = tokenize(model, [p.text for p in prompts[:args.n]])
    gprompts = prompts[:args.n_gen]
    gcfg = GenerationConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                            batch_size=args.n_gen)
    vs = variants(model)

    def with_hooks(name, fn):
        def run():
            with ExitStack() as st:
                if vs[name] is not None:
                    st.enter_context(vs[name]())
                return fn()
        return run

    def fwd():
        with torch.no_grad():
            model(batch.tokens, attention_mask=batch.attention_mask, logits_to_keep=1)

    gen_tokens = {}

    def gen(name):
        def run():
            gen_tokens[name] = generate(model, gprompts, gcfg, progress=False).tokens
        return run

    t_fwd = C.interleaved({k: with_hooks(k, fwd) for k in vs}, repeat=args.repeat, warmup=1,
                          device=args.device)
    t_gen = C.interleaved({k: with_hooks(k, gen(k)) for k in vs}, repeat=args.repeat, warmup=1,
                          device=args.device)
    n_new = sum(len(t) for t in gen_tokens["none"])
    res = {
        "benchmark": "hooks", "model": args.model,
        "forward": {"batch": list(batch.tokens.shape), "times": t_fwd,
                    "overhead": {k: t_fwd[k]["min_s"] / t_fwd["none"]["min_s"] - 1
                                 for k in vs if k != "none"}},
        "generation": {"n_prompts": args.n_gen, "max_new_tokens": args.max_new_tokens,
                       "new_tokens": n_new, "times": t_gen,
                       "ms_per_token_none": 1e3 * t_gen["none"]["min_s"] / max(1, n_new),
                       "overhead": {k: t_gen[k]["min_s"] / t_gen["none"]["min_s"] - 1
                                    for k in vs if k != "none"},
                       "tokens_identical": all(gen_tokens[k] == gen_tokens["none"] for k in vs)},
        "hooks": {k: f"resid_post x {model.cfg.n_layers} layers" for k in vs if k != "none"},
        "timing": "min over repeats, variants interleaved",
        "goal": {"overhead_max": 0.10},
        "env": C.env_info(args.device),
    }
    worst = max(list(res["forward"]["overhead"].values()) + list(res["generation"]["overhead"].values()))
    res["worst_overhead"] = worst
    res["goal_met"] = worst <= 0.10
    return C.emit(C.rounded(res), args.out)


if __name__ == "__main__":
    main()
