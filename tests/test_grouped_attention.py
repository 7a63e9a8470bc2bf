"""grouped_eager_attention: the eager kernel's numbers without expanding the KV cache, used by
generate's decoding steps; configs restored on every exit."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward as gemma_eager
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager

from emocircuits import sites
from emocircuits.generation import GenerationConfig, generate
from emocircuits.grouped_attention import KERNEL, grouped_decoding, grouped_eager_attention

TEXTS = ["Hello there my friend", "Why?", "Tell me a long story about a dragon and a knight."]


def _module(n_heads, n_kv, d):
    m = torch.nn.Module()
    m.num_key_value_groups, m.head_dim = n_heads // n_kv, d
    return m


@pytest.mark.parametrize("n_heads,n_kv,softcap", [(9, 3, None), (4, 1, None), (4, 1, 20.0), (6, 6, None)])
def test_grouped_kernel_equals_eager_in_float64(n_heads, n_kv, softcap):
    g = torch.Generator().manual_seed(0)
    b, T, d = 3, 11, 8
    mod = _module(n_heads, n_kv, d)
    q = torch.randn(b, n_heads, 1, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, n_kv, T, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, n_kv, T, d, generator=g, dtype=torch.float64)
    mask = torch.zeros(b, 1, 1, T, dtype=torch.float64)
    mask[0, ..., :4] = float("-inf")  # left padding of row 0
    eager = gemma_eager if softcap is not None else llama_eager
    kw = {"softcap": softcap} if softcap is not None else {}
    ref_out, ref_w = eager(mod, q, k, v, mask, scaling=d ** -0.5, **kw)
    out, w = grouped_eager_attention(mod, q, k, v, mask, scaling=d ** -0.5, **kw)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w, ref_w, rtol=1e-12, atol=1e-12)
    assert out.shape == (b, 1, n_heads, d) and out.is_contiguous()


def test_prefill_calls_go_to_the_eager_kernel_unchanged():
    g = torch.Generator().manual_seed(1)
    mod = _module(4, 2, 8)
    q, k, v = (torch.randn(2, h, 5, 8, generator=g) for h in (4, 2, 2))
    mask = torch.zeros(2, 1, 5, 5)
    ref = llama_eager(mod, q, k, v, mask, scaling=0.3)
    got = grouped_eager_attention(mod, q, k, v, mask, scaling=0.3)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_grouped_decoding_is_used_and_configs_are_restored(tiny):
    from transformers.modeling_utils import AttentionInterface

    name = sites.hook_name(tiny, "resid_post", 0)
    v = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(2))
    cfg = GenerationConfig(max_new_tokens=15, min_new_tokens=2, repetition_penalty=1.2, batch_size=3)
    off = GenerationConfig(**{**cfg.__dict__, "grouped_decoding": False})
    with tiny.hooks(fwd_hooks=[(name, lambda x, hook: x + v)]):
        a = generate(tiny, TEXTS, cfg, progress=False).tokens
        b = generate(tiny, TEXTS, off, progress=False).tokens
    assert a == b
    shared = tiny.original_model.config
    before = {id(m): m.config for m in tiny.original_model.modules() if hasattr(m, "num_key_value_groups")}
    calls = []
    kept = AttentionInterface._global_mapping[KERNEL]

    def spy(*args, **kw):
        calls.append(args[1].shape[2])
        return kept(*args, **kw)
    AttentionInterface._global_mapping[KERNEL] = spy
    try:
        generate(tiny, TEXTS, cfg, progress=False)
        with pytest.raises(RuntimeError, match="boom"):
            with grouped_decoding(tiny) as n:
                assert n > 0
                raise RuntimeError("boom")
    finally:
        AttentionInterface._global_mapping[KERNEL] = kept
    assert calls and set(calls) >= {1}  # decoding steps reached the kernel
    assert shared._attn_implementation == "eager" and tiny.original_model.config is shared
    assert {id(m): m.config for m in tiny.original_model.modules() if hasattr(m, "num_key_value_groups")} == before


def test_bf16_tokens_equal_with_and_without_grouped_decoding(tiny):
    cfg = GenerationConfig(max_new_tokens=20, batch_size=3, dtype="bfloat16")
    off = GenerationConfig(**{**cfg.__dict__, "grouped_decoding": False})
    assert generate(tiny, TEXTS, cfg, progress=False).tokens == generate(tiny, TEXTS, off, progress=False).tokens
