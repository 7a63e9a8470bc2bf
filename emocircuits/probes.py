"""Linear / MLP emotion probes across layers, a zero-shot baseline, persistence over
generated tokens and system-prompt malleability ("Decoding Emotion in the Deep", 2025).

Layer sweep (``probe_layers``): for every layer l a classifier f_l(x) = softmax(W x̃ + b)
(``kind="logreg"``) or a one-hidden-layer MLP (``kind="mlp"``) on the standardised hidden
state x̃ = (x − μ_train) / σ_train (fitted on the training folds only), scored by
group-wise stratified K-fold cross-validation (no topic group on both sides) and by the
fixed train -> test split. Layer index ``-1`` denotes the embedding (``resid_pre`` of layer
0); depth fraction of layer l = (l + 1) / n_layers (0 for the embedding). The default
``backend="torch"`` fits all (layer, fold) probes of a chunk of layers in ONE batched
optimisation (logreg: L-BFGS on Σ_i CE_i + ||W||²/(2C), sklearn's objective; mlp: AdamW);
``backend="sklearn"`` fits them one by one (reference).

Zero-shot (``zero_shot``): the model is asked for ``{"emotion": "<label>"}``; the reply is
parsed (JSON, else the first class word); the constrained variant takes
argmax_c logit[first token of c] at the answer position (always covered).

Persistence (``persistence``): continuation of each emotional opening; one forward over
prompt + continuation collects the state at k = 0..K, where k = number of generated tokens
already read (k = 0: last prompt token; k: position prompt_len − 1 + k). Accuracy(k) both
of a probe trained elsewhere applied at every k ("transfer") and of per-position probes
trained with group CV at bucketed k.

Malleability (``malleability``): mean probe class probabilities on the same utterances
under several system prompts, and their shift relative to ``"none"``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from . import sites as S
from .activations import forward_until
from .deprecation import warn_deprecated
from .emotions import valence_score
from .progress import tqdm
from .prompts import Prompt, encode, pad_ids, render, texts_of
from .results import Result

EMBED_LAYER = -1
"""Layer index used for the embedding (``resid_pre`` of layer 0) in sweeps and probes."""

DEFAULT_SYSTEM_PROMPTS: dict[str, str | None] = {
    "none": None,
    "emotional": "You are very emotional.",
    "calm": "You always remain calm and composed.",
}


# ----------------------------------------------------------------------------- helpers


def _encode_labels(labels: Sequence, classes: Sequence[str] | None) -> tuple[np.ndarray, tuple[str, ...]]:
    labs = [str(x) for x in labels]
    order = tuple(classes) if classes is not None else tuple(dict.fromkeys(labs))
    lookup = {c: i for i, c in enumerate(order)}
    bad = sorted(set(labs) - lookup.keys())
    if bad:
        raise ValueError(f"labels {bad} are not in classes {list(order)}")
    return np.array([lookup[x] for x in labs], dtype=np.int64), order


def _fit_batched(
    xs: Float[torch.Tensor, "task n d"],
    y: torch.Tensor,
    weight: Float[torch.Tensor, "task n"],
    k: int,
    kind: str,
    *,
    C: float = 0.1,
    hidden: int = 32,
    steps: int = 150,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Fit ``task`` independent probes at once on (already standardised) ``xs``; row i
    enters task t's loss with ``weight[t, i]`` (1 = train row, 0 = held out).

    logreg: per task minimise Σ_i w_i CE_i + ||W||² / (2C) (sklearn's ``LogisticRegression``
    objective, unpenalised bias) by L-BFGS on the sum over tasks (separable, convex: the
    same optimum per task). mlp: Linear(d, hidden) -> GELU -> Linear(hidden, K), mean CE
    per task, AdamW (lr 2e-2, wd 1e-2) for ``steps`` full-batch steps (per-element
    updates, so exactly as if each task were trained alone)."""
    t, n, d = xs.shape
    yt = y.view(1, n).expand(t, n)
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        if kind == "logreg":
            w = torch.zeros(t, d, k, dtype=xs.dtype, requires_grad=True)
            b = torch.zeros(t, 1, k, dtype=xs.dtype, requires_grad=True)
            f64 = xs.dtype == torch.float64
            opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=1000 if f64 else 500,
                                    tolerance_grad=1e-7 if f64 else 1e-5,
                                    tolerance_change=1e-12 if f64 else 1e-9, history_size=20,
                                    line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                logits = torch.bmm(xs, w) + b
                ce = torch.nn.functional.cross_entropy(logits.reshape(t * n, k), yt.reshape(-1),
                                                       reduction="none").view(t, n)
                loss = (ce * weight).sum() + (w * w).sum() / (2 * C)
                loss.backward()
                return loss

            opt.step(closure)
            return (w.detach(), b.detach())
        if kind != "mlp":
            raise ValueError(f"probe kind must be 'logreg' or 'mlp', got {kind!r}")
        params = [torch.randn(t, d, hidden, generator=g, dtype=xs.dtype) / math.sqrt(d),
                  torch.zeros(t, 1, hidden, dtype=xs.dtype),
                  torch.randn(t, hidden, k, generator=g, dtype=xs.dtype) / math.sqrt(hidden),
                  torch.zeros(t, 1, k, dtype=xs.dtype)]
        for prm in params:
            prm.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=2e-2, weight_decay=1e-2)
        denom = weight.sum(1).clamp_min(1.0)
        for _ in range(steps):
            opt.zero_grad()
            logits = _forward_batched(tuple(params), xs)
            ce = torch.nn.functional.cross_entropy(logits.reshape(t * n, k), yt.reshape(-1),
                                                   reduction="none").view(t, n)
            ((ce * weight).sum(1) / denom).sum().backward()
            opt.step()
        return tuple(p.detach() for p in params)


def _forward_batched(params: tuple[torch.Tensor, ...], xs: torch.Tensor) -> torch.Tensor:
    """Logits ``[task, n, K]`` of ``_fit_batched`` parameters."""
    if len(params) == 2:
        return torch.bmm(xs, params[0]) + params[1]
    w1, b1, w2, b2 = params
    return torch.bmm(torch.nn.functional.gelu(torch.bmm(xs, w1) + b1), w2) + b2


