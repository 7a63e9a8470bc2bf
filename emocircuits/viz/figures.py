"""Matplotlib figures of a run (Agg backend, PNG files).

Every function takes plain data (numpy arrays / tensors / dicts of them) or a result object's
fields, writes one PNG to ``out`` (parent folders created, written atomically) and returns its
``Path``; with ``out=None`` it returns the matplotlib ``Figure`` instead (what the results'
``plot()`` methods give). Nothing here touches a model: figures are cheap and testable on
synthetic data.

=============================  ==============================================================
function                       picture
=============================  ==============================================================
``cosine_heatmap``             any square/rectangular cosine matrix with labelled axes
``direction_similarity``       cos(v_e^(site,l), v_e^(site',l')) across layers × sites, per emotion
``emotion_similarity``         cos(v_e, v_e') between emotions at one layer
``sublayer_influence``         I_{L,p} vs layer (one curve per emotion × {attn, mlp})
``probe_accuracy``             probe accuracy per layer, chance line, zero-shot baseline
``sweep_curves``               accuracy (and perplexity) vs α / λ
``method_comparison``          accuracy bars per method, controls hatched
``va_control``                 measured vs target valence and arousal over the control grid
``pca_clusters``               2-D PCA of standardised activations per layer, coloured by emotion
``circuit_graph``              layers × (heads | neurons) grid: which components each emotion uses
=============================  ==============================================================
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

# Agg (no display) everywhere, except under Jupyter's inline backend, which also draws the
# Figures that ``out=None`` returns
_BACKEND = dict.__getitem__(matplotlib.rcParams, "backend")
if not (isinstance(_BACKEND, str) and "inline" in _BACKEND.lower()):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..results import atomic_write_bytes  # noqa: E402

Array = Any  # np.ndarray | torch.Tensor | nested list

_PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf"]


def _np(x: Array) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def png_bytes(fig) -> bytes:
    """``fig`` as PNG bytes (the figures' dpi and tight bounding box); closes it."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def save_figure(fig, out: str | os.PathLike) -> Path:
    """Write ``fig`` to ``out`` atomically (``results.atomic_write_bytes``) and close it."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"figure path {out} must end in .png")
    return atomic_write_bytes(out, png_bytes(fig))


def palette_color(i: int) -> str:
    """The i-th colour of the figures' palette (cycling)."""
    return _PALETTE[i % len(_PALETTE)]


METHOD_COLORS = {"none": "#7f7f7f", "prompting": "#1f77b4", "steering": "#ff7f0e", "circuit": "#d62728",
                 "random circuit": "#bbbbbb", "vocabulary_bias": "#2ca02c", "vocabulary bias": "#2ca02c"}


def method_color(method: str) -> str:
    """One colour per method in every figure and in the report (``"random circuit 3"`` and
    ``"circuit B=3 λ=2"`` take their family's colour; other names a stable palette colour)."""
    m = str(method)
    for key in sorted(METHOD_COLORS, key=len, reverse=True):
        if m == key or m.startswith(key + " "):
            return METHOD_COLORS[key]
    return _PALETTE[sum(map(ord, m)) % len(_PALETTE)]


def finish_figure(fig: Figure, out: str | os.PathLike | None) -> Path | Figure:
    """``out`` given: ``save_figure(fig, out)`` (its Path); ``out=None``: the Figure itself,
    detached from pyplot (not shown twice in Jupyter, not kept alive by pyplot)."""
    if out is None:
        plt.close(fig)
        return fig
    return save_figure(fig, out)


_save, _color = finish_figure, palette_color  # the names used throughout this module


def cosine(a: Array, b: Array | None = None) -> np.ndarray:
    """Row-wise cosine matrix cos(a_i, b_j) = a_i·b_j / (‖a_i‖‖b_j‖) (float64, eps 1e-12)."""
    a = _np(a)
    b = a if b is None else _np(b)
    an = a / (np.linalg.norm(a, axis=-1, keepdims=True) + 1e-12)
    bn = b / (np.linalg.norm(b, axis=-1, keepdims=True) + 1e-12)
    return an @ bn.T


# ----------------------------------------------------------------------------- heatmaps


def cosine_heatmap(matrix: Array, out: str | os.PathLike | None = None, *, xlabels: Sequence[str] | None = None,
                   ylabels: Sequence[str] | None = None, title: str = "",
                   vmin: float = -1.0, vmax: float = 1.0, annotate: bool | None = None,
                   cbar_label: str = "cosine", xlabel: str = "", ylabel: str = "") -> Path | Figure:
    """A cosine (or any [-1, 1]) matrix as a diverging heatmap; annotated when small
    (``cbar_label``, ``xlabel``, ``ylabel``: axis texts, for other signed matrices)."""
    m = _np(matrix)
    if m.ndim != 2:
        raise ValueError(f"cosine_heatmap: matrix must be 2-D, got shape {m.shape}")
    h, w = m.shape
    size = (min(2.0 + 0.35 * w, 16), min(1.5 + 0.35 * h, 16))
    fig, ax = plt.subplots(figsize=size)
    im = ax.imshow(m, cmap="RdBu_r", vmin=vmin, vmax=vmax, aspect="auto")
    fig.colorbar(im, ax=ax, shrink=0.8, label=cbar_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    step_x = max(1, w // 30)
    step_y = max(1, h // 30)
    if xlabels is not None:
        ax.set_xticks(range(0, w, step_x), [xlabels[i] for i in range(0, w, step_x)], rotation=90,
                      fontsize=7)
    if ylabels is not None:
        ax.set_yticks(range(0, h, step_y), [ylabels[i] for i in range(0, h, step_y)], fontsize=7)
    if annotate is None:
        annotate = h * w <= 100
    if annotate:
        for i in range(h):
            for j in range(w):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(m[i, j]) > 0.6 else "black")
    ax.set_title(title)
    return _save(fig, out)


def direction_similarity(vectors: Mapping[str, Array], emotions: Sequence[str],
                         out: str | os.PathLike | None = None, *, emotion: str | None = None) -> Path | Figure:
    """cos between one emotion's unit directions across (layer, site) positions.

    ``vectors[site]``: ``[emotion, layer, d_model]``. Positions are ordered layer-major with
    the sites interleaved (site₀ L0, site₁ L0, site₀ L1, ...) like the paper's 56-position
    analysis. ``emotion=None`` averages the matrix over emotions.
    """
    sites = list(vectors)
    if not sites:
        raise ValueError("direction_similarity: no sites given")
    arrs = {s: _np(v) for s, v in vectors.items()}
    shapes = {s: a.shape for s, a in arrs.items()}
    if len({a.shape[:2] for a in arrs.values()}) != 1 or any(a.ndim != 3 for a in arrs.values()):
        raise ValueError(f"direction_similarity: every site needs [emotion, layer, d]; got {shapes}")
    n_e, n_l = arrs[sites[0]].shape[:2]
    if n_e != len(emotions):
        raise ValueError(f"direction_similarity: {n_e} emotions in vectors, {len(emotions)} names")
    idx = range(n_e) if emotion is None else [list(emotions).index(emotion)]
    labels = [f"{s[:9]} L{layer}" for layer in range(n_l) for s in sites]
    mats = []
    for e in idx:
        rows = np.stack([arrs[s][e, layer] for layer in range(n_l) for s in sites])
        mats.append(cosine(rows))
    title = f"direction cosine across layers × sites ({emotion or 'mean over emotions'})"
    return cosine_heatmap(np.mean(mats, 0), out, xlabels=labels, ylabels=labels, title=title,
                          annotate=False)


def emotion_similarity(vectors: Array, emotions: Sequence[str], out: str | os.PathLike | None = None, *,
                       title: str = "cosine between emotion directions") -> Path | Figure:
    """cos(v_e, v_e') between emotions: ``vectors`` is ``[emotion, d]`` (one layer/site)."""
    v = _np(vectors)
    if v.ndim != 2 or v.shape[0] != len(emotions):
        raise ValueError(f"emotion_similarity: need [emotion={len(emotions)}, d], got {v.shape}")
    return cosine_heatmap(cosine(v), out, xlabels=list(emotions), ylabels=list(emotions),
                          title=title, annotate=True)


# ----------------------------------------------------------------------------- curves


def sublayer_influence(influence: Mapping[str, Mapping[str, Array]], out: str | os.PathLike | None = None, *,
                       title: str = "sublayer causal influence I(L, p)") -> Path | Figure:
    """I_{L,p} = (mean s_α − s_base)/(α σ_{L,p}) vs layer L.

    ``influence[emotion][kind]``: ``[layer]`` with kind in {"attn", "mlp"} (any names);
    solid line for the first kind, dashed for the others.
    """
    if not influence:
        raise ValueError("sublayer_influence: no emotions given")
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (emo, kinds) in enumerate(influence.items()):
        for j, (kind, vals) in enumerate(kinds.items()):
            y = _np(vals).reshape(-1)
            ax.plot(range(len(y)), y, color=_color(i), ls="-" if j == 0 else "--", marker=".",
                    label=f"{emo} · {kind}")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("Δ readout per unit dose")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out)


def probe_accuracy(accuracy: Mapping[str, Array], out: str | os.PathLike | None = None, *,
                   layers: Sequence[int] | None = None, chance: float | None = None,
                   baselines: Mapping[str, float] | None = None,
                   title: str = "probe accuracy per layer") -> Path | Figure:
    """Accuracy per layer for each named series, a dotted chance line and flat baselines."""
    if not accuracy:
        raise ValueError("probe_accuracy: no series given")
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, acc) in enumerate(accuracy.items()):
        y = _np(acc).reshape(-1)
        x = list(layers) if layers is not None else list(range(len(y)))
        if len(x) != len(y):
            raise ValueError(f"probe_accuracy: series {name!r} has {len(y)} values, {len(x)} layers")
        ax.plot(x, y, marker="o", ms=3, color=_color(i), label=name)
    if chance is not None:
        ax.axhline(chance, color="gray", ls=":", label=f"chance ({chance:.2f})")
    for j, (name, val) in enumerate((baselines or {}).items()):
        ax.axhline(val, color=_color(j + len(accuracy)), ls="-.", lw=1, label=name)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, out)


