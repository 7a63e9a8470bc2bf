"""Continuous valence–arousal control and the emotion-vocabulary baseline.

Valence–arousal (VA) directions, per layer l (rows unit-normalised, axis 0 = valence
pointing to pleasant, axis 1 = arousal pointing to high):

* ``method="lstsq"`` — from emotion directions D (E × d, one row per emotion at layer l)
  and the emotions' Russell–Mehrabian (1977) coordinates V (E × 2): the least-squares map

      W = argmin_W ‖V_c W − D_c‖²_F = (V_cᵀ V_c)⁻¹ V_cᵀ D_c        (2 × d)

  with V_c, D_c centred over emotions (an intercept: group-centred directions sum to zero
  over emotions, the published coordinates do not). valence/arousal = rows of W / ‖row‖.
* ``method="contrastive"`` — from activations: valence = mean over scenarios of
  h(positive event) − h(negative event) on neutral-instruction prompts; arousal =
  mean(high-arousal emotions' prompts) − mean(low-arousal), both as group-centred
  differences (``directions.group_centered_means``), unit per layer.

Continuous control (``va_steer``) adds α·(t_v·v̂_l + t_a·â_l) at each steered layer
(the dose is linear in the target (t_v, t_a) ∈ [-1, 1]²; (0, 0) is no steering).
``controllability`` generates on a grid of targets and measures the replies' VA two ways:

* text VA (``va_of_texts``): the judge's emotion distribution projected on
  Russell–Mehrabian VA, va(x) = Σ_e p(e|x)·(v_e, a_e) / Σ_e p(e|x) (probability-weighted
  mean; "neutral" sits at the origin);
* readout VA (``readout_va``): the logit readout's share at the reply start
  (next-token mass on each emotion's words, renormalised) projected the same way.

It reports, per axis, Pearson r and MAE between target and measured, Spearman ρ and the
fraction of monotonic steps of the dose–response (after LARA-Gen, 2025, which reports
target-vs-predicted VA correlation as controllability). Measured VA lives in the hull of
the published coordinates (valence ∈ [−0.64, 0.81], arousal ∈ [−0.27, 0.67]), so MAE
against targets in [−1, 1] is scale-bound; r and ρ are scale-free.

Emotion-vocabulary baseline (after ECM, Zhou et al. 2018):

* ``VocabularyBias``: a ``generate`` logits processor adding ``strength`` to the logits of
  the target emotion's word tokens (and nothing else) — the token set the logit readout
  measures, ``judges.readout.emotion_tokens``;
* ``DecayingSchedule``: a steering strength α_k = max(floor, α₀·exp(−λ·k)·γ^{m_k}), k the
  decode call (0 = prefill) and m_k the number of emotion-word tokens generated so far —
  strong at the start of the reply, fading as emotion words appear (ECM's internal
  memory). Pass it as ``strength`` to ``steer`` and its ``observer`` to ``generate``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float

from .deprecation import renamed_keyword, warn_deprecated
from .directions import EmotionDirections, group_centered_means
from .emotions import EKMAN6, EMOTION_WORDS, NEUTRAL, VA_COORDINATES
from .prompts import Prompt, encode
from .results import Result

EPS = 1e-12
AXES: tuple[str, str] = ("valence", "arousal")
HIGH_AROUSAL: tuple[str, ...] = ("anger", "fear", "surprise")
LOW_AROUSAL: tuple[str, ...] = ("sadness", NEUTRAL)
VA_EMOTIONS: tuple[str, ...] = EKMAN6 + (NEUTRAL,)


# ============================================================================ directions


@dataclass
class VADirections(Result):
    """Unit valence and arousal directions per layer: ``vectors[axis, layer, d_model]``.

    ``layers[i]`` is the model layer of ``vectors[:, i]``; ``site`` the hook site they live in.
    """

    vectors: Float[torch.Tensor, "axis layer d_model"]
    layers: list[int]
    method: str
    site: str = "resid_post"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vectors.dim() != 3 or self.vectors.shape[0] != 2:
            raise ValueError(f"VADirections.vectors must be [2, layer, d_model], got {tuple(self.vectors.shape)}")
        if len(self.layers) != self.vectors.shape[1]:
            raise ValueError(f"VADirections: {len(self.layers)} layers for {self.vectors.shape[1]} vectors")

    @property
    def valence(self) -> Float[torch.Tensor, "layer d_model"]:
        return self.vectors[0]

    @property
    def arousal(self) -> Float[torch.Tensor, "layer d_model"]:
        return self.vectors[1]

    def index(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise IndexError(f"VADirections has no layer {layer}; it has {self.layers}") from None

    def combine(self, target: tuple[float, float],
                layers: Sequence[int] | None = None) -> Float[torch.Tensor, "layer d_model"]:
        """t_v·valence + t_a·arousal at ``layers`` (default all), not re-normalised."""
        tv, ta = _check_target(target)
        idx = [self.index(int(lyr)) for lyr in layers] if layers is not None else list(range(len(self.layers)))
        return tv * self.vectors[0, idx] + ta * self.vectors[1, idx]

    def axis_cosine(self) -> Float[torch.Tensor, "layer"]:
        """cos(valence, arousal) per layer."""
        return torch.nn.functional.cosine_similarity(self.vectors[0], self.vectors[1], dim=-1)


def _check_target(target: Sequence[float]) -> tuple[float, float]:
    if len(target) != 2:
        raise ValueError(f"target must be (valence, arousal), got {target!r}")
    tv, ta = float(target[0]), float(target[1])
    if not (-1.0 <= tv <= 1.0 and -1.0 <= ta <= 1.0):
        raise ValueError(f"target {target!r} is outside [-1, 1]²")
    return tv, ta


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / (x.norm(dim=-1, keepdim=True) + EPS)


def va_map(
    directions: Float[torch.Tensor, "emotion *layer d_model"],
    coords: Float[torch.Tensor, "emotion 2"],
    *,
    center: bool = True,
) -> Float[torch.Tensor, "*layer 2 d_model"]:
    """Least-squares W with V W ≈ D per layer: W = (VᵀV)⁻¹VᵀD (V, D centred over emotions
    when ``center``), computed in float64 with ``torch.linalg.lstsq``."""
    D = directions.double()
    V = coords.double().to(D.device)
    if V.shape != (D.shape[0], 2):
        raise ValueError(f"va_map: coords must be [{D.shape[0]}, 2] (one per emotion), got {tuple(V.shape)}")
    if D.shape[0] < 3:
        raise ValueError(f"va_map: need at least 3 emotions for a 2-D map with intercept, got {D.shape[0]}")
    if center:
        D = D - D.mean(0, keepdim=True)
        V = V - V.mean(0, keepdim=True)
    if torch.linalg.matrix_rank(V) < 2:
        raise ValueError("va_map: the emotions' VA coordinates are collinear; W is not identifiable")
    flat = D.reshape(D.shape[0], -1)                       # E × (layer·d)
    W = torch.linalg.lstsq(V, flat).solution               # 2 × (layer·d)
    W = W.reshape(2, *D.shape[1:])                         # 2 × *layer × d
    return W.movedim(0, -2).float()


def va_directions(
    method: Literal["lstsq", "contrastive"] = "lstsq",
    *,
    directions: Float[torch.Tensor, "emotion layer d_model"] | EmotionDirections | None = None,
    emotions: Sequence[str] | None = None,
    va: Mapping[str, tuple[float, float]] = VA_COORDINATES,
    neutral_acts: Float[torch.Tensor, "n layer d_model"] | None = None,
    neutral_prompts: Sequence[Prompt] | None = None,
    emotion_acts: Float[torch.Tensor, "m layer d_model"] | None = None,
    emotion_prompts: Sequence[Prompt] | None = None,
    high_arousal: Sequence[str] = HIGH_AROUSAL,
    low_arousal: Sequence[str] = LOW_AROUSAL,
    layers: Sequence[int] | None = None,
    site: str = "resid_post",
) -> VADirections:
    """Valence and arousal directions (module docstring).

    ``lstsq``: ``directions`` = ``EmotionDirections`` (its ``site``; ``emotions`` and ``layers``
    default to its own) or a tensor [emotion, layer, d_model] (e.g. ``group_centered_means(...,
    normalize=True)``) for ``emotions`` (default EKMAN6).
    ``contrastive``: ``neutral_acts`` of neutral-instruction prompts (``neutral_prompts`` give
    skeleton_id and valence "positive"/"negative") and ``emotion_acts`` of emotion-instructed
    prompts (``emotion_prompts`` give group and emotion; "neutral" counts as an emotion label).
    ``layers`` names the model layers of the layer axis (default 0..L−1).
    """
    if method == "lstsq":
        if directions is None:
            raise ValueError("va_directions(method='lstsq') needs directions=[emotion, layer, d_model]")
        if isinstance(directions, EmotionDirections):
            emotions = tuple(emotions) if emotions is not None else tuple(directions.emotions)
            layers = directions.layers if layers is None else layers
            directions = directions.tensor(site, emotions)
        emotions = tuple(emotions) if emotions is not None else EKMAN6
        if directions.dim() != 3 or directions.shape[0] != len(emotions):
            raise ValueError(f"directions must be [{len(emotions)} emotions, layer, d_model], "
                             f"got {tuple(directions.shape)}")
        missing = [e for e in emotions if e not in va]
        if missing:
            raise KeyError(f"va_directions: no VA coordinates for {missing}")
        V = torch.tensor([va[e] for e in emotions], dtype=torch.float64)
        W = va_map(directions, V)                            # layer × 2 × d
        vec = _unit(W.movedim(-2, 0))                        # 2 × layer × d
        meta = {"emotions": list(emotions), "va": {e: list(va[e]) for e in emotions},
                "row_norms": W.norm(dim=-1).T.tolist()}
    elif method == "contrastive":
        if neutral_acts is None or neutral_prompts is None or emotion_acts is None or emotion_prompts is None:
            raise ValueError("va_directions(method='contrastive') needs neutral_acts + neutral_prompts "
                             "and emotion_acts + emotion_prompts")
        _check_rows("neutral_acts", neutral_acts, neutral_prompts)
        _check_rows("emotion_acts", emotion_acts, emotion_prompts)
        u_val, g_val = group_centered_means(
            neutral_acts, [p.skeleton_id for p in neutral_prompts], [str(p.valence) for p in neutral_prompts],
            ("positive", "negative"))
        valence = u_val[0] - u_val[1]
        labels: list[str] = [p.emotion or NEUTRAL for p in emotion_prompts]
        present = set(labels)
        hi = [e for e in high_arousal if e in present]
        lo = [e for e in low_arousal if e in present]
        if not hi or not lo:
            raise ValueError(f"va_directions: emotion_prompts lack high-arousal {list(high_arousal)} "
                             f"or low-arousal {list(low_arousal)} emotions (have {sorted(present)})")
        u_ar, g_ar = group_centered_means(emotion_acts, [p.group for p in emotion_prompts], labels,
                                          tuple(hi) + tuple(lo))
        arousal = u_ar[:len(hi)].mean(0) - u_ar[len(hi):].mean(0)
        vec = _unit(torch.stack([valence, arousal]).float())
        meta = {"high_arousal": hi, "low_arousal": lo, "valence_groups": g_val.describe(),
                "arousal_groups": g_ar.describe(),
                "raw_norms": [valence.norm(dim=-1).tolist(), arousal.norm(dim=-1).tolist()]}
    else:
        raise ValueError(f"va_directions: method must be 'lstsq' or 'contrastive', not {method!r}")
    n_layer = vec.shape[1]
    lay = list(range(n_layer)) if layers is None else [int(lyr) for lyr in layers]
    if len(lay) != n_layer:
        raise ValueError(f"va_directions: {len(lay)} layers named for {n_layer} layers of data")
    return VADirections(vec.float(), lay, method, site, meta)


def _check_rows(name: str, acts: torch.Tensor, prompts: Sequence) -> None:
    if acts.dim() != 3 or acts.shape[0] != len(prompts):
        raise ValueError(f"{name} must be [n={len(prompts)}, layer, d_model], got {tuple(acts.shape)}")


@dataclass
class VAComparison(Result):
    """cos(a, b) per axis and layer, and each set's own cos(valence, arousal)."""

    layers: list[int]
    cosine: Float[torch.Tensor, "axis layer"]
    axis_cosine_a: Float[torch.Tensor, "layer"]
    axis_cosine_b: Float[torch.Tensor, "layer"]

    def to_dict(self) -> dict:
        return {"layers": self.layers, "valence_cos": self.cosine[0].tolist(),
                "arousal_cos": self.cosine[1].tolist(),
                "axis_cos_a": self.axis_cosine_a.tolist(), "axis_cos_b": self.axis_cosine_b.tolist()}

    def to_dataframe(self):
        """One row per shared model layer: ``valence_cos``, ``arousal_cos``, ``axis_cos_a``,
        ``axis_cos_b``."""
        import pandas as pd

        return pd.DataFrame({"layer": self.layers, "valence_cos": self.cosine[0].numpy(),
                             "arousal_cos": self.cosine[1].numpy(),
                             "axis_cos_a": self.axis_cosine_a.numpy(),
                             "axis_cos_b": self.axis_cosine_b.numpy()})


