"""Where a decoding step's time goes, and two grouped-query KV caches that avoid ``repeat_kv``.

With grouped-query attention a layer has ``n_kv`` key/value heads, each shared by
``g = n_heads / n_kv`` query heads. The bridge's attention (and HF's eager kernel) expands the
whole cache at every step, for every layer::

    K_exp[:, h] = K[:, h // g]        # repeat_kv: a copy of the cache

This script times ``emocircuits.generate`` (``--n`` SEV prompts in one batch,
``--max-new-tokens``, ``--dtype``) by kind of module (self wall time from forward hooks:
``Linear``, attention, norms, ``lm_head``, the loop outside the model), and checks in the same
run how much torch.profiler inflates ``aten::cat`` (it does, several-fold, so its operator
shares are not reported). It then times these variants, with the same prompts and settings:

* ``ordinary``: HF's ``DynamicCache`` (what ``generate`` uses);
* ``expanded_buffer``: keys and values expanded once when they are written, into a buffer
  preallocated for the whole generation; attention reads a slice of the buffer;
* ``expanded_cat``: keys and values expanded once when they are written, appended with ``cat``.

* ``fresh_logits``: ``generate`` with a new float32 ``[b, vocab]`` logits tensor at every step
  (``generation._step_logits`` replaced; what the code did before 2026-12-03), against the one
  kept buffer it uses now.
* ``bridge_path``: ``generate`` with ``bypass_unhooked=False``: every component runs through the
  bridge's wrappers (the code before 2026-12-03 evening), against running the hook-free ones as
  their HF modules (``emocircuits.bypass``).
* ``repeat_kv``: ``generate`` with ``grouped_decoding=False``: HF's eager kernel expands the KV
  cache to every query head at every step, against the grouped decoding kernel
  (``emocircuits.grouped_attention``).

For the two expanded caches every attention module's ``num_key_value_groups`` is set to 1, so
that nothing is expanded again; the module attributes and the cache class are restored on exit.
The tokens of every variant are compared with the ordinary cache's (they must be identical).
Neither variant is used by the project: on the CPU neither is faster (docs/scaling.md).

Each timed run is a fresh process by default: the variants allocate differently, and the
allocator's state left by one variant changes the next one's page faults (in one process the
ratios moved by ±20 % with the order). ``--in-process`` runs them interleaved in one process.

Usage: ``python benchmarks/bench_decode.py [--model M] [--n 64] [--max-new-tokens 40] [--repeat 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def expand(x: torch.Tensor, g: int) -> torch.Tensor:
    """[b, n_kv, t, d] -> [b, n_kv·g, t, d], head h = input head h // g (HF's ``repeat_kv``)."""
    if g == 1:
        return x
    b, n_kv, t, d = x.shape
    return x[:, :, None].expand(b, n_kv, g, t, d).reshape(b, n_kv * g, t, d)


class _Buffer:
    """One layer's keys and values in a buffer of ``capacity`` positions (doubled when full)."""

    def __init__(self, capacity: int):
        self.capacity, self.k, self.v, self.length = max(1, capacity), None, None, 0

    def write(self, k, v):
        end = self.length + k.shape[-2]
        if self.k is None or end > self.k.shape[-2]:
            cap = max(self.capacity, end, 2 * (0 if self.k is None else self.k.shape[-2]))
            nk, nv = k.new_empty(*k.shape[:2], cap, k.shape[-1]), v.new_empty(*v.shape[:2], cap, v.shape[-1])
            if self.k is not None:
                nk[:, :, :self.length], nv[:, :, :self.length] = self.k[:, :, :self.length], self.v[:, :, :self.length]
            self.k, self.v = nk, nv
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def _layer_classes(g: int, capacity: int | None):
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    class Full(DynamicLayer):
        def __init__(self):
            super().__init__()
            self.buf = None if capacity is None else _Buffer(capacity)

        def update(self, k, v, *a, **kw):
            k, v = expand(k, g), expand(v, g)
            if self.buf is None:
                return super().update(k, v, *a, **kw)
            if not self.is_initialized:
                self.lazy_initialization(k, v)
            self.keys, self.values = self.buf.write(k, v)
            return self.keys, self.values

    class Sliding(DynamicSlidingWindowLayer):
        def __init__(self, window):
            super().__init__(sliding_window=window)
            self.buf = None if capacity is None else _Buffer(min(capacity, window - 1))

        def update(self, k, v, *a, **kw):
            k, v = expand(k, g), expand(v, g)
            if self.buf is not None and self.cumulative_length + k.shape[-2] <= self.sliding_window - 1:
                if not self.is_initialized:
                    self.lazy_initialization(k, v)
                self.cumulative_length += k.shape[-2]
                self.keys, self.values = self.buf.write(k, v)
                return self.keys, self.values
            self.buf = None  # the window is full: HF's own update, on the expanded states
            return super().update(k, v, *a, **kw)

    return DynamicLayer, DynamicSlidingWindowLayer, Full, Sliding