def sweep_curves(x: Sequence[float], accuracy: Mapping[str, Array], out: str | os.PathLike | None = None, *,
                 perplexity: Mapping[str, Array] | None = None, xlabel: str = "α",
                 title: str = "sweep", ylabel: str = "accuracy",
                 ylim: tuple[float, float] | None = (-0.02, 1.02)) -> Path | Figure:
    """Accuracy (left panel) and perplexity (right panel, log scale) vs the strength α / λ
    (``ylabel``/``ylim``: the left panel's axis, for other scores; ``ylim=None``: automatic).
    ``ylim`` is widened to every finite value, so that no point is drawn outside the axes."""
    if not accuracy:
        raise ValueError("sweep_curves: no accuracy series given")
    xs = _np(x).reshape(-1)
    n_panels = 2 if perplexity else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(5.5 * n_panels, 4), squeeze=False)
    ax = axes[0, 0]
    for i, (name, acc) in enumerate(accuracy.items()):
        y = _np(acc).reshape(-1)
        if len(y) != len(xs):
            raise ValueError(f"sweep_curves: {name!r} has {len(y)} values for {len(xs)} x values")
        ax.plot(xs, y, marker="o", color=_color(i), label=name)
    if ylim is not None:
        ax.set_ylim(*_widened(ylim, [_np(a) for a in accuracy.values()]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    if perplexity:
        ax2 = axes[0, 1]
        for i, (name, ppl) in enumerate(perplexity.items()):
            y = _np(ppl).reshape(-1)
            ax2.plot(xs[: len(y)], y, marker="s", color=_color(i), label=name)
        ax2.set_yscale("log")
        ax2.set_xlabel(xlabel)
        ax2.set_ylabel("perplexity (log)")
        ax2.set_title("fluency")
        ax2.legend(fontsize=7)
    return _save(fig, out)


def _widened(lim: tuple[float, float], values: Sequence[np.ndarray], pad: float = 0.05) -> tuple[float, float]:
    """``lim`` widened to include every finite value (plus ``pad``)."""
    finite = np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in values] or [np.zeros(0)])
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return lim
    return min(lim[0], float(finite.min()) - pad), max(lim[1], float(finite.max()) + pad)


