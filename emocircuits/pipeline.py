"""The end-to-end run: stages, configs, a content-addressed cache, resume, results.json, report.

A run folder holds::

    run_dir/
      config.json                 the resolved configuration
      results.json                every stage's numbers (rewritten atomically after each stage)
      report.html                 one offline page (figures, tables, views)
      stages/<stage>-<hash>/      one finished stage: output.json, artifacts.pt, figures/, views/

A stage's ``hash`` = sha256 of (stage name, stage version, its config section, the common
config that every stage depends on — model, dtype, emotions, data sizes, generation, judge —
and the hashes of its upstream stages). A finished stage folder is only ever created by an
atomic rename of a completed temporary folder, so a rerun skips finished stages, a killed
run resumes at the first unfinished stage, and a changed setting reruns exactly the stages
downstream of it.

Stages are thin: they call the library and describe what they produced. A stage is a
``Stage`` (name, function, upstream names, the library modules it needs); the default list is
``default_stages()``; adding a stage = writing one ``fn(ctx) -> None`` and appending a
``Stage`` to the list passed to ``run_pipeline``. A stage whose library module is missing is
reported as ``unavailable`` and its dependents are skipped.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: pip install tomli (same API)
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "presets"
TINY_MODELS = {"tiny-llama": "llama", "tiny-gemma": "gemma"}
COMMON_SECTIONS = ("run", "data", "generation", "judge")


class PipelineError(RuntimeError):
    """A stage failed (the message names it) or the configuration is invalid."""


# ============================================================================ configuration


def load_preset(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """A preset's config dict: ``"quick"``/``"full"`` (shipped) or a path to a TOML file."""
    p = Path(name_or_path)
    if not p.suffix and not p.exists():
        p = PRESET_DIR / f"{name_or_path}.toml"
    if not p.is_file():
        known = sorted(x.stem for x in PRESET_DIR.glob("*.toml"))
        raise FileNotFoundError(f"preset {name_or_path!r} not found (shipped presets: {known})")
    try:
        with open(p, "rb") as f:
            cfg = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise PipelineError(f"preset {p}: invalid TOML: {e}") from e
    cfg.setdefault("run", {}).setdefault("preset", p.stem)
    return cfg


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: Mapping[str, Any], overrides: Sequence[str] = (), *,
                    model: str | None = None) -> dict[str, Any]:
    """A copy of ``cfg`` with ``section.key=value`` overrides (TOML values) and ``--model``."""
    out = copy.deepcopy(dict(cfg))
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise PipelineError(f"override {item!r}: use section.key=value (e.g. data.n_test=4)")
        key, val = item.split("=", 1)
        section, k = key.strip().split(".", 1)
        out.setdefault(section, {})[k.strip()] = _parse_value(val.strip())
    if model is not None:
        out.setdefault("run", {})["model"] = model
    return out


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def _sha(obj: Any) -> str:
    return hashlib.sha256(_canon(obj).encode()).hexdigest()


# ============================================================================ stages


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: ``fn(ctx)`` computes and records results through ``ctx``.

    ``requires``: upstream stages whose outputs it reads; ``modules``: library modules that
    must import (else the stage is ``unavailable``); ``section``: its config section (default:
    its name); ``plan(cfg)`` -> ``{"forward": n, "generate": n, "what": str}`` for dry runs;
    ``version`` is part of the cache key (bump it when the stage's code changes its output).
    """

    name: str
    fn: Callable[[StageContext], None]
    title: str = ""
    requires: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    section: str | None = None
    plan: Callable[[Mapping[str, Any]], dict] | None = None
    version: int = 1
    optional: tuple[str, ...] = ()  # upstream stages used when present (hashed in when listed)

    @property
    def config_section(self) -> str:
        return self.section or self.name

    def missing_modules(self) -> list[str]:
        miss = []
        for m in self.modules:
            try:
                importlib.import_module(m)
            except ImportError:
                miss.append(m)
        return miss


@dataclass
class StageRecord:
    """A finished stage as read back from its folder."""

    name: str
    hash: str
    dir: Path
    output: dict
    cached: bool = False
    _artifacts: dict | None = None

    @property
    def results(self) -> dict:
        return self.output.get("results", {})

    @property
    def artifacts(self) -> dict:
        if self._artifacts is None:
            p = self.dir / "artifacts.pt"
            if p.exists():
                import torch

                self._artifacts = torch.load(p, map_location="cpu", weights_only=False)
            else:
                self._artifacts = {}
        return self._artifacts


class ModelHandle:
    """Loads the run's model on first use (so cached runs and dry runs never load it)."""

    def __init__(self, name: str, dtype: str | None = None, device: str | None = None) -> None:
        self.name, self.dtype, self.device = name, dtype, device
        self._model = None
        self.load_seconds = 0.0

    def get(self):
        if self._model is None:
            t = time.perf_counter()
            self._model = load_run_model(self.name, dtype=self.dtype, device=self.device)
            self.load_seconds = time.perf_counter() - t
        return self._model

    @property
    def loaded(self) -> bool:
        return self._model is not None


def load_run_model(name: str, *, dtype: str | None = None, device: str | None = None):
    """``load_model(name)``, plus ``"tiny-llama"``/``"tiny-gemma"`` (random tiny test models)."""
    from . import models

    if name in TINY_MODELS:
        return models.tiny_model(TINY_MODELS[name], seed=0)
    return models.load_model(name, device=device, dtype=dtype)


@dataclass
class StageContext:
    """What a stage function sees: the config, its folder, upstream records, the model."""

    stage: Stage
    config: dict[str, Any]
    run_dir: Path
    dir: Path  # the stage's (temporary) output folder
    upstream: dict[str, StageRecord]
    model_handle: ModelHandle
    progress: bool = True
    results: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    figures: list[dict] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)
    views: list[dict] = field(default_factory=list)

    @property
    def model(self):
        return self.model_handle.get()

    @property
    def section(self) -> dict[str, Any]:
        return dict(self.config.get(self.stage.config_section, {}))

    def opt(self, key: str, default: Any = None) -> Any:
        """A setting of this stage's section (falls back to ``default``)."""
        return self.section.get(key, default)

    @property
    def emotions(self) -> list[str]:
        return list(self.config["run"]["emotions"])

    def records(self, split: str):
        """The first ``data.n_<split>`` SEV records of ``data.<split>``, round-robin over themes."""
        from .data import load_sev

        d = self.config["data"]
        src = d.get(split)
        if src is None:
            raise PipelineError(f"config has no data.{split}")
        return subset_records(load_sev(src), d.get(f"n_{split}"))

    def gen_config(self, **over: Any):
        from .generation import GenerationConfig

        g = {k: v for k, v in self.config.get("generation", {}).items()
             if k in ("max_new_tokens", "min_new_tokens", "repetition_penalty",
                      "no_repeat_ngram_size", "batch_size")}
        g.update(over)
        return GenerationConfig(**g)

    def judge(self):
        from .judges import default_judge

        prefer = self.config.get("judge", {}).get("prefer", "auto")
        return default_judge(self.emotions, prefer=prefer)

    def path(self, *parts: str) -> Path:
        p = self.dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def figure(self, caption: str, filename: str, fn: Callable[..., Path], /, *args: Any,
               **kw: Any) -> None:
        """Draw ``fn(*args, out=..., **kw)`` into ``figures/filename`` and record it.

        A figure that fails to draw is recorded in ``results['figure_errors']`` (the numbers
        stay valid)."""
        out = self.path("figures", filename)
        try:
            fn(*args, out=out, **kw)
        except Exception as e:  # a bad picture must not lose a finished computation
            self.results.setdefault("figure_errors", {})[filename] = f"{type(e).__name__}: {e}"
            return
        self.figures.append({"title": caption, "path": f"figures/{filename}"})

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.tables.append({"title": title, "columns": list(columns),
                            "rows": [list(r) for r in rows]})

    def view(self, view, filename: str) -> None:
        """Record a ``circuitsvis_views.View`` (its fragment is saved under ``views/``)."""
        p = self.path("views", filename)
        p.write_text(view.html, encoding="utf-8")
        self.views.append({"title": view.title, "path": f"views/{filename}",
                           "needs_bundle": bool(view.needs_bundle)})


