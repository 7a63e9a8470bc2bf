"""Emotion directions from implicit-emotion stories (the method of Sofroniew et al. 2026,
"Emotion Concepts and their Function in a Large Language Model"), and their valence–arousal
geometry.

Directions (per site and model layer ``l``):

1. story means: for story ``s`` with tokens ``0..n_s−1`` (index 0 is the BOS the library's
   ``encode`` puts first), ``m_s = mean_{t = t0..n_s−1} h_{s,t}`` with ``t0 = min(from_token,
   n_s − 1)`` (a story too short for ``from_token`` contributes its last token only);
2. emotion means: ``c_e = mean_{s ∈ e} m_s``;
3. centring over emotions: ``u_e = c_e − (1/|E|) Σ_e' c_e'``;
4. denoising: PCA of the neutral texts' story means ``{m_j}`` (centred on their mean); ``U``
   = the top ``k`` principal axes, ``k`` the fewest whose eigenvalues sum to at least
   ``denoise_share`` of the total neutral variance; ``u_e ← u_e − U Uᵀ u_e``;
5. ``v_e = u_e / ‖u_e‖``.

``story_directions`` returns an ``EmotionDirections`` (``vectors[site]``: unit
``[emotion, layer, d_model]``) that ``steer``, ``components`` and ``circuits`` accept like any
other. The steps are also exposed as pure tensor functions: ``token_means``,
``centre_over_emotions``, ``neutral_subspace`` (with ``components_for_share``) and
``project_out``; ``story_token_means`` runs the model (``collect`` with ``position="all"``,
batched by token length) and gives the story means ``m_s``.

``from_token`` defaults to 10 (``DEFAULT_FROM_TOKEN``): the BOS (an attention sink whose
residual norm is an outlier in many models) and the first ~9 words of the opening sentence,
where the situation is still being set up, are left out, and every story of the builtin corpus
(17–61 tokens with the SmolLM2 tokenizer, median 45) keeps at least 7 averaged tokens.

Geometry (``va_geometry`` → ``VAGeometry``): per layer, PCA of the emotions' vectors (rows
centred over emotions), the share of variance of each PC, and Pearson r of the PC1 scores
with human valence and of the PC2 scores with human arousal (``HUMAN_VA``, Warriner et al.
2013; r is invariant to the rating scale). PCA signs are arbitrary: every PC is *oriented so
that its r is ≥ 0* (the stored scores are the oriented ones), so r = |r| and the p-values are
two-sided: p = P(|r_perm| ≥ |r|) over permutations of the ratings among the emotions, exact
when |E|! ≤ ``n_permutations`` (every permutation, identity included), otherwise seeded Monte
Carlo with the +1 correction ((1 + #{|r_perm| ≥ |r|}) / (n + 1)). The best layer's p is
optimistic (a layer was chosen); ``p_valence_best`` / ``p_arousal_best`` correct for that by
comparing with the maximum over layers of each permutation's |r|.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from . import sites as S
from .activations import collect, prompts_hash
from .data.stories import STORY_EMOTIONS, human_va_unit
from .directions import EmotionDirections, direction_tensor
from .emotions import NEUTRAL
from .progress import tqdm
from .prompts import encode
from .results import Result

__all__ = [
    "DEFAULT_DENOISE_SHARE",
    "DEFAULT_FROM_TOKEN",
    "LITERATURE_VA",
    "METHOD",
    "VAGeometry",
    "centre_over_emotions",
    "components_for_share",
    "neutral_subspace",
    "project_out",
    "story_directions",
    "story_token_means",
    "token_means",
    "va_geometry",
    "va_scatter",
]

METHOD = "story_mean"
DEFAULT_FROM_TOKEN = 10
DEFAULT_DENOISE_SHARE = 0.5
EPS = 1e-12
_SHARE_TOL = 1e-10  # a cumulative share this close below the target counts as reaching it

LITERATURE_VA: tuple[tuple[str, float, str], ...] = (
    ("valence", 0.81, "Sofroniew et al. 2026 (Claude Sonnet 4.5)"),
    ("valence", 0.76, "open-model replication (2026), lower"),
    ("valence", 0.83, "open-model replication (2026), upper"),
    ("arousal", 0.66, "Sofroniew et al. 2026"),
)
"""Reference correlations drawn as horizontal lines by ``VAGeometry.plot``: (axis, r, source).
PC1–valence 0.81 (Sofroniew et al. 2026) and 0.76 / 0.83 (peak PC1–valence of two open-weight
models in the replication "Where Do Models Find Happiness? Emotion Vectors in Open-Source LLMs",
arXiv 2606.26987); PC2–arousal 0.66."""


# ============================================================================ tensor pieces


def token_means(
    acts_all: Float[torch.Tensor, "n layer pos *width"],
    lengths: torch.Tensor | Sequence[int],
    from_token: int = DEFAULT_FROM_TOKEN,
    *,
    pos_dim: int = 2,
) -> Float[torch.Tensor, "n layer *width"]:
    """Mean over each row's tokens ``t0..len−1`` with ``t0 = min(from_token, len − 1)``
    (float64; the position axis ``pos_dim`` is removed).

    ``acts_all`` is left-aligned as ``collect(..., position="all")`` returns it: row ``i``
    holds its ``lengths[i]`` real tokens at positions ``0..lengths[i]−1``; what lies after
    them (padding) is never read, even if it is NaN. A row shorter than ``from_token + 1``
    gives its last token.

    Example::

        >>> acts = collect(model, texts, "resid_post", position="all")
        >>> token_means(acts["resid_post"], acts.lengths, 10).shape    # [text, layer, d_model]
    """
    if isinstance(from_token, bool) or not isinstance(from_token, (int, np.integer)) or from_token < 0:
        raise ValueError(f"token_means: from_token must be an int >= 0, got {from_token!r}")
    x = acts_all
    if pos_dim < 0:
        pos_dim += x.dim()
    if not 0 < pos_dim < x.dim():
        raise ValueError(f"token_means: pos_dim {pos_dim} is not a position axis of shape {tuple(x.shape)}")
    n, width = x.shape[0], x.shape[pos_dim]
    lens = torch.as_tensor(lengths).long().cpu().reshape(-1)
    if lens.shape[0] != n:
        raise ValueError(f"token_means: {lens.shape[0]} lengths for {n} rows")
    if n and (int(lens.min()) < 1 or int(lens.max()) > width):
        raise ValueError(f"token_means: lengths must lie in [1, {width}] (the position axis), "
                         f"got min {int(lens.min())}, max {int(lens.max())}")
    start = torch.clamp(torch.full_like(lens, int(from_token)), max=lens - 1)
    pos = torch.arange(width)
    keep = (pos[None] >= start[:, None]) & (pos[None] < lens[:, None])  # [n, pos]
    shape = [1] * x.dim()
    shape[0], shape[pos_dim] = n, width
    keep = keep.view(shape).to(x.device)
    xs = torch.where(keep, x.double(), torch.zeros((), dtype=torch.float64, device=x.device))
    count = (lens - start).double().to(x.device).view([n] + [1] * (x.dim() - 2))
    return xs.sum(pos_dim) / count


def centre_over_emotions(means: Float[torch.Tensor, "emotion *feat"]) -> Float[torch.Tensor, "emotion *feat"]:
    """``u_e = c_e − (1/|E|) Σ_e' c_e'``: each emotion's vector minus the mean over emotions
    (axis 0); the rows then sum to zero."""
    if means.dim() < 1 or means.shape[0] < 1:
        raise ValueError(f"centre_over_emotions: need [emotion, ...], got shape {tuple(means.shape)}")
    return means - means.mean(0, keepdim=True)


def components_for_share(eigenvalues: torch.Tensor | Sequence[float], share: float) -> int:
    """The fewest leading components (eigenvalues sorted in decreasing order) whose sum is at
    least ``share`` of the total: 0 for ``share = 0`` or zero total variance; components with
    zero variance are never counted."""
    share = _check_share(share)
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).reshape(-1).clamp_min(0)
    total = float(lam.sum())
    if share == 0 or total <= 0:
        return 0
    cum = torch.cumsum(lam, 0) / total
    k = int((cum < share - _SHARE_TOL).sum()) + 1
    return min(k, int((lam > 0).sum()))


def neutral_subspace(
    neutral_acts: Float[torch.Tensor, "n d"],
    share: float = DEFAULT_DENOISE_SHARE,
    *,
    return_eigenvalues: bool = False,
) -> Float[torch.Tensor, "d k"] | tuple[torch.Tensor, torch.Tensor]:
    """``U`` ``[d, k]`` (orthonormal columns, float64): the top principal axes of the neutral
    texts' vectors (rows centred on their mean), ``k = components_for_share(λ, share)``.

    With ``return_eigenvalues``: ``(U, λ)``, λ the PCA eigenvalues (squared singular values of
    the centred rows; the 1/(n−1) factor does not change the shares), largest first."""
    x = torch.as_tensor(neutral_acts)
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"neutral_subspace: need [n >= 1, d] neutral vectors, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("neutral_subspace: neutral activations contain NaN/inf")
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    lam = s ** 2
    k = components_for_share(lam, share)
    u = vh[:k].T.contiguous()
    return (u, lam) if return_eigenvalues else u


def project_out(v: Float[torch.Tensor, "... d"], U: Float[torch.Tensor, "d k"]) -> Float[torch.Tensor, "... d"]:
    """``v − U Uᵀ v`` for every vector of ``v`` (last axis d; ``U`` with orthonormal columns),
    in float64, returned in ``v``'s dtype. ``k = 0`` gives ``v`` unchanged."""
    if U.dim() != 2 or U.shape[0] != v.shape[-1]:
        raise ValueError(f"project_out: U must be [d={v.shape[-1]}, k], got {tuple(U.shape)}")
    if U.shape[1] == 0:
        return v.clone()
    vd, ud = v.double(), U.double().to(v.device)
    return (vd - (vd @ ud) @ ud.T).to(v.dtype)