def va_means(measured: Array, n_targets: int, name: str = "measured") -> np.ndarray:
    """``[T, 2]`` mean (valence, arousal) per grid target from ``[T, 2]`` means or ``[T, prompt,
    2]`` per-prompt values (non-finite values ignored; a target without any is NaN)."""
    m = _np(measured)
    if m.ndim == 3:
        ok = np.isfinite(m)
        n = ok.sum(1)
        m = np.where(n > 0, np.where(ok, m, 0.0).sum(1) / np.maximum(n, 1), np.nan)
    if m.ndim != 2 or m.shape != (n_targets, 2):
        raise ValueError(f"va_control: {name} must be [{n_targets} targets, 2] or [{n_targets}, prompt, 2], "
                         f"got {m.shape}")
    return m


VA_AXES = ("valence", "arousal")


def va_control(targets: Array, measured: Array, out: str | os.PathLike | None = None, *,
               readout: Array | None = None,
               title: str = "valence–arousal control: target vs measured") -> Path | Figure:
    """Measured vs target valence (one line per target arousal) and arousal (one line per target
    valence) over a control grid, with the ideal y = x dashed.

    ``targets``: ``[T, 2]`` (valence, arousal) grid targets; ``measured`` (the text judge, solid)
    and ``readout`` (the next-token readout, dotted; optional): ``[T, 2]`` means or ``[T, prompt,
    2]`` per-prompt values (``ControllabilityResult.text_va`` / ``readout_va``, or the
    ``text_va_mean`` of its ``to_dict``). Non-finite values are left out and an axis without a
    finite value gets no panel; the y range covers [-1, 1] and every point. Raises ``ValueError``
    ("nothing to plot") when no value is finite, instead of drawing empty axes.
    """
    t = _np(targets)
    if t.ndim != 2 or t.shape[1] != 2 or not len(t) or not np.isfinite(t).all():
        raise ValueError(f"va_control: targets must be finite [T >= 1, 2] (valence, arousal), got {t.shape}")
    series = {"text judge": va_means(measured, len(t))}
    if readout is not None:
        series["readout"] = va_means(readout, len(t), "readout")
    panels = [i for i in range(2) if any(np.isfinite(m[:, i]).any() for m in series.values())]
    if not panels:
        raise ValueError("va_control: nothing to plot (no finite measured valence or arousal)")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, i in zip(axes[0], panels, strict=True):
        other = 1 - i
        lo, hi = float(t[:, i].min()), float(t[:, i].max())
        ax.plot([lo, hi], [lo, hi], color="gray", ls="--", lw=1, label="target (ideal)", gid="ideal")
        drawn = []
        for j, o in enumerate(np.unique(t[:, other])):
            sel = np.nonzero(t[:, other] == o)[0]
            sel = sel[np.argsort(t[sel, i])]
            for (src, m), ls in zip(series.items(), ("-", ":"), strict=False):
                x, y = t[sel, i], m[sel, i]
                ok = np.isfinite(y)
                if ok.any():
                    ax.plot(x[ok], y[ok], ls=ls, marker="o", ms=4, color=_color(j),
                            label=f"{src} · {VA_AXES[other]} {o:+.2g}")
                    drawn.append(y[ok])
        ax.set_ylim(*_widened((-1.05, 1.05), drawn))
        ax.set_xlabel(f"target {VA_AXES[i]}")
        ax.set_ylabel(f"measured {VA_AXES[i]}")
        ax.set_title(f"{VA_AXES[i]}")
        ax.legend(fontsize=6)
    fig.suptitle(title)
    return _save(fig, out)