def grouped_attention(model) -> list:
    """The HF attention modules inside the bridge that expand K/V (``num_key_value_groups`` > 1)."""
    out, seen = [], set()
    for mod in model.modules():
        hf = getattr(mod, "original_component", None)
        if getattr(hf, "num_key_value_groups", 1) > 1 and id(hf) not in seen:
            seen.add(id(hf))
            out.append(hf)
    return out


@contextmanager
def expanded_cache(model, capacity: int | None):
    """While active, every new ``DynamicCache`` stores keys/values expanded on insert (in a
    buffer of ``capacity`` positions, or appended with ``cat`` when None) and no attention
    module expands them again. Restores the modules and the cache class on every exit."""
    from transformers.cache_utils import DynamicCache

    mods = grouped_attention(model)
    gs = {int(m.num_key_value_groups) for m in mods}
    if len(gs) != 1:
        raise ValueError(f"bench_decode: needs one grouped-query group size, found {sorted(gs)}")
    dyn, sliding, Full, Sliding = _layer_classes(gs.pop(), capacity)
    init = DynamicCache.__init__

    def patched(self, *a, **kw):
        init(self, *a, **kw)
        self.layers = [Sliding(layer.sliding_window) if type(layer) is sliding else
                       Full() if type(layer) is dyn else layer for layer in self.layers]

    saved = [m.num_key_value_groups for m in mods]
    try:
        DynamicCache.__init__ = patched
        for m in mods:
            m.num_key_value_groups = 1
        yield
    finally:
        DynamicCache.__init__ = init
        for m, s in zip(mods, saved, strict=True):
            m.num_key_value_groups = s


@contextmanager
def fresh_logits():
    """While active, ``generate`` casts each step's logits into a new float32 tensor."""
    from emocircuits import generation

    kept = generation._step_logits
    try:
        generation._step_logits = lambda logits, work: (logits[:, -1, :].float().clone(), None)
        yield
    finally:
        generation._step_logits = kept


@contextmanager
def module_timer(model):
    """Self wall time per kind of module while the block runs: forward pre/post hooks on the
    bridge and on every HF module of its model (not on its wrappers and hook points, so that
    ``generate`` still bypasses them) record entry and exit; a module's self time is
    its time minus its timed children's. Kinds: the module's class, with ``lm_head`` apart from
    the blocks' ``Linear``; a wrapper kept for its hooks counts in its HF parent's time;
    ``outside the model`` is the rest of the block's time (logits processing, n-gram bans, the loop). On a CPU every op is synchronous, so wall time is exact.
    Yields the dict of seconds, filled on exit; the hooks are removed on every exit."""
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    root = getattr(model, "original_model", None)
    # HF modules only: a torch hook on a bridge wrapper or hook point would keep that wrapper in
    # place (emocircuits.bypass), and time a path that generate does not take
    mods = [("model", model)] + ([(n or "hf", m) for n, m in root.named_modules()
                                  if not isinstance(m, (GeneralizedComponent, HookPoint))]
                                 if root is not None else [])
    stack: list[list[float]] = []  # [start, children's time]
    out: dict[str, float] = {}

    def kind(name: str, m) -> str:
        if name == "model":
            return "bridge (its own code)"
        if "lm_head" in name.split("."):  # the unembedding (under the bridge's wrapper)
            return "lm_head"
        return type(m).__name__

    def pre(_m, _a, *_r):
        stack.append([time.perf_counter(), 0.0])

    def post(k):
        def f(_m, _a, _o, *_r):
            start, child = stack.pop()
            dt = time.perf_counter() - start
            out[k] = out.get(k, 0.0) + dt - child
            if stack:
                stack[-1][1] += dt
        return f

    handles = []
    t = time.perf_counter()
    try:
        for name, m in mods:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post(kind(name, m)), with_kwargs=True))
        t = time.perf_counter()  # from the first timed call, not from hooking
        yield out
    finally:
        total = time.perf_counter() - t
        for h in handles:
            h.remove()
        out["outside the model"] = total - sum(out.values())
        out["total"] = total


