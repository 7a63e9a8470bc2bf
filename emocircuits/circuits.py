"""Emotion circuits (paper stages 05–07): difference vectors, σ, sublayer influence,
allocation, selection, ``EmotionCircuit``, modulation, ablation and faithfulness.

Stage page: docs/stages/circuits.md; the method and its known flaws: docs/method.md.

Stages, per emotion e (sublayer kinds p ∈ ``SUBLAYERS`` = ("mlp", "attn"), index 0 / 1):

1. **Difference vectors** (stage 05) at the intervention points, last prompt token of
   emotion-instructed prompts, grouped by ``Prompt.group`` = (skeleton_id, valence) (the
   authors' code grouped by skeleton only, a known flaw):
   Δμ_e = mean_g (a_{g,e} − mean_e' a_{g,e'}) for a = ``mlp_post`` [layer, d_mlp] and
   a = ``z`` [layer, head, d_head] (``group_centered_means(normalize=False)``).
2. **σ** (stage 06): σ_{p,L} = mean_x sqrt(mean_d h_L(x)_d²), h = resid_post (mlp) /
   resid_mid (attn) on the prompts given (the paper: emotion-instructed). The paper's last
   "mlp" row used the final-norm output (a known flaw of the authors' code):
   ``final_norm_last=True`` reproduces that. Note (a known flaw, kept): σ is
   measured on the residual stream, the dose goes into the sublayer output.
3. **Reference direction** (stage 06): the unit directions {v_attn(L), v_mlp(L) : L ∈ band},
   sign-aligned to the first (attn at the band's first layer), summed, normalised. The band
   is the paper's 21–25 of 28 scaled to the depth (``reference_band``).
4. **Sublayer influence** (stage 06) on neutral prompts, the same for every emotion (a known
   flaw: the paper's inputs were nearly the same for every emotion too):
   I_{p,L}(α) = (mean_x s_{α,p,L}(x) − s̄_base) / (α σ_{p,L}), s = <final_norm(x)[last], v_ref>,
   where the dose α σ_{p,L} v̂_{p,L} (v̂ sign-aligned to v_ref) is added to the sublayer's
   output (``attn_out``/``mlp_out``) at the last token only. The last token is the only one
   changed, so the prompt prefix is run once into a KV cache and every intervention re-runs
   just the last token, from its own layer L on (blocks below L cannot change); equal to the
   full forwards to float rounding (``use_cache=False`` runs them, for reference).
5. **Allocation** (the authors' 06/5 rule): K = budget_per_sublayer × 2 n_layers,
   K_mlp = round(ratio_mlp K), K_attn = K − K_mlp; per kind w = max(mean_α I, 0)/Σ, every
   layer gets the minimum quota, the rest R is shared as R·w: floor, capped at
   ⌊cap_ratio K_kind⌋ (the cap bounds the proportional share, as in the authors' code), the
   leftover by largest fractional remainder; quotas above a layer's candidates are
   truncated and the deficit backfilled to the layers with the largest quotas.
6. **Selection**: per layer the top-k ids by score (descending; promoting units first).
7. **Modulation** (stage 07): g[:, last, n] += λ Δμ_mlp[L, n] for circuit neurons (the last
   position of every forward call: the last prompt token, then each generated token), and
   z[:, :, h, :] += λ Δμ_z[L, h] for circuit heads at every position of every call.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float

from . import sites as S
from .activations import collect
from .deprecation import warn_deprecated
from .directions import EmotionDirections, GroupInfo, group_centered_means
from .interventions import Intervention, intervene, intervention_hooks
from .progress import tqdm
from .prompts import Prompt, texts_of, tokenize
from .results import Result
from .results import summarize as _summarize

SUBLAYERS: tuple[str, str] = ("mlp", "attn")
"""Index order of the sublayer axis p everywhere in this module (matches ``ratio`` and
``min_per_layer``: neurons first, heads second)."""
_WRITE_SITE = {"mlp": "mlp_out", "attn": "attn_out"}
_RESID_SITE = {"mlp": "resid_post", "attn": "resid_mid"}
PAPER_ALPHAS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7)
_PAPER_REF_BAND = (21, 25, 28)  # layers 21..25 (inclusive) of 28
EPS = 1e-12


# ============================================================================ 1. Δμ


@dataclass
class DifferenceVectors(Result):
    """Δμ per emotion at the intervention points: ``mlp`` [emotion, layer, d_mlp] and
    ``z`` [emotion, layer, head, d_head] (unnormalised)."""

    emotions: list[str]
    mlp: Float[torch.Tensor, "emotion layer d_mlp"]
    z: Float[torch.Tensor, "emotion layer head d_head"]
    groups: GroupInfo | None = None

    def of(self, emotion: str) -> tuple[torch.Tensor, torch.Tensor]:
        if emotion not in self.emotions:
            raise KeyError(f"no difference vectors for emotion {emotion!r}; have {self.emotions}")
        i = self.emotions.index(emotion)
        return self.mlp[i], self.z[i]


def delta_mu(acts: Float[torch.Tensor, "n layer *width"], prompts: Sequence[Prompt],
             emotions: Sequence[str]) -> tuple[Float[torch.Tensor, "emotion layer *width"], GroupInfo]:
    """Δμ_e = mean_g (a_{g,e} − mean_e' a_{g,e'}) of one site's last-token activations ``acts``
    (row i = ``prompts[i]``), unnormalised: ``group_centered_means`` over ``Prompt.group``
    (skeleton_id, valence). The one definition of the difference vectors (stage 05).

    Every prompt must carry an emotion and a skeleton id (a missing id would merge all
    scenarios of a valence into one group)."""
    if len(prompts) != acts.shape[0]:
        raise ValueError(f"{len(prompts)} prompts but the activations have {acts.shape[0]} rows")
    missing = [i for i, p in enumerate(prompts)
               if getattr(p, "emotion", None) is None or getattr(p, "skeleton_id", None) is None]
    if missing:
        p = prompts[missing[0]]
        raise ValueError(f"difference vectors need emotion-instructed prompts with skeleton ids; "
                         f"prompt {missing[0]} has emotion={getattr(p, 'emotion', None)!r}, "
                         f"skeleton_id={getattr(p, 'skeleton_id', None)!r}")
    return group_centered_means(acts, [p.group for p in prompts], [p.emotion for p in prompts],
                                emotions, normalize=False)


def difference_vectors_from_acts(
    mlp_post: Float[torch.Tensor, "n layer d_mlp"],
    z: Float[torch.Tensor, "n layer head d_head"],
    prompts: Sequence[Prompt],
    emotions: Sequence[str],
) -> DifferenceVectors:
    """Δμ (``delta_mu``) at both intervention points from collected last-token activations."""
    if len(prompts) != mlp_post.shape[0] or len(prompts) != z.shape[0]:
        raise ValueError(f"{len(prompts)} prompts but mlp_post has {mlp_post.shape[0]} rows, z {z.shape[0]}")
    mlp, info = delta_mu(mlp_post, prompts, emotions)
    zz, _ = delta_mu(z, prompts, emotions)
    return DifferenceVectors(list(emotions), mlp, zz, info)


def difference_vectors(model, prompts: Sequence[Prompt], emotions: Sequence[str], *,
                       batch_size: int = 16, progress: bool = True) -> DifferenceVectors:
    """Collect ``mlp_post`` and ``z`` at the last token of ``prompts`` and return Δμ."""
    acts = collect(model, prompts, ("mlp_post", "z"), "last", batch_size=batch_size, progress=progress)
    return difference_vectors_from_acts(acts["mlp_post"], acts["z"], prompts, emotions)


# ============================================================================ 2. σ, v_ref


def sigma_from_acts(resid_post: Float[torch.Tensor, "n layer d_model"],
                    resid_mid: Float[torch.Tensor, "n layer d_model"]) -> Float[torch.Tensor, "2 layer"]:
    """σ[p, L] = mean_x sqrt(mean_d h² ) with h = resid_post (p=0, mlp) / resid_mid (p=1, attn)."""
    def rms(h):
        return h.double().pow(2).mean(-1).sqrt().mean(0)
    return torch.stack([rms(resid_post), rms(resid_mid)]).float()


def sublayer_sigma(model, prompts: Sequence[str | Prompt], *, final_norm_last: bool = False,
                   batch_size: int = 16, progress: bool = True) -> Float[torch.Tensor, "2 layer"]:
    """σ per sublayer over ``prompts`` (stage 06). ``final_norm_last``: use the final-norm output
    for the last layer's mlp σ, as the authors' code did (a known flaw: there the last layer's
    residual slot held the final norm's output)."""
    sites = ("resid_post", "resid_mid") + (("final_norm",) if final_norm_last else ())
    acts = collect(model, prompts, sites, "last", batch_size=batch_size, progress=progress)
    post = acts["resid_post"].clone()
    if final_norm_last:
        post[:, -1] = acts["final_norm"][:, 0]
    return sigma_from_acts(post, acts["resid_mid"])


def reference_band(n_layers: int, band: tuple[int, int, int] = _PAPER_REF_BAND) -> list[int]:
    """The paper's reference layers 21–25 of 28 scaled to ``n_layers``:
    [⌊21 n/28 + ½⌋, ⌊25 n/28 + ½⌋] (inclusive) — 21..25 for 28 layers, 23..27 for 30."""
    lo, hi, ref = band
    a = min(int(math.floor(lo * n_layers / ref + 0.5)), n_layers - 1)
    b = min(int(math.floor(hi * n_layers / ref + 0.5)), n_layers - 1)
    return list(range(a, max(a, b) + 1))


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / (v.norm(dim=-1, keepdim=True) + EPS)


def reference_direction(v_mid: Float[torch.Tensor, "*emotion layer d_model"] | EmotionDirections,
                        v_post: Float[torch.Tensor, "*emotion layer d_model"] | None = None,
                        band: Sequence[int] | None = None, *,
                        emotion: str | None = None) -> Float[torch.Tensor, "*emotion d_model"]:
    """v_ref = normalise(Σ_k sign(<u_k, u_0>) u_k) over u = (v_mid[L], v_post[L]) for L in band
    (in that order; u_0 = v_mid[band[0]], the paper's attention L21). Default band:
    ``reference_band(n_layers)``.

    ``v_mid``/``v_post``: ``[layer, d_model]`` (one emotion -> ``[d_model]``) or
    ``[emotion, layer, d_model]`` (-> ``[emotion, d_model]``), layer axis = model layer; or
    ``reference_direction(dirs)`` with ``EmotionDirections`` (sites resid_mid and resid_post, all
    model layers; ``emotion=`` for one). A band layer outside the layer axis is a ``ValueError``.
    (The one definition: ``components.reference_direction`` is its deprecated alias.)"""
    if isinstance(v_mid, EmotionDirections):
        if v_post is not None:
            raise TypeError("reference_direction(dirs): EmotionDirections carry both sites; pass no v_post")
        dirs = v_mid
        emos = [emotion] if emotion is not None else None
        v_mid = dirs.tensor("resid_mid", emos, n_layers=max(dirs.layers) + 1)
        v_post = dirs.tensor("resid_post", emos, n_layers=max(dirs.layers) + 1)
        if emotion is not None:
            v_mid, v_post = v_mid[0], v_post[0]
    elif emotion is not None:
        raise TypeError("reference_direction: emotion= only applies to EmotionDirections")
    if v_post is None or v_mid.shape != v_post.shape or v_mid.dim() not in (2, 3):
        raise ValueError(f"v_mid {tuple(v_mid.shape)} and v_post "
                         f"{None if v_post is None else tuple(v_post.shape)} must both be [layer, d_model] "
                         f"or [emotion, layer, d_model]")
    n_layers = v_mid.shape[-2]
    band = reference_band(n_layers) if band is None else [int(b) for b in band]
    bad = [L for L in band if not 0 <= L < n_layers]
    if bad:
        raise ValueError(f"reference band {band} has layers {bad} outside 0..{n_layers - 1}")
    if v_mid.dim() == 3:
        return torch.stack([reference_direction(v_mid[e], v_post[e], band) for e in range(v_mid.shape[0])])
    u = _unit(torch.stack([x for L in band for x in (v_mid[L], v_post[L])]).double())
    sign = torch.where(u @ u[0] < 0, -1.0, 1.0).to(u.dtype)
    return _unit((sign[:, None] * u).sum(0)).float()


def aligned_directions(v_mid: Float[torch.Tensor, "layer d_model"],
                       v_post: Float[torch.Tensor, "layer d_model"],
                       v_ref: Float[torch.Tensor, "d_model"]) -> Float[torch.Tensor, "2 layer d_model"]:
    """v̂[p, L]: unit local directions (p=0 mlp: v_post, p=1 attn: v_mid) flipped to <v̂, v_ref> ≥ 0."""
    u = _unit(torch.stack([v_post, v_mid]).double())
    sign = torch.where(u @ v_ref.double() < 0, -1.0, 1.0)
    return (u * sign[..., None]).float()


# ============================================================================ 3. influence


@dataclass
class InfluenceResult(Result):
    """``influence[emotion, alpha, p, layer]`` (p in ``SUBLAYERS``); ``base[emotion]`` = s̄_base."""

    emotions: list[str]
    alphas: list[float]
    layers: list[int]
    influence: Float[torch.Tensor, "emotion alpha 2 layer"]
    base: Float[torch.Tensor, "emotion"]
    v_ref: Float[torch.Tensor, "emotion d_model"]
    sigma: Float[torch.Tensor, "2 layer"]
    n_prompts: int = 0

    def mean(self, emotion: str | int = 0) -> Float[torch.Tensor, "2 layer"]:
        """mean_α I for one emotion (what allocation uses)."""
        i = self.emotions.index(emotion) if isinstance(emotion, str) else emotion
        return self.influence[i].mean(0)

    def to_dict(self) -> dict:
        return {"emotions": self.emotions, "alphas": self.alphas, "layers": self.layers,
                "sublayers": list(SUBLAYERS), "influence": self.influence.tolist(),
                "base": self.base.tolist(), "sigma": self.sigma.tolist(), "n_prompts": self.n_prompts}

    def to_dataframe(self):
        """One row per (emotion, α, sublayer, model layer): ``influence``."""
        import pandas as pd

        rows = [(e, float(a), p, int(layer), float(self.influence[i, j, k, li]))
                for i, e in enumerate(self.emotions) for j, a in enumerate(self.alphas)
                for k, p in enumerate(SUBLAYERS) for li, layer in enumerate(self.layers)]
        return pd.DataFrame(rows, columns=["emotion", "alpha", "sublayer", "layer", "influence"])

    def plot(self):
        """I(L, p) (mean over α) vs layer, one curve per emotion × sublayer: a Figure."""
        from .viz.figures import sublayer_influence as figure

        return figure({e: {p: self.influence[i].mean(0)[k] for k, p in enumerate(SUBLAYERS)}
                       for i, e in enumerate(self.emotions)})


def _influence_result(sums, base_sum, n, iv, emotions, alphas, sigma, lay, v_ref) -> InfluenceResult:
    """I[e, α, p, L] = (mean s under the intervention − mean s unmodified) / (α σ[p, L])."""
    infl = torch.zeros(len(emotions), len(alphas), 2, sigma.shape[1])
    for k, (e, a, p, L) in enumerate(iv):
        infl[e, a, p, L] = float((sums[k] / n - base_sum[e] / n) / (alphas[a] * float(sigma[p, L])))
    return InfluenceResult(emotions, alphas, lay, infl[..., lay], (base_sum / n).float(), v_ref,
                           sigma.float().cpu(), n)


@torch.no_grad()
def sublayer_influence(
    model,
    prompts: Sequence[str | Prompt],
    v_mid: Float[torch.Tensor, "*emotion layer d_model"] | EmotionDirections,
    v_post: Float[torch.Tensor, "*emotion layer d_model"] | None = None,
    sigma: Float[torch.Tensor, "2 layer"] | None = None,
    *,
    v_ref: Float[torch.Tensor, "*emotion d_model"] | None = None,
    band: Sequence[int] | None = None,
    alphas: Sequence[float] = PAPER_ALPHAS,
    layers: Sequence[int] | None = None,
    emotions: Sequence[str] | None = None,
    batch_size: int = 8,
    max_rows: int = 128,
    use_cache: bool = True,
    stack_copies: bool = True,
    progress: bool = True,
) -> InfluenceResult:
    """I[e, α, p, L] (module docstring, step 4), batched over prompts AND interventions.

    ``v_mid``/``v_post`` are unit directions indexed by model layer, ``[layer, d_model]`` or
    ``[emotion, layer, d_model]`` (all emotions share the neutral inputs, as the paper's nearly
    did: see the known flaws on the method page). Every (emotion, α, p, L) is one intervention;
    up to ``max_rows`` (prompt × intervention) rows go in one forward. ``v_ref`` defaults to
    ``reference_direction`` over ``band``. ``use_cache`` (default): each intervention resumes at
    its layer from the prompt's KV cache, its last token only; ``stack_copies`` (default): the
    interventions of a chunk as copies of the last token on the position axis of one cache,
    else as rows on a repeated cache (slower; kept for benchmarks). ``use_cache=False``: full
    forwards (the reference).

    Or ``sublayer_influence(model, prompts, dirs, sigma=sigma)`` with ``EmotionDirections``
    (sites resid_mid and resid_post at every model layer; ``emotions`` default to its own).

    Example::

        >>> sigma = sublayer_sigma(model, neutral)           # [2 (mlp, attn), layer]
        >>> infl = sublayer_influence(model, neutral, dirs, sigma=sigma, alphas=(2.0, 4.0))
        >>> infl.influence.shape, infl.mean("anger").shape   # [emotion, α, p, layer]; mean over α
        (torch.Size([2, 2, 2, 30]), torch.Size([2, 30]))
    """
    if isinstance(v_mid, EmotionDirections):
        if v_post is not None:
            raise TypeError("sublayer_influence(model, prompts, dirs, sigma=...): EmotionDirections carry "
                            "both sites; pass no v_post")
        dirs = v_mid
        emotions = list(emotions) if emotions is not None else list(dirs.emotions)
        v_mid = dirs.tensor("resid_mid", emotions, n_layers=model.cfg.n_layers)
        v_post = dirs.tensor("resid_post", emotions, n_layers=model.cfg.n_layers)
    if v_post is None or sigma is None:
        raise TypeError("sublayer_influence: needs v_mid and v_post (or EmotionDirections) and sigma")
    single = v_mid.dim() == 2
    if single:
        v_mid, v_post = v_mid[None], v_post[None]
        if v_ref is not None and v_ref.dim() == 1:
            v_ref = v_ref[None]
    n_layers = model.cfg.n_layers
    if v_mid.shape != v_post.shape or v_mid.shape[1] != n_layers or v_mid.shape[2] != model.cfg.d_model:
        raise ValueError(f"v_mid {tuple(v_mid.shape)} / v_post {tuple(v_post.shape)}: expected "
                         f"[emotion, {n_layers} layers, {model.cfg.d_model}]")
    if tuple(sigma.shape) != (2, n_layers):
        raise ValueError(f"sigma has shape {tuple(sigma.shape)}; expected (2, {n_layers}) [p=(mlp, attn), layer]")
    n_emo = v_mid.shape[0]
    emotions = list(emotions) if emotions is not None else [str(i) for i in range(n_emo)]
    if len(emotions) != n_emo:
        raise ValueError(f"{len(emotions)} emotion names for {n_emo} direction sets")
    if v_ref is None:
        v_ref = torch.stack([reference_direction(v_mid[i], v_post[i], band) for i in range(n_emo)])
    v_ref = v_ref.float().cpu()
    lay = S.layers_of(model, layers)
    alphas = [float(a) for a in alphas]
    if any(a == 0 for a in alphas):
        raise ValueError("alphas must be non-zero (I divides by α σ)")
    vhat = torch.stack([aligned_directions(v_mid[i].cpu(), v_post[i].cpu(), v_ref[i]) for i in range(n_emo)])
    # interventions: (emotion, alpha, p, layer) -> dose vector
    iv = list(itertools.product(range(n_emo), range(len(alphas)), range(2), lay))
    doses = torch.stack([alphas[a] * float(sigma[p, L]) * vhat[e, p, L] for e, a, p, L in iv])
    texts = texts_of(prompts)
    n = len(texts)
    if use_cache:
        return _influence_resumed(model, texts, iv, doses, v_ref, n_emo, emotions, alphas, sigma, lay,
                                  batch_size, max_rows, progress, stack_copies)
    # the straightforward path: one full forward per (prompt batch, chunk of interventions)
    dev = model.cfg.device
    sums = torch.zeros(len(iv), dtype=torch.float64)
    base_sum = torch.zeros(n_emo, dtype=torch.float64)
    fn_name = S.hook_name(model, "final_norm")
    k_per = max(1, max_rows // max(1, min(batch_size, n)))
    total = math.ceil(n / batch_size) * math.ceil(len(iv) / k_per)

    def run(tokens, mask, iv_chunk, reps):
        """Forward ``tokens`` (repeated ``reps`` times per prompt) with interventions
        ``iv_chunk`` (indices into iv, one per repeat) and return s [b, reps, emotion]."""
        store = {}
        hooks = []
        if iv_chunk:
            per_site: dict[tuple[int, int], torch.Tensor] = {}
            for j, k in enumerate(iv_chunk):
                _, _, p, L = iv[k]
                if (p, L) not in per_site:
                    per_site[(p, L)] = torch.zeros(reps, model.cfg.d_model)
                per_site[(p, L)][j] = doses[k]
            b = tokens.shape[0] // reps
            for (p, L), d in per_site.items():
                rows = d.repeat(b, 1).to(dev)

                def add(x, hook, rows=rows):  # noqa: ARG001
                    out = x.clone()
                    out[:, -1] = out[:, -1] + rows.to(x.dtype)
                    return out
                hooks.append((S.hook_name(model, _WRITE_SITE[SUBLAYERS[p]], L), add))

        def read(x, hook):  # noqa: ARG001
            store["s"] = x[:, -1].float() @ v_ref.T.to(x.device)
        hooks.append((fn_name, read))
        with model.hooks(fwd_hooks=hooks):
            model(tokens, attention_mask=mask, logits_to_keep=1, use_cache=False)
        return store["s"].cpu().double().view(-1, reps, n_emo)

    bar = tqdm(total=total, desc="influence", disable=not progress, leave=False)
    try:
        for start in range(0, n, batch_size):
            batch = tokenize(model, texts[start:start + batch_size])
            s0 = run(batch.tokens, batch.attention_mask, [], 1)
            base_sum += s0[:, 0].sum(0)
            for c0 in range(0, len(iv), k_per):
                chunk = list(range(c0, min(c0 + k_per, len(iv))))
                reps = len(chunk)
                toks = batch.tokens.repeat_interleave(reps, 0)
                mask = batch.attention_mask.repeat_interleave(reps, 0)
                s = run(toks, mask, chunk, reps)
                emo_idx = torch.tensor([iv[k][0] for k in chunk])
                sums[chunk] += s[:, torch.arange(reps), emo_idx].sum(0)
                bar.update(1)
    finally:
        bar.close()
    return _influence_result(sums, base_sum, n, iv, emotions, alphas, sigma, lay, v_ref)


def _croppable_layers(cache, extra: int = 1) -> list | None:
    """The cache's per-layer objects when each can take ``extra`` more positions and drop them
    again (plain dynamic layers, or sliding ones that stay below their window, where the window
    masks nothing), else None."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    for x in layers:
        name = type(x).__name__
        if name == "DynamicLayer":
            continue
        window = getattr(x, "sliding_window", None)
        if name == "DynamicSlidingWindowLayer" and window and x.get_seq_length() + extra < window:
            continue
        return None
    return list(layers)


def _stacked_mask(attention_mask: torch.Tensor, r: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask ``[b, 1, r, T−1+r]`` for r stacked copies of the last token: each copy
    sees the prompt's earlier (non-padding) positions and itself, not the other copies."""
    b, width = attention_mask.shape
    neg = torch.finfo(dtype).min
    m = torch.full((b, 1, r, width - 1 + r), neg, dtype=dtype, device=attention_mask.device)
    m[:, 0, :, :width - 1] = torch.where(attention_mask[:, None, :-1].bool(), 0.0, neg).to(dtype)
    idx = torch.arange(r, device=attention_mask.device)
    m[:, 0, idx, width - 1 + idx] = 0.0
    return m


@torch.no_grad()
def _influence_resumed(model, texts, iv, doses, v_ref, n_emo, emotions, alphas, sigma, lay,
                       batch_size, max_rows, progress, stack_copies: bool = True) -> InfluenceResult:
    """``sublayer_influence`` with every intervention resumed at its own layer.

    Per batch: the prompt minus its last token runs once into a KV cache; the last token runs
    once unmodified, keeping the residual entering every block. An intervention at sublayer
    (p, L) adds its dose at the last position only, so nothing below block L and no earlier
    position changes: its forward starts at block L from the kept residual and reads s at the
    final norm. The r interventions of a chunk that share a site run as r copies of the last
    token stacked along the position axis, all at the last token's position, on the one
    prompt cache: a 4D mask lets each copy see the prompt and itself only
    (:func:`_stacked_mask`), so no cache is repeated per intervention. The cache's layers ≥ L
    drop the r appended positions afterwards. A cache that cannot (a sliding window reached)
    gets the interventions as rows on a repeated copy instead."""
    from .activations import forward_from

    n = len(texts)
    dev = model.cfg.device
    fn_name = S.hook_name(model, "final_norm")
    sums = torch.zeros(len(iv), dtype=torch.float64)
    base_sum = torch.zeros(n_emo, dtype=torch.float64)
    by_site: dict[tuple[int, int], list[int]] = {}
    for k, (_, _, p, L) in enumerate(iv):
        by_site.setdefault((p, L), []).append(k)
    per_site = max(len(v) for v in by_site.values())
    n_b = math.ceil(n / batch_size)
    bar = tqdm(total=n_b * len(by_site), desc="influence", disable=not progress, leave=False)
    try:
        for start in range(0, n, batch_size):
            batch = tokenize(model, texts[start:start + batch_size])
            b = len(batch)
            reps = max(1, min(per_site, max_rows // b))
            _, cache = model(batch.tokens[:, :-1], attention_mask=batch.attention_mask[:, :-1],
                             return_type="logits_and_cache", use_cache=True, logits_to_keep=1)
            store: dict = {}
            resid: dict[int, torch.Tensor] = {}

            def keep(L, resid=resid):
                def fn(x, hook):  # noqa: ARG001
                    resid[L] = x.detach().clone()
                return fn

            def read(x, hook, store=store):  # noqa: ARG001
                store["s"] = x.float() @ v_ref.T.to(x.device)  # [b, pos, emotion]

            hooks = [(S.hook_name(model, "resid_pre", L), keep(L)) for L in sorted({L for _, L in by_site})]
            stacked = _croppable_layers(cache, extra=reps) if stack_copies else None
            base_cache = cache if stacked is not None else copy.deepcopy(cache)
            with model.hooks(fwd_hooks=[*hooks, (fn_name, read)]):
                model(batch.tokens[:, -1:], attention_mask=batch.attention_mask, past_key_values=base_cache,
                      use_cache=True, logits_to_keep=1)
            base_sum += store["s"][:, -1].cpu().double().sum(0)
            if stacked is not None:
                for cache_layer in stacked:
                    cache_layer.crop(-1)
                _stacked_sites(model, batch, cache, stacked, resid, by_site, iv, doses, reps, sums, store,
                               fn_name, read, forward_from, bar)
                continue
            del base_cache
            rep_cache = copy.deepcopy(cache)
            if reps > 1:
                rep_cache.batch_repeat_interleave(reps)
            layers_c = _croppable_layers(rep_cache)
            mask = batch.attention_mask.repeat_interleave(reps, 0)
            for (p, L), ks in by_site.items():
                site = S.hook_name(model, _WRITE_SITE[SUBLAYERS[p]], L)
                for c0 in range(0, len(ks), reps):
                    chunk = ks[c0:c0 + reps]
                    r = len(chunk)
                    d = torch.zeros(reps, model.cfg.d_model)
                    d[:r] = doses[chunk]
                    rows = d.repeat(b, 1).to(dev)  # row i*reps + j: prompt i, intervention j

                    def add(x, hook, rows=rows):  # noqa: ARG001
                        out = x.clone()
                        out[:, -1] = out[:, -1] + rows.to(x.dtype)
                        return out

                    x0 = resid[L].repeat_interleave(reps, 0)
                    past = rep_cache
                    if layers_c is None:  # a cache that cannot drop a position: a fresh copy each time
                        past = copy.deepcopy(cache)
                        if reps > 1:
                            past.batch_repeat_interleave(reps)
                    forward_from(model, x0, L, mask, fwd_hooks=[(site, add), (fn_name, read)], past=past)
                    for cache_layer in (layers_c or [])[L:]:
                        cache_layer.crop(-1)
                    s_ = store["s"][:, -1].cpu().double().view(b, reps, n_emo)
                    emo_idx = torch.tensor([iv[k][0] for k in chunk])
                    sums[chunk] += s_[:, torch.arange(r), emo_idx].sum(0)
                bar.update(1)
    finally:
        bar.close()
    return _influence_result(sums, base_sum, n, iv, emotions, alphas, sigma, lay, v_ref)


def _stacked_sites(model, batch, cache, cache_layers, resid, by_site, iv, doses, reps, sums, store,
                   fn_name, read, forward_from, bar) -> None:
    """One batch's interventions, r per forward stacked along the position axis (see
    ``_influence_resumed``); adds each intervention's s summed over prompts into ``sums``."""
    dev = model.cfg.device
    b = len(batch)
    am = batch.attention_mask.to(dev)
    pos_last = am.long().sum(-1) - 1  # the last token's RoPE position under left padding
    dtype = next(iter(resid.values())).dtype
    masks: dict[int, torch.Tensor] = {}
    for (p, L), ks in by_site.items():
        site = S.hook_name(model, _WRITE_SITE[SUBLAYERS[p]], L)
        for c0 in range(0, len(ks), reps):
            chunk = ks[c0:c0 + reps]
            r = len(chunk)
            if r not in masks:
                masks[r] = _stacked_mask(am, r, dtype)
            d = doses[chunk].to(dev)  # copy j of every prompt gets intervention chunk[j]

            def add(x, hook, d=d):  # noqa: ARG001
                return x + d.to(x.dtype)

            x0 = resid[L].expand(b, r, resid[L].shape[-1])
            forward_from(model, x0, L, masks[r], fwd_hooks=[(site, add), (fn_name, read)], past=cache,
                         position_ids=pos_last[:, None].expand(b, r))
            for cache_layer in cache_layers[L:]:
                cache_layer.crop(-r)
            s_ = store["s"].cpu().double()  # [b, r, emotion]
            emo_idx = torch.tensor([iv[k][0] for k in chunk])
            sums[chunk] += s_[:, torch.arange(r), emo_idx].sum(0)
        bar.update(1)


# ============================================================================ 4. allocation


@dataclass
class Allocation(Result):
    """Units per layer: ``neurons[L]``, ``heads[L]``; ``log`` holds the intermediate numbers."""

    neurons: list[int]
    heads: list[int]
    meta: dict = field(default_factory=dict)

    @property
    def n_neurons(self) -> int:
        return sum(self.neurons)

    @property
    def n_heads(self) -> int:
        return sum(self.heads)

    def _summary(self) -> dict[str, str]:
        return {"layers": str(len(self.neurons)), "n_neurons": str(self.n_neurons),
                "n_heads": str(self.n_heads), **super()._summary()}

    def to_dataframe(self):
        """One row per layer: the ``neurons`` and ``heads`` allotted to it."""
        import pandas as pd

        return pd.DataFrame({"layer": range(len(self.neurons)), "neurons": self.neurons,
                             "heads": self.heads})


def _largest_remainder(raw: np.ndarray, cap: int, target: int) -> np.ndarray:
    """floor(raw), each ≤ cap, then +1 by largest fractional part (ties: lower index) until
    the sum reaches ``target`` or every entry is at the cap."""
    k = np.minimum(np.floor(raw + 1e-9).astype(int), cap)
    frac = raw - np.floor(raw + 1e-9)
    order = sorted(range(len(raw)), key=lambda i: (-round(float(frac[i]), 12), i))
    remain = target - int(k.sum())
    while remain > 0 and (k < cap).any():
        for i in order:
            if remain <= 0:
                break
            if k[i] < cap:
                k[i] += 1
                remain -= 1
    return k


def allocate_kind(weights: Sequence[float] | np.ndarray, total: int, min_per_layer: int,
                  cap_ratio: float = 0.4, max_units: int | None = None) -> tuple[list[int], dict]:
    """One kind's per-layer quota (module docstring, step 5). ``weights`` are clipped at 0.

    Minimum fall-back: when total < min·n_layers the minimum becomes 1 (or 0 when
    total < n_layers). Availability: quotas above ``max_units`` are truncated and the
    deficit goes to the layers with the largest planned quotas (ties: lower layer) that
    still have room.
    """
    w = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    n = len(w)
    if n == 0:
        raise ValueError("allocate_kind: no layers")
    if total < 0:
        raise ValueError(f"allocate_kind: total {total} < 0")
    w_norm = np.full(n, 1.0 / n) if w.sum() <= 1e-12 else w / w.sum()
    m = min_per_layer if total >= min_per_layer * n else (1 if total >= n else 0)
    rem = total - m * n
    cap = int(math.floor(cap_ratio * total))
    raw = w_norm * rem
    add = _largest_remainder(raw, cap, rem)
    plan = m + add
    k = plan.copy()
    deficit = 0
    if max_units is not None:
        k = np.minimum(plan, max_units)
        deficit = int((plan - k).sum())
        for i in sorted(range(n), key=lambda i: (-plan[i], i)):
            if deficit <= 0:
                break
            room = max_units - k[i]
            if room > 0:
                a = min(room, deficit)
                k[i] += a
                deficit -= a
    log = {"w": w.tolist(), "w_norm": w_norm.tolist(), "min": int(m), "cap": cap,
           "raw": raw.tolist(), "add": add.tolist(), "plan": plan.tolist(),
           "unplaced": int(deficit + (rem - int(add.sum())))}
    return [int(x) for x in k], log


def allocate_circuit(
    influence: Float[torch.Tensor, "*alpha 2 layer"] | np.ndarray,
    *,
    budget_per_sublayer: int = 10,
    ratio: tuple[float, float] = (0.7, 0.3),
    min_per_layer: tuple[int, int] = (4, 2),
    cap_ratio: float = 0.4,
    max_units: tuple[int | None, int | None] = (None, None),
) -> Allocation:
    """Per-layer neuron/head counts from influence ``[2, layer]`` or ``[alpha, 2, layer]``
    (p = (mlp, attn); averaged over α first). K = budget_per_sublayer × 2 n_layers
    (560 for 28 layers), K_mlp = round(ratio_mlp K) (392), K_attn = K − K_mlp (168)."""
    infl = torch.as_tensor(np.asarray(influence), dtype=torch.float64)
    if infl.dim() == 3:
        infl = infl.mean(0)
    if infl.dim() != 2 or infl.shape[0] != 2:
        raise ValueError(f"influence must be [2 (mlp, attn), layer] or [alpha, 2, layer], got {tuple(infl.shape)}")
    if not torch.isfinite(infl).all():
        raise ValueError("influence contains NaN/inf")
    if sum(ratio) <= 0 or min(ratio) < 0:
        raise ValueError(f"ratio {ratio} must be non-negative with a positive sum")
    n = infl.shape[1]
    K = int(budget_per_sublayer) * 2 * n
    r_mlp = ratio[0] / (ratio[0] + ratio[1])
    K_mlp = int(round(K * r_mlp))
    K_attn = K - K_mlp
    kn, log_n = allocate_kind(infl[0].numpy(), K_mlp, min_per_layer[0], cap_ratio, max_units[0])
    kh, log_h = allocate_kind(infl[1].numpy(), K_attn, min_per_layer[1], cap_ratio, max_units[1])
    meta = {"K_total": K, "K_mlp": K_mlp, "K_attn": K_attn, "budget_per_sublayer": budget_per_sublayer,
            "ratio": list(ratio), "min_per_layer": list(min_per_layer), "cap_ratio": cap_ratio,
            "max_units": list(max_units), "log_mlp": log_n, "log_attn": log_h}
    return Allocation(kn, kh, meta)


def select_components(alloc: Allocation, neuron_scores: Float[torch.Tensor, "layer d_mlp"],
                      head_scores: Float[torch.Tensor, "layer head"]) -> tuple[list[list[int]], list[list[int]]]:
    """Per layer, the top-k neuron and head ids by score, descending (ties: lower id)."""
    n = len(alloc.neurons)
    if neuron_scores.shape[0] != n or head_scores.shape[0] != n:
        raise ValueError(f"allocation has {n} layers; neuron_scores {tuple(neuron_scores.shape)}, "
                         f"head_scores {tuple(head_scores.shape)}")

    def top(scores, k, what, L):
        if k > scores.shape[0]:
            raise ValueError(f"layer {L}: {k} {what} requested but only {scores.shape[0]} exist")
        order = sorted(range(scores.shape[0]), key=lambda i: (-float(scores[i]), i)) if k else []
        return [int(i) for i in order[:k]]

    ns = neuron_scores.double().cpu()
    hs = head_scores.double().cpu()
    neurons = [top(ns[L], alloc.neurons[L], "neurons", L) for L in range(n)]
    heads = [top(hs[L], alloc.heads[L], "heads", L) for L in range(n)]
    return neurons, heads


# ============================================================================ 5. circuit


@dataclass
class EmotionCircuit(Result):
    """One emotion's circuit: per layer L, ``neurons[L]`` ids with Δμ ``neuron_values[L]`` [k]
    and ``heads[L]`` ids with Δμ_z ``head_values[L]`` [k, d_head]."""

    emotion: str
    neurons: list[list[int]]
    heads: list[list[int]]
    neuron_values: list[Float[torch.Tensor, "k"]]
    head_values: list[Float[torch.Tensor, "k d_head"]]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.neurons)
        if not (len(self.heads) == len(self.neuron_values) == len(self.head_values) == n):
            raise ValueError("EmotionCircuit: neurons, heads and their values need one entry per layer")
        for L in range(n):
            if len(self.neurons[L]) != self.neuron_values[L].shape[0]:
                raise ValueError(f"layer {L}: {len(self.neurons[L])} neurons but "
                                 f"{self.neuron_values[L].shape[0]} values")
            if len(self.heads[L]) != self.head_values[L].shape[0]:
                raise ValueError(f"layer {L}: {len(self.heads[L])} heads but {self.head_values[L].shape[0]} values")

    @property
    def n_layers(self) -> int:
        return len(self.neurons)

    @property
    def n_neurons(self) -> int:
        return sum(len(x) for x in self.neurons)

    @property
    def n_heads(self) -> int:
        return sum(len(x) for x in self.heads)

    def sizes(self) -> tuple[list[int], list[int]]:
        return [len(x) for x in self.neurons], [len(x) for x in self.heads]

    def neuron_set(self) -> set[tuple[int, int]]:
        return {(L, i) for L, ids in enumerate(self.neurons) for i in ids}

    def head_set(self) -> set[tuple[int, int]]:
        return {(L, h) for L, ids in enumerate(self.heads) for h in ids}

    def _summary(self) -> dict[str, str]:
        def per_layer(xs: list[list[int]]) -> str:
            sizes = [len(x) for x in xs]
            return f"{sum(sizes)}" + (f" {sizes}" if len(sizes) <= 12 else "")

        return {"emotion": repr(self.emotion), "layers": str(self.n_layers),
                "neurons": per_layer(self.neurons), "heads": per_layer(self.heads),
                "meta": _summarize(self.meta)}

    def to_dataframe(self):
        """One row per unit: ``emotion``, ``kind`` ("neuron" / "head"), ``layer``, ``unit`` (the
        neuron or head id) and ``delta`` (the neuron's Δμ; for a head, ‖Δμ_z‖)."""
        import pandas as pd

        rows = []
        for L in range(self.n_layers):
            for i, n in enumerate(self.neurons[L]):
                rows.append((self.emotion, "neuron", L, int(n), float(self.neuron_values[L][i])))
            for i, h in enumerate(self.heads[L]):
                rows.append((self.emotion, "head", L, int(h),
                             float(self.head_values[L][i].double().norm())))
        return pd.DataFrame(rows, columns=["emotion", "kind", "layer", "unit", "delta"])

    def plot(self, n_heads: int | None = None):
        """The circuit's heads and neurons per layer (``figures.circuit_graph``): a Figure."""
        from .viz.figures import circuit_graph

        comps = {"heads": sorted(self.head_set()), "neurons": sorted(self.neuron_set())}
        return circuit_graph({self.emotion: comps}, max(self.n_layers, 1), n_heads=n_heads,
                             title=f"{self.emotion} circuit: selected components per layer")


def build_circuit(emotion: str, neurons: list[list[int]], heads: list[list[int]],
                  mlp_delta: Float[torch.Tensor, "layer d_mlp"],
                  z_delta: Float[torch.Tensor, "layer head d_head"], meta: dict | None = None) -> EmotionCircuit:
    """Attach Δμ values to selected ids."""
    nv = [mlp_delta[L, torch.tensor(ids, dtype=torch.long)].float().cpu() for L, ids in enumerate(neurons)]
    hv = [z_delta[L, torch.tensor(ids, dtype=torch.long)].float().cpu() for L, ids in enumerate(heads)]
    return EmotionCircuit(emotion, neurons, heads, nv, hv, dict(meta or {}))


HEAD_SHARE_WARNING = 0.5  # assemble_circuit warns above this share of all heads selected


def assemble_circuit(emotion: str, influence: Float[torch.Tensor, "*alpha 2 layer"],
                     neuron_scores: Float[torch.Tensor, "layer d_mlp"],
                     head_scores: Float[torch.Tensor, "layer head"],
                     mlp_delta: Float[torch.Tensor, "layer d_mlp"],
                     z_delta: Float[torch.Tensor, "layer head d_head"], *, meta: dict | None = None,
                     **alloc_kw) -> EmotionCircuit:
    """allocate_circuit -> select_components -> build_circuit, in one call.

    Example (``nc``, ``hi``, ``infl``: ``neuron_contributions``, ``head_importance``,
    ``sublayer_influence`` over the same emotions, here ``dirs.emotions``)::

        >>> i = dirs.emotions.index("anger")
        >>> dv = difference_vectors(model, prompts, dirs.emotions)
        >>> circuit = assemble_circuit("anger", infl.influence[i], nc.C_mean[i], hi.mean[i],
        ...                            dv.mlp[i], dv.z[i], budget_per_sublayer=4)
        >>> circuit.n_neurons, circuit.n_heads, len(circuit.neurons)   # an EmotionCircuit
    """
    alloc_kw.setdefault("max_units", (neuron_scores.shape[1], head_scores.shape[1]))
    alloc = allocate_circuit(influence, **alloc_kw)
    neurons, heads = select_components(alloc, neuron_scores, head_scores)
    n_all = head_scores.numel()
    n_sel = sum(len(h) for h in heads)
    if n_all and n_sel / n_all > HEAD_SHARE_WARNING:
        warnings.warn(
            f"assemble_circuit({emotion!r}): the budget selects {n_sel} of the model's {n_all} heads "
            f"({n_sel / n_all:.0%}); circuits of different emotions and random-circuit controls "
            f"will share most heads. Lower budget_per_sublayer or the head share in ratio= for a small model.",
            stacklevel=2)
    m = {k: v for k, v in alloc.meta.items() if not k.startswith("log_")}
    m.update(meta or {})
    return build_circuit(emotion, neurons, heads, mlp_delta, z_delta, m)


def random_circuit(circuit: EmotionCircuit, mlp_delta: Float[torch.Tensor, "layer d_mlp"],
                   z_delta: Float[torch.Tensor, "layer head d_head"], seed: int = 0) -> EmotionCircuit:
    """A control circuit with the same per-layer sizes, random ids, their own Δμ values."""
    rng = random.Random(seed)
    d_mlp, n_heads = mlp_delta.shape[1], z_delta.shape[1]
    kn, kh = circuit.sizes()
    neurons = [sorted(rng.sample(range(d_mlp), k)) for k in kn]
    heads = [sorted(rng.sample(range(n_heads), k)) for k in kh]
    return build_circuit(circuit.emotion, neurons, heads, mlp_delta, z_delta,
                         {**circuit.meta, "random_seed": seed, "control": "random"})


def jaccard(a: Iterable, b: Iterable) -> float:
    """Jaccard index |A∩B| / |A∪B| of two collections taken as sets (e.g. (layer, id) pairs).

    Convention: two empty sets are identical, J(∅, ∅) = 1.0 (and J(∅, B) = 0 for non-empty B),
    so ``overlap(c, c) == 1`` for every circuit, empty or not. (``components.jaccard`` gave 0.0
    for two empty sets; it is now this function.)"""
    sa, sb = set(a), set(b)
    union = sa | sb
    return len(sa & sb) / len(union) if union else 1.0


def overlap(a: EmotionCircuit, b: EmotionCircuit) -> dict[str, float]:
    """Jaccard |A∩B|/|A∪B| of the (layer, id) neuron sets and head sets."""
    return {"neurons": jaccard(a.neuron_set(), b.neuron_set()), "heads": jaccard(a.head_set(), b.head_set())}


def circuits_summary(circuits: Sequence[EmotionCircuit] | dict[str, EmotionCircuit]) -> dict:
    """Per emotion: #neurons, #heads, per-layer counts; pairwise Jaccard and its mean μ
    (the paper: μ_neurons = 0.056, μ_heads = 0.454 on Llama-3.2-3B)."""
    cs = list(circuits.values()) if isinstance(circuits, dict) else list(circuits)
    names = [c.emotion for c in cs]
    if len(set(names)) != len(names):
        raise ValueError(f"circuits_summary: repeated emotions {names}")
    per = {c.emotion: {"n_neurons": c.n_neurons, "n_heads": c.n_heads,
                       "neurons_per_layer": c.sizes()[0], "heads_per_layer": c.sizes()[1]} for c in cs}
    pairs = {f"{a.emotion}-{b.emotion}": overlap(a, b) for a, b in itertools.combinations(cs, 2)}
    mu = ({k: float(np.mean([p[k] for p in pairs.values()])) for k in ("neurons", "heads")}
          if pairs else {"neurons": float("nan"), "heads": float("nan")})
    return {"circuits": per, "pairwise_jaccard": pairs, "mean_jaccard": mu}


# ============================================================================ 6. interventions


def _check_pos(name: str, pos: str) -> None:
    if pos not in ("last", "all"):
        raise ValueError(f"{name} must be 'last' or 'all', got {pos!r}")


def _check_circuit(model, circuit: EmotionCircuit) -> None:
    if circuit.n_layers != model.cfg.n_layers:
        raise ValueError(f"circuit {circuit.emotion!r} has {circuit.n_layers} layers; model has {model.cfg.n_layers}")
    for L in range(circuit.n_layers):
        if circuit.neurons[L] and max(circuit.neurons[L]) >= model.cfg.d_mlp:
            raise IndexError(f"circuit {circuit.emotion!r} layer {L}: neuron id {max(circuit.neurons[L])} "
                             f">= d_mlp {model.cfg.d_mlp}")
        if circuit.heads[L] and max(circuit.heads[L]) >= model.cfg.n_heads:
            raise IndexError(f"circuit {circuit.emotion!r} layer {L}: head id {max(circuit.heads[L])} "
                             f">= n_heads {model.cfg.n_heads}")


def circuit_interventions(model, circuit: EmotionCircuit, strength: float = 1.0, *,
                          neuron_positions: str = "last", head_positions: str = "all",
                          ablate: bool = False) -> list[Intervention]:
    """The ``Intervention``s of ``modulate``: per layer, shift the circuit's neurons (``mlp_post``)
    by λ·Δμ and its heads (``z``) by λ·Δμ_z, λ = ``strength``; with ``ablate=True`` (``ablate``)
    the units are zeroed instead."""
    _check_pos("neuron_positions", neuron_positions)
    _check_pos("head_positions", head_positions)
    _check_circuit(model, circuit)
    op = "zero" if ablate else "shift"
    ivs = []
    for L in range(circuit.n_layers):
        if circuit.neurons[L]:
            ivs.append(Intervention("mlp_post", L, op, units=list(circuit.neurons[L]),
                                    value=circuit.neuron_values[L], strength=float(strength),
                                    positions=neuron_positions))
        if circuit.heads[L]:
            ivs.append(Intervention("z", L, op, units=list(circuit.heads[L]), value=circuit.head_values[L],
                                    strength=float(strength), positions=head_positions))
    return ivs


def circuit_hooks(model, circuit: EmotionCircuit, strength: float = 1.0, *, neuron_positions: str = "last",
                  head_positions: str = "all", ablate: bool = False) -> list[tuple[str, object]]:
    """The (hook name, fn) pairs of ``modulate`` (or of ``ablate`` when ``ablate=True``:
    the units are set to 0 instead of shifted): ``interventions.intervention_hooks`` of
    ``circuit_interventions``."""
    return intervention_hooks(model, circuit_interventions(
        model, circuit, strength, neuron_positions=neuron_positions, head_positions=head_positions,
        ablate=ablate))


@contextmanager
def modulate(model, circuit: EmotionCircuit, strength: float = 1.0, *, neuron_positions: str = "last",
             head_positions: str = "all") -> Iterator[EmotionCircuit]:
    """While active: g[:, pos, n] += λ Δμ[n] (circuit neurons, ``neuron_positions``) and
    z[:, pos, h, :] += λ Δμ_z[h] (circuit heads, ``head_positions``), in every forward call
    (prefill and each decode step of ``generate``). Composes with ``steer`` and other hooks.

    Example::

        >>> with modulate(model, circuit, strength=2.0):              # λ = 2
        ...     out = generate(model, test, max_new_tokens=25)        # modulated replies
    """
    if not math.isfinite(float(strength)):
        raise ValueError(f"modulate: strength must be finite, got {strength}")
    ivs = circuit_interventions(model, circuit, strength, neuron_positions=neuron_positions,
                                head_positions=head_positions)
    with intervene(model, ivs):
        yield circuit


@contextmanager
def ablate(model, circuit: EmotionCircuit, *, neuron_positions: str = "all",
           head_positions: str = "all") -> Iterator[EmotionCircuit]:
    """While active: the circuit's neurons (g_n) and heads (z_h) are zeroed at ``positions``."""
    ivs = circuit_interventions(model, circuit, neuron_positions=neuron_positions,
                                head_positions=head_positions, ablate=True)
    with intervene(model, ivs):
        yield circuit


# ============================================================================ 7. scores


def neuron_scores_from_acts(mlp_post: Float[torch.Tensor, "n layer d_mlp"],
                            W_out: Float[torch.Tensor, "layer d_mlp d_model"],
                            v_post: Float[torch.Tensor, "layer d_model"]) -> Float[torch.Tensor, "layer d_mlp"]:
    """Deprecated alias of ``components.neuron_scores_from_acts`` (the one C_mean)."""
    from .components import neuron_scores_from_acts as scores

    warn_deprecated("circuits.neuron_scores_from_acts", "emocircuits.components.neuron_scores_from_acts")
    return scores(mlp_post, W_out, v_post)


def head_scores_from_acts(z: Float[torch.Tensor, "n layer head d_head"],
                          W_O: Float[torch.Tensor, "layer head d_head d_model"],
                          v_mid: Float[torch.Tensor, "layer d_model"]) -> Float[torch.Tensor, "layer head"]:
    """Deprecated: mean_x <z_h(x)[last] W_O[L, h], v_mid[L]>, the drop of
    <resid_mid[L][last], v_mid[L]> when head h is zeroed (a pre-norm linear stand-in). The head
    score is the paper's ln2 readout, ``components.head_ablation_scores_from_acts`` (from
    resid_pre, attn_o_out and z) or ``components.head_ablation_importance_closed_form``; this
    function keeps its old numbers for one release."""
    warn_deprecated("circuits.head_scores_from_acts (the resid_mid stand-in)",
                    "emocircuits.components.head_ablation_scores_from_acts (the paper's ln2 readout)")
    zm = z.double().mean(0)
    return torch.einsum("lhe,lhed,ld->lh", zm, W_O.double().cpu(), _unit(v_mid.double().cpu())).float()


@torch.no_grad()
def emotion_scores(model, prompts: Sequence[str | Prompt], v_ref: Float[torch.Tensor, "d_model"],
                   token_matrix: Float[torch.Tensor, "emotion vocab"] | None = None, *,
                   batch_size: int = 16) -> tuple[Float[torch.Tensor, "n"], Float[torch.Tensor, "n emotion"] | None]:
    """s(x) = <final_norm(x)[last], v_ref> and (with ``token_matrix``, see
    ``EmotionTokens.index_matrix``) the next-token mass per emotion, under the active hooks."""
    texts = texts_of(prompts)
    s_all, m_all = [], []
    name = S.hook_name(model, "final_norm")
    for start in range(0, len(texts), batch_size):
        b = tokenize(model, texts[start:start + batch_size])
        store: dict[str, torch.Tensor] = {}

        def read(x, hook, store=store):  # noqa: ARG001
            store["h"] = x[:, -1].float()
        with model.hooks(fwd_hooks=[(name, read)]):
            logits = model(b.tokens, attention_mask=b.attention_mask, logits_to_keep=1, use_cache=False)
        s_all.append((store["h"] @ v_ref.float().to(store["h"].device)).cpu())
        if token_matrix is not None:
            p = torch.softmax(logits[:, -1].float(), -1)
            m_all.append((p @ token_matrix.T.to(p.device)).cpu())
    return torch.cat(s_all), (torch.cat(m_all) if token_matrix is not None else None)


@dataclass
class FaithfulnessResult(Result):
    """Sufficiency: shift ratios (circuit on neutral) / (instruction); necessity: ablating the
    circuit vs random circuits of equal per-layer sizes on instructed prompts."""

    emotion: str
    s: dict[str, float]
    mass: dict[str, float]
    ratio_s: float
    ratio_mass: float
    ablation_s: dict[str, float | list[float]]
    ablation_mass: dict[str, float | list[float]]


def faithfulness(model, circuit: EmotionCircuit, prompts_neutral: Sequence[str | Prompt],
                 prompts_instructed: Sequence[str | Prompt], emotion: str, *,
                 v_ref: Float[torch.Tensor, "d_model"], mlp_delta: Float[torch.Tensor, "layer d_mlp"],
                 z_delta: Float[torch.Tensor, "layer head d_head"], strength: float = 1.0,
                 emotions: Sequence[str] | None = None, n_random: int = 3, seed: int = 0,
                 batch_size: int = 16) -> FaithfulnessResult:
    """For emotion e (scores: s on v_ref and the readout mass of e's words at the last token;
    give prompts with an assistant prefix such as "I feel" for the readout):

    ratio = (score(circuit-modulated, neutral) − score(neutral)) / (score(instructed) − score(neutral));
    ablation: score(instructed) with the circuit zeroed vs random circuits (``n_random`` seeds).
    """
    from .judges.readout import emotion_tokens

    toks = emotion_tokens(model, emotions)
    if emotion not in toks.emotions:
        raise KeyError(f"faithfulness: emotion {emotion!r} not in {toks.emotions}")
    j = toks.emotions.index(emotion)
    M = toks.index_matrix(model.cfg.d_vocab)

    def score(prompts):
        s, m = emotion_scores(model, prompts, v_ref, M, batch_size=batch_size)
        return float(s.mean()), float(m[:, j].mean())

    s_n, m_n = score(prompts_neutral)
    s_i, m_i = score(prompts_instructed)
    with modulate(model, circuit, strength):
        s_c, m_c = score(prompts_neutral)
    with ablate(model, circuit):
        s_a, m_a = score(prompts_instructed)
    rs, rm = [], []
    for k in range(n_random):
        rc = random_circuit(circuit, mlp_delta, z_delta, seed=seed + k)
        with ablate(model, rc):
            a, b = score(prompts_instructed)
        rs.append(a)
        rm.append(b)

    def ratio(c, i, n):
        return (c - n) / (i - n) if abs(i - n) > 1e-12 else float("nan")
    return FaithfulnessResult(
        emotion,
        s={"neutral": s_n, "instructed": s_i, "circuit": s_c},
        mass={"neutral": m_n, "instructed": m_i, "circuit": m_c},
        ratio_s=ratio(s_c, s_i, s_n), ratio_mass=ratio(m_c, m_i, m_n),
        ablation_s={"instructed": s_i, "circuit_ablated": s_a, "random_ablated": rs},
        ablation_mass={"instructed": m_i, "circuit_ablated": m_a, "random_ablated": rm},
    )


__all__ = [
    "SUBLAYERS", "PAPER_ALPHAS", "DifferenceVectors", "delta_mu", "difference_vectors", "difference_vectors_from_acts",
    "sigma_from_acts", "sublayer_sigma", "reference_band", "reference_direction", "aligned_directions",
    "InfluenceResult", "sublayer_influence", "Allocation", "allocate_kind", "allocate_circuit",
    "select_components", "EmotionCircuit", "build_circuit", "assemble_circuit", "random_circuit",
    "jaccard", "overlap", "circuits_summary", "circuit_hooks", "circuit_interventions", "modulate", "ablate", "neuron_scores_from_acts",
    "head_scores_from_acts", "emotion_scores", "FaithfulnessResult", "faithfulness",
]