def method_comparison(accuracy: Mapping[str, float], out: str | os.PathLike | None = None, *,
                      controls: Mapping[str, float] | None = None,
                      per_emotion: Mapping[str, Mapping[str, float]] | None = None,
                      title: str = "accuracy by method") -> Path | Figure:
    """Bars of overall accuracy per method; controls (e.g. random circuit) hatched grey.

    ``per_emotion[method][emotion]`` adds a grouped-bar panel.
    """
    if not accuracy:
        raise ValueError("method_comparison: no methods given")
    names = list(accuracy) + list(controls or {})
    vals = [float(v) for v in accuracy.values()] + [float(v) for v in (controls or {}).values()]
    n_panels = 2 if per_emotion else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(6 * n_panels, 4), squeeze=False)
    ax = axes[0, 0]
    colors = [method_color(m) for m in accuracy] + ["#bbbbbb"] * len(controls or {})
    bars = ax.bar(range(len(names)), vals, color=colors)
    for b in bars[len(accuracy):]:
        b.set_hatch("//")
    for b, v in zip(bars, vals, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{100 * v:.0f}%", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    if per_emotion:
        ax2 = axes[0, 1]
        methods = list(per_emotion)
        emos = list(dict.fromkeys(e for m in per_emotion.values() for e in m))
        w = 0.8 / max(len(methods), 1)
        for i, m in enumerate(methods):
            ys = [float(per_emotion[m].get(e, np.nan)) for e in emos]
            ax2.bar(np.arange(len(emos)) + i * w, ys, width=w, color=method_color(m), label=m)
        ax2.set_xticks(np.arange(len(emos)) + 0.4 - w / 2, emos, rotation=30, ha="right")
        ax2.set_ylim(0, 1.1)
        ax2.set_title("per emotion")
        ax2.legend(fontsize=7)
    return _save(fig, out)


def fluent_comparison(table: Sequence[Mapping[str, Any]], out: str | os.PathLike | None = None, *,
                      title: str = "fluent accuracy by method (test split)") -> Path | Figure:
    """Fluent accuracy per method with its 95 % interval over scenarios (bars + error bars)
    and raw judge accuracy (open diamonds), from ``MethodComparison.table`` rows
    (``method, fluent_accuracy, fluent_low, fluent_high, accuracy, n``); one colour per method."""
    rows = [r for r in table if r.get("fluent_accuracy") is not None]
    if not rows:
        raise ValueError("fluent_comparison: no rows with a fluent accuracy")
    names = [str(r["method"]) for r in rows]
    y = np.arange(len(rows))[::-1]
    val = np.array([100 * float(r["fluent_accuracy"]) for r in rows])
    lo = np.array([100 * float(r.get("fluent_low", r["fluent_accuracy"])) for r in rows])
    hi = np.array([100 * float(r.get("fluent_high", r["fluent_accuracy"])) for r in rows])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.4))
    ax.barh(y, val, color=[method_color(m) for m in names], alpha=0.9)
    ax.errorbar(val, y, xerr=[val - lo, hi - val], fmt="none", ecolor="black", capsize=3, lw=1)
    raw = [100 * float(r["accuracy"]) if r.get("accuracy") is not None else np.nan for r in rows]
    ax.scatter(raw, y, marker="D", facecolors="none", edgecolors="black", s=28, zorder=3,
               label="raw judge accuracy (fluent or not)")
    ax.set_yticks(y, [f"{m} (n={r.get('n', '?')})" for m, r in zip(names, rows, strict=True)])
    ax.set_xlim(0, max(100.0, float(np.nanmax([*hi, *raw])) + 5))
    ax.set_xlabel("texts expressing the target emotion, fluent (%) — bars: 95 % interval over scenarios")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, out)


