"""Emotion directions (paper stage 02; docs/stages/directions.md) — the group-centred core.

For complete scenario–event groups g (every emotion present) and emotions e:

    μ_g = (1/|E|) Σ_e h_{g,e}            (group mean)
    δ_{g,e} = h_{g,e} − μ_g              (de-contextualised)
    c_e = (1/|G|) Σ_g δ_{g,e}            (emotion centroid)
    u_e = c_e − (1/|E|) Σ_e' c_e'        (global mean removed; a no-op for complete groups)
    v_e = u_e / (‖u_e‖₂ + 1e-12)         (unit direction, per layer)

``group_centered_means`` returns u (``normalize=False``: the circuits' difference vectors Δμ)
or v (``normalize=True``) for any feature shape (e.g. ``[layer, d_model]``, ``[layer, d_mlp]``).

On top of it, from ``collect(model, emotion_prompts(...), sites)`` output (one position per
prompt), each returning ``EmotionDirections`` (``vectors[site]``: unit ``[emotion, layer, d_model]``):

* ``context_agnostic`` — the paper's method above;
* ``mean_difference`` — unit(mean h_e − mean h_neutral) against neutral-prompt activations;
* ``pca_directions`` — top (uncentred) principal axis of each emotion's δ_{g,e};
* ``probe_directions`` — one-vs-rest logistic-regression weights per layer (standardised);
* ``reply_directions`` — group-centred means over the *generated reply* tokens.

Validity checks: ``nearest_centroid_accuracy`` (held-out scenarios, centred and un-centred),
``keyword_control`` (the same with colour words instead of emotions: the prompts contain the
emotion word, so the directions may encode the word itself, a known flaw). Geometry:
``cosine_across_layers`` (the paper's Attn0, MLP0, ... matrix) and ``cosine_across_emotions``.

At the last layer ``resid_post`` is the true residual stream here; the paper's last "MLP"
direction is the final-norm output (a known flaw of the authors' code) — use site
``final_norm`` to reproduce it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float

from .activations import Activations, collect, prompts_hash
from .prompts import Prompt
from .results import Result

EPS = 1e-12


@dataclass(frozen=True)
class GroupInfo(Result):
    """Which groups were used, and which were dropped as incomplete (and what they lacked)."""

    used: list[Hashable]
    dropped: dict[Hashable, list[str]] = field(default_factory=dict)

    def describe(self) -> str:
        s = f"{len(self.used)} complete groups used"
        if self.dropped:
            ex = "; ".join(f"{g}: missing {m}" for g, m in list(self.dropped.items())[:5])
            s += f", {len(self.dropped)} incomplete dropped ({ex}{'; ...' if len(self.dropped) > 5 else ''})"
        return s


def group_deltas(
    x: Float[torch.Tensor, "n *feat"],
    groups: Sequence[Hashable],
    labels: Sequence[str | None],
    emotions: Sequence[str],
) -> tuple[Float[torch.Tensor, "group emotion *feat"], GroupInfo]:
    """δ_{g,e} = h_{g,e} − μ_g for every complete group (float64), groups in first-seen order
    (``GroupInfo.used``). The one group-centring step: ``group_centered_means`` averages it
    over groups; PCA, probe and nearest-centroid directions use it per group.

    Rows of emotions outside ``emotions`` are ignored; groups missing any emotion are dropped
    (reported in ``GroupInfo``); a (group, emotion) seen twice is averaged (h_{g,e} is the mean).
    Raises ``ValueError`` when no complete group remains or ``x`` holds NaN/inf.
    """
    if x.shape[0] != len(groups) or x.shape[0] != len(labels):
        raise ValueError(f"x has {x.shape[0]} rows, groups {len(groups)}, labels {len(labels)}")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).nonzero()[:5, 0].tolist()
        raise ValueError(f"activations contain NaN/inf (rows {bad}...)")
    emo_idx = {e: i for i, e in enumerate(emotions)}
    sums: dict[Hashable, torch.Tensor] = {}
    counts: dict[Hashable, torch.Tensor] = {}
    xf = x.double()
    for i, (g, lab) in enumerate(zip(groups, labels, strict=True)):
        if lab not in emo_idx:
            continue
        if g not in sums:
            sums[g] = torch.zeros(len(emotions), *x.shape[1:], dtype=torch.float64)
            counts[g] = torch.zeros(len(emotions), dtype=torch.float64)
        sums[g][emo_idx[lab]] += xf[i]
        counts[g][emo_idx[lab]] += 1
    used, dropped = [], {}
    for g, c in counts.items():
        if (c > 0).all():
            used.append(g)
        else:
            dropped[g] = [e for e, k in zip(emotions, c, strict=True) if k == 0]
    if not used:
        raise ValueError(
            f"no complete scenario–event group: every group lacks some of {list(emotions)} "
            f"({len(dropped)} incomplete groups)"
        )
    shape = (-1,) + (1,) * (x.dim() - 1)
    deltas = []
    for g in used:
        h = sums[g] / counts[g].view(shape)
        deltas.append(h - h.mean(0, keepdim=True))
    return torch.stack(deltas), GroupInfo(used, dropped)


def group_centered_means(
    x: Float[torch.Tensor, "n *feat"],
    groups: Sequence[Hashable],
    labels: Sequence[str | None],
    emotions: Sequence[str],
    *,
    normalize: bool = False,
    norm_dims: int = 1,
) -> tuple[Float[torch.Tensor, "emotion *feat"], GroupInfo]:
    """u_e (or unit v_e) from rows ``x[i]`` with group ``groups[i]`` and emotion ``labels[i]``:
    c_e = mean_g δ_{g,e} (``group_deltas``), u_e = c_e − mean_e' c_e'.

    Groups as in ``group_deltas``. ``norm_dims`` trailing dims form the vector that is
    L2-normalised (1: per layer over d_model).
    """
    deltas, info = group_deltas(x, groups, labels, emotions)
    c = deltas.mean(0)
    u = c - c.mean(0, keepdim=True)
    if normalize:
        dims = tuple(range(u.dim() - norm_dims, u.dim()))
        u = u / (u.norm(dim=dims, keepdim=True) + EPS)
    return u.float(), info


# ============================================================================ directions API


SITE_SHORT = {"resid_mid": "Attn", "resid_post": "MLP", "resid_pre": "Pre", "attn_out": "AttnOut",
              "mlp_out": "MLPOut"}


@dataclass
class EmotionDirections(Result):
    """Unit emotion directions per site: ``vectors[site]`` is ``[emotion, layer, d_model]``.

    ``layers[j]`` is the model layer of row ``j``; ``meta`` records the model id, the method,
    the data hash and the groups used/dropped.
    """

    emotions: list[str]
    layers: list[int]
    vectors: dict[str, Float[torch.Tensor, "emotion layer d_model"]]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.emotions = list(self.emotions)
        self.layers = [int(x) for x in self.layers]
        for s, v in self.vectors.items():
            if v.dim() != 3 or v.shape[0] != len(self.emotions) or v.shape[1] != len(self.layers):
                raise ValueError(f"vectors[{s!r}] has shape {tuple(v.shape)}; expected "
                                 f"[{len(self.emotions)} emotions, {len(self.layers)} layers, d_model]")

    @property
    def sites(self) -> list[str]:
        return list(self.vectors)

    @property
    def d_model(self) -> int:
        return next(iter(self.vectors.values())).shape[-1]

    def _site(self, site: str) -> torch.Tensor:
        if site not in self.vectors:
            raise KeyError(f"directions have no site {site!r}; have {self.sites}")
        return self.vectors[site]

    def _emo(self, emotion: str) -> int:
        if emotion not in self.emotions:
            raise KeyError(f"directions have no emotion {emotion!r}; have {self.emotions}")
        return self.emotions.index(emotion)

    def get(self, emotion: str, site: str = "resid_post") -> Float[torch.Tensor, "layer d_model"]:
        """The ``[layer, d_model]`` directions of one emotion at one site."""
        return self._site(site)[self._emo(emotion)]

    def at(self, emotion: str, layer: int, site: str = "resid_post") -> Float[torch.Tensor, "d_model"]:
        """One direction: emotion at model layer ``layer``."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} not in the directions' layers {self.layers}")
        return self.get(emotion, site)[self.layers.index(layer)]

    def __getitem__(self, site: str) -> dict[str, torch.Tensor]:
        """``dirs[site][emotion]`` -> ``[layer, d_model]``."""
        v = self._site(site)
        return {e: v[i] for i, e in enumerate(self.emotions)}

    def vector(self, emotion: str, layer: int, site: str = "resid_post") -> Float[torch.Tensor, "d_model"]:
        """One direction: ``emotion`` at model layer ``layer`` of ``site`` (same as ``at``)."""
        return self.at(emotion, layer, site)

    def tensor(self, site: str = "resid_post", emotions: Sequence[str] | None = None, *,
               n_layers: int | None = None) -> Float[torch.Tensor, "emotion layer d_model"]:
        """The raw ``[emotion, layer, d_model]`` tensor of ``site``: rows in ``emotions`` order
        (default: all, in ``self.emotions`` order), the layer axis as in ``self.layers``; with
        ``n_layers`` it is indexed by model layer 0..n_layers−1 (every one must be present)."""
        v = self._site(site)
        if emotions is not None:
            v = v[[self._emo(e) for e in emotions]]
        if n_layers is not None and self.layers != list(range(n_layers)):
            missing = [layer for layer in range(n_layers) if layer not in self.layers]
            if missing:
                raise ValueError(f"directions lack model layers {missing} (have {self.layers}); "
                                 f"this call needs all {n_layers}")
            v = v[:, [self.layers.index(layer) for layer in range(n_layers)]]
        return v

    def _summary(self) -> dict[str, str]:
        out = super()._summary()
        if self.vectors:
            out = {"emotions": out.pop("emotions"), "layers": out.pop("layers"),
                   "sites": "[" + ", ".join(self.sites) + "]", "d_model": str(self.d_model), **out}
        return out

    def to_dataframe(self):
        """A summary, one row per (site, emotion, model layer): the direction's ``norm`` and
        ``max_cos_other``, its largest cosine with another emotion's direction there."""
        import pandas as pd

        rows = []
        for s, v in self.vectors.items():
            u = _unit(v.detach().double().cpu())  # [e, l, d]
            cos = torch.einsum("eld,fld->lef", u, u)  # [l, e, f]
            eye = torch.eye(len(self.emotions), dtype=torch.bool)
            other = cos.masked_fill(eye, float("-inf")).amax(-1) if len(self.emotions) > 1 else None
            norms = v.detach().double().cpu().norm(dim=-1)
            for i, e in enumerate(self.emotions):
                for j, layer in enumerate(self.layers):
                    rows.append({"site": s, "emotion": e, "layer": layer, "norm": float(norms[i, j]),
                                 "max_cos_other": float(other[j, i]) if other is not None else float("nan")})
        return pd.DataFrame(rows, columns=["site", "emotion", "layer", "norm", "max_cos_other"])

    def plot(self, layer: int | None = None, site: str | None = None):
        """cos(v_e, v_e') between the emotions at one model ``layer`` (default: the middle one
        of ``layers``) of ``site`` (default: ``resid_post`` if present, else the first): a Figure."""
        from .viz.figures import emotion_similarity

        site = site or ("resid_post" if "resid_post" in self.vectors else self.sites[0])
        layer = self.layers[len(self.layers) // 2] if layer is None else layer
        if layer not in self.layers:
            raise KeyError(f"layer {layer} not in the directions' layers {self.layers}")
        v = self._site(site)[:, self.layers.index(layer)]
        return emotion_similarity(v, self.emotions,
                                  title=f"cosine between emotion directions ({site}, layer {layer})")


def direction_tensor(directions: EmotionDirections | torch.Tensor, site: str,
                     emotions: Sequence[str] | None = None, *, n_layers: int | None = None
                     ) -> tuple[torch.Tensor, list[str] | None]:
    """``(tensor, emotions)`` for functions that take directions as ``EmotionDirections`` or as a
    raw tensor: an ``EmotionDirections`` gives ``.tensor(site, emotions, n_layers=...)`` and its
    emotions (``emotions`` when given); a tensor is returned as it is, with ``emotions``."""
    if isinstance(directions, EmotionDirections):
        emos = list(emotions) if emotions is not None else list(directions.emotions)
        return directions.tensor(site, emos, n_layers=n_layers), emos
    if not isinstance(directions, torch.Tensor):
        raise TypeError(f"directions must be EmotionDirections or a tensor, got {type(directions).__name__}")
    return directions, (list(emotions) if emotions is not None else None)


# ----------------------------------------------------------------------------- helpers


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / (x.norm(dim=-1, keepdim=True) + EPS)


def _check_rows(acts: Activations, prompts: Sequence[Prompt], who: str,
                sites: Sequence[str] | None = None) -> None:
    """Rows match the prompts, and the ``sites`` used (default: all) hold one position per
    prompt ``[n, layer, d]`` (other collected sites, e.g. ``z``, may have any shape)."""
    if len(acts) != len(prompts):
        raise ValueError(f"{who}: activations have {len(acts)} rows but {len(prompts)} prompts were given")
    used = {s: acts.acts[s] for s in (sites if sites is not None else acts.acts)}
    if acts.position not in ("last", "index") or any(v.dim() != 3 for v in used.values()):
        raise ValueError(f"{who}: need one position per prompt ([n, layer, d_model]) at "
                         f"{list(used)}; got position {acts.position!r} with shapes "
                         f"{[tuple(v.shape) for v in used.values()]}")


def _sites(acts: Activations, sites: Sequence[str] | str | None) -> list[str]:
    if sites is None:
        return list(acts.acts)
    if isinstance(sites, str):
        sites = [sites]
    for s in sites:
        acts[s]  # raises a KeyError naming the site
    return list(sites)


def _layers(acts: Activations, sites: Sequence[str]) -> list[int]:
    lay = acts.layers[sites[0]]
    for s in sites[1:]:
        if acts.layers[s] != lay:
            raise ValueError(f"sites {sites[0]!r} and {s!r} were collected at different layers")
    return list(lay)


def _check_finite(x: torch.Tensor, site: str) -> None:
    if not torch.isfinite(x).all():
        rows = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).nonzero()[:5, 0].tolist()
        raise ValueError(f"activations at site {site!r} contain NaN/inf (rows {rows}...)")


