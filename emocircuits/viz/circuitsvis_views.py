"""Interactive circuitsvis views that render offline.

circuitsvis's own ``str(html)`` loads its JavaScript from a CDN (unpkg), which fails with no
network. These views inline the JS bundle that the installed circuitsvis package ships
(``circuitsvis/dist/cdn/iife.js``, which defines the global ``CircuitsVis``) — once per page —
and call ``CircuitsVis.render(id, CircuitsVis.<Component>, props)``. When the bundle is missing
(another circuitsvis build), a small static HTML/CSS heatmap is rendered instead.

* ``attention_view(model, prompt, heads=[(layer, head), ...])``: attention patterns of the
  given heads on one prompt (hooks only those layers' attention pattern, stops after the last).
* ``neuron_view(model, prompt, neurons=[(layer, idx), ...])``: the given MLP neurons'
  activations g (site ``mlp_post``) over the prompt's tokens as coloured text.
* ``standalone_html(views)``: one self-contained page (bundle included once).

A ``View`` holds an HTML fragment that needs the bundle (``needs_bundle``) or is static.
"""

from __future__ import annotations

import html as _html
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .. import sites as S
from ..activations import forward_until
from ..prompts import Prompt, tokenize
from ..results import atomic_write_text


@dataclass(frozen=True)
class View:
    """An HTML fragment; ``needs_bundle``: it calls ``CircuitsVis`` (include ``bundle_script()``)."""

    title: str
    html: str
    needs_bundle: bool

    def _repr_html_(self) -> str:  # Jupyter
        return standalone_html([self], title=self.title, full_page=False)


def bundle_path() -> Path | None:
    """The circuitsvis IIFE bundle shipped in the installed package, or None."""
    try:
        import circuitsvis
    except ImportError:
        return None
    p = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return p if p.is_file() else None


@lru_cache(maxsize=2)
def _bundle_text(path: str, mtime: float) -> str:  # noqa: ARG001 - mtime keys the cache
    js = Path(path).read_text(encoding="utf-8")
    # a literal "</script" inside inline JS would close the tag early
    return js.replace("</script", "<\\/script")


def bundle_script() -> str:
    """``<script>`` with the inlined circuitsvis bundle ('' when the package has none)."""
    p = bundle_path()
    if p is None:
        return ""
    return f"<script>\n{_bundle_text(str(p), p.stat().st_mtime)}\n</script>"


def _str_tokens(model, ids: Sequence[int]) -> list[str]:
    tok = model.tokenizer
    return [tok.decode([int(i)]) for i in ids]


def _prompt_text(prompt: str | Prompt) -> str:
    return prompt.text if isinstance(prompt, Prompt) else prompt


def _check_pairs(model, pairs: Sequence[tuple[int, int]], what: str, width: int) -> list[tuple[int, int]]:
    if len(pairs) == 0:
        raise ValueError(f"{what}_view: no {what}s given")
    out = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"{what}_view: each {what} must be (layer, index), got {pair!r}")
        layer = S.check_layer(model, int(pair[0]))
        idx = int(pair[1])
        if not 0 <= idx < width:
            raise IndexError(f"{what}_view: {what} index {idx} at layer {layer} out of range "
                             f"0..{width - 1}")
        out.append((layer, idx))
    return out


def _pattern_hook(model, layer: int) -> str:
    """The attention-pattern hook [batch, head, q, k] (site ``pattern``)."""
    return S.hook_name(model, "pattern", layer)


def _run_until(model, batch, last_layer: int, fwd_hooks) -> None:
    """One forward with ``fwd_hooks`` active that stops after ``last_layer`` (no unembedding)."""
    forward_until(model, batch.tokens, batch.attention_mask, last_layer + 1, fwd_hooks)


@torch.no_grad()
def attention_patterns(model, prompt: str | Prompt, heads: Sequence[tuple[int, int]]
                       ) -> tuple[list[str], np.ndarray]:
    """(tokens, patterns ``[k, q, key]``) of the given (layer, head)s on one prompt."""
    heads = _check_pairs(model, heads, "head", model.cfg.n_heads)
    batch = tokenize(model, [_prompt_text(prompt)])
    layers = sorted({layer for layer, _ in heads})
    store: dict[int, torch.Tensor] = {}

    def make(layer: int):
        def hook(x, hook):  # noqa: ARG001
            store[layer] = x[0].detach().float().cpu()
            return x
        return hook

    fwd = [(_pattern_hook(model, layer), make(layer)) for layer in layers]
    _run_until(model, batch, max(layers), fwd)
    pats = np.stack([store[layer][h].numpy() for layer, h in heads])
    return _str_tokens(model, batch.tokens[0].tolist()), pats


@torch.no_grad()
def neuron_activations(model, prompt: str | Prompt, neurons: Sequence[tuple[int, int]]
                       ) -> tuple[list[str], np.ndarray]:
    """(tokens, activations ``[pos, k]``) of MLP neurons g_n (site ``mlp_post``) on one prompt."""
    neurons = _check_pairs(model, neurons, "neuron", model.cfg.d_mlp)
    batch = tokenize(model, [_prompt_text(prompt)])
    layers = sorted({layer for layer, _ in neurons})
    store: dict[int, torch.Tensor] = {}

    def make(layer: int):
        idx = torch.tensor([n for lay, n in neurons if lay == layer])

        def hook(x, hook):  # noqa: ARG001
            store[layer] = x[0][:, idx.to(x.device)].detach().float().cpu()
            return x
        return hook

    fwd = [(S.hook_name(model, "mlp_post", layer), make(layer)) for layer in layers]
    _run_until(model, batch, max(layers), fwd)
    cols, seen = [], {layer: 0 for layer in layers}
    for layer, _ in neurons:
        cols.append(store[layer][:, seen[layer]])
        seen[layer] += 1
    return _str_tokens(model, batch.tokens[0].tolist()), torch.stack(cols, 1).numpy()