def subset_records(ds, n: int | None):
    """First ``n`` records taking themes in turn (theme order of first appearance); all if None."""
    recs = list(ds)
    if n is None or n >= len(recs):
        return recs
    if n < 1:
        raise PipelineError(f"data size must be >= 1, got {n}")
    by_theme: dict[str, list] = {}
    for r in recs:
        by_theme.setdefault(r.theme, []).append(r)
    out, i = [], 0
    while len(out) < n:
        for rs in by_theme.values():
            if i < len(rs) and len(out) < n:
                out.append(rs[i])
        i += 1
    return out


# ============================================================================ the runner


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    """Numbers/arrays/tensors/dataclasses -> plain JSON (NaN/inf -> None)."""
    import numpy as np

    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return _jsonable(obj.to_dict())
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "detach"):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return _jsonable(asdict(obj))
    return str(obj)


def stage_hashes(stages: Sequence[Stage], cfg: Mapping[str, Any]) -> dict[str, str]:
    """The cache key of every stage (upstream hashes chained in)."""
    common = {s: cfg.get(s, {}) for s in COMMON_SECTIONS}
    common["run"] = {k: v for k, v in common["run"].items() if k not in ("preset", "keep_going")}
    out: dict[str, str] = {}
    for st in stages:
        ups = {}
        for r in st.requires:
            if r not in out:
                raise PipelineError(f"stage {st.name!r} requires {r!r}, which is not before it")
            ups[r] = out[r]
        out[st.name] = _sha({"stage": st.name, "version": st.version,
                             "section": cfg.get(st.config_section, {}),
                             "common": common, "upstream": ups})[:16]
    return out


def _effective_hash(st: Stage, hashes: Mapping[str, str], done: Mapping[str, Any]) -> str:
    """The stage's hash, with the hashes of the optional upstream stages that are done."""
    opt = {r: hashes[r] for r in st.optional if r in done}
    return hashes[st.name] if not opt else _sha([hashes[st.name], opt])[:16]


def _stage_dir(run_dir: Path, name: str, h: str) -> Path:
    return run_dir / "stages" / f"{name}-{h}"


def _load_record(run_dir: Path, name: str, h: str) -> StageRecord | None:
    d = _stage_dir(run_dir, name, h)
    p = d / "output.json"
    if not p.is_file():
        return None
    return StageRecord(name, h, d, json.loads(p.read_text(encoding="utf-8")), cached=True)


@dataclass
class RunResult:
    run_dir: Path
    results: dict
    report: Path | None
    ran: list[str]
    cached: list[str]
    failed: list[str]
    skipped: list[str]


def _results_doc(cfg: Mapping[str, Any], stages: Sequence[Stage], status: Mapping[str, dict]) -> dict:
    from . import __version__

    return {
        "meta": {
            "model": cfg["run"].get("model"), "preset": cfg["run"].get("preset"),
            "emotions": cfg["run"].get("emotions"),
            "data_sizes": {k: v for k, v in cfg.get("data", {}).items() if k.startswith("n_")},
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "emocircuits_version": __version__, "python": platform.python_version(),
            "config": cfg,
        },
        "summary": headline_numbers(status),
        "stages": {s.name: status[s.name] for s in stages if s.name in status},
    }


_HEADLINES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("judge_accuracy_on_builtin_utterance_labels", "judge", ("accuracy_on_builtin_utterance_labels",)),
    ("prompting_accuracy", "prompting", ("prompting_accuracy", "overall")),
    ("readout_accuracy_instructed", "prompting", ("readout_accuracy_on_instructed_prompts", "overall")),
    ("readout_accuracy_without_keyword_token", "prompting",
     ("readout_accuracy_without_instruction_keyword", "overall")),
    ("steering_accuracy", "steering", ("test_steering_accuracy", "overall")),
    ("no_intervention_accuracy", "steering", ("test_unsteered_accuracy", "overall")),
    ("circuit_modulation_accuracy", "circuits", ("test_accuracy_summary", "circuit_modulation")),
    ("random_circuit_accuracy", "circuits", ("test_accuracy_summary", "random_circuit_control_mean")),
    ("head_attribution_vs_exact_spearman", "components",
     ("attribution_vs_exact_head_ablation", "mean_spearman")),
    ("probe_peak_accuracy", "probes", ("probe_sweep", "peak_accuracy")),
    ("probe_peak_layer", "probes", ("probe_sweep", "peak_layer")),
    ("probe_chance", "probes", ("probe_sweep", "chance_uniform")),
    ("zero_shot_accuracy", "probes", ("zero_shot_baseline", "accuracy")),
    ("zero_shot_constrained_accuracy", "probes", ("zero_shot_baseline", "constrained_accuracy")),
    ("va_valence_pearson_r", "control",
     ("valence_arousal_controllability", "text_scores", "valence", "pearson_r")),
    ("va_valence_mae", "control", ("valence_arousal_controllability", "text_scores", "valence", "mae")),
    ("va_arousal_pearson_r", "control",
     ("valence_arousal_controllability", "text_scores", "arousal", "pearson_r")),
    ("va_arousal_mae", "control", ("valence_arousal_controllability", "text_scores", "arousal", "mae")),
    ("vocabulary_bias_accuracy", "control", ("vocabulary_bias", "accuracy", "overall")),
)


def headline_numbers(status: Mapping[str, dict]) -> dict[str, Any]:
    """The run's main numbers in one flat dict (absent stages/keys are left out)."""
    out: dict[str, Any] = {}
    for key, stage, path in _HEADLINES:
        node: Any = status.get(stage, {}).get("results")
        for k in path:
            node = node.get(k) if isinstance(node, Mapping) else None
        if node is not None:
            out[key] = node
    kw = status.get("directions", {}).get("results", {}).get("keyword_control")
    if isinstance(kw, Mapping):
        try:
            out["decoding_emotion_words_max_over_layers"] = max(kw["emotion"]["centered"])
            out["decoding_control_words_max_over_layers"] = max(kw["control"]["centered"])
        except (KeyError, TypeError, ValueError):
            pass
    return out


def _stage_entry(st: Stage, rec: StageRecord, run_dir: Path) -> dict:
    rel = rec.dir.relative_to(run_dir).as_posix()
    out = rec.output
    return {
        "title": st.title or st.name, "status": "done", "cached": rec.cached,
        "config_hash": rec.hash, "seconds": out.get("seconds"), "folder": rel,
        "results": out.get("results", {}),
        "figures": [{**f, "path": f"{rel}/{f['path']}"} for f in out.get("figures", [])],
        "tables": out.get("tables", []),
        "views": [{**v, "path": f"{rel}/{v['path']}"} for v in out.get("views", [])],
    }