def _check_share(share: float) -> float:
    s = float(share)
    if not (math.isfinite(s) and 0.0 <= s <= 1.0):
        raise ValueError(f"denoise share must be in [0, 1], got {share!r}")
    return s


# ============================================================================ running the model


def _text_of(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping):
        return str(item["text"])
    return str(item.text)


def _field(item: Any, name: str, default: Any = None) -> Any:
    if isinstance(item, Mapping):
        return item.get(name, default)
    return getattr(item, name, default)


@torch.no_grad()
def story_token_means(
    model,
    texts: Sequence[Any],
    sites: Sequence[str] | str = ("resid_post",),
    *,
    layers: Sequence[int] | None = None,
    from_token: int = DEFAULT_FROM_TOKEN,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "story means",
) -> tuple[dict[str, Float[torch.Tensor, "n layer d"]], list[int], torch.Tensor]:
    """``({site: [n, layer, *width] float64 story means}, model layers, token lengths [n])``
    (width ``d`` of a vector site; ``head, d_head`` for ``z``).

    ``texts``: strings, ``Story`` objects or mappings with a ``text``. The texts are grouped by
    token length into batches of ``batch_size``; each batch is one ``collect(...,
    position="all")`` call whose left-aligned activations are averaged by ``token_means`` and
    dropped (memory: one batch's ``[b, layer, max_len, d]`` at a time); rows come back in
    input order. Every site must be a per-layer vector site (``resid_*``, ``attn_out``,
    ``mlp_out``, ``mlp_post``, ...) or ``z``, collected at the same layers."""
    strs = [_text_of(t) for t in texts]
    if not strs:
        raise ValueError("story_token_means: no texts")
    if isinstance(sites, str):
        sites = [sites]
    sites = [S.check_site(s) for s in sites]
    for s in sites:
        if s not in S.PER_LAYER or (len(S.site_width(model, s)) != 1 and s != "z"):
            raise ValueError(f"story_token_means: site {s!r} is not a per-layer vector site or z "
                             "(use resid_pre/resid_mid/resid_post/attn_out/mlp_out/mlp_post/z)")
    if batch_size < 1:
        raise ValueError(f"story_token_means: batch_size must be >= 1, got {batch_size}")
    lens = [len(encode(model, t)) for t in strs]
    order = sorted(range(len(strs)), key=lambda i: (lens[i], i))
    out: dict[str, torch.Tensor] = {}
    got_layers: list[int] | None = None
    lengths = torch.zeros(len(strs), dtype=torch.long)
    bar = tqdm(total=len(strs), desc=desc, disable=not progress, leave=False)
    try:
        for b in range(0, len(order), batch_size):
            rows = order[b:b + batch_size]
            acts = collect(model, [strs[i] for i in rows], list(sites), "all", layers=layers,
                           batch_size=len(rows), sort_by_length=False, progress=False)
            if got_layers is None:
                lay = [list(acts.layers[s]) for s in sites]
                if any(x != lay[0] for x in lay):
                    raise ValueError(f"story_token_means: sites {sites} were collected at different layers")
                got_layers = lay[0]
            idx = torch.tensor(rows)
            lengths[idx] = acts.lengths.long()
            for s in sites:
                m = token_means(acts[s], acts.lengths, from_token)
                if s not in out:
                    out[s] = torch.empty(len(strs), *m.shape[1:], dtype=torch.float64)
                out[s][idx] = m
            bar.update(len(rows))
    finally:
        bar.close()
    for s, v in out.items():
        if not torch.isfinite(v).all():
            bad = (~torch.isfinite(v.reshape(v.shape[0], -1))).any(1).nonzero()[:5, 0].tolist()
            raise ValueError(f"story_token_means: activations at {s!r} contain NaN/inf (texts {bad}...)")
    return out, list(got_layers or []), lengths