def _standardize_batched(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [L, n, d], weight [T, n] -> [L, T, n, d] standardised with each task's train rows."""
    wn = weight / weight.sum(1, keepdim=True)
    mu = torch.einsum("tn,lnd->ltd", wn, x)
    var = torch.einsum("tn,lnd->ltd", wn, x * x) - mu * mu
    sd = var.clamp_min(0).sqrt()
    sd = torch.where(sd > 1e-12 * (mu.abs() + 1), sd, torch.ones_like(sd))
    return (x[:, None] - mu[:, :, None]) / sd[:, :, None]


class TorchProbeModel:
    """One probe with an sklearn-like interface (fit / predict_proba / predict / classes_),
    trained by ``_fit_batched`` (logreg in float64, mlp in float32) on x̃ = (x − μ) / σ,
    μ, σ from the training rows when ``standardize``."""

    def __init__(self, kind: str = "logreg", *, standardize: bool = True, C: float = 0.1,
                 hidden: int = 32, steps: int = 150, seed: int = 0) -> None:
        if kind not in ("logreg", "mlp"):
            raise ValueError(f"probe kind must be 'logreg' or 'mlp', got {kind!r}")
        self.kind, self.standardize, self.C, self.hidden = kind, standardize, C, hidden
        self.steps, self.seed = steps, seed

    @property
    def _dtype(self) -> torch.dtype:
        return torch.float64 if self.kind == "logreg" else torch.float32

    def _prep(self, x) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
        return ((x - self.mu_) / self.sd_).to(self._dtype)

    def fit(self, x, y) -> TorchProbeModel:
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        yt = torch.as_tensor(np.searchsorted(self.classes_, y))
        xt = torch.as_tensor(np.asarray(x), dtype=torch.float64)
        if self.standardize:
            self.mu_, sd = xt.mean(0), xt.std(0, unbiased=False)
            self.sd_ = torch.where(sd > 1e-12 * (self.mu_.abs() + 1), sd, torch.ones_like(sd))
        else:
            self.mu_, self.sd_ = torch.zeros(xt.shape[1], dtype=torch.float64), torch.ones(xt.shape[1], dtype=torch.float64)
        xs = self._prep(xt)[None]
        w = torch.ones(1, len(y), dtype=xs.dtype)
        self.params_ = _fit_batched(xs, yt, w, len(self.classes_), self.kind, C=self.C,
                                    hidden=self.hidden, steps=self.steps, seed=self.seed)
        return self

    @torch.no_grad()
    def decision_function(self, x) -> torch.Tensor:
        return _forward_batched(self.params_, self._prep(x)[None])[0]

    def predict_proba(self, x) -> np.ndarray:
        return torch.softmax(self.decision_function(x).double(), -1).numpy()

    def predict(self, x) -> np.ndarray:
        return self.classes_[self.decision_function(x).argmax(-1).numpy()]


def _estimator(kind: str, standardize: bool, seed: int, C: float, hidden: int,
               backend: str = "torch"):
    """The probe model: ``backend="torch"`` (``TorchProbeModel``, fast) or ``"sklearn"``
    (``LogisticRegression`` / ``MLPClassifier`` behind a ``StandardScaler``; reference)."""
    if kind not in ("logreg", "mlp"):
        raise ValueError(f"probe kind must be 'logreg' or 'mlp', got {kind!r}")
    if backend == "torch":
        return TorchProbeModel(kind, standardize=standardize, C=C, hidden=hidden, seed=seed)
    if backend != "sklearn":
        raise ValueError(f"probe backend must be 'torch' or 'sklearn', got {backend!r}")
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "logreg":
        est = LogisticRegression(C=C, max_iter=3000, tol=1e-6)
    else:
        est = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-2, max_iter=400,
                            learning_rate_init=1e-3, random_state=seed)
    return make_pipeline(StandardScaler(), est) if standardize else est


def cv_splits(
    labels: Sequence,
    groups: Sequence | None = None,
    cv: int = 5,
    *,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train_idx, test_idx) folds: ``StratifiedGroupKFold`` when ``groups`` are given
    (a group never on both sides), else ``StratifiedKFold``; shuffled with ``seed``."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y, _ = _encode_labels(labels, None)
    if cv < 2:
        raise ValueError(f"cv must be >= 2, got {cv}")
    idx = np.zeros((len(y), 1))
    if groups is not None:
        g = np.array([str(x) for x in groups])
        if len(g) != len(y):
            raise ValueError(f"groups has {len(g)} entries for {len(y)} labels")
        n_groups = len(set(g.tolist()))
        if n_groups < cv:
            raise ValueError(f"cv={cv} folds need at least {cv} groups; got {n_groups}")
        splitter = StratifiedGroupKFold(n_splits=cv, shuffle=True, random_state=seed)
        return [(tr, te) for tr, te in splitter.split(idx, y, g)]
    counts = np.bincount(y)
    if counts.min() < cv:
        raise ValueError(f"cv={cv} folds need >= {cv} rows per class; smallest class has {counts.min()}")
    splitter = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in splitter.split(idx, y)]


def _macro_f1(y: np.ndarray, p: np.ndarray, k: int) -> float:
    """Macro-F1 over all k classes: mean_c 2TP_c / (2TP_c + FP_c + FN_c) (0 when undefined)."""
    cm = np.bincount(y * k + p, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(float)
    denom = cm.sum(0) + cm.sum(1)
    return float(np.mean(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)))


def pool_acts(
    acts: Float[torch.Tensor, "n layer pos d"],
    lengths: torch.Tensor,
    pool: str = "mean",
    *,
    skip_first: int = 1,
) -> Float[torch.Tensor, "n layer d"]:
    """Left-aligned ``collect(position="all")`` activations -> one vector per row:
    ``"last"``: x[length − 1]; ``"mean"``: mean of x[skip_first:length] (skip the BOS)."""
    if acts.dim() != 4:
        raise ValueError(f"pool_acts expects [n, layer, pos, d], got shape {tuple(acts.shape)}")
    lengths = lengths.long().cpu()
    if len(lengths) != acts.shape[0]:
        raise ValueError(f"lengths has {len(lengths)} rows for {acts.shape[0]} activations")
    if pool == "last":
        idx = (lengths - 1).view(-1, 1, 1, 1).expand(-1, acts.shape[1], 1, acts.shape[3])
        return torch.gather(acts, 2, idx)[:, :, 0]
    if pool != "mean":
        raise ValueError(f"pool must be 'last' or 'mean', got {pool!r}")
    pos = torch.arange(acts.shape[2])
    start = torch.clamp(torch.full_like(lengths, skip_first), max=lengths - 1)
    mask = (pos[None] >= start[:, None]) & (pos[None] < lengths[:, None])  # [n, pos]
    m = mask.to(acts.dtype)[:, None, :, None]
    return (acts * m).sum(2) / m.sum(2)


# ----------------------------------------------------------------------------- probes


_SKLEARN_TYPES = ("StandardScaler", "LogisticRegression", "MLPClassifier")


def _sklearn_type(name: str):
    """The few sklearn classes a saved probe may name (nothing else is ever instantiated)."""
    if name == "StandardScaler":
        from sklearn.preprocessing import StandardScaler
        return StandardScaler
    if name == "LogisticRegression":
        from sklearn.linear_model import LogisticRegression
        return LogisticRegression
    if name == "MLPClassifier":
        from sklearn.neural_network import MLPClassifier
        return MLPClassifier
    raise ValueError(f"a saved probe names sklearn type {name!r}; only {list(_SKLEARN_TYPES)} are read")


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str, np.generic, np.ndarray)):
        return not isinstance(v, np.ndarray) or v.dtype.kind in "biuf"
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    return False


