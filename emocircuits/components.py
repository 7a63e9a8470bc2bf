"""Local emotion components (paper stage 04): MLP neurons and attention heads.

Stage page: docs/stages/components.md; the method and its known flaws: docs/method.md.

**Neuron contribution** (the paper's). For emotion e, layer l, neuron n, with v̂_e^l the unit
resid_post direction of the same layer and g^l = mlp_post at the last prompt token:

    β_{e,n}^l = (W_out^l v̂_e^l)_n          c_{e,n}^l(x) = g_n^l(x) · β_{e,n}^l

aggregated over the prompts of emotion e: ``C_mean`` = mean c, ``C_pos`` = mean max(c, 0),
``C_neg`` = mean max(−c, 0), ``H_mean`` = mean g. Since β does not depend on x these are
computed exactly from mean g, mean max(g, 0) and mean max(−g, 0) (one batched collect).
Promoting neurons rank by C_mean descending, suppressing ones ascending (the paper ranks by
signed C_mean, so its circuits hold only promoting neurons: a known flaw).

**Head ablation importance** (the paper's): zero head h's z at layer l at every position and read

    s_l = ⟨x̃_l[last], v̂_{attn,e}^l⟩,   x̃_l = RMSNorm₂(resid_mid_l)·γ₂ (``blocks.l.ln2.hook_out``)

with v̂_attn the unit resid_mid direction of the same layer; importance I_{l,h} = s_l(base) −
s_l(head h zeroed). All heads of a layer run in one forward (the batch repeated n_heads + 1
times, copy k zeroing head k − 1), stopped right after layer l.

**Head attribution** (``head_attribution``): the first-order estimate of the same importance,
I_{l,h} ≈ Σ_pos Σ_d z_{h}·∂s/∂z_{h} (zero ablation: Δs ≈ (0 − z)·∂s/∂z; I = −Δs), from one
forward + one backward per emotion. Readouts:

* ``"same_layer"`` — the paper's s_l. Every layer has its own readout; we back-propagate
  Σ_l s_l with the gradient cut at every resid_pre (values unchanged), so ∂/∂z_l only sees s_l:
  exact per-layer gradients in one backward pass.
* ``"final"`` — s = ⟨final_norm[last], v_ref,e⟩ (downstream effect of every head).
* ``"logit"`` — s = log Σ_{t∈T_e} p(t), the emotion's next-token word mass.

v_ref (``circuits.reference_direction``) is the unit mean of the sign-aligned resid_mid and resid_post
directions over a late band of layers (paper: 21–25 of 28, scaled to depth).

**Sweeps** (``component_sweep``, paper Sec. 6): the emotion score is measured twice,
s_final = ⟨final_norm[last], v_ref,e⟩ and s_logit = log Σ_{t∈T_e} p(t); we report
Δs = s(intervened) − s(base), averaged over prompts, for the top-k components and for random
k-sets (several seeds).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float

from . import sites as S
from .activations import collect
from .circuits import delta_mu, jaccard  # jaccard: the one definition, re-exported
from .circuits import reference_direction as circuits_reference_direction
from .deprecation import deprecated_alias, renamed_keyword, warn_deprecated
from .directions import EmotionDirections
from .interventions import Intervention, intervention_hooks
from .patching import (
    Metric,
    attribution_patching,
    cut_between_layers_hooks,
    forward_metric,
    logit_readout_metric,
)
from .progress import tqdm
from .prompts import Prompt, texts_of, tokenize
from .results import Result

EPS = 1e-12
PromptLike = str | Prompt


# ----------------------------------------------------------------------------- helpers


def _labels(prompts: Sequence[PromptLike], labels: Sequence[str] | None) -> list[str]:
    if labels is None:
        labels = [getattr(p, "emotion", None) for p in prompts]
        if any(lab is None for lab in labels):
            raise ValueError("labels not given and some prompts carry no .emotion")
    if len(labels) != len(prompts):
        raise ValueError(f"{len(labels)} labels for {len(prompts)} prompts")
    return list(labels)  # type: ignore[arg-type]


def _emotions_of(directions, emotions: Sequence[str] | None, who: str) -> list[str]:
    """``emotions``, or the emotions of ``EmotionDirections`` when not given."""
    if emotions is not None:
        return list(emotions)
    if isinstance(directions, EmotionDirections):
        return list(directions.emotions)
    raise ValueError(f"{who}: pass emotions= (the rows of the direction tensor) or EmotionDirections")


def _select_layer_dirs(model, directions: torch.Tensor | EmotionDirections, emotions: Sequence[str],
                       lay: list[int], name: str, site: str) -> Float[torch.Tensor, "emotion layer d_model"]:
    """Directions [emotion, len(lay), d] for ``lay``, not normalised: ``EmotionDirections`` at
    ``site`` (rows in ``emotions`` order), or a tensor whose layer axis is all model layers or
    exactly ``lay``."""
    if isinstance(directions, EmotionDirections):
        missing = [layer for layer in lay if layer not in directions.layers]
        if missing:
            raise ValueError(f"{name}: the directions have no layers {missing} (have {directions.layers})")
        directions = directions.tensor(site, emotions)[:, [directions.layers.index(layer) for layer in lay]]
    if directions.dim() != 3 or directions.shape[0] != len(emotions):
        raise ValueError(f"{name} must be [emotion={len(emotions)}, layer, d_model], "
                         f"got {tuple(directions.shape)}")
    if directions.shape[2] != model.cfg.d_model:
        raise ValueError(f"{name} has width {directions.shape[2]}, the model's d_model is "
                         f"{model.cfg.d_model}")
    if directions.shape[1] == model.cfg.n_layers:
        d = directions[:, lay]
    elif directions.shape[1] == len(lay):
        d = directions
    else:
        raise ValueError(f"{name} has {directions.shape[1]} layers: expected all "
                         f"{model.cfg.n_layers} model layers or one per requested layer ({len(lay)})")
    return d.detach()


def _layer_dirs(model, directions: torch.Tensor | EmotionDirections, emotions: Sequence[str],
                lay: list[int], name: str, site: str = "resid_mid") -> Float[torch.Tensor, "emotion layer d_model"]:
    """``_select_layer_dirs``, unit (float32)."""
    d = _select_layer_dirs(model, directions, emotions, lay, name, site).float().cpu()
    return d / (d.norm(dim=-1, keepdim=True) + EPS)


def _emotion_rows(labels: list[str], emotions: Sequence[str]) -> dict[str, list[int]]:
    rows = {e: [i for i, lab in enumerate(labels) if lab == e] for e in emotions}
    empty = [e for e, r in rows.items() if not r]
    if empty:
        raise ValueError(f"no prompts labelled {empty} (labels present: {sorted(set(labels))})")
    return rows


def _top_rows(scores: torch.Tensor, layers: list[int], layer: int | None, k: int,
              largest: bool) -> list[tuple[int, int, float]]:
    """scores [layer, comp] -> top (layer, index, score) rows (within one layer or over all)."""
    if layer is not None:
        if layer not in layers:
            raise KeyError(f"layer {layer} not in the result (layers {layers})")
        row = scores[layers.index(layer)]
        idx = torch.topk(row, min(k, row.numel()), largest=largest).indices
        return [(layer, int(i), float(row[i])) for i in idx]
    flat = scores.flatten()
    idx = torch.topk(flat, min(k, flat.numel()), largest=largest).indices
    n = scores.shape[1]
    return [(layers[int(i) // n], int(i) % n, float(flat[i])) for i in idx]


# ----------------------------------------------------------------------------- neurons


@dataclass
class NeuronContributions(Result):
    """Per-emotion neuron contribution tables ``[emotion, layer, d_mlp]`` (module docstring)."""

    emotions: list[str]
    layers: list[int]
    C_mean: Float[torch.Tensor, "emotion layer d_mlp"]
    C_pos: Float[torch.Tensor, "emotion layer d_mlp"]
    C_neg: Float[torch.Tensor, "emotion layer d_mlp"]
    beta: Float[torch.Tensor, "emotion layer d_mlp"]
    H_mean: Float[torch.Tensor, "emotion layer d_mlp"]
    n_samples: dict[str, int] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def _e(self, emotion: str) -> int:
        if emotion not in self.emotions:
            raise KeyError(f"emotion {emotion!r} not in {self.emotions}")
        return self.emotions.index(emotion)

    def top(self, emotion: str, layer: int | None = None, k: int = 10,
            sign: Literal["promote", "suppress"] = "promote") -> list[tuple[int, int, float]]:
        """(layer, neuron, C_mean) rows: promoting = C_mean descending, suppressing = ascending."""
        if sign not in ("promote", "suppress"):
            raise ValueError(f"sign must be 'promote' or 'suppress', got {sign!r}")
        return _top_rows(self.C_mean[self._e(emotion)], self.layers, layer, k, sign == "promote")

    def to_dataframe(self):
        """One row per (emotion, model layer, neuron): ``score`` (= ``C_mean``, the contribution
        the top-k ranks by), then every table."""
        import pandas as pd

        E, L, N = self.C_mean.shape
        idx = torch.cartesian_prod(torch.arange(E), torch.arange(L), torch.arange(N))
        return pd.DataFrame({
            "emotion": [self.emotions[i] for i in idx[:, 0].tolist()],
            "layer": [self.layers[i] for i in idx[:, 1].tolist()],
            "neuron": idx[:, 2].numpy(),
            "score": self.C_mean.flatten().numpy(),
            "C_mean": self.C_mean.flatten().numpy(), "C_pos": self.C_pos.flatten().numpy(),
            "C_neg": self.C_neg.flatten().numpy(), "beta": self.beta.flatten().numpy(),
            "H_mean": self.H_mean.flatten().numpy(),
        })


def neuron_betas_from_weights(W_out: Float[torch.Tensor, "layer d_mlp d_model"],
                              v_post: Float[torch.Tensor, "*emotion layer d_model"]
                              ) -> Float[torch.Tensor, "*emotion layer d_mlp"]:
    """β[..., l, n] = (W_out[l] v̂[..., l])_n, v̂ = v / ‖v‖ (float64): the one definition of the
    neuron alignment β (the paper's), behind ``neuron_betas``, ``neuron_scores_from_acts`` and
    ``neuron_contributions``."""
    v = v_post.detach().double().cpu()
    v = v / (v.norm(dim=-1, keepdim=True) + EPS)
    return torch.einsum("lnd,...ld->...ln", W_out.detach().double().cpu(), v)


def neuron_scores_from_acts(mlp_post: Float[torch.Tensor, "n layer d_mlp"],
                            W_out: Float[torch.Tensor, "layer d_mlp d_model"],
                            v_post: Float[torch.Tensor, "layer d_model"]) -> Float[torch.Tensor, "layer d_mlp"]:
    """C_mean[l, n] = mean_x g_n(x) · β[l, n] from collected last-token ``mlp_post`` of one
    emotion's prompts (the paper's; equals ``neuron_contributions(...).C_mean`` of that emotion)."""
    return (mlp_post.double().mean(0) * neuron_betas_from_weights(W_out, v_post)).float()


def neuron_betas(model, directions: torch.Tensor | EmotionDirections, emotions: Sequence[str] | None = None,
                 layers: Sequence[int] | None = None) -> Float[torch.Tensor, "emotion layer d_mlp"]:
    """β_e^l = W_out^l · v̂_e^l (``neuron_betas_from_weights``; resid_post directions)."""
    emotions = _emotions_of(directions, emotions, "neuron_betas")
    lay = S.layers_of(model, layers)
    v = _select_layer_dirs(model, directions, emotions, lay, "directions", "resid_post")
    W = torch.stack([S.W_out(model, layer).detach() for layer in lay])  # [L, N, D]
    return neuron_betas_from_weights(W, v).float()


def neuron_contributions(model, prompts: Sequence[PromptLike], labels: Sequence[str] | None,
                         directions: Float[torch.Tensor, "emotion layer d_model"] | EmotionDirections,
                         emotions: Sequence[str] | None = None, *, layers: Sequence[int] | None = None,
                         batch_size: int = 16, progress: bool = True) -> NeuronContributions:
    """Neuron contribution tables (module docstring); ``directions`` = ``EmotionDirections``
    (its resid_post site; ``emotions`` default to its emotions) or a resid_post tensor
    [emotion, layer, d_model].

    ``labels[i]`` is prompt i's emotion (default: ``prompt.emotion``); prompts whose label is
    not in ``emotions`` are ignored; every emotion needs at least one prompt.

    Example::

        >>> nc = neuron_contributions(model, prompts, None, dirs)   # labels: prompt.emotion
        >>> nc.C_mean.shape                                         # [emotion, layer, d_mlp]
        torch.Size([2, 30, 1536])
        >>> layer, neuron, score = nc.top("anger", k=5)[0]          # the most promoting neuron
    """
    emotions = _emotions_of(directions, emotions, "neuron_contributions")
    labels = _labels(prompts, labels)
    lay = S.layers_of(model, layers)
    v = _select_layer_dirs(model, directions, emotions, lay, "directions", "resid_post")
    W = torch.stack([S.W_out(model, layer).detach() for layer in lay])  # [L, N, D]
    b = neuron_betas_from_weights(W, v)  # float64
    beta = b.float()
    rows = _emotion_rows(labels, emotions)
    keep = sorted(i for r in rows.values() for i in r)
    acts = collect(model, [prompts[i] for i in keep], "mlp_post", "last", layers=lay,
                   batch_size=batch_size, progress=progress)
    g = acts["mlp_post"].double()  # [n, L, N]
    pos = {i: j for j, i in enumerate(keep)}
    H, Gp, Gn = [], [], []
    for e in emotions:
        ge = g[[pos[i] for i in rows[e]]]
        H.append(ge.mean(0))
        Gp.append(ge.clamp(min=0).mean(0))
        Gn.append((-ge).clamp(min=0).mean(0))
    H_mean, G_pos, G_neg = torch.stack(H), torch.stack(Gp), torch.stack(Gn)
    C_mean = H_mean * b
    # max(gβ, 0) = β·max(g, 0) for β ≥ 0 and |β|·max(−g, 0) for β < 0 (likewise for max(−gβ, 0)).
    C_pos = torch.where(b >= 0, b * G_pos, -b * G_neg)
    C_neg = torch.where(b >= 0, b * G_neg, -b * G_pos)
    return NeuronContributions(list(emotions), lay, C_mean.float(), C_pos.float(), C_neg.float(),
                               beta, H_mean.float(), {e: len(rows[e]) for e in emotions},
                               {"position": "last", "direction_site": "resid_post"})


# ----------------------------------------------------------------------------- heads


@dataclass
class HeadImportance(Result):
    """``mean[emotion, layer, head]`` importance (paper sign: s(base) − s(ablated))."""

    emotions: list[str]
    layers: list[int]
    mean: Float[torch.Tensor, "emotion layer head"]
    std: Float[torch.Tensor, "emotion layer head"] | None = None
    baseline_mean: Float[torch.Tensor, "emotion layer"] | None = None
    n_samples: dict[str, int] = field(default_factory=dict)
    method: str = "ablation"
    meta: dict = field(default_factory=dict)

    def top(self, emotion: str, layer: int | None = None, k: int = 10,
            sign: Literal["promote", "suppress"] = "promote") -> list[tuple[int, int, float]]:
        """(layer, head, importance) rows, descending (``suppress``: ascending)."""
        if emotion not in self.emotions:
            raise KeyError(f"emotion {emotion!r} not in {self.emotions}")
        if sign not in ("promote", "suppress"):
            raise ValueError(f"sign must be 'promote' or 'suppress', got {sign!r}")
        return _top_rows(self.mean[self.emotions.index(emotion)], self.layers, layer, k,
                         sign == "promote")

    def to_dataframe(self):
        """One row per (emotion, model layer, head): ``score`` (= ``mean_importance``), then
        the std, baseline and sample count where known."""
        import pandas as pd

        rows = []
        for ei, e in enumerate(self.emotions):
            for li, layer in enumerate(self.layers):
                for h in range(self.mean.shape[2]):
                    r = {"emotion": e, "layer": layer, "head": h,
                         "score": float(self.mean[ei, li, h]),
                         "mean_importance": float(self.mean[ei, li, h])}
                    if self.std is not None:
                        r["std_importance"] = float(self.std[ei, li, h])
                    if self.baseline_mean is not None:
                        r["baseline_mean"] = float(self.baseline_mean[ei, li])
                    r["samples"] = self.n_samples.get(e, 0)
                    rows.append(r)
        return pd.DataFrame(rows)

    def plot(self, emotion: str | None = None):
        """Layer × head heatmap of the importance of one ``emotion`` (default: the mean over
        emotions), rows labelled by model layer: a Figure."""
        from .viz.figures import cosine_heatmap

        if emotion is not None and emotion not in self.emotions:
            raise KeyError(f"emotion {emotion!r} not in {self.emotions}")
        m = (self.mean[self.emotions.index(emotion)] if emotion is not None
             else self.mean.mean(0)).detach().double().cpu().numpy()
        lim = float(abs(m).max()) if m.size and float(abs(m).max()) > 0 else 1.0
        return cosine_heatmap(m, xlabels=[str(h) for h in range(m.shape[1])],
                              ylabels=[f"L{layer}" for layer in self.layers], vmin=-lim, vmax=lim,
                              cbar_label=f"importance ({self.method})", xlabel="head", ylabel="layer",
                              title=f"head importance: {emotion or 'mean over emotions'}")


def mlp_in_projection(model, layer: int, directions: torch.Tensor) -> Metric:
    """s_l = ⟨ln2 output at layer l, last token, v_row⟩ with ``directions`` [n_prompts, d]."""
    hook = S.hook_name(model, "mlp_in", layer)
    v = directions.float()

    def fn(logits, cache, rows):  # noqa: ARG001
        a = cache[hook][:, -1].float()
        return (a * v.to(a.device)[rows.to(a.device)]).sum(-1)

    return Metric(fn, (hook,), False, f"s_{layer}")


def head_ablation_importance(model, prompts: Sequence[PromptLike], labels: Sequence[str] | None,
                             directions_mid: Float[torch.Tensor, "emotion layer d_model"] | EmotionDirections,
                             emotions: Sequence[str] | None = None, *,
                             layers: Sequence[int] | None = None,
                             batch_size: int = 8, batched: bool = True,
                             progress: bool = True) -> HeadImportance:
    """The paper's exact head importance (module docstring); ``directions_mid`` =
    ``EmotionDirections`` (its resid_mid site) or a resid_mid tensor [emotion, layer, d_model].

    ``batched=False`` is the paper's loop: batch 1, one full forward per (prompt, layer, head)
    (the reference and the timing baseline).
    """
    emotions = _emotions_of(directions_mid, emotions, "head_ablation_importance")
    labels = _labels(prompts, labels)
    lay = S.layers_of(model, layers)
    v = _layer_dirs(model, directions_mid, emotions, lay, "directions_mid")  # [E, L, D]
    rows = _emotion_rows(labels, emotions)
    keep = sorted(i for r in rows.values() for i in r)
    texts = texts_of([prompts[i] for i in keep])
    emo_of = torch.tensor([list(emotions).index(labels[i]) for i in keep])
    H = model.cfg.n_heads
    n = len(texts)
    imp = torch.zeros(n, len(lay), H, dtype=torch.float64)
    base = torch.zeros(n, len(lay), dtype=torch.float64)
    bs = batch_size if batched else 1
    total = n * len(lay)
    bar = tqdm(total=total, desc="head ablation", disable=not progress, leave=False)
    with torch.no_grad():
        for s in range(0, n, bs):
            tb = tokenize(model, texts[s:s + bs])
            b = len(tb)
            ridx = torch.arange(s, s + b)
            for li, layer in enumerate(lay):
                metric = mlp_in_projection(model, layer, v[emo_of, li])
                zhook = S.hook_name(model, "z", layer)
                if batched:
                    def zero_heads(x, hook, b=b):  # noqa: ARG001
                        x = x.clone()
                        for h in range(H):
                            x[(h + 1) * b:(h + 2) * b, :, h, :] = 0
                        return x
                    m = forward_metric(model, tb, metric, ridx, [(zhook, zero_heads)], repeat=H + 1)
                    m = m.double().cpu().view(H + 1, b)
                    base[s:s + b, li] = m[0]
                    imp[s:s + b, li] = (m[0:1] - m[1:]).T
                else:
                    m0 = forward_metric(model, tb, metric, ridx, stop_early=False).double().cpu()
                    base[s:s + b, li] = m0
                    for h in range(H):
                        def zero_one(x, hook, h=h):  # noqa: ARG001
                            x = x.clone()
                            x[:, :, h, :] = 0
                            return x
                        mh = forward_metric(model, tb, metric, ridx, [(zhook, zero_one)],
                                      stop_early=False).double().cpu()
                        imp[s:s + b, li, h] = m0 - mh
                bar.update(b)
    bar.close()
    return _aggregate_heads(imp, base, keep, rows, emotions, lay,
                            "ablation" if batched else "ablation_loop",
                            {"readout": "same_layer", "ablation": "zero z, all positions"})


reference_direction = deprecated_alias(circuits_reference_direction, "components.reference_direction",
                                       "emocircuits.circuits.reference_direction")
"""Deprecated: ``circuits.reference_direction`` (it takes ``[emotion, layer, d_model]`` too)."""


def final_projection(model, v: torch.Tensor) -> Metric:
    """s = ⟨final_norm[last], v⟩ (``v`` [d] or [n_prompts, d])."""
    hook = S.hook_name(model, "final_norm")
    vv = v.float()

    def fn(logits, cache, rows):  # noqa: ARG001
        a = cache[hook][:, -1].float()
        d = vv.to(a.device)
        return a @ d if d.dim() == 1 else (a * d[rows.to(a.device)]).sum(-1)

    return Metric(fn, (hook,), False, "s_final")


def same_layer_readout_sum(model, layers: Sequence[int], v_layers: torch.Tensor) -> Metric:
    """Σ_l ⟨ln2_l[last], v_l⟩ over ``layers`` (``v_layers`` [L, d]); pair with cut hooks."""
    hooks = tuple(S.hook_name(model, "mlp_in", layer) for layer in layers)
    vv = v_layers.float()

    def fn(logits, cache, rows):  # noqa: ARG001
        return sum((cache[h][:, -1].float() * vv[i].to(cache[h].device)).sum(-1)
                   for i, h in enumerate(hooks))

    return Metric(fn, hooks, False, "sum_l s_l")


def head_attribution(model, prompts: Sequence[PromptLike], labels: Sequence[str] | None,
                     emotions: Sequence[str] | None = None, *,
                     readout: Literal["same_layer", "final", "logit"] = "same_layer",
                     directions_mid: torch.Tensor | EmotionDirections | None = None,
                     v_ref: torch.Tensor | None = None,
                     layers: Sequence[int] | None = None, batch_size: int = 8,
                     progress: bool = True) -> HeadImportance:
    """Attribution-patching estimate of head importance (paper sign), one backward per emotion.

    ``same_layer`` needs ``directions_mid`` (``EmotionDirections`` -> its resid_mid site, or a
    tensor [emotion, layer, d]); ``final`` needs ``v_ref`` [emotion, d] (default with
    ``EmotionDirections``: ``circuits.reference_direction(directions_mid)``); ``logit`` uses the
    emotion's word mass (``emotion_tokens``). ``emotions`` default to the directions' emotions.
    """
    if emotions is None:
        emotions = _emotions_of(directions_mid, emotions, "head_attribution")
    if readout == "final" and v_ref is None and isinstance(directions_mid, EmotionDirections):
        v_ref = torch.stack([circuits_reference_direction(directions_mid, emotion=e) for e in emotions])
    labels = _labels(prompts, labels)
    lay = S.layers_of(model, layers)
    rows = _emotion_rows(labels, emotions)
    if readout == "same_layer":
        if directions_mid is None:
            raise ValueError("readout='same_layer' needs directions_mid")
        v = _layer_dirs(model, directions_mid, emotions, lay, "directions_mid")
    elif readout == "final":
        if v_ref is None or v_ref.shape != (len(emotions), model.cfg.d_model):
            raise ValueError(f"readout='final' needs v_ref [emotion={len(emotions)}, d_model]")
    elif readout != "logit":
        raise ValueError(f"readout must be 'same_layer', 'final' or 'logit', got {readout!r}")
    means = []
    for ei, e in enumerate(emotions):
        ps = [prompts[i] for i in rows[e]]
        extra: list = []
        if readout == "same_layer":
            metric = same_layer_readout_sum(model, lay, v[ei])
            extra = cut_between_layers_hooks(model)
        elif readout == "final":
            metric = final_projection(model, v_ref[ei] / (v_ref[ei].norm() + EPS))  # type: ignore[index]
        else:
            metric = logit_readout_metric(model, e, emotions)
        r = attribution_patching(model, ps, metric, sites=("z",), layers=lay, extra_hooks=extra,
                                 batch_size=batch_size, progress=progress)["z"]
        means.append(-r.effect)
    return HeadImportance(list(emotions), lay, torch.stack(means), None, None,
                          {e: len(rows[e]) for e in emotions}, f"attribution:{readout}",
                          {"readout": readout})


def _aggregate_heads(imp: torch.Tensor, base: torch.Tensor, keep: list[int],
                     rows: dict[str, list[int]], emotions: Sequence[str], lay: list[int],
                     method: str, meta: dict | None = None) -> HeadImportance:
    """Per-emotion mean/std of per-prompt importance [n, layer, head] and baseline [n, layer]."""
    where = {i: k for k, i in enumerate(keep)}
    mean, std, bmean = [], [], []
    for e in emotions:
        sel = [where[i] for i in rows[e]]
        mean.append(imp[sel].mean(0))
        std.append(imp[sel].std(0, unbiased=False) if len(sel) > 1 else torch.zeros_like(imp[0]))
        bmean.append(base[sel].mean(0))
    return HeadImportance(list(emotions), lay, torch.stack(mean).float(), torch.stack(std).float(),
                          torch.stack(bmean).float(), {e: len(rows[e]) for e in emotions},
                          method, meta or {})


@torch.no_grad()
def head_ablation_scores_from_acts(
        model, resid_pre: Float[torch.Tensor, "n layer d_model"],
        attn_o_out: Float[torch.Tensor, "n layer d_model"],
        z: Float[torch.Tensor, "n layer head d_head"],
        v_mid: Float[torch.Tensor, "*n layer d_model"], *,
        layers: Sequence[int] | None = None) -> tuple[Float[torch.Tensor, "n layer head"],
                                                      Float[torch.Tensor, "n layer"]]:
    """The one head score (the paper's): exact same-layer zero-ablation importance
    I_{l,h}(x) = s_l(base) − s_l(head h zeroed), s_l = ⟨ln2(resid_mid_l)[last], v_mid_l⟩, from
    collected last-token ``resid_pre``, ``attn_o_out`` and ``z`` at ``layers`` (default all;
    the layer axis of every input). ``v_mid``: unit directions ``[layer, d]`` for every row or
    ``[n, layer, d]`` per row. Returns (importance [n, layer, head], s_l(base) [n, layer]),
    float64; see ``head_ablation_importance_closed_form`` for the derivation."""
    lay = S.layers_of(model, layers)
    n = resid_pre.shape[0]
    if v_mid.dim() == 2:
        v_mid = v_mid.unsqueeze(0).expand(n, -1, -1)
    dev = model.cfg.device
    imp = torch.zeros(n, len(lay), model.cfg.n_heads, dtype=torch.float64)
    base = torch.zeros(n, len(lay), dtype=torch.float64)
    for li, layer in enumerate(lay):
        blk = model.blocks[layer]
        pre = resid_pre[:, li].to(dev)
        o = attn_o_out[:, li].to(dev)
        heads = torch.einsum("nhk,hkd->nhd", z[:, li].to(dev), S.W_O(model, layer).float())
        o_all = torch.cat([o.unsqueeze(1), o.unsqueeze(1) - heads], 1)  # [n, 1+H, d]
        post = getattr(blk, "ln1_post", None)
        x = blk.ln2(pre.unsqueeze(1) + (post(o_all) if post is not None else o_all))
        sc = (x.double() * v_mid[:, li].to(dev).double().unsqueeze(1)).sum(-1).cpu()
        base[:, li] = sc[:, 0]
        imp[:, li] = sc[:, :1] - sc[:, 1:]
    return imp, base


@torch.no_grad()
def head_ablation_importance_closed_form(
        model, prompts: Sequence[PromptLike], labels: Sequence[str] | None,
        directions_mid: Float[torch.Tensor, "emotion layer d_model"] | EmotionDirections,
        emotions: Sequence[str] | None = None, *,
        layers: Sequence[int] | None = None, batch_size: int = 16,
        progress: bool = True) -> HeadImportance:
    """The paper's exact same-layer ablation score for every head from ONE forward per batch
    (``head_ablation_scores_from_acts`` on one collect of resid_pre, attn_o_out and z).

    Zeroing head h of layer l at all positions changes nothing upstream of layer l's attention
    output, and changes that output at the last token by exactly −z_h W_O[h]. So with
    a = attn_o_out[last] (before any post-attention norm) and r = resid_pre[last]:
    s_l(ablate h) = ⟨ln2(r + post(a − z_h W_O[h])), v⟩, s_l(base) = ⟨ln2(r + post(a)), v⟩,
    importance = s(base) − s(ablated) — equal to the batched ablation up to float error (test).
    """
    emotions = _emotions_of(directions_mid, emotions, "head_ablation_importance_closed_form")
    labels = _labels(prompts, labels)
    lay = S.layers_of(model, layers)
    v = _layer_dirs(model, directions_mid, emotions, lay, "directions_mid")
    rows = _emotion_rows(labels, emotions)
    keep = sorted(i for r in rows.values() for i in r)
    emo_of = torch.tensor([list(emotions).index(labels[i]) for i in keep])
    acts = collect(model, [prompts[i] for i in keep], ("resid_pre", "attn_o_out", "z"), "last",
                   layers=lay, batch_size=batch_size, progress=progress)
    imp, base = head_ablation_scores_from_acts(model, acts["resid_pre"], acts["attn_o_out"], acts["z"],
                                               v[emo_of], layers=lay)
    return _aggregate_heads(imp, base, keep, rows, emotions, lay, "ablation_closed_form",
                            {"readout": "same_layer", "ablation": "zero z, all positions (closed form)"})


def head_importance(model, prompts: Sequence[PromptLike], labels: Sequence[str] | None,
                    directions_mid: Float[torch.Tensor, "emotion layer d_model"] | EmotionDirections,
                    emotions: Sequence[str] | None = None, *,
                    method: Literal["ablation", "closed_form", "attribution", "loop"] = "ablation",
                    layers: Sequence[int] | None = None, batch_size: int = 8,
                    progress: bool = True) -> HeadImportance:
    """The paper's same-layer head importance by exact batched ablation, attribution or the loop.

    Example::

        >>> hi = head_importance(model, prompts, None, dirs)   # dirs' resid_mid; exact ablation
        >>> hi.mean.shape                                      # [emotion, layer, head]
        torch.Size([2, 30, 9])
        >>> hi.top("anger", k=3)                               # [(layer, head, importance), ...]
    """
    emotions = _emotions_of(directions_mid, emotions, "head_importance")
    if method == "ablation":
        return head_ablation_importance(model, prompts, labels, directions_mid, emotions, layers=layers,
                                        batch_size=batch_size, progress=progress)
    if method == "closed_form":
        return head_ablation_importance_closed_form(model, prompts, labels, directions_mid,
                                                    emotions, layers=layers, batch_size=batch_size,
                                                    progress=progress)
    if method == "loop":
        return head_ablation_importance(model, prompts, labels, directions_mid, emotions, layers=layers,
                                        batched=False, progress=progress)
    if method == "attribution":
        return head_attribution(model, prompts, labels, emotions, readout="same_layer",
                                directions_mid=directions_mid, layers=layers,
                                batch_size=batch_size, progress=progress)
    raise ValueError("method must be 'ablation', 'closed_form', 'attribution' or 'loop', "
                     f"got {method!r}")


def rank_agreement(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Spearman ρ between two score tables (flattened) and the overlap of their top-k sets."""
    from scipy.stats import spearmanr

    if a.shape != b.shape:
        raise ValueError(f"score tables differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    k = min(k, a.numel())
    x, y = a.flatten().double().numpy(), b.flatten().double().numpy()
    rho = float(spearmanr(x, y).statistic)
    ta = set(torch.topk(a.flatten(), k).indices.tolist())
    tb = set(torch.topk(b.flatten(), k).indices.tolist())
    return {"spearman": rho, f"top{k}_overlap": len(ta & tb) / k}


def pairwise_jaccard(tops: dict[str, Sequence]) -> dict:
    """Jaccard overlap of every pair of emotions' top-component sets (``{emotion: [(layer,
    index), ...]}``, extra columns such as scores ignored): ``{"pairs": {"a-b": J}, "mean": J̄}``."""
    from itertools import combinations

    keys = {e: [tuple(int(x) for x in r[:2]) for r in rows] for e, rows in tops.items()}
    pairs = {f"{a}-{b}": jaccard(keys[a], keys[b]) for a, b in combinations(list(keys), 2)}
    return {"pairs": pairs, "mean": sum(pairs.values()) / len(pairs) if pairs else float("nan")}


# ----------------------------------------------------------------------------- sweeps


def difference_vectors(model, prompts: Sequence[PromptLike], emotions: Sequence[str],
                       site: Literal["mlp_post", "z"], layers: Sequence[int] | None = None,
                       batch_size: int = 16, progress: bool = True
                       ) -> Float[torch.Tensor, "emotion layer ..."]:
    """Deprecated: ``circuits.delta_mu(collect(model, prompts, site, layers=...)[site], prompts,
    emotions)[0]`` (or ``circuits.difference_vectors`` for both sites) — Δμ_e^l of ``site`` at
    the last token, [emotion, layer, *width]."""
    warn_deprecated("components.difference_vectors", "emocircuits.circuits.delta_mu (one site) or "
                    "circuits.difference_vectors (mlp_post and z)", stacklevel=3)
    acts = collect(model, prompts, site, "last", layers=layers, batch_size=batch_size,
                   progress=progress)
    return delta_mu(acts[site], prompts, emotions)[0]  # type: ignore[arg-type]


@dataclass
class ComponentSweep(Result):
    """Δs vs k for the top-k components and random k-sets (mean ± std over seeds)."""

    emotion: str
    kind: str
    mode: str
    ks: list[int]
    metrics: list[str]  # names of the score columns
    baseline: Float[torch.Tensor, "metric"]
    top: Float[torch.Tensor, "k metric"]
    random_mean: Float[torch.Tensor, "k metric"]
    random_std: Float[torch.Tensor, "k metric"]
    random_all: Float[torch.Tensor, "seed k metric"]
    meta: dict = field(default_factory=dict)

    def to_dataframe(self):
        import pandas as pd

        rows = []
        for i, k in enumerate(self.ks):
            for j, m in enumerate(self.metrics):
                rows.append({"emotion": self.emotion, "kind": self.kind, "mode": self.mode,
                             "k": k, "metric": m, "top": float(self.top[i, j]),
                             "random_mean": float(self.random_mean[i, j]),
                             "random_std": float(self.random_std[i, j]),
                             "baseline": float(self.baseline[j])})
        return pd.DataFrame(rows)

    def plot(self, metric: str | None = None):
        """Δs vs k: the top-k components against random k-sets (mean), per metric (or the one
        ``metric``): a Figure."""
        from .viz.figures import sweep_curves

        names = [metric] if metric is not None else list(self.metrics)
        for m in names:
            if m not in self.metrics:
                raise KeyError(f"metric {m!r} not in {self.metrics}")
        series = {}
        for m in names:
            j = self.metrics.index(m)
            series[f"top-k {m}"] = self.top[:, j]
            series[f"random {m}"] = self.random_mean[:, j]
        return sweep_curves(self.ks, series, xlabel="k", ylabel="Δ score vs baseline", ylim=None,
                            title=f"{self.emotion}: {self.mode} {self.kind}")

    def to_dict(self) -> dict:
        return {"emotion": self.emotion, "kind": self.kind, "mode": self.mode, "ks": self.ks,
                "metrics": self.metrics, "baseline": self.baseline.tolist(),
                "top": self.top.tolist(), "random_mean": self.random_mean.tolist(),
                "random_std": self.random_std.tolist(), "random_all": self.random_all.tolist(),
                "meta": self.meta}


SweepResult = ComponentSweep
"""The old name of ``ComponentSweep`` (result type names are unique across the library)."""


def _emotion_score_metric(model, emotion: str, emotions, v_ref: torch.Tensor | None) -> Metric:
    """[b, 2]: (s_final = ⟨final_norm[last], v_ref⟩ or NaN, s_logit = log word mass)."""
    logit = logit_readout_metric(model, emotion, emotions)
    hook = S.hook_name(model, "final_norm")

    def fn(logits, cache, rows):
        lm = logit.fn(logits, cache, rows)
        if v_ref is None:
            sf = torch.full_like(lm, float("nan"))
        else:
            sf = cache[hook][:, -1].float() @ v_ref.float().to(logits.device)
        return torch.stack([sf, lm], -1)

    return Metric(fn, (hook,), True, "emotion_score")


def sweep_interventions(comps: Sequence[tuple[int, int]], kind: str, mode: str,
                        delta_mu: torch.Tensor | None, strength: float,
                        positions: str) -> list[Intervention]:
    """The ``Intervention``s of one sweep step: per layer, zero (``ablate``) or shift by
    strength·Δμ (``enhance``) the components ``comps`` = [(layer, index), ...] — neurons of
    ``mlp_post`` or heads of ``z`` — at ``positions``."""
    by_layer: dict[int, list[int]] = {}
    for layer, idx in comps:
        by_layer.setdefault(int(layer), []).append(int(idx))
    site = "mlp_post" if kind == "neuron" else "z"
    ivs = []
    for layer, idxs in by_layer.items():
        ix = torch.tensor(idxs)
        if mode == "ablate":
            ivs.append(Intervention(site, layer, "zero", units=ix, positions=positions))
        else:
            ivs.append(Intervention(site, layer, "shift", units=ix, value=delta_mu[layer][ix],  # type: ignore[index]
                                    strength=float(strength), positions=positions))
    return ivs


def _intervention_hooks(model, comps: Sequence[tuple[int, int]], kind: str, mode: str,
                        delta_mu: torch.Tensor | None, strength: float, positions: str) -> list:
    return intervention_hooks(model, sweep_interventions(comps, kind, mode, delta_mu, strength, positions))


@torch.no_grad()
def _scores(model, texts: list[str], metric: Metric, hooks: list, batch_size: int) -> torch.Tensor:
    out = []
    for s in range(0, len(texts), batch_size):
        tb = tokenize(model, texts[s:s + batch_size])
        out.append(forward_metric(model, tb, metric, torch.arange(s, s + len(tb)), hooks).double().cpu())
    return torch.cat(out)


def _fresh_past(cache):
    """A view of ``cache`` that one more forward may extend: plain dynamic layers are cropped
    back by the one position the last forward appended (cheap); any other cache type is
    deep-copied per step (sliding windows cannot always be rolled back)."""
    layers = getattr(cache, "layers", None)
    if layers is not None and all(type(x).__name__ == "DynamicLayer" for x in layers):
        n0 = getattr(cache, "_emocircuits_len", None)
        if n0 is None:
            cache._emocircuits_len = cache.get_seq_length()
        elif cache.get_seq_length() > n0:
            cache.crop(n0 - cache.get_seq_length())
        return cache
    return copy.deepcopy(cache)


@torch.no_grad()
def _step_sums(model, texts: list[str], metric: Metric, step_hooks: list[list], batch_size: int, *,
               prefix: bool, desc: str = "sweep", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over prompts of the metric under each step's hooks ``[step, *m]`` and unhooked ``[*m]``.

    ``prefix=True`` (the hooks touch the last position only): per batch, the prompt minus its
    last token runs once into a KV cache; the unhooked and every hooked step then run the last
    token alone on that cache, which is cropped back after each step. Positions before the last
    cannot change under last-token interventions, so this equals the full forwards (tested) at
    ~1/T of their cost. ``prefix=False``: one full forward per step and batch."""
    sums: torch.Tensor | None = None
    base_sum: torch.Tensor | None = None
    n_b = math.ceil(len(texts) / batch_size)
    bar = tqdm(total=n_b * (1 + len(step_hooks)), desc=desc, disable=not progress, leave=False)
    try:
        for s0 in range(0, len(texts), batch_size):
            tb = tokenize(model, texts[s0:s0 + batch_size])
            rows = torch.arange(s0, s0 + len(tb))
            if prefix and int(tb.lengths.min()) >= 2:
                _, cache = model(tb.tokens[:, :-1], attention_mask=tb.attention_mask[:, :-1],
                                 return_type="logits_and_cache", use_cache=True, logits_to_keep=1)

                def run(hooks, tb=tb, cache=cache, rows=rows):
                    return forward_metric(model, tb, metric, rows, hooks,
                                          past=_fresh_past(cache)).double().cpu()
            else:
                def run(hooks, tb=tb, rows=rows):
                    return forward_metric(model, tb, metric, rows, hooks).double().cpu()
            b = run([]).sum(0)
            base_sum = b if base_sum is None else base_sum + b
            bar.update(1)
            vals = []
            for hooks in step_hooks:
                vals.append(run(hooks).sum(0))
                bar.update(1)
            v = torch.stack(vals) if vals else torch.zeros(0, *b.shape, dtype=torch.float64)
            sums = v if sums is None else sums + v
    finally:
        bar.close()
    assert sums is not None and base_sum is not None
    return sums, base_sum


def component_sweep(model, prompts: Sequence[PromptLike], emotion: str,
                    ranking: Sequence[Sequence], kind: Literal["neuron", "head"] = "neuron",
                    ks: Sequence[int] = (1, 2, 4, 8, 16, 32),
                    mode: Literal["ablate", "enhance"] = "ablate", *,
                    delta_mu: torch.Tensor | None = None, strength: float = 1.0, n_random: int = 3,
                    seed: int = 0, v_ref: torch.Tensor | None = None,
                    emotions: Sequence[str] | None = None, layers: Sequence[int] | None = None,
                    batch_size: int = 16, progress: bool = True,
                    lam: float | None = None) -> ComponentSweep:
    """Top-k vs random-k ablation/enhancement curves (paper Sec. 6). The authors released no
    code for it (a known flaw), so the emotion score below and the default ``ks`` are this
    project's choices.

    Emotion score, per prompt, at the last prompt token: s_final = ⟨final_norm[last], v_ref,e⟩
    (NaN without ``v_ref``) and s_logit = log Σ_{t∈T_e} p(t) (the emotion's next-token word
    mass). Reported: mean over prompts of Δs = s(intervened) − s(base).

    ``ranking``: rows (layer, index, ...) best first (e.g. ``.top(emotion, k=max(ks))``).
    Neurons are intervened at the last token, heads at every position; ``ablate`` zeroes them,
    ``enhance`` adds λ·Δμ, λ = ``strength`` (``lam=``: deprecated name; ``delta_mu``: this
    emotion's [layer, d_mlp] for neurons, [layer, head, d_head] for heads, from
    ``circuits.difference_vectors``). The interventions are ``sweep_interventions``. Random
    controls draw k components uniformly from all components of ``layers`` (default: every
    layer) except the top max(ks), with seeds seed, seed+1, ...
    """
    strength = renamed_keyword("component_sweep", "lam", "strength", lam, strength, 1.0)
    if kind not in ("neuron", "head"):
        raise ValueError(f"kind must be 'neuron' or 'head', got {kind!r}")
    if mode not in ("ablate", "enhance"):
        raise ValueError(f"mode must be 'ablate' or 'enhance', got {mode!r}")
    ks = sorted(int(k) for k in ks)
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive, got {ks}")
    if len(ranking) < ks[-1]:
        raise ValueError(f"ranking has {len(ranking)} components, fewer than max k = {ks[-1]}")
    width = model.cfg.d_mlp if kind == "neuron" else model.cfg.n_heads
    comps = [(S.check_layer(model, int(r[0])), int(r[1])) for r in ranking]
    for layer, idx in comps:
        if not 0 <= idx < width:
            raise IndexError(f"{kind} {idx} out of range (0..{width - 1}) at layer {layer}")
    if mode == "enhance":
        want = (model.cfg.n_layers, model.cfg.d_mlp) if kind == "neuron" else \
            (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
        if delta_mu is None or tuple(delta_mu.shape) != want:
            raise ValueError(f"mode='enhance' needs delta_mu of shape {want} (this emotion's Δμ "
                             f"over all layers), got {None if delta_mu is None else tuple(delta_mu.shape)}")
    texts = texts_of(prompts)
    if not texts:
        raise ValueError("component_sweep: no prompts")
    if v_ref is not None:
        v_ref = v_ref.float() / (v_ref.float().norm() + EPS)
    metric = _emotion_score_metric(model, emotion, emotions, v_ref)
    position = "last" if kind == "neuron" else "all"
    top_set = set(comps[:ks[-1]])
    pool = [(layer, i) for layer in S.layers_of(model, layers) for i in range(width)
            if (layer, i) not in top_set]
    # every step's components, drawn in a fixed order (top k..., then random r × k...)
    steps: list[list[tuple[int, int]]] = [comps[:k] for k in ks]
    for r in range(n_random):
        rng = random.Random(seed + r)
        steps += [rng.sample(pool, min(k, len(pool))) for k in ks]
    t0 = time.perf_counter()
    step_hooks = [_intervention_hooks(model, c, kind, mode, delta_mu, strength, position) for c in steps]
    sums, base_sum = _step_sums(model, texts, metric, step_hooks, batch_size, prefix=position == "last",
                                desc=f"sweep {kind} {mode}", progress=progress)
    base = base_sum / len(texts)
    eff = sums / len(texts) - base
    top = list(eff[:len(ks)])
    rand = eff[len(ks):].view(n_random, len(ks), 2) if n_random else torch.zeros(0, len(ks), 2, dtype=torch.float64)
    std = rand.std(0, unbiased=False) if n_random > 1 else torch.zeros(len(ks), 2)
    return ComponentSweep(emotion, kind, mode, ks, ["s_final", "s_logit"], base.float(),
                       torch.stack(top).float(), rand.mean(0).float(), std.float(), rand.float(),
                       {"strength": strength, "lam": strength, "n_prompts": len(texts), "n_random": n_random, "seed": seed,
                        "seconds": time.perf_counter() - t0,
                        "position": "last" if kind == "neuron" else "all",
                        "reuse": ("prompt prefix KV-cached once per batch; each step reruns the last token"
                                  if position == "last" else "none (heads are intervened at every position)")})