def run_pipeline(
    config: Mapping[str, Any],
    run_dir: str | os.PathLike,
    *,
    stages: Sequence[Stage] | None = None,
    only: Sequence[str] | None = None,
    keep_going: bool = True,
    report: bool = True,
    progress: bool = True,
    model=None,
) -> RunResult:
    """Run (or resume) every stage; write ``results.json`` after each and ``report.html`` at the end.

    ``only``: run just these stages (their upstream stages must be cached or are run too).
    ``keep_going``: a failing stage is recorded (status ``failed: ...``) and its dependents
    skipped; with ``False`` the first failure raises ``PipelineError``. ``model``: an
    already-loaded model to use instead of loading ``config.run.model``.
    """
    cfg = validate_config(config)
    stages = list(stages) if stages is not None else default_stages()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(run_dir / "config.json", json.dumps(cfg, indent=1, sort_keys=True, default=str))
    hashes = stage_hashes(stages, cfg)
    wanted = _closure(stages, only)
    handle = ModelHandle(cfg["run"]["model"], cfg["run"].get("dtype"), cfg["run"].get("device"))
    if model is not None:
        handle._model = model
    # stale temporary folders of killed runs
    for tmp in (run_dir / "stages").glob(".tmp-*") if (run_dir / "stages").exists() else []:
        shutil.rmtree(tmp, ignore_errors=True)
    status: dict[str, dict] = {}
    prev = run_dir / "results.json"
    records: dict[str, StageRecord] = {}
    ran, cached, failed, skipped = [], [], [], []
    bar = tqdm(stages, desc="pipeline", disable=not progress, unit="stage")
    for st in bar:
        bar.set_postfix_str(st.name)
        h = _effective_hash(st, hashes, records)
        rec = _load_record(run_dir, st.name, h)
        if rec is not None:
            records[st.name] = rec
            status[st.name] = _stage_entry(st, rec, run_dir)
            cached.append(st.name)
            continue
        if st.name not in wanted:
            continue
        miss = st.missing_modules()
        bad_up = [r for r in st.requires if r not in records]
        if miss or bad_up:
            why = (f"unavailable: module {', '.join(miss)} not found" if miss
                   else f"skipped: upstream {', '.join(bad_up)} not available")
            status[st.name] = {"title": st.title or st.name, "status": why, "config_hash": h}
            skipped.append(st.name)
            _atomic_write_text(prev, json.dumps(_results_doc(cfg, stages, status), indent=1))
            continue
        try:
            rec = _run_stage(st, h, cfg, run_dir, records, handle, progress)
        except Exception as e:
            if not keep_going:
                raise PipelineError(f"stage {st.name!r} failed: {type(e).__name__}: {e}") from e
            status[st.name] = {"title": st.title or st.name, "config_hash": h,
                               "status": f"failed: {type(e).__name__}: {e}",
                               "traceback": traceback.format_exc(limit=8)}
            failed.append(st.name)
            tqdm.write(f"[emocircuits] stage {st.name} failed: {type(e).__name__}: {e}")
        else:
            records[st.name] = rec
            status[st.name] = _stage_entry(st, rec, run_dir)
            ran.append(st.name)
        _atomic_write_text(prev, json.dumps(_results_doc(cfg, stages, status), indent=1))
    bar.close()
    doc = _results_doc(cfg, stages, status)
    doc["meta"]["model_load_seconds"] = round(handle.load_seconds, 2) if handle.loaded else None
    _atomic_write_text(prev, json.dumps(doc, indent=1))
    rep = None
    if report:
        from .viz.report import build_report

        rep = build_report(run_dir)
    return RunResult(run_dir, doc, rep, ran, cached, failed, skipped)


def _closure(stages: Sequence[Stage], only: Sequence[str] | None) -> set[str]:
    names = [s.name for s in stages]
    if only is None:
        return set(names)
    unknown = [o for o in only if o not in names]
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown}; stages: {names}")
    by = {s.name: s for s in stages}
    want: set[str] = set()
    todo = list(only)
    while todo:
        n = todo.pop()
        if n not in want:
            want.add(n)
            todo += list(by[n].requires)
    return want