@dataclass
class ProbeState(Result):
    """A fitted probe model as numbers: what ``Probe`` saves in place of its estimator.

    ``steps``: one entry per model in the chain (a ``StandardScaler`` pipeline step, then the
    classifier; a single ``TorchProbeModel``): ``{"type", "params", "fitted"}`` with the
    constructor parameters and the fitted attributes (arrays become tensors in the file).
    ``build()`` makes the estimator again; only ``TorchProbeModel`` and sklearn's
    ``StandardScaler`` / ``LogisticRegression`` / ``MLPClassifier`` are ever instantiated."""

    backend: str  # "torch" | "sklearn"
    steps: list[dict]

    @classmethod
    def of(cls, est: Any) -> ProbeState:
        if isinstance(est, TorchProbeModel):
            params = {"kind": est.kind, "standardize": est.standardize, "C": est.C,
                      "hidden": est.hidden, "steps": est.steps, "seed": est.seed}
            fitted = {k: getattr(est, k) for k in ("classes_", "mu_", "sd_") if hasattr(est, k)}
            if hasattr(est, "params_"):
                fitted["params_"] = list(est.params_)
            return cls("torch", [{"type": "TorchProbeModel", "params": params, "fitted": fitted}])
        chain = [s for _, s in est.steps] if hasattr(est, "steps") else [est]
        steps = []
        for s in chain:
            name = type(s).__name__
            if name not in _SKLEARN_TYPES or not type(s).__module__.startswith("sklearn."):
                raise TypeError(f"cannot save a Probe whose estimator holds a {type(s).__module__}.{name} "
                                f"(saved: TorchProbeModel, or sklearn {', '.join(_SKLEARN_TYPES)})")
            params = s.get_params(deep=False)
            bad = [k for k, v in params.items() if not _plain(v)]
            if bad:
                raise TypeError(f"cannot save {name} parameters {bad} (not plain values)")
            fitted = {k: v for k, v in vars(s).items()
                      if k.endswith("_") and not k.startswith("_") and _plain(v)}
            steps.append({"type": name, "params": params, "fitted": fitted})
        return cls("sklearn", steps)

    def build(self) -> Any:
        if self.backend == "torch":
            if len(self.steps) != 1 or self.steps[0].get("type") != "TorchProbeModel":
                raise ValueError("a torch probe state holds exactly one TorchProbeModel")
            st = self.steps[0]
            m = TorchProbeModel(**st["params"])
            for k, v in st["fitted"].items():
                if k not in ("classes_", "mu_", "sd_", "params_"):
                    raise ValueError(f"TorchProbeModel has no fitted attribute {k!r}")
                setattr(m, k, tuple(v) if k == "params_" else v)
            return m
        if self.backend != "sklearn" or not self.steps:
            raise ValueError(f"unknown probe backend {self.backend!r}")
        models = []
        for st in self.steps:
            m = _sklearn_type(st["type"])(**st["params"])
            for k, v in st["fitted"].items():
                if not (isinstance(k, str) and k.endswith("_") and not k.startswith("_")):
                    raise ValueError(f"{st['type']}: bad fitted attribute {k!r}")
                setattr(m, k, v)
            if st["type"] == "MLPClassifier" and "classes_" in st["fitted"]:
                from sklearn.preprocessing import LabelBinarizer

                m._label_binarizer = LabelBinarizer().fit(m.classes_)
            models.append(m)
        if len(models) == 1:
            return models[0]
        from sklearn.pipeline import make_pipeline

        return make_pipeline(*models)


@dataclass
class Probe(Result):
    """A fitted probe on one layer's hidden state (``site`` at ``layer``; -1 = embedding).

    Saves (``Result.save``) with its estimator as a ``ProbeState`` (coefficients, intercepts,
    scaler statistics as tensors) and rebuilds the estimator on load; nothing is pickled."""

    estimator: Any
    classes: tuple[str, ...]
    layer: int
    kind: str = "logreg"
    site: str = "resid_post"

    def __post_init__(self) -> None:
        if isinstance(self.estimator, ProbeState):
            self.estimator = self.estimator.build()

    def _result_fields(self) -> dict[str, Any]:
        return {**super()._result_fields(), "estimator": ProbeState.of(self.estimator)}

    def to_dict(self) -> dict:
        return {"classes": list(self.classes), "layer": self.layer, "kind": self.kind,
                "site": self.site, "estimator": type(self.estimator).__name__}

    def predict_proba(self, x: Float[torch.Tensor, "n d"] | np.ndarray) -> Float[np.ndarray, "n cls"]:
        """P(class | x), columns in ``classes`` order."""
        x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"Probe.predict_proba expects [n, d], got shape {x.shape}")
        p = self.estimator.predict_proba(x.astype(np.float32))
        out = np.zeros((len(x), len(self.classes)))
        out[:, self.estimator.classes_] = p
        return out

    def predict(self, x) -> list[str]:
        return [self.classes[j] for j in self.predict_proba(x).argmax(1)]

    @property
    def hook_site(self) -> tuple[str, int]:
        """(site, layer) to collect for this probe: the embedding is resid_pre of layer 0."""
        return ("resid_pre", 0) if self.layer == EMBED_LAYER else (self.site, self.layer)


def fit_probe(
    x: Float[torch.Tensor, "n d"] | np.ndarray,
    labels: Sequence,
    *,
    layer: int,
    kind: str = "logreg",
    classes: Sequence[str] | None = None,
    standardize: bool = True,
    C: float = 0.1,
    hidden: int = 32,
    backend: str = "torch",
    seed: int = 0,
) -> Probe:
    """Fit one probe on all of ``x`` (standardiser fitted on ``x``)."""
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    y, order = _encode_labels(labels, classes)
    est = _estimator(kind, standardize, seed, C, hidden, backend)
    est.fit(x.astype(np.float32), y)
    return Probe(est, order, layer, kind)