# ----------------------------------------------------------------------------- PCA


def pca_2d(x: Array) -> np.ndarray:
    """Standardise columns (z-score, constant columns left at 0) and project on the top-2 PCs."""
    a = _np(x)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"pca_2d: need [n >= 2, d], got {a.shape}")
    a = a - a.mean(0)
    sd = a.std(0)
    a = a / np.where(sd > 0, sd, 1.0)
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    k = min(2, u.shape[1])
    pcs = u[:, :k] * s[:k]
    if k < 2:
        pcs = np.concatenate([pcs, np.zeros((a.shape[0], 2 - k))], 1)
    return pcs


def pca_clusters(acts: Mapping[int | str, Array], labels: Sequence[str], out: str | os.PathLike | None = None,
                 *, title: str = "PCA of emotion activations") -> Path | Figure:
    """One panel per layer: standardised 2-D PCA of ``acts[layer]`` ``[n, d]``, coloured by label."""
    if not acts:
        raise ValueError("pca_clusters: no layers given")
    classes = list(dict.fromkeys(labels))
    fig, axes = plt.subplots(1, len(acts), figsize=(3.6 * len(acts), 3.6), squeeze=False)
    for ax, (layer, x) in zip(axes[0], acts.items(), strict=True):
        a = _np(x)
        if a.shape[0] != len(labels):
            raise ValueError(f"pca_clusters: layer {layer} has {a.shape[0]} rows, {len(labels)} labels")
        pcs = pca_2d(a)
        for i, c in enumerate(classes):
            sel = np.array([lab == c for lab in labels])
            ax.scatter(pcs[sel, 0], pcs[sel, 1], s=12, color=_color(i), label=c, alpha=0.8)
        ax.set_title(f"layer {layer}")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, -1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    return _save(fig, out)


