"""The studies: one module per stage, each a typed ``Config``, ``plan(cfg)`` and
``run(ctx) -> <Stage>Result``; :data:`STUDIES` is the registry, in run order.

``emocircuits <stage>``, ``emocircuits run``, :func:`run_pipeline` and the experiment presets
(``experiments/*.toml``) all run these same studies through :mod:`emocircuits.run`.

    cfg = load_config("quick", ["steering.strengths=[1.0, 2.0]"], model="smollm2-135m-instruct")
    res = run_pipeline(cfg, "runs/quick")
    res.result("circuits").evaluations["circuit"].accuracy.overall
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

from ..run.engine import Plan, RunResult, StageRecord, Study, run_studies, stage_hashes
from . import (
    circuits,
    components,
    control,
    directions,
    judge,
    probes,
    prompting,
    steering,
    stories,
    views,
)
from .config import (
    RunConfig,
    find_preset,
    load_config,
    load_preset,
    parse_config,
)

STUDIES: tuple[Study, ...] = (judge.STUDY, prompting.STUDY, directions.STUDY, steering.STUDY,
                              components.STUDY, circuits.STUDY, probes.STUDY, control.STUDY,
                              stories.STUDY, views.STUDY)


def get_study(name: str) -> Study:
    for s in STUDIES:
        if s.name == name:
            return s
    raise KeyError(f"no study {name!r}; studies: {[s.name for s in STUDIES]}")


def describe(cfg: RunConfig):
    """The results.json ``meta`` and ``summary`` (headline numbers read from the typed results)."""
    def doc(records: Mapping[str, StageRecord]) -> dict:
        from .. import __version__

        summary: dict[str, Any] = {}
        for rec in records.values():
            summary.update({k: v for k, v in (rec.output.get("headline") or {}).items() if v is not None})
        return {"meta": {"model": cfg.model, "preset": cfg.run.preset, "emotions": cfg.emotions,
                         "data_sizes": {k: getattr(cfg.data, k) for k in ("n_train", "n_validation", "n_test")},
                         "emocircuits_version": __version__, "python": platform.python_version(),
                         "config": cfg.to_dict()},
                "summary": summary}
    return doc


def _only(cfg: RunConfig, only: Sequence[str] | None) -> Sequence[str] | None:
    return only if only is not None else (list(cfg.run.stages) if cfg.run.stages is not None else None)


def check_before_work(cfg: RunConfig, run_dir: str | os.PathLike) -> None:
    """What can be checked before a model is loaded, beyond the config's own checks: the run
    folder is not a file, and layer settings fit the model's depth when it is known without
    loading (builtin aliases, tiny models, local HF folders). Raises ``ConfigError``."""
    from pathlib import Path

    from ..models import known_n_layers
    from ..run.config import ConfigError
    from .common import check_layers
    from .config import TINY_MODELS

    name = str(cfg.model)
    path = Path(name).expanduser()
    hub_form = name.count("/") == 1 and not name.startswith((".", "/", "~")) and not path.exists()
    from ..models import ALIASES

    if not (name.lower() in ALIASES or name in TINY_MODELS or path.exists() or hub_form):
        raise ConfigError(f"run.model {name!r}: not a builtin model ({', '.join([*ALIASES, *TINY_MODELS])}), "
                          "an existing HF folder or .gguf file, or a hub name 'org/model'")
    if path.exists() and not (path.suffix == ".gguf" or (path / "config.json").is_file()):
        raise ConfigError(f"run.model {name!r}: neither a .gguf file nor a folder with config.json")
    from ..data import load_sev

    for split in ("train", "validation", "test"):
        src = cfg.data.source(split)
        if str(src).startswith("builtin:"):
            continue
        try:
            load_sev(src)  # validates every line (cheap next to any model work)
        except FileNotFoundError:
            raise ConfigError(f"data.{split} = {src!r}: no such file") from None
        except ValueError as e:  # SEVValidationError names file:line: field
            raise ConfigError(f"data.{split} = {src!r}: {e}") from None
    p = Path(run_dir)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"the run folder {p} is a file: --out must name a folder (new or a run folder)")
    n = 3 if cfg.model in TINY_MODELS else known_n_layers(cfg.model)
    if n is None:
        return
    bands = cfg.section("steering").layer_bands
    fields = [("directions.pca_layers", cfg.section("directions").pca_layers),
              ("components.ablation_layers", cfg.section("components").ablation_layers),
              ("components.neuron_rank_layers", cfg.section("components").neuron_rank_layers),
              *([] if isinstance(bands, str) else [("steering.layer_bands", b) for b in bands])]
    for where, layers in fields:
        if layers is None or isinstance(layers, str):
            continue
        try:
            check_layers(layers, n, where)
        except ValueError as e:
            raise ConfigError(f"{e} ({cfg.model} has {n} layers)") from None


def run_pipeline(config: RunConfig | Mapping[str, Any], run_dir: str | os.PathLike, *,
                 studies: Sequence[Study] | None = None, only: Sequence[str] | None = None,
                 keep_going: bool | None = None, report: bool = True, progress: bool = True,
                 model=None) -> RunResult:
    """Run (or resume) the studies of ``config`` into ``run_dir``; results.json and report.html.

    ``config``: a :class:`RunConfig` or a preset dict (checked first). ``only``: these stages
    and what they require (default: ``run.stages`` of the config, else all). ``model``: an
    already-loaded model instead of loading ``run.model``.
    """
    from .common import load_run_model

    studies = list(studies) if studies is not None else list(STUDIES)
    cfg = parse_config(config, studies)
    check_before_work(cfg, run_dir)
    from ..viz.report import build_report

    return run_studies(
        cfg, run_dir, studies, only=_only(cfg, only),
        model_loader=lambda: load_run_model(cfg.model, dtype=cfg.run.dtype, device=cfg.run.device),
        keep_going=cfg.run.keep_going if keep_going is None else keep_going, progress=progress,
        model=model, describe=describe(cfg), report=build_report if report else None)


def dry_run(config: RunConfig | Mapping[str, Any], run_dir: str | os.PathLike, *,
            studies: Sequence[Study] | None = None, only: Sequence[str] | None = None,
            timing: bool = False) -> str:
    """The plan as text (nothing is loaded or run); ``timing``: with the finished stages' measured
    seconds beside their estimates."""
    from ..run.plan import MODEL_COST, estimate_seconds
    from ..run.plan import dry_run as _dry

    studies = list(studies) if studies is not None else list(STUDIES)
    cfg = parse_config(config, studies)
    check_before_work(cfg, run_dir)
    d = cfg.data
    header = [f"emocircuits plan: model={cfg.model} preset={cfg.run.preset} out={run_dir}",
              f"emotions={len(cfg.emotions)} ({', '.join(cfg.emotions)}); data: "
              f"train={d.n_train}, validation={d.n_validation}, test={d.n_test}; "
              f"max_new_tokens={cfg.generation.max_new_tokens}"]
    return _dry(cfg, run_dir, studies, header=header, only=_only(cfg, only),
                estimate=lambda p: estimate_seconds(p, cfg.model, cfg.generation),
                load_seconds=10 * MODEL_COST.get(cfg.model, 1.0), timing=timing)


__all__ = ["STUDIES", "Plan", "RunConfig", "Study", "check_before_work", "describe", "dry_run", "find_preset", "get_study",
           "load_config", "load_preset", "parse_config", "run_pipeline", "stage_hashes"]