@dataclass
class ProbeSweep(Result):
    """Per-layer probe scores. Arrays are indexed like ``layers`` (−1 = embedding)."""

    layers: list[int]
    classes: tuple[str, ...]
    kind: str
    pool: str
    n_layers: int
    accuracy_mean: np.ndarray
    accuracy_std: np.ndarray
    f1_mean: np.ndarray
    f1_std: np.ndarray
    chance_majority: float
    chance_uniform: float
    n: int
    n_folds: int
    cv_kind: str
    test_accuracy: np.ndarray | None = None
    test_f1: np.ndarray | None = None
    accuracy_keyword: np.ndarray | None = None
    accuracy_no_keyword: np.ndarray | None = None
    oof_pred: np.ndarray | None = None  # [layer, n] out-of-fold class indices
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    def depth_fraction(self, layer: int) -> float:
        return 0.0 if layer == EMBED_LAYER else (layer + 1) / self.n_layers

    @property
    def peak_layer(self) -> int:
        """argmax over layers of the cross-validated accuracy (first of ties)."""
        return int(self.layers[int(np.argmax(self.accuracy_mean))])

    @property
    def peak_fraction(self) -> float:
        """(peak_layer + 1) / n_layers."""
        return self.depth_fraction(self.peak_layer)

    def onset_layer(self, fraction: float = 0.95) -> int:
        """First layer whose CV accuracy reaches ``chance + fraction·(peak − chance)``: where
        the curve's plateau starts (the argmax is fragile on a flat plateau)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"onset_layer: fraction must be in (0, 1], got {fraction}")
        peak = float(self.accuracy_mean.max())
        level = self.chance_uniform + fraction * (peak - self.chance_uniform)
        return int(self.layers[int(np.argmax(self.accuracy_mean >= level - 1e-12))])

    def to_dataframe(self):
        import pandas as pd

        cols: dict[str, Any] = {
            "layer": self.layers,
            "depth": [self.depth_fraction(layer) for layer in self.layers],
            "acc_mean": self.accuracy_mean, "acc_std": self.accuracy_std,
            "f1_mean": self.f1_mean, "f1_std": self.f1_std,
        }
        for name in ("test_accuracy", "test_f1", "accuracy_keyword", "accuracy_no_keyword"):
            v = getattr(self, name)
            if v is not None:
                cols[name] = v
        return pd.DataFrame(cols)

    def plot(self, title: str | None = None):
        """Accuracy per layer (cross-validated; test and keyword splits when present) with the
        chance line (−1 = the embedding): a Figure."""
        from .viz.figures import probe_accuracy

        series = {"cv accuracy": self.accuracy_mean}
        for label, name in (("test accuracy", "test_accuracy"), ("with keyword", "accuracy_keyword"),
                            ("without keyword", "accuracy_no_keyword")):
            if getattr(self, name) is not None:
                series[label] = getattr(self, name)
        return probe_accuracy(series, layers=self.layers, chance=self.chance_uniform,
                              title=title or f"{self.kind} probe accuracy per layer ({self.pool} pool)")

    def to_dict(self) -> dict:
        def f(v):
            return None if v is None else [float(x) for x in v]

        return {
            "kind": self.kind, "pool": self.pool, "classes": list(self.classes),
            "layers": list(self.layers), "n_layers": self.n_layers, "n": self.n,
            "n_folds": self.n_folds, "cv": self.cv_kind,
            "accuracy_mean": f(self.accuracy_mean), "accuracy_std": f(self.accuracy_std),
            "f1_mean": f(self.f1_mean), "f1_std": f(self.f1_std),
            "test_accuracy": f(self.test_accuracy), "test_f1": f(self.test_f1),
            "accuracy_keyword": f(self.accuracy_keyword),
            "accuracy_no_keyword": f(self.accuracy_no_keyword),
            "chance_majority": self.chance_majority, "chance_uniform": self.chance_uniform,
            "peak_layer": self.peak_layer, "peak_fraction": self.peak_fraction,
            "peak_accuracy": float(self.accuracy_mean.max()),
            "onset_layer_95": self.onset_layer(0.95),
            "onset_fraction_95": self.depth_fraction(self.onset_layer(0.95)),
            "seconds": self.seconds, "meta": self.meta,
        }


def _batched_task_predictions(
    x_all: np.ndarray,
    y: np.ndarray,
    tasks: Sequence[tuple[np.ndarray, np.ndarray]],
    k: int,
    kind: str,
    *,
    standardize: bool,
    C: float,
    hidden: int,
    seed: int,
    progress: bool,
    max_bytes: float = 2.0e8,
) -> list[list[np.ndarray]]:
    """preds[layer][task]: class indices on the task's test rows; all (layer, task) probes of
    a chunk of layers are fitted in one batched optimisation."""
    n, n_lay, d = x_all.shape
    dtype = torch.float32
    weight = torch.zeros(len(tasks), n, dtype=dtype)
    for t, (tr, _) in enumerate(tasks):
        weight[t, torch.as_tensor(tr)] = 1.0
    yt = torch.as_tensor(y)
    per_layer = len(tasks) * n * d * 4 * 3
    chunk = max(1, int(max_bytes // per_layer))
    out: list[list[np.ndarray]] = []
    for s0 in tqdm(range(0, n_lay, chunk), desc=f"probe {kind}", disable=not progress, leave=False):
        x = torch.as_tensor(x_all[:, s0:s0 + chunk], dtype=torch.float64).permute(1, 0, 2)
        if standardize:
            xs = _standardize_batched(x, weight.double()).to(dtype)
        else:
            xs = x.to(dtype)[:, None].expand(-1, len(tasks), -1, -1)
        lc = x.shape[0]
        flat = xs.reshape(lc * len(tasks), n, d)
        params = _fit_batched(flat, yt, weight.repeat(lc, 1), k, kind, C=C, hidden=hidden, seed=seed)
        with torch.no_grad():
            pred = _forward_batched(params, flat).argmax(-1).view(lc, len(tasks), n).numpy()
        for j in range(lc):
            out.append([pred[j, t, te] for t, (_, te) in enumerate(tasks)])
    return out


def probe_layers(
    acts: Float[torch.Tensor, "n layer d"] | Float[torch.Tensor, "n layer pos d"],
    labels: Sequence,
    groups: Sequence | None = None,
    *,
    kind: str = "logreg",
    cv: int = 5,
    standardize: bool = True,
    pool: str = "last",
    lengths: torch.Tensor | None = None,
    layers: Sequence[int] | None = None,
    n_layers: int | None = None,
    split: Sequence[str] | None = None,
    has_keyword: Sequence[bool] | None = None,
    classes: Sequence[str] | None = None,
    C: float = 0.1,
    hidden: int = 32,
    backend: str = "torch",
    seed: int = 0,
    progress: bool = True,
) -> ProbeSweep:
    """Cross-validated probe accuracy / macro-F1 at every layer (module docstring).

    ``acts``: ``[n, layer, d]`` (one vector per row) or ``[n, layer, pos, d]`` left-aligned
    from ``collect(position="all")`` with ``lengths``, reduced by ``pool`` ("last"/"mean").
    ``layers`` names the layer axis (default 0..L−1; use −1 for the embedding).
    ``split`` ("train"/"test" per row) adds the fixed-split scores; ``has_keyword`` adds
    out-of-fold accuracy on rows with / without an emotion keyword.
    """
    if acts.dim() == 4:
        if lengths is None:
            raise ValueError("probe_layers: 4-d acts [n, layer, pos, d] need `lengths`")
        acts = pool_acts(acts, lengths, pool)
    elif acts.dim() != 3:
        raise ValueError(f"probe_layers: acts must be [n, layer, d] or [n, layer, pos, d], got {tuple(acts.shape)}")
    elif pool not in ("last", "mean"):
        raise ValueError(f"pool must be 'last' or 'mean', got {pool!r}")
    n, n_lay, _ = acts.shape
    y, order = _encode_labels(labels, classes)
    if len(y) != n:
        raise ValueError(f"probe_layers: {len(y)} labels for {n} activation rows")
    layer_ids = list(layers) if layers is not None else list(range(n_lay))
    if len(layer_ids) != n_lay:
        raise ValueError(f"probe_layers: {len(layer_ids)} layer names for a layer axis of {n_lay}")
    n_layers = n_layers or (max(layer_ids) + 1)
    k = len(order)
    folds = cv_splits([order[i] for i in y], groups, cv, seed=seed)
    x_all = acts.float().numpy()
    if not np.isfinite(x_all).all():
        raise ValueError("probe_layers: activations contain NaN/inf")
    acc = np.zeros((n_lay, cv))
    f1 = np.zeros((n_lay, cv))
    oof = np.full((n_lay, n), -1, dtype=np.int64)
    test_acc = test_f1 = None
    if split is not None:
        sp = np.array(list(split))
        if len(sp) != n:
            raise ValueError(f"probe_layers: split has {len(sp)} entries for {n} rows")
        tr_s, te_s = np.where(sp == "train")[0], np.where(sp == "test")[0]
        if len(tr_s) == 0 or len(te_s) == 0:
            raise ValueError("probe_layers: split needs both 'train' and 'test' rows")
        test_acc, test_f1 = np.zeros(n_lay), np.zeros(n_lay)
    t0 = time.perf_counter()
    if backend == "torch":
        tasks = list(folds) + ([(tr_s, te_s)] if split is not None else [])
        preds = _batched_task_predictions(x_all, y, tasks, k, kind, standardize=standardize,
                                          C=C, hidden=hidden, seed=seed, progress=progress)
        for j in range(n_lay):
            for f, (_, te) in enumerate(folds):
                p = preds[j][f]
                oof[j, te] = p
                acc[j, f] = float((p == y[te]).mean())
                f1[j, f] = _macro_f1(y[te], p, k)
            if split is not None:
                p = preds[j][-1]
                test_acc[j] = float((p == y[te_s]).mean())
                test_f1[j] = _macro_f1(y[te_s], p, k)
    for j in tqdm(range(n_lay) if backend != "torch" else [], desc=f"probe {kind}",
                  disable=not progress, leave=False):
        x = x_all[:, j]
        for f, (tr, te) in enumerate(folds):
            est = _estimator(kind, standardize, seed, C, hidden, backend).fit(x[tr], y[tr])
            p = est.predict(x[te])
            oof[j, te] = p
            acc[j, f] = float((p == y[te]).mean())
            f1[j, f] = _macro_f1(y[te], p, k)
        if split is not None:
            est = _estimator(kind, standardize, seed, C, hidden, backend).fit(x[tr_s], y[tr_s])
            p = est.predict(x[te_s])
            test_acc[j] = float((p == y[te_s]).mean())
            test_f1[j] = _macro_f1(y[te_s], p, k)
    seconds = time.perf_counter() - t0
    acc_kw = acc_nokw = None
    if has_keyword is not None:
        kw = np.array([bool(v) for v in has_keyword])
        if len(kw) != n:
            raise ValueError(f"probe_layers: has_keyword has {len(kw)} entries for {n} rows")
        correct = oof == y[None]
        acc_kw = correct[:, kw].mean(1) if kw.any() else np.full(n_lay, np.nan)
        acc_nokw = correct[:, ~kw].mean(1) if (~kw).any() else np.full(n_lay, np.nan)
    return ProbeSweep(
        layers=layer_ids, classes=order, kind=kind, pool=pool, n_layers=n_layers,
        accuracy_mean=acc.mean(1), accuracy_std=acc.std(1), f1_mean=f1.mean(1), f1_std=f1.std(1),
        chance_majority=float(np.bincount(y, minlength=k).max() / n), chance_uniform=1.0 / k,
        n=n, n_folds=cv, cv_kind="StratifiedGroupKFold" if groups is not None else "StratifiedKFold",
        test_accuracy=test_acc, test_f1=test_f1, accuracy_keyword=acc_kw,
        accuracy_no_keyword=acc_nokw, oof_pred=oof, seconds=seconds,
        meta={"standardize": standardize, "C": C, "hidden": hidden, "seed": seed,
              "backend": backend},
    )


# ----------------------------------------------------------------------------- hidden states


@torch.no_grad()
def hidden_at(
    model,
    ids: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    layers: Sequence[int],
    *,
    site: str = "resid_post",
    batch_size: int = 16,
    progress: bool = False,
) -> Float[torch.Tensor, "n layer k d"]:
    """Hidden state at given positions of given token-id sequences (exact ids, no
    re-tokenisation). ``positions[i]``: indices into ``ids[i]`` (all rows the same count;
    negative = from the end). Layer −1 = embedding (``resid_pre`` of layer 0).

    The same machinery as ``activations.collect(position=index tensor)`` —
    ``prompts.pad_ids``, ``TokenBatch.positions`` and one ``activations.forward_until`` per
    batch — for token ids instead of texts (``collect`` re-encodes texts, which could change
    prompt + generated ids) and in input order (``collect`` batches by length, which changes the
    padding and so the float rounding)."""
    if len(ids) != len(positions):
        raise ValueError(f"hidden_at: {len(ids)} sequences but {len(positions)} position rows")
    if len(ids) == 0:
        raise ValueError("hidden_at: no sequences")
    n_k = {len(p) for p in positions}
    if len(n_k) != 1:
        raise ValueError(f"hidden_at: rows have different numbers of positions {sorted(n_k)}")
    hooks_for = [("resid_pre", 0) if layer == EMBED_LAYER else (site, S.check_layer(model, layer))
                 for layer in layers]
    stop = max(layer for _, layer in hooks_for) + 1
    stop = None if stop >= model.cfg.n_layers else stop
    out = []
    for s in tqdm(range(0, len(ids), batch_size), desc="hidden_at", disable=not progress, leave=False):
        rows = [list(r) for r in ids[s:s + batch_size]]
        batch = pad_ids(model, rows)
        idx = torch.tensor([list(positions[s + i]) for i in range(len(rows))], dtype=torch.long)
        for i, r in enumerate(rows):
            p = idx[i]
            if ((p >= len(r)) | (p < -len(r))).any():
                bad = p[(p >= len(r)) | (p < -len(r))][0].item()
                raise IndexError(f"hidden_at: row {s + i}: position {bad} outside its {len(r)} tokens")
        cols = batch.positions(idx.to(batch.tokens.device)).cpu()
        store: dict[int, torch.Tensor] = {}

        def make(j: int, cols=cols, store=store):
            def hook(x, hook):  # noqa: ARG001 - TL hook signature
                c = cols.to(x.device).unsqueeze(-1).expand(-1, -1, x.shape[-1])
                store[j] = torch.gather(x, 1, c).float().cpu()
                return x
            return hook

        fwd = [(S.hook_name(model, st, layer), make(j)) for j, (st, layer) in enumerate(hooks_for)]
        forward_until(model, batch.tokens, batch.attention_mask, stop, fwd)
        out.append(torch.stack([store[j] for j in range(len(hooks_for))], dim=1))
    return torch.cat(out)


def _is_chat(model, chat: bool | None) -> bool:
    return bool(getattr(model.tokenizer, "chat_template", None)) if chat is None else chat


def _end_position(tok, text: str, end_char: int) -> int:
    """Negative index (from the end of ``encode(text)``) of the token covering char ``end_char − 1``."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    offs = enc["offset_mapping"]
    j = max(i for i, (a, _) in enumerate(offs) if a < end_char)
    return j - len(offs)