# ----------------------------------------------------------------------------- circuit graph


def circuit_graph(circuits: Mapping[str, Mapping[str, Sequence[Sequence[int]]]], n_layers: int,
                  out: str | os.PathLike | None = None, *, n_heads: int | None = None,
                  title: str = "emotion circuits: selected components per layer") -> Path | Figure:
    """Which heads and neurons each emotion's circuit uses, as a layers × components grid.

    ``circuits[emotion] = {"heads": [(layer, head), ...], "neurons": [(layer, idx), ...]}``.
    Left: a layer × head grid (cell colour = the emotions selecting that head, count shown);
    right: neurons per layer per emotion (bars). Raises on a layer outside ``[0, n_layers)``.
    """
    if not circuits:
        raise ValueError("circuit_graph: no circuits given")
    emos = list(circuits)
    for e, c in circuits.items():
        for kind in ("heads", "neurons"):
            for comp in c.get(kind, ()):
                if not 0 <= int(comp[0]) < n_layers:
                    raise ValueError(f"circuit_graph: {e} {kind[:-1]} {tuple(comp)}: layer out of "
                                     f"range 0..{n_layers - 1}")
    if n_heads is None:
        n_heads = 1 + max((int(h) for c in circuits.values() for _, h in c.get("heads", ())),
                          default=0)
    grid = np.zeros((n_layers, n_heads))
    for c in circuits.values():
        for layer, h in c.get("heads", ()):
            grid[int(layer), int(h)] += 1
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.22 * n_layers + 1.5)))
    im = ax1.imshow(grid, cmap="Purples", vmin=0, vmax=max(1, len(emos)), aspect="auto",
                    origin="lower")
    fig.colorbar(im, ax=ax1, shrink=0.8, label="# emotions using the head")
    # one marker per (emotion, head), offset inside the cell
    for i, e in enumerate(emos):
        hs = circuits[e].get("heads", ())
        if hs:
            off = (i - (len(emos) - 1) / 2) * 0.8 / max(len(emos), 1)
            ax1.scatter([int(h) + off for _, h in hs], [int(lay) for lay, _ in hs], s=8,
                        color=_color(i), label=e)
    ax1.set_xlabel("head")
    ax1.set_ylabel("layer")
    ax1.set_title("attention heads")
    if any(circuits[e].get("heads") for e in emos):
        ax1.legend(fontsize=6, loc="upper right")
    w = 0.8 / len(emos)
    for i, e in enumerate(emos):
        counts = np.zeros(n_layers)
        for layer, _ in circuits[e].get("neurons", ()):
            counts[int(layer)] += 1
        ax2.barh(np.arange(n_layers) + i * w - 0.4 + w / 2, counts, height=w, color=_color(i),
                 label=e)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("# neurons selected")
    ax2.set_ylabel("layer")
    ax2.set_title("MLP neurons")
    ax2.legend(fontsize=6)
    fig.suptitle(title)
    return _save(fig, out)


def png_is_blank(path: str | os.PathLike, *, tol: float = 1e-6) -> bool:
    """True when the PNG has (almost) no pixel variance — a figure that drew nothing."""
    img = plt.imread(str(path))
    return float(np.asarray(img, dtype=np.float64)[..., :3].var()) < tol