def _run_stage(st: Stage, h: str, cfg: dict, run_dir: Path, records: dict[str, StageRecord],
               handle: ModelHandle, progress: bool) -> StageRecord:
    import torch

    stages_dir = run_dir / "stages"
    stages_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{st.name}-{h}-", dir=stages_dir))
    try:
        ups = {r: records[r] for r in (*st.requires, *st.optional) if r in records}
        ctx = StageContext(st, cfg, run_dir, tmp, ups, handle, progress)
        t = time.perf_counter()
        st.fn(ctx)
        seconds = time.perf_counter() - t
        output = {"stage": st.name, "hash": h, "seconds": round(seconds, 2),
                  "results": _jsonable(ctx.results), "figures": ctx.figures,
                  "tables": _jsonable(ctx.tables), "views": ctx.views,
                  "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if ctx.artifacts:
            torch.save(ctx.artifacts, tmp / "artifacts.pt")
        (tmp / "output.json").write_text(json.dumps(output, indent=1), encoding="utf-8")
        final = _stage_dir(run_dir, st.name, h)
        if final.exists():  # a concurrent run finished it first
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return StageRecord(st.name, h, final, output, cached=False, _artifacts=ctx.artifacts or None)


# ============================================================================ plan / dry run

# Rough per-model cost on this kind of CPU (SmolLM2-135M measured: 16 prompts × 70 tokens
# forward ≈ 6 s; one greedy decode step of a batch of 16 ≈ 0.15 s).
_SECONDS_PER_PROMPT_FORWARD = 0.4
_SECONDS_PER_DECODE_STEP_BATCH16 = 0.15
_MODEL_COST = {"smollm2-135m-instruct": 1.0, "gemma-3-270m": 2.5, "tiny-llama": 0.02,
               "tiny-gemma": 0.02}


def estimate_seconds(plan: Mapping[str, Any], cfg: Mapping[str, Any]) -> float:
    """forward·0.4 s + ⌈generate/16⌉·max_new_tokens·0.15 s (+ prefill), × model factor."""
    f = _MODEL_COST.get(str(cfg["run"].get("model")), 1.0)
    T = int(cfg.get("generation", {}).get("max_new_tokens", 32))
    fwd = float(plan.get("forward", 0)) + float(plan.get("generate", 0))
    dec = math.ceil(float(plan.get("generate", 0)) / 16) * T * _SECONDS_PER_DECODE_STEP_BATCH16
    return f * (fwd * _SECONDS_PER_PROMPT_FORWARD + dec) + float(plan.get("extra_seconds", 0.0))


def dry_run(config: Mapping[str, Any], run_dir: str | os.PathLike, *,
            stages: Sequence[Stage] | None = None) -> str:
    """The plan as text: stages in order, sizes, cached or not, and an estimated time."""
    cfg = validate_config(config)
    stages = list(stages) if stages is not None else default_stages()
    run_dir = Path(run_dir)
    hashes = stage_hashes(stages, cfg)
    d = cfg["data"]
    lines = [f"emocircuits plan: model={cfg['run']['model']} preset={cfg['run'].get('preset')} "
             f"out={run_dir}",
             f"emotions={len(cfg['run']['emotions'])} ({', '.join(cfg['run']['emotions'])}); "
             + "data: " + ", ".join(f"{k[2:]}={v}" for k, v in d.items() if k.startswith("n_"))
             + f"; max_new_tokens={cfg.get('generation', {}).get('max_new_tokens')}",
             f"{'stage':<12} {'state':<28} {'fwd':>6} {'gen':>6} {'est.':>8}  what"]
    total = 0.0
    model_needed = False
    done: dict[str, bool] = {}
    for st in stages:
        h = _effective_hash(st, hashes, done)
        if _stage_dir(run_dir, st.name, h).joinpath("output.json").is_file():
            done[st.name] = True
        plan = st.plan(cfg) if st.plan else {}
        if _stage_dir(run_dir, st.name, h).joinpath("output.json").is_file():
            state, est = "cached", 0.0
        elif st.missing_modules():
            state, est = "unavailable (" + ",".join(m.split(".")[-1] for m in st.missing_modules()) + ")", 0.0
        else:
            state, est = f"to run [{h[:8]}]", estimate_seconds(plan, cfg)
            model_needed = True
        total += est
        lines.append(f"{st.name:<12} {state:<28} {plan.get('forward', 0):>6} "
                     f"{plan.get('generate', 0):>6} {est:>7.0f}s  {plan.get('what', '')}")
    if model_needed:
        total += 10 * _MODEL_COST.get(str(cfg["run"]["model"]), 1.0)
    lines.append(f"estimated total: {total / 60:.1f} min ({total:.0f} s, incl. model load; "
                 "a rough CPU estimate)")
    return "\n".join(lines)


# ============================================================================ config validation


DEFAULTS: dict[str, Any] = {
    "run": {"model": "smollm2-135m-instruct", "dtype": "float32",
            "emotions": ["anger", "sadness", "happiness", "fear", "surprise", "disgust"]},
    "data": {"train": "builtin:train", "validation": "builtin:validation", "test": "builtin:test"},
    "generation": {"max_new_tokens": 32, "batch_size": 16},
    "judge": {"prefer": "auto"},
}


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults filled in; sizes and emotions checked (errors name the key)."""
    cfg = copy.deepcopy(dict(config))
    for sec, vals in DEFAULTS.items():
        s = cfg.setdefault(sec, {})
        if not isinstance(s, dict):
            raise PipelineError(f"config [{sec}] must be a table, got {type(s).__name__}")
        for k, v in vals.items():
            s.setdefault(k, copy.deepcopy(v))
    for k, v in cfg["data"].items():
        if k.startswith("n_") and v is not None and (not isinstance(v, int) or v < 1):
            raise PipelineError(f"config data.{k} must be a positive integer, got {v!r}")
    emos = cfg["run"]["emotions"]
    if not isinstance(emos, list) or len(emos) < 2 or len(set(emos)) != len(emos):
        raise PipelineError(f"config run.emotions must list >= 2 distinct emotions, got {emos!r}")
    mnt = cfg["generation"].get("max_new_tokens")
    if not isinstance(mnt, int) or mnt < 1:
        raise PipelineError(f"config generation.max_new_tokens must be a positive int, got {mnt!r}")
    return cfg




# ============================================================================ the stages
#
# Each stage function reads its settings with ``ctx.opt``, calls the library and records
# numbers (``ctx.results``), tables, figures and artifacts. Keys in results are meant to be
# read without the code: they name the quantity and, where relevant, its control.


def _n_prompts(cfg: Mapping[str, Any], split: str, per_emotion: bool = True) -> int:
    n = cfg["data"].get(f"n_{split}") or {"train": 160, "validation": 40, "test": 40}[split]
    return n * 3 * (len(cfg["run"]["emotions"]) if per_emotion else 1)


def _acc_dict(table) -> dict:
    """An ``AccuracyTable`` as {"overall", "n", "by_emotion", "by_valence", ...}."""
    return _jsonable(table)


def _acc_rows(name: str, table, emotions: Sequence[str]) -> list:
    d = table if isinstance(table, Mapping) else _acc_dict(table)
    return [name, d.get("overall"), *[d.get("by_emotion", {}).get(e) for e in emotions], d.get("n")]


# ---------------------------------------------------------------------------- judge


def stage_judge(ctx: StageContext) -> None:
    """Agreement of the run's offline judge with the labels of the builtin utterance set (written for this project; test split)."""
    from .data import load_utterances

    emos = ctx.emotions
    utt = [u for u in load_utterances(split=ctx.opt("split", "test")) if u.label in emos]
    if not utt:
        ctx.results["note"] = "no labeled utterance of the run's emotions"
        return
    judge = ctx.judge()
    res = judge.judge([u.text for u in utt], [u.label for u in utt])
    per = {}
    for e in emos:
        m = [ok for u, ok in zip(utt, res.match, strict=True) if u.label == e]
        per[e] = sum(m) / len(m) if m else None
    kw = [ok for u, ok in zip(utt, res.match, strict=True) if not u.has_keyword]
    ctx.results.update({
        "judge": getattr(judge, "name", type(judge).__name__),
        "accuracy_on_builtin_utterance_labels": res.accuracy,
        "agreement_by_emotion": per,
        "agreement_on_utterances_without_emotion_keyword": (sum(kw) / len(kw)) if kw else None,
        "n_utterances": len(utt), "chance": 1.0 / len(emos),
    })
    ctx.table("offline judge vs builtin utterance labels",
              ["judge", "overall", *emos, "n"],
              [[ctx.results["judge"], res.accuracy, *[per[e] for e in emos], len(utt)]])


# ---------------------------------------------------------------------------- prompting


def stage_prompting(ctx: StageContext) -> None:
    """Stage 01: "Always reply in {emotion}" generations, judged; readout accuracy beside it."""
    from .elicitation import elicit, judge_generations, prompting_table, readout_accuracy

    model, emos = ctx.model, ctx.emotions
    recs = ctx.records("test")
    rows = elicit(model, recs, emos, out_path=ctx.path("generations.jsonl"),
                  gen_config=ctx.gen_config(), progress=ctx.progress)
    judged = judge_generations(rows, ctx.judge())
    table = prompting_table(judged)
    ro = readout_accuracy(model, recs, emos, progress=ctx.progress)
    ctx.results["prompting_accuracy"] = _acc_dict(table)
    ctx.results["readout_accuracy_on_instructed_prompts"] = _acc_dict(ro.table)
    ctx.results["readout_accuracy_without_instruction_keyword"] = _acc_dict(ro.table_no_keyword)
    ctx.results["readout_target_share_instructed"] = ro.target_share
    ctx.results["readout_target_share_neutral_prompt"] = ro.neutral_target_share
    ctx.results["chance"] = 1.0 / len(emos)
    ctx.results["examples"] = [{"emotion": r["emotion"], "valence": r.get("valence"),
                                "text": r["gen_text"], "match": r["judge"]["match"]}
                               for r in judged[: 2 * len(emos)]]
    ctx.table("prompting (judge) and readout accuracy", ["method", "overall", *emos, "n"], [
        _acc_rows("prompting (judge)", table, emos),
        _acc_rows("readout, instructed", ro.table, emos),
        _acc_rows("readout, keyword token removed", ro.table_no_keyword, emos)])
    from .viz import figures

    ctx.figure("prompting vs readout accuracy", "prompting.png", figures.method_comparison,
               {"prompting (judge)": table.overall, "readout": ro.table.overall,
                "readout w/o keyword": ro.table_no_keyword.overall},
               per_emotion={"prompting": table.by_emotion, "readout": ro.table.by_emotion})


def _plan_prompting(cfg):
    return {"generate": _n_prompts(cfg, "test"), "forward": 2 * _n_prompts(cfg, "test"),
            "what": "generate + judge instructed replies; readout"}


# ---------------------------------------------------------------------------- directions


def _pick_layers(n_layers: int, spec: Any, k: int = 4) -> list[int]:
    if spec in (None, "auto"):
        return sorted({round(x * (n_layers - 1) / (k - 1)) for x in range(k)})
    return [int(x) % n_layers for x in spec]


def stage_directions(ctx: StageContext) -> None:
    """Stage 02: context-agnostic emotion directions + decodability + keyword control."""
    from . import directions as D
    from .activations import collect
    from .prompts import emotion_prompts
    from .viz import figures

    model, emos = ctx.model, ctx.emotions
    sites = list(ctx.opt("sites", ["resid_mid", "resid_post"]))
    recs = ctx.records("train")
    prompts = emotion_prompts(model, recs, emos)
    acts = collect(model, prompts, sites, position="last", progress=ctx.progress,
                   batch_size=int(ctx.config["generation"].get("batch_size", 16)))
    dirs = D.context_agnostic(acts, prompts, emos, sites=sites)
    ctx.artifacts["directions"] = dirs
    n_folds = min(int(ctx.opt("n_folds", 5)), len(recs))
    main_site = sites[-1]
    dec = D.nearest_centroid_accuracy(acts, prompts, emos, main_site, n_folds)
    ctx.results["layers"] = dirs.layers
    ctx.results["groups"] = {k: v for k, v in dirs.meta.items() if k.startswith("n_groups")}
    ctx.results["nearest_centroid_accuracy"] = dec.to_dict()
    cos_l = {e: D.cosine_across_layers(dirs, e, sites) for e in emos}
    ctx.results["off_diagonal_cosine_across_emotions"] = {
        f"{s}/L{layer}": D.cosine_across_emotions(dirs, s, layer).off_diagonal_mean()
        for s in sites for layer in dirs.layers}
    ctx.results["mean_cosine_across_layer_sites"] = {e: float(c.off_diagonal_mean())
                                                     for e, c in cos_l.items()}
    if ctx.opt("keyword_control", True):
        kw = D.keyword_control(model, recs, emos, tuple(ctx.opt("control_words", (
            "red", "blue", "green", "yellow", "purple", "orange", "brown", "pink")))[: len(emos)],
            site=main_site, n_folds=n_folds, emotion_acts=acts, progress=ctx.progress)
        ctx.results["keyword_control"] = kw.to_dict()
        ctx.figure("keyword-confound control: decoding emotion words vs colour words",
                   "keyword_control.png", figures.probe_accuracy,
                   {"emotion, group-centred": kw.emotion.centered,
                    "control words, group-centred": kw.control.centered,
                    "emotion, raw": kw.emotion.uncentered,
                    "control words, raw": kw.control.uncentered},
                   layers=kw.emotion.layers, chance=kw.emotion.chance,
                   title="nearest-centroid decoding: emotion vs control words")
    ctx.figure("nearest-centroid decoding per layer", "decoding.png", figures.probe_accuracy,
               {"group-centred": dec.centered, "raw": dec.uncentered}, layers=dec.layers,
               chance=dec.chance, title=f"held-out nearest-centroid accuracy ({main_site})")
    ctx.figure("direction cosine across layers and sites (mean over emotions)",
               "direction_similarity.png", figures.direction_similarity,
               {s: dirs.vectors[s] for s in sites}, emos)
    mid = dirs.layers[len(dirs.layers) * 2 // 3]
    ctx.figure(f"cosine between emotion directions ({main_site}, layer {mid})",
               "emotion_similarity.png", figures.emotion_similarity,
               dirs.vectors[main_site][:, dirs.layers.index(mid)], emos)
    pca_layers = _pick_layers(model.cfg.n_layers, ctx.opt("pca_layers", "auto"))
    x = acts[main_site]
    ctx.figure("PCA of last-token activations, coloured by instructed emotion", "pca.png",
               figures.pca_clusters,
               {layer: x[:, acts.layers[main_site].index(layer)] for layer in pca_layers
                if layer in acts.layers[main_site]},
               [p.emotion for p in prompts])


def _plan_directions(cfg):
    n = _n_prompts(cfg, "train")
    kw = n if cfg.get("directions", {}).get("keyword_control", True) else 0
    return {"forward": n + kw, "what": "collect last-token resid; directions; decoding; keyword control"}


# ---------------------------------------------------------------------------- steering


def stage_steering(ctx: StageContext) -> None:
    """Stage 03: choose (layers, α) on validation, report steering accuracy on test."""
    from .prompts import neutral_prompts
    from .steering import paper_layers, steering_sweep
    from .viz import figures

    model, emos = ctx.model, ctx.emotions
    dirs = ctx.upstream["directions"].artifacts["directions"]
    bands = ctx.opt("layer_bands", "paper")
    bands = [paper_layers(model)] if bands == "paper" else [list(b) for b in bands]
    alphas = [float(a) for a in ctx.opt("alphas", [2.0, 4.0, 8.0])]
    judge = ctx.judge()
    gen = ctx.gen_config()
    sweep = None
    if len(bands) * len(alphas) > 1:  # something to choose: sweep on validation
        val = neutral_prompts(model, ctx.records("validation"))
        sweep = steering_sweep(model, val, dirs, emos, bands, alphas, judge, gen,
                               progress=ctx.progress)
        max_ppl = ctx.opt("max_perplexity")
        try:
            best = sweep.best("judge_accuracy", max_perplexity=max_ppl)
        except ValueError:
            best = sweep.best("judge_accuracy")
    else:
        best = {"layers": _band_str(bands[0]), "alpha": alphas[0]}
    band = next(b for b in bands if _band_str(b) == best["layers"]) if len(bands) > 1 else bands[0]
    test = neutral_prompts(model, ctx.records("test"))
    res = steering_sweep(model, test, dirs, emos, [band], [best["alpha"]], judge, gen,
                         progress=ctx.progress)
    steered = [r for r in res.rows if r["alpha"] != 0]
    base = [r for r in res.rows if r["alpha"] == 0]
    acc = {r["emotion"]: r["judge_accuracy"] for r in steered}
    acc0 = {r["emotion"]: r["judge_accuracy"] for r in base}
    ctx.results["validation_sweep"] = sweep.summary() if sweep is not None else None
    ctx.results["chosen_on_validation"] = {"layers": best["layers"], "alpha": best["alpha"],
                                           "swept": sweep is not None}
    ctx.results["test_steering_accuracy"] = {"overall": _mean(acc.values()), "by_emotion": acc}
    ctx.results["test_unsteered_accuracy"] = {"overall": _mean(acc0.values()), "by_emotion": acc0}
    ctx.results["test_rows"] = res.rows
    ctx.table("steering on the test set (setting chosen on validation)",
              ["method", "overall", *emos],
              [["steering", _mean(acc.values()), *[acc.get(e) for e in emos]],
               ["no intervention", _mean(acc0.values()), *[acc0.get(e) for e in emos]]])
    summ = [s for s in sweep.summary() if s["alpha"] != 0] if sweep is not None else []
    if len(summ) > 1:
        xs = sorted({s["alpha"] for s in summ})
        first = summ[0]["layers"]
        pick = {s["alpha"]: s for s in summ if s["layers"] == first}
        ctx.figure("steering sweep on validation", "steering_sweep.png", figures.sweep_curves,
                   xs, {"judge accuracy": [pick[a]["judge_accuracy"] for a in xs],
                        "readout share": [pick[a]["readout_share"] for a in xs]},
                   perplexity={"perplexity": [pick[a]["perplexity"] for a in xs]},
                   xlabel="α (× rms)", title=f"steering, layers {first}")


def _band_str(b):
    b = list(b)
    return f"{b[0]}-{b[-1]}" if b and b == list(range(b[0], b[-1] + 1)) else ",".join(map(str, b))


def _mean(vals) -> float | None:
    v = [float(x) for x in vals if x is not None and math.isfinite(float(x))]
    return sum(v) / len(v) if v else None


def _plan_steering(cfg):
    s = cfg.get("steering", {})
    n_set = len(s.get("alphas", [2.0, 4.0, 8.0])) * len(s.get("layer_bands", [0])
                                                        if s.get("layer_bands", "paper") != "paper" else [0])
    nv = _n_prompts(cfg, "validation") if n_set > 1 else 0
    nt = _n_prompts(cfg, "test")
    return {"generate": nv * (n_set + 1) + nt * 2, "forward": 2 * (nv * (n_set + 1) + nt * 2),
            "what": (f"sweep {n_set} settings on validation; best on test" if n_set > 1
                     else "one setting (no sweep); steered vs unsteered on test")}


# ---------------------------------------------------------------------------- views


def stage_views(ctx: StageContext) -> None:
    """circuitsvis views (offline) of the most important heads and neurons on one test prompt."""
    from .prompts import neutral_prompts
    from .viz.circuitsvis_views import attention_view, neuron_view

    model = ctx.model
    prompt = neutral_prompts(model, ctx.records("test")[:1])[0]
    heads, neurons = _top_components(ctx)
    k = int(ctx.opt("k", 4))
    if not heads:
        mid = model.cfg.n_layers // 2
        heads = [(mid, h) for h in range(min(k, model.cfg.n_heads))]
    if not neurons:
        neurons = [(model.cfg.n_layers - 1, i) for i in range(k)]
    ctx.view(attention_view(model, prompt, heads[:k]), "attention.html")
    ctx.view(neuron_view(model, prompt, neurons[:k]), "neurons.html")
    ctx.results["attention_heads_shown"] = [list(h) for h in heads[:k]]
    ctx.results["neurons_shown"] = [list(n) for n in neurons[:k]]
    ctx.results["prompt"] = prompt.text


def _top_components(ctx: StageContext) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Top (layer, head)s and (layer, neuron)s recorded by the components/circuits stages."""
    for name in ("circuits", "components"):
        rec = ctx.upstream.get(name)
        if rec is None:
            continue
        top = rec.results.get("top_components", {})
        heads = [tuple(x) for x in top.get("heads", [])]
        neurons = [tuple(x) for x in top.get("neurons", [])]
        if heads or neurons:
            return heads, neurons
    return [], []


def _plan_views(cfg):
    return {"forward": 2, "what": "attention + neuron views of top components (circuitsvis, offline)"}


# ---------------------------------------------------------------------------- registry


def default_stages() -> list[Stage]:
    """The paper's stages in order; stages whose library module is absent are skipped."""
    return [
        Stage("judge", stage_judge, "Judge agreement", modules=("emocircuits.judges",),
              plan=lambda cfg: {"what": "offline judge vs builtin utterance labels (no model)"}),
        Stage("prompting", stage_prompting, "Prompt-based elicitation (stage 01)",
              modules=("emocircuits.elicitation",), plan=_plan_prompting),
        Stage("directions", stage_directions, "Emotion directions (stage 02)",
              modules=("emocircuits.directions",), plan=_plan_directions),
        Stage("steering", stage_steering, "Steering (stage 03)", requires=("directions",),
              modules=("emocircuits.steering",), plan=_plan_steering),
        *_more_stages(),
        Stage("views", stage_views, "Attention and neuron views", plan=_plan_views,
              optional=("components", "circuits")),
    ]


# ---------------------------------------------------------------------------- components


def _split_per_emotion(prompts, emos, n_per: int | None):
    """The first ``n_per`` prompts of every emotion (input order kept)."""
    if n_per is None:
        return list(prompts)
    count: dict[str, int] = {}
    out = []
    for p in prompts:
        if p.emotion in emos and count.get(p.emotion, 0) < n_per:
            out.append(p)
            count[p.emotion] = count.get(p.emotion, 0) + 1
    return out


def stage_components(ctx: StageContext) -> None:
    """Stage 04: neuron contributions, head ablation (exact) vs attribution, top-k vs random-k."""
    from . import components as K
    from .prompts import emotion_prompts
    from .viz import figures

    model, emos = ctx.model, ctx.emotions
    dirs = ctx.upstream["directions"].artifacts["directions"]
    bs = int(ctx.config["generation"].get("batch_size", 16))
    prompts = _split_per_emotion(emotion_prompts(model, ctx.records("train"), emos), emos,
                                 ctx.opt("n_prompts_per_emotion"))
    nc = K.neuron_contributions(model, prompts, None, dirs.vectors["resid_post"], emos,
                                batch_size=bs, progress=ctx.progress)
    attr = K.head_attribution(model, prompts, None, emos, readout="same_layer",
                              directions_mid=dirs.vectors["resid_mid"], batch_size=bs,
                              progress=ctx.progress)
    abl_layers = ctx.opt("ablation_layers")
    if abl_layers is None:
        abl_layers = list(range(0, model.cfg.n_layers, int(ctx.opt("ablation_layer_step", 1))))
    # exact zero-ablation scores, computed in closed form (one forward; equal to the batched
    # ablation, see components.head_ablation_importance_closed_form)
    abl = K.head_ablation_importance_closed_form(model, prompts, None, dirs.vectors["resid_mid"],
                                                 emos, layers=abl_layers, batch_size=bs,
                                                 progress=ctx.progress)
    ctx.artifacts.update({"neurons": nc, "heads_attribution": attr, "heads_ablation": abl})
    k_top = int(ctx.opt("top_k", 5))
    agree = {}
    for i, e in enumerate(emos):
        a = attr.mean[i][[attr.layers.index(layer) for layer in abl.layers]]
        agree[e] = K.rank_agreement(a, abl.mean[i], k=min(k_top, abl.mean[i].numel()))
    ctx.results["attribution_vs_exact_head_ablation"] = {
        "per_emotion": agree,
        "mean_spearman": _mean(a["spearman"] for a in agree.values()),
        "layers_compared": abl.layers}
    ctx.results["top_heads_exact"] = {e: [list(map(float, r)) for r in abl.top(e, k=k_top)]
                                      for e in emos}
    ctx.results["top_neurons"] = {e: [list(map(float, r)) for r in nc.top(e, k=k_top)]
                                  for e in emos}
    ctx.results["n_prompts_per_emotion"] = nc.n_samples
    # top-k vs random-k ablation of neurons (paper Sec. 6 controls)
    ks = [int(k) for k in ctx.opt("sweep_ks", [1, 4])]
    n_random = int(ctx.opt("n_random", 1))
    sweeps = {}
    for e in emos:
        ps = [p for p in prompts if p.emotion == e]
        sw = K.component_sweep(model, ps, e, nc.top(e, k=max(ks)), "neuron", ks, "ablate",
                               n_random=n_random, emotions=emos, batch_size=bs,
                               progress=ctx.progress)
        sweeps[e] = sw.to_dict() if hasattr(sw, "to_dict") else _jsonable(sw)
    ctx.results["neuron_ablation_topk_vs_randomk"] = sweeps
    heads = [(int(r[0]), int(r[1])) for e in emos for r in abl.top(e, k=2)]
    neurons = [(int(r[0]), int(r[1])) for e in emos for r in nc.top(e, k=2)]
    ctx.results["top_components"] = {"heads": list(dict.fromkeys(heads)),
                                     "neurons": list(dict.fromkeys(neurons))}
    ctx.table("attribution vs exact head ablation (Spearman over heads)",
              ["emotion", "spearman", f"top{min(k_top, abl.mean[0].numel())} overlap"],
              [[e, a["spearman"], next(v for k, v in a.items() if k.startswith("top"))]
               for e, a in agree.items()])
    first = emos[0]
    ctx.figure(f"head importance, exact ablation vs attribution ({first})", "heads.png",
               figures.cosine_heatmap, abl.mean[0].numpy(), vmin=None, vmax=None,
               xlabels=[f"H{h}" for h in range(abl.mean.shape[-1])],
               ylabels=[f"L{layer}" for layer in abl.layers],
               title=f"exact ablation importance ({first})", annotate=False)


_MODEL_DIMS = {"smollm2-135m-instruct": (30, 9), "gemma-3-270m": (18, 4), "tiny-llama": (3, 4),
               "tiny-gemma": (3, 4)}  # (n_layers, n_heads) for dry-run estimates


def _plan_components(cfg):
    c = cfg.get("components", {})
    n_per = c.get("n_prompts_per_emotion")
    n = _n_prompts(cfg, "train") if n_per is None else min(
        _n_prompts(cfg, "train"), int(n_per) * len(cfg["run"]["emotions"]))
    ks = c.get("sweep_ks", [1, 4])
    # neurons 1 + attribution ~2 (forward + backward) + exact head ablation in closed form 1
    # (one forward for every layer and head: components.head_ablation_importance_closed_form)
    return {"forward": n * 4 + n * len(ks) * (1 + c.get("n_random", 1)),
            "what": "neuron contributions; head ablation + attribution; top-k vs random-k"}


# ---------------------------------------------------------------------------- circuits


def _judged(ctx: StageContext, method: str, prompts, emos, make_ctx, *, fluency: bool):
    """Generate on ``prompts`` for every emotion under ``make_ctx(e)``; judge; fluency."""
    from contextlib import nullcontext

    from .evaluate import evaluate_texts
    from .generation import generate

    allp, texts, targets, toks = [], [], [], []
    for e in emos:
        cm = make_ctx(e)
        with cm if cm is not None else nullcontext():
            g = generate(ctx.model, prompts, ctx.gen_config(), progress=False)
        allp += list(prompts)
        texts += g.texts
        toks += g.tokens
        targets += [e] * len(prompts)
    ev = evaluate_texts(method, allp, texts, targets, ctx.judge(),
                        model=ctx.model if fluency else None,
                        generated_tokens=toks if fluency else None)
    d = ev.to_dict()
    d["examples"] = [{k: r[k] for k in ("emotion", "valence", "text", "match")}
                     for r in ev.rows[:: max(1, len(ev.rows) // 8)]]
    return d


def stage_circuits(ctx: StageContext) -> None:
    """Stages 05–07: Δμ, σ, sublayer influence, allocation, circuits; modulation vs controls."""
    from . import circuits as C
    from . import sites as S
    from .activations import collect
    from .prompts import emotion_prompts, neutral_prompts
    from .viz import figures

    model, emos = ctx.model, ctx.emotions
    dirs = ctx.upstream["directions"].artifacts["directions"]
    if dirs.layers != list(range(model.cfg.n_layers)):
        raise PipelineError("circuits need directions at every layer")
    bs = int(ctx.config["generation"].get("batch_size", 16))
    train = ctx.records("train")
    prompts = emotion_prompts(model, train, emos)
    acts = collect(model, prompts, ("mlp_post", "z", "resid_post", "resid_mid"), "last",
                   batch_size=bs, progress=ctx.progress)
    dv = C.difference_vectors_from_acts(acts["mlp_post"], acts["z"], prompts, emos)
    sigma = C.sigma_from_acts(acts["resid_post"], acts["resid_mid"])
    n_infl = ctx.opt("n_influence_scenarios", 2)
    infl = C.sublayer_influence(model, neutral_prompts(model, train[:n_infl]),
                                dirs.vectors["resid_mid"], dirs.vectors["resid_post"], sigma,
                                alphas=tuple(ctx.opt("alphas", C.PAPER_ALPHAS)), emotions=emos,
                                batch_size=bs, progress=ctx.progress)
    comp = ctx.upstream.get("components")
    if comp is not None:
        nscores = comp.artifacts["neurons"].C_mean
        hi = comp.artifacts["heads_attribution"]
        hscores = hi.mean
        score_source = "components stage (C_mean; head attribution, same-layer readout)"
    else:
        W_out = torch_stack([S.W_out(model, L) for L in range(model.cfg.n_layers)])
        W_O = torch_stack([S.W_O(model, L) for L in range(model.cfg.n_layers)])
        labels = [p.emotion for p in prompts]
        nscores, hscores = [], []
        for i, e in enumerate(emos):
            rows = [j for j, lab in enumerate(labels) if lab == e]
            nscores.append(C.neuron_scores_from_acts(acts["mlp_post"][rows], W_out,
                                                     dirs.vectors["resid_post"][i]))
            hscores.append(C.head_scores_from_acts(acts["z"][rows], W_O, dirs.vectors["resid_mid"][i]))
        score_source = "from activations (C_mean; exact resid_mid drop of each head)"
    budget = int(ctx.opt("budget_per_sublayer", 10))
    circuits = {e: C.assemble_circuit(e, infl.influence[i], nscores[i], hscores[i], dv.mlp[i],
                                      dv.z[i], budget_per_sublayer=budget)
                for i, e in enumerate(emos)}
    ctx.artifacts["circuits"] = circuits
    ctx.artifacts["difference_vectors"] = dv
    ctx.results["score_source"] = score_source
    ctx.results["sigma"] = {"mlp": sigma[0], "attn": sigma[1]}
    ctx.results["sublayer_influence_mean_over_alpha"] = {
        e: {"mlp": infl.mean(i)[0], "attn": infl.mean(i)[1]} for i, e in enumerate(emos)}
    ctx.results["circuits"] = C.circuits_summary(circuits)
    # modulation on test (λ chosen on validation when several are given) vs controls
    lambdas = [float(x) for x in ctx.opt("lambdas", [1.0])]
    lam = lambdas[0]
    if len(lambdas) > 1:
        val = neutral_prompts(model, ctx.records("validation"))
        scores = {x: _judged(ctx, f"circuit λ={x}", val, emos,
                             lambda e, x=x: C.modulate(model, circuits[e], x),
                             fluency=False)["accuracy"]["overall"] for x in lambdas}
        lam = max(scores, key=scores.get)
        ctx.results["validation_lambda_accuracy"] = scores
    ctx.results["lambda"] = lam
    test = neutral_prompts(model, ctx.records("test"))
    fl = bool(ctx.opt("fluency", True))
    res = {"circuit_modulation": _judged(ctx, "circuit", test, emos,
                                         lambda e: C.modulate(model, circuits[e], lam), fluency=fl)}
    for r in range(int(ctx.opt("random_controls", 1))):
        rc = {e: C.random_circuit(circuits[e], dv.mlp[i], dv.z[i], seed=r)
              for i, e in enumerate(emos)}
        res[f"random_circuit_seed{r}"] = _judged(ctx, "random circuit", test, emos,
                                                 lambda e, rc=rc: C.modulate(model, rc[e], lam),
                                                 fluency=fl)
    ctx.results["test_accuracy"] = res
    rnd = [v["accuracy"]["overall"] for k, v in res.items() if k.startswith("random")]
    ctx.results["test_accuracy_summary"] = {
        "circuit_modulation": res["circuit_modulation"]["accuracy"]["overall"],
        "random_circuit_control_mean": _mean(rnd)}
    if ctx.opt("faithfulness", False):
        ro_neutral = neutral_prompts(model, ctx.records("test"), assistant_prefix="I feel")
        faith = {}
        for i, e in enumerate(emos):
            inst = [p for p in emotion_prompts(model, ctx.records("test"), emos,
                                               assistant_prefix="I feel") if p.emotion == e]
            faith[e] = C.faithfulness(model, circuits[e], ro_neutral, inst, e,
                                      v_ref=infl.v_ref[i], mlp_delta=dv.mlp[i], z_delta=dv.z[i],
                                      emotions=emos, n_random=int(ctx.opt("random_controls", 1)),
                                      batch_size=bs).to_dict()
        ctx.results["faithfulness"] = faith
    # method comparison (prompting / steering from the upstream stages when present)
    acc = {}
    per = {"circuit": res["circuit_modulation"]["accuracy"]["by_emotion"]}
    pr = ctx.upstream.get("prompting")
    if pr is not None:
        acc["prompting"] = pr.results["prompting_accuracy"]["overall"]
        per["prompting"] = pr.results["prompting_accuracy"]["by_emotion"]
    stp = ctx.upstream.get("steering")
    if stp is not None:
        acc["steering"] = stp.results["test_steering_accuracy"]["overall"]
        acc["no intervention"] = stp.results["test_unsteered_accuracy"]["overall"]
        per["steering"] = stp.results["test_steering_accuracy"]["by_emotion"]
    acc["circuit modulation"] = res["circuit_modulation"]["accuracy"]["overall"]
    ctx.results["method_comparison"] = {**acc, "random circuit (control)": _mean(rnd)}
    rows = [[m, v] for m, v in ctx.results["method_comparison"].items()]
    ctx.table("method comparison on the test set (judge accuracy)", ["method", "accuracy"], rows)
    ctx.table("circuit modulation per emotion", ["method", "overall", *emos, "n"],
              [_acc_rows(k, v["accuracy"], emos) for k, v in res.items()])
    ctx.figure("method comparison with the random-circuit control", "methods.png",
               figures.method_comparison, {k: v for k, v in acc.items() if v is not None},
               controls={"random circuit": _mean(rnd) or 0.0}, per_emotion=per)
    ctx.figure("sublayer influence I(L, p) (mean over α)", "influence.png",
               figures.sublayer_influence,
               {e: {"mlp": infl.mean(i)[0], "attn": infl.mean(i)[1]} for i, e in enumerate(emos)})
    ctx.figure("circuit graph", "circuit_graph.png", figures.circuit_graph,
               {e: {"heads": sorted(c.head_set()), "neurons": sorted(c.neuron_set())}
                for e, c in circuits.items()}, model.cfg.n_layers, n_heads=model.cfg.n_heads)
    c0 = circuits[emos[0]]
    h = [(L, ids[0]) for L, ids in enumerate(c0.heads) if ids]
    n = [(L, ids[0]) for L, ids in enumerate(c0.neurons) if ids]
    ctx.results["top_components"] = {"heads": h[::-1][:4], "neurons": n[::-1][:4]}


def torch_stack(ts):
    import torch

    return torch.stack([t.detach().float().cpu() for t in ts])


def _plan_circuits(cfg):
    c = cfg.get("circuits", {})
    n_gen = _n_prompts(cfg, "test") * (1 + int(c.get("random_controls", 1)))
    lam = c.get("lambdas", [1.0])
    if len(lam) > 1:
        n_gen += _n_prompts(cfg, "validation") * len(lam)
    n_infl = 3 * int(c.get("n_influence_scenarios", 2))
    n_layers = _MODEL_DIMS.get(str(cfg["run"]["model"]), (28, 24))[0]
    # influence: one last-token rerun per (prompt, emotion, α, sublayer) ≈ 1/10 of a forward
    infl = n_infl * len(cfg["run"]["emotions"]) * len(c.get("alphas", [0.1, 0.3, 0.5, 0.7])) \
        * 2 * n_layers // 10
    return {"forward": _n_prompts(cfg, "train") + infl + n_gen, "generate": n_gen,
            "what": "Δμ, σ, influence, allocation; modulation vs random circuits"}


# ---------------------------------------------------------------------------- probes


def stage_probes(ctx: StageContext) -> None:
    """Layer-wise probes on labeled utterances, the zero-shot baseline, persistence."""
    from . import probes as PR
    from .data import load_utterances
    from .prompts import encode
    from .viz import figures

    model = ctx.model
    classes = list(ctx.opt("classes", [*ctx.emotions, "neutral"]))
    utt = [u for u in load_utterances() if u.label in classes]
    n_max = ctx.opt("max_utterances")
    if n_max is not None and len(utt) > n_max:  # keep the class balance: every k-th row
        step = len(utt) / n_max
        utt = [utt[int(i * step)] for i in range(n_max)]
    wrapped = [PR.wrap_utterance(model, u.text) for u in utt]
    ids = [encode(model, w[0]) for w in wrapped]
    layers = [PR.EMBED_LAYER, *range(model.cfg.n_layers)]
    h = PR.hidden_at(model, ids, [[w[1]] for w in wrapped], layers,
                     batch_size=int(ctx.config["generation"].get("batch_size", 16)),
                     progress=ctx.progress)[:, :, 0]
    sweep = PR.probe_layers(h, [u.label for u in utt], [u.group for u in utt],
                            cv=int(ctx.opt("cv", 5)), layers=layers, n_layers=model.cfg.n_layers,
                            split=[u.split for u in utt], has_keyword=[u.has_keyword for u in utt],
                            classes=classes, progress=ctx.progress)
    ctx.results["probe_sweep"] = sweep.to_dict()
    test = [u for u in utt if u.split == "test"][: int(ctx.opt("zero_shot_n", 40))]
    zs = None
    if test:
        zs = PR.zero_shot(model, [u.text for u in test], classes, [u.label for u in test],
                          progress=ctx.progress)
        ctx.results["zero_shot_baseline"] = zs.to_dict()
    peak = sweep.peak_layer
    probe = PR.fit_probe(h[:, layers.index(peak)], [u.label for u in utt], layer=peak,
                         classes=classes)
    n_open = int(ctx.opt("persistence_n", 12))
    if n_open > 0 and peak != PR.EMBED_LAYER:
        op = [u for u in utt if u.split == "test"][:n_open] or utt[:n_open]
        pers = PR.persistence(model, [u.text for u in op], [u.label for u in op],
                              int(ctx.opt("persistence_tokens", 16)), layer=peak, probe=probe,
                              groups=[u.group for u in op], classes=classes,
                              cv=min(3, len({u.group for u in op})) if len({u.group for u in op}) > 1
                              else 2, progress=ctx.progress)
        ctx.results["persistence"] = pers.to_dict()
    base = {}
    if zs is not None:
        base = {"zero-shot (free reply)": zs.accuracy, "zero-shot (constrained)": zs.constrained_accuracy}
    ctx.figure("probe accuracy per layer (−1 = embedding)", "probes.png", figures.probe_accuracy,
               {"probe (group CV)": sweep.accuracy_mean,
                **({"probe (fixed test split)": sweep.test_accuracy}
                   if sweep.test_accuracy is not None else {})},
               layers=sweep.layers, chance=sweep.chance_uniform, baselines=base)
    ctx.table("probe summary", ["peak layer", "peak accuracy", "chance", "zero-shot",
                                "zero-shot constrained"],
              [[peak, float(sweep.accuracy_mean.max()), sweep.chance_uniform,
                zs.accuracy if zs else None, zs.constrained_accuracy if zs else None]])


def _plan_probes(cfg):
    p = cfg.get("probes", {})
    n = p.get("max_utterances") or 490
    return {"forward": n + int(p.get("persistence_n", 12)), "generate":
            int(p.get("zero_shot_n", 40)) + int(p.get("persistence_n", 12)),
            "what": "probes per layer; zero-shot; persistence"}


# ---------------------------------------------------------------------------- control


def stage_control(ctx: StageContext) -> None:
    """Valence–arousal directions and controllability (r, MAE); the vocabulary-bias baseline."""
    from . import control as CT
    from .prompts import neutral_prompts
    from .steering import paper_layers

    model, emos = ctx.model, ctx.emotions
    dirs = ctx.upstream["directions"].artifacts["directions"]
    va = CT.va_directions("lstsq", directions=dirs.vectors["resid_post"], emotions=emos,
                          layers=dirs.layers)
    recs = ctx.records("test")[: int(ctx.opt("n_scenarios", 2))]
    prompts = neutral_prompts(model, recs)
    ro = neutral_prompts(model, recs, assistant_prefix="I feel")
    levels = [float(x) for x in ctx.opt("levels", [-1.0, 0.0, 1.0])]
    res = CT.controllability(model, prompts, va, CT.default_grid(levels),
                             float(ctx.opt("strength", 8.0)), paper_layers(model),
                             readout_prompts=ro, config=ctx.gen_config(), progress=ctx.progress)
    ctx.results["valence_arousal_controllability"] = res.to_dict()
    txt = res.scores("text")
    rows = [[f"text judge · {ax}", s.pearson_r, s.mae, s.spearman] for ax, s in txt.items()]
    if res.readout_va is not None:
        rows += [[f"readout · {ax}", s.pearson_r, s.mae, s.spearman]
                 for ax, s in res.scores("readout").items()]
    ctx.table("valence–arousal controllability (target vs measured)",
              ["measure · axis", "Pearson r", "MAE", "Spearman"], rows)
    # vocabulary bias baseline: + strength on each target emotion's word logits
    test = neutral_prompts(model, ctx.records("test"))
    strength = float(ctx.opt("vocabulary_strength", 4.0))
    allp = [p for _ in emos for p in test]
    targets = [e for e in emos for _ in test]
    from .evaluate import evaluate_texts
    from .generation import generate

    proc = CT.VocabularyBias.for_prompts(model, allp, targets, strength, emotions=emos)
    g = generate(model, allp, ctx.gen_config(), progress=False, logits_processors=[proc])
    ev = evaluate_texts("vocabulary bias", allp, g.texts, targets, ctx.judge())
    rate = CT.emotion_word_rate(g.texts, targets)
    ctx.results["vocabulary_bias"] = {"strength": strength, "accuracy": ev.accuracy.to_dict(),
                                      "mean_target_word_rate": _mean(rate),
                                      "examples": [r["text"] for r in ev.rows[:: max(1, len(ev.rows) // 6)]]}
    ctx.table("vocabulary-bias baseline (judge accuracy)", ["method", "overall", *emos, "n"],
              [_acc_rows(f"vocabulary bias +{strength}", ev.accuracy, emos)])
    from .viz import figures

    ctx.figure("valence–arousal: target vs measured (text judge)", "va.png", figures.sweep_curves,
               levels, {f"valence (arousal={a:+.0f})": [float(res.text_va.mean(1)[k, 0])
                                                       for k, tg in enumerate(res.targets)
                                                       if tg[1] == a] for a in levels},
               xlabel="target valence", title="measured valence vs target")


def _plan_control(cfg):
    c = cfg.get("control", {})
    n = 3 * int(c.get("n_scenarios", 2))
    g = len(c.get("levels", [-1, 0, 1])) ** 2 * n
    v = _n_prompts(cfg, "test")
    return {"generate": g + v, "forward": g + n * len(c.get("levels", [-1, 0, 1])) ** 2,
            "what": "VA grid controllability; vocabulary-bias baseline"}


def _more_stages() -> list[Stage]:
    return [
        Stage("components", stage_components, "Local components (stage 04)",
              requires=("directions",), modules=("emocircuits.components",), plan=_plan_components),
        Stage("circuits", stage_circuits, "Circuits and modulation (stages 05–07)",
              requires=("directions",), optional=("components", "prompting", "steering"),
              modules=("emocircuits.circuits",), plan=_plan_circuits),
        Stage("probes", stage_probes, "Probes, zero-shot baseline, persistence",
              modules=("emocircuits.probes",), plan=_plan_probes),
        Stage("control", stage_control, "Valence–arousal control and vocabulary bias",
              requires=("directions",), modules=("emocircuits.control",), plan=_plan_control),
    ]