def wrap_utterance(model, text: str, system: str | None = None, *, chat: bool | None = None) -> tuple[str, int]:
    """(prompt text, negative index of the utterance's last token in it). Chat models: the
    utterance is the user message (after ``system``); base models: ``system + " " + text``."""
    if _is_chat(model, chat):
        full = render(model, system, text, chat=True)
        end = full.rfind(text)
        if end < 0:
            raise ValueError(f"chat template does not contain the utterance {text[:40]!r}")
        return full, _end_position(model.tokenizer, full, end + len(text))
    full = f"{system} {text}" if system else text
    return full, -1


# ----------------------------------------------------------------------------- zero-shot

_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "anger": ("angry", "mad"), "sadness": ("sad",), "happiness": ("happy", "joy", "joyful"),
    "fear": ("afraid", "scared", "fearful"), "surprise": ("surprised",),
    "disgust": ("disgusted",), "neutral": (),
}


def _word_map(classes: Sequence[str]) -> dict[str, str]:
    m = {}
    for c in classes:
        m[c.lower()] = c
        for w in _ADJECTIVES.get(c.lower(), ()):
            m.setdefault(w, c)
    return m


def parse_label(reply: str, classes: Sequence[str]) -> str | None:
    """The class named in a reply: a JSON object's "emotion"/"label" value if present,
    else the earliest class word (or its common adjective, e.g. "sad") in the text."""
    words = _word_map(classes)
    for m in re.finditer(r"\{[^{}]*\}", reply):
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            for key in ("emotion", "label", "Emotion", "Label"):
                v = obj.get(key)
                if isinstance(v, str) and v.strip().lower() in words:
                    return words[v.strip().lower()]
    for t in re.findall(r"[a-zA-Z]+", reply.lower()):
        if t in words:
            return words[t]
    return None


def zero_shot_prompt(model, text: str, classes: Sequence[str], *, chat: bool | None = None,
                     constrained: bool = False) -> str:
    """Chat: a user message asking for ``{"emotion": ...}`` (constrained: the assistant turn
    pre-filled up to the label). Base: ``'Text: ...\\nEmotion (one of ...):'``."""
    names = ", ".join(classes)
    if _is_chat(model, chat):
        user = (f"Which emotion does this text express? Choose one of: {names}.\n"
                f'Answer only with JSON like {{"emotion": "<label>"}}.\n\nText: "{text}"')
        return render(model, None, user, chat=True,
                      assistant_prefix='{"emotion": "' if constrained else None)
    return f"Text: {text}\nEmotion (one of {names}):"