def _meta(acts: Activations, prompts: Sequence[Prompt], method: str, sites, **extra) -> dict:
    return {"model": acts.meta.get("model", ""), "method": method, "sites": list(sites),
            "data_hash": acts.meta.get("prompts_hash") or prompts_hash(prompts), "n": len(prompts), **extra}


def _group_meta(info: GroupInfo) -> dict:
    return {"n_groups_used": len(info.used), "n_groups_dropped": len(info.dropped),
            "dropped": {"/".join(map(str, g)) if isinstance(g, tuple) else str(g): m
                        for g, m in info.dropped.items()}}


def _complete_rows(prompts: Sequence[Prompt], emotions: Sequence[str]):
    """(groups, labels, per-row mask of rows in complete groups, GroupInfo-like dropped dict)."""
    have: dict[Hashable, set] = {}
    for p in prompts:
        if p.emotion in emotions:
            have.setdefault(p.group, set()).add(p.emotion)
    complete = {g for g, s in have.items() if len(s) == len(set(emotions))}
    dropped = {g: [e for e in emotions if e not in s] for g, s in have.items() if g not in complete}
    mask = np.array([p.group in complete and p.emotion in emotions for p in prompts])
    return complete, dropped, mask


# ----------------------------------------------------------------------------- methods


def context_agnostic(
    acts: Activations,
    prompts: Sequence[Prompt],
    emotions: Sequence[str],
    *,
    sites: Sequence[str] | str | None = None,
) -> EmotionDirections:
    """The paper's directions (stage 02): v_e = unit(mean_g (h_{g,e} − μ_g) − c̄), per site and layer.

    Groups are ``Prompt.group`` = (skeleton_id, valence); incomplete groups are dropped and
    listed in ``meta["dropped"]``.

    Example::

        >>> dirs = context_agnostic(acts, prompts, ["anger", "happiness"])   # every collected site
        >>> dirs.sites, dirs.get("anger", "resid_post").shape                # a unit vector per layer
        (['resid_mid', 'resid_post'], torch.Size([30, 576]))
    """
    sites = _sites(acts, sites)
    _check_rows(acts, prompts, "context_agnostic", sites)
    groups = [p.group for p in prompts]
    labels = [p.emotion or "" for p in prompts]
    vecs: dict[str, torch.Tensor] = {}
    info = GroupInfo([])
    for s in sites:
        _check_finite(acts[s], s)
        vecs[s], info = group_centered_means(acts[s], groups, labels, emotions, normalize=True)
    return EmotionDirections(list(emotions), _layers(acts, sites), vecs,
                             _meta(acts, prompts, "context_agnostic", sites, **_group_meta(info)))


