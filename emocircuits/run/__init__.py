"""The run engine (cache, resume, lock, results.json), typed config parsing and dry-run plans.

Nothing here knows about emotions: the stages are :class:`Study` entries registered in
:mod:`emocircuits.studies`.
"""

from .config import (
    ConfigError,
    apply_overrides,
    check_value,
    load_toml,
    parse_section,
    section_dict,
)
from .engine import (
    ModelHandle,
    Plan,
    RunError,
    RunLockedError,
    RunResult,
    StageContext,
    StageRecord,
    Study,
    open_run,
    run_studies,
    stage_hashes,
)
from .plan import dry_run, estimate_seconds

__all__ = [
    "ConfigError", "ModelHandle", "Plan", "RunError", "RunLockedError", "RunResult", "StageContext",
    "StageRecord", "Study", "apply_overrides", "check_value", "dry_run", "estimate_seconds",
    "load_toml", "open_run", "parse_section", "run_studies", "section_dict", "stage_hashes",
]