@dataclass
class StoryDifferenceVectors(Result):
    """Δμ from stories at the circuit's intervention points (``story_difference_vectors``):
    ``difference`` a ``circuits.DifferenceVectors`` (``mlp`` [emotion, layer, d_mlp], ``z``
    [emotion, layer, head, d_head]); ``mlp_means`` the un-centred per-emotion means of
    ``mlp_post`` (C_mean of the neuron scores is ``mlp_means[e] · β_e``)."""

    emotions: list[str]
    difference: Any  # circuits.DifferenceVectors
    mlp_means: Float[torch.Tensor, "emotion layer d_mlp"]
    n_stories: dict = field(default_factory=dict)
    from_token: int = DEFAULT_FROM_TOKEN


def story_difference_vectors(model, stories: Sequence[Any], emotions: Sequence[str] | None = None, *,
                             from_token: int = DEFAULT_FROM_TOKEN, batch_size: int = 16,
                             progress: bool = True) -> StoryDifferenceVectors:
    """Δμ_e = c_e − (1/|E|) Σ_e' c_e' at ``mlp_post`` and ``z``, with c_e the mean over emotion
    e's stories of each story's token mean from ``from_token`` (``token_means``): the circuit
    modulation's difference vectors read from stories that never name the emotion, beside the
    paper's ``circuits.delta_mu`` (last token of prompts that do). Float32 results."""
    from .circuits import DifferenceVectors

    stories, labels, emos, keep = _labelled(stories, emotions, "story_difference_vectors")
    means, _, _ = story_token_means(model, [stories[i] for i in keep], ("mlp_post", "z"), from_token=from_token,
                                    batch_size=batch_size, progress=progress, desc="story Δμ")
    y = torch.tensor([emos.index(labels[i]) for i in keep])
    per = {s: torch.stack([means[s][y == k].mean(0) for k in range(len(emos))]) for s in means}
    diff = DifferenceVectors(list(emos), centre_over_emotions(per["mlp_post"]).float(),
                             centre_over_emotions(per["z"]).float())
    return StoryDifferenceVectors(list(emos), diff, per["mlp_post"].float(),
                                  {e: int((y == k).sum()) for k, e in enumerate(emos)}, int(from_token))


