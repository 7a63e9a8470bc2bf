"""Decoding attention for grouped-query models without expanding the KV cache.

With grouped-query attention a layer has ``n_kv`` key/value heads, each read by
``g = n_heads / n_kv`` query heads (query head h reads key/value head h // g). HF's eager kernel
expands the cache to every query head at every step (``repeat_kv``: a copy of the whole cache
per layer and step, 3× the cache for SmolLM2, 4× for Gemma 3). When one new token is decoded,
the g query heads of a group can instead be stacked as g rows against their one key head::

    scores[b, k, j, t] = ⟨q[b, k·g + j], K[b, k, t]⟩ · scaling      (one matmul per group)
    out[b, k·g + j]    = Σ_t softmax(scores)[b, k, j, t] · V[b, k, t]

The same products and sums as the eager kernel, without the copy. Prefill calls (more than one
query position) go to the model's own eager kernel unchanged. ``grouped_decoding(model)``
points every HF attention module with g > 1 and the eager kernel at this one for the
duration of the block (through a view of its config; the shared config is not changed), and
puts them back on every exit. Bridge wrappers that re-implement attention (the ones that carry
hooks, see ``bypass``) do not read the setting and keep their own path.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

KERNEL = "emocircuits_grouped_eager"


def _eager_of(module):
    """The eager kernel of the module's own model file (Gemma 3's has a soft-cap argument)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def grouped_eager_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0,
                            scaling: float | None = None, softcap: float | None = None, **kwargs):
    """HF attention-interface kernel: [b, n_heads, 1, d] queries against [b, n_kv, T, d] keys
    and values without ``repeat_kv``; returns ``(out [b, 1, n_heads, d], weights [b, n_heads,
    1, T])`` as the eager kernel does. Other calls go to the model's eager kernel."""
    b, h, tq, d = query.shape
    n_kv = key.shape[1]
    if tq != 1 or n_kv == h:
        kw = dict(kwargs, dropout=dropout, scaling=scaling)
        if softcap is not None:
            kw["softcap"] = softcap
        return _eager_of(module)(module, query, key, value, attention_mask, **kw)
    if scaling is None:
        scaling = module.head_dim ** -0.5
    g = h // n_kv
    q = query.reshape(b, n_kv, g, d)
    w = torch.matmul(q, key.transpose(2, 3)) * scaling  # [b, n_kv, g, T]
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if attention_mask is not None:  # [b, 1, 1, T]: the same row for every head
        w = w + attention_mask
    w = torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    out = torch.matmul(w, value)  # [b, n_kv, g, d]
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), w.reshape(b, h, 1, -1)


class _ConfigView:
    """The module's config with another attention kernel; every other attribute read through."""

    def __init__(self, cfg, kernel: str):
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "_attn_implementation", kernel)

    def __getattr__(self, name: str):
        return getattr(object.__getattribute__(self, "_cfg"), name)


def _register() -> None:
    from transformers.modeling_utils import AttentionInterface

    if KERNEL not in AttentionInterface._global_mapping:
        AttentionInterface.register(KERNEL, grouped_eager_attention)


@contextmanager
def grouped_decoding(model) -> Iterator[int]:
    """While active, the HF attention modules of ``model`` with grouped keys (g > 1) and the
    eager kernel decode with ``grouped_eager_attention``. Yields how many modules use it."""
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    root = getattr(model, "original_model", model)
    mods = [m for m in root.modules()
            if not isinstance(m, GeneralizedComponent)
            and getattr(m, "num_key_value_groups", 1) > 1 and hasattr(m, "layer_idx")
            and getattr(getattr(m, "config", None), "_attn_implementation", None) == "eager"]
    if mods:
        _register()
    done = []
    try:
        for m in mods:
            cfg = m.config
            m.config = _ConfigView(cfg, KERNEL)
            done.append((m, cfg))
        yield len(done)
    finally:
        for m, cfg in reversed(done):
            m.config = cfg


__all__ = ["KERNEL", "grouped_decoding", "grouped_eager_attention"]