def time_shares(model, prompts, gcfg, top: int = 10) -> dict:
    """Shares of one ``generate``'s wall time by kind of module (:func:`module_timer`), with the
    time of the same ``generate`` without the timing hooks (both after a warm-up). torch.profiler is not used: on this
    CPU build it inflates ``aten::cat`` several-fold (:func:`profiler_cat_inflation`)."""
    from emocircuits.generation import generate

    generate(model, prompts, gcfg, progress=False)  # warm-up
    t = time.perf_counter()
    generate(model, prompts, gcfg, progress=False)
    plain = time.perf_counter() - t
    with module_timer(model) as sec:
        generate(model, prompts, gcfg, progress=False)
    total = sec.pop("total")
    shares = dict(sorted(((k, v / total) for k, v in sec.items()), key=lambda kv: -kv[1])[:top])
    return {"shares": shares, "timed_s": total, "untimed_s": plain}


def profiler_cat_inflation(steps: int = 30) -> dict:
    """A decoding-like loop (60 KV caches of [64, 3, t, 64] bf16 appended with ``cat``, one
    [64, 576] x [576, 576] matmul each) timed plainly and under torch.profiler, and the
    profiler's own total for ``aten::cat``: why op shares from the profiler mislead here."""
    from torch.profiler import ProfilerActivity, profile

    caches = [torch.randn(64, 3, 65, 64).bfloat16() for _ in range(60)]
    new, x, w = torch.randn(64, 3, 1, 64).bfloat16(), torch.randn(64, 576).bfloat16(), torch.randn(576, 576).bfloat16()

    def loop(ks):
        ks = list(ks)
        for _ in range(steps):
            for i in range(len(ks)):
                ks[i] = torch.cat([ks[i], new], dim=-2)
                x @ w
    loop(caches)
    t = time.perf_counter()
    loop(caches)
    plain = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        loop(caches)
        profiled = time.perf_counter() - t
    cat = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key == "aten::cat") / 1e6
    mm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key == "aten::mm") / 1e6
    return {"loop_s": plain, "loop_profiled_s": profiled, "profiler_cat_s": cat, "profiler_mm_s": mm}


