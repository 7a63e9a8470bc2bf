"""The one hook map: the method's sites -> TransformerLens hook names, per layer.

=============  ==================================  =========================================
site           hook (layer l)                      meaning
=============  ==================================  =========================================
resid_pre      blocks.l.hook_resid_pre             residual stream entering block l
resid_mid      blocks.l.hook_resid_mid             resid_pre + attn_out (paper's "attn" site)
resid_post     blocks.l.hook_resid_post            resid_mid + mlp_out (paper's "MLP" site)
attn_out       blocks.l.hook_attn_out              what attention adds to the residual
mlp_out        blocks.l.hook_mlp_out               what the MLP adds to the residual
z              blocks.l.attn.hook_z                per-head z [.., head, d_head], input of W_O
head_result    (from z)                            z_h @ W_O[l, h]: one head's write [.., head, d_model]
mlp_post       blocks.l.mlp.hook_post              neuron activations g, the input of W_out
pattern        blocks.l.attn.hook_pattern          attention pattern [.., head, q_pos, k_pos]
ln2_out        blocks.l.ln2.hook_out               normalised MLP input incl. weight (paper's head readout)
mlp_in         blocks.l.ln2.hook_out               alias of ln2_out
final_norm     ln_final.hook_out                   final norm output incl. its weight (not per layer)
=============  ==================================  =========================================

On architectures with post-sublayer norms (Gemma 3) ``attn_out``/``mlp_out`` are the
post-normed writes; the heads' results then sum to ``blocks.l.attn.o.hook_out`` (the o_proj
output before the post-norm) and ``mlp_post @ W_out`` to ``blocks.l.mlp.out.hook_out``.
Weights: ``W_O`` [layer, head, d_head, d_model], ``W_out`` [layer, d_mlp, d_model],
``W_U`` [d_model, vocab] (see ``weights``).

Wherever a site is named, a TransformerLens hook name works too and means that site at that
layer only: ``"blocks.3.hook_resid_post"`` is ``("resid_post", 3)``, ``"blocks.3.attn.hook_z"``
is ``("z", 3)``, ``"blocks.3.mlp.hook_post"`` is ``("mlp_post", 3)``,
``"blocks.3.attn.hook_pattern"`` is ``("pattern", 3)``, ``"blocks.3.attn.hook_result"`` is
``("head_result", 3)``, ``"ln_final.hook_out"`` is ``"final_norm"`` (``parse_site``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_TEMPLATES: dict[str, str] = {
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "resid_post": "blocks.{l}.hook_resid_post",
    "attn_out": "blocks.{l}.hook_attn_out",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "z": "blocks.{l}.attn.hook_z",
    "head_result": "blocks.{l}.attn.hook_z",
    "mlp_post": "blocks.{l}.mlp.hook_post",
    "attn_o_out": "blocks.{l}.attn.o.hook_out",
    "mlp_down_out": "blocks.{l}.mlp.out.hook_out",
    "pattern": "blocks.{l}.attn.hook_pattern",
    "ln2_out": "blocks.{l}.ln2.hook_out",
    "mlp_in": "blocks.{l}.ln2.hook_out",
    "final_norm": "ln_final.hook_out",
}
SITES: tuple[str, ...] = tuple(_TEMPLATES)
PER_LAYER: frozenset[str] = frozenset(s for s in SITES if s != "final_norm")


# TransformerLens hook names (the part after ``blocks.{l}.``) -> site. Where two sites share a
# hook (z/head_result, ln2_out/mlp_in) the hook name means the first; TL's per-head
# ``attn.hook_result`` is this library's ``head_result``.
TL_HOOKS: dict[str, str] = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "attn.hook_z": "z",
    "attn.hook_result": "head_result",
    "mlp.hook_post": "mlp_post",
    "attn.o.hook_out": "attn_o_out",
    "mlp.out.hook_out": "mlp_down_out",
    "attn.hook_pattern": "pattern",
    "ln2.hook_out": "ln2_out",
}
_FINAL_HOOKS = ("ln_final.hook_out",)
_BLOCK_HOOK = re.compile(r"blocks\.(\d+)\.(.+)")


class UnknownSiteError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


def _accepted_forms() -> str:
    return (f"a site name {list(SITES)}, a TransformerLens hook name 'blocks.<layer>.<hook>' with "
            f"<hook> one of {list(TL_HOOKS)} (or {list(_FINAL_HOOKS)}), or a (site, layer) pair")


def parse_site(spec: str | tuple[str, int], layer: int | None = None) -> tuple[str, int | None]:
    """``(site, layer)`` of a site name, a TL hook name or a ``(site, layer)`` pair.

    ``"resid_post"`` -> ``("resid_post", layer)``; ``"blocks.3.hook_resid_post"`` ->
    ``("resid_post", 3)``; ``("resid_post", 3)`` -> itself. A ``layer`` given besides a spec
    that names one must agree with it. Unknown names raise ``UnknownSiteError`` listing the
    accepted forms. Layers are not range-checked here (``check_layer``)."""
    if isinstance(spec, tuple):
        if len(spec) != 2 or not isinstance(spec[0], str):
            raise UnknownSiteError(f"unknown site {spec!r}; accepted: {_accepted_forms()}")
        site, own = parse_site(spec[0])
        lay = spec[1]
        if isinstance(lay, bool) or not isinstance(lay, int):
            raise TypeError(f"site {spec!r}: the layer must be an int, got {type(lay).__name__}")
        if own is not None and own != lay:
            raise ValueError(f"site {spec!r}: hook name {spec[0]!r} is layer {own}, not {lay}")
        spec_layer: int | None = int(lay)
    elif isinstance(spec, str):
        if spec in _TEMPLATES:
            site, spec_layer = spec, None
        elif spec in _FINAL_HOOKS:
            site, spec_layer = "final_norm", None
        else:
            m = _BLOCK_HOOK.fullmatch(spec)
            if m is None or m.group(2) not in TL_HOOKS:
                raise UnknownSiteError(f"unknown site {spec!r}; accepted: {_accepted_forms()}")
            site, spec_layer = TL_HOOKS[m.group(2)], int(m.group(1))
    else:
        raise UnknownSiteError(f"unknown site {spec!r} (a {type(spec).__name__}); accepted: "
                               f"{_accepted_forms()}")
    if layer is not None and spec_layer is not None and int(layer) != spec_layer:
        raise ValueError(f"site {spec!r} is layer {spec_layer}, but layer {layer} was asked for")
    return site, (spec_layer if spec_layer is not None else layer)


def check_site(site: str) -> str:
    """The site name of ``site`` (a site name, or a TL hook name: its site; see ``parse_site``)."""
    return parse_site(site)[0]


def check_layer(model, layer: int) -> int:
    n = model.cfg.n_layers
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    if not -n <= layer < n:
        raise IndexError(f"layer {layer} out of range: the model has {n} layers (0..{n - 1})")
    return layer % n


def hook_name(model, site: str, layer: int | None = None) -> str:
    """The hook name of ``site`` at ``layer`` (``final_norm`` takes no layer). ``site`` may
    be a TL hook name (``layer``, if given, must be its layer) or a ``(site, layer)`` pair."""
    site, layer = parse_site(site, layer)
    if site == "final_norm":
        return _TEMPLATES[site]
    if layer is None:
        raise ValueError(f"site {site!r} is per layer: pass a layer")
    return _TEMPLATES[site].format(l=check_layer(model, layer))


def layers_of(model, layers=None) -> list[int]:
    """``None`` -> all layers; else the checked list."""
    if layers is None:
        return list(range(model.cfg.n_layers))
    return [check_layer(model, int(layer)) for layer in layers]


def site_width(model, site: str) -> tuple[int, ...]:
    """Trailing shape of one position's activation at ``site``."""
    cfg = model.cfg
    site = check_site(site)
    if site == "z":
        return (cfg.n_heads, cfg.d_head)
    if site == "head_result":
        return (cfg.n_heads, cfg.d_model)
    if site == "mlp_post":
        return (cfg.d_mlp,)
    if site == "pattern":
        raise ValueError("site 'pattern' has a sequence-dependent width [head, q_pos, k_pos]")
    return (cfg.d_model,)


@dataclass(frozen=True)
class Weights:
    """Views of the weights the method uses (no copies)."""

    W_O: torch.Tensor  # [layer, head, d_head, d_model]
    W_out: torch.Tensor  # [layer, d_mlp, d_model]
    W_U: torch.Tensor  # [d_model, vocab]


def W_O(model, layer: int) -> torch.Tensor:
    """[head, d_head, d_model] output weights of layer's heads."""
    return model.blocks[check_layer(model, layer)].attn.W_O


def W_out(model, layer: int) -> torch.Tensor:
    """[d_mlp, d_model] MLP output (down-projection) weights."""
    return model.blocks[check_layer(model, layer)].mlp.W_out


def weights(model) -> Weights:
    return Weights(W_O=model.W_O, W_out=model.W_out, W_U=model.W_U)


def head_result_from_z(model, layer: int, z: torch.Tensor) -> torch.Tensor:
    """result[..., h, :] = z[..., h, :] @ W_O[layer, h]  ->  [..., head, d_model]."""
    w = W_O(model, layer).to(z.dtype)
    return torch.einsum("...hd,hdm->...hm", z, w)