def _labelled(stories: Sequence[Any], emotions: Sequence[str] | None, who: str):
    """``(stories, labels, emotions, rows of those emotions)``; at least two emotions."""
    stories = list(stories)
    labels = [str(_field(s, "emotion", "")) for s in stories]
    emos = _emotion_order([e for e in labels if e and e != NEUTRAL], emotions)
    if len(emos) < 2:
        raise ValueError(f"{who}: need at least 2 emotions to centre over, got {emos}")
    return stories, labels, emos, [i for i, e in enumerate(labels) if e in emos]


def _emotion_order(found: Sequence[str], emotions: Sequence[str] | None) -> list[str]:
    if emotions is not None:
        emos = [emotions] if isinstance(emotions, str) else list(emotions)
        if NEUTRAL in emos:
            raise ValueError("story_directions: 'neutral' is the denoising set, not an emotion "
                             "(pass neutral texts as neutral=)")
        if len(set(emos)) != len(emos):
            raise ValueError(f"story_directions: repeated emotions in {emos}")
        missing = [e for e in emos if e not in found]
        if missing:
            raise ValueError(f"story_directions: no stories for emotions {missing}")
        return emos
    present = set(found)
    known = [e for e in STORY_EMOTIONS if e in present]
    return known + [e for e in dict.fromkeys(found) if e not in STORY_EMOTIONS]