@dataclass
class ZeroShotResult(Result):
    classes: tuple[str, ...]
    replies: list[str]
    predictions: list[str | None]
    constrained_predictions: list[str]
    constrained_probs: Float[np.ndarray, "n cls"]
    accuracy: float  # free-form, unparsable counted wrong
    coverage: float  # share of replies parsed to a class
    accuracy_answered: float  # on parsed replies only
    constrained_accuracy: float
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "classes": list(self.classes), "accuracy": self.accuracy, "coverage": self.coverage,
            "accuracy_answered": self.accuracy_answered,
            "constrained_accuracy": self.constrained_accuracy, "n": len(self.replies),
            "seconds": self.seconds, "examples": self.replies[:10],
        }

    def to_dataframe(self):
        """One row per prompt: the ``reply``, its parsed ``prediction`` (None: unparsable), the
        ``constrained`` prediction and one probability column per class."""
        import pandas as pd

        df = pd.DataFrame({"reply": self.replies, "prediction": self.predictions,
                           "constrained": self.constrained_predictions})
        probs = np.asarray(self.constrained_probs)
        if probs.ndim == 2 and probs.shape == (len(df), len(self.classes)):
            for j, c in enumerate(self.classes):
                df[c] = probs[:, j]
        return df


def class_first_tokens(model, classes: Sequence[str], *, leading_space: bool) -> list[int]:
    """First token id of each class name (with a leading space for base prompts); distinct."""
    ids = [model.tokenizer((" " if leading_space else "") + c, add_special_tokens=False)["input_ids"][0]
           for c in classes]
    if len(set(ids)) != len(ids):
        raise ValueError(f"class names share a first token: {dict(zip(classes, ids, strict=True))}")
    return ids


def zero_shot(
    model,
    utterances: Sequence[str],
    classes: Sequence[str],
    labels: Sequence[str] | None = None,
    *,
    chat: bool | None = None,
    max_new_tokens: int = 12,
    batch_size: int = 16,
    progress: bool = True,
) -> ZeroShotResult:
    """Zero-shot emotion classification by prompting: greedy free-form reply parsed with
    ``parse_label``, and the constrained variant argmax_c logit[first token of c]."""
    from .generation import GenerationConfig, generate
    from .judges.readout import last_token_logits

    if len(utterances) == 0:
        raise ValueError("zero_shot: no utterances")
    if labels is not None and len(labels) != len(utterances):
        raise ValueError(f"zero_shot: {len(labels)} labels for {len(utterances)} utterances")
    classes = tuple(classes)
    use_chat = _is_chat(model, chat)
    t0 = time.perf_counter()
    free = [zero_shot_prompt(model, u, classes, chat=use_chat) for u in utterances]
    gen = generate(model, free, GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size),
                   progress=progress)
    preds = [parse_label(r, classes) for r in gen.texts]
    cons = [zero_shot_prompt(model, u, classes, chat=use_chat, constrained=True) for u in utterances]
    tid = class_first_tokens(model, classes, leading_space=not use_chat)
    logits = last_token_logits(model, cons, batch_size=batch_size)[:, tid]
    probs = torch.softmax(logits, -1).numpy()
    cpred = [classes[j] for j in probs.argmax(1)]
    cov = float(np.mean([p is not None for p in preds]))
    if labels is not None:
        ok = [p == t for p, t in zip(preds, labels, strict=True)]
        acc = float(np.mean(ok))
        answered = [o for o, p in zip(ok, preds, strict=True) if p is not None]
        acc_ans = float(np.mean(answered)) if answered else float("nan")
        cacc = float(np.mean([p == t for p, t in zip(cpred, labels, strict=True)]))
    else:
        acc = acc_ans = cacc = float("nan")
    return ZeroShotResult(classes, gen.texts, preds, cpred, probs, acc, cov, acc_ans, cacc,
                          time.perf_counter() - t0)


# ----------------------------------------------------------------------------- persistence


DEFAULT_BUCKETS: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class PersistenceResult(Result):
    """Probe accuracy as a function of k (generated tokens read; k=0: last prompt token)."""

    layer: int
    classes: tuple[str, ...]
    k: np.ndarray  # 0..K
    n_valid: np.ndarray  # rows with >= k generated tokens
    transfer_accuracy: np.ndarray | None  # [K+1] the given probe applied at every k
    transfer_true_prob: np.ndarray | None  # [K+1] mean P(true class)
    reference_accuracy: float | None  # the given probe at the utterance's last token in the prompt
    bucket_k: list[int]
    bucket_accuracy_mean: np.ndarray  # per-position probes, group CV
    bucket_accuracy_std: np.ndarray
    chance_majority: float
    chance_uniform: float
    texts: list[str]
    hidden: Float[torch.Tensor, "n k d"] | None = None  # states at k = 0..K (zeros past a row's end)
    prompt_lengths: list[int] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)  # prompt + continuation ids per row
    seconds: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        def f(v):
            return None if v is None else [float(x) for x in v]

        return {
            "layer": self.layer, "classes": list(self.classes), "k": [int(x) for x in self.k],
            "n_valid": [int(x) for x in self.n_valid],
            "transfer_accuracy": f(self.transfer_accuracy),
            "transfer_true_prob": f(self.transfer_true_prob),
            "reference_accuracy": self.reference_accuracy,
            "bucket_k": self.bucket_k, "bucket_accuracy_mean": f(self.bucket_accuracy_mean),
            "bucket_accuracy_std": f(self.bucket_accuracy_std),
            "chance_majority": self.chance_majority, "chance_uniform": self.chance_uniform,
            "seconds": self.seconds, "notes": self.notes, "examples": self.texts[:6],
        }

    def to_dataframe(self):
        import pandas as pd

        df = pd.DataFrame({"k": self.k, "n_valid": self.n_valid})
        if self.transfer_accuracy is not None:
            df["transfer_accuracy"] = self.transfer_accuracy
            df["transfer_true_prob"] = self.transfer_true_prob
        b = dict(zip(self.bucket_k, self.bucket_accuracy_mean, strict=True))
        df["bucket_accuracy"] = [b.get(int(k), np.nan) for k in self.k]
        return df


