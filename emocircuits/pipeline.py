"""Deprecated: the run engine moved to :mod:`emocircuits.run` and the stage protocols to
:mod:`emocircuits.studies`. These names stay one release as aliases."""

from __future__ import annotations

import warnings

from .run import ConfigError as PipelineConfigError
from .run import RunError as PipelineError
from .run.config import apply_overrides as _apply
from .studies import STUDIES, dry_run, load_config, load_preset, parse_config, run_pipeline
from .studies.common import load_run_model, subset_records
from .studies.config import TINY_MODELS

warnings.warn("emocircuits.pipeline is deprecated: use emocircuits.studies (run_pipeline, "
              "load_config) and emocircuits.run", DeprecationWarning, stacklevel=2)


def default_stages():
    """The registered studies, in run order."""
    return list(STUDIES)


def apply_overrides(cfg, overrides=(), *, model=None):
    out = _apply(cfg, overrides)
    if model is not None:
        out.setdefault("run", {})["model"] = model
    return out


def validate_config(config):
    """A checked :class:`~emocircuits.studies.config.RunConfig` (was: a dict with defaults)."""
    return parse_config(config)


def stage_hashes(stages, cfg):
    from .run.engine import stage_hashes as _h

    return _h(list(stages), parse_config(cfg, list(stages)))


__all__ = ["PipelineConfigError", "PipelineError", "TINY_MODELS", "apply_overrides", "default_stages",
           "dry_run", "load_config", "load_preset", "load_run_model", "run_pipeline", "stage_hashes",
           "subset_records", "validate_config"]