def story_directions(
    model,
    stories: Sequence[Any],
    *,
    sites: Sequence[str] | str = ("resid_post",),
    layers: Sequence[int] | None = None,
    from_token: int = DEFAULT_FROM_TOKEN,
    neutral: Sequence[Any] | None = None,
    denoise_share: float = DEFAULT_DENOISE_SHARE,
    emotions: Sequence[str] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> EmotionDirections:
    """Unit emotion directions from implicit-emotion stories (module docstring, steps 1–5).

    ``stories``: ``Story`` objects (``load_stories()``) or anything with ``text`` and
    ``emotion`` (and optionally ``id``; mappings too). ``emotions``: which emotions and in
    which order (default: every non-neutral emotion of ``stories``, in ``STORY_EMOTIONS``
    order, others after in order of appearance); stories of other emotions are ignored.
    ``neutral``: the texts (strings or stories) whose principal axes are projected out;
    ``None`` (default) uses the stories whose emotion is ``"neutral"``, ``[]`` (or
    ``denoise_share=0``) turns denoising off. ``from_token``: first token index averaged
    (0 = BOS; see ``token_means``). ``sites``/``layers`` as in ``collect`` (per-layer vector
    sites only; default all layers).

    ``meta`` records ``method="story_mean"``, ``from_token``, ``denoise_share``,
    ``n_components_removed`` and ``neutral_variance_removed`` (``{site: [per layer]}``),
    ``kept_norm_share`` (``{site: [per layer]}``: mean over emotions of ‖u_e after‖ / ‖u_e
    before‖ the projection), ``stories`` (``{emotion: [story ids]}``), ``n_stories``,
    ``n_neutral``, ``n_short`` (stories shorter than ``from_token + 1`` tokens: last token
    only) and the data hashes.

    Example::

        >>> corpus = load_stories(split="train")                     # emotions + neutral texts
        >>> dirs = story_directions(model, corpus)                   # denoised by the neutral ones
        >>> with steer(model, dirs, paper_layers(model), emotion="fear"):
        ...     out = generate(model, prompts, max_new_tokens=25)
    """
    share = _check_share(denoise_share)
    if isinstance(sites, str):
        sites = [sites]
    sites = list(dict.fromkeys(sites))
    flat = [s for s in sites if S.check_site(s) in S.PER_LAYER and len(S.site_width(model, s)) != 1]
    if flat:
        raise ValueError(f"story_directions: site {flat[0]!r} is not a per-layer vector site "
                         "(use resid_pre/resid_mid/resid_post/attn_out/mlp_out/...)")
    stories, labels, emos, keep = _labelled(stories, emotions, "story_directions")
    if neutral is None:
        neutral_items = [s for s, e in zip(stories, labels, strict=True) if e == NEUTRAL]
        neutral_source = "stories" if neutral_items else "none"
    else:
        neutral_items = list(neutral)
        neutral_source = "given" if neutral_items else "none"
    use_neutral = bool(neutral_items) and share > 0
    texts = [_text_of(stories[i]) for i in keep]
    n_emo = len(texts)
    all_texts = texts + ([_text_of(t) for t in neutral_items] if use_neutral else [])
    means, lay, lengths = story_token_means(model, all_texts, sites, layers=layers,
                                            from_token=from_token, batch_size=batch_size,
                                            progress=progress)
    ids: dict[str, list[str]] = {e: [] for e in emos}
    rows: dict[str, list[int]] = {e: [] for e in emos}
    for j, i in enumerate(keep):
        sid = _field(stories[i], "id", None)
        ids[labels[i]].append(str(sid) if sid is not None else str(i))
        rows[labels[i]].append(j)
    vecs: dict[str, torch.Tensor] = {}
    n_removed: dict[str, list[int]] = {}
    var_removed: dict[str, list[float]] = {}
    kept_norm: dict[str, list[float]] = {}
    for s in sites:
        m = means[s][:n_emo]  # [story, layer, d]
        c = torch.stack([m[rows[e]].mean(0) for e in emos])  # [emotion, layer, d]
        u = centre_over_emotions(c)
        n_removed[s], var_removed[s], kept_norm[s] = [], [], []
        if use_neutral:
            mn = means[s][n_emo:]
            for j in range(len(lay)):
                U, lam = neutral_subspace(mn[:, j], share, return_eigenvalues=True)
                before = u[:, j].norm(dim=-1)
                u[:, j] = project_out(u[:, j], U)
                k = U.shape[1]
                total = float(lam.sum())
                n_removed[s].append(k)
                var_removed[s].append(float(lam[:k].sum()) / total if total > 0 else 0.0)
                kept_norm[s].append(float((u[:, j].norm(dim=-1) / (before + EPS)).mean()))
        else:
            n_removed[s] = [0] * len(lay)
            var_removed[s] = [0.0] * len(lay)
            kept_norm[s] = [1.0] * len(lay)
        vecs[s] = (u / (u.norm(dim=-1, keepdim=True) + EPS)).float()
    n_short = int((lengths[:n_emo] <= from_token).sum())
    meta = {
        "model": getattr(model.cfg, "emocircuits_alias", getattr(model.cfg, "model_name", "")),
        "method": METHOD, "sites": list(sites), "data_hash": prompts_hash(texts), "n": n_emo,
        "from_token": int(from_token), "denoise_share": share if use_neutral else 0.0,
        "denoise_share_requested": share, "neutral_source": neutral_source if use_neutral else "none",
        "n_neutral": len(neutral_items) if use_neutral else 0,
        "neutral_hash": prompts_hash(all_texts[n_emo:]) if use_neutral else None,
        "n_components_removed": n_removed, "neutral_variance_removed": var_removed,
        "kept_norm_share": kept_norm, "stories": ids, "n_stories": {e: len(v) for e, v in ids.items()},
        "n_short": n_short, "mean_tokens": float(lengths[:n_emo].double().mean()),
    }
    return EmotionDirections(emos, lay, vecs, meta)


# ============================================================================ geometry


@dataclass
class VAGeometry(Result):
    """Valence–arousal geometry of emotion vectors, per model layer (module docstring).

    ``explained[j]``: share of variance of each PC at ``layers[j]``; ``scores[j]``: the
    emotions' PC1 and PC2 scores ``[emotion, 2]``, each PC oriented so that its r ≥ 0;
    ``r_valence``/``r_arousal``: Pearson r of PC1 with valence and PC2 with arousal (≥ 0 by
    that orientation, NaN where a PC has no variance), ``p_*`` their two-sided permutation
    p-values; ``best_layer_*`` the model layer of the largest r, ``p_*_best`` its p corrected
    for the choice of layer. ``exact``: every permutation was enumerated."""

    emotions: list[str]
    layers: list[int]
    valence: np.ndarray
    arousal: np.ndarray
    explained: np.ndarray
    scores: np.ndarray
    r_valence: np.ndarray
    r_arousal: np.ndarray
    p_valence: np.ndarray
    p_arousal: np.ndarray
    best_layer_valence: int
    best_layer_arousal: int
    p_valence_best: float
    p_arousal_best: float
    n_permutations: int
    exact: bool
    seed: int = 0
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.emotions = list(self.emotions)
        self.layers = [int(x) for x in self.layers]
        for name in ("valence", "arousal", "explained", "scores", "r_valence", "r_arousal",
                     "p_valence", "p_arousal"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        E, L = len(self.emotions), len(self.layers)
        if self.valence.shape != (E,) or self.arousal.shape != (E,):
            raise ValueError(f"VAGeometry: ratings must be [{E}] per axis")
        if self.scores.shape != (L, E, 2) or self.explained.shape[0] != L:
            raise ValueError(f"VAGeometry: scores {self.scores.shape} / explained "
                             f"{self.explained.shape} do not fit {L} layers × {E} emotions")
        for name in ("r_valence", "r_arousal", "p_valence", "p_arousal"):
            if getattr(self, name).shape != (L,):
                raise ValueError(f"VAGeometry: {name} must be [{L}]")

    def _index(self, layer: int) -> int:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} not in the geometry's layers {self.layers}")
        return self.layers.index(layer)

    def to_dataframe(self):
        """One row per model layer: ``layer``, ``var_pc1``, ``var_pc2``, ``r_valence``,
        ``p_valence``, ``r_arousal``, ``p_arousal``."""
        import pandas as pd

        ex = self.explained
        pad = np.full(len(self.layers), np.nan)
        return pd.DataFrame({
            "layer": self.layers,
            "var_pc1": ex[:, 0] if ex.shape[1] > 0 else pad,
            "var_pc2": ex[:, 1] if ex.shape[1] > 1 else pad,
            "r_valence": self.r_valence, "p_valence": self.p_valence,
            "r_arousal": self.r_arousal, "p_arousal": self.p_arousal,
        })

    def _summary(self) -> dict[str, str]:
        out = super()._summary()
        keep = ("emotions", "layers", "best_layer_valence", "best_layer_arousal", "p_valence_best",
                "p_arousal_best", "n_permutations", "exact")
        out = {k: out[k] for k in keep if k in out}
        for axis in ("valence", "arousal"):
            r = getattr(self, f"r_{axis}")
            if np.isfinite(r).any():
                out[f"max_r_{axis}"] = f"{float(np.nanmax(r)):.3f}"
        return out

    def plot(self, out=None, *, alpha: float = 0.05, title: str | None = None):
        """r per layer: PC1–valence and PC2–arousal, filled markers where p < ``alpha``, with
        the literature's values (``LITERATURE_VA``) as dashed horizontal lines: a Figure
        (or the PNG path with ``out``)."""
        import matplotlib.pyplot as plt

        from .viz.figures import finish_figure

        colors = {"valence": "#d62728", "arousal": "#1f77b4"}
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        x = np.asarray(self.layers)
        for axis, pc in (("valence", "PC1"), ("arousal", "PC2")):
            r, p = getattr(self, f"r_{axis}"), getattr(self, f"p_{axis}")
            ax.plot(x, r, "-", color=colors[axis], lw=1.6, label=f"{pc}–{axis}")
            sig = p < alpha
            ax.plot(x[sig], r[sig], "o", color=colors[axis], ms=5)
            ax.plot(x[~sig], r[~sig], "o", mfc="white", color=colors[axis], ms=5)
        styles = ["--", ":", "-."]
        seen: dict[str, int] = {}
        for axis, val, src in LITERATURE_VA:
            k = seen.get(axis, 0)
            seen[axis] = k + 1
            ax.axhline(val, color=colors[axis], ls=styles[k % len(styles)], lw=0.9, alpha=0.7,
                       label=f"{val:.2f} {src}")
        ax.set_xlabel("layer")
        ax.set_ylabel("|Pearson r| (PC oriented so r ≥ 0)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title or (f"valence–arousal geometry ({self.meta.get('site', '')}); "
                               f"filled: p < {alpha:g}"), fontsize=10)
        ax.legend(fontsize=7, loc="lower right", framealpha=0.85)
        fig.tight_layout()
        return finish_figure(fig, out)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc) / den if den > 0 else float("nan")


