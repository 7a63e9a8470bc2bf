"""The run engine: stage order, a content-addressed cache, resume, one run per folder, results.json.

The engine knows nothing about emotions: it runs :class:`Study` entries (a name, a typed
config section, ``run(ctx) -> Result``, ``plan(config) -> Plan``) over a run configuration
that can hash its common part and hand out each study's section. A run folder holds::

    run_dir/
      config.json                 the resolved configuration (every default filled in)
      results.json                every stage's numbers (rewritten atomically after each stage)
      report.html                 one offline page
      stages/<stage>-<hash>/      one finished stage: output.json, result.{json,safetensors},
                                  figures/, views/, and whatever the study wrote there

A stage's ``hash`` = sha256 of (stage name, study version, its section after defaults, the
common configuration, the content hashes of the data files it reads, the hashes of its
upstream stages). A stage folder is only created by the atomic rename of a completed temporary
folder, so a rerun skips finished stages, a killed run resumes at the first unfinished stage,
and a changed setting, study version or data file reruns exactly the stages downstream of it.
A stage folder whose ``output.json`` or result file is broken is named in a warning and rerun.
Nothing in a run folder is unpickled: results load through :mod:`emocircuits.results`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..progress import tqdm
from ..results import (
    Result,
    ResultFileError,
    atomic_write_json,
    atomic_write_text,
    compact_json,
    jsonable,
    load_result,
    with_suffix,
)
from .config import file_sha, section_dict, sha

R = TypeVar("R", bound=Result)


class RunError(RuntimeError):
    """A stage failed (the message names it), or the run folder cannot be used."""


class RunLockedError(RunError):
    """Another run is using this run folder."""


# ============================================================================ studies


@dataclass(frozen=True)
class Plan:
    """What a stage will do, for dry runs.

    ``forward``: analysis prompt forwards (the model's dtype); ``generate``: texts generated with
    the run's ``[generation]`` settings (its batch size, dtype and max_new_tokens);
    ``eval_forward``: prompt forwards that score those texts (fluency, logit readout; in the
    generation dtype); ``decode_tokens``: row-tokens generated with other settings (float32,
    their own short lengths, e.g. zero-shot labels), each with one prompt forward counted in
    ``forward``; ``work_seconds``: work costed directly in SmolLM2 seconds (the sublayer
    influence); ``extra_seconds``: fixed seconds (not scaled by the model)."""

    forward: float = 0
    generate: float = 0
    what: str = ""
    extra_seconds: float = 0.0
    eval_forward: float = 0
    decode_tokens: float = 0
    work_seconds: float = 0.0  # measured directly on SmolLM2 (scaled by the model's factor)


@dataclass(frozen=True)
class Study:
    """One stage's protocol, registered once.

    ``config``: its section dataclass (defaults written there); ``run(ctx)`` computes and
    returns the stage's typed :class:`~emocircuits.results.Result`; ``plan(run_config)`` the
    dry-run estimate; ``inputs(run_config)`` the data files it reads (content-hashed into the
    key); ``version`` is part of the key (bump it when the study's output changes);
    ``requires``/``optional``: upstream studies it reads (optional ones when present);
    ``modules``: library modules that must import, else the stage is ``unavailable``.
    """

    name: str
    title: str
    config: type
    run: Callable[[StageContext], Result]
    plan: Callable[[Any], Plan] = lambda cfg: Plan()
    version: int = 1
    requires: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    inputs: Callable[[Any], Sequence[Path]] = lambda cfg: ()

    def missing_modules(self) -> list[str]:
        miss = []
        for m in self.modules:
            try:
                importlib.import_module(m)
            except ImportError:
                miss.append(m)
        return miss


class RunConfigLike(Protocol):
    """What the engine needs of a run configuration."""

    def common(self) -> dict[str, Any]: ...  # hashed into every stage

    def section(self, name: str) -> Any: ...  # a study's config section (a dataclass)

    def to_dict(self) -> dict[str, Any]: ...


# ============================================================================ records, context


@dataclass
class StageRecord:
    """A finished stage: its folder, its output.json, its typed result (loaded on first use)."""

    name: str
    hash: str
    dir: Path
    output: dict
    cached: bool = False
    _result: Result | None = None

    @property
    def result(self) -> Result:
        if self._result is None:
            self._result = load_result(self.dir / "result")
        return self._result


class ModelHandle:
    """Loads the run's model on first use (cached runs and dry runs never load it)."""

    def __init__(self, loader: Callable[[], Any], model: Any = None) -> None:
        self._loader, self._model = loader, model
        self.load_seconds = 0.0

    def get(self):
        if self._model is None:
            t = time.perf_counter()
            self._model = self._loader()
            self.load_seconds = time.perf_counter() - t
        return self._model

    @property
    def loaded(self) -> bool:
        return self._model is not None


@dataclass
class StageContext:
    """What a study's ``run`` sees: the run config, its own section, its folder, upstream results."""

    study: Study
    config: Any
    settings: Any
    run_dir: Path
    dir: Path
    records: dict[str, StageRecord]
    model_handle: ModelHandle
    progress: bool = True
    figures: list[dict] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)
    views: list[dict] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    hash: str = ""  # the stage's key: checkpoints of an interrupted run are kept under it
    resumed: list[str] = field(default_factory=list)  # checkpoint keys loaded instead of computed
    resumed_seconds: float = 0.0  # what the loaded checkpoints took to compute, in earlier runs

    @property
    def model(self):
        return self.model_handle.get()

    @property
    def partial_dir(self) -> Path:
        """Where this stage's checkpoints live until it finishes: ``stages/.partial-<name>-<hash>``."""
        return self.run_dir / "stages" / f".partial-{self.study.name}-{self.hash}"

    def checkpoint(self, key: str, compute: Callable[[], R]) -> R:
        """``compute()``'s :class:`Result`, kept across an interrupted run: saved (safetensors +
        JSON, atomically) as soon as it returns; the same stage with the same key hash, run
        again after a crash or a stopped session, loads it instead of computing it again. The
        checkpoints are removed when the stage finishes. ``key`` names one unit of work
        uniquely within the stage (e.g. ``"test/circuit"``)."""
        safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", key).strip("_")[:80]
        stem = self.partial_dir / f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
        if with_suffix(stem, ".json").is_file():
            try:
                out = load_result(stem)
            except Exception as e:  # a damaged checkpoint is recomputed, and said so
                self.notes[f"checkpoint {key}"] = f"recomputed (could not load: {type(e).__name__}: {e})"
            else:
                self.resumed.append(key)
                self.resumed_seconds += float(self._checkpoint_seconds().get(stem.name, 0.0))
                return out  # type: ignore[return-value]
        t = time.perf_counter()
        out = compute()
        seconds = time.perf_counter() - t
        if not isinstance(out, Result):
            raise RunError(f"stage {self.study.name!r}: checkpoint {key!r} computed "
                           f"{type(out).__name__}, not a Result")
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        out.save(stem)
        atomic_write_json(self.partial_dir / "seconds.json",
                          {**self._checkpoint_seconds(), stem.name: round(seconds, 3)})
        return out

    def _checkpoint_seconds(self) -> dict[str, float]:
        """``partial_dir/seconds.json``: each saved checkpoint's compute time (so that a resumed
        stage can report the compute of every run that worked on it)."""
        try:
            d = json.loads((self.partial_dir / "seconds.json").read_text())
        except (OSError, ValueError):
            return {}
        return d if isinstance(d, dict) else {}

    def upstream(self, name: str) -> Any:
        """The typed result of upstream stage ``name`` (None when an optional one is absent)."""
        rec = self.records.get(name)
        if rec is None:
            if name in self.study.requires:
                raise RunError(f"stage {self.study.name!r}: required upstream {name!r} missing")
            return None
        return rec.result

    def path(self, *parts: str) -> Path:
        p = self.dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def figure(self, caption: str, filename: str, fn: Callable[..., Any], /, *args: Any, **kw: Any) -> None:
        """Draw ``fn(*args, out=..., **kw)`` into ``figures/filename`` and record it.

        A figure that fails to draw is noted (the numbers stay valid)."""
        out = self.path("figures", filename)
        try:
            fn(*args, out=out, **kw)
        except Exception as e:  # a bad picture must not lose a finished computation
            self.notes[f"figure {filename}"] = f"{type(e).__name__}: {e}"
            return
        self.figures.append({"title": caption, "path": f"figures/{filename}"})

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.tables.append({"title": title, "columns": list(columns), "rows": [list(r) for r in rows]})

    def view(self, view: Any, filename: str) -> None:
        """Record a circuitsvis view (``.title``, ``.html``, ``.needs_bundle``) under ``views/``."""
        p = self.path("views", filename)
        atomic_write_text(p, view.html)
        self.views.append({"title": view.title, "path": f"views/{filename}",
                           "needs_bundle": bool(view.needs_bundle)})


# ============================================================================ keys


def stage_hashes(studies: Sequence[Study], cfg: RunConfigLike) -> dict[str, str]:
    """The cache key of every stage (upstream hashes and input-file contents chained in)."""
    common = cfg.common()
    out: dict[str, str] = {}
    for st in studies:
        ups = {}
        for r in st.requires:
            if r not in out:
                raise RunError(f"stage {st.name!r} requires {r!r}, which is not before it")
            ups[r] = out[r]
        files = {}
        for p in st.inputs(cfg):
            p = Path(p)
            files[p.name] = file_sha(p) if p.is_file() else None
        out[st.name] = sha({"stage": st.name, "version": st.version,
                            "section": section_dict(cfg.section(st.name)),
                            "common": common, "inputs": files, "upstream": ups})[:16]
    return out


def effective_hash(st: Study, hashes: Mapping[str, str], done: Mapping[str, Any]) -> str:
    """The stage's hash, with the hashes of the optional upstream stages that are done."""
    opt = {r: hashes[r] for r in st.optional if r in done}
    return hashes[st.name] if not opt else sha([hashes[st.name], opt])[:16]


def stage_dir(run_dir: Path, name: str, h: str) -> Path:
    return run_dir / "stages" / f"{name}-{h}"


def load_record(run_dir: Path, name: str, h: str) -> StageRecord | None:
    """The finished stage folder of (name, hash), or None; a broken one is named and ignored."""
    d = stage_dir(run_dir, name, h)
    p = d / "output.json"
    if not d.is_dir():
        return None
    try:
        out = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(out, dict) or out.get("stage") != name or out.get("hash") != h:
            raise ValueError(f"it belongs to stage {out.get('stage') if isinstance(out, dict) else '?'!r} "
                             f"hash {out.get('hash') if isinstance(out, dict) else '?'!r}, "
                             f"not {name!r} {h!r}")
        rec = StageRecord(name, h, d, out, cached=True)
        rec.result  # noqa: B018  -- check the result file loads before the stage counts as done
    except (OSError, ValueError, ResultFileError, UnicodeDecodeError) as e:
        warnings.warn(f"{p}: broken stage folder ({e}); the stage runs again", stacklevel=2)
        return None
    return rec


# ============================================================================ the lock


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.lock`` for the whole run; a second run into the folder is refused.

    An OS file lock: a killed run releases it, so it never stays stuck."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not path.exists() or os.stat(path).st_ino != os.fstat(f.fileno()).st_ino:
                raise OSError("the lock file was replaced")  # the run we waited on removed it
        except OSError:
            f.seek(0)
            who = f.read().strip() or "?"
            raise RunLockedError(f"run folder {run_dir} is in use by another emocircuits run "
                                 f"(pid {who}); wait for it or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        try:
            path.unlink(missing_ok=True)
        finally:
            f.close()


# ============================================================================ running


@dataclass
class RunResult:
    run_dir: Path
    results: dict
    report: Path | None
    ran: list[str]
    cached: list[str]
    failed: list[str]
    skipped: list[str]
    records: dict[str, StageRecord] = field(default_factory=dict)

    def result(self, name: str) -> Any:
        """The typed result of a finished stage."""
        if name not in self.records:
            raise KeyError(f"stage {name!r} did not finish; finished: {list(self.records)}")
        return self.records[name].result


def open_run(run_dir: str | os.PathLike) -> dict[str, StageRecord]:
    """The finished stages of a run folder (from its results.json), typed results loaded lazily."""
    run_dir = Path(run_dir)
    p = run_dir / "results.json"
    if not p.is_file():
        raise RunError(f"{run_dir}: no results.json (not a run folder, or no stage finished yet)")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        stages = doc["stages"]
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{p}: not a valid results.json ({type(e).__name__}: {e})") from None
    out = {}
    for name, st in stages.items():
        if not isinstance(st, dict) or st.get("status") != "done":
            continue
        rec = load_record(run_dir, name, str(st.get("config_hash")))
        if rec is not None:
            out[name] = rec
    return out


def closure(studies: Sequence[Study], only: Sequence[str] | None) -> set[str]:
    """``only`` and everything they require."""
    names = [s.name for s in studies]
    if only is None:
        return set(names)
    unknown = [o for o in only if o not in names]
    if unknown:
        raise RunError(f"unknown stage(s) {unknown}; stages: {names}")
    by = {s.name: s for s in studies}
    want: set[str] = set()
    todo = list(only)
    while todo:
        n = todo.pop()
        if n not in want:
            want.add(n)
            todo += list(by[n].requires)
    return want


def run_studies(
    cfg: RunConfigLike,
    run_dir: str | os.PathLike,
    studies: Sequence[Study],
    *,
    model_loader: Callable[[], Any],
    only: Sequence[str] | None = None,
    keep_going: bool = True,
    progress: bool = True,
    model: Any = None,
    describe: Callable[[Mapping[str, StageRecord]], dict] | None = None,
    report: Callable[[Path], Path] | None = None,
) -> RunResult:
    """Run (or resume) ``studies`` in order; results.json after each stage, the report at the end.

    ``only``: these stages and what they require. ``keep_going``: a failing stage is recorded
    and its dependents skipped (else :class:`RunError`). ``describe(records)`` -> the
    ``meta``/``summary`` part of results.json. ``report(run_dir)`` writes the report.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"--out {run_dir} is a file, not a folder")
    studies = list(studies)
    hashes = stage_hashes(studies, cfg)
    wanted = closure(studies, only)
    with run_lock(run_dir):
        atomic_write_json(run_dir / "config.json", cfg.to_dict())
        stages_dir = run_dir / "stages"
        for tmp in stages_dir.glob(".tmp-*") if stages_dir.exists() else []:
            shutil.rmtree(tmp, ignore_errors=True)  # killed runs' leftovers (we hold the lock)
        handle = ModelHandle(model_loader, model)
        status: dict[str, dict] = {}
        records: dict[str, StageRecord] = {}
        ran, cached, failed, skipped = [], [], [], []

        def write() -> dict:
            doc = {**(describe(records) if describe else {}),
                   "stages": {s.name: status[s.name] for s in studies if s.name in status}}
            doc.setdefault("meta", {})["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            doc["meta"]["model_load_seconds"] = round(handle.load_seconds, 2) if handle.loaded else None
            atomic_write_json(run_dir / "results.json", doc)
            return doc

        bar = tqdm(studies, desc="run", disable=not progress, unit="stage")
        for st in bar:
            bar.set_postfix_str(st.name)
            h = effective_hash(st, hashes, records)
            rec = load_record(run_dir, st.name, h)
            if rec is not None:
                records[st.name] = rec
                status[st.name] = _entry(st, rec, run_dir)
                cached.append(st.name)
                continue
            if st.name not in wanted:
                continue
            miss = st.missing_modules()
            bad_up = [r for r in st.requires if r not in records]
            if miss or bad_up:
                why = (f"unavailable: module {', '.join(miss)} not found" if miss
                       else f"skipped: upstream {', '.join(bad_up)} not available")
                status[st.name] = {"title": st.title, "status": why, "config_hash": h}
                skipped.append(st.name)
                write()
                continue
            try:
                rec = _run_stage(st, h, cfg, run_dir, records, handle, progress)
            except Exception as e:
                if not keep_going:
                    raise RunError(f"stage {st.name!r} failed: {type(e).__name__}: {e}") from e
                status[st.name] = {"title": st.title, "config_hash": h,
                                   "status": f"failed: {type(e).__name__}: {e}",
                                   "traceback": traceback.format_exc(limit=8)}
                failed.append(st.name)
                tqdm.write(f"[emocircuits] stage {st.name} failed: {type(e).__name__}: {e}")
            else:
                records[st.name] = rec
                status[st.name] = _entry(st, rec, run_dir)
                ran.append(st.name)
            write()
        bar.close()
        doc = write()
        rep = report(run_dir) if report is not None else None
    return RunResult(run_dir, doc, rep, ran, cached, failed, skipped, records)


def _entry(st: Study, rec: StageRecord, run_dir: Path) -> dict:
    rel = rec.dir.relative_to(run_dir).as_posix()
    out = rec.output
    return {
        "title": st.title, "status": "done", "cached": rec.cached, "config_hash": rec.hash,
        "version": out.get("version"), "seconds": out.get("seconds"),
        "compute_seconds": out.get("compute_seconds", out.get("seconds")), "folder": rel,
        "result_type": out.get("result_type"), "results": out.get("results", {}),
        "headline": out.get("headline", {}), "notes": out.get("notes", {}),
        "figures": [{**f, "path": f"{rel}/{f['path']}"} for f in out.get("figures", [])],
        "tables": out.get("tables", []),
        "views": [{**v, "path": f"{rel}/{v['path']}"} for v in out.get("views", [])],
    }


def _run_stage(st: Study, h: str, cfg: RunConfigLike, run_dir: Path, records: dict[str, StageRecord],
               handle: ModelHandle, progress: bool) -> StageRecord:
    stages_dir = run_dir / "stages"
    stages_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{st.name}-{h}-", dir=stages_dir))
    try:
        ups = {r: records[r] for r in (*st.requires, *st.optional) if r in records}
        ctx = StageContext(st, cfg, cfg.section(st.name), run_dir, tmp, ups, handle, progress, hash=h)
        t = time.perf_counter()
        result = st.run(ctx)
        seconds = time.perf_counter() - t
        if not isinstance(result, Result):
            raise RunError(f"stage {st.name!r} returned {type(result).__name__}, not a Result")
        result.save(tmp / "result")
        headline = result.headline() if hasattr(result, "headline") else {}
        if ctx.resumed:
            ctx.notes["resumed"] = (f"{len(ctx.resumed)} checkpoint(s) of an interrupted run loaded, not "
                                    f"recomputed; seconds counts this run only, compute_seconds adds the "
                                    f"{ctx.resumed_seconds:.0f} s they took: {', '.join(ctx.resumed)}")
        output = {"stage": st.name, "hash": h, "version": st.version, "seconds": round(seconds, 2),
                  "compute_seconds": round(seconds + ctx.resumed_seconds, 2),
                  "result_type": type(result).__name__, "results": compact_json(jsonable(result.to_dict())),
                  "headline": jsonable(headline), "notes": ctx.notes, "figures": ctx.figures,
                  "tables": jsonable(ctx.tables), "views": ctx.views,
                  "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write_json(tmp / "output.json", output)
        final = stage_dir(run_dir, st.name, h)
        if final.exists():  # a broken folder of the same key (named when it was read)
            shutil.rmtree(final)
        os.replace(tmp, final)
        shutil.rmtree(ctx.partial_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return StageRecord(st.name, h, final, output, cached=False, _result=result)