def mean_difference(
    acts: Activations,
    prompts: Sequence[Prompt],
    emotions: Sequence[str],
    neutral_acts: Activations,
    *,
    sites: Sequence[str] | str | None = None,
) -> EmotionDirections:
    """v_e = unit(mean_{i: e_i = e} h_i − mean_j h_j^neutral): emotion prompts against neutral ones."""
    sites = _sites(acts, sites)
    _check_rows(acts, prompts, "mean_difference", sites)
    labels = np.array([p.emotion for p in prompts])
    vecs = {}
    for s in sites:
        x, xn = acts[s].double(), neutral_acts[s].double()
        _check_finite(x, s)
        _check_finite(xn, s)
        if neutral_acts.layers[s] != acts.layers[s]:
            raise ValueError(f"neutral activations at {s!r} have layers {neutral_acts.layers[s]}, "
                             f"emotion activations {acts.layers[s]}")
        missing = [e for e in emotions if not (labels == e).any()]
        if missing:
            raise ValueError(f"mean_difference: no prompts for emotions {missing}")
        mu_n = xn.mean(0)
        vecs[s] = _unit(torch.stack([x[torch.from_numpy(labels == e)].mean(0) - mu_n
                                     for e in emotions])).float()
    return EmotionDirections(list(emotions), _layers(acts, sites), vecs,
                             _meta(acts, prompts, "mean_difference", sites, n_neutral=len(neutral_acts),
                                   neutral_hash=neutral_acts.meta.get("prompts_hash")))