def _zscore_rows(x: np.ndarray) -> np.ndarray:
    """Rows centred and scaled so that ``z_a · z_b / n`` is their Pearson r (zero rows stay 0)."""
    xc = x - x.mean(-1, keepdims=True)
    sd = np.sqrt((xc ** 2).mean(-1, keepdims=True))
    return np.divide(xc, sd, out=np.zeros_like(xc), where=sd > 0)


def _permutations(n_items: int, n_permutations: int, seed: int) -> tuple[np.ndarray, bool]:
    """Every permutation of ``n_items`` when there are at most ``n_permutations``, else
    ``n_permutations`` seeded random ones: ``([P, n_items] indices, exact)``."""
    if math.factorial(n_items) <= n_permutations:
        return np.array(list(itertools.permutations(range(n_items))), dtype=np.int64), True
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((n_permutations, n_items)), axis=1), False


def _perm_p(null: np.ndarray, observed: np.ndarray, exact: bool) -> np.ndarray:
    """Two-sided p per column: share of ``null`` rows with |r| ≥ |observed| (exact), or the
    Monte Carlo estimate with the +1 correction."""
    obs = np.abs(observed)
    hits = (np.abs(null) >= obs[None] - 1e-12).sum(0)
    n = null.shape[0]
    p = hits / n if exact else (1 + hits) / (n + 1)
    return np.where(np.isfinite(obs), p, np.nan)