def compare_va_directions(a: VADirections, b: VADirections) -> VAComparison:
    """Cosine between the two sets' valence (and arousal) directions at their shared layers."""
    shared = [lyr for lyr in a.layers if lyr in b.layers]
    if not shared:
        raise ValueError(f"compare_va_directions: no shared layers ({a.layers} vs {b.layers})")
    va_ = a.vectors[:, [a.index(lyr) for lyr in shared]]
    vb = b.vectors[:, [b.index(lyr) for lyr in shared]]
    cos = torch.nn.functional.cosine_similarity(va_.double(), vb.double(), dim=-1).float()
    return VAComparison(shared, cos, a.axis_cosine()[[a.index(lyr) for lyr in shared]],
                        b.axis_cosine()[[b.index(lyr) for lyr in shared]])


# ============================================================================ VA measurement


def va_of_distribution(
    probs: Float[np.ndarray, "n emotion"],
    emotions: Sequence[str],
    va: Mapping[str, tuple[float, float]] = VA_COORDINATES,
) -> Float[np.ndarray, "n 2"]:
    """Probability-weighted mean VA: Σ_e p_e·(v_e, a_e) / Σ_e p_e per row."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(emotions):
        raise ValueError(f"probs must be [n, {len(emotions)}] for emotions {list(emotions)}, got {p.shape}")
    missing = [e for e in emotions if e not in va]
    if missing:
        raise KeyError(f"va_of_distribution: no VA coordinates for {missing}")
    if (p < 0).any() or not np.isfinite(p).all():
        raise ValueError("va_of_distribution: probabilities must be finite and >= 0")
    coords = np.array([va[e] for e in emotions], dtype=np.float64)
    z = p.sum(1, keepdims=True)
    if (z <= 0).any():
        raise ValueError(f"va_of_distribution: rows {np.nonzero(z[:, 0] <= 0)[0][:5].tolist()} have zero mass")
    return (p / z) @ coords


def va_of_texts(
    texts: Sequence[str],
    judge: Any = None,
    va: Mapping[str, tuple[float, float]] = VA_COORDINATES,
) -> Float[np.ndarray, "n 2"]:
    """Text VA: the judge's emotion distribution projected on Russell–Mehrabian VA.

    ``judge``: anything with ``judge(texts, targets) -> JudgeResult`` whose ``scores`` are
    per-emotion probabilities; default ``default_judge(EKMAN6 + neutral)`` so that texts
    without emotion cues fall towards neutral (the origin).
    """
    if isinstance(texts, str):
        raise TypeError("va_of_texts: texts must be a sequence of strings, not a str")
    if len(texts) == 0:
        return np.zeros((0, 2))
    if judge is None:
        from .judges import default_judge
        judge = default_judge(VA_EMOTIONS)
    emos = tuple(getattr(judge, "names", None) or getattr(judge, "emotions", None) or ())
    targets = [emos[0]] * len(texts) if emos else [EKMAN6[0]] * len(texts)
    res = judge.judge(list(texts), targets)
    return va_of_distribution(res.scores, res.emotions, va)


def readout_va(
    model,
    prompts: Sequence[str | Prompt],
    *,
    emotions: Sequence[str] = VA_EMOTIONS,
    va: Mapping[str, tuple[float, float]] = VA_COORDINATES,
    batch_size: int = 16,
) -> Float[np.ndarray, "n 2"]:
    """Readout VA: the next-token emotion-word share at each prompt's end projected on VA
    (runs under whatever hooks are active, e.g. inside ``va_steer``)."""
    from .judges.readout import emotion_readout
    r = emotion_readout(model, prompts, emotions, batch_size=batch_size)
    return va_of_distribution(r.share, r.emotions, va)


# ============================================================================ steering


@contextmanager
def va_steer(
    model,
    va_dirs: VADirections,
    target: tuple[float, float],
    strength: float | Callable[[int], Any] = 8.0,
    layers: Sequence[int] | None = None,
    *,
    scale: Literal["rms", "none", "unit"] = "rms",
    positions: str = "last",
) -> Iterator[None]:
    """Steer along t_v·v̂ + t_a·â at ``layers`` (default all of ``va_dirs``) with ``steer``:
    h ← h + α·s(h)·(t_v·v̂_l + t_a·â_l), s = rms(h) (``scale="rms"``) or 1 (``"none"``;
    ``"unit"`` is its old name). α = ``strength``, which may be a schedule."""
    from .steering import steer

    lay = list(va_dirs.layers) if layers is None else [int(lyr) for lyr in layers]
    combo = va_dirs.combine(target, lay)
    if float(combo.abs().max()) == 0.0:  # (0, 0): nothing to add
        yield
        return
    if combo.shape[-1] != model.cfg.d_model:
        raise ValueError(f"va_steer: directions have d_model {combo.shape[-1]}, the model {model.cfg.d_model}")
    full = torch.zeros(model.cfg.n_layers, combo.shape[-1])
    for i, lyr in enumerate(lay):
        full[lyr] = combo[i]
    with steer(model, full, layers=lay, strength=strength, scale=scale, positions=positions,
               site=va_dirs.site):
        yield


def default_grid(levels: Sequence[float] = (-1.0, -0.5, 0.0, 0.5, 1.0)) -> list[tuple[float, float]]:
    """The product grid levels × levels of (valence, arousal) targets."""
    return [(float(v), float(a)) for v in levels for a in levels]


@dataclass
class AxisScores(Result):
    """Target vs measured along one axis."""

    pearson_r: float
    mae: float
    spearman: float              # over grid-point means vs targets
    monotonic_fraction: float    # fraction of adjacent steps along the axis where the mean rises
    line_spearman: float         # mean Spearman along each line (other axis fixed)


@dataclass
class ControllabilityResult(Result):
    """Per grid point: targets, measured VA per prompt (text judge and readout), texts."""

    targets: list[tuple[float, float]]
    text_va: Float[np.ndarray, "target prompt 2"]
    readout_va: Float[np.ndarray, "target prompt 2"] | None
    texts: list[list[str]]
    meta: dict[str, Any] = field(default_factory=dict)

    def scores(self, source: Literal["text", "readout"] = "text") -> dict[str, AxisScores]:
        m = self.text_va if source == "text" else self.readout_va
        if m is None:
            raise ValueError("controllability was run without the readout (readout_prompts=None)")
        return {ax: axis_scores(self.targets, m, i) for i, ax in enumerate(AXES)}

    def to_dataframe(self):
        """One row per grid point: the target (``target_valence``, ``target_arousal``) and the
        mean measured VA over prompts (``text_*``, and ``readout_*`` when measured)."""
        import pandas as pd

        df = pd.DataFrame({"target_valence": [float(t[0]) for t in self.targets],
                           "target_arousal": [float(t[1]) for t in self.targets]})
        for name, m in (("text", self.text_va), ("readout", self.readout_va)):
            if m is not None:
                mean = np.asarray(m, dtype=np.float64).mean(1)
                df[f"{name}_valence"], df[f"{name}_arousal"] = mean[:, 0], mean[:, 1]
        return df

    def to_dict(self) -> dict:
        out = {"targets": [list(t) for t in self.targets],
               "text_va_mean": self.text_va.mean(1).tolist(),
               "text_scores": {k: v.to_dict() for k, v in self.scores("text").items()},
               "meta": self.meta}
        if self.readout_va is not None:
            out["readout_va_mean"] = self.readout_va.mean(1).tolist()
            out["readout_scores"] = {k: v.to_dict() for k, v in self.scores("readout").items()}
        return out


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson r (``scipy.stats.pearsonr``; nan when either side is constant)."""
    from scipy import stats

    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(xa) < 2 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return float("nan")
    return float(stats.pearsonr(xa, ya).statistic)


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman ρ (``scipy.stats.spearmanr``: Pearson r of the tie-averaged ranks; nan when
    either side is constant)."""
    from scipy import stats

    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(xa) < 2 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return float("nan")
    return float(stats.spearmanr(xa, ya).statistic)


def axis_scores(targets: Sequence[tuple[float, float]], measured: np.ndarray, axis: int) -> AxisScores:
    """Scores for ``axis`` from ``measured[target, prompt, 2]`` (module docstring)."""
    t = np.array(targets, dtype=np.float64)                     # T × 2
    m = np.asarray(measured, dtype=np.float64)
    if m.ndim != 3 or m.shape[0] != len(t) or m.shape[2] != 2:
        raise ValueError(f"measured must be [{len(t)} targets, prompt, 2], got {m.shape}")
    tt = np.repeat(t[:, axis], m.shape[1])
    mm = m[:, :, axis].reshape(-1)
    means = m[:, :, axis].mean(1)
    other = 1 - axis
    steps, ups, rhos = 0, 0, []
    for o in np.unique(t[:, other]):
        sel = np.nonzero(t[:, other] == o)[0]
        if len(sel) < 2:
            continue
        sel = sel[np.argsort(t[sel, axis])]
        d = np.diff(means[sel])
        steps += len(d)
        ups += int((d > 0).sum())
        if len(sel) >= 3 or len(sel) == 2:
            rhos.append(spearman(t[sel, axis], means[sel]))
    rhos = [r for r in rhos if not math.isnan(r)]
    return AxisScores(
        pearson_r=pearson(tt, mm), mae=float(np.abs(tt - mm).mean()),
        spearman=spearman(t[:, axis], means),
        monotonic_fraction=ups / steps if steps else float("nan"),
        line_spearman=float(np.mean(rhos)) if rhos else float("nan"),
    )


def controllability(
    model,
    prompts: Sequence[str | Prompt],
    va_dirs: VADirections,
    grid: Sequence[tuple[float, float]] | None = None,
    strength: float = 8.0,
    layers: Sequence[int] | None = None,
    *,
    judge_va: Callable[[Sequence[str]], np.ndarray] | None = None,
    readout_prompts: Sequence[str | Prompt] | None = None,
    gen_config=None,
    scale: Literal["rms", "none", "unit"] = "rms",
    positions: str = "last",
    progress: bool = True,
    config=None,
    **gen_overrides,
) -> ControllabilityResult:
    """Generate under ``va_steer`` at every grid target and measure the replies' VA.

    ``judge_va(texts) -> [n, 2]`` (default ``va_of_texts``); ``readout_prompts`` (e.g. the
    same prompts ending in an assistant prefix "I feel") adds the readout VA under steering.
    ``gen_config``: the ``GenerationConfig`` (``config=``: deprecated name).
    """
    gen_config = renamed_keyword("controllability", "config", "gen_config", config, gen_config, None)
    from .generation import GenerationConfig, generate
    from .progress import tqdm
    grid = list(grid) if grid is not None else default_grid()
    for g in grid:
        _check_target(g)
    if not prompts:
        raise ValueError("controllability: no prompts")
    if readout_prompts is not None and len(readout_prompts) != len(prompts):
        raise ValueError(f"controllability: {len(readout_prompts)} readout_prompts for {len(prompts)} prompts")
    judge_va = judge_va or va_of_texts
    cfg = gen_config or GenerationConfig(max_new_tokens=30)
    text_va, ro_va, texts = [], [], []
    for tgt in tqdm(grid, desc="va grid", disable=not progress, leave=False):
        with va_steer(model, va_dirs, tgt, strength, layers, scale=scale, positions=positions):
            gen = generate(model, prompts, cfg, progress=False, **gen_overrides)
            if readout_prompts is not None:
                ro_va.append(readout_va(model, readout_prompts))
        texts.append(gen.texts)
        text_va.append(np.asarray(judge_va(gen.texts), dtype=np.float64))
    meta = {"strength": strength, "layers": list(va_dirs.layers if layers is None else layers),
            "method": va_dirs.method, "site": va_dirs.site, "scale": scale, "positions": positions,
            "n_prompts": len(prompts), "max_new_tokens": cfg.max_new_tokens}
    return ControllabilityResult(grid, np.stack(text_va), np.stack(ro_va) if ro_va else None, texts, meta)


# ============================================================================ vocabulary


def _word_token_ids(model_or_tokenizer, emotions: Sequence[str],
                    words: Mapping[str, Sequence[str]] | None = None, **kw) -> dict[str, tuple[int, ...]]:
    """``{emotion: ids}`` of the one emotion token set (``judges.readout.emotion_tokens``) for
    ``emotions`` with ``words`` (default: the builtin lists)."""
    from .emotions import EmotionSet
    from .judges.readout import emotion_tokens

    words = EMOTION_WORDS if words is None else words
    missing = [e for e in emotions if e not in words]
    if missing:
        raise KeyError(f"no word list for emotion {missing[0]!r}")
    es = EmotionSet(tuple(emotions), {e: tuple(words[e]) for e in emotions})
    return dict(emotion_tokens(model_or_tokenizer, es, **kw).token_ids)


def emotion_word_token_ids(
    model_or_tokenizer,
    emotions: Sequence[str] = EKMAN6,
    *,
    words: Mapping[str, Sequence[str]] = EMOTION_WORDS,
    forms: Sequence[str] = (" {w}", "{w}"),
    min_prefix: int = 4,
) -> dict[str, tuple[int, ...]]:
    """Deprecated: ``judges.readout.emotion_tokens(model, emotions).token_ids`` (the one emotion
    token set, which this function's rule became: first tokens of " w" and "w" that decode to
    the word or a prefix of >= ``min_prefix`` letters, unshared between emotions)."""
    warn_deprecated("control.emotion_word_token_ids",
                    "emocircuits.judges.readout.emotion_tokens(model, emotions).token_ids")
    return _word_token_ids(model_or_tokenizer, emotions, words, forms=forms, min_prefix=min_prefix)


class VocabularyBias:
    """Logits processor: logits[i, T_{target_i}] += strength (nothing else changes).

    ``targets``: one emotion for every row, or one per prompt. Because ``generate`` sorts
    prompts by length into batches, per-prompt targets need ``prompt_ids`` (each prompt's
    token ids, e.g. from ``VocabularyBias.for_prompts``): rows are matched to prompts by
    their ids at step 0; repeats of one prompt take its targets in input order (``generate``
    sorts stably), cycling when the processor is reused. Without ``prompt_ids`` a list is
    taken positionally per batch.
    """

    def __init__(self, token_ids: Mapping[str, Sequence[int]] | Any, targets: str | Sequence[str],
                 strength: float = 4.0, *, prompt_ids: Sequence[Sequence[int]] | None = None) -> None:
        token_ids = getattr(token_ids, "token_ids", token_ids)  # an EmotionTokens, or a mapping
        self.token_ids = {e: tuple(int(t) for t in ids) for e, ids in token_ids.items()}
        self.strength = float(strength)
        self.targets: str | tuple[str, ...] = targets if isinstance(targets, str) else tuple(targets)
        for e in ([self.targets] if isinstance(self.targets, str) else self.targets):
            if e not in self.token_ids:
                raise KeyError(f"VocabularyBias: target {e!r} has no tokens (have {sorted(self.token_ids)})")
        self._by_prompt: dict[tuple[int, ...], list[str]] | None = None
        self._cursor: dict[tuple[int, ...], int] = {}
        if prompt_ids is not None:
            if isinstance(self.targets, str) or len(prompt_ids) != len(self.targets):
                raise ValueError("VocabularyBias: prompt_ids needs one target per prompt")
            self._by_prompt = {}
            for ids, e in zip(prompt_ids, self.targets, strict=False):
                self._by_prompt.setdefault(tuple(int(t) for t in ids), []).append(e)
        self._rows: list[str] = []

    @classmethod
    def for_prompts(cls, model, prompts: Sequence[str | Prompt], targets: Sequence[str],
                    strength: float = 4.0, *, emotions: Sequence[str] = EKMAN6,
                    **token_kw) -> VocabularyBias:
        """Per-prompt targets that survive ``generate``'s reordering."""
        if len(prompts) != len(targets):
            raise ValueError(f"VocabularyBias.for_prompts: {len(prompts)} prompts, {len(targets)} targets")
        ids = [encode(model, p.text if isinstance(p, Prompt) else p) for p in prompts]
        return cls(_word_token_ids(model, emotions, **token_kw), targets, strength, prompt_ids=ids)

    def row_targets(self, step: int, rows: Sequence[Sequence[int]]) -> list[str]:
        if isinstance(self.targets, str):
            return [self.targets] * len(rows)
        if self._by_prompt is None:
            if len(rows) != len(self.targets):
                raise ValueError(f"VocabularyBias: {len(self.targets)} targets for a batch of {len(rows)} rows")
            return list(self.targets)
        if step == 0 or len(self._rows) != len(rows):
            out = []
            for r in rows:
                key = tuple(r)
                if key not in self._by_prompt:
                    raise ValueError("VocabularyBias: a batch row matches none of the prompts given "
                                     "(rows are matched at step 0 by the prompts' ids)")
                queue, c = self._by_prompt[key], self._cursor.get(key, 0)
                out.append(queue[c % len(queue)])
                self._cursor[key] = (c + 1) % len(queue)
            self._rows = out
        return self._rows

    def __call__(self, step: int, rows: Sequence[Sequence[int]], logits: torch.Tensor) -> torch.Tensor:
        tg = self.row_targets(step, rows)
        out = logits.clone()  # one [b, vocab] allocation per step, the input left as it was
        for i, e in enumerate(tg):
            out[i, list(self.token_ids[e])] += self.strength
        return out


