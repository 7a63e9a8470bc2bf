#!/usr/bin/env python3
"""The project against its peers on the same weights, the same prompts and the same batches.

Three tasks, each timed for the project and for the peer in one run (variants interleaved,
min over repeats), each with a correctness check in the same run:

* ``collect``: resid_post at every layer, last token, of ``--n`` SEV prompts. Peers: nnsight
  (``model.layers[l].output[:, -1].save()`` in one trace per batch) and HF
  ``output_hidden_states=True``. The check: max |project − peer| (HF's last hidden state is
  after the final norm, so its last layer is not compared).
* ``patching``: a whole-layer sweep of mlp_out (every position), clean source into corrupted target, metric
  = logit difference of two tokens at the last position. nnsight by hand, as its tutorial
  writes it: one clean trace with every layer's output saved, one unpatched target trace, then
  one patched trace per layer. The project: ``patching.patch_layers`` (source and target run
  once; each patched forward resumes at the patched layer). The check: max |Δ effect|.
* ``steering``: greedy generation of ``--max-new-tokens`` tokens with one vector added to
  resid_post of a band of layers at every position. Peer: steering-vectors
  (``SteeringVector.apply``) around HF ``generate``. The project: ``steer`` around
  ``generate``. The check: the generated tokens are identical.

The peers run on a plain HF model with the bridge's weights (no bridge, no hooks): what a user
of those libraries would load. ``pip install -e .[bench]`` installs them (steering-vectors
``--no-deps``: it declares transformers<5); the tests do not need them.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

try:
    import nnsight
except ImportError:  # the peers are a `bench` extra, not a test dependency
    nnsight = None

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def plain_hf(model):
    """A plain HF model (no bridge wrappers) with the bridge's weights, same attention kernel."""
    from transformers import AutoModelForCausalLM

    src = model.original_model
    cfg = src.config
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation=getattr(cfg, "_attn_implementation", None))
    state = {k.replace("._original_component", ""): v for k, v in src.state_dict().items()}
    own = hf.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise RuntimeError(f"plain_hf: weights missing for {missing[:3]}")
    hf.load_state_dict({k: state[k] for k in own}, strict=True)
    return hf.eval().to(src.device)


def same_length_pairs(model, n: int):
    """``n`` (clean, corrupted) prompt pairs with equal token lengths: the same scenario and event
    instructed with happiness vs anger."""
    from emocircuits.prompts import encode

    prompts = C.sev_prompts(model, 18 * (4 * n + 4), emotions=["happiness", "anger"])
    by = {}
    for p in prompts:
        by.setdefault(p.group, {})[p.emotion] = p.text
    pairs = []
    for d in by.values():
        if len(d) == 2 and len(encode(model, d["happiness"])) == len(encode(model, d["anger"])):
            pairs.append((d["happiness"], d["anger"]))
        if len(pairs) == n:
            break
    if len(pairs) < n:
        raise RuntimeError(f"only {len(pairs)} same-length pairs found")
    return [a for a, _ in pairs], [b for _, b in pairs]