def va_geometry(
    directions: EmotionDirections | torch.Tensor,
    emotions: Sequence[str] | None = None,
    *,
    site: str = "resid_post",
    layers: Sequence[int] | None = None,
    ratings: Mapping[str, tuple[float, float]] | None = None,
    n_permutations: int = 10000,
    seed: int = 0,
) -> VAGeometry:
    """PCA of the emotions' vectors per layer and its correlation with human valence (PC1) and
    arousal (PC2) (module docstring).

    ``directions``: ``EmotionDirections`` (its ``site``; ``emotions`` default: those with
    ratings, the unrated ones listed in ``meta["unrated"]``) or a tensor ``[emotion, layer, d]``
    / ``[emotion, d]`` with ``emotions`` naming its rows. ``layers``: the model layers to use
    (default all; for a tensor, the labels of its layer axis, default 0..L−1). ``ratings``:
    emotion -> (valence, arousal), default ``human_va_unit()`` (any affine rescaling gives
    the same r). Needs at least 3 emotions.

    Example::

        >>> geo = va_geometry(dirs)                   # dirs from story_directions
        >>> geo.best_layer_valence, geo.to_dataframe().head()
        >>> geo.plot(); va_scatter(geo, geo.best_layer_valence)
    """
    ratings = dict(human_va_unit() if ratings is None else ratings)
    meta: dict = {"site": site, "sign_rule": "each PC oriented so that its r >= 0 (r = |r|)",
                  "ratings": "human_va_unit (Warriner et al. 2013)" if ratings == human_va_unit() else "given"}
    if isinstance(directions, EmotionDirections):
        if emotions is None:
            emos = [e for e in directions.emotions if e in ratings]
            unrated = [e for e in directions.emotions if e not in ratings]
            if unrated:
                meta["unrated"] = unrated
        else:
            emos = list(emotions)
        x, _ = direction_tensor(directions, site, emos)
        all_layers = list(directions.layers)
        meta.update({k: directions.meta[k] for k in ("model", "method", "from_token", "denoise_share")
                     if k in directions.meta})
    elif isinstance(directions, torch.Tensor):
        if emotions is None:
            raise ValueError("va_geometry: a direction tensor needs emotions= naming its rows")
        emos = list(emotions)
        x = directions if directions.dim() == 3 else directions.unsqueeze(1)
        if x.dim() != 3 or x.shape[0] != len(emos):
            raise ValueError(f"va_geometry: tensor must be [emotion={len(emos)}, layer, d] or "
                             f"[emotion, d], got {tuple(directions.shape)}")
        all_layers = list(range(x.shape[1])) if layers is None else [int(v) for v in layers]
        if len(all_layers) != x.shape[1]:
            raise ValueError(f"va_geometry: {len(all_layers)} layer labels for a tensor with "
                             f"{x.shape[1]} layers")
        layers = None
    else:
        raise TypeError(f"va_geometry: directions must be EmotionDirections or a tensor, got "
                        f"{type(directions).__name__}")
    missing = [e for e in emos if e not in ratings]
    if missing:
        raise ValueError(f"va_geometry: no valence/arousal ratings for {missing}")
    if len(emos) < 3:
        raise ValueError(f"va_geometry: need at least 3 emotions for two PCs, got {emos}")
    if len(set(emos)) != len(emos):
        raise ValueError(f"va_geometry: repeated emotions in {emos}")
    if layers is not None:
        missing_l = [v for v in layers if v not in all_layers]
        if missing_l:
            raise KeyError(f"va_geometry: layers {missing_l} not in the directions' layers {all_layers}")
        x = x[:, [all_layers.index(v) for v in layers]]
        all_layers = [int(v) for v in layers]
    if n_permutations < 1:
        raise ValueError(f"va_geometry: n_permutations must be >= 1, got {n_permutations}")
    xd = x.detach().double().cpu()
    if not torch.isfinite(xd).all():
        raise ValueError("va_geometry: the vectors contain NaN/inf")
    val = np.array([float(ratings[e][0]) for e in emos])
    aro = np.array([float(ratings[e][1]) for e in emos])
    for name, r in (("valence", val), ("arousal", aro)):
        if not np.all(np.isfinite(r)) or np.ptp(r) == 0:
            raise ValueError(f"va_geometry: the {name} ratings must be finite and not all equal")
    E, L = len(emos), len(all_layers)
    n_pc = min(E, xd.shape[-1])
    explained = np.full((L, n_pc), np.nan)
    scores = np.zeros((L, E, 2))
    r_val, r_aro = np.full(L, np.nan), np.full(L, np.nan)
    for j in range(L):
        m = xd[:, j] - xd[:, j].mean(0, keepdim=True)  # [E, d], centred over emotions
        uu, s, _ = torch.linalg.svd(m, full_matrices=False)
        lam = (s ** 2).numpy()
        tot = lam.sum()
        if tot > 0:
            explained[j, :len(lam)] = lam[:n_pc] / tot
        sc = (uu * s).numpy()  # PC scores [E, k]
        for c, (target, store) in enumerate(((val, r_val), (aro, r_aro))):
            if c >= sc.shape[1] or lam[c] <= EPS * max(tot, EPS):
                continue  # no such PC (zero variance): r stays NaN
            r = _pearson(sc[:, c], target)
            sign = -1.0 if r < 0 else 1.0
            scores[j, :, c] = sign * sc[:, c]
            store[j] = abs(r)
    perms, exact = _permutations(E, int(n_permutations), seed)
    zs = _zscore_rows(scores.transpose(0, 2, 1))  # [L, 2, E]
    out = {}
    for c, (axis, target, r_obs) in enumerate((("valence", val, r_val), ("arousal", aro, r_aro))):
        zt = _zscore_rows(target)[perms]  # [P, E] permuted ratings
        null = zt @ zs[:, c].T / E  # [P, L]
        out[f"p_{axis}"] = _perm_p(null, r_obs, exact)
        if np.isfinite(r_obs).any():
            best = int(np.nanargmax(r_obs))
            mx = np.abs(np.where(np.isfinite(r_obs)[None], null, 0.0)).max(1)
            hits = int((mx >= r_obs[best] - 1e-12).sum())
            n = len(mx)
            out[f"best_{axis}"] = all_layers[best]
            out[f"pbest_{axis}"] = hits / n if exact else (1 + hits) / (n + 1)
        else:
            out[f"best_{axis}"], out[f"pbest_{axis}"] = -1, float("nan")
    return VAGeometry(
        emos, all_layers, val, aro, explained, scores, r_val, r_aro, out["p_valence"],
        out["p_arousal"], out["best_valence"], out["best_arousal"], float(out["pbest_valence"]),
        float(out["pbest_arousal"]), int(len(perms)), bool(exact), int(seed), meta)