def _deltas(x: torch.Tensor, prompts: Sequence[Prompt], emotions: Sequence[str]):
    """``group_deltas`` over ``Prompt.group`` / ``Prompt.emotion``, groups sorted by ``str``
    (the order PCA, probe and nearest-centroid directions have always used)."""
    d, info = group_deltas(x, [p.group for p in prompts], [p.emotion for p in prompts], emotions)
    order = sorted(range(len(info.used)), key=lambda i: str(info.used[i]))
    return d[order], GroupInfo([info.used[i] for i in order], info.dropped)


def pca_directions(
    acts: Activations,
    prompts: Sequence[Prompt],
    emotions: Sequence[str],
    *,
    sites: Sequence[str] | str | None = None,
) -> EmotionDirections:
    """Per emotion and layer, the top principal axis of that emotion's group-centred vectors.

    v_e = first right-singular vector of the matrix D_e = [δ_{g,e}]_g (uncentred PCA, i.e. the
    axis maximising mean_g ⟨δ_{g,e}, v⟩²), signed so that mean_g ⟨δ_{g,e}, v⟩ > 0. With a
    shared emotion offset plus noise it agrees with ``context_agnostic``; it differs when the
    groups disagree on the emotion's offset.
    """
    sites = _sites(acts, sites)
    _check_rows(acts, prompts, "pca_directions", sites)
    vecs: dict[str, torch.Tensor] = {}
    info = GroupInfo([])
    for s in sites:
        _check_finite(acts[s], s)
        d, info = _deltas(acts[s], prompts, emotions)  # [g, e, layer, d]
        out = torch.empty(len(emotions), d.shape[2], d.shape[3], dtype=torch.float64)
        for k in range(len(emotions)):
            m = d[:, k].permute(1, 0, 2)  # [layer, g, d]
            _, _, vh = torch.linalg.svd(m, full_matrices=False)
            v = vh[:, 0]  # [layer, d]
            sign = torch.sign((m @ v.unsqueeze(-1)).squeeze(-1).mean(1))
            sign[sign == 0] = 1
            out[k] = v * sign.unsqueeze(-1)
        vecs[s] = _unit(out).float()
    return EmotionDirections(list(emotions), _layers(acts, sites), vecs,
                             _meta(acts, prompts, "pca", sites, **_group_meta(info)))