def persistence(
    model,
    openings: Sequence[str],
    labels: Sequence[str],
    max_new_tokens: int = 128,
    *,
    layer: int,
    probe: Probe | None = None,
    groups: Sequence | None = None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    system: str | None = None,
    chat: bool | None = None,
    gen_config=None,
    kind: str = "logreg",
    cv: int = 5,
    classes: Sequence[str] | None = None,
    batch_size: int = 16,
    keep_hidden: bool = True,
    seed: int = 0,
    progress: bool = True,
    config=None,
) -> PersistenceResult:
    """Generate from each opening (chat: the user message; base: the start of the text),
    then ONE batched forward over prompt + continuation collects ``resid_post[layer]`` at
    positions prompt_len − 1 + k, k = 0..K. Scores: ``probe`` (trained elsewhere, e.g. on
    utterances) applied at every k, and per-position probes (``kind``, group CV) at the
    ``buckets``. The default ``gen_config`` (``config=``: its deprecated name) bans EOS for K
    tokens (min_new_tokens = K) with repetition penalty 1.1 and no-repeat 3-grams, so every
    row reaches k = K."""
    from .deprecation import renamed_keyword
    from .generation import GenerationConfig, generate

    gen_config = renamed_keyword("persistence", "config", "gen_config", config, gen_config, None)

    if len(openings) != len(labels):
        raise ValueError(f"persistence: {len(labels)} labels for {len(openings)} openings")
    y, order = _encode_labels(labels, classes if classes is not None else (probe.classes if probe else None))
    if probe is not None and probe.layer != layer:
        raise ValueError(f"persistence: probe is for layer {probe.layer}, asked layer {layer}")
    cfg = gen_config or GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                     repetition_penalty=1.1, no_repeat_ngram_size=3,
                                     batch_size=batch_size)
    K = cfg.max_new_tokens
    wrapped = [wrap_utterance(model, o, system, chat=chat) for o in openings]
    prompts = [w[0] for w in wrapped]
    t0 = time.perf_counter()
    gen = generate(model, prompts, cfg, progress=progress)
    t_gen = time.perf_counter() - t0
    prompt_ids = [encode(model, p) for p in prompts]
    full = [pi + list(g) for pi, g in zip(prompt_ids, gen.tokens, strict=True)]
    n_gen = np.array([len(g) for g in gen.tokens])
    ks = np.arange(K + 1)
    pos = []
    for i, pi in enumerate(prompt_ids):
        p = [len(pi) - 1 + min(int(k), int(n_gen[i])) for k in ks]  # clamp past a row's end
        pos.append(p + [len(pi) + wrapped[i][1]])  # + the utterance's last token
    t1 = time.perf_counter()
    h = hidden_at(model, full, pos, [layer], batch_size=batch_size, progress=progress)[:, 0]
    t_fwd = time.perf_counter() - t1
    ref_h, h = h[:, -1], h[:, :-1]
    valid = ks[None, :] <= n_gen[:, None]  # [n, K+1]
    h = h * torch.from_numpy(valid).unsqueeze(-1).to(h.dtype)
    n_valid = valid.sum(0)
    tr_acc = tr_prob = None
    ref_acc = None
    if probe is not None:
        n, kk, d = h.shape
        pr = probe.predict_proba(h.reshape(n * kk, d)).reshape(n, kk, -1)
        correct = (pr.argmax(-1) == y[:, None]) & valid
        true_p = np.take_along_axis(pr, y[:, None, None].repeat(kk, 1), -1)[..., 0] * valid
        tr_acc = correct.sum(0) / np.maximum(n_valid, 1)
        tr_prob = true_p.sum(0) / np.maximum(n_valid, 1)
        ref_acc = float((probe.predict_proba(ref_h).argmax(-1) == y).mean())
    bk = [int(b) for b in buckets if b <= K]
    notes: list[str] = []
    bmean, bstd = np.full(len(bk), np.nan), np.full(len(bk), np.nan)
    t2 = time.perf_counter()
    for j, b in enumerate(bk):
        rows = np.where(valid[:, b])[0]
        try:
            folds = cv_splits([order[i] for i in y[rows]],
                              None if groups is None else [groups[i] for i in rows], cv, seed=seed)
        except ValueError as e:
            notes.append(f"k={b}: per-position probe skipped ({e})")
            continue
        x = h[rows, b].numpy()
        accs = []
        for tr, te in folds:
            est = _estimator(kind, True, seed, 0.1, 32).fit(x[tr], y[rows][tr])
            accs.append(float((est.predict(x[te]) == y[rows][te]).mean()))
        bmean[j], bstd[j] = np.mean(accs), np.std(accs)
    t_probe = time.perf_counter() - t2
    k_cls = len(order)
    return PersistenceResult(
        layer=layer, classes=order, k=ks, n_valid=n_valid, transfer_accuracy=tr_acc,
        transfer_true_prob=tr_prob, reference_accuracy=ref_acc, bucket_k=bk,
        bucket_accuracy_mean=bmean, bucket_accuracy_std=bstd,
        chance_majority=float(np.bincount(y, minlength=k_cls).max() / len(y)),
        chance_uniform=1.0 / k_cls, texts=gen.texts, hidden=h if keep_hidden else None,
        prompt_lengths=[len(p) for p in prompt_ids], tokens=full,
        seconds={"generate": t_gen, "forward": t_fwd, "probes": t_probe}, notes=notes,
    )


# ----------------------------------------------------------------------------- malleability


@dataclass
class MalleabilityResult(Result):
    """``probs[name]``: [n, cls] probe probabilities under system prompt ``name``."""

    classes: tuple[str, ...]
    names: list[str]
    system_prompts: dict[str, str | None]
    probs: dict[str, np.ndarray]

    @property
    def mean(self) -> Float[np.ndarray, "prompt cls"]:
        """Mean class probability per system prompt."""
        return np.stack([self.probs[n].mean(0) for n in self.names])

    @property
    def predicted_share(self) -> Float[np.ndarray, "prompt cls"]:
        """Share of utterances whose argmax is each class, per system prompt."""
        k = len(self.classes)
        return np.stack([np.bincount(self.probs[n].argmax(1), minlength=k) / len(self.probs[n])
                         for n in self.names])

    def shift(self, reference: str = "none") -> Float[np.ndarray, "prompt cls"]:
        """mean[name] − mean[reference]."""
        if reference not in self.names:
            raise KeyError(f"reference system prompt {reference!r} not in {self.names}")
        m = self.mean
        return m - m[self.names.index(reference)]

    def valence(self) -> Float[np.ndarray, "prompt"]:
        """Mean P(positive classes) − P(negative classes) per system prompt
        (``emotions.valence_score`` of ``mean``)."""
        return valence_score(self.mean, self.classes)

    def to_dataframe(self, reference: str = "none"):
        import pandas as pd

        df = pd.DataFrame(self.mean, index=self.names, columns=list(self.classes))
        if reference in self.names:
            sh = pd.DataFrame(self.shift(reference), index=self.names,
                              columns=[f"d_{c}" for c in self.classes])
            df = pd.concat([df, sh], axis=1)
        return df

    def to_dict(self) -> dict:
        out = {"classes": list(self.classes), "system_prompts": self.system_prompts,
               "mean": {n: [float(v) for v in row] for n, row in zip(self.names, self.mean, strict=True)},
               "predicted_share": {n: [float(v) for v in row]
                                   for n, row in zip(self.names, self.predicted_share, strict=True)},
               "valence": dict(zip(self.names, map(float, self.valence()), strict=True))}
        if "none" in self.names:
            out["shift_vs_none"] = {n: [float(v) for v in row]
                                    for n, row in zip(self.names, self.shift("none"), strict=True)}
        return out


def probe_inputs(model, probe: Probe, prompts: Sequence[str | Prompt] | str | Prompt, *,
                 positions: Sequence[int] | None = None,
                 batch_size: int = 16, progress: bool = False) -> Float[torch.Tensor, "n d"]:
    """The probe's input vector for each prompt at ``positions`` (negative index from the
    end per prompt; default the last token). A bare string or ``Prompt`` is one prompt."""
    texts = texts_of(prompts)
    ids = [encode(model, t) for t in texts]
    pos = [[-1] for _ in texts] if positions is None else [[int(p)] for p in positions]
    return hidden_at(model, ids, pos, [probe.layer], site=probe.site, batch_size=batch_size,
                     progress=progress)[:, 0, 0]