def main(argv=None) -> dict:
    ap = C.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--n", type=int, default=64, help="prompts, one batch")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--split", default="builtin:test")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--hooks", default="none", choices=("none", "units"),
                    help="units: scale 2 heads of z and 16 neurons of mlp_post at every layer (a circuit's hooks)")
    ap.add_argument("--in-process", action="store_true",
                    help="all variants in this process (fast, but the allocator's state carries over)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    C.setup(args)
    names = [v for v in args.variants.split(",") if v]
    bad = sorted(set(names) - set(VARIANTS))
    if bad or "ordinary" not in names:
        raise SystemExit(f"bench_decode: --variants must include 'ordinary' and name only {VARIANTS}; got {bad}")
    if args.child is not None:
        return C.emit(_child(args))
    if args.in_process:
        model, prompts, gcfg, longest = _setup(args)
        with _hooks(model, args.hooks):
            shares = time_shares(model, prompts, gcfg)
        tokens: dict[str, list] = {}

        def go(name):
            def f():
                tokens[name] = _generate(model, prompts, gcfg, name, longest + args.max_new_tokens, args.hooks)
            return f
        times = C.interleaved({k: go(k) for k in names}, repeat=args.repeat, warmup=1, device=args.device)
        how = "min over repeats, variants interleaved in one process"
    else:  # each (repeat, variant) in a fresh interpreter, round-robin
        common = ["--model", args.model, "--n", str(args.n), "--max-new-tokens", str(args.max_new_tokens),
                  "--dtype", args.dtype, "--split", args.split, "--device", args.device, "--hooks", args.hooks]
        if args.threads:
            common += ["--threads", str(args.threads)]
        shares = C.run_child(Path(__file__), [*common, "--child", "profile"])["time_shares"]
        runs: dict[str, list[float]] = {k: [] for k in names}
        tokens = {}
        for _ in range(max(1, args.repeat)):
            for k in names:
                r = C.run_child(Path(__file__), [*common, "--child", k])
                runs[k].append(r["seconds"])
                tokens[k] = r["tokens"]
        times = {k: {"min_s": min(v), "median_s": statistics.median(v), "repeat": len(v)} for k, v in runs.items()}
        how = "min over repeats; each run in a fresh process (after one warm-up generate), variants round-robin"
    base = times["ordinary"]["min_s"]
    res = {
        "benchmark": "decode", "model": args.model, "n_prompts": args.n,
        "max_new_tokens": args.max_new_tokens, "dtype": args.dtype, "hooks": args.hooks,
        "new_tokens": sum(len(t) for t in tokens["ordinary"]),
        "time_shares_ordinary": shares, "profiler_check": profiler_cat_inflation(), "times": times,
        "ratio_vs_ordinary": {k: C.ratio(times[k]["min_s"], base) for k in names if k != "ordinary"},
        "tokens_identical": {k: tokens[k] == tokens["ordinary"] for k in names if k != "ordinary"},
        "timing": how,
        "env": C.env_info(args.device),
    }
    return C.emit(C.rounded(res), args.out)


VARIANTS = ("ordinary", "expanded_buffer", "expanded_cat", "fresh_logits", "bridge_path", "repeat_kv")


def _setup(args):
    from emocircuits.data import load_sev
    from emocircuits.generation import GenerationConfig
    from emocircuits.prompts import neutral_prompts

    model = C.load(args.model, args.device)
    prompts = neutral_prompts(model, list(load_sev(args.split))[: -(-args.n // 3)])[: args.n]
    gcfg = GenerationConfig.paper_steering()
    gcfg = GenerationConfig(**{**gcfg.__dict__, "max_new_tokens": args.max_new_tokens,
                               "min_new_tokens": min(gcfg.min_new_tokens, args.max_new_tokens),
                               "batch_size": args.n, "dtype": args.dtype})
    longest = max(len(model.tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in prompts)
    return model, prompts, gcfg, longest


@contextmanager
def _hooks(model, kind: str):
    """``units``: what a circuit's modulation hooks (heads of z, neurons of mlp_post), at every layer."""
    if kind == "none":
        yield
        return
    from emocircuits.interventions import Intervention, intervene

    ivs = [Intervention(site, L, op="scale", units=units, strength=1.5)
           for L in range(model.cfg.n_layers) for site, units in (("z", [0, 1]), ("mlp_post", list(range(16))))]
    with intervene(model, ivs):
        yield


def _generate(model, prompts, gcfg, name: str, capacity: int, hooks: str = "none") -> list[list[int]]:
    with _hooks(model, hooks):
        return _generate_variant(model, prompts, gcfg, name, capacity)


def _generate_variant(model, prompts, gcfg, name: str, capacity: int) -> list[list[int]]:
    from emocircuits.generation import GenerationConfig, generate

    if name == "ordinary":
        return generate(model, prompts, gcfg, progress=False).tokens
    if name in ("bridge_path", "repeat_kv"):
        flag = "bypass_unhooked" if name == "bridge_path" else "grouped_decoding"
        off = GenerationConfig(**{**gcfg.__dict__, flag: False})
        return generate(model, prompts, off, progress=False).tokens
    if name == "fresh_logits":
        with fresh_logits():
            return generate(model, prompts, gcfg, progress=False).tokens
    with expanded_cache(model, capacity if name == "expanded_buffer" else None):
        return generate(model, prompts, gcfg, progress=False).tokens


def _child(args) -> dict:
    """One fresh process: the operator profile, or one variant (a warm-up generate, then one timed)."""
    model, prompts, gcfg, longest = _setup(args)
    if args.child == "profile":
        with _hooks(model, args.hooks):
            return {"time_shares": time_shares(model, prompts, gcfg)}
    _generate(model, prompts, gcfg, args.child, longest + args.max_new_tokens, args.hooks)
    t = time.perf_counter()
    toks = _generate(model, prompts, gcfg, args.child, longest + args.max_new_tokens, args.hooks)
    return {"variant": args.child, "seconds": time.perf_counter() - t, "tokens": toks}


if __name__ == "__main__":
    main()