def probe_directions(
    acts: Activations,
    prompts: Sequence[Prompt],
    emotions: Sequence[str],
    *,
    sites: Sequence[str] | str | None = None,
    C: float = 1.0,
    group_center: bool = False,
    max_iter: int = 2000,
) -> EmotionDirections:
    """One-vs-rest logistic-regression weights per layer, mapped back to activation space, unit.

    Features are standardised (z = (h − m)/s, which matters for models with huge residual
    norms); the weight of emotion e in activation space is w_e / s, then normalised.
    ``group_center=True`` fits on δ_{g,e} (complete groups) instead of raw h. L2 penalty ``C``.
    """
    from sklearn.linear_model import LogisticRegression

    sites = _sites(acts, sites)
    _check_rows(acts, prompts, "probe_directions", sites)
    vecs = {}
    extra: dict = {"C": C, "group_center": group_center}
    for s in sites:
        x = acts[s]
        _check_finite(x, s)
        if group_center:
            d, info = _deltas(x, prompts, emotions)
            feats = d.reshape(-1, *d.shape[2:])
            y = np.tile(np.arange(len(emotions)), d.shape[0])
            extra.update(_group_meta(info))
        else:
            keep = [i for i, p in enumerate(prompts) if p.emotion in emotions]
            feats = x[keep].double()
            y = np.array([list(emotions).index(str(prompts[i].emotion)) for i in keep])
        missing = [e for k, e in enumerate(emotions) if not (y == k).any()]
        if missing:
            raise ValueError(f"probe_directions: no rows for emotions {missing}")
        out = torch.empty(len(emotions), feats.shape[1], feats.shape[2], dtype=torch.float64)
        for j in range(feats.shape[1]):
            f = feats[:, j].numpy()
            m, sd = f.mean(0), f.std(0) + 1e-8
            z = (f - m) / sd
            for k in range(len(emotions)):
                clf = LogisticRegression(C=C, max_iter=max_iter)
                clf.fit(z, (y == k).astype(int))
                out[k, j] = torch.from_numpy(clf.coef_[0] / sd)
        vecs[s] = _unit(out).float()
    return EmotionDirections(list(emotions), _layers(acts, sites), vecs,
                             _meta(acts, prompts, "probe", sites, **extra))


# ----------------------------------------------------------------------------- cosines


@dataclass
class CosineMatrix(Result):
    """``matrix[i, j]`` = cos(labels[i], labels[j])."""

    labels: list[str]
    matrix: Float[np.ndarray, "p p"]

    def off_diagonal_mean(self) -> float:
        n = len(self.labels)
        return float((self.matrix.sum() - np.trace(self.matrix)) / (n * n - n)) if n > 1 else float("nan")

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.matrix, index=self.labels, columns=self.labels)

    def to_dict(self) -> dict:
        return {"labels": self.labels, "matrix": self.matrix.tolist()}

    def plot(self, title: str = ""):
        """The matrix as a heatmap (``figures.cosine_heatmap``): a Figure."""
        from .viz.figures import cosine_heatmap

        return cosine_heatmap(self.matrix, xlabels=self.labels, ylabels=self.labels, title=title)


def cosine_across_layers(dirs: EmotionDirections, emotion: str,
                         sites: Sequence[str] = ("resid_mid", "resid_post")) -> CosineMatrix:
    """The paper's 56-position matrix, generalised: positions Attn0, MLP0, Attn1, ... (layer-major,
    sites in the given order; resid_mid -> Attn, resid_post -> MLP, other sites by name)."""
    vs, labels = [], []
    per = {s: _unit(dirs.get(emotion, s).double()) for s in sites}
    for j, layer in enumerate(dirs.layers):
        for s in sites:
            vs.append(per[s][j])
            labels.append(f"{SITE_SHORT.get(s, s)}{layer}")
    v = torch.stack(vs)
    return CosineMatrix(labels, (v @ v.T).numpy())