def va_scatter(geometry: VAGeometry, layer: int | None = None, out=None):
    """The emotions in the PC1 × PC2 plane of one model ``layer`` (default: the best valence
    layer), labelled, coloured by human valence: a Figure (or the PNG path with ``out``)."""
    import matplotlib.pyplot as plt

    from .viz.figures import finish_figure

    layer = geometry.best_layer_valence if layer is None else layer
    if layer not in geometry.layers:  # also catches -1 (no valid layer)
        raise KeyError(f"layer {layer} not in the geometry's layers {geometry.layers}")
    j = geometry.layers.index(layer)
    sc = geometry.scores[j]
    fig, ax = plt.subplots(figsize=(6.2, 5.2))
    pts = ax.scatter(sc[:, 0], sc[:, 1], c=geometry.valence, cmap="coolwarm_r", s=38,
                     edgecolors="k", linewidths=0.4)
    for (x, y), e in zip(sc, geometry.emotions, strict=True):
        ax.annotate(e, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=8)
    ex = geometry.explained[j]
    v1 = f"{100 * ex[0]:.0f} %" if ex.shape[0] > 0 and np.isfinite(ex[0]) else "?"
    v2 = f"{100 * ex[1]:.0f} %" if ex.shape[0] > 1 and np.isfinite(ex[1]) else "?"
    ax.set_xlabel(f"PC1 ({v1} of variance; r with valence {geometry.r_valence[j]:.2f}, "
                  f"p = {geometry.p_valence[j]:.2g})", fontsize=8)
    ax.set_ylabel(f"PC2 ({v2}; r with arousal {geometry.r_arousal[j]:.2f}, "
                  f"p = {geometry.p_arousal[j]:.2g})", fontsize=8)
    ax.axhline(0, color="#bbbbbb", lw=0.6)
    ax.axvline(0, color="#bbbbbb", lw=0.6)
    fig.colorbar(pts, ax=ax, label="human valence")
    ax.set_title(f"emotions in PC1 × PC2, layer {layer}", fontsize=10)
    fig.tight_layout()
    return finish_figure(fig, out)