# ============================================================================ schedule


class DecayingSchedule:
    """α_k = max(floor, α₀·exp(−decay_per_step·k)·γ^{m_k}), γ = ``decay_per_emotion_word``.

    k is ``steer``'s step (0 = prefill, k = k-th decode call); m_k counts tokens in
    ``token_ids`` among the first k generated tokens of a row. Use ``schedule`` as ``strength``
    and ``schedule.observer`` in ``generate(..., logits_processors=[...])``: the observer
    keeps the row lists ``generate`` passes (they grow in place as tokens are chosen), so at
    decode call k all k tokens are counted. ``__call__`` returns the batch mean over rows
    (``per_row`` the [batch] tensor). Calling it at k = 0 resets the per-batch state.
    """

    def __init__(self, alpha0: float, decay_per_step: float = 0.0, decay_per_emotion_word: float = 0.5,
                 floor: float = 0.0, token_ids: Collection[int] = ()) -> None:
        if decay_per_step < 0:
            raise ValueError("DecayingSchedule: decay_per_step must be >= 0")
        if not 0.0 <= decay_per_emotion_word <= 1.0:
            raise ValueError("DecayingSchedule: decay_per_emotion_word (γ) must be in [0, 1]")
        self.alpha0 = float(alpha0)
        self.decay_per_step = float(decay_per_step)
        self.gamma = float(decay_per_emotion_word)
        self.floor = float(floor)
        self.token_ids = frozenset(int(t) for t in token_ids)
        self._rows: Sequence[list[int]] | None = None
        self._starts: list[int] = []
        self.history: list[tuple[int, float, float]] = []  # (k, mean α, mean m) per call

    @classmethod
    def for_model(cls, model, alpha0: float, decay_per_step: float = 0.0,
                  decay_per_emotion_word: float = 0.5, floor: float = 0.0, *,
                  emotions: Sequence[str] = EKMAN6, **token_kw) -> DecayingSchedule:
        ids = _word_token_ids(model, emotions, **token_kw)
        return cls(alpha0, decay_per_step, decay_per_emotion_word, floor,
                   {t for v in ids.values() for t in v})

    def value(self, k: int, m: float | np.ndarray) -> float | np.ndarray:
        """The formula itself."""
        return np.maximum(self.floor, self.alpha0 * np.exp(-self.decay_per_step * k) * self.gamma ** np.asarray(m))

    def observer(self, step: int, rows: Sequence[list[int]], logits: torch.Tensor) -> torch.Tensor:
        """Logits processor that changes nothing; at step 0 it records the batch's rows."""
        if step == 0 or self._rows is None:
            self._rows = rows
            self._starts = [len(r) - step for r in rows]
        return logits

    def counts(self, k: int) -> np.ndarray:
        """m_k per row: emotion-word tokens among the first k generated tokens ([1] zeros
        before the observer has seen a batch)."""
        if k == 0 or self._rows is None:
            return np.zeros(len(self._rows) if self._rows is not None else 1)
        return np.array([sum(t in self.token_ids for t in r[s:s + k])
                         for r, s in zip(self._rows, self._starts, strict=False)], dtype=float)

    def per_row(self, k: int) -> np.ndarray:
        """α_k per row of the current batch."""
        if k == 0:
            self._rows = None
        return np.atleast_1d(self.value(k, self.counts(k)))

    def __call__(self, k: int) -> float:
        """Batch-mean α_k (``steer`` takes one float per call)."""
        a_rows = self.per_row(k)
        a = float(a_rows.mean())
        if not self.history or self.history[-1][0] != k:
            m = self.counts(k)
            self.history.append((k, a, float(m.mean())))
        return a


