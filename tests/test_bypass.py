"""bypass_unhooked: hook-free bridge components run as their HF modules, with the same numbers,
the hooks that are attached still firing, and the module tree restored on every exit."""

from __future__ import annotations

import pytest
import torch

from emocircuits import sites
from emocircuits.bypass import bypass_unhooked
from emocircuits.generation import GenerationConfig, generate
from emocircuits.prompts import tokenize

TEXTS = ["Hello there my friend", "Why?", "Tell me a long story about a dragon and a knight."]


def _tree(model):
    return [(n, id(m)) for n, m in model.original_model.named_modules()]


def _logits(model, hooks=()):
    b = tokenize(model, TEXTS)
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        ref = model(b.tokens, attention_mask=b.attention_mask)
        with bypass_unhooked(model) as n:
            got = model(b.tokens, attention_mask=b.attention_mask)
    return ref, got, n


@pytest.mark.parametrize("site", [None, "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z",
                                  "mlp_post", "attn_o_out", "mlp_down_out", "pattern", "ln2_out", "final_norm"])
def test_bypassed_forward_equals_the_bridge_and_hooks_still_fire(tiny, site):
    g = torch.Generator().manual_seed(0)
    calls = {"n": 0}
    hooks = []
    if site is not None:
        layer = None if site == "final_norm" else 1
        name = sites.hook_name(tiny, site, layer)

        def edit(x, hook):  # an edit, so that a hook that did not fire changes the logits
            calls["n"] += 1
            return x * (1.0 + 0.1 * torch.rand(x.shape[-1], generator=g).to(x.dtype))
        hooks = [(name, edit)]
    _, _, n_free = _logits(tiny)
    before = _tree(tiny)
    ref, got, n = _logits(tiny, hooks)
    assert _tree(tiny) == before  # every wrapper put back
    assert n > 0 and (site is None or n < n_free)  # hooked components (and their parents) stay
    if site is not None:
        assert calls["n"] == 2  # once in the bridge's forward, once in the bypassed one
        g.manual_seed(0)  # the same edit both times: compare with the hook replayed
        calls["n"] = 0
        b = tokenize(tiny, TEXTS)
        with torch.no_grad(), tiny.hooks(fwd_hooks=hooks):
            ref = tiny(b.tokens, attention_mask=b.attention_mask)
        g.manual_seed(0)
        with torch.no_grad(), tiny.hooks(fwd_hooks=hooks), bypass_unhooked(tiny):
            got = tiny(b.tokens, attention_mask=b.attention_mask)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_a_torch_hook_on_a_wrapper_keeps_it(tiny_llama):
    attn = tiny_llama.blocks[0].attn
    seen = []
    h = attn.register_forward_hook(lambda mod, args, out: seen.append(1))
    try:
        _, _, n_hooked = _logits(tiny_llama)
    finally:
        h.remove()
    _, _, n_free = _logits(tiny_llama)
    assert len(seen) == 2 and n_hooked < n_free


def test_tree_restored_on_error_and_late_hooks_refused(tiny):
    before = _tree(tiny)
    with pytest.raises(RuntimeError, match="boom"):
        with bypass_unhooked(tiny):
            raise RuntimeError("boom")
    assert _tree(tiny) == before
    name = sites.hook_name(tiny, "resid_post", 0)
    hp = tiny.hook_dict[name]
    with pytest.raises(RuntimeError, match="Attach hooks before"):
        with bypass_unhooked(tiny):
            hp.add_hook(lambda x, hook: x)  # added inside the block: it would not have fired
    tiny.reset_hooks()
    assert _tree(tiny) == before


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_generation_tokens_equal_with_and_without_bypass(tiny, dtype):
    name = sites.hook_name(tiny, "resid_post", 1)
    v = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(1))
    cfg = GenerationConfig(max_new_tokens=12, min_new_tokens=3, repetition_penalty=1.2,
                           no_repeat_ngram_size=3, batch_size=3, dtype=dtype)
    off = GenerationConfig(**{**cfg.__dict__, "bypass_unhooked": False})
    for hooks in ([], [(name, lambda x, hook: x + v.to(x.dtype))]):
        with tiny.hooks(fwd_hooks=hooks):
            a = generate(tiny, TEXTS, cfg, progress=False).tokens
            b = generate(tiny, TEXTS, off, progress=False).tokens
        assert a == b


def test_not_a_bridge_is_left_alone():
    with bypass_unhooked(torch.nn.Linear(2, 2)) as n:
        assert n == 0



@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_one_pass_plan_equals_the_wrapper_by_wrapper_walk(tiny, seed, monkeypatch):
    """_dirty (one pass over the tree) picks the same wrappers to bypass as walking every
    wrapper's subtree, for hooks at a random set of sites and layers."""
    from emocircuits import bypass as B

    g = torch.Generator().manual_seed(seed)
    names = [sites.hook_name(tiny, s, layer) for s in ("resid_pre", "resid_post", "attn_out", "mlp_out", "z",
                                                        "mlp_post", "pattern", "ln2_out")
             for layer in range(tiny.cfg.n_layers)]
    pick = [names[i] for i in torch.randperm(len(names), generator=g)[:3].tolist()]
    with tiny.hooks(fwd_hooks=[(n, lambda x, hook: x) for n in pick]):
        root, cfg = tiny.original_model, tiny.cfg
        fast = [(id(p), a, id(w)) for p, a, w in B._plan(root, cfg)]
        monkeypatch.setattr(B, "_dirty", lambda root, hooked: None)  # every wrapper walked
        slow = [(id(p), a, id(w)) for p, a, w in B._plan(root, cfg)]
    assert fast == slow and 0 < len(fast)
