"""The run configuration: the common sections every stage depends on, plus one section per study.

A preset is a TOML file with ``[run]``, ``[data]``, ``[generation]``, ``[judge]`` and one
table per study (``[steering]``, ``[circuits]``, ...). :func:`load_config` reads a preset,
applies ``--set section.key=value`` overrides and parses everything into typed sections
before any model is loaded; every default lives in the section dataclasses below and in each
study's ``Config``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ..emotions import EKMAN6, EMOTION_WORDS, NEUTRAL
from ..run.config import ConfigError, apply_overrides, load_toml, parse_section, section_dict

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"
TINY_MODELS = {"tiny-llama": "llama", "tiny-gemma": "gemma"}
DTYPES = ("float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16")
# keys of [run] that do not change any number (left out of the stage keys)
UNHASHED_RUN_KEYS = ("preset", "stages", "keep_going", "share_activations")


@dataclass(frozen=True)
class RunSection:
    """``[run]``: the model, its dtype/device, the emotions; which stages this preset runs."""

    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    device: str | None = None
    emotions: tuple[str, ...] = EKMAN6
    preset: str | None = None
    stages: tuple[str, ...] | None = None  # None: every stage
    keep_going: bool = True
    # one last-token collection of the train prompts shared by directions, components and
    # circuits (kept in <run>/shared/); same numbers up to float rounding, fewer forwards
    share_activations: bool = True

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ValueError("run.model is empty")
        if self.dtype.lower().removeprefix("torch.") not in DTYPES:
            raise ValueError(f"run.dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.device is not None:
            base = self.device.split(":")[0]
            if base not in ("cpu", "cuda", "mps") or (":" in self.device
                                                       and not self.device.split(":", 1)[1].isdigit()):
                raise ValueError(f"run.device {self.device!r}: use cpu, cuda, cuda:N or mps")
        emos = list(self.emotions)
        if len(emos) < 2 or len(set(emos)) != len(emos):
            raise ValueError(f"run.emotions must list >= 2 distinct emotions, got {emos!r}")
        known = [e for e in EMOTION_WORDS if e != NEUTRAL]
        bad = [e for e in emos if e not in known]
        if bad:
            raise ValueError(f"run.emotions: unknown emotion(s) {bad}; known: {', '.join(known)}")


@dataclass(frozen=True)
class DataSection:
    """``[data]``: SEV sources (``builtin:<split>`` or a .jsonl path) and scenario counts."""

    train: str = "builtin:train"
    validation: str = "builtin:validation"
    test: str = "builtin:test"
    n_train: int | None = None  # None: every scenario
    n_validation: int | None = None
    n_test: int | None = None

    def __post_init__(self) -> None:
        for k in ("n_train", "n_validation", "n_test"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ValueError(f"data.{k} must be a positive integer, got {v!r}")

    def source(self, split: str) -> str:
        if split not in ("train", "validation", "test"):
            raise KeyError(f"no data split {split!r}; use train, validation or test")
        return getattr(self, split)


@dataclass(frozen=True)
class GenerationSection:
    """``[generation]``: greedy decoding settings shared by every generating stage."""

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    batch_size: int = 16
    dtype: str | None = None  # e.g. "bfloat16": generation, readout and fluency in it (absent: the model's)

    def __post_init__(self) -> None:  # the checks live once, in GenerationConfig
        try:
            self.gen_config()
        except ValueError as e:
            raise ValueError(f"generation.{e}") from None

    def gen_config(self, **over: Any):
        from ..generation import GenerationConfig

        return GenerationConfig(**{**section_dict(self), **over})


@dataclass(frozen=True)
class JudgeSection:
    """``[judge]``: which offline judge reads the generated texts."""

    prefer: Literal["auto", "hybrid", "embedding", "lexicon"] = "auto"


COMMON: dict[str, type] = {"run": RunSection, "data": DataSection,
                           "generation": GenerationSection, "judge": JudgeSection}


@dataclass(frozen=True)
class RunConfig:
    """A whole run's settings, typed: the common sections and each study's section."""

    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    judge: JudgeSection = field(default_factory=JudgeSection)
    stages: Mapping[str, Any] = field(default_factory=dict)

    # -- what the engine needs
    def common(self) -> dict[str, Any]:
        run = {k: v for k, v in section_dict(self.run).items() if k not in UNHASHED_RUN_KEYS}
        from ..judges.offline import JUDGE_VERSION

        return {"run": run, "data": section_dict(self.data),
                "generation": section_dict(self.generation),
                "judge": {**section_dict(self.judge), "judge_version": JUDGE_VERSION}}

    def section(self, name: str) -> Any:
        if name not in self.stages:
            raise KeyError(f"no config section [{name}]; sections: {list(self.stages)}")
        return self.stages[name]

    def to_dict(self) -> dict[str, Any]:
        out = {k: section_dict(getattr(self, k)) for k in COMMON}
        out.update({k: section_dict(v) for k, v in self.stages.items()})
        return out

    # -- conveniences
    @property
    def emotions(self) -> list[str]:
        return list(self.run.emotions)

    @property
    def model(self) -> str:
        return self.run.model

    def replace_section(self, name: str, **changes: Any) -> RunConfig:
        """A copy with some settings of one section changed (checked like the TOML)."""
        if name in COMMON:
            cur = section_dict(getattr(self, name))
            return replace(self, **{name: parse_section(COMMON[name], {**cur, **changes}, name)})
        cur = section_dict(self.section(name))
        new = parse_section(type(self.section(name)), {**cur, **changes}, name)
        return replace(self, stages={**self.stages, name: new})


def parse_config(data: Mapping[str, Any], studies: Sequence[Any] | None = None) -> RunConfig:
    """A :class:`RunConfig` from a plain dict (a parsed preset): every key and type checked."""
    if studies is None:
        from . import STUDIES

        studies = STUDIES
    if isinstance(data, RunConfig):  # add the default section of any study it lacks
        missing = {s.name: parse_section(s.config, None, s.name) for s in studies
                   if s.name not in data.stages}
        return replace(data, stages={**data.stages, **missing}) if missing else data
    by = {s.name: s for s in studies}
    accepted = [*COMMON, *by]
    for k in data:
        if k not in accepted:
            import difflib

            near = difflib.get_close_matches(k, accepted, n=1)
            hint = f" (did you mean [{near[0]}]?)" if near else ""
            raise ConfigError(f"config: unknown section [{k}]{hint}; sections: {', '.join(accepted)}")
    common = {k: parse_section(cls, data.get(k), k) for k, cls in COMMON.items()}
    stages = {name: parse_section(s.config, data.get(name), name) for name, s in by.items()}
    run = common["run"]
    if run.stages is not None:
        bad = [s for s in run.stages if s not in by]
        if bad:
            raise ConfigError(f"config run.stages: unknown stage(s) {bad}; stages: {', '.join(by)}")
    cfg = RunConfig(common["run"], common["data"], common["generation"], common["judge"], stages)
    for s in studies:  # cross-section checks a study wants (e.g. layers in range are checked at run)
        check = getattr(s.config, "check", None)
        if callable(check):
            check(cfg.section(s.name), cfg)
    return cfg


def find_preset(name_or_path: str | os.PathLike) -> Path:
    """A shipped preset name (``quick``, ``full``) or a path to a TOML file."""
    p = Path(name_or_path)
    if p.suffix or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"preset file {p} not found")
        return p
    q = PRESET_DIR / f"{name_or_path}.toml"
    if not q.is_file():
        known = sorted(x.stem for x in PRESET_DIR.glob("*.toml"))
        raise FileNotFoundError(f"preset {str(name_or_path)!r} not found (shipped presets: {known})")
    return q


def load_preset(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """A preset as a plain dict (``run.preset`` set to its name)."""
    p = find_preset(name_or_path)
    cfg = load_toml(p)
    run = cfg.setdefault("run", {})
    if isinstance(run, dict):
        run.setdefault("preset", p.stem)
    return cfg


def load_config(preset: str | os.PathLike | Mapping[str, Any] = "quick",
                overrides: Sequence[str] = (), *, model: str | None = None,
                studies: Sequence[Any] | None = None) -> RunConfig:
    """Preset + ``section.key=value`` overrides + ``--model`` -> a checked :class:`RunConfig`."""
    raw = dict(preset) if isinstance(preset, Mapping) else load_preset(preset)
    raw = apply_overrides(raw, overrides)
    if model is not None:
        raw.setdefault("run", {})["model"] = model
    return parse_config(raw, studies)