def cosine_across_emotions(dirs: EmotionDirections, site: str = "resid_post",
                           layer: int | None = None) -> CosineMatrix:
    """cos(v_e, v_e') between emotions at one site and model layer (default: the middle one)."""
    if layer is None:
        layer = dirs.layers[len(dirs.layers) // 2]
    v = _unit(torch.stack([dirs.at(e, layer, site) for e in dirs.emotions]).double())
    return CosineMatrix(list(dirs.emotions), (v @ v.T).numpy())


def direction_agreement(ref: EmotionDirections, other: EmotionDirections,
                        site: str = "resid_post") -> list[float]:
    """Per layer of ``other`` (each must be a layer of ``ref``): mean over the shared emotions of
    cos(ref_e, other_e) at ``site``, e.g. how close the PCA or reply-token directions are to the
    context-agnostic ones."""
    missing = [layer for layer in other.layers if layer not in ref.layers]
    if missing:
        raise ValueError(f"direction_agreement: layers {missing} are not in the reference directions")
    emos = [e for e in ref.emotions if e in other.emotions]
    if not emos:
        raise ValueError("direction_agreement: no emotion in common")
    lay = [ref.layers.index(layer) for layer in other.layers]
    a = ref.tensor(site, emos)[:, lay].double()
    b = other.tensor(site, emos).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean(0).tolist()


def adjacent_site_cosines(dirs: EmotionDirections, emotion: str,
                          sites: Sequence[str] = ("resid_mid", "resid_post")) -> dict[str, float]:
    """Summary of :func:`cosine_across_layers` for one emotion: the mean off-diagonal cosine,
    the mean cosine between consecutive sites of one layer (resid_mid_l -> resid_post_l, i.e.
    Attn -> MLP) and from a layer's last site to the next layer's first (MLP_l -> Attn_l+1)."""
    cm = cosine_across_layers(dirs, emotion, sites)
    k, n = len(sites), len(dirs.layers)
    adj = np.diag(cm.matrix, 1)  # position p -> p+1, layer-major
    within = [adj[j * k + i] for j in range(n) for i in range(k - 1)]
    nxt = [adj[j * k + k - 1] for j in range(n - 1)]
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return {"off_diagonal_mean": cm.off_diagonal_mean(), "within_layer": mean(within),
            "to_next_layer": mean(nxt)}


# ----------------------------------------------------------------------------- validity checks


@dataclass
class Decodability(Result):
    """Held-out nearest-centroid accuracy per layer, with and without group-centring.

    ``centered[j]``: test groups are centred (δ = h − μ_g) and matched to the train centroids
    c_e = mean_g δ_{g,e}; ``uncentered[j]``: raw h matched to the train means of h per label.
    Folds split by scenario (skeleton_id), so no group is on both sides.
    """

    site: str
    layers: list[int]
    labels: list[str]
    centered: Float[np.ndarray, "layer"]
    uncentered: Float[np.ndarray, "layer"]
    n_groups: int
    n_folds: int

    @property
    def chance(self) -> float:
        return 1.0 / len(self.labels)

    def to_dict(self) -> dict:
        return {"site": self.site, "layers": self.layers, "labels": self.labels,
                "centered": self.centered.tolist(), "uncentered": self.uncentered.tolist(),
                "chance": self.chance, "n_groups": self.n_groups, "n_folds": self.n_folds}

    def to_dataframe(self):
        """One row per model layer: ``layer``, ``centered``, ``uncentered``, ``chance``."""
        import pandas as pd

        return pd.DataFrame({"layer": self.layers, "centered": self.centered,
                             "uncentered": self.uncentered, "chance": self.chance})

    def plot(self, title: str | None = None):
        """Decoding accuracy per layer, centred and un-centred, with chance (a Figure)."""
        from .viz.figures import probe_accuracy

        return probe_accuracy({"centred": self.centered, "uncentred": self.uncentered},
                              layers=self.layers, chance=self.chance,
                              title=title or f"nearest-centroid decoding per layer ({self.site})")


def _fold_of(prompts: Sequence[Prompt], n_folds: int) -> np.ndarray:
    scen = sorted({str(p.skeleton_id) for p in prompts})
    if n_folds < 2 or n_folds > len(scen):
        raise ValueError(f"n_folds={n_folds} needs 2 <= n_folds <= {len(scen)} scenarios")
    f = {s: i % n_folds for i, s in enumerate(scen)}
    return np.array([f[str(p.skeleton_id)] for p in prompts])


def nearest_centroid_accuracy(
    acts: Activations,
    prompts: Sequence[Prompt],
    emotions: Sequence[str],
    site: str = "resid_post",
    n_folds: int = 5,
) -> Decodability:
    """Cross-validated nearest-centroid (Euclidean) emotion decoding per layer (see ``Decodability``).

    Only complete groups are used (both variants), so the two numbers are comparable.
    Beware: when prompts differ only by the emotion word, the centred variant decodes the
    word itself (compare ``keyword_control``).
    """
    _check_rows(acts, prompts, "nearest_centroid_accuracy", [site])
    x = acts[site]
    _check_finite(x, site)
    complete, _, mask = _complete_rows(prompts, emotions)
    if not complete:
        raise ValueError(f"nearest_centroid_accuracy: no complete group for {list(emotions)}")
    keep = np.nonzero(mask)[0]
    ps = [prompts[int(i)] for i in keep]
    xs = x[keep].double()
    folds = _fold_of(ps, n_folds)
    E = len(emotions)
    eidx = np.array([list(emotions).index(str(p.emotion)) for p in ps])
    hit_c = torch.zeros(x.shape[1], dtype=torch.float64)
    hit_u = torch.zeros(x.shape[1], dtype=torch.float64)
    n_c = n_u = 0
    for k in range(n_folds):
        tr, te = np.nonzero(folds != k)[0], np.nonzero(folds == k)[0]
        # centred
        d_tr, _ = _deltas(xs[tr], [ps[i] for i in tr], emotions)  # [g, e, L, d]
        cent = d_tr.mean(0)  # [e, L, d]
        d_te, _ = _deltas(xs[te], [ps[i] for i in te], emotions)
        dist = torch.cdist(d_te.permute(2, 0, 1, 3).reshape(x.shape[1], -1, x.shape[2]),
                           cent.permute(1, 0, 2))  # [L, g*e, e]
        truth = torch.arange(E).repeat(d_te.shape[0])
        hit_c += (dist.argmin(-1) == truth).double().sum(1)
        n_c += d_te.shape[0] * E
        # un-centred
        mu = torch.stack([xs[tr][torch.from_numpy(eidx[tr] == e)].mean(0) for e in range(E)])  # [e, L, d]
        dist_u = torch.cdist(xs[te].permute(1, 0, 2), mu.permute(1, 0, 2))  # [L, n_te, e]
        hit_u += (dist_u.argmin(-1) == torch.from_numpy(eidx[te])).double().sum(1)
        n_u += len(te)
    return Decodability(site, list(acts.layers[site]), list(emotions), (hit_c / n_c).numpy(),
                        (hit_u / n_u).numpy(), len(complete), n_folds)


@dataclass
class KeywordControlResult(Result):
    """Decodability of the emotion instruction vs the same instruction with control words
    (does the direction encode the instruction word itself?)."""

    emotion: Decodability
    control: Decodability
    control_words: list[str]
    cosine_to_control: Float[np.ndarray, "layer"] | None = None

    def to_dict(self) -> dict:
        return {"emotion": self.emotion.to_dict(), "control": self.control.to_dict(),
                "control_words": self.control_words}

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({
            "layer": self.emotion.layers,
            "emotion_centered": self.emotion.centered, "control_centered": self.control.centered,
            "emotion_uncentered": self.emotion.uncentered, "control_uncentered": self.control.uncentered,
        })

    def plot(self):
        """Decoding accuracy per layer of the emotion instruction and of the control words
        (centred and un-centred), with chance: a Figure."""
        from .viz.figures import probe_accuracy

        return probe_accuracy({"emotion (centred)": self.emotion.centered,
                               "control (centred)": self.control.centered,
                               "emotion (uncentred)": self.emotion.uncentered,
                               "control (uncentred)": self.control.uncentered},
                              layers=self.emotion.layers, chance=self.emotion.chance,
                              title="emotion instruction vs control words")

    def format(self) -> str:
        lines = [f"{'layer':>5} {'emo(c)':>8} {'ctrl(c)':>8} {'emo(u)':>8} {'ctrl(u)':>8}   "
                 f"chance emo {self.emotion.chance:.2f} / ctrl {self.control.chance:.2f}"]
        for j, layer in enumerate(self.emotion.layers):
            lines.append(f"{layer:>5} {self.emotion.centered[j]:>8.3f} {self.control.centered[j]:>8.3f} "
                         f"{self.emotion.uncentered[j]:>8.3f} {self.control.uncentered[j]:>8.3f}")
        return "\n".join(lines)


def keyword_control(
    model,
    records: Sequence,
    emotions: Sequence[str],
    control_words: Sequence[str] = ("red", "blue", "green", "yellow", "purple", "orange"),
    *,
    site: str = "resid_post",
    layers: Sequence[int] | None = None,
    n_folds: int = 4,
    chat: bool | None = None,
    batch_size: int = 16,
    emotion_acts: Activations | None = None,
    progress: bool = True,
) -> KeywordControlResult:
    """Same extraction and decoding with "Always reply in {word}." for non-emotion words.

    If the control words decode as well as the emotions, decodability says little beyond the
    keyword's identity (a known flaw: the prompts contain the emotion word). ``emotion_acts``
    reuses already collected emotion activations (rows in
    ``emotion_prompts(model, records, emotions)`` order).
    """
    from .prompts import emotion_prompts

    if len(set(control_words)) != len(control_words) or len(control_words) < 2:
        raise ValueError(f"control_words must be >= 2 distinct words, got {list(control_words)}")
    clash = set(control_words) & set(emotions)
    if clash:
        raise ValueError(f"control words {sorted(clash)} are emotions")
    ep = emotion_prompts(model, records, emotions, chat=chat)
    cp = emotion_prompts(model, records, list(control_words), chat=chat)
    ea = emotion_acts if emotion_acts is not None else collect(
        model, ep, [site], layers=layers, batch_size=batch_size, progress=progress)
    ca = collect(model, cp, [site], layers=ea.layers[site], batch_size=batch_size, progress=progress)
    ed = nearest_centroid_accuracy(ea, ep, emotions, site, n_folds)
    cd = nearest_centroid_accuracy(ca, cp, list(control_words), site, n_folds)
    return KeywordControlResult(ed, cd, list(control_words))


# ----------------------------------------------------------------------------- reply directions


def reply_mean_activations(
    model,
    prompts: Sequence[Prompt | str],
    reply_tokens: Sequence[Sequence[int]],
    sites: Sequence[str] | str = ("resid_post",),
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[Activations, list[int]]:
    """Mean activation over each reply's token positions, prompt + reply fed as one sequence.

    Returns ``(acts [n_kept, layer, d_model], kept row indices)``; rows with an empty reply
    are dropped. Positions come from re-tokenising prompt + decoded reply (index tensor into
    ``collect``), so the mean is over exactly the reply tokens of the re-tokenised text.
    """
    from .prompts import encode

    if isinstance(sites, str):
        sites = (sites,)
    if len(prompts) != len(reply_tokens):
        raise ValueError(f"{len(prompts)} prompts but {len(reply_tokens)} replies")
    tok = model.tokenizer
    texts, ks, kept = [], [], []
    for i, (p, r) in enumerate(zip(prompts, reply_tokens, strict=True)):
        pt = p.text if isinstance(p, Prompt) else p
        full = pt + tok.decode(list(r), skip_special_tokens=True)
        k = len(encode(model, full)) - len(encode(model, pt))
        if len(r) == 0 or k <= 0:
            continue
        texts.append(full)
        ks.append(k)
        kept.append(i)
    if not texts:
        raise ValueError("reply_mean_activations: every reply is empty")
    out: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    lay = None
    from .progress import tqdm

    for s0 in tqdm(range(0, len(texts), batch_size), desc="reply acts", disable=not progress, leave=False):
        kk = ks[s0:s0 + batch_size]
        K = max(kk)
        idx = torch.tensor([[-(k - min(j, k - 1)) for j in range(K)] for k in kk])  # -k..-1, then -1
        w = torch.tensor([[1.0 if j < k else 0.0 for j in range(K)] for k in kk])
        a = collect(model, texts[s0:s0 + batch_size], list(sites), position=idx, layers=layers,
                    batch_size=batch_size, progress=False)
        lay = a.layers
        for s in sites:
            x = a[s]  # [b, L, K, d]
            out[s].append((x * w[:, None, :, None]).sum(2) / w.sum(1)[:, None, None])
    assert lay is not None
    acts = Activations({s: torch.cat(v) for s, v in out.items()}, lay, "index",
                       meta={"prompts_hash": prompts_hash(texts), "n": len(texts),
                             "model": getattr(model.cfg, "emocircuits_alias", ""),
                             "reply_tokens_mean": float(np.mean(ks))})
    return acts, kept


def reply_directions(
    model,
    records: Sequence,
    emotions: Sequence[str],
    *,
    sites: Sequence[str] | str = ("resid_post",),
    layers: Sequence[int] | None = None,
    gen_config=None,
    chat: bool | None = None,
    batch_size: int = 16,
    progress: bool = True,
    config=None,
) -> EmotionDirections:
    """Directions read from what the model *wrote*: generate under "Always reply in {e}", take
    the mean activation over the reply tokens, then group-centre as in ``context_agnostic``.

    Groups whose reply is empty for some emotion are dropped (``meta["dropped"]``).
    ``gen_config``: the ``GenerationConfig`` (``config=``: deprecated name).
    """
    from .deprecation import renamed_keyword
    from .generation import GenerationConfig, generate
    from .prompts import emotion_prompts

    gen_config = renamed_keyword("reply_directions", "config", "gen_config", config, gen_config, None)
    ep = emotion_prompts(model, records, emotions, chat=chat)
    gen = generate(model, ep, gen_config or GenerationConfig(max_new_tokens=30), progress=progress)
    acts, kept = reply_mean_activations(model, ep, gen.tokens, sites, layers=layers,
                                        batch_size=batch_size, progress=progress)
    kp = [ep[i] for i in kept]
    d = context_agnostic(acts, kp, emotions)
    d.meta.update(method="reply_mean", data_hash=prompts_hash(ep), n_empty_replies=len(ep) - len(kept),
                  reply_tokens_mean=acts.meta["reply_tokens_mean"],
                  examples=[{"key": ep[i].key, "text": gen.texts[i]} for i in range(min(6, len(ep)))])
    return d