def malleability(
    model,
    probe: Probe,
    utterances: Sequence[str],
    system_prompts: Mapping[str, str | None] | None = None,
    *,
    chat: bool | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> MalleabilityResult:
    """Probe class probabilities at each utterance's last token when it follows each
    system prompt (chat: the system message; base: the sentence prepended as text)."""
    sp = dict(DEFAULT_SYSTEM_PROMPTS if system_prompts is None else system_prompts)
    if not sp:
        raise ValueError("malleability: no system prompts")
    if len(utterances) == 0:
        raise ValueError("malleability: no utterances")
    probs = {}
    for name, system in tqdm(sp.items(), desc="malleability", disable=not progress, leave=False):
        wrapped = [wrap_utterance(model, u, system, chat=chat) for u in utterances]
        x = probe_inputs(model, probe, [w[0] for w in wrapped], positions=[w[1] for w in wrapped],
                         batch_size=batch_size)
        probs[name] = probe.predict_proba(x)
    return MalleabilityResult(probe.classes, list(sp), sp, probs)


def valence_of(probs: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Deprecated: ``emotions.valence_score(probs, classes)``."""
    warn_deprecated("probes.valence_of", "emocircuits.emotions.valence_score", stacklevel=3)
    return valence_score(probs, classes)


def malleability_accuracy(result: MalleabilityResult, labels: Sequence[str]) -> dict[str, float]:
    """The probe's accuracy (argmax = label) under each system prompt of ``result``."""
    y = np.array([list(result.classes).index(lab) for lab in labels])
    for n in result.names:
        if len(result.probs[n]) != len(y):
            raise ValueError(f"malleability_accuracy: {len(y)} labels for {len(result.probs[n])} rows")
    return {n: float((result.probs[n].argmax(1) == y).mean()) for n in result.names}


def fit_in_context_probe(model, utterances: Sequence[str], labels: Sequence[str], *, layer: int,
                         system: str | None = None, kind: str = "logreg",
                         classes: Sequence[str] | None = None, chat: bool | None = None,
                         batch_size: int = 16, progress: bool = False) -> Probe:
    """A probe at ``layer`` trained on ``utterances`` wrapped the way ``malleability`` reads them
    (chat: the user message after ``system``; base: the text, after ``system`` when given), at
    each utterance's last token: only the system prompt differs between its training input and
    what ``malleability`` shows it (no raw-text -> chat distribution shift)."""
    if len(utterances) != len(labels):
        raise ValueError(f"fit_in_context_probe: {len(labels)} labels for {len(utterances)} utterances")
    wrapped = [wrap_utterance(model, u, system, chat=chat) for u in utterances]
    ids = [encode(model, w[0]) for w in wrapped]
    x = hidden_at(model, ids, [[w[1]] for w in wrapped], [layer], batch_size=batch_size,
                  progress=progress)[:, 0, 0]
    return fit_probe(x, labels, layer=layer, kind=kind, classes=classes)


def transfer_by_band(result: PersistenceResult,
                     bands: Sequence[tuple[int, int]] = ((1, 32), (33, 64), (65, 128))) -> dict[str, float]:
    """Mean transfer accuracy of a persistence run over k in each inclusive band ``(a, b)``
    (``"k=a-b"``; bands past the generated length are left out, a band is cut at K)."""
    if result.transfer_accuracy is None:
        raise ValueError("transfer_by_band: the persistence run had no transfer probe")
    k = np.asarray(result.k)
    acc = np.asarray(result.transfer_accuracy, dtype=np.float64)
    out = {}
    for a, b in bands:
        sel = (k >= a) & (k <= b)
        if sel.any():
            out[f"k={a}-{b}"] = float(acc[sel].mean())
    return out


@dataclass
class ValenceAgreement(Result):
    """One probe read on SEV prompts: its valence P(positive) − P(negative) per prompt against
    the events' valence (AUC positive vs negative event) and the logit readout's (r, ρ)."""

    auc: float
    pearson: float
    spearman: float
    mean_probs: dict[str, list[float]]  # event valence -> mean class probabilities
    mean_valence: dict[str, float]  # event valence -> mean probe valence


@dataclass
class SEVProbeCheck(Result):
    """Probes against the logit readout on SEV neutral prompts (``sev_probe_check``)."""

    classes: list[str]
    n_prompts: int
    auc_readout: float  # the readout's valence score, positive vs negative event
    mean_readout_valence: dict[str, float]
    probes: dict[str, ValenceAgreement]


def sev_probe_check(model, probes: Mapping[str, Probe], prompts: Sequence[Prompt], *,
                    batch_size: int = 16, progress: bool = False) -> SEVProbeCheck:
    """Do probes trained on utterances read the emotion of an event? On neutral SEV prompts
    (no emotion instruction; e.g. ending in the assistant prefix "I feel"), each probe's valence
    P(positive) − P(negative) at the last token, v_probe, and the logit readout's valence score
    v_ro (emotion-word mass, positive − negative) are compared: AUC(v, positive vs negative
    event) for both, and Pearson / Spearman between v_probe and v_ro. Prompts need ``valence``."""
    from scipy.stats import pearsonr, spearmanr

    from .judges.readout import auc, emotion_readout

    if not probes:
        raise ValueError("sev_probe_check: no probes")
    if len(prompts) < 2:
        raise ValueError("sev_probe_check: needs at least 2 prompts")
    val = np.array([str(getattr(p, "valence", None)) for p in prompts])
    pos, neg = val == "positive", val == "negative"
    if not pos.any() or not neg.any():
        raise ValueError("sev_probe_check: prompts need both positive and negative events")
    rv = emotion_readout(model, prompts, batch_size=batch_size).valence_score()
    present = [v for v in ("positive", "neutral", "negative") if (val == v).any()]
    inputs: dict[tuple[str, int], torch.Tensor] = {}
    out: dict[str, ValenceAgreement] = {}
    classes = None
    for name, pr in probes.items():
        key = (pr.site, pr.layer)
        if key not in inputs:
            inputs[key] = probe_inputs(model, pr, prompts, batch_size=batch_size, progress=progress)
        pp = pr.predict_proba(inputs[key])
        pv = valence_score(pp, pr.classes)
        classes = list(pr.classes) if classes is None else classes
        const = np.ptp(pv) == 0 or np.ptp(rv) == 0
        out[name] = ValenceAgreement(
            auc=auc(pv[pos], pv[neg]),
            pearson=float("nan") if const else float(pearsonr(rv, pv)[0]),
            spearman=float("nan") if const else float(spearmanr(rv, pv)[0]),
            mean_probs={v: [float(x) for x in pp[val == v].mean(0)] for v in present},
            mean_valence={v: float(pv[val == v].mean()) for v in present})
    return SEVProbeCheck(classes or [], len(prompts), auc(rv[pos], rv[neg]),
                         {v: float(rv[val == v].mean()) for v in present}, out)


__all__ = [
    "DEFAULT_BUCKETS", "DEFAULT_SYSTEM_PROMPTS", "EMBED_LAYER", "MalleabilityResult",
    "PersistenceResult", "Probe", "ProbeState", "ProbeSweep", "SEVProbeCheck", "ValenceAgreement", "ZeroShotResult",
    "class_first_tokens", "cv_splits", "fit_in_context_probe", "fit_probe", "hidden_at", "malleability",
    "malleability_accuracy", "parse_label", "persistence", "pool_acts", "probe_inputs", "probe_layers",
    "sev_probe_check", "transfer_by_band", "valence_of", "wrap_utterance", "zero_shot",
    "zero_shot_prompt",
]