def bench_collect(model, hf, lm, args) -> dict:
    from emocircuits.activations import collect
    from emocircuits.prompts import tokenize

    prompts = [p.text for p in C.sev_prompts(model, args.n)]
    L = model.cfg.n_layers
    batches = [tokenize(model, prompts[i:i + args.batch_size]) for i in range(0, len(prompts), args.batch_size)]
    out = {}

    def project():
        out["project"] = collect(model, prompts, "resid_post", "last", batch_size=args.batch_size,
                                 progress=False)["resid_post"]

    @torch.no_grad()
    def hf_hidden():
        rows = []
        for b in batches:
            hs = hf(b.tokens, attention_mask=b.attention_mask, output_hidden_states=True,
                    logits_to_keep=1, use_cache=False).hidden_states
            rows.append(torch.stack([h[:, -1] for h in hs[1:]], 1))
        out["hf"] = torch.cat(rows)

    def nnsight_():
        rows = []
        with torch.no_grad():
            for b in batches:
                with lm.trace(b.tokens, attention_mask=b.attention_mask, use_cache=False):
                    saved = nnsight.save([])
                    for layer in range(L):
                        saved.append(lm.model.layers[layer].output[:, -1])
                rows.append(torch.stack(list(saved), 1))
        out["nnsight"] = torch.cat(rows)

    t = C.interleaved({"project": project, "nnsight": nnsight_, "hf": hf_hidden}, repeat=args.repeat,
                      warmup=1, device=args.device)
    p = out["project"]
    return {"n": len(prompts), "batch_size": args.batch_size, "times": t,
            "ratio_vs_nnsight": C.ratio(t["project"]["min_s"], t["nnsight"]["min_s"]),
            "ratio_vs_hf": C.ratio(t["project"]["min_s"], t["hf"]["min_s"]),
            "max_abs_diff_nnsight": float((p - out["nnsight"]).abs().max()),
            "max_abs_diff_hf_layers_0_to_L-2": float((p[:, :-1] - out["hf"][:, :-1]).abs().max())}


def bench_patching(model, lm, args) -> dict:
    from emocircuits import patching as P
    from emocircuits.prompts import tokenize

    clean, corrupt = same_length_pairs(model, args.n_patch)
    tok = model.tokenizer
    a = tok.encode(" happy", add_special_tokens=False)[0]
    b = tok.encode(" angry", add_special_tokens=False)[0]
    metric = P.logit_diff_metric(a, b)
    L = model.cfg.n_layers
    cb, tb = tokenize(model, clean), tokenize(model, corrupt)
    out = {}

    def project():
        out["project"] = P.patch_layers(model, corrupt, "mlp_out", metric, source=clean,
                                        batch_size=args.n_patch, progress=False).effect[:, 0]

    def nnsight_():
        with torch.no_grad():
            with lm.trace(cb.tokens, attention_mask=cb.attention_mask, use_cache=False):
                src = nnsight.save([])
                for layer in range(L):
                    src.append(lm.model.layers[layer].mlp.output)
            with lm.trace(tb.tokens, attention_mask=tb.attention_mask, use_cache=False):
                logits = lm.lm_head.output
                base = (logits[:, -1, a] - logits[:, -1, b]).save()
            eff = []
            for layer in range(L):
                with lm.trace(tb.tokens, attention_mask=tb.attention_mask, use_cache=False):
                    lm.model.layers[layer].mlp.output = src[layer]
                    logits = lm.lm_head.output
                    m = (logits[:, -1, a] - logits[:, -1, b]).save()
                eff.append(float((m - base).double().mean()))
        out["nnsight"] = torch.tensor(eff)

    t = C.interleaved({"project": project, "nnsight": nnsight_}, repeat=args.repeat, warmup=1,
                      device=args.device)
    return {"n_pairs": len(clean), "layers": L, "site": "mlp_out (the MLP's output, before it is added)",
            "tokens": list(tb.tokens.shape), "times": t,
            "ratio_vs_nnsight": C.ratio(t["project"]["min_s"], t["nnsight"]["min_s"]),
            "max_abs_diff_effect": float((out["project"].double() - out["nnsight"].double()).abs().max()),
            "effect_range": [float(out["nnsight"].min()), float(out["nnsight"].max())]}