# ----------------------------------------------------------------------------- rendering


def _cv_fragment(component: str, props: dict) -> str:
    div = "cv-" + uuid.uuid4().hex[:12]
    payload = json.dumps(props).replace("</", "<\\/")
    return (f'<div id="{div}" class="cv-view" style="margin: 10px 0;"></div>\n'
            f'<script>CircuitsVis.render("{div}", CircuitsVis.{component}, {payload});</script>')


def _rgba(v: float, vmax: float) -> str:
    a = 0.0 if vmax <= 0 else min(abs(v) / vmax, 1.0)
    return f"rgba(214,39,40,{a:.3f})" if v >= 0 else f"rgba(31,119,180,{a:.3f})"


def _static_attention(tokens: list[str], pats: np.ndarray, names: list[str]) -> str:
    parts = []
    for name, p in zip(names, pats, strict=True):
        rows = []
        for q, tq in enumerate(tokens):
            cells = "".join(
                f'<td title="{_html.escape(tq)} → {_html.escape(tk)}: {p[q, k]:.3f}" '
                f'style="background:{_rgba(p[q, k], 1.0)}"></td>' if k <= q else "<td></td>"
                for k, tk in enumerate(tokens))
            rows.append(f"<tr><th>{_html.escape(tq)}</th>{cells}</tr>")
        parts.append(f'<div class="static-attn"><b>{_html.escape(name)}</b>'
                     f'<table class="heat">{"".join(rows)}</table></div>')
    return "\n".join(parts)


def _static_tokens(tokens: list[str], acts: np.ndarray, names: list[str]) -> str:
    vmax = float(np.abs(acts).max()) if acts.size else 1.0
    parts = []
    for j, name in enumerate(names):
        spans = "".join(
            f'<span title="{acts[i, j]:.3f}" style="background:{_rgba(acts[i, j], vmax)}">'
            f"{_html.escape(t)}</span>" for i, t in enumerate(tokens))
        parts.append(f'<div class="static-tokens"><b>{_html.escape(name)}</b>: {spans}</div>')
    return "\n".join(parts)


def attention_view(model, prompt: str | Prompt, heads: Sequence[tuple[int, int]], *,
                   title: str | None = None) -> View:
    """circuitsvis ``AttentionHeads`` for the given (layer, head)s on ``prompt`` (offline)."""
    tokens, pats = attention_patterns(model, prompt, heads)
    names = [f"L{layer}H{h}" for layer, h in heads]
    title = title or "attention: " + ", ".join(names)
    if bundle_path() is None:
        return View(title, _static_attention(tokens, pats, names), False)
    props = {"attention": pats.round(5).tolist(), "tokens": tokens,
             "attentionHeadNames": names, "maskUpperTri": True}
    return View(title, _cv_fragment("AttentionHeads", props), True)


def neuron_view(model, prompt: str | Prompt, neurons: Sequence[tuple[int, int]], *,
                title: str | None = None) -> View:
    """circuitsvis ``TextNeuronActivations`` for the given (layer, neuron)s (offline)."""
    tokens, acts = neuron_activations(model, prompt, neurons)
    names = [f"L{layer}N{n}" for layer, n in neurons]
    title = title or "neurons: " + ", ".join(names)
    if bundle_path() is None:
        return View(title, _static_tokens(tokens, acts, names), False)
    props = {"tokens": tokens, "activations": acts[:, None, :].round(5).tolist(),
             "firstDimensionName": "Group", "secondDimensionName": "Neuron",
             "firstDimensionLabels": ["selected"], "secondDimensionLabels": names}
    return View(title, _cv_fragment("TextNeuronActivations", props), True)


_STATIC_CSS = """
table.heat { border-collapse: collapse; font-size: 10px; margin: 4px 0 12px; }
table.heat td { width: 12px; height: 12px; border: 1px solid #eee; padding: 0; }
table.heat th { text-align: right; font-weight: normal; padding-right: 4px; white-space: pre; }
.static-tokens span { white-space: pre; padding: 1px 0; }
"""


def standalone_html(views: Sequence[View], *, title: str = "emocircuits views",
                    full_page: bool = True) -> str:
    """One HTML document (or fragment) with every view; the JS bundle inlined once."""
    body = "\n".join(f"<h3>{_html.escape(v.title)}</h3>\n{v.html}" for v in views)
    head = bundle_script() if any(v.needs_bundle for v in views) else ""
    inner = f"<style>{_STATIC_CSS}</style>\n{head}\n{body}"
    if not full_page:
        return inner
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_html.escape(title)}</title></head>\n<body>\n<h1>{_html.escape(title)}</h1>\n"
            f"{inner}\n</body></html>\n")


def write_html(views: Sequence[View], out: str | os.PathLike, *, title: str = "emocircuits views"
               ) -> Path:
    """Write ``standalone_html(views)`` to ``out`` atomically; returns the path."""
    return atomic_write_text(out, standalone_html(views, title=title))