# ============================================================================ metrics


_WORD = re.compile(r"[A-Za-z']+")


def emotion_word_rate(texts: Sequence[str], targets: Sequence[str] | str,
                      words: Mapping[str, Sequence[str]] = EMOTION_WORDS) -> list[float]:
    """Per text: (# words in the target emotion's word list) / (# words); 0 for empty text."""
    if isinstance(targets, str):
        targets = [targets] * len(texts)
    if len(targets) != len(texts):
        raise ValueError(f"emotion_word_rate: {len(texts)} texts, {len(targets)} targets")
    out = []
    for t, e in zip(texts, targets, strict=False):
        vocab = {w.lower() for w in words[e]}
        ws = [w.lower().strip("'") for w in _WORD.findall(t)]
        out.append(sum(w in vocab for w in ws) / len(ws) if ws else 0.0)
    return out


def any_emotion_word_rate(texts: Sequence[str], emotions: Sequence[str] = EKMAN6,
                          words: Mapping[str, Sequence[str]] = EMOTION_WORDS) -> list[float]:
    """Per text: (# words in any of ``emotions``' word lists) / (# words); 0 for empty text
    (how much emotion vocabulary a method produces, whatever the target)."""
    vocab = {w.lower() for e in emotions for w in words[e]}
    out = []
    for t in texts:
        ws = [w.lower().strip("'") for w in _WORD.findall(t)]
        out.append(sum(w in vocab for w in ws) / len(ws) if ws else 0.0)
    return out


__all__ = [
    "AXES", "AxisScores", "ControllabilityResult", "DecayingSchedule", "VAComparison", "VADirections",
    "VocabularyBias", "any_emotion_word_rate", "axis_scores", "compare_va_directions", "controllability",
    "default_grid", "emotion_word_rate", "emotion_word_token_ids", "pearson", "readout_va", "spearman",
    "va_directions", "va_map", "va_of_distribution", "va_of_texts", "va_steer",
]