def bench_steering(model, hf, args) -> dict:
    from steering_vectors import SteeringVector

    from emocircuits.generation import GenerationConfig, generate
    from emocircuits.prompts import tokenize
    from emocircuits.steering import steer

    prompts = [p.text for p in C.sev_prompts(model, args.n_gen)]
    L = model.cfg.n_layers
    band = list(range(L // 3, 2 * L // 3))
    g = torch.Generator().manual_seed(0)
    vecs = {layer: torch.randn(model.cfg.d_model, generator=g) * 0.5 for layer in band}
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                           batch_size=args.n_gen)
    sv = SteeringVector(layer_activations=vecs, layer_type="decoder_block")
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = tokenize(model, prompts)
    out = {}

    def project():
        with steer(model, vecs, strength=1.0, scale="none", positions="all"):
            out["project"] = generate(model, prompts, cfg, progress=False).tokens

    def bridge_path():  # every component through the bridge's wrappers (the code before 2026-12-03)
        off = GenerationConfig(**{**cfg.__dict__, "bypass_unhooked": False})
        with steer(model, vecs, strength=1.0, scale="none", positions="all"):
            out["bridge_path"] = generate(model, prompts, off, progress=False).tokens

    def peer():
        with torch.no_grad(), sv.apply(hf, multiplier=1.0, min_token_index=0):
            gen = hf.generate(batch.tokens, attention_mask=batch.attention_mask, do_sample=False,
                              max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                              pad_token_id=pad)
        new = gen[:, batch.tokens.shape[1]:]
        out["peer"] = new

    t = C.interleaved({"project": project, "project_bridge_path": bridge_path, "steering_vectors": peer},
                      repeat=args.repeat, warmup=1, device=args.device)
    calls = {}
    if args.profile:  # Python function calls of one run each (cProfile), the wrappers' overhead
        import cProfile
        import pstats

        for name, fn in (("project", project), ("project_bridge_path", bridge_path), ("steering_vectors", peer)):
            prof = cProfile.Profile()
            prof.runcall(fn)
            calls[name] = pstats.Stats(prof).total_calls
    # the project returns rows in input order; the peer ran the same (one) batch
    same = all(list(map(int, out["peer"][i])) == list(out["project"][i]) for i in range(len(prompts)))
    return {"n_prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "layers": band,
            "times": t, "ratio_vs_steering_vectors": C.ratio(t["project"]["min_s"], t["steering_vectors"]["min_s"]),
            "ratio_bridge_path_vs_steering_vectors": C.ratio(t["project_bridge_path"]["min_s"],
                                                             t["steering_vectors"]["min_s"]),
            "tokens_identical": same and out["bridge_path"] == out["project"],
            **({"python_calls": calls} if calls else {})}


def main(argv=None) -> dict:
    ap = C.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--n", type=int, default=64, help="prompts collected")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-patch", type=int, default=8, help="prompt pairs patched")
    ap.add_argument("--n-gen", type=int, default=8, help="prompts generated from (one batch)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="collect,patching,steering")
    ap.add_argument("--profile", action="store_true", help="steering: count Python calls of one run each (cProfile)")
    args = ap.parse_args(argv)
    C.setup(args)
    if nnsight is None:
        raise SystemExit("bench_peers: pip install -e '.[bench]' (nnsight) and pip install --no-deps steering-vectors")
    from nnsight import LanguageModel

    model = C.load(args.model, args.device)
    hf = plain_hf(model)
    with warnings.catch_warnings():  # 0.8 renames it TransformersModel, which loads by repo id
        warnings.filterwarnings("ignore", message="LanguageModel is deprecated")
        lm = LanguageModel(hf, tokenizer=model.tokenizer)
    only = set(args.only.split(","))
    res = {"benchmark": "peers", "model": args.model, "peers": {
        "nnsight": C._dist_version("nnsight"), "steering-vectors": C._dist_version("steering-vectors")}}
    if "collect" in only:
        res["collect"] = bench_collect(model, hf, lm, args)
    if "patching" in only:
        res["patching"] = bench_patching(model, lm, args)
    if "steering" in only:
        res["steering"] = bench_steering(model, hf, args)
    res["goal"] = {"collect_vs_nnsight": 1.0, "collect_vs_hf": 1.0, "patching_vs_nnsight": 0.5,
                   "steering_vs_steering_vectors": 1.0}
    res["timing"] = "min over repeats, variants interleaved"
    res["env"] = C.env_info(args.device)
    return C.emit(C.rounded(res), args.out)


if __name__ == "__main__":
    main()
